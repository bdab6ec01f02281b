"""The reference math of lora-fused: plain, obviously-right PyTorch.

It is the oracle for every test (run it in float64) and the ``torch`` backend
of the ops. Conventions follow ``nn.Linear``: ``weight`` [out, in],
``lora_A`` [r, in], ``lora_B`` [out, r], ``scaling`` s.

    S  = drop(x) Aᵀ                     (M × r)
    y  = x W0ᵀ + b + s · S Bᵀ
    dB = s · dYᵀ S          dS = s · dY B
    dA = dSᵀ drop(x)        dX = dY W0 + keep/(1-p) ⊙ (dS A)

where ``drop(x) = keep ⊙ x / (1 - p)``. For the Triton kernels ``keep`` is
:func:`dropout_keep_mask`, a bit-exact copy of Triton's ``tl.rand(seed,
offset)`` (Philox-4x32, 10 rounds) at offset ``row * in_features + col``, so
the float64 oracle drops exactly the elements the kernels drop. The torch
backend draws its own mask from the same seed (:func:`torch_backend_keep_mask`).
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


def torch_backend_keep_mask(seed: int, rows: int, cols: int, p: float,
                            device: torch.device | str | None = None) -> Tensor:
    """The torch backend's keep-mask: ``torch.rand`` from a generator seeded with ``seed``.

    Cheaper than emulating Philox (which costs ~40 integer ops per element on
    the CPU), and as reproducible: forward and backward regenerate the same
    mask from the seed. It differs from the Triton kernels' mask, which
    :func:`dropout_keep_mask` reproduces.
    """
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(rows, cols, generator=generator, device=device) >= p


def apply_dropout(x: Tensor, keep: Optional[Tensor], p: float) -> Tensor:
    """``drop(x) = keep ⊙ x / (1 - p)``; identity when ``keep`` is None."""
    if keep is None:
        return x
    return x * keep.to(x.dtype) / (1.0 - p)


def lora_linear_reference(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                          scaling: float, bias: Optional[Tensor] = None,
                          keep: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """``y = x W0ᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` for x [..., in]; autograd gives the gradients.

    ``keep`` is the [M, in] mask over the flattened rows of ``x`` (None: no dropout).
    """
    y, _ = lora_forward_torch(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B,
                              scaling, keep, dropout_p)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_forward_torch(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                       lora_B: Tensor, scaling: float, keep: Optional[Tensor],
                       dropout_p: float) -> tuple[Tensor, Tensor]:
    """Forward of the torch backend: returns ``(y, S)`` with ``S = drop(x) Aᵀ``."""
    shrink = apply_dropout(x2d, keep, dropout_p) @ lora_A.T
    y = torch.nn.functional.linear(x2d, weight, bias)
    y.addmm_(shrink, lora_B.T, alpha=scaling)  # y is fresh: add the LoRA term in place
    return y, shrink


def lora_backward_torch(grad_y: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor,
                        lora_B: Tensor, shrink: Tensor, scaling: float,
                        keep: Optional[Tensor], dropout_p: float,
                        need_dx: bool, need_dlora: bool
                        ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Backward of the torch backend: ``(dX, dA, dB)``; nothing of size out × in."""
    grad_shrink = scaling * (grad_y @ lora_B)
    grad_x = grad_a = grad_b = None
    if need_dlora:
        grad_b = scaling * (grad_y.T @ shrink)
        grad_a = grad_shrink.T @ apply_dropout(x2d, keep, dropout_p)
    if need_dx:
        grad_x = grad_y @ weight + apply_dropout(grad_shrink @ lora_A, keep, dropout_p)
    return grad_x, grad_a, grad_b


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
    rows = []
    for t, i in enumerate(ids):
        y_t = torch.nn.functional.linear(x2d[t], weight, bias)
        if i >= 0:
            r = rank_of[i]
            shrink = lora_A[i, :r] @ x2d[t]
            y_t = y_t + scalings[i].to(x.dtype) * (lora_B[i, :, :r] @ shrink)
        rows.append(y_t)
    y = torch.stack(rows) if rows else torch.nn.functional.linear(x2d, weight, bias)  # T = 0
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _adapter_segments(adapter_ids: Tensor):
    """(adapter, rows) for each adapter present in ``adapter_ids`` (host loop: torch backend only)."""
    for i in torch.unique(adapter_ids).tolist():
        if i >= 0:
            yield i, (adapter_ids == i).nonzero().squeeze(1)


def multi_lora_forward_torch(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                             lora_B: Tensor, scalings: Tensor, ranks: Tensor,
                             adapter_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Forward of the torch backend, one adapter segment at a time: ``(y, S [1, T, r_max])``."""
    y = torch.nn.functional.linear(x2d, weight, bias)
    shrink = x2d.new_zeros((1, x2d.shape[0], lora_A.shape[1]))
    for i, rows in _adapter_segments(adapter_ids):
        r = int(ranks[i])
        s = x2d[rows] @ lora_A[i, :r].T
        shrink[0, rows, :r] = s
        y.index_add_(0, rows, (s @ lora_B[i, :, :r].T) * scalings[i].to(y.dtype))
    return y, shrink


def multi_lora_backward_torch(grad_y: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor,
                              lora_B: Tensor, scalings: Tensor, ranks: Tensor, shrink: Tensor,
                              adapter_ids: Tensor, need_dx: bool, need_dlora: bool
                              ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Backward of the torch backend: ``(dX, dA, dB)``; absent adapters and padding get zeros."""
    shrink = shrink.sum(0).to(x2d.dtype)  # [splits, T, r_max] partials (one split here)
    grad_x = grad_y @ weight if need_dx else None
    grad_a = torch.zeros_like(lora_A) if need_dlora else None
    grad_b = torch.zeros_like(lora_B) if need_dlora else None
    for i, rows in _adapter_segments(adapter_ids):
        r, s = int(ranks[i]), scalings[i].to(grad_y.dtype)
        dy = grad_y[rows]
        grad_shrink = s * (dy @ lora_B[i, :, :r])
        if need_dlora:
            grad_b[i, :, :r] = s * (dy.T @ shrink[rows, :r])
            grad_a[i, :r] = grad_shrink.T @ x2d[rows]
        if need_dx:
            grad_x.index_add_(0, rows, grad_shrink @ lora_A[i, :r])
    return grad_x, grad_a, grad_b
