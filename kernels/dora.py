"""Triton kernels of DoRA (weight-decomposed LoRA) around the LoRA kernels.

DoRA's forward is LoRA's GEMMs plus three small pieces, each one pass over its data:

    dora_norm_kernel        norm[o] = sqrt(max(0, ‖W0[o]‖² + 2s·(W0 Aᵀ)[o]·B[o] + s²·(B G)[o]·B[o]))
                            with B G = B (A Aᵀ) [out, r] given (fp32, two skinny products on the
                            host side): one read of W0, never W0 + s·B A
    dora_scale_cols_kernel  OUT = U ⊙ c[col] (+ bias[col]) (+ BASE): the per-column scale epilogue
    dora_grad_scale_kernel  G = dY ⊙ c[col] and partial[split, col] = Σ_rows dY ⊙ U (dm's sum)
    dora_dropout_mix_kernel OUT = BASE + keep/(1-p) ⊙ (OTHER - BASE) (OTHER / BASE absent: 0), with
                            the keep-mask of ``common.dropout_keep`` (the LoRA kernels' Philox mask)

Every sum is in fp32. Host wrappers allocate the outputs and launch; they take 2-D
tensors of any strides.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import LAUNCH_COUNTS, dot_precision, dropout_keep, load_tile, new_output, padded_rank, store_tile

#: (BLOCK_ROWS, BLOCK_K) of the norm kernel by padded rank: rows of W0 per program, columns per
#: step (the [rows, r] fp32 accumulator and the B, B G tiles live in registers: fewer rows at r > 64).
NORM_BLOCKS = {16: (32, 64), 32: (32, 64), 64: (32, 64), 128: (16, 64), 256: (16, 32)}
#: (BM, BN) of the elementwise kernels.
ELEMENTWISE_BLOCKS = (32, 64)
#: Row tiles per program of the dm reduction (a split-M reduction into fp32 partials).
GRAD_ROW_TILES = 8


@triton.jit
def dora_norm_kernel(w_ptr, a_ptr, b_ptr, bg_ptr, norm_ptr, N, K, R, scaling,
                     stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                     stride_bgn, stride_bgr,
                     PRECISION: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """norm[rows] for a block of BN rows of W0 [N, K] (see the module docstring)."""
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    row_ok = rows < N
    ranks = tl.arange(0, BR)
    rank_ok = ranks < R
    w_sq = tl.zeros((BN,), dtype=tl.float32)
    wa = tl.zeros((BN, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK).to(tl.int64)
        k_ok = ks < K
        w_tile = load_tile(w_ptr, rows, ks, stride_wn, stride_wk, row_ok, k_ok)
        w32 = w_tile.to(tl.float32)
        w_sq += tl.sum(w32 * w32, axis=1)
        a_tile = load_tile(a_ptr, ks, ranks, stride_ak, stride_ar, k_ok, rank_ok)  # Aᵀ [BK, BR]
        wa = tl.dot(w_tile, a_tile, wa, input_precision=PRECISION)
    b_tile = load_tile(b_ptr, rows, ranks, stride_bn, stride_br, row_ok, rank_ok).to(tl.float32)
    bg = load_tile(bg_ptr, rows, ranks, stride_bgn, stride_bgr, row_ok, rank_ok)
    cross = tl.sum(wa * b_tile, axis=1)
    quad = tl.sum(bg * b_tile, axis=1)
    sq = w_sq + 2.0 * scaling * cross + scaling * scaling * quad
    tl.store(norm_ptr + rows, tl.sqrt(tl.maximum(sq, 0.0)), mask=row_ok)


@triton.jit
def dora_scale_cols_kernel(u_ptr, c_ptr, bias_ptr, base_ptr, out_ptr, M, N,
                           stride_um, stride_un, stride_c, stride_bias, stride_basem, stride_basen,
                           stride_om, stride_on,
                           HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr):
    """OUT = U ⊙ c[col] (+ bias[col]) (+ BASE), in fp32 then cast to OUT's dtype."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < M, cols < N
    acc = load_tile(u_ptr, rows, cols, stride_um, stride_un, row_ok, col_ok).to(tl.float32)
    acc *= tl.load(c_ptr + cols * stride_c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BASE:
        acc += load_tile(base_ptr, rows, cols, stride_basem, stride_basen, row_ok, col_ok).to(tl.float32)
    store_tile(out_ptr, rows, cols, stride_om, stride_on, row_ok, col_ok, acc)


@triton.jit
def dora_grad_scale_kernel(dy_ptr, u_ptr, c_ptr, g_ptr, part_ptr, M, N,
                           stride_dym, stride_dyn, stride_um, stride_un, stride_c,
                           stride_gm, stride_gn, stride_pp, stride_pn,
                           ROW_TILES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """G = dY ⊙ c[col] over this program's ROW_TILES row tiles, and
    partial[program row, cols] = Σ over those rows of dY ⊙ U (fp32)."""
    split = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    col_ok = cols < N
    c = tl.load(c_ptr + cols * stride_c, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for t in range(ROW_TILES):
        rows = (split.to(tl.int64) * ROW_TILES + t) * BM + tl.arange(0, BM)
        row_ok = rows < M
        dy = load_tile(dy_ptr, rows, cols, stride_dym, stride_dyn, row_ok, col_ok).to(tl.float32)
        u = load_tile(u_ptr, rows, cols, stride_um, stride_un, row_ok, col_ok).to(tl.float32)
        acc += tl.sum(dy * u, axis=0)
        store_tile(g_ptr, rows, cols, stride_gm, stride_gn, row_ok, col_ok, dy * c[None, :])
    tl.store(part_ptr + split * stride_pp + cols * stride_pn, acc, mask=col_ok)


@triton.jit
def dora_dropout_mix_kernel(base_ptr, other_ptr, out_ptr, seed_ptr, M, K, dropout_p,
                            stride_bm, stride_bk, stride_om_in, stride_ok_in, stride_om, stride_ok,
                            HAS_BASE: tl.constexpr, HAS_OTHER: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr):
    """OUT = BASE + keep/(1-p) ⊙ (OTHER - BASE); keep of element (row, col) of an [M, K] matrix."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < M, cols < K
    base = tl.zeros((BM, BN), dtype=tl.float32)
    other = tl.zeros((BM, BN), dtype=tl.float32)
    if HAS_BASE:
        base = load_tile(base_ptr, rows, cols, stride_bm, stride_bk, row_ok, col_ok).to(tl.float32)
    if HAS_OTHER:
        other = load_tile(other_ptr, rows, cols, stride_om_in, stride_ok_in, row_ok, col_ok).to(tl.float32)
    keep = dropout_keep(seed_ptr, rows, cols, K, dropout_p)
    out = tl.where(keep, base + (other - base) * (1.0 / (1.0 - dropout_p)), base)
    store_tile(out_ptr, rows, cols, stride_om, stride_ok, row_ok, col_ok, out)


# --------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------
def row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 [out]: ‖W0[o] + s·(B A)[o]‖₂ without forming B A (A Aᵀ is r × r, B A Aᵀ is out × r)."""
    N, K = weight.shape
    R = lora_A.shape[0]
    a32 = lora_A.float()
    bg = torch.mm(lora_B.float(), torch.mm(a32, a32.t()))  # B (A Aᵀ) [out, r], fp32
    norm = new_output((N,), weight, torch.float32)
    BN, BK = NORM_BLOCKS[padded_rank(R)]
    LAUNCH_COUNTS["dora_norm_kernel"] += 1
    dora_norm_kernel[(triton.cdiv(N, BN),)](
        weight, lora_A, lora_B, bg, norm, N, K, R, float(scaling),
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), bg.stride(0), bg.stride(1),
        PRECISION=dot_precision(weight.dtype), BN=BN, BK=BK, BR=padded_rank(R), num_warps=4, num_stages=3)
    return norm


def scale_cols(u: torch.Tensor, col_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
               base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """U ⊙ c[col] (+ bias) (+ base) as a new tensor in U's dtype."""
    M, N = u.shape
    out = new_output((M, N), u)
    BM, BN = ELEMENTWISE_BLOCKS
    LAUNCH_COUNTS["dora_scale_cols_kernel"] += 1
    dora_scale_cols_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        u, col_scale, bias if bias is not None else u, base if base is not None else u, out, M, N,
        u.stride(0), u.stride(1), col_scale.stride(0), bias.stride(0) if bias is not None else 0,
        base.stride(0) if base is not None else 0, base.stride(1) if base is not None else 0,
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, HAS_BASE=base is not None, BM=BM, BN=BN, num_warps=4, num_stages=1)
    return out


def grad_scale(grad_y: torch.Tensor, u: torch.Tensor, col_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dY ⊙ c[col] in dY's dtype, Σ_rows dY ⊙ U in fp32 [N])."""
    M, N = grad_y.shape
    BM, BN = ELEMENTWISE_BLOCKS
    splits = max(1, triton.cdiv(M, BM * GRAD_ROW_TILES))
    scaled = new_output((M, N), grad_y)
    partials = new_output((splits, N), grad_y, torch.float32)
    LAUNCH_COUNTS["dora_grad_scale_kernel"] += 1
    dora_grad_scale_kernel[(splits, triton.cdiv(N, BN))](
        grad_y, u, col_scale, scaled, partials, M, N,
        grad_y.stride(0), grad_y.stride(1), u.stride(0), u.stride(1), col_scale.stride(0),
        scaled.stride(0), scaled.stride(1), partials.stride(0), partials.stride(1),
        ROW_TILES=GRAD_ROW_TILES, BM=BM, BN=BN, num_warps=4, num_stages=2)
    return scaled, partials.sum(0)


def dropout_mix(base: Optional[torch.Tensor], other: Optional[torch.Tensor], seed: torch.Tensor,
                dropout_p: float, like: torch.Tensor) -> torch.Tensor:
    """BASE + keep/(1-p) ⊙ (OTHER - BASE) shaped like ``like`` [M, K] (None stands for 0)."""
    M, K = like.shape
    out = new_output((M, K), like)
    BM, BN = ELEMENTWISE_BLOCKS
    LAUNCH_COUNTS["dora_dropout_mix_kernel"] += 1
    b = base if base is not None else like
    o = other if other is not None else like
    dora_dropout_mix_kernel[(triton.cdiv(M, BM), triton.cdiv(K, BN))](
        b, o, out, seed, M, K, float(dropout_p),
        b.stride(0), b.stride(1), o.stride(0), o.stride(1), out.stride(0), out.stride(1),
        HAS_BASE=base is not None, HAS_OTHER=other is not None, BM=BM, BN=BN, num_warps=4, num_stages=1)
    return out
