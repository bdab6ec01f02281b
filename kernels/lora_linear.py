"""Triton kernels for one LoRA linear layer, forward and backward.

Math (``nn.Linear`` convention: W0 [N, K] = [out, in], A [R, K], B [N, R], s):

    S  = drop(X) Aᵀ                          Y  = X W0ᵀ + b + s · S Bᵀ
    dS = s · dY B        dB = s · dYᵀ S       dA = dSᵀ drop(X)
    dX = dY W0 + keep/(1-p) ⊙ (dS A)

with ``drop(X) = keep ⊙ X / (1-p)`` and ``keep[m, k] = tl.rand(seed, m*K + k) >= p``
(regenerated wherever it is needed, never stored). No kernel forms B·A.

Kernels
-------
``lora_gemm_kernel``      OUT = X Wᵀ + b + s·L Rᵀ (⊙ keep/(1-p) on the LoRA term).
                          The forward (W = W0, R = B, L = S) and the dX GEMM
                          (X = dY, W = W0ᵀ, R = Aᵀ, L = dS) are this one kernel
                          with different strides. In the *fused* strategy its K
                          loop also accumulates L = drop(X) Aᵀ and writes it out.
``lora_shrink_kernel``    S = drop(X) Aᵀ on its own (the *S-first* strategy).
``lora_grad_ds_db_kernel`` one pass over each dY tile gives dS and a partial dB.
``lora_grad_a_kernel``    split-M partials of dA = dSᵀ drop(X).

Ranks are padded to ``BR = max(16, next_pow2(R))`` (``tl.dot`` needs every
dimension >= 16 on NVIDIA GPUs); padded rows/columns are masked to zero.
Row and column offsets are int64 so ``row * stride`` cannot overflow past 2³¹.
Accumulation is always fp32; dot operands are cast to the input dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dropout_keep(seed_ptr, rows, cols, n_cols, p):
    """Keep-mask [len(rows), len(cols)] for element (row, col) of an [*, n_cols] matrix.

    Bit-identical to ``tl.rand(seed, row * n_cols + col) >= p`` (the reference
    reproduces it), but the 64-bit Philox counter ``(lo, hi)`` is built from one
    int64 product per row plus 32-bit arithmetic per element: a full tile of
    int64 offsets kept the dX GEMM's prologue above 255 registers (it spilled).
    """
    seed = tl.load(seed_ptr)
    row_start = rows * n_cols
    start_lo = row_start.to(tl.uint32)[:, None]
    start_hi = (row_start >> 32).to(tl.uint32)[:, None]
    lo = start_lo + cols.to(tl.uint32)[None, :]
    hi = start_hi + (lo < start_lo).to(tl.uint32)  # carry out of the low word
    zero = lo * 0
    bits, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    return tl.uint_to_uniform_float(bits) >= p


@triton.jit
def _grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a linear program id to (tile_m, tile_n), GROUP_M row tiles at a time.

    Consecutive programs then share the same few row tiles of X and sweep
    the columns of W, so both stay in L2 (Triton tutorial 03).
    """
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    tile_m = first_m + ((pid % per_group) % group_size)
    tile_n = (pid % per_group) // group_size
    return tile_m, tile_n


