"""DoRA (weight-decomposed LoRA, Liu et al. 2024) with PEFT's semantics, never forming B·A.

With W0 [out, in], A [r, in], B [out, r], scaling s, magnitude m [out]:

    norm[o] = ‖W0[o,:] + s·(B A)[o,:]‖₂          a constant in backward (detached, as PEFT: DoRA §4.3)
    c       = m / norm                          per output column
    y       = x W0ᵀ + b + (c − 1) ⊙ (x̃ W0ᵀ) + c ⊙ s·(x̃ Aᵀ) Bᵀ,     x̃ = drop(x)

Without active dropout x̃ = x and y = c ⊙ U + b with U = x W0ᵀ + s·(x Aᵀ) Bᵀ (LoRA's
output without bias): one per-column scale after the LoRA GEMMs. With dropout (as
PEFT, which then recomputes the base term on drop(x)) y = (x − x̃) W0ᵀ + b + c ⊙ U,
U = x̃ W0ᵀ + s·(x̃ Aᵀ) Bᵀ.

The norm needs no out × in tensor:

    norm² = ‖W0[o]‖² + 2s·(W0 Aᵀ)[o]·B[o] + s²·B[o] (A Aᵀ) B[o]ᵀ      (clamped at 0 before sqrt)

W0 Aᵀ is one skinny GEMM [out, r], A Aᵀ is r × r; ‖W0[o]‖² is cached on the torch path
(W0 is frozen; the cache keeps a stamp of the weight, :mod:`lora_fused.value_cache`, so an
in-place write such as merge() or a ``.data`` swap invalidates it). The Triton kernel takes
‖W0[o]‖² in the same pass that reads W0 for W0 Aᵀ.

Backward from dY, with G = dY ⊙ c (column scale):

    dm = Σ_rows dY ⊙ U / norm
    dA, dB, and without dropout dX: LoRA's backward on (G, x̃): dB = s·Gᵀ S, dA = s·(G B)ᵀ x̃,
                                    dX̃ = G W0 + s·(G B) A
    with dropout: dX = dY W0 + keep/(1−p) ⊙ (dX̃ − dY W0)
                  (= dY W0 + keep/(1−p) ⊙ ((c − 1) ⊙ dY W0 + s·(G B) A), PEFT's graph)

Saved for backward: x, S = x̃ Aᵀ [M, r], U [M, out], c and norm [out], the dropout
seed (the mask is regenerated, never saved). Nothing of size out × in is allocated
(unless W0 itself requires grad).

The forward and backward reuse the LoRA op's (``ops/lora_linear.py``); the custom ops and the
eager Function come from ``ops/_scaffold.define_op``. The layer is
:class:`lora_fused.modules.dora.DoRALinear`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import torch_backend
from ..dispatch.backend import dora_kernels, on_tensor_device, use_triton
from ._scaffold import define_op, fake_grads_like
from .lora_linear import LORA_LINEAR, draw_dropout_seed  # the LoRA op's forward and gradients, reused by DoRA's
from ..validation import check_lora_linear_args
from ..value_cache import identity, stamp


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the norm and the column scale are computed: fp32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------
# The norm
# --------------------------------------------------------------------------
#: identity of the weight -> (its stamp, dtype, ‖W0[o]‖² [out]).
_ROW_SQ_NORMS: dict = {}


def weight_row_sq_norms(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """‖W0[o]‖² [out] in ``dtype``, cached while ``weight`` matches its stamp
    (:mod:`lora_fused.value_cache`: the same tensor and storage, an unchanged version counter)."""
    key = identity(weight)
    entry = _ROW_SQ_NORMS.get(key)
    if entry is not None and entry[1] == dtype and entry[0].matches(weight):
        return entry[2]
    with torch.no_grad():
        value = torch.linalg.vector_norm(weight, dim=1, dtype=dtype).square_()
    if not torch.compiler.is_compiling():
        weight_stamp = stamp(weight, contents=False, on_free=lambda _ref, key=key: _ROW_SQ_NORMS.pop(key, None))
        if weight_stamp is not None:  # else an inference tensor: no version counter to key a cache on
            _ROW_SQ_NORMS[key] = (weight_stamp, dtype, value)
    return value


#: Rows whose identity lost more than this factor in relative precision to cancellation
#: (W0[o] ≈ −s·(B A)[o]) are recomputed directly: at most 64 · eps (~1.4e-14 in float64).
CANCELLATION_LIMIT = 64.0
#: 9 / CANCELLATION_LIMIT as a 0-d tensor: a Python float would be wrapped into one per call (~2 µs).
_CANCELLATION_FACTOR = torch.tensor(9.0 / CANCELLATION_LIMIT)


def _torch_row_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    """The norm identity in plain torch: [out] in ``dtype``.

    ‖W0[o] + s·(B A)[o]‖² = ‖W0[o]‖² + 2s·(W0 Aᵀ)[o]·B[o] + s²·B[o] (A Aᵀ) B[o]ᵀ. Its terms'
    magnitudes add up to at most (w + q)² with w = ‖W0[o]‖, q = ‖s(B A)[o]‖ (Cauchy–Schwarz), which
    is at most max(9 w², 9 · sq) (q ≤ 2w, or else sq ≥ (q − w)² ≥ q²/4). So a row with
    9 w² ≤ LIMIT · sq lost at most ``CANCELLATION_LIMIT`` to cancellation; the other rows are
    recomputed from W0[o] + s·B[o] A (a few rows × in, never B A whole). The test costs a
    multiply, a compare and a host read (``any``): this path serves CPU tensors."""
    a, b = _as(lora_A, dtype), _as(lora_B, dtype)
    cross = _as(F.linear(weight, lora_A), dtype)  # W0 Aᵀ [out, r]: the one read of W0
    # 2s·W0Aᵀ + s²·B (A Aᵀ) in one addmm, then the row dot products with B.
    terms = torch.addmm(cross, b, torch.mm(a, a.t()), beta=2.0 * scaling, alpha=scaling * scaling)
    w_sq = weight_row_sq_norms(weight, dtype)
    sq = torch.linalg.vecdot(terms, b, dim=1).add_(w_sq)
    lost = torch.lt(sq, torch.mul(w_sq, _CANCELLATION_FACTOR))  # 9 w² > LIMIT · sq
    if lost.any():
        cancelled = lost.nonzero().squeeze(1)
        rows = _as(weight[cancelled], dtype).addmm_(b[cancelled], a, alpha=scaling)
        sq[cancelled] = torch.linalg.vecdot(rows, rows, dim=1)
    return sq.clamp_min_(0.0).sqrt_()


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


@on_tensor_device
def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """norm[o] = ‖W0[o] + s·(B A)[o]‖₂ [out], fp32 (float64 for float64), no gradient, no B A formed."""
    with torch.no_grad():  # weight itself (not a detached alias): the row-norm cache is keyed on it
        if use_triton(lora_A, weight):
            return dora_kernels().row_norm(weight, lora_A, lora_B, scaling)
        return _torch_row_norm(weight, lora_A, lora_B, scaling, norm_dtype(weight.dtype))


# --------------------------------------------------------------------------
# Backend pieces: the LoRA op's forward/backward plus the DoRA epilogues
# --------------------------------------------------------------------------
def _scale_cols(u: Tensor, col_scale: Tensor, bias: Optional[Tensor], base: Optional[Tensor]) -> Tensor:
    """U ⊙ c[col] (+ bias) (+ base)."""
    if use_triton(u, u):
        return dora_kernels().scale_cols(u, col_scale, bias, base)
    c = col_scale.to(u.dtype)
    y = u * c if bias is None else torch.addcmul(bias, u, c)
    return y if base is None else y.add_(base)


def keep_scaled(seed: Tensor, rows: int, cols: int, dropout_p: float, dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """The torch path's dropout factor keep/(1−p) [rows, cols] in ``dtype``, with the torch
    backend's mask for ``seed`` (:func:`lora_fused.backends.torch_backend.keep_mask`: the same draw as LoRA's)."""
    return torch_backend.keep_mask(seed, rows, cols, dropout_p, dtype, device).mul_(1.0 / (1.0 - dropout_p))


def _dropped(x2d: Tensor, dropout_p: float, seed: Tensor):
    """(x̃ = keep ⊙ x / (1−p), x − x̃, keep/(1−p) on the torch path else None)."""
    if use_triton(x2d, x2d):
        k = dora_kernels()
        return (k.dropout_mix(None, x2d, seed, dropout_p, x2d), k.dropout_mix(x2d, None, seed, dropout_p, x2d),
                None)
    factor = keep_scaled(seed, x2d.shape[0], x2d.shape[1], dropout_p, x2d.dtype, x2d.device)
    dropped = x2d * factor
    return dropped, x2d - dropped, factor


@on_tensor_device
def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             magnitude: Tensor, scaling: float, dropout_p: float,
             seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, S, U, c, norm) for 2-D x (see the module docstring)."""
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    col_scale = magnitude.detach().to(norm.dtype) / norm
    if seed is None:
        u, shrink = LORA_LINEAR.forward(x, weight, None, lora_A, lora_B, scaling, 0.0, None)
        return _scale_cols(u, col_scale, bias, None), shrink, u, col_scale, norm
    dropped, rest, _ = _dropped(x, dropout_p, seed)
    u, shrink = LORA_LINEAR.forward(dropped, weight, None, lora_A, lora_B, scaling, 0.0, None)
    base = F.linear(rest, weight, bias)  # (x − x̃) W0ᵀ + b
    return _scale_cols(u, col_scale, None, base), shrink, u, col_scale, norm


