"""kernels/moe_lora.py, the grouped (mixture-of-experts) LoRA launchers, against a float64 per-pair loop.

Every launcher (grouped_lora_forward, grouped_lora_backward, grouped_linear_forward) and both
strategies ("fused": the Triton grouped GEMM; "grouped_mm": torch's grouped GEMM for the base,
which runs on fp32/fp16 CPU tensors, plus the Triton epilogues) on small odd problems: an expert
with no rows, sentinel pairs past offsets[-1], top-2 routing (a token read twice through ``rows``)
and pairs given in sorted order (``rows`` None), a non-contiguous x, a transposed weight view,
bias or none, dropout (the mask reproduced from lora_fused.reference over the sorted [P, in]
positions), r = 1, an empty batch. Outputs are NaN-poisoned before each launch (tests/conftest.py).
The oracle shares no code with the kernels: one pair at a time, float64, autograd for the gradients.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from lora_cases import TOLERANCE, rel_error  # noqa: E402
from lora_fused.reference import dropout_keep_mask  # noqa: E402

moe = pytest.importorskip("lora_fused.kernels.moe_lora")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALING, SEED = 1.75, 1234
E = 4
#: Pairs per expert: expert 2 has none; the last 3 pairs are sentinels (past offsets[-1]).
SEGMENTS = (7, 19, 0, 11)
SENTINELS = 3


# ------------------------------------------------------------------ the oracle
def expert_of(offsets: torch.Tensor, P: int) -> list[int]:
    """The expert of each sorted pair (E for a sentinel): the first e with j < offsets[e]."""
    return torch.searchsorted(offsets.long().cpu(), torch.arange(P), right=True).tolist()


def reference(x, rows, weight, bias, lora_A, lora_B, offsets, scaling, dropout_p, grad_y):
    """(y, S, dx_pairs, dA, dB) in float64, one pair at a time; S unscaled = drop(x_j) A_eᵀ."""
    f64 = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    x, weight, bias, grad_y = f64(x), f64(weight), f64(bias), f64(grad_y)
    P = rows.shape[0] if rows is not None else x.shape[0]
    x_pairs = (x[rows.cpu()] if rows is not None else x).clone().requires_grad_()
    A, B = f64(lora_A).requires_grad_(), f64(lora_B).requires_grad_()
    K = x.shape[1]
    keep = dropout_keep_mask(SEED, P, K, dropout_p).double() if dropout_p > 0 else torch.ones(P, K, dtype=torch.float64)
    ys, ss = [], []
    for j, e in enumerate(expert_of(offsets, P)):
        if e >= weight.shape[0]:  # a sentinel pair: y = 0, S = 0
            ys.append(torch.zeros(weight.shape[1], dtype=torch.float64))
            ss.append(torch.zeros(A.shape[1], dtype=torch.float64))
            continue
        s_j = (x_pairs[j] * keep[j] / (1 - dropout_p)) @ A[e].T
        y_j = x_pairs[j] @ weight[e].T + scaling * s_j @ B[e].T
        ys.append(y_j + bias[e] if bias is not None else y_j)
        ss.append(s_j)
    y, S = torch.stack(ys), torch.stack(ss)
    y.backward(grad_y)
    return y.detach(), S.detach(), x_pairs.grad, A.grad, B.grad


# ------------------------------------------------------------------ problems
def offsets_for(segments=SEGMENTS):
    return torch.tensor(segments, device=DEVICE).cumsum(0).to(torch.int32)


def rand(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def problem(dtype, *, top_k=2, K=40, N=24, r=5, bias=True, transposed=False, strided_x=False, seed=0):
    """Random operands. top_k 2: x holds T tokens and ``rows`` reads each twice (pair j = token
    rows[j]); top_k None: x is already [P, K] in sorted order, rows None. transposed: weight is
    ``w.transpose(-2, -1)`` of an [E, K, N] tensor; strided_x: x a column slice of a wider buffer."""
    gen = torch.Generator().manual_seed(seed)
    P = sum(SEGMENTS) + SENTINELS
    T = P // 2 + 1 if top_k else P
    x = rand(T, K + 3 if strided_x else K, dtype=dtype, gen=gen)[:, :K]
    rows = None
    if top_k:
        rows = torch.cat([torch.arange(T), torch.arange(T)])[torch.randperm(2 * T, generator=gen)][:P]
        rows = rows.to(DEVICE)
    w = rand(E, K, N, dtype=dtype, gen=gen, scale=K ** -0.5).transpose(-2, -1) if transposed \
        else rand(E, N, K, dtype=dtype, gen=gen, scale=K ** -0.5)
    return dict(x=x, rows=rows, weight=w, bias=rand(E, N, dtype=dtype, gen=gen) if bias else None,
                lora_A=rand(E, r, K, dtype=dtype, gen=gen, scale=K ** -0.5),
                lora_B=rand(E, N, r, dtype=dtype, gen=gen, scale=r ** -0.5),
                offsets=offsets_for(), grad_y=rand(P, N, dtype=dtype, gen=gen))


@pytest.fixture
def vendor_calls(monkeypatch):
    """Counts the vendor grouped GEMM's calls (the launchers are rebuilt to take the counter)."""
    calls = []
    real = moe.VENDOR_GROUPED_MM
    for dtype in (torch.float32, torch.float16):
        moe.grouped_mm_runs(torch.device(DEVICE), dtype)  # probed before counting

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(moe, "VENDOR_GROUPED_MM", counted)
    moe._launchers.clear()
    yield calls
    moe._launchers.clear()


