"""Triton kernels for grouped (mixture-of-experts) LoRA: one LoRA per expert of a 3-D weight.

Math, for sorted pair j of expert e (W_e [N, K] = [out, in], A_e [R, K], B_e [N, R], s):

    S[j]  = drop(X[j]) A_eᵀ                   Y[j]  = X[j] W_eᵀ + b_e + s · S[j] B_eᵀ
    dS[j] = s · dY[j] B_e                     dX[j] = dY[j] W_e + keep/(1-p) ⊙ (dS[j] A_e)
    dB_e  = s · Σ_{j∈e} dY[j]ᵀ S[j]           dA_e  = Σ_{j∈e} dS[j]ᵀ drop(X[j])

X[j] is ``x[rows[j]]`` (``rows`` None: ``x[j]``): x is read through the row table, never
gathered into a [P, K] copy by these kernels. The pairs are sorted by expert: expert e owns
positions ``[offsets[e-1], offsets[e])`` (``offsets`` int32 [E], inclusive ends, as
``torch._grouped_mm``'s ``offs``); positions at or past ``offsets[-1]`` are sentinel pairs
(expert-parallel ids outside [0, E)): Y = 0, S = 0, dX = 0, nothing to dA or dB.
The dropout keep-mask is element (j, c) of the [P, K] matrix drop(X_sorted), drawn by
``kernels.common.dropout_keep`` as the dense kernels draw theirs. No kernel forms B_e A_e.

The *chunk table* (``chunk_table``: one launch of ``moe_chunk_table_kernel`` on ``offsets``,
no host sync) cuts the E expert segments and the sentinel tail into row tiles of at most BM
pairs: int32 [3, capacity] rows (expert, start, length), expert -1 for the sentinel tail,
length 0 for unused slots. capacity = cdiv(P, BM) + E + 1 bounds the tile count for any
offsets (each of the E + 1 segments adds at most one partial tile), so every grid depends on
(P, E) only.

Kernels
-------
``moe_chunk_table_kernel``        the chunk table and the clamped segment ends, from ``offsets``.
``moe_lora_shrink_kernel``        L = scale · drop(X) R_eᵀ per row tile: S (R_e = A_e) in the forward,
                                  dS (X = dY, R_e = B_eᵀ, scale s) in the backward; fp32 [P, R].
``moe_lora_expand_kernel``        OUT = [X W_eᵀ] + b_e + scale · L R_eᵀ (⊙ keep/(1-p)) per row tile:
                                  with FUSE_BASE the whole grouped GEMM (strategy "fused"), else
                                  the epilogue added into the vendor grouped GEMM's output
                                  (strategy "grouped_mm"). Y and dX; zero rows for sentinels.
``moe_lora_segment_grad_kernel``  OUT_e = scale · Σ_{j∈e} L[j]ᵀ G[j] over expert e's rows only
                                  (split-M fp32 partials, no atomics): dB (G = dY, L = S) and
                                  dA (G = drop(X) through the row table, L = dS).

Strategies (``kernels/host.py``: GROUPED_STRATEGIES): "fused" (the Triton grouped GEMM above
with the LoRA term in its epilogue, forward and dX) and "grouped_mm" (the base through torch's
vendor grouped GEMM, ``torch.nn.functional.grouped_mm`` or ``torch._grouped_mm``, on x's rows
gathered for that GEMM only, then the expand as an in-place epilogue). "grouped_mm" runs only
where that GEMM runs for the device and dtype (``grouped_mm_runs``, probed once) and accepts
the operands' layouts (``grouped_mm_accepts``); elsewhere a call asking for it runs "fused".
Which one a call should run is ``lora_fused.dispatch.tuning.choose_grouped``'s measurement.
Offsets are int64 in-kernel; accumulation is fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from . import common
from .common import (LAUNCH_COUNTS, cdiv, constexpr_args, dot_precision, dropout_keep, grouped_tile, interpreting,
                     keep_launcher, load_tile, matmul_k_loop, new_output, padded_rank, param_names, regime_config,
                     runner, split_rows, store_tile)
from .host import GROUPED_STRATEGIES


@triton.jit
def _tile_positions(table_ptr, chunk, CAPACITY, BM: tl.constexpr):
    """(expert, length, positions int64 [BM], pos_ok) of row tile ``chunk`` of a chunk table."""
    expert = tl.load(table_ptr + chunk)
    start = tl.load(table_ptr + CAPACITY + chunk).to(tl.int64)
    length = tl.load(table_ptr + 2 * CAPACITY + chunk)
    offs = tl.arange(0, BM)
    return expert, length, start + offs, offs < length


@triton.jit
def _x_rows(rows_ptr, positions, pos_ok, HAS_ROWS: tl.constexpr):
    """The x row each sorted position reads: ``rows[j]`` (HAS_ROWS), else j itself."""
    if HAS_ROWS:
        return tl.load(rows_ptr + positions, mask=pos_ok, other=0).to(tl.int64)
    return positions


@triton.jit
def moe_chunk_table_kernel(
    offsets_ptr, table_ptr, ends_ptr, E, P, CAPACITY,
    BLOCK_ROWS: tl.constexpr, BE: tl.constexpr, BT: tl.constexpr,
):
    """The chunk table of ``offsets`` (see the module docstring) and ends = offsets clamped to [0, P].

    Segment g < E is expert g's positions [ends[g-1], ends[g]); segment E is the sentinel tail
    [ends[E-1], P). Each program loads the E offsets (BE >= E + 1, a power of two) and takes the
    prefix sum of the segments' tile counts, so it knows where its segment's tiles go. Grid:
    ``(E + 2,)``; program g <= E writes segment g's tiles (expert g, or -1 for the tail; start;
    length) and ends[g]; program E + 1 marks the slots past the last tile unused (-1, 0, 0).
    """
    me = tl.program_id(0)
    seg = tl.arange(0, BE)
    ends = tl.load(offsets_ptr + seg, mask=seg < E, other=P).to(tl.int32)
    starts = tl.load(offsets_ptr + seg - 1, mask=(seg > 0) & (seg <= E), other=0).to(tl.int32)
    ends = tl.minimum(tl.maximum(ends, 0), P)
    starts = tl.minimum(tl.maximum(starts, 0), P)
    lengths = tl.where(seg <= E, tl.maximum(ends - starts, 0), 0)  # a decreasing offset: an empty segment
    tiles = (lengths + BLOCK_ROWS - 1) // BLOCK_ROWS
    tile_end = tl.cumsum(tiles, 0)
    if me <= E:
        mine = seg == me
        first = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
        count = tl.sum(tl.where(mine, tiles, 0), 0)
        start = tl.sum(tl.where(mine, starts, 0), 0)
        length = tl.sum(tl.where(mine, lengths, 0), 0)
        expert = tl.where(me < E, me, -1)
        for t0 in range(0, count, BT):
            t = t0 + tl.arange(0, BT)
            ok = t < count
            tl.store(table_ptr + first + t, tl.zeros((BT,), dtype=tl.int32) + expert, mask=ok)
            tl.store(table_ptr + CAPACITY + first + t, start + t * BLOCK_ROWS, mask=ok)
            tl.store(table_ptr + 2 * CAPACITY + first + t, tl.minimum(length - t * BLOCK_ROWS, BLOCK_ROWS), mask=ok)
        if me < E:
            tl.store(ends_ptr + me, tl.sum(tl.where(mine, ends, 0), 0))
    else:
        for s0 in range(tl.sum(tiles, 0), CAPACITY, BT):
            slots = s0 + tl.arange(0, BT)
            ok = slots < CAPACITY
            zero = tl.zeros((BT,), dtype=tl.int32)
            tl.store(table_ptr + slots, zero - 1, mask=ok)
            tl.store(table_ptr + CAPACITY + slots, zero, mask=ok)
            tl.store(table_ptr + 2 * CAPACITY + slots, zero, mask=ok)


@triton.jit
def moe_lora_shrink_kernel(
    x_ptr, rows_ptr, r_ptr, out_ptr, seed_ptr, table_ptr,
    CAPACITY, K, R,
    stride_xm, stride_xk, stride_re, stride_rr, stride_rk, stride_om, stride_or,
    scale, dropout_p,
    HAS_ROWS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    """OUT[j, ranks] = scale · drop(X[j]) R_e[ranks]ᵀ for the positions j of a row tile (fp32).

    X[j] = x[rows[j]] (HAS_ROWS) or x[j]; R_e is read as [R, K] through its strides (expert,
    rank, k). DROPOUT: X's tile times the keep-mask of element (j, k) of a [P, K] matrix, the
    sum divided by 1 - p once. Grid: ``(capacity, cdiv(R, BR))``; program (c, q) owns rank
    columns ``[q·BR, (q+1)·BR)`` of tile c's rows; the sentinel tile writes zeros, unused
    slots exit.
    """
    expert, length, positions, pos_ok = _tile_positions(table_ptr, tl.program_id(0), CAPACITY, BM)
    ranks = tl.program_id(1) * BR + tl.arange(0, BR)
    rank_ok = ranks < R
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    if (expert >= 0) & (length > 0):
        x_rows = _x_rows(rows_ptr, positions, pos_ok, HAS_ROWS)
        r_base = r_ptr + expert.to(tl.int64) * stride_re
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK).to(tl.int64)
            k_ok = ks < K
            x_tile = load_tile(x_ptr, x_rows, ks, stride_xm, stride_xk, pos_ok, k_ok)
            if DROPOUT:  # keyed by the sorted position, not by the x row: a token twice draws twice
                x_tile = tl.where(dropout_keep(seed_ptr, positions, ks, K, dropout_p), x_tile, 0.0)
            r_tile = load_tile(r_base, ks, ranks, stride_rk, stride_rr, k_ok, rank_ok)
            acc = tl.dot(x_tile, r_tile, acc, input_precision=PRECISION)
        if DROPOUT:
            acc = acc * (scale / (1.0 - dropout_p))
        else:
            acc = acc * scale
    store_tile(out_ptr, positions, ranks, stride_om, stride_or, pos_ok, rank_ok, acc)


@triton.jit
def moe_lora_expand_kernel(
    x_ptr, rows_ptr, w_ptr, bias_ptr, l_ptr, r_ptr, out_ptr, seed_ptr, table_ptr,
    CAPACITY, N, K, R,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_bn,
    stride_lm, stride_lr, stride_re, stride_rn, stride_rr, stride_om, stride_on,
    scale, dropout_p,
    HAS_ROWS: tl.constexpr, FUSE_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    DROPOUT_ON_LORA_TERM: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT[j, cols] = scale · L[j] R_e[cols]ᵀ + base + b_e[cols] for the positions j of a row tile.

    base = X[j] W_e[cols]ᵀ (W_e read as [N, K] through its strides: expert, n, k) when
    FUSE_BASE, a grouped GEMM over the row tiles; else OUT[j, cols] as found (the vendor
    grouped GEMM's output), read and rewritten in place. L [P, R] fp32 is S or dS; R_e is
    read as [N, R] (expert, n, r), BR ranks at a time. DROPOUT_ON_LORA_TERM (the dX pass):
    the LoRA term times keep/(1-p) of element (j, n) of a [P, N] matrix, the mask the
    forward's shrink drew at (j, k). Sentinel tiles write zeros (both strategies).

    Grid: ``(capacity · cdiv(N, BN),)``; each program owns the BM × BN tile (rows of tile c,
    column tile t) of OUT, visited GROUP_M row tiles at a time (as the dense GEMM) so their X
    rows and W_e's columns stay in L2. Unused slots exit.
    """
    chunk, tile_n = grouped_tile(tl.program_id(0), CAPACITY * BM, N, BM, BN, GROUP_M)
    expert, length, positions, pos_ok = _tile_positions(table_ptr, chunk, CAPACITY, BM)
    if length > 0:
        cols = tile_n.to(tl.int64) * BN + tl.arange(0, BN)
        col_ok = cols < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if expert >= 0:
            # The LoRA term first, its mask included, and the base added to it: the base tile (the
            # vendor GEMM's, or the K loop's accumulator) is never live beside Philox's state.
            e64 = expert.to(tl.int64)
            if HAS_LORA:
                r_base = r_ptr + e64 * stride_re
                for r0 in range(0, R, BR):
                    ranks = r0 + tl.arange(0, BR)
                    rank_ok = ranks < R
                    l_tile = load_tile(l_ptr, positions, ranks, stride_lm, stride_lr, pos_ok, rank_ok)
                    r_tile = load_tile(r_base, ranks, cols, stride_rr, stride_rn, rank_ok, col_ok)
                    acc = tl.dot(l_tile.to(r_tile.dtype), r_tile, acc, input_precision=PRECISION)
                if DROPOUT_ON_LORA_TERM:
                    acc = acc * tl.where(dropout_keep(seed_ptr, positions, cols, N, dropout_p),
                                         scale / (1.0 - dropout_p), 0.0)
                else:
                    acc = acc * scale
            if FUSE_BASE:
                x_rows = _x_rows(rows_ptr, positions, pos_ok, HAS_ROWS)
                acc = matmul_k_loop(acc, x_ptr, x_rows, pos_ok, stride_xm, stride_xk,
                                    w_ptr + e64 * stride_we, cols, col_ok, stride_wk, stride_wn, 0, K, K, x_ptr, 0.0,
                                    DROPOUT=False, PRECISION=PRECISION, BK=BK)
            else:
                acc += load_tile(out_ptr, positions, cols, stride_om, stride_on, pos_ok, col_ok).to(tl.float32)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + e64 * stride_be + cols * stride_bn, mask=col_ok, other=0.0
                               ).to(tl.float32)[None, :]
        store_tile(out_ptr, positions, cols, stride_om, stride_on, pos_ok, col_ok, acc)


