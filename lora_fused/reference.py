"""The reference math of lora-fused: plain, obviously-right PyTorch, the tests' oracle.

Run it in float64. It shares no function with the backends (``torch_backend``,
the Triton kernels), so a bug there cannot agree with its own oracle.
Conventions follow ``nn.Linear``: ``weight`` [out, in], ``lora_A`` [r, in],
``lora_B`` [out, r], ``scaling`` s.

    y = x W0ᵀ + b + s · (drop(x) Aᵀ) Bᵀ,      drop(x) = keep ⊙ x / (1 - p)

Autograd on this formula gives the gradients the tests compare against. For
the Triton kernels ``keep`` is :func:`dropout_keep_mask`, a bit-exact copy of
Triton's ``tl.rand(seed, offset)`` (Philox-4x32, 10 rounds) at offset
``row * in_features + col``, so the float64 oracle drops exactly the elements
the kernels drop.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
# Philox-4x32 constants, as in triton/language/random.py.
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
# Largest float32 `scale` with (2**31 - 1) * scale < 1 (Triton's uint_to_uniform_float).
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo_u32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of ``a * b`` for uint32 values held in int64.

    The full product needs 64 unsigned bits, more than int64 holds, so ``b``
    is split into 16-bit halves whose partial products stay below 2**48.
    """
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def _philox_numpy(seed: int, offsets: Tensor) -> Tensor:
    """The CPU path of :func:`philox_uniform`: numpy's uint64 holds a 32×32-bit product."""
    c0 = offsets.numpy().astype(np.uint64)
    c1 = (c0 >> np.uint64(32)) & np.uint64(_MASK32)
    c0 &= np.uint64(_MASK32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & _MASK32), np.uint64((seed >> 32) & _MASK32)
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    round_a, round_b = np.uint64(_PHILOX_ROUND_A), np.uint64(_PHILOX_ROUND_B)
    for _ in range(_PHILOX_ROUNDS):
        prod_b = round_b * c2
        prod_a = round_a * c0
        c0, c1, c2, c3 = (prod_b >> shift) ^ c1 ^ k0, prod_b & mask, (prod_a >> shift) ^ c3 ^ k1, prod_a & mask
        k0 = (k0 + np.uint64(_PHILOX_KEY_A)) & mask
        k1 = (k1 + np.uint64(_PHILOX_KEY_B)) & mask
    as_int32 = c0.astype(np.uint32).view(np.int32)
    as_int32 = np.where(as_int32 < 0, ~as_int32, as_int32)
    return torch.from_numpy(as_int32.astype(np.float32) * np.float32(_UNIFORM_SCALE))


def philox_uniform(seed: int, offsets: Tensor) -> Tensor:
    """``tl.rand(seed, offsets)`` in PyTorch: float32 uniforms in [0, 1).

    ``offsets`` is an int64 tensor; like Triton, its low 32 bits feed the
    first Philox counter word and its high 32 bits the second.
    """
    seed = int(seed)
    offsets = offsets.to(torch.int64)
    if offsets.device.type == "cpu":
        return _philox_numpy(seed, offsets)
    return _philox_torch(seed, offsets)


def _philox_torch(seed: int, offsets: Tensor) -> Tensor:
    """The device-agnostic path of :func:`philox_uniform`, in int64 arithmetic."""
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo_u32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo_u32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    as_int32 = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    as_int32 = torch.where(as_int32 < 0, -as_int32 - 1, as_int32)  # ~x
    return as_int32.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float,
                      device: torch.device | str | None = None) -> Tensor:
    """Bool [rows, cols]: True where LoRA dropout keeps ``x[row, col]``.

    An element is kept when its uniform at offset ``row * cols + col`` is
    ``>= p`` (compared in float32, as the kernels do).
    """
    offsets = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    return philox_uniform(seed, offsets) >= torch.tensor(p, dtype=torch.float32)


def lora_linear_reference(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                          scaling: float, bias: Optional[Tensor] = None,
                          keep: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """``y = x W0ᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` for x [..., in]; autograd gives the gradients.

    ``keep`` is the [M, in] mask (bool or 0/1) over the flattened rows of ``x`` (None: no dropout).
    """
    dropped = x if keep is None else x * keep.reshape(x.shape).to(x.dtype) / (1.0 - dropout_p)
    y = x @ weight.T + scaling * ((dropped @ lora_A.T) @ lora_B.T)
    return y if bias is None else y + bias


# --------------------------------------------------------------------------
# Segmented multi-adapter LoRA: y[t] = x[t] W0ᵀ + b + s_i (x[t] A_i[:r_i]ᵀ) B_i[:, :r_i]ᵀ,
# i = adapter_ids[t] (-1: base only). A [n, r_max, in], B [n, out, r_max].
# --------------------------------------------------------------------------
def multi_lora_linear_reference(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                                adapter_ids: Tensor, scalings: Tensor, bias: Optional[Tensor] = None,
                                ranks: Optional[Tensor] = None) -> Tensor:
    """The test oracle: one row at a time, straight from the formula; autograd gives the gradients."""
    x2d = x.reshape(-1, x.shape[-1])
    ids = adapter_ids.reshape(-1).tolist()
    rank_of = ranks.tolist() if ranks is not None else [lora_A.shape[1]] * lora_A.shape[0]
    base = x2d @ weight.T if bias is None else x2d @ weight.T + bias
    rows = []
    for t, i in enumerate(ids):
        y_t = base[t]
        if i >= 0:
            r = rank_of[i]
            shrink = lora_A[i, :r] @ x2d[t]
            y_t = y_t + scalings[i].to(x.dtype) * (lora_B[i, :, :r] @ shrink)
        rows.append(y_t)
    y = torch.stack(rows) if rows else base  # T = 0
    return y.reshape(*x.shape[:-1], weight.shape[0])



# --------------------------------------------------------------------------
# Grouped (mixture-of-experts) LoRA: y[t] = x[t] W[e]ᵀ + b[e] + s (drop(x[t]) A[e]ᵀ) B[e]ᵀ,
# e = expert_ids[t]. W [E, out, in], A [E, r, in], B [E, out, r], b [E, out].
# --------------------------------------------------------------------------
def grouped_lora_linear_reference(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                                  expert_ids: Tensor, scaling: float, bias: Optional[Tensor] = None,
                                  keep: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """The test oracle: one row at a time, straight from the formula; autograd gives the gradients.

    x [T, in] with expert_ids [T], or x [T, in] with expert_ids [T, k] (row (t, j) reads x[t]):
    y [*expert_ids.shape, out]. ``keep``: the 0/1 mask over the rows of y in that order
    ([*expert_ids.shape, in]; None: no dropout)."""
    ids = expert_ids.reshape(-1).tolist()
    k = 1 if expert_ids.dim() == 1 else expert_ids.shape[1]
    keep2d = None if keep is None else keep.reshape(len(ids), x.shape[-1]).to(x.dtype)
    rows = []
    for pair, e in enumerate(ids):
        x_t = x[pair // k]
        dropped = x_t if keep2d is None else x_t * keep2d[pair] / (1.0 - dropout_p)
        y_t = weight[e] @ x_t + scaling * (lora_B[e] @ (lora_A[e] @ dropped))
        rows.append(y_t if bias is None else y_t + bias[e])
    y = torch.stack(rows) if rows else x.new_zeros(0, weight.shape[1])
    return y.reshape(*expert_ids.shape, weight.shape[1])