def run_both(p, strategy, dropout_p):
    seed = torch.tensor([SEED], dtype=torch.int64, device=DEVICE) if dropout_p > 0 else None
    y, S = moe.grouped_lora_forward(p["x"], p["rows"], p["weight"], p["bias"], p["lora_A"], p["lora_B"],
                                    p["offsets"], SCALING, dropout_p, seed, strategy=strategy)
    dx, dA, dB = moe.grouped_lora_backward(p["grad_y"], p["x"], p["rows"], p["weight"], p["lora_A"], p["lora_B"],
                                           S, p["offsets"], SCALING, dropout_p, seed, need_dx=True, need_dlora=True,
                                           strategy=strategy)
    return y, S, dx, dA, dB


def check_against_reference(p, got, dropout_p, dtype):
    y, S, dx, dA, dB = got
    ref = reference(p["x"], p["rows"], p["weight"], p["bias"], p["lora_A"], p["lora_B"], p["offsets"], SCALING,
                    dropout_p, p["grad_y"])
    P = ref[0].shape[0]
    assert (y.shape, y.dtype) == ((P, p["weight"].shape[1]), dtype)
    assert (dx.shape, dx.dtype) == ((P, p["x"].shape[1]), dtype)
    assert (dA.shape, dA.dtype, dB.shape, dB.dtype) == (p["lora_A"].shape, dtype, p["lora_B"].shape, dtype)
    assert S.shape == (P, p["lora_A"].shape[1])
    for name, out, want in zip(("y", "S", "dx", "dA", "dB"), (y, S, dx, dA, dB), ref):
        assert rel_error(out.cpu(), want) <= TOLERANCE[dtype], name
    # Sentinel pairs: exact zeros out, nothing in; the expert with no rows: exact zero gradients.
    live = sum(SEGMENTS)
    assert torch.equal(y[live:].cpu(), torch.zeros_like(y[live:].cpu()))
    assert torch.equal(S[live:].cpu(), torch.zeros_like(S[live:].cpu()))
    assert torch.equal(dx[live:].cpu(), torch.zeros_like(dx[live:].cpu()))
    assert torch.count_nonzero(dA[2]) == 0 and torch.count_nonzero(dB[2]) == 0