@triton.jit
def moe_lora_segment_grad_kernel(
    g_ptr, rows_ptr, l_ptr, out_ptr, seed_ptr, ends_ptr,
    P_COLS, R,
    stride_gm, stride_gp, stride_lm, stride_lr, stride_os, stride_oe, stride_or, stride_op,
    scale, dropout_p, M_SPLITS,
    HAS_ROWS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr,
):
    """OUT[m, e, ranks, cols] = scale · Σ_{j in part m of expert e's rows} L[j, ranks]ᵀ drop(G[j, cols]).

    G[j] = g[rows[j]] (HAS_ROWS: x for dA) or g[j] (dY for dB); L [P, R] fp32 (dS or S).
    DROPOUT: G's tile times the keep-mask of element (j, c) of a [P, P_COLS] matrix, the sum
    divided by 1 - p once. Expert e's rows are positions ``[ends[e-1], ends[e])``; an expert
    with none writes exact zeros. Grid: ``(E, cdiv(P_COLS, BP), cdiv(R, BR) · M_SPLITS)``;
    program (e, t, q·M_SPLITS + m) owns OUT[m, e, q-th rank tile, t-th column tile] and loops
    over its part of the segment in order (deterministic, no atomics); the launcher sums the
    M_SPLITS fp32 partials.
    """
    expert = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BP + tl.arange(0, BP)
    rank_tile = tl.program_id(2) // M_SPLITS
    m_split = tl.program_id(2) % M_SPLITS
    ranks = rank_tile * BR + tl.arange(0, BR)
    col_ok = cols < P_COLS
    rank_ok = ranks < R
    seg_end = tl.load(ends_ptr + expert).to(tl.int64)
    seg_start = tl.where(expert > 0, tl.load(ends_ptr + tl.maximum(expert - 1, 0)).to(tl.int64), 0)
    seg_len = seg_end - seg_start
    rows_per_split = tl.cdiv(tl.cdiv(seg_len, M_SPLITS), BM) * BM
    m_begin = m_split * rows_per_split
    m_end = tl.minimum(seg_len, m_begin + rows_per_split)
    acc = tl.zeros((BR, BP), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BM):
        offs = m0 + tl.arange(0, BM)
        pos_ok = offs < m_end
        positions = seg_start + offs
        g_tile = load_tile(g_ptr, _x_rows(rows_ptr, positions, pos_ok, HAS_ROWS), cols, stride_gm, stride_gp,
                           pos_ok, col_ok)
        if DROPOUT:
            g_tile = tl.where(dropout_keep(seed_ptr, positions, cols, P_COLS, dropout_p), g_tile, 0.0)
        l_tile = load_tile(l_ptr, positions, ranks, stride_lm, stride_lr, pos_ok, rank_ok)
        acc = tl.dot(tl.trans(l_tile.to(g_tile.dtype)), g_tile, acc, input_precision=PRECISION)
    if DROPOUT:
        acc = acc * (scale / (1.0 - dropout_p))
    else:
        acc = acc * scale
    store_tile(out_ptr + m_split.to(tl.int64) * stride_os + expert.to(tl.int64) * stride_oe, ranks, cols,
               stride_or, stride_op, rank_ok, col_ok, acc)