def _grad_scale(grad_y: Tensor, u: Tensor, col_scale: Tensor) -> tuple[Tensor, Tensor]:
    """(G = dY ⊙ c, Σ_rows dY ⊙ U in c's dtype)."""
    if use_triton(grad_y, grad_y):
        scaled, colsum = dora_kernels().grad_scale(grad_y, u, col_scale)
        return scaled, colsum.to(col_scale.dtype)
    colsum = (grad_y * u).sum(0, dtype=col_scale.dtype)
    return grad_y * col_scale.to(grad_y.dtype), colsum


@on_tensor_device
def _grads(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, shrink: Tensor,
           u: Tensor, col_scale: Tensor, norm: Tensor, magnitude: Tensor, seed: Optional[Tensor],
           scaling: float, dropout_p: float, needs: Sequence[bool]) -> tuple:
    """(dX, dW0, db, dA, dB, dm), None where ``needs`` (the same six flags) says not needed."""
    need_x, need_w, need_bias, need_a, need_b, need_m = needs
    grad_y = grad_y.contiguous()
    scaled, colsum = _grad_scale(grad_y, u, col_scale)
    grad_m = (colsum / norm).to(magnitude.dtype) if need_m else None
    if seed is None:
        dropped = rest = factor = None
        lora_x = x
    else:
        dropped, rest, factor = _dropped(x, dropout_p, seed)
        lora_x = dropped
    grad_x = grad_a = grad_b = grad_w = grad_bias = None
    if need_x or need_a or need_b:
        dx, grad_a, grad_b = LORA_LINEAR.grads(scaled, lora_x, weight, lora_A, lora_B, shrink, scaling, 0.0,
                                                  None, need_x, need_a or need_b)
        if need_x:
            grad_x = dx if seed is None else _dropout_grad_x(grad_y, dx, weight, seed, dropout_p, x, factor)
    if need_w:  # W0 trained (the norm stays detached, as PEFT)
        grad_w = scaled.t() @ lora_x if seed is None else scaled.t() @ dropped + grad_y.t() @ rest
    if need_bias:
        grad_bias = grad_y.sum(0)
    return grad_x, grad_w, grad_bias, grad_a if need_a else None, grad_b if need_b else None, grad_m