# ------------------------------------------------------------------ forward and backward
LAYOUTS = {
    # top-2 routing, bias, a transposed weight view, a non-contiguous x
    "rows-bias-transposed-strided": dict(top_k=2, bias=True, transposed=True, strided_x=True),
    # pairs in sorted order (the down projection's input), no bias, contiguous operands
    "sorted-nobias": dict(top_k=None, bias=False),
}


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_matches_float64(dtype, layout, dropout_p):
    p = problem(dtype, **LAYOUTS[layout], seed=list(LAYOUTS).index(layout) * 10 + int(dropout_p * 10))
    check_against_reference(p, run_both(p, "fused", dropout_p), dropout_p, dtype)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_grouped_mm_matches_float64(dtype, layout, dropout_p, vendor_calls):
    """The base through torch's grouped GEMM (CPU: fp32 and fp16 run), once forward, once for dX."""
    p = problem(dtype, **LAYOUTS[layout], seed=list(LAYOUTS).index(layout) * 10 + int(dropout_p * 10) + 1)
    if not moe.grouped_mm_runs(p["x"].device, dtype):
        pytest.skip(f"torch's grouped GEMM does not run for {dtype} on {DEVICE}")
    assert moe.resolve_grouped("grouped_mm", 40, p["weight"].transpose(-2, -1)) == "grouped_mm"
    check_against_reference(p, run_both(p, "grouped_mm", dropout_p), dropout_p, dtype)
    P = sum(SEGMENTS) + SENTINELS
    assert vendor_calls == [(P, 40), (P, 24)]  # x's rows gathered for the base GEMM only; dY for dX


@pytest.mark.parametrize("strategy", ["fused", "grouped_mm"])
def test_rank_one(strategy):
    p = problem(torch.float32, r=1, seed=7)
    check_against_reference(p, run_both(p, strategy, 0.0), 0.0, torch.float32)


def test_odd_widths_run_fused_when_grouped_mm_is_asked():
    """Widths the vendor GEMM's alignment refuses (in = 13: 52 bytes a row) run "fused": same numbers."""
    p = problem(torch.float32, K=13, N=11, r=3, seed=3)
    assert moe.resolve_grouped("grouped_mm", 13, p["weight"].transpose(-2, -1)) == "fused"
    check_against_reference(p, run_both(p, "grouped_mm", 0.0), 0.0, torch.float32)


def test_only_the_needed_gradients_are_computed():
    p = problem(torch.float32, seed=5)
    y, S = moe.grouped_lora_forward(p["x"], p["rows"], p["weight"], None, p["lora_A"], p["lora_B"], p["offsets"],
                                    SCALING, 0.0, None)
    dx, dA, dB = moe.grouped_lora_backward(p["grad_y"], p["x"], p["rows"], p["weight"], p["lora_A"], p["lora_B"], S,
                                           p["offsets"], SCALING, 0.0, None, need_dx=False, need_dlora=True)
    assert dx is None and dA is not None and dB is not None
    dx2, dA2, dB2 = moe.grouped_lora_backward(p["grad_y"], p["x"], p["rows"], p["weight"], p["lora_A"], p["lora_B"],
                                              S, p["offsets"], SCALING, 0.0, None, need_dx=True, need_dlora=False)
    assert dA2 is None and dB2 is None and dx2.shape == (S.shape[0], 40)
    launches = sum(moe.LAUNCH_COUNTS.values())
    assert moe.grouped_lora_backward(p["grad_y"], p["x"], p["rows"], p["weight"], p["lora_A"], p["lora_B"], S,
                                     p["offsets"], SCALING, 0.0, None, need_dx=False, need_dlora=False) == (None,) * 3
    assert sum(moe.LAUNCH_COUNTS.values()) == launches  # nothing needed, nothing launched