# --------------------------------------------------------------------------
# Config table
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MoEConfig:
    """Blocks of one regime. ``block_rows`` is the chunk table's tile (every kernel's BM)."""
    block_rows: int
    shrink_BK: int
    shrink_BR: int      # largest rank tile of the shrink (a wider rank takes several programs)
    expand_BN: int
    expand_BK: int
    expand_BR: int      # rank step of the expand's LoRA loop
    grad_BP: int
    grad_BR: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3


# The one table of grouped block configs, by regime (``moe_regime``). tests/kernels/test_gpu_compile.py
# compiles every launch of both launchers in each regime for sm_90 and sm_80 and fails on spills,
# shared memory past the limit or no tensor-core instruction. Unmeasured on a GPU.
# decode: few pairs per expert (P <= MOE_DECODE_MAX_PAIRS): BM = 16, the smallest tl.dot tile, so
#   an expert's one or two pairs do not pad a 64-row tile; the GEMM streams W_e. dA / dB tiles of
#   64 columns: at 128, the 64-rank fp32 accumulator beside the Philox mask took 224 registers
#   (4 warps, sm_90; 123 at 64).
# prefill: BM = 64 (the smallest Hopper wgmma M): a training step of 512 tokens top-8 over 64
#   experts averages 64 pairs per expert, so a larger tile would be mostly padding.
MOE_CONFIGS: dict[str, MoEConfig] = {
    "decode": MoEConfig(block_rows=16, shrink_BK=128, shrink_BR=64, expand_BN=64, expand_BK=128, expand_BR=16,
                        grad_BP=64, grad_BR=64, GROUP_M=1, num_warps=4, num_stages=3),
    "prefill": MoEConfig(block_rows=64, shrink_BK=64, shrink_BR=64, expand_BN=128, expand_BK=64, expand_BR=32,
                         grad_BP=128, grad_BR=64, GROUP_M=8, num_warps=8, num_stages=3),
}
#: Problems of at most this many pairs take the decode tiles.
MOE_DECODE_MAX_PAIRS = 64