def _dropout_grad_x(grad_y: Tensor, grad_dropped: Tensor, weight: Tensor, seed: Tensor, dropout_p: float,
                    x2d: Tensor, factor: Optional[Tensor]) -> Tensor:
    """dX = dY W0 + keep/(1−p) ⊙ (dX̃ − dY W0) (``factor``: keep/(1−p) of the torch path)."""
    base = torch.mm(grad_y, weight)
    if factor is None:
        return dora_kernels().dropout_mix(base, grad_dropped, seed, dropout_p, x2d)
    return grad_dropped.sub_(base).mul_(factor).add_(base)  # dX̃ is this backward's own tensor


def _fake_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed):
    M, N, dtype = x.shape[0], weight.shape[0], norm_dtype(weight.dtype)
    return (x.new_empty((M, N)), x.new_empty((M, lora_A.shape[0])), x.new_empty((M, N)),
            x.new_empty((N,), dtype=dtype), x.new_empty((N,), dtype=dtype))


def _fake_grads(grad_y, x, weight, lora_A, lora_B, shrink, u, col_scale, norm, magnitude, seed, scaling, dropout_p,
                needs):
    return fake_grads_like(grad_y, (x, weight, weight[:, 0], lora_A, lora_B, magnitude), needs)


#: The custom ops ``lora_fused::dora_linear_fwd`` / ``_bwd`` (the torch.compile / torch.export route,
#: opaque to the tracer: the row-norm cache and the host-side seed read run inside them) and the eager
#: Function (``_scaffold``); the backward runs under the strategy forced around the forward, as LoRA's.
DORA_LINEAR = define_op(("lora_fused::dora_linear_fwd", "lora_fused::dora_linear_bwd"), _forward, _grads,
                        outputs=("y", "shrink", "u", "col_scale", "norm"), n_differentiable=6,
                        fake_forward=_fake_forward, fake_grads=_fake_grads, function_name="_DoRALinearFunction",
                        keeps_strategy=True)


