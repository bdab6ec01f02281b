"""Triton kernels over bitsandbytes' packed 4-bit weights (QLoRA base weights).

Layout (``bitsandbytes.functional.quantize_4bit``): W [N, K] is flattened row-major;
element ``i`` is the high nibble of byte ``i // 2`` when ``i`` is even, the low
nibble when odd; block ``i // blocksize`` has one scale ``absmax[i // blocksize]``:

    W[i] = code[nibble(i)] * absmax[i // blocksize]            (fp32, then cast once)

``code`` is the 16-entry NF4 or FP4 table. Under double quantization
(``compress_statistics=True``) ``absmax`` is itself 8-bit with blocks of ``blocksize2``
(256) elements, a 256-entry code ``code2``, scales ``absmax2`` and one fp32 ``offset``:

    absmax[j] = code2[qabsmax[j]] * absmax2[j // blocksize2] + offset

bitsandbytes rounds the product and the sum separately (``dequantize_blockwise``,
then ``absmax += offset``), so these kernels are compiled with
``enable_fp_fusion=False``: an FMA would round once and differ in the last bit.
Every product is fp32 and the result is cast to the output dtype once (round to
nearest even), as bitsandbytes' CUDA kernel and its CPU code do: the dequantized
weight is bit-identical to ``bitsandbytes.functional.dequantize_4bit``, FP4's code 8
included (-0.0, as its CUDA kernel; some of its CPU paths give +0.0). One exception:
its AVX-512 CPU kernel reads other block scales when in_features is a multiple of 16 but
not of the blocksize (``_bitsandbytes_dequantize`` in lora_fused/modules/qlora.py); these
kernels read the flat blocks above.

Kernels
-------
``dequant4bit_kernel``    W [N, K] in fp16 / bf16 / fp32 from the packed bytes.
``qlora_decode_kernel``   Y = X deq(W)ᵀ + b + s · S Bᵀ for at most BM rows (decode):
                          each W element is read (4 bits) once; S = X Aᵀ comes in.

``quant`` arguments describe the packed weight (``lora_fused.modules.qlora.Quant4bit``): shape
[N, K], blocksize, quant_type, absmax and, when nested, absmax2, code2, blocksize2, offset.
Pure Triton and torch: nothing here imports ``lora_fused`` or bitsandbytes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .common import LAUNCH_COUNTS, dot_precision, interpreting, load_tile, new_output, store_tile

#: bitsandbytes' NF4 code (``functional.get_4bit_type("nf4")``), fp32 values.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
#: bitsandbytes' FP4 code (e2m1 over 12, sign in bit 3; code 8 is -0.0, as its CUDA kernel).
FP4_CODE = tuple(sign * v for sign in (1.0, -1.0)
                 for v in (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6, 1 / 4))
QUANT_TYPES = ("nf4", "fp4")
#: The blocksizes bitsandbytes' dequantize_4bit accepts.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUTPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Elements per program of the dequantize kernel (and its warps).
DEQUANT_BLOCK, DEQUANT_WARPS = 1024, 4
#: Rows the fused decode kernel takes in one program (one row tile: W is read once).
DECODE_MAX_ROWS = 16


@dataclass(frozen=True)
class DecodeConfig:
    BN: int
    BK: int
    num_warps: int
    num_stages: int


#: Decode tiles: BN output columns per program, a K loop of BK. 4096 x 4096 gives
#: 128 programs at BN = 32 (about one per SM of an H100). Unmeasured on GPU.
DECODE_CONFIG = DecodeConfig(BN=32, BK=128, num_warps=4, num_stages=3)
INTERPRETER_DECODE_CONFIG = DecodeConfig(BN=16, BK=32, num_warps=1, num_stages=1)


@functools.cache
def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 fp32 code values of ``quant_type`` on ``device`` (one copy per device)."""
    return torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------