def _interpreter_config(cfg: MoEConfig) -> MoEConfig:
    """The interpreter runs one program at a time in numpy: mid-size blocks; rank tiles of 16
    and GROUP_M 2 keep the rank loops and the grouped order exercised at the tests' sizes."""
    return replace(cfg, block_rows=min(cfg.block_rows, 16), shrink_BK=32, shrink_BR=16, expand_BN=32,
                   expand_BK=32, expand_BR=16, grad_BP=32, grad_BR=16, GROUP_M=min(cfg.GROUP_M, 2))


INTERPRETER_MOE_CONFIGS: dict[str, MoEConfig] = {name: _interpreter_config(c) for name, c in MOE_CONFIGS.items()}


def moe_regime(num_pairs: int) -> str:
    return "decode" if num_pairs <= MOE_DECODE_MAX_PAIRS else "prefill"


def moe_config(regime: str) -> MoEConfig:
    return regime_config(regime, MOE_CONFIGS, INTERPRETER_MOE_CONFIGS)


def chunk_capacity(num_pairs: int, num_experts: int, block_rows: int) -> int:
    """Row-tile slots of a chunk table: the E expert segments and the sentinel tail each add at
    most one partial tile to cdiv(P, BM)."""
    return cdiv(num_pairs, block_rows) + num_experts + 1


#: Tile slots a chunk-table program writes per store (its loops step this many).
TABLE_BT = 128
#: What a poisoned int32 output starts as (tests: common.POISON_OUTPUTS).
_INT_POISON = -(1 << 30)


def _table_launch(P: int, E: int, block_rows: int):
    """``launch(offsets) -> (table int32 [3, capacity], ends int32 [E])``: one launch of
    ``moe_chunk_table_kernel`` on offsets' device, no host sync (the torch ops it replaced, ~30
    small ones, cost ~240 µs of host time a call on CPU)."""
    capacity = chunk_capacity(P, E, block_rows)
    consts = constexpr_args(_PARAMS["moe_chunk_table_kernel"], dict(
        BLOCK_ROWS=block_rows, BE=max(16, 1 << E.bit_length()), BT=TABLE_BT))
    grid = (E + 2,)
    i32 = torch.int32

    def launch(offsets):
        table, ends = offsets.new_empty(3, capacity, dtype=i32), offsets.new_empty(E, dtype=i32)
        if common.POISON_OUTPUTS:  # NaN has no int32: a value no table entry can hold
            table.fill_(_INT_POISON), ends.fill_(_INT_POISON)
        runner(moe_chunk_table_kernel)(offsets.contiguous(), table, ends, E, P, capacity, *consts,
                                       grid=grid, warmup=False, num_warps=4, num_stages=1)
        LAUNCH_COUNTS["moe_chunk_table_kernel"] += 1
        return table, ends
    return launch


