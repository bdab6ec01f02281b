"""lf.multi_lora_linear against a per-row float64 loop, forward and every gradient.

Runs the Triton kernels (interpreter on CPU, natively on CUDA). Shapes are
small and odd; ids unsorted with base rows (-1) mixed in; per-adapter ranks
and scalings; both regimes (decode: cuBLAS base + LoRA added in; prefill: one
grouped GEMM) are forced on every shape, not only where T selects them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_fused as lf
from lora_cases import DEVICE, TOLERANCE, rel_error
from lora_fused.kernels import lora_linear as single_kernels
from lora_fused.kernels import multi_lora as kernels

IN, OUT = 37, 45


@dataclass
class MultiInputs:
    x: torch.Tensor
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    ids: torch.Tensor
    scalings: torch.Tensor
    bias: Optional[torch.Tensor]
    ranks: Optional[torch.Tensor]


def make_multi(T, n=3, r_max=8, *, ranks=(1, 3, 8), dtype=torch.float32, bias=True, ids=None,
               in_features=IN, out_features=OUT, seed=0, device=DEVICE) -> MultiInputs:
    """Random inputs, every term O(1); ids drawn from [-1, n) unless given."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    if ids is None:
        ids = torch.randint(-1, n, (T,), generator=g)
    ranks_t = None if ranks is None else torch.tensor(ranks, dtype=torch.int64, device=device)
    return MultiInputs(
        x=rand(T, in_features), weight=rand(out_features, in_features, scale=in_features ** -0.5),
        lora_A=rand(n, r_max, in_features, scale=in_features ** -0.5),
        lora_B=rand(n, out_features, r_max, scale=r_max ** -0.5),
        ids=torch.as_tensor(ids).to(device), scalings=(torch.rand(n, generator=g) + 0.5).to(device),
        bias=rand(out_features) if bias else None, ranks=ranks_t)


def run_multi(inp: MultiInputs, route=None, grad_y=None):
    """Forward + backward of lf.multi_lora_linear: (y, {x, lora_A, lora_B grads}, grad_y)."""
    leaves = {k: getattr(inp, k).detach().clone().requires_grad_() for k in ("x", "lora_A", "lora_B")}
    y = lf.multi_lora_linear(leaves["x"], inp.weight, leaves["lora_A"], leaves["lora_B"],
                             inp.ids if route is None else route, inp.scalings, inp.bias, ranks=inp.ranks)
    if grad_y is None:
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    y.backward(grad_y)
    return y, {k: v.grad for k, v in leaves.items()}, grad_y


def reference(inp: MultiInputs, grad_y):
    """The per-row float64 loop, with autograd for the gradients."""
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    leaves = {k: d(getattr(inp, k)).requires_grad_() for k in ("x", "lora_A", "lora_B")}
    y = lf.multi_lora_linear_reference(leaves["x"], d(inp.weight), leaves["lora_A"], leaves["lora_B"],
                                       inp.ids, d(inp.scalings), d(inp.bias), inp.ranks)
    y.backward(grad_y.double())
    return y, {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}


def assert_matches_reference(inp: MultiInputs, route=None):
    launched = sum(single_kernels.LAUNCH_COUNTS.values())
    y, grads, grad_y = run_multi(inp, route)
    ref_y, ref_grads = reference(inp, grad_y)
    if inp.x.numel() and lf.select_backend(inp.x.device, inp.x.dtype) == "triton":
        assert sum(single_kernels.LAUNCH_COUNTS.values()) > launched, "the Triton kernels did not run"
    tol = TOLERANCE[inp.x.dtype]
    assert y.dtype == inp.x.dtype and y.shape == ref_y.shape
    assert rel_error(y, ref_y) <= tol, f"y: {rel_error(y, ref_y):.2e}"
    for name, g in grads.items():
        assert g.dtype == inp.x.dtype
        assert torch.isfinite(g).all(), f"d{name} has NaN/inf (an unwritten element)"
        ref = ref_grads[name]
        if ref.norm() > 0:
            assert rel_error(g, ref) <= tol, f"d{name}: {rel_error(g, ref):.2e}"
        else:  # e.g. dA/dB when every row is base-only
            assert (g == 0).all(), f"d{name} must be exactly zero"
    assert_padding_and_absent_zero(inp, grads)
    return y, grads