def check_magnitude(magnitude, x: Tensor, weight: Tensor) -> None:
    """magnitude: a floating [out_features] tensor on x's device."""
    if not isinstance(magnitude, Tensor):
        raise TypeError(f"magnitude must be a Tensor [out_features], got {type(magnitude).__name__}")
    if magnitude.dim() != 1 or magnitude.shape[0] != weight.shape[0]:
        raise ValueError(f"magnitude must be [out_features={weight.shape[0]}], got shape "
                         f"{tuple(magnitude.shape)} (weight shape {tuple(weight.shape)})")
    if not magnitude.is_floating_point():
        raise TypeError(f"magnitude must be a floating-point tensor, got dtype {magnitude.dtype}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude is on {magnitude.device} but x is on {x.device}; move them to one device")


def dora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float,
                bias: Optional[Tensor] = None, *, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """DoRA: ``y = x W0ᵀ + b + (m/norm − 1) ⊙ (drop(x) W0ᵀ) + (m/norm) ⊙ s·(drop(x) Aᵀ) Bᵀ``.

    x [..., in], weight [out, in], lora_A [r, in], lora_B [out, r], magnitude [out]
    (any floating dtype; its gradient comes back in it), bias [out] | None. norm[o] =
    ‖W0[o] + s·(B A)[o]‖₂ is computed without forming B A and is a constant in backward
    (as PEFT). Dropout applies when ``training`` and ``dropout_p > 0``. Differentiable in
    x, lora_A, lora_B, magnitude, and in weight / bias when they require grad.
    """
    scaling, dropout_p = check_lora_linear_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    check_magnitude(magnitude, x, weight)
    seed = draw_dropout_seed(x.device) if training and dropout_p > 0.0 else None
    active_p = dropout_p if seed is not None else 0.0
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    inputs = (x2d, weight, bias, lora_A, lora_B, magnitude, scaling, active_p, seed)
    y = DORA_LINEAR.run(inputs)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


@on_tensor_device
def dora_linear_inference(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                          scaling: float, bias: Optional[Tensor], norm: Tensor) -> Tensor:
    """``dora_linear`` without dropout or gradients, given the norm (``DoRALinear``'s eval cache)."""
    scaling, _ = check_lora_linear_args(x, weight, lora_A, lora_B, scaling, bias, 0.0)
    check_magnitude(magnitude, x, weight)
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    u, _shrink = LORA_LINEAR.forward(x2d, weight, None, lora_A, lora_B, scaling, 0.0, None)
    y = _scale_cols(u, magnitude.detach().to(norm.dtype) / norm, bias, None)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


__all__ = ["dora_linear", "dora_weight_norm"]