def chunk_table(offsets: torch.Tensor, num_pairs: int, block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table int32 [3, capacity], ends int32 [E]) of ``offsets`` (``moe_chunk_table_kernel``).

    ends = offsets clamped to [0, P] (a bad offset cannot send a kernel past the pairs);
    segment e is positions [ends[e-1], ends[e]), segment E the sentinel tail [ends[-1], P).
    Table rows: each row tile's expert (-1: the sentinel tail), first position and length
    (0: an unused slot), as ``lora_fused.dispatch.segments.plan_segments`` cuts its segments.
    """
    return _table_launch(num_pairs, offsets.shape[0], block_rows)(offsets)


# --------------------------------------------------------------------------
# The vendor grouped GEMM
# --------------------------------------------------------------------------

#: torch's grouped GEMM: the public name where this torch has it, else the private op.
VENDOR_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
#: Whether VENDOR_GROUPED_MM ran on a probe, by (device type, index, dtype).
_PROBED: dict = {}


def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM runs on ``device`` for ``dtype``: a tiny aligned call, tried
    once per (device, dtype) and remembered (on CUDA only outside graph capture and tracing:
    there the answer is "no" for this call, and the probe runs on a later one)."""
    key = (device.type, device.index, dtype)
    known = _PROBED.get(key)
    if known is not None:
        return known
    if VENDOR_GROUPED_MM is None:
        _PROBED[key] = False
        return False
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return False
    try:
        a = torch.ones(32, 16, device=device, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device, dtype=dtype)
        out = VENDOR_GROUPED_MM(a, b.transpose(-2, -1), offs=torch.tensor([16, 24], device=device, dtype=torch.int32))
        runs = tuple(out.shape) == (32, 16) and out.dtype == dtype
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        runs = False
    _PROBED[key] = runs
    return runs


def _vendor_layout_ok(mat: torch.Tensor) -> bool:
    """Whether ``mat``'s last two dims have a layout the grouped GEMM takes (one unit stride, the
    other a multiple of 16 bytes, at a 16-byte aligned start): torch's own checks
    (``_meta_grouped_mm_common`` in torch/_meta_registrations.py) and the CUDA kernels' alignment."""
    size = mat.element_size()
    align = 16 // size
    (d0, d1), (s0, s1) = mat.shape[-2:], mat.stride()[-2:]
    if (mat.storage_offset() * size) % 16:
        return False
    if s0 == 1 and s1 >= max(1, d0):
        return s1 % align == 0
    if s1 == 1 and s0 >= max(1, d1):
        return s0 % align == 0
    return False


def grouped_mm_accepts(mat_a_cols: int, mat_b: torch.Tensor) -> bool:
    """Whether the grouped GEMM takes a contiguous [P, mat_a_cols] left operand and ``mat_b``
    ([E, K, N] view) for their dtype and device."""
    return (mat_a_cols * mat_b.element_size()) % 16 == 0 and _vendor_layout_ok(mat_b) \
        and grouped_mm_runs(mat_b.device, mat_b.dtype)


def resolve_grouped(strategy: Optional[str], mat_a_cols: int, mat_b: torch.Tensor) -> str:
    """The strategy that runs: None is "fused" (the launchers' default); "grouped_mm" where the
    vendor GEMM does not take this problem runs "fused" (the same numbers, a Triton base)."""
    strategy = "fused" if strategy is None else strategy
    if strategy not in GROUPED_STRATEGIES:
        raise ValueError(f"grouped strategy must be one of {GROUPED_STRATEGIES}, got {strategy!r}")
    if strategy == "grouped_mm" and not grouped_mm_accepts(mat_a_cols, mat_b):
        return "fused"
    return strategy


