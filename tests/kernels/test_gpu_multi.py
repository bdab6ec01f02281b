"""GPU-only tests of the multi-adapter kernels: real tiles, bf16, CUDA graphs, batch invariance.

Marked ``gpu`` and skipped without CUDA; ``bench/device_check.sh`` runs them.
The oracle is ``lf.multi_lora_linear`` in float64 (the torch backend, segment by
segment: exact, and checked against the per-row loop in tests/ops/test_multi_lora.py),
so large shapes stay cheap. Errors are ‖out − ref‖ / ‖ref‖: bf16 ≤ 1e-2,
fp16 ≤ 2e-3, fp32 (TF32 off) ≤ 1e-5.
"""
from __future__ import annotations

import pytest
import torch

import lora_fused as lf
from lora_cases import TOLERANCE, rel_error
from lora_fused.kernels import lora_linear as single_kernels
from lora_fused.kernels import multi_lora as kernels

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_precision_flags"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEV = "cuda"
TOL = TOLERANCE


def problem(T, K, N, n, ranks, dtype, seed=0, base_fraction=0.2):
    g = torch.Generator(device=DEV).manual_seed(seed)
    r_max = max(ranks)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)

    ids = torch.randint(0, n, (T,), generator=g, device=DEV)
    ids[torch.rand(T, generator=g, device=DEV) < base_fraction] = -1
    return dict(x=rand(T, K), weight=rand(N, K, scale=K ** -0.5), bias=rand(N),
                lora_A=rand(n, r_max, K, scale=K ** -0.5), lora_B=rand(n, N, r_max, scale=r_max ** -0.5),
                ids=ids, scalings=torch.rand(n, generator=g, device=DEV) + 0.5,
                ranks=torch.tensor(ranks, device=DEV, dtype=torch.int32))


def run(p, route=None, grad_y=None, dtype=None):
    cast = (lambda t: t.to(dtype)) if dtype else (lambda t: t)
    leaves = {k: cast(p[k]).detach().clone().requires_grad_() for k in ("x", "lora_A", "lora_B")}
    y = lf.multi_lora_linear(leaves["x"], cast(p["weight"]), leaves["lora_A"], leaves["lora_B"],
                             p["ids"] if route is None else route, p["scalings"], cast(p["bias"]),
                             ranks=p["ranks"])
    if grad_y is not None:
        y.backward(grad_y.to(y.dtype))
    return y, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 13, 64, 65, 1000, 4099])
def test_forward_and_gradients_match_float64(T, dtype):
    p = problem(T, 4096, 1536, 16, [8, 16, 64, 8] * 4, dtype, seed=T)
    grad_y = torch.randn(T, 1536, device=DEV, dtype=dtype)
    launched = sum(single_kernels.LAUNCH_COUNTS.values())
    y, grads = run(p, grad_y=grad_y)
    assert sum(single_kernels.LAUNCH_COUNTS.values()) > launched
    ref_y, ref_grads = run(p, grad_y=grad_y, dtype=torch.float64)
    assert torch.isfinite(y).all()
    assert rel_error(y, ref_y) <= TOL[dtype]
    for k in grads:
        assert torch.isfinite(grads[k]).all(), k
        assert rel_error(grads[k], ref_grads[k]) <= TOL[dtype], k


@pytest.mark.parametrize("regime", list(kernels.MULTI_CONFIGS))
def test_every_regime_at_a_serving_shape(regime):
    p = problem(64, 4096, 4096, 64, [16] * 64, torch.bfloat16, seed=1, base_fraction=0.0)
    plan = lf.plan_segments(p["ids"], 64, regime=regime)
    y, _ = run(p, plan)
    ref, _ = run(p, dtype=torch.float64)
    assert rel_error(y, ref) <= 1e-2


