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
                          with different strides. In the *fused* strategy (no
                          dropout) its K loop also accumulates L = X Aᵀ and writes it out.
``lora_shrink_kernel``    S = drop(X) Aᵀ on its own (the *shrink_first* and *composite* strategies).
``lora_expand_add_kernel`` OUT += s·L Rᵀ in place (⊙ keep/(1-p) for dX): the *composite*
                          strategy's LoRA term, added into the vendor GEMM's y or dX.
``lora_grad_ds_db_kernel`` one pass over each dY tile gives dS and a partial dB.
``lora_grad_a_kernel``    split-M partials of dA = dSᵀ drop(X).

Strategies (``resolve_forward``, ``resolve_backward``; lora_fused.dispatch.strategies):
forward "fused" (one GEMM, shrink in its K loop), "shrink_first" (shrink, then
the GEMM started from s·S Bᵀ), "composite" (shrink, ``F.linear`` = cuBLAS for
X W0ᵀ + b, expand-add); backward "fused" (the dX GEMM) or "composite" (dY W0 by
cuBLAS, then the expand-add with the mask). All draw the same mask from one seed.

Ranks are padded to ``BR = max(16, next_pow2(R))`` (``tl.dot`` needs every
dimension >= 16 on NVIDIA GPUs); padded rows/columns are masked to zero.
Row and column offsets are int64 so ``row * stride`` cannot overflow past 2³¹.
Accumulation is always fp32; dot operands are cast to the input dtype.
Tile loads, the keep-mask and the plain K loop are ``kernels.common``'s.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .common import (LAUNCH_COUNTS, cdiv, constexpr_args, dot_precision, dropout_keep, grouped_tile, interpreting,
                     load_tile, matmul_k_loop, new_matrix, new_output, padded_rank, param_names, runner, split_rows,
                     store_tile)
from .host import BACKWARD_STRATEGIES, FORWARD_STRATEGIES


@triton.jit
def load_scaling(scaling, SCALING_PTR: tl.constexpr):
    """The LoRA factor s as fp32: the argument itself, or (SCALING_PTR) the 0-d tensor it points to.

    The pointer form serves compiled models (``LoRALinear`` under torch.compile): a new s is an
    in-place write to that tensor, so it neither recompiles the model nor goes stale in a CUDA
    graph, which replays the launch's arguments (a pointer) and not a value read at capture.
    Both forms give the same fp32 (round to nearest of the float64 value)."""
    if SCALING_PTR:
        scaling = tl.load(scaling).to(tl.float32)
    return scaling


@triton.jit
def load_dropout_p(dropout_p, P_PTR: tl.constexpr):
    """The dropout probability p as fp32: the argument itself, or (P_PTR) the 0-d float64 tensor it
    points to (``LoRALinear`` under torch.compile: a new p is an in-place write, as for s in
    ``load_scaling``). Both forms give the same fp32 (round to nearest of the float64 value), so
    the mask ``rand >= p`` and ``1/(1-p)`` are bit for bit those of the float form."""
    if P_PTR:
        dropout_p = tl.load(dropout_p).to(tl.float32)
    return dropout_p


@triton.jit
def lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, l_ptr, r_ptr, out_ptr, seed_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bias, stride_ar, stride_ak,
    stride_lm, stride_lr, stride_rn, stride_rr, stride_om, stride_on,
    scaling, dropout_p,
    HAS_BIAS: tl.constexpr, FUSED_SHRINK: tl.constexpr, DROPOUT_ON_LORA_TERM: tl.constexpr,
    SCALING_PTR: tl.constexpr, P_PTR: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """OUT[M, N] = X[M, K] W[N, K]ᵀ + bias[N] + scaling · L[M, R] R[N, R]ᵀ.

    Grid: ``(cdiv(M, BM) * cdiv(N, BN),)``; each program owns one BM × BN
    tile of OUT, visited in grouped order.

    FUSED_SHRINK: L is not read; the K loop accumulates L = X A[R, K]ᵀ (X tile
      reused, extra flops ≈ R/BN) and the programs of the first column tile
      write it to ``l_ptr`` for the backward. Never with dropout (fused_shrink_applies).
    otherwise: L is read from ``l_ptr`` and its term starts the accumulator.
    DROPOUT_ON_LORA_TERM: the LoRA term is multiplied by keep/(1-p) of
      element (m, n) of an [M, N] matrix (the dX GEMM).
    SCALING_PTR: ``scaling`` points to s (see ``load_scaling``); P_PTR: ``dropout_p``
    points to p (see ``load_dropout_p``).
    """
    scaling = load_scaling(scaling, SCALING_PTR)
    dropout_p = load_dropout_p(dropout_p, P_PTR)
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rows = tile_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = tile_n.to(tl.int64) * BN + tl.arange(0, BN)
    ranks = tl.arange(0, BR)
    row_ok = rows < M
    col_ok = cols < N
    rank_ok = ranks < R

    # R tile, [BR, BN] view of R[N, R]ᵀ: the LoRA expand operand.
    r_tile = load_tile(r_ptr, ranks, cols, stride_rr, stride_rn, rank_ok, col_ok)

    if FUSED_SHRINK:
        # One pass over K feeds both products with the same X tile.
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        shrink = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK).to(tl.int64)
            k_ok = ks < K
            x_tile = load_tile(x_ptr, rows, ks, stride_xm, stride_xk, row_ok, k_ok)
            acc = tl.dot(x_tile, load_tile(w_ptr, ks, cols, stride_wk, stride_wn, k_ok, col_ok), acc,
                         input_precision=PRECISION)
            shrink = tl.dot(x_tile, load_tile(a_ptr, ks, ranks, stride_ak, stride_ar, k_ok, rank_ok), shrink,
                            input_precision=PRECISION)
        l_tile = shrink.to(out_ptr.dtype.element_ty)
        if tile_n == 0:
            store_tile(l_ptr, rows, ranks, stride_lm, stride_lr, row_ok, rank_ok, l_tile)
        acc += scaling * tl.dot(l_tile, r_tile, input_precision=PRECISION)
    else:
        if DROPOUT_ON_LORA_TERM:
            # The mask first, as the scale it applies: Philox's state and the LoRA
            # product are then never live together (that spilled at 128 × 128).
            keep = dropout_keep(seed_ptr, rows, cols, N, dropout_p)
            acc = tl.where(keep, scaling / (1.0 - dropout_p), 0.0)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32) + scaling
        l_tile = load_tile(l_ptr, rows, ranks, stride_lm, stride_lr, row_ok, rank_ok)
        acc = acc * tl.dot(l_tile, r_tile, input_precision=PRECISION)
        acc = matmul_k_loop(acc, x_ptr, rows, row_ok, stride_xm, stride_xk, w_ptr, cols, col_ok,
                            stride_wk, stride_wn, 0, K, K, seed_ptr, dropout_p,
                            DROPOUT=False, PRECISION=PRECISION, BK=BK)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    store_tile(out_ptr, rows, cols, stride_om, stride_on, row_ok, col_ok, acc)