def grouped_candidates(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    """The strategies the measured choice times for a forward + backward over ``weight`` [E, N, K]
    with x's dtype: "fused" always, "grouped_mm" where the vendor GEMM takes both directions."""
    K = weight.shape[2]
    vendor = grouped_mm_accepts(K, weight.transpose(-2, -1)) and grouped_mm_accepts(weight.shape[1], weight)
    return ["fused", "grouped_mm"] if vendor else ["fused"]


# --------------------------------------------------------------------------
# Launchers. As in kernels/lora_linear.py: a ``_*_launch`` derives from one call what its
# launch needs that depends only on the call's signature (grid, config, constexprs, ints) and
# returns a function of the call's tensors that allocates and launches; the public launchers
# keep them by call signature (``_launchers``), so a repeated call costs a tuple key, one dict
# lookup, its allocations and its launches (the chunk table's first).
# --------------------------------------------------------------------------

_PARAMS = {kernel.fn.__name__: param_names(kernel) for kernel in (
    moe_chunk_table_kernel, moe_lora_shrink_kernel, moe_lora_expand_kernel, moe_lora_segment_grad_kernel)}


def _shrink_launch(P, K, R, x_strides, r_strides, dtype, capacity, *, has_rows, dropout, regime):
    """``launch(x, rows, r_stack, seed, table, scale, p) -> L`` fp32 [P, R] = scale·drop(X) R_eᵀ,
    R_e read as [R, K] by ``r_strides`` (expert, rank, k)."""
    cfg = moe_config(regime)
    BR = min(padded_rank(R), max(16, cfg.shrink_BR))
    grid = (capacity, cdiv(R, BR))
    ints = (capacity, K, R, *x_strides, *r_strides, R, 1)  # L: a new contiguous [P, R]
    consts = constexpr_args(_PARAMS["moe_lora_shrink_kernel"], dict(
        HAS_ROWS=has_rows, DROPOUT=dropout, PRECISION=dot_precision(dtype), BM=cfg.block_rows, BK=cfg.shrink_BK,
        BR=BR))
    warps, stages = cfg.num_warps, cfg.num_stages
    f32 = torch.float32

    def launch(x, rows, r_stack, seed, table, scale, dropout_p):
        out = new_output((P, R), x, f32)
        runner(moe_lora_shrink_kernel)(x, rows if has_rows else x, r_stack, out, seed if dropout else x, table,
                                       *ints, scale, dropout_p if dropout else 0.0, *consts,
                                       grid=grid, warmup=False, num_warps=warps, num_stages=stages)
        LAUNCH_COUNTS["moe_lora_shrink_kernel"] += 1
        return out
    return launch


def _expand_launch(P, N, K, R, x_strides, w_strides, bias_strides, r_strides, dtype, capacity, *,
                   has_rows, fuse_base, has_bias, has_lora, dropout, regime):
    """``launch(out, x, rows, w, bias, l, r_stack, seed, table, scale, p) -> out``: OUT = [X W_eᵀ] +
    b_e + scale·L R_eᵀ (W_e read as [N, K] by ``w_strides``, R_e as [N, R] by ``r_strides``);
    OUT's strides are read per call (a vendor GEMM's output, or a new buffer)."""
    cfg = moe_config(regime)
    grid = (capacity * cdiv(N, cfg.expand_BN),)
    ints = (capacity, N, K, R, *x_strides, *w_strides, *bias_strides, R, 1, *r_strides)
    consts = constexpr_args(_PARAMS["moe_lora_expand_kernel"], dict(
        HAS_ROWS=has_rows, FUSE_BASE=fuse_base, HAS_BIAS=has_bias, HAS_LORA=has_lora,
        DROPOUT_ON_LORA_TERM=dropout, PRECISION=dot_precision(dtype), BM=cfg.block_rows, BN=cfg.expand_BN,
        BK=cfg.expand_BK, BR=min(padded_rank(max(R, 1)), cfg.expand_BR), GROUP_M=cfg.GROUP_M))
    warps, stages = cfg.num_warps, cfg.num_stages

    def launch(out, x, rows, w, bias, l_pr, r_stack, seed, table, scale, dropout_p):
        runner(moe_lora_expand_kernel)(x, rows if has_rows else x, w, bias if has_bias else x,
                                       l_pr if has_lora else x, r_stack if has_lora else x, out,
                                       seed if dropout else x, table, *ints, *out.stride(), scale,
                                       dropout_p if dropout else 0.0, *consts,
                                       grid=grid, warmup=False, num_warps=warps, num_stages=stages)
        LAUNCH_COUNTS["moe_lora_expand_kernel"] += 1
        return out
    return launch


def _segment_grad_launch(P, P_COLS, E, R, g_strides, out_irp, dtype, device, *, has_rows, dropout, regime):
    """``launch(g, rows, l, seed, ends, scale, p) -> OUT`` fp32: OUT[e] = scale·Σ_{j∈e} L[j]ᵀ drop(G[j]),
    laid out [E, R, P_COLS] (``out_irp`` (0, 1, 2): dA) or [E, P_COLS, R] ((0, 2, 1): dB)."""
    cfg = moe_config(regime)
    BR = min(padded_rank(R), max(16, cfg.grad_BR))
    tiles = (E, cdiv(P_COLS, cfg.grad_BP), cdiv(R, BR))
    m_splits, _ = split_rows(P, cfg.block_rows, tiles[0] * tiles[1] * tiles[2], E * R * P_COLS, device)
    out_shape = tuple((E, R, P_COLS)[i] for i in out_irp)
    inner = (out_shape[1] * out_shape[2], out_shape[2], 1)  # OUT[m] contiguous, in out_shape's order
    by_erp = [0, 0, 0]
    for dim, axis in enumerate(out_irp):
        by_erp[axis] = inner[dim]
    split_stride = E * R * P_COLS
    shape = (m_splits, *out_shape) if m_splits > 1 else out_shape
    ints = (P_COLS, R, *g_strides, R, 1, split_stride, *by_erp)
    consts = constexpr_args(_PARAMS["moe_lora_segment_grad_kernel"], dict(
        HAS_ROWS=has_rows, DROPOUT=dropout, PRECISION=dot_precision(dtype), BM=cfg.block_rows, BP=cfg.grad_BP,
        BR=BR))
    warps, stages = cfg.num_warps, cfg.num_stages
    grid = (tiles[0], tiles[1], tiles[2] * m_splits)
    f32 = torch.float32

    def launch(g, rows, l_pr, seed, ends, scale, dropout_p):
        out = new_output(shape, g, f32)
        runner(moe_lora_segment_grad_kernel)(g, rows if has_rows else g, l_pr, out, seed if dropout else g, ends,
                                             *ints, scale, dropout_p if dropout else 0.0, m_splits, *consts,
                                             grid=grid, warmup=False, num_warps=warps, num_stages=stages)
        LAUNCH_COUNTS["moe_lora_segment_grad_kernel"] += 1
        return out.sum(0) if m_splits > 1 else out
    return launch


#: (e, r, p) order of OUT's dims: dA [E, R, K], dB [E, N, R].
_DA_IRP, _DB_IRP = (0, 1, 2), (0, 2, 1)


def _check(x, rows, weight, bias, lora_A, lora_B, offsets) -> int:
    """P, the number of sorted pairs, after shape checks naming the argument (run once per call
    signature: the launcher caches key on the shapes)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [N, in], got shape {tuple(x.shape)}")
    if rows is not None and (rows.dim() != 1 or rows.dtype != torch.int64):
        raise ValueError(f"rows must be int64 [P] or None, got {rows.dtype} {tuple(rows.shape)}")
    if weight.dim() != 3 or weight.shape[2] != x.shape[1]:
        raise ValueError(f"weight must be [E, out, in] with in = x's {x.shape[1]}, got {tuple(weight.shape)}")
    E, N, K = weight.shape
    if offsets.dim() != 1 or offsets.shape[0] != E or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be int32 [E] = [{E}], got {offsets.dtype} {tuple(offsets.shape)}")
    if bias is not None and tuple(bias.shape) != (E, N):
        raise ValueError(f"bias must be [E, out] = [{E}, {N}], got {tuple(bias.shape)}")
    if lora_A is not None:
        R = lora_A.shape[1] if lora_A.dim() == 3 else -1
        if lora_A.dim() != 3 or lora_A.shape[0] != E or lora_A.shape[2] != K:
            raise ValueError(f"lora_A must be [E, r, in] = [{E}, r, {K}], got {tuple(lora_A.shape)}")
        if tuple(lora_B.shape) != (E, N, R):
            raise ValueError(f"lora_B must be [E, out, r] = [{E}, {N}, {R}], got {tuple(lora_B.shape)}")
    return rows.shape[0] if rows is not None else x.shape[0]


def _forward_launcher(x, rows, weight, bias, lora_A, lora_B, offsets, dropout, strategy):
    """``run(x, rows, weight, bias, lora_A, lora_B, offsets, scaling, p, seed) -> (y, S | None)``
    for every call with this call's signature; ``lora_A`` None: the base alone."""
    P = _check(x, rows, weight, bias, lora_A, lora_B, offsets)
    E, N, K = weight.shape
    has_lora = lora_A is not None
    R = lora_A.shape[1] if has_lora else 0
    dtype, has_rows, has_bias = x.dtype, rows is not None, bias is not None
    if P == 0:
        def run_empty(x, rows, weight, bias, lora_A, lora_B, offsets, scaling, dropout_p, seed):
            return x.new_zeros(0, N), (x.new_zeros(0, R, dtype=torch.float32) if has_lora else None)
        return run_empty
    regime = moe_regime(P)
    block = moe_config(regime).block_rows
    capacity = chunk_capacity(P, E, block)
    strategy = resolve_grouped(strategy, K, weight.transpose(-2, -1))
    vendor = strategy == "grouped_mm"
    chunk_tiles = _table_launch(P, E, block)
    if has_lora:
        shrink = _shrink_launch(P, K, R, x.stride(), lora_A.stride(), dtype, capacity, has_rows=has_rows,
                                dropout=dropout, regime=regime)
    expand = _expand_launch(P, N, K, R, x.stride(), weight.stride(), bias.stride() if has_bias else (0, 0),
                            lora_B.stride() if has_lora else (0, 0, 0), dtype, capacity, has_rows=has_rows,
                            fuse_base=not vendor, has_bias=has_bias, has_lora=has_lora, dropout=False,
                            regime=regime)
    vendor_mm = VENDOR_GROUPED_MM

    def run(x, rows, weight, bias, lora_A, lora_B, offsets, scaling, dropout_p, seed):
        table, ends = chunk_tiles(offsets)
        s = shrink(x, rows, lora_A, seed, table, 1.0, dropout_p) if has_lora else None
        if vendor:  # x's rows gathered for the vendor GEMM only; rows past ends[-1] are its garbage
            x_sorted = x.index_select(0, rows) if has_rows else x.contiguous()
            y = vendor_mm(x_sorted, weight.transpose(-2, -1), offs=ends)
        else:
            y = new_output((P, N), x)
        return expand(y, x, rows, weight, bias, s, lora_B, None, table, float(scaling), 0.0), s
    return run


def _backward_launcher(grad_y, x, rows, weight, lora_A, lora_B, S, offsets, dropout, need_dx, need_dlora, strategy):
    """``run(grad_y, x, rows, weight, lora_A, lora_B, S, offsets, scaling, p, seed) -> (dx, dA, dB)``."""
    P = _check(x, rows, weight, None, lora_A, lora_B, offsets)
    E, N, K = weight.shape
    R = lora_A.shape[1]
    if tuple(grad_y.shape) != (P, N) or tuple(S.shape) != (P, R):
        raise ValueError(f"grad_y must be [P, out] = [{P}, {N}] and S [P, r] = [{P}, {R}], got "
                         f"{tuple(grad_y.shape)} and {tuple(S.shape)}")
    a_dtype, b_dtype = lora_A.dtype, lora_B.dtype
    if not (need_dx or need_dlora):
        return lambda *args: (None, None, None)
    if P == 0:
        def run_empty(grad_y, x, rows, weight, lora_A, lora_B, S, offsets, scaling, dropout_p, seed):
            return (x.new_zeros(0, K) if need_dx else None, torch.zeros_like(lora_A) if need_dlora else None,
                    torch.zeros_like(lora_B) if need_dlora else None)
        return run_empty
    regime = moe_regime(P)
    block = moe_config(regime).block_rows
    capacity = chunk_capacity(P, E, block)
    dtype, has_rows, device = x.dtype, rows is not None, x.device
    b_s, a_s, w_s = lora_B.stride(), lora_A.stride(), weight.stride()
    # dS = s·dY B_e: the shrink reading B_e [N, R] as [R, N] (expert, rank, n strides).
    ds_shrink = _shrink_launch(P, N, R, grad_y.stride(), (b_s[0], b_s[2], b_s[1]), grad_y.dtype, capacity,
                               has_rows=False, dropout=False, regime=regime)
    if need_dlora:
        grad_b = _segment_grad_launch(P, N, E, R, grad_y.stride(), _DB_IRP, grad_y.dtype, device, has_rows=False,
                                      dropout=False, regime=regime)
        grad_a = _segment_grad_launch(P, K, E, R, x.stride(), _DA_IRP, dtype, device, has_rows=has_rows,
                                      dropout=dropout, regime=regime)
    vendor = False
    if need_dx:
        strategy = resolve_grouped(strategy, N, weight)
        vendor = strategy == "grouped_mm" and grad_y.stride(1) == 1 and _vendor_layout_ok(grad_y)
        # dX = dY W_e + keep/(1-p) ⊙ dS A_e: the forward's expand reading W_e as [K, N] (expert, k, n
        # strides) and A_e [R, K] as [K, R] (expert, k, r).
        dx_expand = _expand_launch(P, K, N, R, grad_y.stride(), (w_s[0], w_s[2], w_s[1]), (0, 0),
                                   (a_s[0], a_s[2], a_s[1]), grad_y.dtype, capacity, has_rows=False,
                                   fuse_base=not vendor, has_bias=False, has_lora=True, dropout=dropout,
                                   regime=regime)
    vendor_mm = VENDOR_GROUPED_MM
    chunk_tiles = _table_launch(P, E, block)

    def run(grad_y, x, rows, weight, lora_A, lora_B, S, offsets, scaling, dropout_p, seed):
        table, ends = chunk_tiles(offsets)
        scaling = float(scaling)
        ds = ds_shrink(grad_y, None, lora_B, None, table, scaling, 0.0)
        grad_x = grad_a_out = grad_b_out = None
        if need_dlora:
            grad_b_out = grad_b(grad_y, None, S, None, ends, scaling, 0.0)
            grad_a_out = grad_a(x, rows, ds, seed, ends, 1.0, dropout_p)
            grad_b_out = grad_b_out if grad_b_out.dtype == b_dtype else grad_b_out.to(b_dtype)
            grad_a_out = grad_a_out if grad_a_out.dtype == a_dtype else grad_a_out.to(a_dtype)
        if need_dx:
            grad_x = vendor_mm(grad_y, weight, offs=ends) if vendor else new_output((P, K), grad_y)
            dx_expand(grad_x, grad_y, None, weight, None, ds, lora_A, seed, table, 1.0, dropout_p)
        return grad_x, grad_a_out, grad_b_out
    return run


#: Launchers by call signature, bounded by ``kernels.common.LAUNCHERS_MAX`` (``keep_launcher``).
_launchers: dict = {}


def _keep(key, strategy, weight, run):
    """``run``, kept for ``key`` unless it asked for "grouped_mm" before the vendor GEMM could be probed
    on weight's device and dtype (graph capture, tracing): then it ran "fused" for this call only."""
    if strategy != "grouped_mm" or (weight.device.type, weight.device.index, weight.dtype) in _PROBED:
        keep_launcher(_launchers, key, run)
    return run


def _signature(*tensors) -> tuple:
    """Shapes, strides, dtypes and 16-byte alignment (the vendor GEMM's condition) of the operands."""
    return tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.storage_offset() * t.element_size() % 16)
                 for t in tensors)


