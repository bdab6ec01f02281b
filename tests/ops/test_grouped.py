"""lf.grouped_lora_linear (mixture-of-experts LoRA) against the float64 oracle, on both backends:
outputs and every gradient, top-k rows, r = 1, experts without rows, dropout with the op's own mask,
empty batches, strided inputs, bad input, torch.compile."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lora_fused as lf
from lora_fused.ops import grouped
from lora_cases import drawn_seed, rel_error

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", request.param)
    return request.param


def make(T, k, E, n_in, n_out, r, dtype=torch.float32, *, bias=True, unused_expert=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    high = E - 1 if unused_expert else E  # the last expert gets no rows
    ids = torch.randint(0, high, (T, k) if k else (T,), generator=g)
    return dict(x=rand(T, n_in), weight=rand(E, n_out, n_in), lora_A=rand(E, r, n_in), lora_B=rand(E, n_out, r),
                bias=rand(E, n_out) if bias else None, expert_ids=ids)


def run(case, scaling=0.7, *, dropout_p=0.0, training=False, grad_base=False):
    leaves = {n: case[n].clone().requires_grad_() for n in ("x", "lora_A", "lora_B")}
    if grad_base:
        leaves["weight"] = case["weight"].clone().requires_grad_()
        if case["bias"] is not None:
            leaves["bias"] = case["bias"].clone().requires_grad_()
    args = {**case, **leaves}
    y = lf.grouped_lora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"], case["expert_ids"],
                               scaling, args["bias"], dropout_p=dropout_p, training=training)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(y.dtype)
    grads = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), grad_y)))
    return y, grads, grad_y


def oracle(case, grad_y, scaling=0.7, *, keep=None, dropout_p=0.0, names=("x", "lora_A", "lora_B")):
    leaves = {n: case[n].double().clone().requires_grad_() for n in names}
    args = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in case.items()}
    args.update(leaves)
    y = lf.grouped_lora_linear_reference(args["x"], args["weight"], args["lora_A"], args["lora_B"],
                                         case["expert_ids"], scaling, args["bias"], keep=keep, dropout_p=dropout_p)
    grads = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), grad_y.double())))
    return y, grads


TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("T,k,E,n_in,n_out,r", [(13, 2, 5, 19, 11, 3), (9, 0, 3, 17, 23, 1), (6, 4, 7, 8, 5, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_oracle(backend, T, k, E, n_in, n_out, r, dtype):
    case = make(T, k, E, n_in, n_out, r, dtype)
    y, grads, grad_y = run(case)
    y_ref, grads_ref = oracle(case, grad_y)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert rel_error(y, y_ref) <= TOL[dtype]
    for name in grads_ref:
        assert rel_error(grads[name], grads_ref[name]) <= TOL[dtype], name
    # The last expert has no rows: its factors' gradients are exact zeros.
    assert torch.count_nonzero(grads["lora_A"][E - 1]) == 0 and torch.count_nonzero(grads["lora_B"][E - 1]) == 0


def test_trained_base_weight_and_bias(backend):
    case = make(11, 2, 4, 9, 7, 2)
    y, grads, grad_y = run(case, grad_base=True)
    _, grads_ref = oracle(case, grad_y, names=("x", "lora_A", "lora_B", "weight", "bias"))
    for name in grads_ref:
        assert rel_error(grads[name], grads_ref[name]) <= 1e-5, name


def test_strided_inputs(backend):
    """x a column slice, the weight a transposed view of an [E, in, out] stack (gpt-oss's layout)."""
    case = make(10, 2, 3, 9, 6, 2)
    case["x"] = torch.cat([case["x"], torch.randn(10, 3)], 1)[:, :9]
    case["weight"] = case["weight"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not case["x"].is_contiguous() and not case["weight"].is_contiguous()
    y, grads, grad_y = run(case)
    y_ref, grads_ref = oracle(case, grad_y)
    assert rel_error(y, y_ref) <= 1e-5
    for name in grads_ref:
        assert rel_error(grads[name], grads_ref[name]) <= 1e-5, name


def sorted_keep_to_rows(keep_sorted, plan):
    """The op's mask is over the sorted pair rows; the oracle takes it in the caller's pair order."""
    return keep_sorted.index_select(0, plan.position)


def backend_keep(backend, seed, rows, cols, p, dtype):
    if backend == "torch":
        from lora_fused.backends.torch_backend import keep_mask
        return keep_mask(torch.tensor([seed]), rows, cols, p, dtype, torch.device("cpu"))
    return lf.dropout_keep_mask(seed, rows, cols, p)


@pytest.mark.parametrize("k", [0, 3])
def test_dropout_matches_oracle_with_the_ops_mask(backend, k):
    p = 0.3
    case = make(12, k, 4, 16, 9, 3)
    torch.manual_seed(99)
    y, grads, grad_y = run(case, dropout_p=p, training=True)
    plan = grouped.plan_experts(case["expert_ids"], 4)
    keep = backend_keep(backend, drawn_seed(99), plan.num_pairs, 16, p, torch.float64)
    assert 0 < int(keep.sum()) < keep.numel()
    y_ref, grads_ref = oracle(case, grad_y, keep=sorted_keep_to_rows(keep, plan), dropout_p=p)
    assert rel_error(y, y_ref) <= 1e-5
    for name in grads_ref:
        assert rel_error(grads[name], grads_ref[name]) <= 1e-5, name


def test_eval_mode_ignores_dropout(backend):
    case = make(8, 2, 3, 10, 6, 2)
    y_eval = lf.grouped_lora_linear(case["x"], case["weight"], case["lora_A"], case["lora_B"], case["expert_ids"],
                                    0.5, case["bias"], dropout_p=0.4, training=False)
    y_off = lf.grouped_lora_linear(case["x"], case["weight"], case["lora_A"], case["lora_B"], case["expert_ids"],
                                   0.5, case["bias"])
    assert torch.equal(y_eval, y_off)


def test_empty_batch(backend):
    case = make(0, 2, 3, 10, 6, 2)
    y, grads, _ = run(case)
    assert y.shape == (0, 2, 6)
    assert grads["x"].shape == (0, 10) and torch.count_nonzero(grads["lora_A"]) == 0


def test_sentinel_pairs_get_nothing(backend):
    """Ids outside [0, E) (transformers' expert-parallel sentinels) sort last and give zero rows."""
    case = make(9, 2, 4, 8, 5, 2)
    ids = case["expert_ids"].clone()
    ids[::3, 1] = 4
    plan = grouped.plan_experts(ids, 4)
    x = case["x"].clone().requires_grad_()
    y = grouped.grouped_lora_sorted(x, case["weight"], case["bias"], case["lora_A"], case["lora_B"], plan, 0.5,
                                    rows=True)
    y = y.index_select(0, plan.position).view(9, 2, 5)
    assert torch.count_nonzero(y[::3, 1]) == 0
    keep_rows = ids.clone()
    keep_rows[::3, 1] = 0
    y_ref = lf.grouped_lora_linear_reference(x.double(), case["weight"].double(), case["lora_A"].double(),
                                             case["lora_B"].double(), keep_rows, 0.5, case["bias"].double())
    live = torch.ones(9, 2, dtype=torch.bool)
    live[::3, 1] = False
    assert rel_error(y[live], y_ref[live]) <= 1e-5


def test_grouped_linear_sorted_matches_base(backend):
    case = make(10, 2, 3, 9, 7, 2)
    plan = grouped.plan_experts(case["expert_ids"], 3)
    x = case["x"].clone().requires_grad_()
    y = grouped.grouped_linear_sorted(x, case["weight"], case["bias"], plan, rows=True)
    grad_y = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, grad_y)
    x64 = case["x"].double().requires_grad_()
    zeros_a = torch.zeros(3, 1, 9, dtype=torch.float64)
    y_ref = lf.grouped_lora_linear_reference(x64, case["weight"].double(), zeros_a, torch.zeros(3, 7, 1).double(),
                                             case["expert_ids"], 1.0, case["bias"].double())
    y_ref_sorted = y_ref.reshape(-1, 7).index_select(0, plan.order)
    (dx_ref,) = torch.autograd.grad(y_ref_sorted, x64, grad_y.double())
    assert rel_error(y, y_ref_sorted) <= 1e-5 and rel_error(dx, dx_ref) <= 1e-5


class LargestOutput(TorchDispatchMode):
    """The element count of the largest new tensor an op returns (views and in-place results alias
    an existing tensor: they allocate nothing and are skipped)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t, ret in zip(outs, func._schema.returns):
            if isinstance(t, torch.Tensor) and ret.alias_info is None:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_expert_sized_tensor(backend):
    """Forward and backward make no tensor of one expert's out × in elements (B_e A_e is never formed)."""
    T, k, E, n_in, n_out = 4, 2, 6, 48, 40  # P·in and P·out stay below out·in
    case = make(T, k, E, n_in, n_out, 2)
    with LargestOutput() as mode:
        run(case)
    assert mode.largest < n_out * n_in, mode.largest


def test_bad_input_names_the_argument():
    case = make(5, 2, 3, 8, 6, 2)
    args = (case["x"], case["weight"], case["lora_A"], case["lora_B"], case["expert_ids"], 0.5)
    with pytest.raises(ValueError, match="lora_A must be"):
        lf.grouped_lora_linear(case["x"], case["weight"], case["lora_A"][:, :, :4], *args[3:])
    with pytest.raises(ValueError, match="weight must be"):
        lf.grouped_lora_linear(case["x"], case["weight"][0], *args[2:])
    with pytest.raises(ValueError, match="expert_ids must have"):
        lf.grouped_lora_linear(*args[:4], case["expert_ids"][:3], 0.5)
    out_of_range = case["expert_ids"].clone()
    out_of_range[0, 0] = 3
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        lf.grouped_lora_linear(*args[:4], out_of_range, 0.5)
    with pytest.raises(TypeError, match="int32 or int64"):
        lf.grouped_lora_linear(*args[:4], case["expert_ids"].float(), 0.5)
    with pytest.raises(TypeError, match="one dtype"):
        lf.grouped_lora_linear(case["x"].double(), *args[1:])
    with pytest.raises(ValueError, match="scaling"):
        lf.grouped_lora_linear(*args[:5], float("nan"))
    with pytest.raises(ValueError, match="bias must be"):
        lf.grouped_lora_linear(*args, bias=torch.zeros(6))


def test_compiled_matches_eager(backend):
    case = make(9, 2, 4, 12, 7, 2)
    leaves = {n: case[n].clone().requires_grad_() for n in ("x", "lora_A", "lora_B")}

    def f(x, a, b):
        return lf.grouped_lora_linear(x, case["weight"], a, b, case["expert_ids"], 0.5, case["bias"])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y_c = compiled(*leaves.values())
    y_e = f(*leaves.values())
    assert torch.equal(y_c, y_e)
    g_c = torch.autograd.grad(y_c.sum(), list(leaves.values()))
    g_e = torch.autograd.grad(y_e.sum(), list(leaves.values()))
    for a, b in zip(g_c, g_e):
        assert torch.equal(a, b)


def test_autocast_computes_in_its_dtype():
    """Under autocast every operand is cast to autocast's dtype, as for F.linear and lf.lora_linear
    (bf16 on a CPU: the torch backend, the interpreter has no bf16)."""
    case = make(9, 2, 3, 16, 8, 2)
    args = (case["x"], case["weight"], case["lora_A"], case["lora_B"], case["expert_ids"], 0.5, case["bias"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lf.grouped_lora_linear(*args)
    cast = [t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
    assert y.dtype == torch.bfloat16 and torch.equal(y, lf.grouped_lora_linear(*cast))


def test_non_tensor_arguments_raise_type_error():
    case = make(5, 2, 3, 8, 6, 2)
    with pytest.raises(TypeError, match="lora_A must be a torch.Tensor"):
        lf.grouped_lora_linear(case["x"], case["weight"], [1.0], case["lora_B"], case["expert_ids"], 0.5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lf.grouped_lora_linear([1.0], case["weight"], case["lora_A"], case["lora_B"], case["expert_ids"], 0.5)