@triton.jit
def lora_expand_add_kernel(
    out_ptr, l_ptr, r_ptr, seed_ptr, M, N, R,
    stride_om, stride_on, stride_lm, stride_lr, stride_rn, stride_rr,
    scaling, dropout_p,
    DROPOUT_ON_TERM: tl.constexpr, SCALING_PTR: tl.constexpr, P_PTR: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT[M, N] += scaling · L[M, R] R[N, R]ᵀ, in place (the *composite* strategy).

    OUT holds the vendor GEMM's base (y = X W0ᵀ + b, or dX = dY W0); this adds
    the LoRA term: the forward's s·S Bᵀ, or the dX term keep/(1-p) ⊙ (dS A)
    with DROPOUT_ON_TERM (keep of element (m, n) of an [M, N] matrix: the mask
    the forward's shrink drew at (m, k)). Grid: ``(cdiv(M, BM) * cdiv(N, BN),)``,
    grouped order; the rank loop takes BR ranks at a time (fp32 accumulation),
    then the loaded OUT tile is added and the sum rounded once. SCALING_PTR: see ``load_scaling``;
    P_PTR: see ``load_dropout_p``.
    """
    scaling = load_scaling(scaling, SCALING_PTR)
    dropout_p = load_dropout_p(dropout_p, P_PTR)
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rows = tile_m.to(tl.int64) * BM + tl.arange(0, BM)
    cols = tile_n.to(tl.int64) * BN + tl.arange(0, BN)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        ranks = r0 + tl.arange(0, BR)
        rank_ok = ranks < R
        l_tile = load_tile(l_ptr, rows, ranks, stride_lm, stride_lr, row_ok, rank_ok)
        r_tile = load_tile(r_ptr, ranks, cols, stride_rr, stride_rn, rank_ok, col_ok)
        acc = tl.dot(l_tile, r_tile, acc, input_precision=PRECISION)
    if DROPOUT_ON_TERM:
        acc = acc * tl.where(dropout_keep(seed_ptr, rows, cols, N, dropout_p), scaling / (1.0 - dropout_p), 0.0)
    else:
        acc = acc * scaling
    acc += load_tile(out_ptr, rows, cols, stride_om, stride_on, row_ok, col_ok).to(tl.float32)
    store_tile(out_ptr, rows, cols, stride_om, stride_on, row_ok, col_ok, acc)


@triton.jit
def lora_shrink_kernel(
    x_ptr, a_ptr, s_ptr, seed_ptr, M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    dropout_p,
    HAS_DROPOUT: tl.constexpr, P_PTR: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    """S[M, R] = drop(X)[M, K] A[R, K]ᵀ.

    Grid: ``(cdiv(M, BM),)``; each program owns BM full rows of S and reads
    its rows of X once, so each dropout mask element is drawn once.
    P_PTR: see ``load_dropout_p``.
    """
    dropout_p = load_dropout_p(dropout_p, P_PTR)
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, BR)
    row_ok = rows < M
    rank_ok = ranks < R
    acc = matmul_k_loop(tl.zeros((BM, BR), dtype=tl.float32), x_ptr, rows, row_ok, stride_xm, stride_xk,
                        a_ptr, ranks, rank_ok, stride_ak, stride_ar, 0, K, K, seed_ptr, dropout_p,
                        DROPOUT=HAS_DROPOUT, PRECISION=PRECISION, BK=BK)
    if HAS_DROPOUT:
        acc = acc / (1.0 - dropout_p)
    store_tile(s_ptr, rows, ranks, stride_sm, stride_sr, row_ok, rank_ok, acc)


@triton.jit
def lora_grad_ds_db_kernel(
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_part_ptr, M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsm, stride_dsr, stride_dbp, stride_dbn, stride_dbr,
    scaling, TILES_PER_PROGRAM,
    COMPUTE_DB: tl.constexpr, SCALING_PTR: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    """dS = s · dY B (complete) and dB_part[p] = s · dY[rows of p]ᵀ S[rows of p].

    Grid: ``(n_programs,)``; program p owns the row tiles
    ``[p * TILES_PER_PROGRAM, (p + 1) * TILES_PER_PROGRAM)`` of dY and sweeps
    all columns of each, so every dY tile is read once for both products.
    dS rows are complete in-program; its fp32 dB_part[p] slice [N, R] is its
    own (no atomics, deterministic) and is summed over p by the launcher.
    The buffer must be zeroed: each row tile adds into it. SCALING_PTR: see ``load_scaling``.
    """
    scaling = load_scaling(scaling, SCALING_PTR)
    pid = tl.program_id(0)
    ranks = tl.arange(0, BR)
    rank_ok = ranks < R
    db_part_ptr += pid * stride_dbp
    for t in range(0, TILES_PER_PROGRAM):
        rows = (pid * TILES_PER_PROGRAM + t).to(tl.int64) * BM + tl.arange(0, BM)
        row_ok = rows < M
        if COMPUTE_DB:
            s_tile = load_tile(s_ptr, rows, ranks, stride_sm, stride_sr, row_ok, rank_ok)
        ds = tl.zeros((BM, BR), dtype=tl.float32)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN).to(tl.int64)
            col_ok = cols < N
            dy = load_tile(dy_ptr, rows, cols, stride_dym, stride_dyn, row_ok, col_ok)
            b_tile = load_tile(b_ptr, cols, ranks, stride_bn, stride_br, col_ok, rank_ok)
            ds = tl.dot(dy, b_tile, ds, input_precision=PRECISION)
            if COMPUTE_DB:
                db = scaling * tl.dot(tl.trans(dy), s_tile, input_precision=PRECISION)
                db += load_tile(db_part_ptr, cols, ranks, stride_dbn, stride_dbr, col_ok, rank_ok)
                store_tile(db_part_ptr, cols, ranks, stride_dbn, stride_dbr, col_ok, rank_ok, db)
        store_tile(ds_ptr, rows, ranks, stride_dsm, stride_dsr, row_ok, rank_ok, scaling * ds)


@triton.jit
def lora_grad_a_kernel(
    ds_ptr, x_ptr, da_part_ptr, seed_ptr, M, K, R,
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dap, stride_dar, stride_dak,
    dropout_p, TILES_PER_PROGRAM,
    HAS_DROPOUT: tl.constexpr, P_PTR: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    """dA_part[p][:, cols] = dS[rows of p]ᵀ drop(X)[rows of p, cols].

    Grid: ``(cdiv(K, BK), n_programs)``; program (j, p) owns column tile j
    and the row tiles ``[p * TILES_PER_PROGRAM, (p + 1) * TILES_PER_PROGRAM)``
    (split-M: the reduction dimension is the batch). fp32 partials, summed by
    the launcher. Each dropout mask element is drawn once. P_PTR: see ``load_dropout_p``.
    """
    dropout_p = load_dropout_p(dropout_p, P_PTR)
    cols = tl.program_id(0).to(tl.int64) * BK + tl.arange(0, BK)
    split = tl.program_id(1)
    ranks = tl.arange(0, BR)
    col_ok = cols < K
    rank_ok = ranks < R
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    for t in range(0, TILES_PER_PROGRAM):
        rows = (split * TILES_PER_PROGRAM + t).to(tl.int64) * BM + tl.arange(0, BM)
        row_ok = rows < M
        x_tile = load_tile(x_ptr, rows, cols, stride_xm, stride_xk, row_ok, col_ok)
        if HAS_DROPOUT:
            keep = dropout_keep(seed_ptr, rows, cols, K, dropout_p)
            x_tile = tl.where(keep, x_tile, 0.0)
        ds_t = load_tile(ds_ptr, ranks, rows, stride_dsr, stride_dsm, rank_ok, row_ok)
        acc = tl.dot(ds_t, x_tile, acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        acc = acc / (1.0 - dropout_p)
    store_tile(da_part_ptr + split * stride_dap, ranks, cols, stride_dar, stride_dak, rank_ok, col_ok, acc)


# --------------------------------------------------------------------------
# Launchers: shapes in, tensors out. Validation happens before (lora_fused.validation).
# Every tensor is read through its strides (a bias too), so views need no copy.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """Blocks of one launch. The expand-add kernel reads BK as its rank block."""
    BM: int
    BN: int
    BK: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    #: Largest padded rank the measured choice offers this config at (the compile test's
    #: largest case for it): a wider rank prologue would not fit its shared memory.
    max_rank: int = 256


# The one table of block configs. Keys are regimes chosen by `gemm_config`,
# `expand_add_config` and `grad_ds_db_config`; `tests/kernels/test_gpu_compile.py` compiles
# every entry for sm_90 and sm_80 (bf16/fp16, BR 16..256) and fails on any spill,
# on shared memory past the GPU's limit and on a GEMM without the arch's MMA.
# Register and shared-memory figures below are that test's (triton 3.9, bf16, the
# largest BR compiled); the configs were chosen by it, not by a timing on a GPU.
CONFIGS: dict[str, TileConfig] = {
    # Decode: few rows, the layer is a weight-streaming GEMV. BM=64 holds every
    # decode batch (<= DECODE_MAX_ROWS) in one row tile, so W is read once, and
    # is the smallest M of a Hopper wgmma (HGMMA); the padded rows cost no HBM.
    # 8 warps: with 4, the dX GEMM with dropout at BR=256 spilled on sm_80 (the compile
    # test checks only the configs in this table); with 8 it needs 118 registers on sm_90.
    "gemm_decode": TileConfig(BM=64, BN=64, BK=128, GROUP_M=1, num_warps=8, num_stages=3),
    # 8 warps (two warpgroups) for a 128 x 128 fp32 accumulator: fused, 158-180
    # registers on sm_90 and 195-202 on sm_80; at BR=256 the shrink_first GEMM takes 225 KB
    # of shared memory on sm_90 (limit 227 KB): no room for a 4th stage.
    "gemm_prefill": TileConfig(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
    # The dX GEMM with LoRA dropout draws a BM x BN Philox mask in its prologue.
    # At 128 x 128 with 8 warps that spilled on sm_90 (255 registers); a 64-row
    # tile halves the mask per thread: 186 registers at BR=256 on sm_90, 200 on sm_80.
    "gemm_prefill_dropout_dx": TileConfig(BM=64, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
    # Rank-wide accumulators ([BM, BR], [BR, BK] fp32) and Philox tiles must fit in
    # registers at BR=256: small tiles, 8 warps (shrink with dropout: 176 registers).
    "shrink": TileConfig(BM=64, BN=0, BK=64, num_warps=8, num_stages=3),
    # dS/dB sweep dY in BM x BN tiles; narrow BN only where the rank forces it
    # (at BR=256 every wider tile spilled or overflowed shared memory; BN=16 with
    # 4 stages: 244 registers, 89 KB shared memory on sm_90).
    "grad_ds_db": TileConfig(BM=64, BN=128, BK=0, num_warps=8, num_stages=3),
    "grad_ds_db_wide_rank": TileConfig(BM=64, BN=16, BK=0, num_warps=8, num_stages=4),
    "grad_a": TileConfig(BM=64, BN=0, BK=64, num_warps=8, num_stages=3),
    # --- Candidates of the measured choice (lora_fused.dispatch.tuning), never picked by the
    # heuristic. Unmeasured on a GPU; the compile test checks each (no spill, fits).
    # Decode, N = 4096: BN = 64 launches 64 programs on 132 SMs, so half the machine
    # streams W0. BN = 32 / 16 launch 128 / 256 programs (every SM), 4 stages of BK = 128
    # keep 4 x 8 KB / 4 x 4 KB of W0 in flight per program (compile test, sm_90: 88-125
    # registers, 116-148 KB shared memory).
    "gemm_decode_bn32": TileConfig(BM=64, BN=32, BK=128, GROUP_M=1, num_warps=4, num_stages=4),
    "gemm_decode_bn16": TileConfig(BM=64, BN=16, BK=128, GROUP_M=1, num_warps=4, num_stages=4),
    # Prefill: deeper pipelines (BK 64 x 4 stages, BK 32 x 5) and the 128 x 256 / 256 x 128
    # tiles of Triton's matmul tutorial (fewer loads per flop than 128 x 128), all 8 warps.
    # The rank prologue's L [BM, BR] and R [BR, BN] tiles take shared memory beside the
    # pipeline's, so each is offered only up to the padded rank its compile case covers
    # (max_rank; at BR = 256 the 4-stage 128 x 128 needed 263 KB on sm_90). The wide tiles
    # spilled as the fused GEMM (255 registers: the BM x BR shrink accumulator beside a
    # 128 x 256 one), so only the shrink_first GEMM and dX take them (CANDIDATE_CONFIGS); BK 32
    # x 4 stages: at BK 64 x 3 they needed 197 KB at BR 64. On sm_80 they sit at 243-255
    # registers without a spill: the first to drop if a Triton upgrade makes them spill.
    "gemm_prefill_s4": TileConfig(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4, max_rank=32),
    "gemm_prefill_s5": TileConfig(BM=128, BN=128, BK=32, GROUP_M=8, num_warps=8, num_stages=5, max_rank=64),
    "gemm_prefill_128x256": TileConfig(BM=128, BN=256, BK=32, GROUP_M=8, num_warps=8, num_stages=4, max_rank=64),
    "gemm_prefill_256x128": TileConfig(BM=256, BN=128, BK=32, GROUP_M=8, num_warps=8, num_stages=4, max_rank=64),
    # The composite strategy's in-place add of s·S Bᵀ (or keep/(1-p) ⊙ dS A) into the
    # vendor GEMM's output: memory-bound (one read and one write of OUT), BK is the
    # rank block. 64 x 128 with 8 warps: the dropout mask is 32 elements per thread (with
    # 4 warps, 218 registers on sm_90: no spill, but one block per SM for a memory-bound add).
    "expand_add": TileConfig(BM=64, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=2),
    "expand_add_wide": TileConfig(BM=128, BN=128, BK=32, GROUP_M=8, num_warps=8, num_stages=2),
    # Decode: BN = 32 gives 128 programs at N = 4096.
    "expand_add_decode": TileConfig(BM=64, BN=32, BK=64, GROUP_M=1, num_warps=4, num_stages=2),
    "expand_add_decode_bn16": TileConfig(BM=64, BN=16, BK=64, GROUP_M=1, num_warps=4, num_stages=2),
}
#: Configs the measured choice times, by launch and regime (heuristic default first).
#: "gemm_fused": the fused forward GEMM; "gemm": the shrink_first forward GEMM and the dX
#: GEMM without dropout;
#: "gemm_dropout_dx": the dX GEMM with its BM x BN Philox mask (the wide tiles spill
#: there: see gemm_prefill_dropout_dx); "expand_add": the composite strategy's add.
CANDIDATE_CONFIGS: dict[tuple[str, str], tuple[str, ...]] = {
    ("gemm_fused", "decode"): ("gemm_decode", "gemm_decode_bn32", "gemm_decode_bn16"),
    ("gemm_fused", "prefill"): ("gemm_prefill", "gemm_prefill_s4", "gemm_prefill_s5"),
    ("gemm", "decode"): ("gemm_decode", "gemm_decode_bn32", "gemm_decode_bn16"),
    ("gemm", "prefill"): ("gemm_prefill", "gemm_prefill_s4", "gemm_prefill_s5",
                          "gemm_prefill_128x256", "gemm_prefill_256x128"),
    ("gemm_dropout_dx", "decode"): ("gemm_decode", "gemm_decode_bn32", "gemm_decode_bn16"),
    ("gemm_dropout_dx", "prefill"): ("gemm_prefill_dropout_dx",),
    ("expand_add", "decode"): ("expand_add_decode", "expand_add_decode_bn16"),
    ("expand_add", "prefill"): ("expand_add", "expand_add_wide"),
}
#: Batches of at most this many rows take the decode GEMM (one BM=64 row tile).
DECODE_MAX_ROWS = 64
#: Largest padded rank of the fused-shrink forward. At BR=64 the fused 128 x 128
#: tile spilled on sm_80, and it adds BR/BN = 50% MMA work.
FUSED_SHRINK_MAX_RANK = 32
#: Largest padded rank the wide-tile (BN=128) dS/dB config takes: 112 registers at
#: BR=32 on sm_90; wider ranks take BN=16.
GRAD_DS_DB_WIDE_TILE_MAX_RANK = 32


def _interpreter_config(name: str, cfg: TileConfig) -> TileConfig:
    """The interpreter runs one program at a time in numpy: mid-size blocks (64) keep
    programs few and tiles cheap; the decode tile stays 16 rows (the tests' decode
    batches are that small); GROUP_M 2 so grouped order is exercised at test sizes."""
    return replace(cfg, BM=16 if "decode" in name else min(cfg.BM, 64),
                   BN=64 if cfg.BN else 0, BK=64 if cfg.BK else 0, GROUP_M=min(cfg.GROUP_M, 2))


INTERPRETER_CONFIGS: dict[str, TileConfig] = {name: _interpreter_config(name, cfg) for name, cfg in CONFIGS.items()}


def config(name: str) -> TileConfig:
    table = INTERPRETER_CONFIGS if interpreting() else CONFIGS
    if name not in table:
        raise ValueError(f"config must be one of {sorted(table)}, got {name!r}")
    return table[name]


def gemm_config(M: int, dropout_on_lora_term: bool = False) -> str:
    """CONFIGS key of the GEMM for M rows (the dX GEMM with dropout has its own prefill tile)."""
    if M <= DECODE_MAX_ROWS:
        return "gemm_decode"
    return "gemm_prefill_dropout_dx" if dropout_on_lora_term else "gemm_prefill"


def grad_ds_db_config(r: int) -> str:
    return "grad_ds_db" if padded_rank(r) <= GRAD_DS_DB_WIDE_TILE_MAX_RANK else "grad_ds_db_wide_rank"


def expand_add_config(M: int) -> str:
    """CONFIGS key of the composite strategy's expand-add for M rows."""
    return "expand_add_decode" if M <= DECODE_MAX_ROWS else "expand_add"


def regime(M: int) -> str:
    """"decode" (one BM=64 row tile holds the batch) or "prefill"."""
    return "decode" if M <= DECODE_MAX_ROWS else "prefill"


def fused_shrink_applies(r: int, dropout: bool) -> bool:
    """Whether the fused K loop exists for this problem; where it does not, "fused" runs as
    "shrink_first".

    - dropout: the fused K loop would draw the mask once per column tile of Y instead of
      once per element of X (Philox is ~40 int ops each).
    - rank > FUSED_SHRINK_MAX_RANK: a BM × BR fp32 shrink accumulator beside the BM × BN
      output accumulator exhausts registers.
    - otherwise it exists: one launch, X read once; extra flops ≈ r / BN.
    """
    return not dropout and padded_rank(r) <= FUSED_SHRINK_MAX_RANK


def _check_strategy(strategy: str, allowed: tuple[str, ...], what: str) -> None:
    if strategy not in allowed:
        raise ValueError(f"{what} strategy must be one of {allowed}, got {strategy!r}")


def resolve_forward(strategy, M: int, r: int, dropout: bool) -> str:
    """The forward strategy that runs. None is "fused", the launchers' default argument;
    which strategy a call should run is ``lora_fused.dispatch.tuning``'s choice (a measurement,
    else its ``heuristic``), which always names one. "fused" where the fused K loop does not
    exist (``fused_shrink_applies``) runs "shrink_first": the same math, S drawn first."""
    strategy = "fused" if strategy is None else strategy
    _check_strategy(strategy, FORWARD_STRATEGIES, "forward")
    if strategy == "fused" and not fused_shrink_applies(r, dropout):
        return "shrink_first"
    return strategy


def resolve_backward(strategy) -> str:
    """The backward strategy that runs (None: "fused", the launchers' default argument; see
    ``resolve_forward``)."""
    if strategy is None:
        return "fused"
    _check_strategy(strategy, BACKWARD_STRATEGIES, "backward")
    return strategy


def _fits(name: str, r: int) -> bool:
    return padded_rank(r) <= CONFIGS[name].max_rank


def forward_candidates(M: int, r: int, dropout: bool) -> list[tuple[str, str]]:
    """(strategy, config) pairs the measured choice times for a forward; the first is
    what ``lora_forward`` runs by default for the strategy it names."""
    reg = regime(M)
    out = []
    if fused_shrink_applies(r, dropout):
        out += [("fused", c) for c in CANDIDATE_CONFIGS[("gemm_fused", reg)] if _fits(c, r)]
    out += [("shrink_first", c) for c in CANDIDATE_CONFIGS[("gemm", reg)] if _fits(c, r)]
    return out + [("composite", c) for c in CANDIDATE_CONFIGS[("expand_add", reg)] if _fits(c, r)]


def backward_candidates(M: int, r: int, dropout: bool) -> list[tuple[str, str]]:
    """(strategy, config of the dX launch) pairs the measured choice times for a backward."""
    reg = regime(M)
    gemm = CANDIDATE_CONFIGS[("gemm_dropout_dx" if dropout else "gemm", reg)]
    out = [("fused", c) for c in gemm if _fits(c, r)]
    return out + [("composite", c) for c in CANDIDATE_CONFIGS[("expand_add", reg)] if _fits(c, r)]


def dropout_on(dropout_p) -> bool:
    """Whether p turns dropout on: a float > 0, or a 0-d tensor (the compiled ``LoRALinear``
    passes p as one only when dropout is on: no tensor compare, no sync)."""
    return isinstance(dropout_p, torch.Tensor) or dropout_p > 0.0


# --------------------------------------------------------------------------
# Launchers. Each ``*_launcher`` / ``_*_launch`` derives, from one call, everything its
# launches need that depends only on the call's signature (shapes, strides, dtype, device,
# flags, strategy, config, TF32 setting): grid, config, constexprs and the int arguments.
# It returns a function of the call's tensors that allocates the outputs and launches.
# ``lora_forward`` / ``lora_backward`` build one per call; ``lora_fused.dispatch.tuning`` caches
# them by that signature, so a repeated call costs a dict lookup, its allocations and
# its launches (goal H7, bench/goals.py). A launch calls ``runner(kernel)`` (``kernel.run``:
# what ``kernel[grid]`` calls, less the lambda it builds; ``kernels/common.py``), the kernel
# read from this module at launch time, with the constexprs passed positionally
# (``constexpr_args``).
# --------------------------------------------------------------------------


#: Each kernel's parameter names, read at import (a launcher may run while a test has swapped
#: a kernel object for a recorder): the launches pass constexprs positionally (constexpr_args).
_PARAMS = {kernel.fn.__name__: param_names(kernel) for kernel in (
    lora_gemm_kernel, lora_shrink_kernel, lora_expand_add_kernel, lora_grad_ds_db_kernel, lora_grad_a_kernel)}


def _scalar(value, as_pointer: bool):
    """A kernel's s or p argument: a 0-d tensor as a pointer, else a Python float."""
    return value if as_pointer else float(value)


def _gemm_launch(M, N, K, R, x_strides, w_strides, bias_stride, a_strides, l_strides, r_strides, o_strides,
                 dtype, *, has_bias, scaling_ptr, p_ptr, fused_shrink, dropout_on_lora_term, cfg_name):
    """``launch(x, w, bias, a, l, r, out, seed, scaling, p)``: OUT = X Wᵀ + b + s·L Rᵀ with W read
    by ``w_strides`` as [N, K] (so W0 itself with swapped strides gives W0ᵀ) and R as [N, R]."""
    cfg = config(cfg_name)
    grid = (cdiv(M, cfg.BM) * cdiv(N, cfg.BN),)
    ints = (M, N, K, R, *x_strides, *w_strides, bias_stride, *a_strides, *l_strides, *r_strides, *o_strides)
    consts = constexpr_args(_PARAMS["lora_gemm_kernel"], dict(
        HAS_BIAS=has_bias, FUSED_SHRINK=fused_shrink, DROPOUT_ON_LORA_TERM=dropout_on_lora_term,
        SCALING_PTR=scaling_ptr, P_PTR=p_ptr, PRECISION=dot_precision(dtype),
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BR=padded_rank(R), GROUP_M=cfg.GROUP_M))
    warps, stages = cfg.num_warps, cfg.num_stages

    def launch(x, w, bias, a, l_mr, r_nr, out, seed, scaling, p):
        runner(lora_gemm_kernel)(x, w, bias, a, l_mr, r_nr, out, seed, *ints, scaling, p, *consts,
                                 grid=grid, warmup=False, num_warps=warps, num_stages=stages)
        LAUNCH_COUNTS["lora_gemm_kernel"] += 1
    return launch


def _shrink_launch(M, K, R, x_strides, a_strides, dtype, has_dropout, p_ptr):
    """``launch(x, lora_A, seed, p) -> S``: S = drop(x) Aᵀ as a new [M, R] tensor in x's dtype."""
    cfg = config("shrink")
    grid = (cdiv(M, cfg.BM),)
    ints = (M, K, R, *x_strides, *a_strides, R, 1)  # S: a new contiguous [M, R]
    consts = constexpr_args(_PARAMS["lora_shrink_kernel"], dict(
        HAS_DROPOUT=has_dropout, P_PTR=p_ptr, PRECISION=dot_precision(dtype), BM=cfg.BM, BK=cfg.BK,
        BR=padded_rank(R)))
    warps, stages = cfg.num_warps, cfg.num_stages

    def launch(x, lora_A, seed, dropout_p):
        out = new_matrix(x, M, R)
        if has_dropout:
            runner(lora_shrink_kernel)(x, lora_A, out, seed, *ints, _scalar(dropout_p, p_ptr), *consts,
                                       grid=grid, warmup=False, num_warps=warps, num_stages=stages)
        else:
            runner(lora_shrink_kernel)(x, lora_A, out, x, *ints, 0.0, *consts,
                                       grid=grid, warmup=False, num_warps=warps, num_stages=stages)
        LAUNCH_COUNTS["lora_shrink_kernel"] += 1
        return out
    return launch


def _expand_add_launch(M, N, R, l_strides, r_strides, dtype, *, scaling_ptr, has_dropout, p_ptr, cfg_name):
    """``launch(out, l, r, seed, scaling, p) -> out``: OUT += s·L Rᵀ in place (⊙ keep/(1-p) with
    dropout); OUT's strides are read per call (it comes from a vendor GEMM)."""
    cfg = config(cfg_name)
    grid = (cdiv(M, cfg.BM) * cdiv(N, cfg.BN),)
    consts = constexpr_args(_PARAMS["lora_expand_add_kernel"], dict(
        DROPOUT_ON_TERM=has_dropout, SCALING_PTR=scaling_ptr, P_PTR=p_ptr, PRECISION=dot_precision(dtype),
        BM=cfg.BM, BN=cfg.BN, BR=min(cfg.BK, padded_rank(R)), GROUP_M=cfg.GROUP_M))
    warps, stages = cfg.num_warps, cfg.num_stages

    def launch(out, l_mr, r_nr, seed, scaling, dropout_p):
        som, son = out.stride()
        runner(lora_expand_add_kernel)(
            out, l_mr, r_nr, seed if has_dropout else out, M, N, R, som, son, *l_strides, *r_strides,
            _scalar(scaling, scaling_ptr), _scalar(dropout_p, p_ptr) if has_dropout else 0.0, *consts,
            grid=grid, warmup=False, num_warps=warps, num_stages=stages)
        LAUNCH_COUNTS["lora_expand_add_kernel"] += 1
        return out
    return launch


def _transposed(strides):
    return strides[1], strides[0]


def lora_shrink(x, lora_A, seed, dropout_p):
    """S = drop(x) Aᵀ as [M, r] in x's dtype."""
    has_dropout = dropout_on(dropout_p)
    p_ptr = has_dropout and isinstance(dropout_p, torch.Tensor)
    return _shrink_launch(x.shape[0], x.shape[1], lora_A.shape[0], x.stride(), lora_A.stride(), x.dtype,
                          has_dropout, p_ptr)(x, lora_A, seed, dropout_p)


def lora_expand_add(out, l_mr, r_nr, scaling, dropout_p=0.0, seed=None, *, cfg_name):
    """OUT += s·L R_nrᵀ in place (⊙ keep/(1-p) of OUT's [M, N] elements when dropout_p > 0);
    ``r_nr`` may be a transposed view (Aᵀ for dX). Returns OUT."""
    M, N = out.shape
    has_dropout = dropout_on(dropout_p)
    return _expand_add_launch(M, N, r_nr.shape[1], l_mr.stride(), r_nr.stride(), out.dtype,
                              scaling_ptr=isinstance(scaling, torch.Tensor), has_dropout=has_dropout,
                              p_ptr=has_dropout and isinstance(dropout_p, torch.Tensor), cfg_name=cfg_name)(
        out, l_mr, r_nr, seed, scaling, dropout_p)


def forward_launcher(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, strategy=None, config=None):
    """``run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y, S)``: ``lora_forward``
    for every call with this call's shapes, strides, dtype, device, flags (bias, seed, s and p as
    tensors or floats, dropout on) and TF32 setting."""
    M, K = x.shape
    N, R = lora_B.shape
    has_dropout = dropout_on(dropout_p)
    strategy = resolve_forward(strategy, M, R, has_dropout)
    scaling_ptr = isinstance(scaling, torch.Tensor)  # a 0-d tensor: passed as a pointer (load_scaling)
    p_ptr = has_dropout and isinstance(dropout_p, torch.Tensor)
    dtype, x_strides, a_strides, b_strides = x.dtype, x.stride(), lora_A.stride(), lora_B.stride()
    if strategy != "fused":
        shrink = _shrink_launch(M, K, R, x_strides, a_strides, dtype, has_dropout, p_ptr)
    if strategy == "composite":
        expand = _expand_add_launch(M, N, R, (R, 1), b_strides, dtype, scaling_ptr=scaling_ptr, has_dropout=False,
                                    p_ptr=False, cfg_name=config or expand_add_config(M))
        linear = torch.nn.functional.linear

        def run_composite(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
            s = shrink(x, lora_A, seed, dropout_p)
            y = linear(x, weight, bias)  # the vendor GEMM (cuBLAS / hipBLAS)
            return expand(y, s, lora_B, None, scaling, 0.0), s
        return run_composite
    fused = strategy == "fused"
    gemm = _gemm_launch(M, N, K, R, x_strides, weight.stride(), bias.stride(0) if bias is not None else 0,
                        a_strides if fused else (0, 0), (R, 1), b_strides, (N, 1), dtype,
                        has_bias=bias is not None, scaling_ptr=scaling_ptr, p_ptr=False, fused_shrink=fused,
                        dropout_on_lora_term=False, cfg_name=config or gemm_config(M))
    if fused:
        def run_fused(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
            y, s = new_matrix(x, M, N), new_matrix(x, M, R)
            gemm(x, weight, x if bias is None else bias, lora_A, s, lora_B, y, x if seed is None else seed,
                 _scalar(scaling, scaling_ptr), 0.0)
            return y, s
        return run_fused

    def run_shrink_first(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        y, s = new_matrix(x, M, N), shrink(x, lora_A, seed, dropout_p)
        gemm(x, weight, x if bias is None else bias, x, s, lora_B, y, x if seed is None else seed,
             _scalar(scaling, scaling_ptr), 0.0)
        return y, s
    return run_shrink_first


def lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, strategy=None, config=None):
    """``(y, S)``: y = x W0ᵀ + b + s·S Bᵀ, S = drop(x) Aᵀ. x is 2-D [M, K], M >= 1.

    ``strategy``: "fused" | "shrink_first" | "composite" (see ``resolve_forward``;
    None: "fused"). ``config``: the CONFIGS key of the GEMM
    (fused, shrink_first) or of the expand-add (composite); None: the regime's default.
    """
    return forward_launcher(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, strategy, config)(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _grad_ds_db_launch(M, N, R, dy_strides, b_strides, s_strides, dtype, device, *, scaling_ptr, compute_db):
    """``launch(grad_y, lora_B, shrink, scaling) -> (dS, dB fp32 | None)``: one pass over dY."""
    cfg = config(grad_ds_db_config(R))
    n_splits, tiles = split_rows(M, cfg.BM, 1, N * R, device)
    # Zeroed: every row tile of a split adds into its slice. One split: the buffer is dB itself
    # ([N, R], its split stride N·R as the [1, N, R] buffer's: the kernel never steps it).
    part_shape = (n_splits, N, R) if compute_db and n_splits > 1 else (N, R) if compute_db else (1, 1, R)
    part_strides = (N * R, R, 1) if compute_db else (R, R, 1)
    ints = (M, N, R, *dy_strides, *b_strides, *s_strides, R, 1, *part_strides)
    consts = constexpr_args(_PARAMS["lora_grad_ds_db_kernel"], dict(
        COMPUTE_DB=compute_db, SCALING_PTR=scaling_ptr, PRECISION=dot_precision(dtype), BM=cfg.BM, BN=cfg.BN,
        BR=padded_rank(R)))
    warps, stages = cfg.num_warps, cfg.num_stages
    grid = (n_splits,)
    f32 = torch.float32
    dy_fp32 = dtype == f32

    def launch(grad_y, lora_B, shrink, scaling):
        grad_shrink = new_matrix(grad_y, M, R)
        # Sizes as arguments, no dtype keyword when dY is fp32: ~1 µs less than new_zeros(shape, dtype=).
        db_part = grad_y.new_zeros(*part_shape) if dy_fp32 else grad_y.new_zeros(*part_shape, dtype=f32)
        runner(lora_grad_ds_db_kernel)(grad_y, lora_B, shrink, grad_shrink, db_part, *ints,
                                       _scalar(scaling, scaling_ptr), tiles, *consts,
                                       grid=grid, warmup=False, num_warps=warps, num_stages=stages)
        LAUNCH_COUNTS["lora_grad_ds_db_kernel"] += 1
        if not compute_db:
            return grad_shrink, None
        return grad_shrink, db_part if n_splits == 1 else db_part.sum(0)
    return launch


def _grad_a_launch(M, K, R, ds_strides, x_strides, dtype, device, has_dropout, p_ptr):
    """``launch(grad_shrink, x, seed, p) -> dA`` [R, K] fp32 = dSᵀ drop(x), reduced over split-M partials."""
    cfg = config("grad_a")
    col_tiles = cdiv(K, cfg.BK)
    n_splits, tiles = split_rows(M, cfg.BM, col_tiles, R * K, device)
    # One split: the buffer is dA itself (split stride R·K, as the [1, R, K] buffer's).
    part_shape = (n_splits, R, K) if n_splits > 1 else (R, K)
    ints = (M, K, R, *ds_strides, *x_strides, R * K, K, 1)
    consts = constexpr_args(_PARAMS["lora_grad_a_kernel"], dict(
        HAS_DROPOUT=has_dropout, P_PTR=p_ptr, PRECISION=dot_precision(dtype), BM=cfg.BM, BK=cfg.BK,
        BR=padded_rank(R)))
    warps, stages = cfg.num_warps, cfg.num_stages
    grid = (col_tiles, n_splits)

    def launch(grad_shrink, x, seed, dropout_p):
        da_part = new_output(part_shape, x, torch.float32)
        runner(lora_grad_a_kernel)(grad_shrink, x, da_part, seed if has_dropout else x, *ints,
                                   _scalar(dropout_p, p_ptr) if has_dropout else 0.0, tiles, *consts,
                                   grid=grid, warmup=False, num_warps=warps, num_stages=stages)
        LAUNCH_COUNTS["lora_grad_a_kernel"] += 1
        return da_part if n_splits == 1 else da_part.sum(0)
    return launch


def lora_grad_ds_db(grad_y, lora_B, shrink, scaling, compute_db=True):
    """(dS [M, r] in dY's dtype, dB [N, r] fp32 or None): one pass over dY."""
    M, N = grad_y.shape
    return _grad_ds_db_launch(M, N, lora_B.shape[1], grad_y.stride(), lora_B.stride(), shrink.stride(),
                              grad_y.dtype, grad_y.device, scaling_ptr=isinstance(scaling, torch.Tensor),
                              compute_db=compute_db)(grad_y, lora_B, shrink, scaling)


def lora_grad_a(grad_shrink, x, seed, dropout_p):
    """dA [r, K] fp32 = dSᵀ drop(x), reduced over split-M partials."""
    M, K = x.shape
    has_dropout = dropout_on(dropout_p)
    return _grad_a_launch(M, K, grad_shrink.shape[1], grad_shrink.stride(), x.stride(), x.dtype, x.device, has_dropout,
                          has_dropout and isinstance(dropout_p, torch.Tensor))(grad_shrink, x, seed, dropout_p)


def _as_dtype(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)  # .to even as a no-op costs a dispatch


def backward_launcher(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed,
                      need_dx: bool, need_dlora: bool, strategy=None, config=None):
    """``run(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed) -> (dX, dA, dB)``:
    ``lora_backward`` for every call with this call's signature (see ``forward_launcher``)."""
    M, K = x.shape
    N, R = lora_B.shape
    strategy = resolve_backward(strategy)
    has_dropout = dropout_on(dropout_p)
    scaling_ptr = isinstance(scaling, torch.Tensor)
    p_ptr = has_dropout and isinstance(dropout_p, torch.Tensor)
    dtype, device = x.dtype, x.device
    ds_db = _grad_ds_db_launch(M, N, R, grad_y.stride(), lora_B.stride(), shrink.stride(), grad_y.dtype, device,
                               scaling_ptr=scaling_ptr, compute_db=need_dlora)
    grad_a = _grad_a_launch(M, K, R, (R, 1), x.stride(), dtype, device, has_dropout, p_ptr) if need_dlora else None
    a_dtype, b_dtype = lora_A.dtype, lora_B.dtype
    dx = None
    if need_dx and strategy == "composite":
        expand = _expand_add_launch(M, K, R, (R, 1), _transposed(lora_A.stride()), grad_y.dtype,
                                    scaling_ptr=False, has_dropout=has_dropout, p_ptr=p_ptr,
                                    cfg_name=config or expand_add_config(M))

        def dx_composite(grad_y, x, weight, lora_A, grad_shrink, seed, dropout_p):
            # dX = dY W0 (the vendor GEMM) + keep/(1-p) ⊙ dS A; A read as Aᵀ [K, R] by its swapped strides.
            return expand(grad_y @ weight, grad_shrink, lora_A, seed, 1.0, dropout_p)
        dx = dx_composite
    elif need_dx:
        # dX = dY (W0ᵀ)ᵀ + keep/(1-p) ⊙ dS (Aᵀ)ᵀ: the forward GEMM reading W0 and A through swapped strides.
        gemm = _gemm_launch(M, K, N, R, grad_y.stride(), _transposed(weight.stride()), 0, (0, 0), (R, 1),
                            _transposed(lora_A.stride()), (K, 1), grad_y.dtype, has_bias=False, scaling_ptr=False,
                            p_ptr=p_ptr, fused_shrink=False, dropout_on_lora_term=has_dropout,
                            cfg_name=config or gemm_config(M, dropout_on_lora_term=has_dropout))

        def dx_fused(grad_y, x, weight, lora_A, grad_shrink, seed, dropout_p):
            grad_x = new_matrix(x, M, K)
            gemm(grad_y, weight, grad_y, grad_y, grad_shrink, lora_A, grad_x, grad_y if seed is None else seed,
                 1.0, _scalar(dropout_p, p_ptr) if has_dropout else 0.0)
            return grad_x
        dx = dx_fused

    def run(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed):
        grad_shrink, grad_b = ds_db(grad_y, lora_B, shrink, scaling)
        grad_x = grad_a_out = None
        if grad_a is not None:
            grad_a_out = _as_dtype(grad_a(grad_shrink, x, seed, dropout_p), a_dtype)
            grad_b = _as_dtype(grad_b, b_dtype)
        if dx is not None:
            grad_x = dx(grad_y, x, weight, lora_A, grad_shrink, seed, dropout_p)
        return grad_x, grad_a_out, grad_b
    return run


def lora_backward(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed,
                  need_dx: bool, need_dlora: bool, strategy=None, config=None):
    """``(dX, dA, dB)`` (None where not needed). Nothing of size out × in is allocated.

    ``strategy`` (dX only; dS/dB/dA are the same kernels in both): "fused" (None) runs
    the Triton dX GEMM with the LoRA term in its prologue; "composite" the vendor GEMM
    dY·W0 and the expand-add of keep/(1-p) ⊙ dS A. ``config``: the dX launch's CONFIGS key.
    """
    return backward_launcher(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed, need_dx,
                             need_dlora, strategy, config)(grad_y, x, weight, lora_A, lora_B, shrink, scaling,
                                                           dropout_p, seed)