def grouped_lora_forward(x, rows, weight, bias, lora_A, lora_B, offsets, scaling: float, dropout_p: float,
                         seed: Optional[torch.Tensor], strategy: Optional[str] = None):
    """``(y [P, out] in x's dtype, S [P, r] fp32)`` over the pairs sorted by expert.

    x [N_x, in] (any strides); rows int64 [P] (pair j reads x[rows[j]]) or None (x is [P, in]);
    weight [E, out, in] (any strides: a transposed view is read as it is); bias [E, out] | None;
    lora_A [E, r, in]; lora_B [E, out, r]; offsets int32 [E] inclusive segment ends; seed int64
    [1] when dropout_p > 0. S = drop(x_sorted) Aᵀ unscaled, for the backward; pairs past
    offsets[-1] get y = 0 and S = 0. ``strategy``: "fused" (None) or "grouped_mm".
    """
    dropout = dropout_p > 0.0
    key = ("forward", strategy, interpreting(), dot_precision(x.dtype), x.device, dropout,
           _signature(x, rows, weight, bias, lora_A, lora_B, offsets))
    run = _launchers.get(key)
    if run is None:
        run = _keep(key, strategy, weight, _forward_launcher(x, rows, weight, bias, lora_A, lora_B, offsets, dropout,
                                                             strategy))
    return run(x, rows, weight, bias, lora_A, lora_B, offsets, scaling, dropout_p, seed)