@triton.jit
def dequant_values(idx, ok, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                   BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
    """fp32 ``code[nibble(i)] * absmax[i // BLOCKSIZE]`` at flat indices ``idx`` (0 where not ``ok``)."""
    byte = tl.load(q_ptr + (idx >> 1), mask=ok, other=0).to(tl.int32)
    nibble = tl.where((idx & 1) == 0, byte >> 4, byte & 15)  # even index: high nibble
    code = tl.load(code_ptr + nibble)
    block = idx // BLOCKSIZE
    if NESTED:
        qabsmax = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + qabsmax) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=ok, other=0.0)
        scale = scale + tl.load(offset_ptr)  # rounded apart from the product (no FMA: see module doc)
    else:
        scale = tl.load(absmax_ptr + block, mask=ok, other=0.0).to(tl.float32)
    return code * scale


@triton.jit
def dequant4bit_kernel(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       BLOCK: tl.constexpr):
    """OUT[i] = code[nibble(i)] * absmax[i // BLOCKSIZE] for i < numel (flat W, row-major).

    Grid: ``(cdiv(numel, BLOCK),)``; each program owns BLOCK consecutive elements
    (BLOCK / 2 bytes of the packed weight).
    """
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    w = dequant_values(idx, ok, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                       BLOCKSIZE, BLOCKSIZE2, NESTED)
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def qlora_decode_kernel(
    x_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    bias_ptr, s_ptr, b_ptr, out_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_bias, stride_sm, stride_sr, stride_bn, stride_br, stride_om, stride_on,
    scaling,
    HAS_BIAS: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    """OUT[M, N] = X[M, K] deq(W)[N, K]ᵀ + bias[N] + scaling · S[M, R] B[N, R]ᵀ, M <= BM.

    Grid: ``(cdiv(N, BN),)``; each program owns all M rows of a BN-column tile, so
    every packed byte of W is read by one program only. A W tile [BK, BN] is
    dequantized in registers exactly as ``dequant4bit_kernel`` does and cast to X's
    dtype (the value the prefill path's scratch holds), then multiplied in fp32.
    """
    rows = tl.arange(0, BM)
    cols = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    ranks = tl.arange(0, BR)
    row_ok = rows < M
    col_ok = cols < N
    rank_ok = ranks < R
    # The LoRA term starts the accumulator (S is tiny: M x R).
    s_tile = load_tile(s_ptr, rows, ranks, stride_sm, stride_sr, row_ok, rank_ok)
    b_tile = load_tile(b_ptr, ranks, cols, stride_br, stride_bn, rank_ok, col_ok)
    acc = scaling * tl.dot(s_tile, b_tile, input_precision=PRECISION)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK).to(tl.int64)
        k_ok = ks < K
        x_tile = load_tile(x_ptr, rows, ks, stride_xm, stride_xk, row_ok, k_ok)
        idx = cols[None, :] * K + ks[:, None]  # flat index of W[col, k]: a [BK, BN] view of Wᵀ
        w = dequant_values(idx, k_ok[:, None] & col_ok[None, :], q_ptr, absmax_ptr, code_ptr,
                           absmax2_ptr, code2_ptr, offset_ptr, BLOCKSIZE, BLOCKSIZE2, NESTED)
        acc = tl.dot(x_tile, w.to(x_ptr.dtype.element_ty), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    store_tile(out_ptr, rows, cols, stride_om, stride_on, row_ok, col_ok, acc)


# --------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------

def _quant_pointers(packed: torch.Tensor, quant: Any) -> tuple:
    """(q, absmax, code, absmax2, code2, offset) kernel arguments; unused ones alias absmax."""
    q = packed.view(torch.uint8).reshape(-1)  # any quant_storage dtype holds the same bytes
    code = code_table(quant.quant_type, packed.device)
    if quant.nested:
        return q, quant.absmax, code, quant.absmax2, quant.code2, quant.offset.reshape(1)
    return q, quant.absmax, code, quant.absmax, quant.absmax, quant.absmax


def check_quant(packed: torch.Tensor, quant: Any) -> None:
    """ValueError naming what does not fit bitsandbytes' layout."""
    n, k = quant.shape
    if quant.quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant.quant_type!r}")
    if quant.blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {quant.blocksize}")
    if packed.numel() * packed.element_size() < (n * k + 1) // 2:
        raise ValueError(f"packed weight holds {packed.numel() * packed.element_size()} bytes; a "
                         f"[{n}, {k}] 4-bit weight needs {(n * k + 1) // 2}")
    blocks = triton.cdiv(n * k, quant.blocksize)
    if quant.absmax.numel() < blocks:
        raise ValueError(f"absmax has {quant.absmax.numel()} entries; [{n}, {k}] in blocks of "
                         f"{quant.blocksize} needs {blocks}")
    if quant.nested and quant.absmax2.numel() < triton.cdiv(blocks, quant.blocksize2):
        raise ValueError(f"nested absmax2 has {quant.absmax2.numel()} entries, needs "
                         f"{triton.cdiv(blocks, quant.blocksize2)} (blocksize2 {quant.blocksize2})")