@triton.jit
def lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, l_ptr, r_ptr, out_ptr, seed_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_lm, stride_lr, stride_rn, stride_rr, stride_om, stride_on,
    scaling, dropout_p,
    HAS_BIAS: tl.constexpr, FUSED_SHRINK: tl.constexpr,
    DROPOUT_IN_LOOP: tl.constexpr, DROPOUT_ON_LORA_TERM: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """OUT[M, N] = X[M, K] W[N, K]ᵀ + bias[N] + scaling · L[M, R] R[N, R]ᵀ.

    Grid: ``(cdiv(M, BM) * cdiv(N, BN),)``; each program owns one BM × BN
    tile of OUT, visited in grouped order.

    FUSED_SHRINK: L is not read; the K loop accumulates L = drop(X) A[R, K]ᵀ
      (X tile reused, extra flops ≈ R/BN) and the programs of the first column
      tile write it to ``l_ptr`` for the backward. DROPOUT_IN_LOOP then masks
      the X tile fed to that shrink (never the one fed to W).
    otherwise: L is read from ``l_ptr`` and its term starts the accumulator.
    DROPOUT_ON_LORA_TERM: the LoRA term is multiplied by keep/(1-p) of
      element (m, n) of an [M, N] matrix (the dX GEMM).
    """
    pid = tl.program_id(0)
    tile_m, tile_n = _grouped_tile(pid, M, N, BM, BN, GROUP_M)
    rows = tile_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = tile_n.to(tl.int64) * BN + tl.arange(0, BN)
    ranks = tl.arange(0, BR)
    row_ok = rows < M
    col_ok = cols < N
    rank_ok = ranks < R

    # R tile, [BR, BN] view of R[N, R]ᵀ: the LoRA expand operand.
    r_tile = tl.load(r_ptr + ranks[:, None] * stride_rr + cols[None, :] * stride_rn,
                     mask=rank_ok[:, None] & col_ok[None, :], other=0.0)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if not FUSED_SHRINK:
        if DROPOUT_ON_LORA_TERM:
            # The mask first, as the scale it applies: Philox's state and the LoRA
            # product are then never live together (that spilled at 128 × 128).
            keep = _dropout_keep(seed_ptr, rows, cols, N, dropout_p)
            acc = tl.where(keep, scaling / (1.0 - dropout_p), 0.0)
        else:
            acc += scaling
        l_tile = tl.load(l_ptr + rows[:, None] * stride_lm + ranks[None, :] * stride_lr,
                         mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = acc * tl.dot(l_tile, r_tile, input_precision=PRECISION)
    else:
        shrink = tl.zeros((BM, BR), dtype=tl.float32)

    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK).to(tl.int64)
        k_ok = ks < K
        x_tile = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_tile = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=PRECISION)
        if FUSED_SHRINK:
            a_tile = tl.load(a_ptr + ks[:, None] * stride_ak + ranks[None, :] * stride_ar,
                             mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
            if DROPOUT_IN_LOOP:
                keep = _dropout_keep(seed_ptr, rows, ks, K, dropout_p)
                x_tile = tl.where(keep, x_tile, 0.0)
            shrink = tl.dot(x_tile, a_tile, shrink, input_precision=PRECISION)

    if FUSED_SHRINK:
        if DROPOUT_IN_LOOP:
            shrink = shrink / (1.0 - dropout_p)
        l_tile = shrink.to(out_ptr.dtype.element_ty)
        if tile_n == 0:
            tl.store(l_ptr + rows[:, None] * stride_lm + ranks[None, :] * stride_lr, l_tile,
                     mask=row_ok[:, None] & rank_ok[None, :])
        acc += scaling * tl.dot(l_tile, r_tile, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def lora_shrink_kernel(
    x_ptr, a_ptr, s_ptr, seed_ptr, M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    dropout_p,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    """S[M, R] = drop(X)[M, K] A[R, K]ᵀ.

    Grid: ``(cdiv(M, BM),)``; each program owns BM full rows of S and reads
    its rows of X once, so each dropout mask element is drawn once.
    """
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, BR)
    row_ok = rows < M
    rank_ok = ranks < R
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK).to(tl.int64)
        k_ok = ks < K
        x_tile = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed_ptr, rows, ks, K, dropout_p)
            x_tile = tl.where(keep, x_tile, 0.0)
        a_tile = tl.load(a_ptr + ks[:, None] * stride_ak + ranks[None, :] * stride_ar,
                         mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = tl.dot(x_tile, a_tile, acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        acc = acc / (1.0 - dropout_p)
    tl.store(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
             acc.to(s_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def lora_grad_ds_db_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_part_ptr, M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsm, stride_dsr, stride_dbp, stride_dbn, stride_dbr,
    scaling, TILES_PER_PROGRAM,
    COMPUTE_DB: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    """dS = s · dY B (complete) and dB_part[p] = s · dY[rows of p]ᵀ S[rows of p].

    Grid: ``(n_programs,)``; program p owns the row tiles
    ``[p * TILES_PER_PROGRAM, (p + 1) * TILES_PER_PROGRAM)`` of dY and sweeps
    all columns of each, so every dY tile is read once for both products.
    dS rows are complete in-program; its fp32 dB_part[p] slice [N, R] is its
    own (no atomics, deterministic) and is summed over p by the launcher.
    The buffer must be zeroed: each row tile adds into it.
    """
    pid = tl.program_id(0)
    ranks = tl.arange(0, BR)
    rank_ok = ranks < R
    for t in range(0, TILES_PER_PROGRAM):
        rows = (pid * TILES_PER_PROGRAM + t).to(tl.int64) * BM + tl.arange(0, BM)
        row_ok = rows < M
        if COMPUTE_DB:
            s_tile = tl.load(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
                             mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        ds = tl.zeros((BM, BR), dtype=tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN).to(tl.int64)
            col_ok = cols < N
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            b_tile = tl.load(b_ptr + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                             mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            ds = tl.dot(dy, b_tile, ds, input_precision=PRECISION)
            if COMPUTE_DB:
                db = tl.dot(tl.trans(dy), s_tile, input_precision=PRECISION)
                db_ptrs = (db_part_ptr + pid * stride_dbp + cols[:, None] * stride_dbn
                           + ranks[None, :] * stride_dbr)
                db_mask = col_ok[:, None] & rank_ok[None, :]
                tl.store(db_ptrs, tl.load(db_ptrs, mask=db_mask, other=0.0) + scaling * db,
                         mask=db_mask)
        tl.store(ds_ptr + rows[:, None] * stride_dsm + ranks[None, :] * stride_dsr,
                 (scaling * ds).to(ds_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def lora_grad_a_kernel(
    ds_ptr, x_ptr, da_part_ptr, seed_ptr, M, K, R,
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dap, stride_dar, stride_dak,
    dropout_p, TILES_PER_PROGRAM,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    """dA_part[p][:, cols] = dS[rows of p]ᵀ drop(X)[rows of p, cols].

    Grid: ``(cdiv(K, BK), n_programs)``; program (j, p) owns column tile j
    and the row tiles ``[p * TILES_PER_PROGRAM, (p + 1) * TILES_PER_PROGRAM)``
    (split-M: the reduction dimension is the batch). fp32 partials, summed by
    the launcher. Each dropout mask element is drawn once.
    """
    cols = tl.program_id(0).to(tl.int64) * BK + tl.arange(0, BK)
    split = tl.program_id(1)
    ranks = tl.arange(0, BR)
    col_ok = cols < K
    rank_ok = ranks < R
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    for t in range(0, TILES_PER_PROGRAM):
        rows = (split * TILES_PER_PROGRAM + t).to(tl.int64) * BM + tl.arange(0, BM)
        row_ok = rows < M
        x_tile = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed_ptr, rows, cols, K, dropout_p)
            x_tile = tl.where(keep, x_tile, 0.0)
        ds_t = tl.load(ds_ptr + ranks[:, None] * stride_dsr + rows[None, :] * stride_dsm,
                       mask=rank_ok[:, None] & row_ok[None, :], other=0.0)
        acc = tl.dot(ds_t, x_tile, acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        acc = acc / (1.0 - dropout_p)
    tl.store(da_part_ptr + split * stride_dap + ranks[:, None] * stride_dar + cols[None, :] * stride_dak,
             acc, mask=rank_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------
# Launchers: shapes in, tensors out. Validation happens before (lora_fused.validation).
# --------------------------------------------------------------------------
import collections  # noqa: E402
import os  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

#: Kernel launches by kernel name; tests read it to prove the Triton path ran.
LAUNCH_COUNTS: collections.Counter = collections.Counter()

#: Tests set this: every output buffer is filled with NaN before a launch, so an
#: element a kernel fails to write cannot pass as a plausible number.
POISON_OUTPUTS = False

#: fp32 scratch a backward may use for split-M partials (dB, dA), in bytes.
PARTIALS_BUDGET_BYTES = 64 << 20
#: Target number of programs for split-M reductions (~2 waves of 132 SMs).
SPLIT_TARGET_PROGRAMS = 264


@dataclass(frozen=True)
class TileConfig:
    BM: int
    BN: int
    BK: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3


# The one table of block configs. Keys are regimes chosen by `forward_plan`
# and `backward_plan`; `tests/test_gpu_compile.py` compiles every entry for
# sm_90 and sm_80 and checks shared memory, tensor-core use and spills.
# One entry serves every rank 1..256 (BR 16..256); all are spill-free on
# sm_90 and sm_80 (bf16/fp16) except the dX GEMM with dropout (see the test).
CONFIGS: dict[str, TileConfig] = {
    # Decode: few rows, the layer is a weight-streaming GEMV. BM=64 holds every
    # decode batch (<= DECODE_MAX_ROWS) in one row tile, so W is read once, and
    # is the smallest M of a Hopper wgmma (HGMMA); the padded rows cost no HBM.
    # 8 warps: 4 spill on sm_80 in the dX GEMM with dropout at BR=256.
    "gemm_decode": TileConfig(BM=64, BN=64, BK=128, GROUP_M=1, num_warps=8, num_stages=3),
    "gemm_prefill": TileConfig(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
    # The dX GEMM with LoRA dropout draws a 128 × 128 Philox mask in its prologue:
    # with 8 warps that spilled on sm_90 (255 registers); 16 warps halve the tile per thread.
    "gemm_prefill_dropout_dx": TileConfig(BM=64, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
    # Rank-wide accumulators ([BM, BR], [BR, BK], [BN, BR] fp32) and Philox
    # tiles must fit in registers at BR=256: small tiles, 8 warps.
    "shrink": TileConfig(BM=64, BN=0, BK=64, num_warps=8, num_stages=3),
    # dS/dB sweep dY in BM x BN tiles; narrow BN only where the rank forces it
    # (at BR=256 every wider tile spilled or overflowed shared memory).
    "grad_ds_db": TileConfig(BM=64, BN=128, BK=0, num_warps=8, num_stages=3),
    "grad_ds_db_wide_rank": TileConfig(BM=64, BN=16, BK=0, num_warps=8, num_stages=4),
    "grad_a": TileConfig(BM=64, BN=0, BK=64, num_warps=8, num_stages=3),
}
# The interpreter runs one program at a time in numpy: large blocks, few programs.
INTERPRETER_CONFIGS: dict[str, TileConfig] = {
    "gemm_decode": TileConfig(BM=16, BN=64, BK=64, GROUP_M=1),
    "gemm_prefill": TileConfig(BM=64, BN=64, BK=64, GROUP_M=2),
    "gemm_prefill_dropout_dx": TileConfig(BM=64, BN=64, BK=64, GROUP_M=2),
    "shrink": TileConfig(BM=64, BN=0, BK=64),
    "grad_ds_db": TileConfig(BM=64, BN=64, BK=0),
    "grad_ds_db_wide_rank": TileConfig(BM=64, BN=64, BK=0),
    "grad_a": TileConfig(BM=64, BN=0, BK=64),
}
DECODE_MAX_ROWS = 64
# Fused shrink at BR=64 spills on sm_80 (128x128 tile) and adds BR/BN = 50% MMA work.
FUSED_SHRINK_MAX_RANK = 32


def _new_output(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """``torch.empty`` for a kernel's output (NaN-filled when POISON_OUTPUTS)."""
    out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def config(name: str) -> TileConfig:
    return (INTERPRETER_CONFIGS if interpreting() else CONFIGS)[name]


def padded_rank(r: int) -> int:
    """Rank block for ``tl.dot``: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(r))


def tf32_matmul_enabled() -> bool:
    """Whether torch lets fp32 matmuls use TF32, by the new API or the legacy flag.

    ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" | "ieee" | "none" =
    inherit) exists from torch 2.9; reading the legacy ``allow_tf32`` raises
    once a program has used the new API, so the new one is asked first.
    """
    matmul = torch.backends.cuda.matmul
    for precision in (getattr(matmul, "fp32_precision", "none"),
                      getattr(torch.backends, "fp32_precision", "none")):
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # legacy and new APIs mixed: the new one said "none"
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's TF32 setting for matmuls (ieee when off); 16-bit dots are exact products."""
    if dtype == torch.float32 and tf32_matmul_enabled():
        return "tf32"
    return "ieee"


def forward_plan(M: int, r: int, dropout: bool) -> tuple[str, bool]:
    """(config name, fused_shrink) for the forward of an M-row batch.

    - dropout → S-first: the fused K loop would draw the mask once per column
      tile of Y instead of once per element of X (Philox is ~40 int ops each).
    - rank > FUSED_SHRINK_MAX_RANK → S-first: a BM × BR fp32 shrink accumulator
      beside the BM × BN output accumulator exhausts registers.
    - otherwise fused: one launch, X read once; extra flops ≈ r / BN.
    """
    fused = not dropout and padded_rank(r) <= FUSED_SHRINK_MAX_RANK
    return gemm_config(M), fused


def gemm_config(M: int, dropout_on_lora_term: bool = False) -> str:
    """CONFIGS key of the GEMM for M rows (the dX GEMM with dropout has its own prefill tile)."""
    if M <= DECODE_MAX_ROWS:
        return "gemm_decode"
    return "gemm_prefill_dropout_dx" if dropout_on_lora_term else "gemm_prefill"


def _split_rows(M: int, BM: int, other_programs: int, partial_elems: int) -> tuple[int, int]:
    """(n_splits, tiles_per_split) for a split-M reduction into fp32 partials.

    Enough splits to fill the GPU beside ``other_programs``, no more than the
    fp32 partials budget allows (each split holds ``partial_elems`` floats).
    """
    m_tiles = triton.cdiv(M, BM)
    by_memory = max(1, PARTIALS_BUDGET_BYTES // (4 * partial_elems))
    by_occupancy = max(1, SPLIT_TARGET_PROGRAMS // max(1, other_programs))
    n_splits = max(1, min(m_tiles, by_memory, by_occupancy))
    tiles = triton.cdiv(m_tiles, n_splits)
    return triton.cdiv(m_tiles, tiles), tiles


def _launch_gemm(x, w_nk, bias, a_rk, l_mr, r_nr, out, seed, scaling, dropout_p,
                 *, fused_shrink, dropout_in_loop, dropout_on_lora_term, cfg_name):
    """OUT = X W_nkᵀ + b + s·L R_nrᵀ; ``w_nk`` / ``r_nr`` may be transposed views."""
    M, K = x.shape
    N = out.shape[1]
    R = r_nr.shape[1]
    cfg = config(cfg_name)
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN),)
    dummy = x
    lora_gemm_kernel[grid](
        x, w_nk, bias if bias is not None else dummy, a_rk if a_rk is not None else dummy,
        l_mr, r_nr, out, seed if seed is not None else dummy,
        M, N, K, R,
        x.stride(0), x.stride(1), w_nk.stride(0), w_nk.stride(1),
        a_rk.stride(0) if a_rk is not None else 0, a_rk.stride(1) if a_rk is not None else 0,
        l_mr.stride(0), l_mr.stride(1), r_nr.stride(0), r_nr.stride(1),
        out.stride(0), out.stride(1),
        float(scaling), float(dropout_p),
        HAS_BIAS=bias is not None, FUSED_SHRINK=fused_shrink,
        DROPOUT_IN_LOOP=dropout_in_loop, DROPOUT_ON_LORA_TERM=dropout_on_lora_term,
        PRECISION=dot_precision(x.dtype),
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BR=padded_rank(R), GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    LAUNCH_COUNTS["lora_gemm_kernel"] += 1


def lora_shrink(x, lora_A, seed, dropout_p):
    """S = drop(x) Aᵀ as [M, r] in x's dtype."""
    M, K = x.shape
    R = lora_A.shape[0]
    cfg = config("shrink")
    out = _new_output((M, R), x)
    has_dropout = dropout_p > 0.0
    lora_shrink_kernel[(triton.cdiv(M, cfg.BM),)](
        x, lora_A, out, seed if has_dropout else x, M, K, R,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), out.stride(0), out.stride(1),
        float(dropout_p),
        HAS_DROPOUT=has_dropout, PRECISION=dot_precision(x.dtype),
        BM=cfg.BM, BK=cfg.BK, BR=padded_rank(R), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    LAUNCH_COUNTS["lora_shrink_kernel"] += 1
    return out


def lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``(y, S)``: y = x W0ᵀ + b + s·S Bᵀ, S = drop(x) Aᵀ. x is 2-D [M, K], M >= 1."""
    M = x.shape[0]
    N, R = lora_B.shape
    has_dropout = dropout_p > 0.0
    cfg_name, fused = forward_plan(M, R, has_dropout)
    y = _new_output((M, N), x)
    if fused:
        shrink = _new_output((M, R), x)
    else:
        shrink = lora_shrink(x, lora_A, seed, dropout_p)
    _launch_gemm(x, weight, bias, lora_A if fused else None, shrink, lora_B, y, seed,
                 scaling, dropout_p, fused_shrink=fused, dropout_in_loop=fused and has_dropout,
                 dropout_on_lora_term=False, cfg_name=cfg_name)
    return y, shrink


#: Largest padded rank the wide-tile dS/dB config takes.
GRAD_DS_DB_WIDE_TILE_MAX_RANK = 32


def grad_ds_db_config(r: int) -> str:
    return "grad_ds_db" if padded_rank(r) <= GRAD_DS_DB_WIDE_TILE_MAX_RANK else "grad_ds_db_wide_rank"


def lora_grad_ds_db(grad_y, lora_B, shrink, scaling, compute_db=True):
    """(dS [M, r] in dY's dtype, dB [N, r] fp32 or None): one pass over dY."""
    M, N = grad_y.shape
    R = lora_B.shape[1]
    cfg = config(grad_ds_db_config(R))
    n_splits, tiles = _split_rows(M, cfg.BM, 1, N * R)
    grad_shrink = _new_output((M, R), grad_y)
    # Zeroed: every row tile of a split adds into its slice.
    db_part = torch.zeros((n_splits if compute_db else 1, N if compute_db else 1, R),
                          device=grad_y.device, dtype=torch.float32)
    lora_grad_ds_db_kernel[(n_splits,)](
        grad_y, lora_B, shrink, grad_shrink, db_part, M, N, R,
        grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1),
        shrink.stride(0), shrink.stride(1), grad_shrink.stride(0), grad_shrink.stride(1),
        db_part.stride(0), db_part.stride(1), db_part.stride(2),
        float(scaling), tiles,
        COMPUTE_DB=compute_db, PRECISION=dot_precision(grad_y.dtype),
        BM=cfg.BM, BN=cfg.BN, BR=padded_rank(R), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    LAUNCH_COUNTS["lora_grad_ds_db_kernel"] += 1
    return grad_shrink, db_part.sum(0) if compute_db else None


def lora_grad_a(grad_shrink, x, seed, dropout_p):
    """dA [r, K] fp32 = dSᵀ drop(x), reduced over split-M partials."""
    M, K = x.shape
    R = grad_shrink.shape[1]
    cfg = config("grad_a")
    col_tiles = triton.cdiv(K, cfg.BK)
    n_splits, tiles = _split_rows(M, cfg.BM, col_tiles, R * K)
    da_part = _new_output((n_splits, R, K), x, torch.float32)
    has_dropout = dropout_p > 0.0
    lora_grad_a_kernel[(col_tiles, n_splits)](
        grad_shrink, x, da_part, seed if has_dropout else x, M, K, R,
        grad_shrink.stride(0), grad_shrink.stride(1), x.stride(0), x.stride(1),
        da_part.stride(0), da_part.stride(1), da_part.stride(2),
        float(dropout_p), tiles,
        HAS_DROPOUT=has_dropout, PRECISION=dot_precision(x.dtype),
        BM=cfg.BM, BK=cfg.BK, BR=padded_rank(R), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    LAUNCH_COUNTS["lora_grad_a_kernel"] += 1
    return da_part.sum(0)


def lora_backward(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed,
                  need_dx: bool, need_dlora: bool):
    """``(dX, dA, dB)`` (None where not needed). Nothing of size out × in is allocated."""
    M, K = x.shape
    grad_shrink, grad_b = lora_grad_ds_db(grad_y, lora_B, shrink, scaling, compute_db=need_dlora)
    grad_x = grad_a = None
    if need_dlora:
        grad_a = lora_grad_a(grad_shrink, x, seed, dropout_p).to(lora_A.dtype)
        grad_b = grad_b.to(lora_B.dtype)
    if need_dx:
        cfg_name = gemm_config(M, dropout_on_lora_term=dropout_p > 0.0)
        grad_x = _new_output((M, K), x)
        # dX = dY (W0ᵀ)ᵀ + keep/(1-p) ⊙ dS (Aᵀ)ᵀ: the forward GEMM on transposed views.
        _launch_gemm(grad_y, weight.t(), None, None, grad_shrink, lora_A.t(), grad_x, seed,
                     1.0, dropout_p, fused_shrink=False, dropout_in_loop=False,
                     dropout_on_lora_term=dropout_p > 0.0, cfg_name=cfg_name)
    return grad_x, grad_a, grad_b