# ------------------------------------------------------------------ the base alone
@pytest.mark.parametrize("strategy", ["fused", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_grouped_linear_forward_is_the_base(strategy, dtype):
    p = problem(dtype, transposed=True, seed=11)
    y = moe.grouped_linear_forward(p["x"], p["rows"], p["weight"], p["bias"], p["offsets"], strategy=strategy)
    zero_a = torch.zeros_like(p["lora_A"])
    ref = reference(p["x"], p["rows"], p["weight"], p["bias"], zero_a, p["lora_B"], p["offsets"], 0.0, 0.0,
                    p["grad_y"])[0]
    assert y.dtype == dtype and rel_error(y.cpu(), ref) <= TOLERANCE[dtype]
    assert torch.equal(y[sum(SEGMENTS):].cpu(), torch.zeros_like(y[sum(SEGMENTS):].cpu()))


# ------------------------------------------------------------------ edges
@pytest.mark.parametrize("strategy", ["fused", "grouped_mm"])
def test_empty_batch(strategy):
    p = problem(torch.float32, seed=2)
    x, rows = p["x"][:0], p["rows"][:0]
    offsets = torch.zeros(E, dtype=torch.int32, device=DEVICE)
    y, S = moe.grouped_lora_forward(x, rows, p["weight"], p["bias"], p["lora_A"], p["lora_B"], offsets, SCALING,
                                    0.0, None, strategy=strategy)
    assert y.shape == (0, 24) and S.shape == (0, 5)
    dx, dA, dB = moe.grouped_lora_backward(p["grad_y"][:0], x, rows, p["weight"], p["lora_A"], p["lora_B"], S,
                                           offsets, SCALING, 0.0, None, True, True, strategy=strategy)
    assert dx.shape == (0, 40)
    assert torch.count_nonzero(dA) == 0 and torch.count_nonzero(dB) == 0 and dA.shape == p["lora_A"].shape
    assert moe.grouped_linear_forward(x, rows, p["weight"], None, offsets).shape == (0, 24)


@pytest.mark.parametrize("segments", [(1, 1, 1, 1), (17, 0, 33, 1), (0, 0, 0, 0), (16, 16, 16, 16)])
@pytest.mark.parametrize("P", [1, 70])
def test_chunk_table_covers_every_pair_once(segments, P):
    """Every position lies in exactly one row tile of its own segment (the sentinel tail: expert -1),
    within the fixed capacity, for offsets that leave a partial tile in every segment."""
    ends = torch.tensor(segments).cumsum(0).clamp(max=P)
    table, got_ends = moe.chunk_table(ends.to(torch.int32), P, 16)
    assert table.shape == (3, moe.chunk_capacity(P, E, 16)) and torch.equal(got_ends, ends.to(torch.int32))
    owner = torch.full((P,), -2)
    for expert, start, length in table.T.tolist():
        assert 0 <= length <= 16
        for j in range(start, start + length):
            assert owner[j] == -2, f"position {j} in two tiles"
            owner[j] = expert
    want = torch.tensor([e if e < E else -1 for e in expert_of(ends, P)])
    assert torch.equal(owner, want)


def test_bad_shapes_name_the_argument():
    p = problem(torch.float32, seed=4)
    with pytest.raises(ValueError, match="lora_B must be"):
        moe.grouped_lora_forward(p["x"], p["rows"], p["weight"], None, p["lora_A"], p["lora_B"][:, :, :2],
                                 p["offsets"], SCALING, 0.0, None)
    with pytest.raises(ValueError, match="offsets must be"):
        moe.grouped_linear_forward(p["x"], p["rows"], p["weight"], None, p["offsets"][:2])
    with pytest.raises(ValueError, match="grouped strategy must be one of"):
        moe.grouped_linear_forward(p["x"], p["rows"], p["weight"], None, p["offsets"], strategy="composite")


def test_grouped_mm_asked_before_the_probe_runs_fused_for_that_call_only(monkeypatch, vendor_calls):
    """While tracing (or capturing) the vendor GEMM cannot be probed: that call runs "fused" and its launcher
    is not kept, so the next eager call probes and takes the vendor GEMM."""
    p = problem(torch.float32, seed=8)
    monkeypatch.setattr(moe, "_PROBED", {})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    args = (p["x"], p["rows"], p["weight"], p["bias"], p["lora_A"], p["lora_B"], p["offsets"], SCALING, 0.0, None)
    y_traced, _ = moe.grouped_lora_forward(*args, strategy="grouped_mm")
    assert vendor_calls == [] and not moe._launchers
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    y, _ = moe.grouped_lora_forward(*args, strategy="grouped_mm")
    assert len(vendor_calls) == 2 and len(moe._launchers) == 1  # the probe, then the forward's base GEMM
    assert rel_error(y, y_traced) <= TOLERANCE[torch.float32]