def assert_padding_and_absent_zero(inp: MultiInputs, grads):
    """Rank padding and adapters with no rows get exactly zero gradient."""
    n, r_max = inp.lora_A.shape[:2]
    present = set(inp.ids.reshape(-1).tolist())
    for i in range(n):
        r = r_max if inp.ranks is None else int(inp.ranks[i])
        assert (grads["lora_A"][i, r:] == 0).all() and (grads["lora_B"][i, :, r:] == 0).all(), \
            f"adapter {i}: gradient on rank padding (rank {r} of {r_max})"
        if i not in present:
            assert (grads["lora_A"][i] == 0).all() and (grads["lora_B"][i] == 0).all(), \
                f"adapter {i} has no rows but a nonzero gradient"


# --------------------------------------------------------------------------
# forward and gradients against the float64 loop
# --------------------------------------------------------------------------
REGIMES = list(kernels.MULTI_CONFIGS)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("T", [1, 7, 33, 130])
def test_matches_reference_fp32(T, regime):
    inp = make_multi(T, seed=T)
    assert_matches_reference(inp, lf.plan_segments(inp.ids.to(DEVICE), 3, regime=regime))


@pytest.mark.parametrize("T", [5, 70])
def test_matches_reference_fp16(T):
    assert_matches_reference(make_multi(T, dtype=torch.float16, seed=T))


@pytest.mark.parametrize("ranks", [None, (1, 1, 1), (16, 5, 9)], ids=["full", "r1", "mixed"])
def test_per_adapter_ranks(ranks):
    r_max = 16 if ranks != (1, 1, 1) else 1
    assert_matches_reference(make_multi(40, r_max=r_max, ranks=ranks, seed=3))


def test_rank_above_one_tile_and_many_adapters():
    """r_max = 40: the expand's rank loop takes three 16-wide steps; 9 adapters, 5 of them absent."""
    ids = torch.tensor([0, 8, 8, -1, 3, 0, 8, 3] * 4)
    ranks = (40, 2, 17, 33, 1, 40, 8, 16, 24)
    assert_matches_reference(make_multi(32, n=9, r_max=40, ranks=ranks, ids=ids, seed=4))


def test_unsorted_ids_and_no_bias():
    ids = torch.tensor([2, 0, -1, 1, 2, 2, -1, 0, 1, 0, 2])
    assert_matches_reference(make_multi(11, ids=ids, bias=False))


def test_all_rows_base_only_is_the_base_layer():
    inp = make_multi(9, ids=torch.full((9,), -1))
    y, grads = assert_matches_reference(inp)
    torch.testing.assert_close(y, torch.nn.functional.linear(inp.x, inp.weight, inp.bias))
    assert (grads["lora_A"] == 0).all() and (grads["lora_B"] == 0).all()


@pytest.mark.parametrize("T", [1, 50])
def test_one_adapter_for_all_rows_equals_lora_linear(T):
    inp = make_multi(T, ids=torch.full((T,), 1), ranks=None, r_max=6, seed=5)
    y, grads, grad_y = run_multi(inp)
    leaves = {"x": inp.x.detach().clone().requires_grad_(),
              "lora_A": inp.lora_A[1].detach().clone().requires_grad_(),
              "lora_B": inp.lora_B[1].detach().clone().requires_grad_()}
    y1 = lf.lora_linear(leaves["x"], inp.weight, leaves["lora_A"], leaves["lora_B"],
                        float(inp.scalings[1]), inp.bias)
    y1.backward(grad_y)
    tol = TOLERANCE[inp.x.dtype]
    assert rel_error(y, y1) <= tol
    assert rel_error(grads["x"], leaves["x"].grad) <= tol
    assert rel_error(grads["lora_A"][1], leaves["lora_A"].grad) <= tol
    assert rel_error(grads["lora_B"][1], leaves["lora_B"].grad) <= tol
    assert (grads["lora_A"][[0, 2]] == 0).all() and (grads["lora_B"][[0, 2]] == 0).all()