def dequantize_4bit(packed: torch.Tensor, quant: Any, dtype: torch.dtype,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W [N, K] in ``dtype``, bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

    ``out`` (contiguous [N, K] of ``dtype``) is written when given: a scratch buffer.
    """
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype}")
    check_quant(packed, quant)
    n, k = quant.shape
    if out is None:
        out = new_output((n, k), packed, dtype)
    elif out.shape != (n, k) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {k}] {dtype} tensor, got {tuple(out.shape)} "
                         f"{out.dtype} (contiguous: {out.is_contiguous()})")
    numel = n * k
    if numel == 0:
        return out
    grid = (triton.cdiv(numel, DEQUANT_BLOCK),)
    dequant4bit_kernel[grid](*_quant_pointers(packed, quant), out, numel,
                             BLOCKSIZE=quant.blocksize, BLOCKSIZE2=max(1, quant.blocksize2),
                             NESTED=quant.nested, BLOCK=DEQUANT_BLOCK,
                             num_warps=DEQUANT_WARPS, num_stages=1, enable_fp_fusion=False)
    LAUNCH_COUNTS["dequant4bit_kernel"] += 1
    return out


def decode_config() -> DecodeConfig:
    return INTERPRETER_DECODE_CONFIG if interpreting() else DECODE_CONFIG


def qlora_decode(x: torch.Tensor, packed: torch.Tensor, quant: Any, bias: Optional[torch.Tensor],
                 shrink: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Y [M, N] = x deq(W)ᵀ + bias + scaling · shrink lora_Bᵀ for x [M, K], M <= DECODE_MAX_ROWS."""
    M, K = x.shape
    N = quant.shape[0]
    if M > DECODE_MAX_ROWS or quant.shape[1] != K:
        raise ValueError(f"qlora_decode takes x [M <= {DECODE_MAX_ROWS}, {quant.shape[1]}], got {tuple(x.shape)}")
    check_quant(packed, quant)
    cfg = decode_config()
    R = shrink.shape[1]
    out = new_output((M, N), x)
    grid = (triton.cdiv(N, cfg.BN),)
    qlora_decode_kernel[grid](
        x, *_quant_pointers(packed, quant), bias if bias is not None else x, shrink, lora_B, out,
        M, N, K, R,
        x.stride(0), x.stride(1), bias.stride(0) if bias is not None else 0,
        shrink.stride(0), shrink.stride(1), lora_B.stride(0), lora_B.stride(1), out.stride(0), out.stride(1),
        float(scaling),
        HAS_BIAS=bias is not None, NESTED=quant.nested, BLOCKSIZE=quant.blocksize,
        BLOCKSIZE2=max(1, quant.blocksize2), PRECISION=dot_precision(x.dtype),
        BM=16, BN=cfg.BN, BK=cfg.BK, BR=max(16, triton.next_power_of_2(R)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
    LAUNCH_COUNTS["qlora_decode_kernel"] += 1
    return out
