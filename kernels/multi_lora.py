"""Triton kernels for segmented multi-adapter LoRA: one batch, an adapter per row.

Math, for row t with adapter i = ids[t] >= 0 of rank r_i and scaling s_i
(A [n, r_max, K], B [n, N, r_max]; a row with ids[t] = -1 is base only):

    S[t]  = X[t] A_i[:r_i]ᵀ                       Y[t] = X[t] W0ᵀ + b + s_i · S[t] B_i[:, :r_i]ᵀ
    dS[t] = s_i · dY[t] B_i[:, :r_i]              dX[t] = dY[t] W0 + dS[t] A_i[:r_i]
    dB_i  = s_i · Σ_{t∈i} dY[t]ᵀ S[t]             dA_i  = Σ_{t∈i} dS[t]ᵀ X[t]

Rows reach the kernels through a segment plan (``lora_fused.plan_segments``):
``sorted_rows`` lists the rows stably sorted by adapter (base rows last);
segment ``i`` is ``sorted_rows[seg_start[i] : seg_start[i] + seg_len[i]]``
(index n = the base rows); *chunk* c is at most BM rows of one segment:
positions ``[chunk_start[c], chunk_start[c] + chunk_len[c])`` of adapter
``chunk_adapter[c]`` (-1: base rows). The plan's buffers have a fixed
capacity; unused chunk slots have ``chunk_len = 0`` and their programs exit.

Kernels
-------
``multi_lora_shrink_kernel``   L = scale_i · X A_iᵀ per chunk, split over K into
                               fp32 partials (S in the forward, dS = s·dY B in the backward).
``multi_lora_expand_kernel``   OUT = [X Wᵀ + b] + scale_i · L R_iᵀ per chunk: either the whole
                               grouped GEMM (base fused, prefill) or the LoRA term added into
                               a base output computed by cuBLAS (decode). Y and dX.
``multi_lora_segment_grad_kernel``  OUT_i = scale_i · Σ_{t∈i} L[t]ᵀ G[t] per adapter (dA, dB).

Per-adapter rank: the shrink's rank tiles at or past r_i exit at once, the
expand's rank loop stops at r_i, and every rank load is masked by r_i, so
the padding of a small adapter costs neither bytes nor (beyond a 16-wide
tensor-core tile) flops. Ranks are clamped to r_max in-kernel: values are
checked on the host, except while a CUDA graph is captured, and a bad one
must not read past the stacks. Offsets are int64; accumulation is fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .common import (LAUNCH_COUNTS, cdiv, chunk_rows, constexpr_args, dot_precision, grouped_tile, interpreting,
                     keep_launcher, load_tile, matmul_k_loop, new_matrix, new_output, param_names, regime_config,
                     runner, split_rows, store_tile)


@triton.jit
def _rank_tile(l_ptr, rows, row_ok, ranks, rank_ok, stride_ls, stride_lm, stride_lr,
               SPLITS: tl.constexpr):
    """[len(rows), len(ranks)] fp32 tile of L, summing its SPLITS split-K partials in order."""
    ptrs = l_ptr + rows[:, None] * stride_lm + ranks[None, :] * stride_lr
    mask = row_ok[:, None] & rank_ok[None, :]
    tile = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    for split in range(1, SPLITS):
        tile += tl.load(ptrs + split * stride_ls, mask=mask, other=0.0).to(tl.float32)
    return tile


@triton.jit
def multi_lora_shrink_kernel(
    x_ptr, a_ptr, part_ptr, scale_ptr, rank_ptr,
    sorted_rows_ptr, chunk_adapter_ptr, chunk_start_ptr, chunk_len_ptr,
    K, K_PER_SPLIT, R_MAX,
    stride_xm, stride_xk, stride_ai, stride_ar, stride_ak, stride_ps, stride_pm, stride_pr,
    HAS_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    """PART[split, t, :r_i] = scale_i · X[t, ks of split] A_i[:r_i, ks of split]ᵀ for t in a chunk.

    Grid: ``(chunk capacity, cdiv(r_max, BR), splits)``; program (c, j, p) owns
    rank columns ``[j*BR, (j+1)*BR)`` of chunk c's rows over the K range
    ``[p*K_PER_SPLIT, (p+1)*K_PER_SPLIT)``. Base chunks, unused slots and rank
    tiles at or past r_i exit at once (their entries of PART are never read).
    """
    chunk = tl.program_id(0)
    adapter = tl.load(chunk_adapter_ptr + chunk)
    length = tl.load(chunk_len_ptr + chunk)
    rank_i = tl.minimum(tl.load(rank_ptr + tl.maximum(adapter, 0)), R_MAX)  # never past the stack
    first_rank = tl.program_id(1) * BR
    if (adapter >= 0) & (length > 0) & (first_rank < rank_i):
        rows, row_ok = chunk_rows(sorted_rows_ptr, chunk_start_ptr, chunk_len_ptr, chunk, BM)
        ranks = first_rank + tl.arange(0, BR)
        rank_ok = ranks < rank_i
        a_base = a_ptr + adapter.to(tl.int64) * stride_ai
        split = tl.program_id(2)
        acc = matmul_k_loop(tl.zeros((BM, BR), dtype=tl.float32), x_ptr, rows, row_ok, stride_xm, stride_xk,
                            a_base, ranks, rank_ok, stride_ak, stride_ar,
                            split.to(tl.int64) * K_PER_SPLIT, K_PER_SPLIT, K, x_ptr, 0.0,
                            DROPOUT=False, PRECISION=PRECISION, BK=BK)
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + adapter).to(tl.float32)
        store_tile(part_ptr + split * stride_ps, rows, ranks, stride_pm, stride_pr, row_ok, rank_ok, acc)


@triton.jit
def multi_lora_expand_kernel(
    x_ptr, w_ptr, bias_ptr, l_ptr, r_ptr, scale_ptr, rank_ptr, out_ptr,
    sorted_rows_ptr, chunk_adapter_ptr, chunk_start_ptr, chunk_len_ptr,
    N_CHUNKS, N, K, R_MAX,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bias, stride_ls, stride_lm, stride_lr,
    stride_ri, stride_rn, stride_rr, stride_om, stride_on,
    FUSE_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT[t, cols] = base + scale_i · L[t, :r_i] R_i[cols, :r_i]ᵀ for the rows t of a chunk.

    base = X[t] W[cols]ᵀ + bias[cols] computed here when FUSE_BASE (a grouped
    GEMM over the chunks: every row, base chunks included), else OUT[t, cols]
    as found (a base output already written; base chunks are skipped).
    L is read as the sum of its SPLITS fp32 partials.

    Grid: ``(chunk capacity * cdiv(N, BN),)``; each program owns the BM × BN
    tile (rows of chunk c, column tile j) of OUT, visited GROUP_M chunks at a
    time (as the single-adapter GEMM) so their X rows and W's tiles stay in L2.
    """
    chunk, tile_n = grouped_tile(tl.program_id(0), N_CHUNKS * BM, N, BM, BN, GROUP_M)
    adapter = tl.load(chunk_adapter_ptr + chunk)
    length = tl.load(chunk_len_ptr + chunk)
    active = length > 0
    if not FUSE_BASE:
        active = active & (adapter >= 0)  # base rows already hold their output
    if active:
        rows, row_ok = chunk_rows(sorted_rows_ptr, chunk_start_ptr, chunk_len_ptr, chunk, BM)
        cols = tile_n.to(tl.int64) * BN + tl.arange(0, BN)
        col_ok = cols < N
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
        out_mask = row_ok[:, None] & col_ok[None, :]
        if FUSE_BASE:
            acc = matmul_k_loop(tl.zeros((BM, BN), dtype=tl.float32), x_ptr, rows, row_ok, stride_xm, stride_xk,
                                w_ptr, cols, col_ok, stride_wk, stride_wn, 0, K, K, x_ptr, 0.0,
                                DROPOUT=False, PRECISION=PRECISION, BK=BK)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        else:
            acc = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)

        if adapter >= 0:
            rank_i = tl.minimum(tl.load(rank_ptr + adapter), R_MAX)
            r_base = r_ptr + adapter.to(tl.int64) * stride_ri
            lora = tl.zeros((BM, BN), dtype=tl.float32)
            for r0 in range(0, rank_i, BR):  # the K loop of the expand stops at this adapter's rank
                ranks = r0 + tl.arange(0, BR)
                rank_ok = ranks < rank_i
                l_tile = _rank_tile(l_ptr, rows, row_ok, ranks, rank_ok,
                                    stride_ls, stride_lm, stride_lr, SPLITS)
                r_tile = load_tile(r_base, ranks, cols, stride_rr, stride_rn, rank_ok, col_ok)
                lora = tl.dot(l_tile.to(r_tile.dtype), r_tile, lora, input_precision=PRECISION)
            if HAS_SCALE:
                lora *= tl.load(scale_ptr + adapter).to(tl.float32)
            acc += lora
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def multi_lora_segment_grad_kernel(
    g_ptr, l_ptr, out_ptr, scale_ptr, rank_ptr,
    sorted_rows_ptr, seg_start_ptr, seg_len_ptr,
    P, R_MAX,
    stride_gm, stride_gp, stride_ls, stride_lm, stride_lr, stride_om, stride_oi, stride_or, stride_op,
    M_SPLITS, HAS_SCALE: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr,
):
    """OUT[m, i, :, cols] = scale_i · Σ_{t in part m of segment i} L[t, :]ᵀ G[t, cols], zero past r_i.

    dB_i (G = dY, L = S, scale = s_i; OUT strides of [M_SPLITS, n, N, r_max]) and
    dA_i (G = X, L = dS) reduce over the rows of one adapter only; the launcher
    sums the M_SPLITS fp32 partials (split-M: enough programs when few adapters
    hold many rows). Grid: ``(n, cdiv(P, BP), cdiv(R_MAX, BR) * M_SPLITS)``;
    program (i, j, q·M_SPLITS + m) owns OUT[m, i, q-th rank tile, j-th column
    tile] and loops over its part of segment i's rows in order (deterministic,
    no atomics). Rank rows past r_i and adapters with no rows get exact zeros.
    """
    adapter = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BP + tl.arange(0, BP)
    rank_tile = tl.program_id(2) // M_SPLITS
    m_split = tl.program_id(2) % M_SPLITS
    ranks = rank_tile * BR + tl.arange(0, BR)
    col_ok = cols < P
    rank_i = tl.minimum(tl.load(rank_ptr + adapter), R_MAX)
    rank_ok = ranks < rank_i
    seg_start = tl.load(seg_start_ptr + adapter)
    seg_len = tl.load(seg_len_ptr + adapter)
    rows_per_split = tl.cdiv(tl.cdiv(seg_len, M_SPLITS), BM) * BM
    m_begin = m_split * rows_per_split
    m_end = tl.minimum(seg_len, m_begin + rows_per_split)
    if rank_tile * BR >= rank_i:
        m_end = m_begin  # a rank tile wholly past r_i: nothing to reduce, zeros to write
    acc = tl.zeros((BR, BP), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BM):
        offs = m0 + tl.arange(0, BM)
        row_ok = offs < m_end
        rows = tl.load(sorted_rows_ptr + seg_start + offs, mask=row_ok, other=0).to(tl.int64)
        g_tile = load_tile(g_ptr, rows, cols, stride_gm, stride_gp, row_ok, col_ok)
        l_tile = _rank_tile(l_ptr, rows, row_ok, ranks, rank_ok, stride_ls, stride_lm, stride_lr, SPLITS)
        acc = tl.dot(tl.trans(l_tile.to(g_tile.dtype)), g_tile, acc, input_precision=PRECISION)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + adapter).to(tl.float32)
    tl.store(out_ptr + m_split.to(tl.int64) * stride_om + adapter.to(tl.int64) * stride_oi + ranks[:, None] * stride_or
             + cols[None, :] * stride_op, acc, mask=(ranks < R_MAX)[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------
# Config table and launchers. Validation happens before (lora_fused.validation).
# Matrices are read through their strides; the vectors the kernels index by
# adapter, row or chunk (scalings, ranks, the plan's tensors) are made
# contiguous here (a no-op when they are: no copy, no sync, graph-safe).
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MultiConfig:
    """Blocks of one regime. ``block_rows`` is also the plan's chunk size (the kernels' BM)."""
    block_rows: int
    fuse_base: bool          # base GEMM inside the expand (grouped GEMM) or by cuBLAS
    k_per_split: int         # shrink: K columns per split-K program (decode); 0 = no split
    shrink_BK: int
    shrink_BR: int
    expand_BN: int
    expand_BK: int
    expand_BR: int
    grad_BP: int
    grad_BR: int
    GROUP_M: int = 1         # expand: chunks visited together per column sweep (L2 reuse)
    num_warps: int = 4
    num_stages: int = 3


# The one table of multi-adapter block configs, by regime (`regime_for`).
# `tests/kernels/test_gpu_compile.py` compiles every launch of every regime for sm_90 and
# sm_80 (bf16/fp16) and fails on spills, shared memory past the limit or no MMA.
# No tile here was chosen by a timing on a GPU (unmeasured); the compile test's
# registers and shared memory are quoted where they bound a choice.
# decode: few rows per adapter. The base layer is cuBLAS's weight-streaming GEMV;
#   the LoRA cost is reading each adapter's A_i and B_i once, so the shrink is
#   split over K (many programs per adapter) and the expand adds into y.
#   BM = 16 is the smallest tl.dot tile.
# prefill: many rows per adapter: one grouped GEMM over the chunks computes the
#   base and adds the LoRA term in its epilogue (no extra pass over y).
# prefill_cublas: the same tiles, but the base GEMM is cuBLAS's and the expand adds
#   the LoRA term into y (one more read and write of y, a tuned GEMM for the base).
#   regime_for never picks it: a GPU measurement against "prefill" would (bench provider
#   "fused-cublas", bench/providers/multi.py); plan_segments(..., regime="prefill_cublas") selects it.
MULTI_CONFIGS: dict[str, MultiConfig] = {
    "decode": MultiConfig(block_rows=16, fuse_base=False, k_per_split=512, shrink_BK=128, shrink_BR=16,
                          expand_BN=128, expand_BK=0, expand_BR=16, grad_BP=128, grad_BR=16,
                          num_warps=4, num_stages=3),
    "prefill": MultiConfig(block_rows=128, fuse_base=True, k_per_split=0, shrink_BK=64, shrink_BR=64,
                           expand_BN=128, expand_BK=64, expand_BR=16, grad_BP=128, grad_BR=64,
                           GROUP_M=8, num_warps=8, num_stages=3),
    "prefill_cublas": MultiConfig(block_rows=128, fuse_base=False, k_per_split=0, shrink_BK=64, shrink_BR=64,
                                  expand_BN=128, expand_BK=0, expand_BR=16, grad_BP=128, grad_BR=64,
                                  GROUP_M=8, num_warps=8, num_stages=3),
}
#: Batches of at most this many rows use the decode regime.
MULTI_DECODE_MAX_ROWS = 64


def _interpreter_config(cfg: MultiConfig) -> MultiConfig:
    """The interpreter runs one program at a time in numpy: few, mid-size blocks.
    Rank tiles of 16 and a K split of 32 keep the rank-tile exit, the expand's
    rank loop and the split-K sum exercised at the tests' small ranks and widths."""
    k_per_split = min(cfg.k_per_split, 32)
    return replace(cfg, block_rows=min(cfg.block_rows, 32), k_per_split=k_per_split,
                   shrink_BK=min(cfg.shrink_BK, k_per_split or 64), shrink_BR=16,
                   expand_BN=64, expand_BK=min(cfg.expand_BK, 64), expand_BR=16,
                   grad_BP=64, grad_BR=16, GROUP_M=min(cfg.GROUP_M, 2))


INTERPRETER_MULTI_CONFIGS: dict[str, MultiConfig] = {
    regime: _interpreter_config(cfg) for regime, cfg in MULTI_CONFIGS.items()}


def regime_for(num_rows: int) -> str:
    return "decode" if num_rows <= MULTI_DECODE_MAX_ROWS else "prefill"


def multi_config(regime: str) -> MultiConfig:
    return regime_config(regime, MULTI_CONFIGS, INTERPRETER_MULTI_CONFIGS)


def chunk_capacity(num_rows: int, n_adapters: int, block_rows: int) -> int:
    """Chunk slots a plan needs: Σ over non-empty segments of cdiv(len, block) <= this."""
    return cdiv(num_rows, block_rows) + min(n_adapters + 1, num_rows)


def split_k(K: int, cfg: MultiConfig) -> tuple[int, int]:
    """(splits, K per split) of the shrink. Depends on K only, so a row's result
    does not depend on how many rows share its batch (batch invariance)."""
    if cfg.k_per_split == 0 or K <= cfg.k_per_split:
        return 1, cdiv(K, cfg.shrink_BK) * cfg.shrink_BK
    per_split = cdiv(cfg.k_per_split, cfg.shrink_BK) * cfg.shrink_BK
    return cdiv(K, per_split), per_split


def _chunk_args(plan):
    """The plan's chunk tensors, as the shrink and expand kernels index them (slices of one
    1-D buffer: contiguous when the buffer is, checked once instead of four times)."""
    chunks = (plan.sorted_rows, plan.chunk_adapter, plan.chunk_start, plan.chunk_len)
    return chunks if plan.packed.is_contiguous() else tuple(t.contiguous() for t in chunks)


# --------------------------------------------------------------------------
# Launchers. As in ``kernels.lora_linear``: a ``_*_launch`` derives from one call what its
# launch needs that depends only on the call's signature (grid, config, constexprs, int
# arguments) and returns a function of the call's tensors that allocates and launches.
# ``multi_lora_forward`` / ``multi_lora_backward`` keep them by call signature (``_launchers``),
# so a repeated call is a dict lookup, its allocations and its launches (goal H7, bench/goals.py).
# A launch calls ``runner(kernel)`` (``kernel.run``, what ``kernel[grid]`` calls; ``kernels/common.py``),
# the kernel read from this module at launch time, with the constexprs passed positionally
# (``constexpr_args``).
# --------------------------------------------------------------------------


#: Each kernel's parameter names, read at import (see kernels.lora_linear._PARAMS).
_PARAMS = {kernel.fn.__name__: param_names(kernel) for kernel in (
    multi_lora_shrink_kernel, multi_lora_expand_kernel, multi_lora_segment_grad_kernel)}


def _shrink_launch(T, K, r_max, x_strides, a_strides, dtype, n_chunks, has_scale, regime):
    """``launch(x, a_stack, scale, ranks, chunks) -> part``: fp32 split-K partials [splits, T, r_max]
    of scale_i · x A_iᵀ (A_i read as [r, K] by ``a_strides``: adapter, rank, k)."""
    cfg = multi_config(regime)
    splits, per_split = split_k(K, cfg)
    grid = (n_chunks, cdiv(r_max, cfg.shrink_BR), splits)
    ints = (K, per_split, r_max, *x_strides, *a_strides, T * r_max, r_max, 1)  # part: a new contiguous buffer
    consts = constexpr_args(_PARAMS["multi_lora_shrink_kernel"], dict(
        HAS_SCALE=has_scale, PRECISION=dot_precision(dtype), BM=cfg.block_rows, BK=cfg.shrink_BK, BR=cfg.shrink_BR))
    warps, stages = cfg.num_warps, cfg.num_stages
    shape, f32 = (splits, T, r_max), torch.float32

    def launch(x, a_stack, scale, ranks, chunks):
        part = new_output(shape, x, f32)
        runner(multi_lora_shrink_kernel)(x, a_stack, part, scale.contiguous() if has_scale else ranks, ranks, *chunks,
                                         *ints, *consts, grid=grid, warmup=False, num_warps=warps, num_stages=stages)
        LAUNCH_COUNTS["multi_lora_shrink_kernel"] += 1
        return part
    return launch


def _expand_launch(T, N, K, x_strides, w_strides, bias_stride, part_shape, r_strides, dtype, n_chunks,
                   has_bias, has_scale, regime):
    """``launch(out, x, w, bias, part, r_stack, scale, ranks, chunks) -> out``: OUT = [x wᵀ + b] +
    scale_i · L R_iᵀ (R_i read as [N, r] by ``r_strides``); OUT's strides are read per call."""
    cfg = multi_config(regime)
    splits, _, r_max = part_shape
    grid = (n_chunks * cdiv(N, cfg.expand_BN),)
    ints = (n_chunks, N, K, r_max, *x_strides, *w_strides, bias_stride, T * r_max, r_max, 1, *r_strides)
    consts = constexpr_args(_PARAMS["multi_lora_expand_kernel"], dict(
        FUSE_BASE=cfg.fuse_base, HAS_BIAS=has_bias, HAS_SCALE=has_scale, SPLITS=splits,
        PRECISION=dot_precision(dtype), BM=cfg.block_rows, BN=cfg.expand_BN, BK=max(cfg.expand_BK, 16),
        BR=cfg.expand_BR, GROUP_M=cfg.GROUP_M))
    warps, stages = cfg.num_warps, cfg.num_stages

    def launch(out, x, w, bias, part, r_stack, scale, ranks, chunks):
        runner(multi_lora_expand_kernel)(x, w, bias if has_bias else x, part, r_stack,
                                         scale.contiguous() if has_scale else ranks, ranks, out, *chunks, *ints,
                                         *out.stride(), *consts, grid=grid, warmup=False, num_warps=warps,
                                         num_stages=stages)
        LAUNCH_COUNTS["multi_lora_expand_kernel"] += 1
        return out
    return launch


def _contiguous_part(part):
    if part.stride() != (part.shape[1] * part.shape[2], part.shape[2], 1):
        part = part.contiguous()
    return part


def multi_lora_shrink(x, a_stack, a_strides, scale, ranks, plan, regime):
    """fp32 split-K partials [splits, T, r_max] of scale_i · x A_iᵀ (A_i given as [r, K] by ``a_strides``)."""
    T, K = x.shape
    return _shrink_launch(T, K, a_stack.shape[a_strides[3]], x.stride(), a_strides[:3], x.dtype,
                          plan.chunk_len.shape[0], scale is not None, regime)(
        x, a_stack, scale, ranks.contiguous(), _chunk_args(plan))


def multi_lora_expand(out, x, w_nk, bias, part, r_stack, r_strides, scale, ranks, plan, regime):
    """OUT = [x w_nkᵀ + b] + scale_i · L R_iᵀ, R_i given as [N, r] by ``r_strides``.

    With the regime's ``fuse_base`` the base GEMM is computed here over every row;
    otherwise ``out`` must already hold the base output and only adapter rows change.
    """
    T, K = x.shape
    part = _contiguous_part(part)
    return _expand_launch(T, out.shape[1], K, x.stride(), w_nk.stride(), bias.stride(0) if bias is not None else 0,
                          tuple(part.shape), r_strides, x.dtype, plan.chunk_len.shape[0], bias is not None,
                          scale is not None, regime)(
        out, x, w_nk, bias, part, r_stack, scale, ranks.contiguous(), _chunk_args(plan))


def _segment_grad_launch(T, P, n, r_max, g_strides, part_shape, part_strides, out_shape, irp, dtype, device,
                         has_scale, regime):
    """``launch(g, part, scale, ranks, segs) -> OUT`` fp32 ``out_shape``: OUT[i] = scale_i · Σ_{t∈i} L[t]ᵀ G[t];
    ``irp`` orders OUT's dims as (i, r, p) (``segs``: the plan's sorted_rows, seg_start, seg_len)."""
    cfg = multi_config(regime)
    tiles = (n, cdiv(P, cfg.grad_BP), cdiv(r_max, cfg.grad_BR))
    m_splits, _ = split_rows(T, cfg.block_rows, tiles[0] * tiles[1] * tiles[2], n * r_max * P, device)
    inner = (out_shape[1] * out_shape[2], out_shape[2], 1)  # OUT[m] contiguous
    split_stride = out_shape[0] * inner[0]
    # One split: the buffer is OUT itself (its split stride as the [1, ...] buffer's: never stepped).
    shape = (m_splits, *out_shape) if m_splits > 1 else out_shape
    ints = (P, r_max, *g_strides, *part_strides, split_stride, inner[irp[0]], inner[irp[1]], inner[irp[2]], m_splits)
    consts = constexpr_args(_PARAMS["multi_lora_segment_grad_kernel"], dict(
        HAS_SCALE=has_scale, SPLITS=part_shape[0], PRECISION=dot_precision(dtype), BM=cfg.block_rows,
        BP=cfg.grad_BP, BR=cfg.grad_BR))
    warps, stages = cfg.num_warps, cfg.num_stages
    grid = (tiles[0], tiles[1], tiles[2] * m_splits)
    f32 = torch.float32

    def launch(g, part, scale, ranks, segs):
        out = new_output(shape, g, f32)
        runner(multi_lora_segment_grad_kernel)(g, part, out, scale.contiguous() if has_scale else ranks, ranks, *segs,
                                               *ints, *consts, grid=grid, warmup=False, num_warps=warps,
                                               num_stages=stages)
        LAUNCH_COUNTS["multi_lora_segment_grad_kernel"] += 1
        return out.sum(0) if m_splits > 1 else out
    return launch


#: (i, r, p) order of OUT's dims: dB [n, N, r] (p = N) and dA [n, r, K] (p = K).
_DB_IRP, _DA_IRP = (0, 2, 1), (0, 1, 2)


def _seg_args(plan):
    return plan.sorted_rows.contiguous(), plan.seg_start.contiguous(), plan.seg_len.contiguous()


def forward_launcher(x, weight, bias, lora_A, lora_B, regime, n_chunks):
    """``run(x, weight, bias, lora_A, lora_B, scalings, ranks, plan) -> (y, S partials)``:
    ``multi_lora_forward`` for every call with this call's signature (shapes, strides, dtype,
    device, bias or not, regime, the plan's chunk capacity) and TF32 setting."""
    T, K = x.shape
    N = weight.shape[0]
    r_max = lora_A.shape[1]
    cfg = multi_config(regime)
    dtype = x.dtype
    shrink = _shrink_launch(T, K, r_max, x.stride(), lora_A.stride(), dtype, n_chunks, False, regime)
    splits = split_k(K, cfg)[0]
    # B_i [N, r] as given: strides (adapter, n, r).
    expand = _expand_launch(T, N, K, x.stride(), weight.stride(), bias.stride(0) if bias is not None else 0,
                            (splits, T, r_max), lora_B.stride(), dtype, n_chunks, bias is not None, True, regime)
    fuse_base = cfg.fuse_base
    linear = torch.nn.functional.linear

    def run(x, weight, bias, lora_A, lora_B, scalings, ranks, plan):
        chunks = _chunk_args(plan)
        ranks = ranks.contiguous()
        part = shrink(x, lora_A, None, ranks, chunks)
        y = new_matrix(x, T, N) if fuse_base else linear(x, weight, bias)
        return expand(y, x, weight, bias, part, lora_B, scalings, ranks, chunks), part
    return run


#: Launchers by call signature (``multi_lora_forward`` / ``multi_lora_backward``): bounded by
#: ``kernels.common.LAUNCHERS_MAX`` (``keep_launcher``).
_launchers: dict = {}


def multi_lora_forward(x, weight, bias, lora_A, lora_B, scalings, ranks, plan, regime):
    """``(y, S partials)`` for 2-D x [T, K], T >= 1. ``scalings`` fp32 [n], ``ranks`` int32 [n]."""
    n_chunks = plan.chunk_len.shape[0]
    key = ("forward", regime, interpreting(), dot_precision(x.dtype), x.dtype, x.device, n_chunks, x.shape,
           x.stride(), weight.shape, weight.stride(), None if bias is None else bias.stride(), lora_A.shape,
           lora_A.stride(), lora_B.stride())
    run = _launchers.get(key)
    if run is None:
        run = keep_launcher(_launchers, key, forward_launcher(x, weight, bias, lora_A, lora_B, regime, n_chunks))
    return run(x, weight, bias, lora_A, lora_B, scalings, ranks, plan)


def backward_launcher(grad_y, x, weight, lora_A, lora_B, s_part, regime, n_chunks, need_dx, need_dlora):
    """``run(grad_y, x, weight, lora_A, lora_B, scalings, ranks, s_part, plan) -> (dX, dA, dB)``:
    ``multi_lora_backward`` for every call with this call's signature (see ``forward_launcher``)."""
    T, K = x.shape
    N = weight.shape[0]
    n, r_max = lora_A.shape[0], lora_A.shape[1]
    cfg = multi_config(regime)
    dtype, device = x.dtype, x.device
    splits = split_k(N, cfg)[0]
    b_s, a_s = lora_B.stride(), lora_A.stride()
    ds_shrink = _shrink_launch(T, N, r_max, grad_y.stride(), (b_s[0], b_s[2], b_s[1]), grad_y.dtype, n_chunks, True,
                               regime)  # B_iᵀ [r, N]: the dS shrink's operand
    ds_shape = (splits, T, r_max)
    if need_dlora:
        grad_b = _segment_grad_launch(T, N, n, r_max, grad_y.stride(), tuple(s_part.shape), s_part.stride(),
                                      (n, N, r_max), _DB_IRP, grad_y.dtype, device, True, regime)
        grad_a = _segment_grad_launch(T, K, n, r_max, x.stride(), ds_shape, (T * r_max, r_max, 1),
                                      (n, r_max, K), _DA_IRP, dtype, device, False, regime)
    a_dtype, b_dtype = lora_A.dtype, lora_B.dtype
    fuse_base = cfg.fuse_base
    if need_dx:
        # dX = dY (W0ᵀ)ᵀ + dS A_i: the forward expand reading W0 through swapped strides; A_i read as [K, r].
        dx_expand = _expand_launch(T, K, N, grad_y.stride(), (weight.stride(1), weight.stride(0)), 0, ds_shape,
                                   (a_s[0], a_s[2], a_s[1]), grad_y.dtype, n_chunks, False, False, regime)

    def run(grad_y, x, weight, lora_A, lora_B, scalings, ranks, s_part, plan):
        chunks = _chunk_args(plan)
        ranks = ranks.contiguous()
        ds_part = ds_shrink(grad_y, lora_B, scalings, ranks, chunks)
        grad_x = grad_a_out = grad_b_out = None
        if need_dlora:
            segs = _seg_args(plan)
            grad_b_out = grad_b(grad_y, s_part, scalings, ranks, segs)
            grad_b_out = grad_b_out if grad_b_out.dtype == b_dtype else grad_b_out.to(b_dtype)
            grad_a_out = grad_a(x, ds_part, None, ranks, segs)
            grad_a_out = grad_a_out if grad_a_out.dtype == a_dtype else grad_a_out.to(a_dtype)
        if need_dx:
            grad_x = new_matrix(x, T, K) if fuse_base else grad_y @ weight
            dx_expand(grad_x, grad_y, weight, None, ds_part, lora_A, None, ranks, chunks)
        return grad_x, grad_a_out, grad_b_out
    return run


def multi_lora_backward(grad_y, x, weight, lora_A, lora_B, scalings, ranks, s_part, plan, regime,
                        need_dx: bool, need_dlora: bool):
    """``(dX, dA, dB)`` (None where not needed); dA/dB are zero for absent adapters and padding."""
    n_chunks = plan.chunk_len.shape[0]
    key = ("backward", regime, interpreting(), dot_precision(x.dtype), x.dtype, x.device, n_chunks, need_dx,
           need_dlora, grad_y.shape, grad_y.stride(), x.stride(), weight.shape, weight.stride(), lora_A.shape,
           lora_A.stride(), lora_B.stride(), s_part.shape, s_part.stride(), lora_A.dtype, lora_B.dtype)
    run = _launchers.get(key)
    if run is None:
        run = keep_launcher(_launchers, key, backward_launcher(grad_y, x, weight, lora_A, lora_B, s_part, regime,
                                                               n_chunks, need_dx, need_dlora))
    return run(grad_y, x, weight, lora_A, lora_B, scalings, ranks, s_part, plan)