def test_empty_batch():
    inp = make_multi(0, ids=torch.zeros(0, dtype=torch.int64))
    y, grads, _ = run_multi(inp)
    assert y.shape == (0, OUT) and grads["x"].shape == (0, IN)
    assert (grads["lora_A"] == 0).all() and (grads["lora_B"] == 0).all()


def test_non_contiguous_inputs():
    """x a strided slice, the A and B stacks transposed views, int32 ids and ranks."""
    base = make_multi(19, r_max=8, seed=8)
    g = torch.Generator().manual_seed(9)
    wide_x = torch.randn(19, 2 * IN, generator=g).to(base.x)
    a_t = base.lora_A.transpose(1, 2).contiguous().transpose(1, 2)   # [n, r, in] with strides of [n, in, r]
    b_t = base.lora_B.transpose(1, 2).contiguous().transpose(1, 2)
    inp = MultiInputs(x=wide_x[:, ::2], weight=base.weight, lora_A=a_t, lora_B=b_t,
                      ids=base.ids.to(torch.int32), scalings=base.scalings.double(), bias=base.bias,
                      ranks=base.ranks.to(torch.int32))
    assert not inp.x.is_contiguous() and not inp.lora_A.is_contiguous() and not inp.lora_B.is_contiguous()
    assert_matches_reference(inp)


def test_leading_dimensions_flatten_like_lora_linear():
    inp = make_multi(12, seed=10)
    y = lf.multi_lora_linear(inp.x.reshape(3, 4, IN), inp.weight, inp.lora_A, inp.lora_B,
                             inp.ids.reshape(3, 4), inp.scalings, inp.bias, ranks=inp.ranks)
    y2 = lf.multi_lora_linear(inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.ids, inp.scalings,
                              inp.bias, ranks=inp.ranks)
    assert y.shape == (3, 4, OUT)
    assert torch.equal(y.reshape(12, OUT), y2)


def test_weight_and_bias_gradients_when_trained():
    inp = make_multi(10, seed=11)
    w = inp.weight.detach().clone().requires_grad_()
    b = inp.bias.detach().clone().requires_grad_()
    y = lf.multi_lora_linear(inp.x, w, inp.lora_A, inp.lora_B, inp.ids, inp.scalings, b, ranks=inp.ranks)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    torch.testing.assert_close(w.grad, grad_y.t() @ inp.x)
    torch.testing.assert_close(b.grad, grad_y.sum(0))


