"""Triton kernels for the serving delta: multi-adapter LoRA added into an output the caller computed.

A serving engine runs its own (often quantized) base GEMM, over packed projections
(one ``qkv_proj`` for q|k|v, one ``gate_up_proj`` for gate|up), and adds the LoRA
delta of each row's adapter. With S output slices of widths w_j at offsets o_j, for
row t with adapter i = ids[t] >= 0 of rank r_i and scaling s_i:

    L[t, j, k]              = X[t] A_i[j, k]ᵀ                       k < r_i
    Y[t, o_j : o_j + w_j]  += s_i · Σ_{k<r_i} L[t, j, k] B_i[o_j : o_j + w_j, k]ᵀ

Rows with ids[t] = -1 (or an adapter of rank 0) are left as they are.

The S slices' rank rows form one *stacked rank axis* q of length S · r_max, so the
shrink reads X once for all slices. Two layouts of that axis:

- padded (``lf.add_lora``, vLLM): q = j · r_max + k, valid where k < r_i;
- compact (SGLang's stacked buffers): q = j · r_i + k, valid where q < S · r_i.

Rows reach the kernels through a segment plan (``lora_fused.plan_segments``, the same
chunks as ``kernels/multi_lora.py``: at most BM rows of one adapter per chunk).

Kernels
-------
``lora_delta_shrink_kernel``  PART[split, t, q] = X[t, ks of split] A_i[q, ks]ᵀ over the valid q.
``lora_delta_expand_kernel``  Y[t, o_j + cols] += s_i · L[t, j, :r_i] B_i[o_j + cols, :r_i]ᵀ,
                              a slice axis in the grid; Y is read and written once, in place.

Ranks are clamped to r_max in-kernel (a bad value must never read past a stack),
offsets are int64, accumulation is fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .common import LAUNCH_COUNTS, chunk_rows, dot_precision, interpreting, load_tile, matmul_k_loop, new_output, store_tile

#: Slices one expand launch covers (their end offsets are scalar arguments); more
#: slices take one more launch per group of this many.
MAX_SLICES_PER_LAUNCH = 4


@triton.jit
def lora_delta_shrink_kernel(
    x_ptr, a_ptr, a_offset_ptr, part_ptr, rank_ptr,
    sorted_rows_ptr, chunk_adapter_ptr, chunk_start_ptr, chunk_len_ptr,
    K, K_PER_SPLIT, R_MAX, N_SLICES,
    stride_xm, stride_xk, stride_ai, stride_as, stride_ar, stride_ak, stride_ps, stride_pm, stride_pq,
    COMPACT: tl.constexpr, A_TABLE: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr,
):
    """PART[split, t, q] = X[t, ks] A_i[q, ks]ᵀ for the valid q of the stacked rank axis.

    Grid: ``(chunk capacity, cdiv(S · r_max, BQ), splits)``; program (c, t, p) owns the used
    rank rows ``q in [t*BQ, (t+1)*BQ) ∩ [0, S·r_i)`` of chunk c's adapter i over the K range
    of split p, q = j·r_i + k for slice j, rank row k. Padded: A row
    ``a + i*stride_ai + j*stride_as + k*stride_ar``, PART column j·r_max + k; compact: A row
    ``q*stride_ar``, PART column q. A_TABLE (padded, the slices as separate tensors, vLLM):
    ``a_offset_ptr`` holds each slice's offset in elements from slice 0 (``a_ptr``; multiples of
    16, so loads stay vectorized), the slices sharing their strides. Base chunks, unused slots, rank 0 and tiles past S·r_i
    exit at once; PART entries past r_i are never written (the expand never reads them).
    """
    chunk = tl.program_id(0)
    adapter = tl.load(chunk_adapter_ptr + chunk)
    length = tl.load(chunk_len_ptr + chunk)
    rank_i = tl.minimum(tl.load(rank_ptr + tl.maximum(adapter, 0)), R_MAX)  # never past the stack
    first_q = tl.program_id(1) * BQ
    # Work goes over the S·r_i rank rows the adapter uses (position q = j·r_i + k), whatever
    # the layout: tiles past them exit, so a small rank costs no work in either layout.
    if (adapter >= 0) & (length > 0) & (rank_i > 0) & (first_q < N_SLICES * rank_i):
        rows, row_ok = chunk_rows(sorted_rows_ptr, chunk_start_ptr, chunk_len_ptr, chunk, BM)
        qs = first_q + tl.arange(0, BQ)
        q_ok = qs < N_SLICES * rank_i
        if COMPACT:
            a_rows = qs.to(tl.int64) * stride_ar
            p_cols = qs
        else:  # slice j, rank row k of A[i]; PART column j·r_max + k
            j = qs // rank_i
            k = qs % rank_i
            a_rows = j.to(tl.int64) * stride_as + k.to(tl.int64) * stride_ar
            p_cols = j * R_MAX + k
        if A_TABLE:  # each stacked row from its slice's own tensor (j clamped: masked lanes)
            # the launcher passes offsets that are multiples of 16 elements: aligned vector loads
            offsets = tl.multiple_of(tl.load(a_offset_ptr + tl.minimum(j, N_SLICES - 1)), 16)
            a_rows = offsets + k.to(tl.int64) * stride_ar
        a_base = a_ptr + adapter.to(tl.int64) * stride_ai
        split = tl.program_id(2)
        # A's rows enter the K loop as element offsets (the "columns" of Aᵀ, stride 1).
        acc = matmul_k_loop(tl.zeros((BM, BQ), dtype=tl.float32), x_ptr, rows, row_ok, stride_xm, stride_xk,
                            a_base, a_rows, q_ok, stride_ak, 1,
                            split.to(tl.int64) * K_PER_SPLIT, K_PER_SPLIT, K, x_ptr, 0.0,
                            DROPOUT=False, PRECISION=PRECISION, BK=BK)
        store_tile(part_ptr + split * stride_ps, rows, p_cols, stride_pm, stride_pq, row_ok, q_ok, acc)


@triton.jit
def _slice_bounds(j, END0, END1, END2, END3):
    """(start, end) of output columns of slice j (slice ends given as scalars)."""
    end = tl.where(j == 0, END0, tl.where(j == 1, END1, tl.where(j == 2, END2, END3)))
    start = tl.where(j == 0, 0, tl.where(j == 1, END0, tl.where(j == 2, END1, END2)))
    return start, end


@triton.jit
def lora_delta_expand_kernel(
    part_ptr, b_ptr, b_offset_ptr, b_stride_ptr, scale_ptr, rank_ptr, y_ptr,
    sorted_rows_ptr, chunk_adapter_ptr, chunk_start_ptr, chunk_len_ptr,
    N_TILES, R_MAX, FIRST_SLICE, COL0, END0, END1, END2, END3,
    stride_ps, stride_pm, stride_pq, stride_bi, stride_bn, stride_br, stride_ym, stride_yn,
    COMPACT: tl.constexpr, B_TABLE: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    """Y[t, c] += s_i · Σ_{k<r_i} L[t, j, k] B_i[c, k] for the columns c of slice j, t in a chunk.

    Grid: ``(chunk capacity * N_TILES, slices in this launch)``; program (c·N_TILES + n, j)
    owns the BM × BN tile (rows of chunk c, column tile n of slice FIRST_SLICE + j).
    Slice columns are ``[COL0 + start_j, COL0 + end_j)`` of Y and of B_i's rows; L[t, j, k]
    is PART column ``j·r_max + k`` (padded) or ``j·r_i + k`` (compact), summed over the
    SPLITS fp32 partials. B_TABLE (the slices' B as separate tensors, vLLM): ``b_offset_ptr``
    and ``b_stride_ptr`` hold each slice's offset in elements from slice 0 (``b_ptr``, multiples
    of 16) and its
    adapter stride; B_i's rows are then the slice's own (0 .. w_j). Tiles past a slice's
    width, base chunks and unused slots exit.
    """
    chunk = tl.program_id(0) // N_TILES
    tile_n = tl.program_id(0) % N_TILES
    j = tl.program_id(1)
    adapter = tl.load(chunk_adapter_ptr + chunk)
    length = tl.load(chunk_len_ptr + chunk)
    rank_i = tl.minimum(tl.load(rank_ptr + tl.maximum(adapter, 0)), R_MAX)
    start, end = _slice_bounds(j, END0, END1, END2, END3)
    first_col = start + tile_n * BN
    if (adapter >= 0) & (length > 0) & (rank_i > 0) & (first_col < end):
        rows, row_ok = chunk_rows(sorted_rows_ptr, chunk_start_ptr, chunk_len_ptr, chunk, BM)
        local = (first_col - start).to(tl.int64) + tl.arange(0, BN)  # column within the slice
        cols = COL0 + start + local
        col_ok = cols < COL0 + end
        slice_q = FIRST_SLICE + j
        if COMPACT:
            q0 = slice_q * rank_i
        else:
            q0 = slice_q * R_MAX
        if B_TABLE:
            b_base = b_ptr + tl.multiple_of(tl.load(b_offset_ptr + slice_q), 16) \
                + adapter.to(tl.int64) * tl.load(b_stride_ptr + slice_q)
            b_rows = local
        else:
            b_base = b_ptr + adapter.to(tl.int64) * stride_bi
            b_rows = cols
        lora = tl.zeros((BM, BN), dtype=tl.float32)
        for r0 in range(0, rank_i, BR):  # the expand's K loop stops at this adapter's rank
            ranks = r0 + tl.arange(0, BR)
            rank_ok = ranks < rank_i
            l_ptrs = part_ptr + rows[:, None] * stride_pm + (q0 + ranks)[None, :].to(tl.int64) * stride_pq
            l_mask = row_ok[:, None] & rank_ok[None, :]
            l_tile = tl.load(l_ptrs, mask=l_mask, other=0.0)
            for split in range(1, SPLITS):
                l_tile += tl.load(l_ptrs + split * stride_ps, mask=l_mask, other=0.0)
            b_tile = load_tile(b_base, ranks, b_rows, stride_br, stride_bn, rank_ok, col_ok)
            lora = tl.dot(l_tile.to(b_tile.dtype), b_tile, lora, input_precision=PRECISION)
        lora *= tl.load(scale_ptr + adapter).to(tl.float32)
        y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
        y_mask = row_ok[:, None] & col_ok[None, :]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + lora).to(y_ptr.dtype.element_ty), mask=y_mask)


# --------------------------------------------------------------------------
# Config table and launchers. Validation happens before (lora_fused.ops.delta).
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaConfig:
    """Blocks of one regime; BM is the plan's ``block_rows`` (kernels/multi_lora.py's table)."""
    k_per_split: int   # shrink: K columns per split-K program; 0 = no split
    shrink_BK: int
    shrink_BQ_max: int  # the stacked rank tile: next_pow2(S · r_max), at most this
    expand_BN: int
    expand_BR: int
    num_warps: int = 4
    num_stages: int = 3


# Unmeasured on a GPU. decode: few rows per adapter, the cost is reading A_i and B_i
# once: the shrink is split over K, and BQ up to 128 covers q|k|v at r = 32 in one
# tile (X read once). prefill: BM = 128 rows, so BQ stays at 64 to bound registers.
DELTA_CONFIGS: dict[str, DeltaConfig] = {
    "decode": DeltaConfig(k_per_split=512, shrink_BK=128, shrink_BQ_max=128, expand_BN=128, expand_BR=16),
    "prefill": DeltaConfig(k_per_split=0, shrink_BK=64, shrink_BQ_max=64, expand_BN=128, expand_BR=16,
                           num_warps=8),
    "prefill_cublas": DeltaConfig(k_per_split=0, shrink_BK=64, shrink_BQ_max=64, expand_BN=128, expand_BR=16,
                                  num_warps=8),
}

#: The interpreter runs one program at a time: a K split of 32 exercises the split-K
#: sum, BQ of 16 exercises several stacked rank tiles at the tests' small ranks.
INTERPRETER_DELTA_CONFIGS: dict[str, DeltaConfig] = {
    regime: replace(cfg, k_per_split=min(cfg.k_per_split, 32), shrink_BK=32, shrink_BQ_max=16, expand_BN=32)
    for regime, cfg in DELTA_CONFIGS.items()}


def delta_config(regime: str) -> DeltaConfig:
    table = INTERPRETER_DELTA_CONFIGS if interpreting() else DELTA_CONFIGS
    if regime not in table:
        raise ValueError(f"regime must be one of {sorted(table)}, got {regime!r}")
    return table[regime]


def split_k(K: int, cfg: DeltaConfig) -> tuple[int, int]:
    """(splits, K per split): depends on K only (batch invariance)."""
    if cfg.k_per_split == 0 or K <= cfg.k_per_split:
        return 1, triton.cdiv(K, cfg.shrink_BK) * cfg.shrink_BK
    per_split = triton.cdiv(cfg.k_per_split, cfg.shrink_BK) * cfg.shrink_BK
    return triton.cdiv(K, per_split), per_split


def _chunk_args(plan):
    return tuple(t.contiguous() for t in (plan.sorted_rows, plan.chunk_adapter, plan.chunk_start, plan.chunk_len))


def delta_shrink(x, a, a_strides, n_slices, r_max, compact, ranks, plan, *, zero=False, a_offsets=None):
    """fp32 partials [splits, T, S·r_max] of X A_iᵀ over the stacked rank axis.

    ``a_strides`` = (adapter, slice, rank, k) strides of A; ``ranks`` int32 [n] contiguous;
    ``a_offsets``: int64 [S] element offsets of each slice's own tensor from ``a`` (slice 0;
    padded layout, the slice stride unused)
    ``zero``: start from zeros (a caller that reads every entry), else entries at invalid
    q and at rows without an adapter are left unwritten."""
    T, K = x.shape
    cfg = delta_config(plan.regime)
    splits, per_split = split_k(K, cfg)
    q_total = n_slices * r_max
    shape = (splits, T, q_total)
    part = torch.zeros(shape, device=x.device, dtype=torch.float32) if zero else new_output(shape, x, torch.float32)
    bq = min(max(16, triton.next_power_of_2(q_total)), cfg.shrink_BQ_max)
    grid = (plan.chunk_len.shape[0], triton.cdiv(q_total, bq), splits)
    lora_delta_shrink_kernel[grid](
        x, a, a_offsets if a_offsets is not None else ranks, part, ranks, *_chunk_args(plan),
        K, per_split, r_max, n_slices,
        x.stride(0), x.stride(1), *a_strides, part.stride(0), part.stride(1), part.stride(2),
        COMPACT=compact, A_TABLE=a_offsets is not None, PRECISION=dot_precision(x.dtype),
        BM=plan.block_rows, BK=cfg.shrink_BK, BQ=bq, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    LAUNCH_COUNTS["lora_delta_shrink_kernel"] += 1
    return part


def delta_expand(y, part, b, b_strides, slice_ends, r_max, compact, scalings, ranks, plan, *, b_table=None):
    """Y[:, slice j] += s_i · L_j B_i[slice j]ᵀ in place, one launch per MAX_SLICES_PER_LAUNCH slices.

    ``part`` fp32 [splits, T, S·r_max]; ``b_strides`` = (adapter, out, rank) strides of B;
    ``slice_ends`` the S cumulative widths; ``scalings`` fp32 [n], ``ranks`` int32 [n].
    ``b_table``: (int64 [S] element offsets from ``b``, int64 [S] adapter strides) of the
    slices' own B tensors, ``b`` being slice 0 (``b_strides``' out and rank strides are theirs)."""
    cfg = delta_config(plan.regime)
    n_chunks = plan.chunk_len.shape[0]
    chunk_args = _chunk_args(plan)
    starts = (0,) + tuple(slice_ends[:-1])
    for first in range(0, len(slice_ends), MAX_SLICES_PER_LAUNCH):
        group = range(first, min(first + MAX_SLICES_PER_LAUNCH, len(slice_ends)))
        col0 = starts[first]
        ends = [slice_ends[j] - col0 for j in group]
        widest = max(slice_ends[j] - starts[j] for j in group)
        n_tiles = triton.cdiv(widest, cfg.expand_BN)
        ends += [ends[-1]] * (MAX_SLICES_PER_LAUNCH - len(ends))
        lora_delta_expand_kernel[(n_chunks * n_tiles, len(group))](
            part, b, *(b_table if b_table is not None else (ranks, ranks)), scalings, ranks, y, *chunk_args,
            n_tiles, r_max, first, col0, *ends,
            part.stride(0), part.stride(1), part.stride(2), *b_strides, y.stride(0), y.stride(1),
            COMPACT=compact, B_TABLE=b_table is not None, SPLITS=part.shape[0],
            PRECISION=dot_precision(y.dtype),
            BM=plan.block_rows, BN=cfg.expand_BN, BR=cfg.expand_BR,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        LAUNCH_COUNTS["lora_delta_expand_kernel"] += 1
    return y
