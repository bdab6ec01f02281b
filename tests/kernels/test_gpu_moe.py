"""GPU-only tests of the grouped (mixture-of-experts) LoRA kernels: real tiles, bf16, both strategies, CUDA graphs.

Marked ``gpu`` and skipped without CUDA; ``bench/device_check.sh`` runs them. The oracle is a
float64 loop over the experts (one matmul per expert segment: exact, and small enough for
thousands of pairs; tests/kernels/test_moe_lora.py checks the kernels against a per-pair loop
under the interpreter). Errors are ‖out − ref‖ / ‖ref‖: bf16 ≤ 1e-2, fp16 ≤ 2e-3, fp32 (TF32 off) ≤ 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from lora_cases import TOLERANCE, rel_error
from lora_fused.kernels import moe_lora as kernels
from lora_fused.reference import dropout_keep_mask

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_precision_flags"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEV = "cuda"
SEED, SCALING = 99, 2.0


def problem(P, E, K, N, r, dtype, seed=0, top_k=2, sentinels=3):
    """Sorted pairs over E experts (random counts, some experts empty, ``sentinels`` pairs past the
    end), top-k rows into x; operands scaled so y and every gradient are O(1)."""
    g = torch.Generator(device=DEV).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)

    live = P - sentinels
    counts = torch.bincount(torch.randint(0, E, (live,), generator=g, device=DEV), minlength=E)
    counts[torch.randperm(E, generator=g, device=DEV)[: E // 8]] = 0  # some experts without rows
    counts[0] += live - int(counts.sum())
    T = -(-P // top_k)
    return dict(x=rand(T, K), rows=torch.randint(0, T, (P,), generator=g, device=DEV),
                weight=rand(E, N, K, scale=K ** -0.5), bias=rand(E, N), lora_A=rand(E, r, K, scale=K ** -0.5),
                lora_B=rand(E, N, r, scale=r ** -0.5), offsets=counts.cumsum(0).to(torch.int32),
                grad_y=rand(P, N))


def reference(p, dropout_p):
    """(y, dx_pairs, dA, dB) in float64, one expert segment at a time."""
    f64 = {k: v.double() if v.is_floating_point() else v for k, v in p.items()}
    xs = f64["x"][p["rows"]]
    P, K = xs.shape
    keep = dropout_keep_mask(SEED, P, K, dropout_p, device=DEV).double() / (1 - dropout_p)
    y, dx = torch.zeros_like(f64["grad_y"]), torch.zeros_like(xs)
    dA, dB = torch.zeros_like(f64["lora_A"]), torch.zeros_like(f64["lora_B"])
    start = 0
    for e, end in enumerate(p["offsets"].tolist()):
        rows = slice(start, end)
        W, A, B, dy = f64["weight"][e], f64["lora_A"][e], f64["lora_B"][e], f64["grad_y"][rows]
        s = (xs[rows] * keep[rows]) @ A.T
        y[rows] = xs[rows] @ W.T + f64["bias"][e] + SCALING * s @ B.T
        ds = SCALING * dy @ B
        dx[rows] = dy @ W + keep[rows] * (ds @ A)
        dA[e], dB[e] = ds.T @ (xs[rows] * keep[rows]), SCALING * dy.T @ s
        start = end
    return y, dx, dA, dB


def run(p, strategy, dropout_p):
    seed = torch.tensor([SEED], device=DEV)
    y, S = kernels.grouped_lora_forward(p["x"], p["rows"], p["weight"], p["bias"], p["lora_A"], p["lora_B"],
                                        p["offsets"], SCALING, dropout_p, seed, strategy=strategy)
    dx, dA, dB = kernels.grouped_lora_backward(p["grad_y"], p["x"], p["rows"], p["weight"], p["lora_A"],
                                               p["lora_B"], S, p["offsets"], SCALING, dropout_p, seed, True, True,
                                               strategy=strategy)
    return y, dx, dA, dB


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("strategy", ["fused", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("P", [5, 64, 65, 4099])
def test_forward_and_gradients_match_float64(P, dtype, strategy, dropout_p):
    p = problem(P, 64, 2048, 1536, 16, dtype, seed=P)
    got = run(p, strategy, dropout_p)
    for name, out, ref in zip(("y", "dx", "dA", "dB"), got, reference(p, dropout_p)):
        assert torch.isfinite(out).all(), name
        assert rel_error(out, ref) <= TOLERANCE[dtype], name
    live = int(p["offsets"][-1])
    assert torch.count_nonzero(got[0][live:]) == 0 and torch.count_nonzero(got[1][live:]) == 0  # sentinels
    empty = (p["offsets"].diff(prepend=p["offsets"].new_zeros(1)) == 0).nonzero().flatten()
    assert torch.count_nonzero(got[2][empty]) == 0 and torch.count_nonzero(got[3][empty]) == 0


def test_grouped_mm_runs_for_bf16_on_this_gpu():
    """The vendor strategy is a real candidate where torch's grouped GEMM has its kernels (bf16, sm_90)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch's grouped GEMM targets sm_90 and newer")
    p = problem(256, 8, 512, 256, 16, torch.bfloat16)
    assert kernels.grouped_candidates(p["x"], p["weight"]) == ["fused", "grouped_mm"]


@pytest.mark.parametrize("strategy", ["fused", "grouped_mm"])
def test_cuda_graph_replay_with_new_offsets(strategy):
    """A captured forward serves new routing of the same size: the chunk table is rebuilt on the device."""
    p = problem(512, 16, 1024, 768, 16, torch.bfloat16, seed=3)
    args = lambda: (p["x"], p["rows"], p["weight"], p["bias"], p["lora_A"], p["lora_B"], p["offsets"],  # noqa: E731
                    SCALING, 0.0, None)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: compile and probe outside the capture
            kernels.grouped_lora_forward(*args(), strategy=strategy)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, _ = kernels.grouped_lora_forward(*args(), strategy=strategy)
    for seed in (4, 5):
        new = problem(512, 16, 1024, 768, 16, torch.bfloat16, seed=seed)
        for k in ("x", "rows", "offsets"):
            p[k].copy_(new[k])
        graph.replay()
        expected, _ = kernels.grouped_lora_forward(*args(), strategy=strategy)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_expert_plan_made_while_capturing_caches_nothing_unwritten():
    """plan_experts' cached index ranges are made outside a capture only: a tensor made while
    capturing holds its values only after a replay, so caching it would hand the next eager plan
    garbage."""
    from lora_fused.ops import grouped
    ids = torch.randint(0, 16, (389, 2), device=DEV)
    grouped.plan_experts(ids, 16)  # warm up the ops outside the capture
    grouped._cached_arange.cache_clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grouped.plan_experts(ids, 16)
    fresh = grouped.plan_experts(torch.randint(0, 16, (389, 2), device=DEV), 16)  # eager, before any replay
    assert torch.equal(fresh.order[fresh.position], torch.arange(778, device=DEV))
    assert int(fresh.offsets[-1]) == 778