def test_torch_backend_matches_reference(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    assert_matches_reference(make_multi(21, seed=12))


def test_float64_runs_on_the_torch_path():
    inp = make_multi(6, dtype=torch.float64, seed=13)
    y, grads, grad_y = run_multi(inp)
    ref_y, ref_grads = reference(inp, grad_y)
    assert rel_error(y, ref_y) <= 1e-12
    for k in grads:
        assert rel_error(grads[k], ref_grads[k]) <= 1e-12


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hypothesis_shapes_ranks_ids(data):
    T = data.draw(st.integers(0, 40), label="T")
    n = data.draw(st.integers(1, 5), label="n")
    r_max = data.draw(st.integers(1, 20), label="r_max")
    ranks = data.draw(st.lists(st.integers(1, r_max), min_size=n, max_size=n), label="ranks")
    ids = data.draw(st.lists(st.integers(-1, n - 1), min_size=T, max_size=T), label="ids")
    regime = data.draw(st.sampled_from(REGIMES), label="regime")
    inp = make_multi(T, n=n, r_max=r_max, ranks=ranks, ids=torch.tensor(ids, dtype=torch.int64),
                     in_features=23, out_features=29, seed=T * 31 + n)
    assert_matches_reference(inp, lf.plan_segments(inp.ids, n, regime=regime))


# --------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------
@pytest.mark.parametrize("regime", REGIMES)
def test_plan_covers_every_row_once_in_chunks_of_one_adapter(regime):
    ids = torch.tensor([3, -1, 0, 3, 3, 1, -1, 0, 3] * 9)
    plan = lf.plan_segments(ids, 5, regime=regime)
    block = plan.block_rows
    assert plan.chunk_len.shape[0] == kernels.chunk_capacity(len(ids), 5, block)
    seen = []
    for c in range(plan.chunk_len.shape[0]):
        length, start, adapter = (int(plan.chunk_len[c]), int(plan.chunk_start[c]), int(plan.chunk_adapter[c]))
        assert 0 <= length <= block
        rows = plan.sorted_rows[start:start + length].long()
        assert (ids[rows] == adapter).all(), f"chunk {c} mixes adapters"
        seen += rows.tolist()
    assert sorted(seen) == list(range(len(ids)))
    for i in range(5):  # segments: rows of adapter i in their original order (stable sort)
        seg = plan.sorted_rows[int(plan.seg_start[i]):int(plan.seg_start[i]) + int(plan.seg_len[i])]
        assert seg.tolist() == (ids == i).nonzero().squeeze(1).tolist()
    assert int(plan.seg_len[5]) == int((ids == -1).sum())  # the base segment
    assert plan.seg_len[4] == 0


def test_plan_shapes_depend_on_batch_size_only():
    a = lf.plan_segments(torch.zeros(40, dtype=torch.int64), 6)
    b = lf.plan_segments(torch.arange(40) % 7 - 1, 6)
    assert [t.shape for t in a.tensors()] == [t.shape for t in b.tensors()]


def test_plan_update_in_place_keeps_buffers_and_ids_untouched():
    ids = torch.tensor([0, 1, -1, 1, 0])
    plan = lf.plan_segments(ids, 2)
    ptrs = [t.data_ptr() for t in plan.tensors()]
    new_ids = torch.tensor([1, 1, 1, 0, -1])
    plan.update_(new_ids)
    assert [t.data_ptr() for t in plan.tensors()] == ptrs
    assert torch.equal(ids, torch.tensor([0, 1, -1, 1, 0])), "update_ wrote into the caller's ids"
    fresh = lf.plan_segments(new_ids, 2)
    assert all(torch.equal(p, f) for p, f in zip(plan.tensors(), fresh.tensors()))
    inp = make_multi(5, n=2, r_max=4, ranks=(4, 2), ids=new_ids, seed=14)
    assert_matches_reference(inp, plan)
    with pytest.raises(ValueError, match="5 adapter ids"):
        plan.update_(torch.tensor([0, 1]))


def test_a_plan_equals_the_ids_it_was_built_from():
    inp = make_multi(25, seed=15)
    plan = lf.plan_segments(inp.ids, 3)
    y_ids, g_ids, grad_y = run_multi(inp)
    y_plan, g_plan, _ = run_multi(inp, plan, grad_y)
    assert torch.equal(y_ids, y_plan)
    assert all(torch.equal(g_ids[k], g_plan[k]) for k in g_ids)


# --------------------------------------------------------------------------
# bad input: clear errors naming the argument and the shapes
# --------------------------------------------------------------------------
def _call(inp: MultiInputs, **over):
    args = dict(x=inp.x, weight=inp.weight, lora_A=inp.lora_A, lora_B=inp.lora_B, adapter_ids=inp.ids,
                scalings=inp.scalings, bias=inp.bias)
    ranks = over.pop("ranks", inp.ranks)
    args.update(over)
    return lf.multi_lora_linear(**args, ranks=ranks)


@pytest.mark.parametrize("bad, error, match", [
    (dict(adapter_ids=torch.tensor([0, 1, 3, 0])), IndexError, r"\[-1, 3\).*\[0, 3\]"),
    (dict(adapter_ids=torch.tensor([0, -2, 1, 0])), IndexError, r"\[-1, 3\)"),
    (dict(adapter_ids=torch.tensor([0, 1, 2])), ValueError, r"3 entries.*4 rows"),
    (dict(adapter_ids=torch.tensor([0.0, 1.0, 2.0, 0.0])), TypeError, r"int32 or int64.*float32"),
    (dict(adapter_ids=[0, 1, 2, 0]), TypeError, r"adapter_ids must be"),
    (dict(ranks=torch.tensor([1, 9, 2])), ValueError, r"\[1, r_max=8\].*\[1, 9\]"),
    (dict(ranks=torch.tensor([0, 2, 2])), ValueError, r"\[1, r_max=8\]"),
    (dict(ranks=torch.tensor([1, 2])), ValueError, r"ranks must be \[n_adapters=3\]"),
    (dict(ranks=torch.tensor([1.0, 2.0, 3.0])), TypeError, r"ranks must be an int32 or int64"),
    (dict(scalings=torch.ones(2)), ValueError, r"scalings must be \[n_adapters=3\].*\(2,\)"),
    (dict(scalings=torch.ones(3, dtype=torch.int64)), TypeError, r"scalings must be a floating"),
    (dict(scalings=2.0), TypeError, r"scalings must be a torch.Tensor"),
    (dict(lora_B=torch.randn(2, OUT, 8)), ValueError, r"lora_B must be \[n_adapters=3, out_features=45, r_max=8\]"),
    (dict(lora_B=torch.randn(3, OUT, 7)), ValueError, r"lora_B must be .*\(3, 45, 7\)"),
    (dict(lora_A=torch.randn(3, 8, IN + 1)), ValueError, r"lora_A must be \[n_adapters >= 1, r_max >= 1, in_features=37\]"),
    (dict(lora_A=torch.randn(8, IN)), ValueError, r"lora_A must be"),
    (dict(x=torch.randn(4, IN + 2)), ValueError, r"x has 39 features"),
    (dict(x=torch.randn(4, IN, dtype=torch.float64)), TypeError, r"weight has dtype torch.float32 but x has dtype torch.float64"),
    (dict(bias=torch.randn(OUT + 1)), ValueError, r"bias must be \[out_features=45\]"),
])
def test_bad_inputs_raise_clear_errors(bad, error, match):
    inp = make_multi(4, ids=torch.tensor([0, 1, 2, 0]), device="cpu")
    with pytest.raises(error, match=match):
        _call(inp, **bad)


def test_a_plan_for_another_batch_is_refused():
    inp = make_multi(4, ids=torch.tensor([0, 1, 2, 0]), device="cpu")
    with pytest.raises(ValueError, match="plan was built for 5 rows and 3 adapters, but x has 4 rows"):
        _call(inp, adapter_ids=lf.plan_segments(torch.zeros(5, dtype=torch.int64), 3))
    with pytest.raises(ValueError, match="2 adapters"):
        _call(inp, adapter_ids=lf.plan_segments(torch.zeros(4, dtype=torch.int64), 2))
    with pytest.raises(ValueError, match="n_adapters must be a positive int"):
        lf.plan_segments(torch.zeros(4, dtype=torch.int64), 0)


def _check_variants(inp: MultiInputs) -> dict:
    """Argument sets (x, weight, lora_A, lora_B, scalings, bias, ranks): the good one, and one per
    way of being wrong, each in a single argument (shape, dtype, device: meta stands in for
    another device, type, rank of the tensor)."""
    good = dict(x=inp.x, weight=inp.weight, lora_A=inp.lora_A, lora_B=inp.lora_B, scalings=inp.scalings,
                bias=inp.bias, ranks=inp.ranks)
    meta = lambda t: t.to("meta")  # noqa: E731
    changes = {
        "good": {}, "no bias, no ranks": dict(bias=None, ranks=None), "int32 ranks": dict(ranks=inp.ranks.int()),
        "fp64 scalings": dict(scalings=inp.scalings.double()), "3-D x": dict(x=inp.x.reshape(2, 2, IN)),
        "0-d x": dict(x=torch.tensor(1.0)), "1-D x": dict(x=inp.x[0]), "x wide": dict(x=torch.randn(4, IN + 1)),
        "x fp64": dict(x=inp.x.double()), "x meta": dict(x=meta(inp.x)), "x list": dict(x=inp.x.tolist()),
        "weight 1-D": dict(weight=inp.weight[0]), "weight fp16": dict(weight=inp.weight.half()),
        "weight meta": dict(weight=meta(inp.weight)), "weight wide": dict(weight=torch.randn(OUT, IN + 1)),
        "A 2-D": dict(lora_A=inp.lora_A[0]), "A no rank": dict(lora_A=inp.lora_A[:, :0]),
        "A no adapter": dict(lora_A=inp.lora_A[:0]), "A in+1": dict(lora_A=torch.randn(3, 8, IN + 1)),
        "A fp64": dict(lora_A=inp.lora_A.double()), "A meta": dict(lora_A=meta(inp.lora_A)),
        "B short rank": dict(lora_B=inp.lora_B[:, :, :7]), "B n-1": dict(lora_B=inp.lora_B[:2]),
        "B out-1": dict(lora_B=inp.lora_B[:, :-1]), "B fp64": dict(lora_B=inp.lora_B.double()),
        "B meta": dict(lora_B=meta(inp.lora_B)), "B 2-D": dict(lora_B=inp.lora_B[0]),
        "scalings int": dict(scalings=inp.scalings.long()), "scalings [2]": dict(scalings=inp.scalings[:2]),
        "scalings meta": dict(scalings=meta(inp.scalings)), "scalings float": dict(scalings=1.0),
        "bias [out+1]": dict(bias=torch.randn(OUT + 1)), "bias fp64": dict(bias=inp.bias.double()),
        "bias meta": dict(bias=meta(inp.bias)), "bias 2-D": dict(bias=inp.bias[None]),
        "ranks float": dict(ranks=inp.ranks.float()), "ranks [2]": dict(ranks=inp.ranks[:2]),
        "ranks meta": dict(ranks=meta(inp.ranks)), "ranks list": dict(ranks=[1, 3, 8]),
    }
    return {name: {**good, **change} for name, change in changes.items()}


def test_one_expression_check_passes_exactly_what_the_full_checks_pass():
    """The one-expression check each call runs first never lets through what the full checks
    refuse (the kernels read what they are given), and passes the good calls."""
    from lora_fused.validation import _check_multi_lora_args_in_full, _multi_lora_args_ok
    inp = make_multi(4, ids=torch.tensor([0, 1, 2, 0]), device="cpu")
    for name, args in _check_variants(inp).items():
        try:
            _check_multi_lora_args_in_full(**args)
            passes = True
        except (TypeError, ValueError):
            passes = False
        assert _multi_lora_args_ok(**args) == passes, name
        assert passes == (name in ("good", "no bias, no ranks", "int32 ranks", "fp64 scalings", "3-D x", "1-D x")), name


def test_a_plan_on_another_device_is_refused():
    inp = make_multi(4, ids=torch.tensor([0, 1, 2, 0]), device="cpu")
    plan = lf.plan_segments(torch.tensor([0, 1, 2, 0], device="meta"), 3)  # meta: no values to read
    with pytest.raises(ValueError, match="the plan is on meta but x is on cpu"):
        _call(inp, adapter_ids=plan)


# --------------------------------------------------------------------------
# torch.compile: the custom ops trace without graph breaks
# --------------------------------------------------------------------------
def test_compiles_without_graph_breaks_and_matches_eager():
    inp = make_multi(14, seed=16)
    plan = lf.plan_segments(inp.ids, 3)

    def f(x, A, B):
        return lf.multi_lora_linear(x, inp.weight, A, B, plan, inp.scalings, inp.bias, ranks=inp.ranks)

    explanation = torch._dynamo.explain(f)(inp.x, inp.lora_A, inp.lora_B)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    leaves = [t.detach().clone().requires_grad_() for t in (inp.x, inp.lora_A, inp.lora_B)]
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    y.sum().backward()
    y_eager, grads, _ = run_multi(inp, plan, torch.ones_like(y))
    assert rel_error(y, y_eager) <= 1e-6
    for leaf, name in zip(leaves, ("x", "lora_A", "lora_B")):
        assert rel_error(leaf.grad, grads[name]) <= 1e-6


def test_opcheck():
    inp = make_multi(6, seed=17, device="cpu")
    plan = lf.plan_segments(inp.ids, 3)
    ranks = inp.ranks.to(torch.int32)
    args = (inp.x, inp.weight, inp.bias, inp.lora_A.requires_grad_(), inp.lora_B.requires_grad_(),
            inp.scalings, ranks, *plan.tensors(), plan.regime)
    torch.library.opcheck(torch.ops.lora_fused.multi_lora_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_kernels_clamp_unchecked_ranks_to_the_stack():
    """While a CUDA graph is captured ranks are not read on the host: a rank past r_max must
    then act as r_max inside the kernels, never read past the stacks."""
    inp = make_multi(20, ranks=(1, 3, 8), seed=18)
    plan = lf.plan_segments(inp.ids, 3)
    args = lambda ranks: (inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scalings,  # noqa: E731
                          torch.tensor(ranks, dtype=torch.int32, device=inp.x.device), *plan.tensors(),
                          plan.regime)
    y_bad, _ = torch.ops.lora_fused.multi_lora_fwd(*args([1, 3, 1000]))
    y_ok, _ = torch.ops.lora_fused.multi_lora_fwd(*args([1, 3, 8]))
    assert torch.equal(y_bad, y_ok)


@pytest.mark.parametrize("T", [5, 40])  # the torch backend's per-row gather path and its chunk path
def test_torch_path_fp16_scaling_beyond_fp16_range(monkeypatch, T):
    """A scaling above 65504 is applied in fp32 on the torch path, so rows whose
    true |y| is about 66 come out finite and correct (they were inf when scalings were cast to
    fp16), with the base rows and the other adapter's rows untouched."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    g = torch.Generator().manual_seed(T)
    n, r, K, N = 2, 4, 16, 12
    x = torch.randn(T, K, generator=g)
    weight, bias = torch.randn(N, K, generator=g) * 0.25, torch.randn(N, generator=g)
    A = torch.randn(n, r, K, generator=g) * 4e-3
    B = torch.randn(n, N, r, generator=g) * 4e-3
    scalings = torch.tensor([1.0e5, 0.5])  # 1e5 is inf in fp16
    ids = torch.arange(T) % 3 - 1  # base, adapter 0, adapter 1, ...
    half = [t.half() for t in (x, weight, A, B, bias)]
    y = lf.multi_lora_linear(half[0], half[1], half[2], half[3], ids, scalings, half[4])
    y_ref = lf.multi_lora_linear_reference(*(t.double() for t in half[:4]), ids, scalings.double(),
                                           half[4].double())
    lora_rows = y_ref[ids == 0] - F_linear64(half, ids == 0)
    assert 20 < lora_rows.abs().max() < 65504  # the LoRA term itself is large but fp16-finite
    assert torch.isfinite(y).all()
    assert rel_error(y, y_ref) <= 2e-3


def F_linear64(half, rows):
    """The base layer in float64 on the selected rows."""
    x, weight, _A, _B, bias = (t.double() for t in half)
    return x[rows] @ weight.t() + bias


@pytest.mark.parametrize("T", [4, 16, 17])
def test_torch_path_rows_never_read_another_adapters_nonfinite_weights(monkeypatch, T):
    """The torch backend's all-adapters decode path (few rows, n · r_max <= 256) multiplies every
    row by every adapter's A with zero coefficients for the others: a NaN/inf in one adapter's
    stack would reach every row (0 · inf). It falls back to per-row gathers then: the other
    adapters' rows stay finite and match float64, with and without grad."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    inp = make_multi(T, n=3, r_max=8, ranks=(8, 3, 8), device="cpu", seed=T,
                     ids=torch.tensor([(i % 3) - 1 for i in range(T)]))
    poisoned = 1  # adapter 1 has an inf in a rank row it uses
    inp.lora_A[poisoned, 0, 0] = float("inf")
    ok_rows = inp.ids != poisoned
    ref = lf.multi_lora_linear_reference(inp.x.double(), inp.weight.double(), inp.lora_A.double(),
                                         inp.lora_B.double(), inp.ids, inp.scalings.double(),
                                         inp.bias.double(), ranks=inp.ranks)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            y = lf.multi_lora_linear(inp.x, inp.weight, inp.lora_A.requires_grad_(grad), inp.lora_B, inp.ids,
                                     inp.scalings, inp.bias, ranks=inp.ranks)
        inp.lora_A = inp.lora_A.detach()
        assert torch.isfinite(y[ok_rows]).all()
        assert rel_error(y[ok_rows], ref[ok_rows]) <= 1e-5