def test_int64_offsets_past_2_31_elements():
    """x and y with more than 2³¹ elements: rows past the int32 range must be right."""
    K = N = 4096
    T = 2**31 // K + 77
    p = problem(T, K, N, 4, [16, 8, 16, 4], torch.bfloat16, seed=2)
    with torch.no_grad():
        y, _ = run(p)
        for rows in (slice(0, 8), slice(T - 8, T)):
            sub = {k: v for k, v in p.items()}
            sub["x"], sub["ids"] = p["x"][rows], p["ids"][rows]
            ref, _ = run(sub, dtype=torch.float64)
            assert rel_error(y[rows], ref) <= 1e-2, rows


def test_cuda_graph_replay_with_a_plan_updated_in_place():
    p = problem(48, 1024, 768, 8, [16, 4, 16, 8, 16, 2, 16, 1], torch.bfloat16, seed=3)
    plan = lf.plan_segments(p["ids"], 8)
    x = p["x"].clone()
    args = lambda: (x, p["weight"], p["lora_A"], p["lora_B"], plan, p["scalings"], p["bias"])  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # warm up: compile the kernels outside the capture
            lf.multi_lora_linear(*args(), ranks=p["ranks"])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        y = lf.multi_lora_linear(*args(), ranks=p["ranks"])
    for seed in (4, 5):
        new = problem(48, 1024, 768, 8, [16] * 8, torch.bfloat16, seed=seed)
        plan.update_(new["ids"])
        x.copy_(new["x"])
        graph.replay()
        with torch.no_grad():
            expected = lf.multi_lora_linear(x, p["weight"], p["lora_A"], p["lora_B"], new["ids"],
                                            p["scalings"], p["bias"], ranks=p["ranks"])
        torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_ranks_none_made_while_capturing_is_not_cached():
    """ranks=None is every adapter at r_max: the tensor is cached outside a capture only (one made
    while capturing holds its values only after a replay; an eager call before it read garbage)."""
    from lora_fused.ops import multi_lora as multi_op
    p = problem(33, 256, 192, 4, [8] * 4, torch.bfloat16, seed=6)
    plan = lf.plan_segments(p["ids"], 4)
    args = lambda: (p["x"], p["weight"], p["lora_A"], p["lora_B"], plan, p["scalings"], p["bias"])  # noqa: E731
    with torch.no_grad():
        expected = lf.multi_lora_linear(*args(), ranks=p["ranks"])  # warm up outside the capture
        multi_op._full_ranks.cache_clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            lf.multi_lora_linear(*args())
        torch.testing.assert_close(lf.multi_lora_linear(*args()), expected, rtol=0, atol=0)


@pytest.mark.parametrize("T", [40, 700])
def test_batch_invariance_bitwise(T):
    """Row t's output does not depend on the other rows of the batch (same batch size)."""
    p = problem(T, 2048, 1024, 8, [16, 8, 64, 16, 4, 16, 32, 16], torch.bfloat16, seed=6)
    q = problem(T, 2048, 1024, 8, [16, 8, 64, 16, 4, 16, 32, 16], torch.bfloat16, seed=7)
    keep = torch.arange(T, device=DEV) % 3 == 0   # rows shared by both batches
    for k in ("weight", "bias", "lora_A", "lora_B", "scalings", "ranks"):
        q[k] = p[k]
    q["x"] = torch.where(keep[:, None], p["x"], q["x"])
    q["ids"] = torch.where(keep, p["ids"], q["ids"])
    with torch.no_grad():
        y_p, _ = run(p)
        y_q, _ = run(q)
    assert torch.equal(y_p[keep], y_q[keep])


def test_capacity_bounds_every_id_pattern():
    for T, n in ((1, 1), (64, 64), (65, 3), (1000, 16), (129, 200)):
        for ids in (torch.arange(T, device=DEV) % (n + 1) - 1, torch.full((T,), n - 1, device=DEV)):
            plan = lf.plan_segments(ids, n)
            assert int(plan.chunk_len.sum()) == T
            assert plan.chunk_len.shape[0] == kernels.chunk_capacity(T, n, plan.block_rows)