def grouped_lora_backward(grad_y, x, rows, weight, lora_A, lora_B, S, offsets, scaling: float, dropout_p: float,
                          seed: Optional[torch.Tensor], need_dx: bool, need_dlora: bool,
                          strategy: Optional[str] = None):
    """``(dx_pairs [P, in] | None, dA [E, r, in] | None, dB [E, out, r] | None)``.

    dx_pairs is per sorted pair (in grad_y's dtype; the caller index_adds it into dx);
    dA and dB are accumulated in fp32 over each expert's rows only and returned in lora_A's /
    lora_B's dtype; experts with no rows get exact zeros, pairs past offsets[-1] contribute
    nothing (their dx rows are 0). S is ``grouped_lora_forward``'s.
    """
    dropout = dropout_p > 0.0
    key = ("backward", strategy, interpreting(), dot_precision(x.dtype), x.device, dropout, need_dx, need_dlora,
           _signature(grad_y, x, rows, weight, lora_A, lora_B, S, offsets))
    run = _launchers.get(key)
    if run is None:
        run = _keep(key, strategy, weight, _backward_launcher(grad_y, x, rows, weight, lora_A, lora_B, S, offsets,
                                                              dropout, need_dx, need_dlora, strategy))
    return run(grad_y, x, rows, weight, lora_A, lora_B, S, offsets, scaling, dropout_p, seed)


def grouped_linear_forward(x, rows, weight, bias, offsets, strategy: Optional[str] = None):
    """``y [P, out]`` = x_sorted W_eᵀ + b_e in x's dtype (the base alone: a parameter without LoRA);
    pairs past offsets[-1] get 0. Arguments as ``grouped_lora_forward``'s."""
    key = ("linear", strategy, interpreting(), dot_precision(x.dtype), x.device,
           _signature(x, rows, weight, bias, offsets))
    run = _launchers.get(key)
    if run is None:
        run = _keep(key, strategy, weight, _forward_launcher(x, rows, weight, bias, None, None, offsets, False,
                                                             strategy))
    return run(x, rows, weight, bias, None, None, offsets, 1.0, 0.0, None)[0]
