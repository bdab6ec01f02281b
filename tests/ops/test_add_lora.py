"""lf.add_lora: the LoRA delta alone, added in place into y, with packed output slices.

Against a float64 loop over rows and slices written from the contract:
y[t, o_j:o_j+w_j] += s_i · (x[t] A[i,j,:r_i]ᵀ) B[i, o_j:o_j+w_j, :r_i]ᵀ, i = ids[t] >= 0.
Both backends: the Triton kernels (interpreter on CPU) and the torch path.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_fused as lf
from lora_cases import DEVICE, TOLERANCE, rel_error
from lora_fused.kernels.common import LAUNCH_COUNTS

IN = 37


def make(T, slices, n=3, r_max=8, ranks=(1, 3, 8), ids=None, dtype=torch.float32, seed=0, four_d=None):
    g = torch.Generator().manual_seed(seed)
    S, out_total = len(slices), sum(slices)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)

    if ids is None:
        ids = torch.randint(-1, n, (T,), generator=g)
    four_d = S > 1 if four_d is None else four_d
    a = rand(n, S, r_max, IN, scale=IN ** -0.5)
    return dict(
        y=rand(T, out_total), x=rand(T, IN), lora_A=a if four_d else a[:, 0],
        lora_B=rand(n, out_total, r_max, scale=r_max ** -0.5), ids=torch.as_tensor(ids).to(DEVICE),
        scalings=(torch.rand(n, generator=g) + 0.5).to(DEVICE),
        ranks=None if ranks is None else torch.tensor(ranks, device=DEVICE), slices=tuple(slices))


def reference_delta(c) -> torch.Tensor:
    """The float64 loop over rows and slices."""
    x, B = c["x"].double(), c["lora_B"].double()
    A = c["lora_A"].double()
    A = A if A.dim() == 4 else A[:, None]
    n, r_max = B.shape[0], B.shape[2]
    ranks = [r_max] * n if c["ranks"] is None else c["ranks"].tolist()
    delta = torch.zeros(c["y"].shape, dtype=torch.float64, device=x.device)
    for t, i in enumerate(c["ids"].tolist()):
        if i < 0:
            continue
        r, start = ranks[i], 0
        for j, w in enumerate(c["slices"]):
            shrink = x[t] @ A[i, j, :r].T
            delta[t, start:start + w] = c["scalings"][i].double() * (shrink @ B[i, start:start + w, :r].T)
            start += w
    return delta


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", request.param)
    return request.param


def run(c, route=None):
    y0 = c["y"].clone()
    storage = c["y"].data_ptr()
    out = lf.add_lora(c["y"], c["x"], c["lora_A"], c["lora_B"], c["ids"] if route is None else route,
                      c["scalings"], ranks=c["ranks"], slices=c["slices"] if len(c["slices"]) > 1 else None)
    assert out is c["y"] and out.data_ptr() == storage  # in place, returned
    return y0, out


TOL = {**TOLERANCE, torch.float64: 1e-12}


def assert_adds_delta(c, route=None):
    y0, out = run(c, route)
    delta = reference_delta(c)
    base = c["ids"] < 0
    assert torch.equal(out[base], y0[base])  # rows without an adapter are untouched, bit for bit
    if delta.abs().sum() == 0:
        assert torch.equal(out, y0)
    else:
        assert rel_error(out.double() - y0.double(), delta) <= TOL[c["x"].dtype]
        assert rel_error(out, y0.double() + delta) <= TOL[c["x"].dtype]


@pytest.mark.parametrize("slices", [(45,), (20, 7, 18), (9, 30)])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_slices_mixed_ranks_unsorted_ids(backend, slices, T):
    assert_adds_delta(make(T, slices, seed=T))


def test_three_d_lora_a_is_one_slice(backend):
    assert_adds_delta(make(9, (45,), four_d=False))


def test_every_row_without_adapter_leaves_y_unchanged(backend):
    assert_adds_delta(make(11, (20, 7, 18), ids=[-1] * 11))


def test_rank_zero_adapter_adds_nothing(backend):
    assert_adds_delta(make(13, (20, 25), ranks=(0, 3, 8)))


def test_prefill_regime_and_a_shared_plan(backend):
    c = make(70, (20, 7, 18), n=4, ranks=(2, 5, 8, 1), seed=3)
    plan = lf.plan_segments(c["ids"], 4)
    assert_adds_delta(c, route=plan)


def test_fp16(backend):
    assert_adds_delta(make(9, (20, 25), dtype=torch.float16))


def test_leading_dims_update_y_in_place(backend):
    c = make(12, (20, 25))
    c3 = dict(c, y=c["y"].view(3, 4, 45), x=c["x"].view(3, 4, IN))
    y0 = c["y"].clone()
    lf.add_lora(c3["y"], c3["x"], c["lora_A"], c["lora_B"], c["ids"].view(3, 4), c["scalings"],
                ranks=c["ranks"], slices=c["slices"])
    assert rel_error(c["y"].double() - y0.double(), reference_delta(c)) <= TOLERANCE[torch.float32]


def test_one_shrink_and_one_expand_launch(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", "triton")
    c = make(17, (20, 7, 18))
    LAUNCH_COUNTS.clear()
    run(c)
    assert LAUNCH_COUNTS["lora_delta_shrink_kernel"] == 1  # x read by one launch for all slices
    assert LAUNCH_COUNTS["lora_delta_expand_kernel"] == 1  # one launch covers the three slices
    assert sum(LAUNCH_COUNTS.values()) == 2  # no base GEMM, nothing else


def test_float64_takes_the_torch_path():
    c = make(9, (20, 25), dtype=torch.float64)
    LAUNCH_COUNTS.clear()
    assert_adds_delta(c)
    assert sum(LAUNCH_COUNTS.values()) == 0


# --------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the argument
# --------------------------------------------------------------------------

def call(c, **change):
    args = dict(c, **change)
    return lf.add_lora(args["y"], args["x"], args["lora_A"], args["lora_B"], args["ids"], args["scalings"],
                       ranks=args["ranks"], slices=args["slices"])


def test_slices_not_summing_to_out_total():
    c = make(5, (20, 7, 18))
    with pytest.raises(ValueError, match="slices .* sum to 44 .* out_total=45"):
        call(c, slices=(20, 7, 17))
    with pytest.raises(ValueError, match="slices has 2 widths"):
        call(c, slices=(20, 25))
    with pytest.raises(ValueError, match="slices is None"):
        call(c, slices=None)


def test_y_wrong_shape_dtype_device():
    c = make(5, (20, 25))
    with pytest.raises(ValueError, match="lora_B must be"):
        call(c, y=c["y"][:, :44])
    with pytest.raises(ValueError, match="y must be"):
        call(c, y=c["y"][:4])
    with pytest.raises(TypeError, match="y has dtype torch.float64"):
        call(c, y=c["y"].double())
    if DEVICE == "cpu":
        return
    with pytest.raises(ValueError, match="y is on cpu"):
        call(c, y=c["y"].cpu())


def test_y_not_writable():
    c = make(5, (20, 25))
    with pytest.raises(ValueError, match="y requires grad"):
        call(c, y=c["y"].clone().requires_grad_())
    with torch.inference_mode():
        frozen = c["y"].clone()
    with pytest.raises(ValueError, match="y is an inference tensor"):
        call(c, y=frozen)
    with pytest.raises(ValueError, match="y has overlapping memory"):
        call(c, y=c["y"][:1].expand(5, 45))


def test_inference_tensor_inside_inference_mode_is_fine():
    c = make(5, (20, 25))
    with torch.inference_mode():
        c = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in c.items()}
        assert_adds_delta(c)


def test_ids_out_of_range():
    c = make(5, (20, 25))
    with pytest.raises(ValueError, match=r"adapter_ids.*\[-1, 3\).*\[-1, 3\]"):
        call(c, ids=torch.tensor([0, 1, 2, 3, -1], device=DEVICE))
    with pytest.raises(ValueError, match="adapter_ids has 4 entries"):
        call(c, ids=torch.tensor([0, 1, 2, -1], device=DEVICE))


def test_rank_above_r_max():
    c = make(5, (20, 25))
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, r_max=8\].*\[1, 9\]"):
        call(c, ranks=torch.tensor([1, 3, 9], device=DEVICE))


def test_shape_mismatches_name_the_argument():
    c = make(5, (20, 25))
    with pytest.raises(ValueError, match="lora_A .* has in=37 but x has 36"):
        call(c, x=c["x"][:, :36])
    with pytest.raises(ValueError, match="lora_B must be"):
        call(c, lora_B=c["lora_B"][:, :, :4])
    with pytest.raises(ValueError, match="scalings must be"):
        call(c, scalings=c["scalings"][:2])
    with pytest.raises(TypeError, match="lora_A must be a torch.Tensor"):
        call(c, lora_A=None)


def test_y_a_column_view_of_a_wider_buffer(backend):
    """Engines pass views (e.g. one projection's columns of a fused output): only they change."""
    c = make(10, (20, 7, 18), seed=5)
    wide = torch.randn(10, 52, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    wide0 = wide.clone()
    view = wide[:, 3:48]
    view.copy_(c["y"])
    c["y"] = view
    assert_adds_delta(c)
    assert torch.equal(wide[:, :3], wide0[:, :3]) and torch.equal(wide[:, 48:], wide0[:, 48:])


# --------------------------------------------------------------------------
# packed_multi_lora_linear: the base included, differentiable
# --------------------------------------------------------------------------

def test_packed_multi_lora_linear_forward_and_grads_vs_float64(backend):
    from lora_fused.ops.multi_lora import packed_multi_lora_linear
    c = make(13, (20, 7, 18), seed=11)
    g = torch.Generator().manual_seed(12)
    W = (torch.randn(45, IN, generator=g) * IN ** -0.5).to(DEVICE)
    b = torch.randn(45, generator=g).to(DEVICE)
    leaves = {k: c[k].clone().requires_grad_() for k in ("x", "lora_A", "lora_B")}
    leaves["weight"], leaves["bias"] = W.clone().requires_grad_(), b.clone().requires_grad_()
    y = packed_multi_lora_linear(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"], c["ids"],
                                 c["scalings"], leaves["bias"], ranks=c["ranks"], slices=c["slices"])
    grad = torch.randn(y.shape, generator=g).to(DEVICE)
    y.backward(grad)
    # float64 reference: the formula row by row and slice by slice, autograd for the gradients
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    x64, A64, B64 = ref_leaves["x"], ref_leaves["lora_A"], ref_leaves["lora_B"]
    base = x64 @ ref_leaves["weight"].T + ref_leaves["bias"]
    rows, ranks = [], c["ranks"].tolist()
    for t, i in enumerate(c["ids"].tolist()):
        if i < 0:
            rows.append(base[t])
            continue
        parts, start = [], 0
        for j, w in enumerate(c["slices"]):
            shrink = x64[t] @ A64[i, j, :ranks[i]].T
            parts.append(c["scalings"][i].double() * (shrink @ B64[i, start:start + w, :ranks[i]].T))
            start += w
        rows.append(base[t] + torch.cat(parts))
    ref = torch.stack(rows)
    ref.backward(grad.double())
    assert rel_error(y, ref) <= TOLERANCE[torch.float32]
    for k, leaf in leaves.items():
        assert rel_error(leaf.grad, ref_leaves[k].grad) <= TOLERANCE[torch.float32], k
    pad = torch.arange(8, device=DEVICE) >= c["ranks"][:, None]  # rank padding gets zero gradient
    assert not leaves["lora_A"].grad.permute(0, 2, 1, 3)[pad].any()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_shapes_slices_and_ranks(backend, data):
    """Any T, slice widths, adapter count, r_max and ranks in [0, r_max]: the float64 loop holds."""
    n = data.draw(st.integers(1, 4), label="n")
    r_max = data.draw(st.integers(1, 17), label="r_max")
    slices = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=3), label="slices")
    T = data.draw(st.integers(1, 40), label="T")
    ranks = data.draw(st.lists(st.integers(0, r_max), min_size=n, max_size=n), label="ranks")
    ids = data.draw(st.lists(st.integers(-1, n - 1), min_size=T, max_size=T), label="ids")
    c = make(T, slices, n=n, r_max=r_max, ranks=ranks, ids=ids, seed=T * 7 + n)
    assert_adds_delta(c)


def test_ranks_changed_in_place_are_checked_again():
    """The rank check is cached while ranks is unchanged; an in-place write is seen."""
    c = make(5, (20, 25))
    call(c)
    c["ranks"][2] = 9
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, r_max=8\]"):
        call(c)


def test_compiles_without_graph_breaks(backend):
    """torch.compile(fullgraph=True) traces add_lora (a custom op mutating y) and y is updated in place."""
    c = make(9, (20, 7, 18), seed=13)

    def step(y, x, A, B, ids, s, r):
        return lf.add_lora(y, x, A, B, ids, s, ranks=r, slices=(20, 7, 18))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y0 = c["y"].clone()
    compiled(c["y"], c["x"], c["lora_A"], c["lora_B"], c["ids"], c["scalings"], c["ranks"])
    assert rel_error(c["y"].double() - y0.double(), reference_delta(c)) <= TOLERANCE[torch.float32]
