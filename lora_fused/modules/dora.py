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
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import torch_backend
from ..dispatch import strategies
from ..dispatch.backend import on_tensor_device, use_triton
from ..ops import lora_linear as ops  # the LoRA op's forward and gradients, reused by DoRA's
from ..ops.lora_linear import compute_inputs, draw_dropout_seed
from ..validation import check_lora_linear_args
from .lora_linear import LoRALinear
from ..value_cache import all_match, identity, stamp


def _kernels():
    from lora_fused.kernels import dora
    return dora


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
            return _kernels().row_norm(weight, lora_A, lora_B, scaling)
        return _torch_row_norm(weight, lora_A, lora_B, scaling, norm_dtype(weight.dtype))


# --------------------------------------------------------------------------
# Backend pieces: the LoRA op's forward/backward plus the DoRA epilogues
# --------------------------------------------------------------------------
def _scale_cols(u: Tensor, col_scale: Tensor, bias: Optional[Tensor], base: Optional[Tensor]) -> Tensor:
    """U ⊙ c[col] (+ bias) (+ base)."""
    if use_triton(u, u):
        return _kernels().scale_cols(u, col_scale, bias, base)
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
        k = _kernels()
        return (k.dropout_mix(None, x2d, seed, dropout_p, x2d), k.dropout_mix(x2d, None, seed, dropout_p, x2d),
                None)
    factor = keep_scaled(seed, x2d.shape[0], x2d.shape[1], dropout_p, x2d.dtype, x2d.device)
    dropped = x2d * factor
    return dropped, x2d - dropped, factor


@on_tensor_device
def _forward(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             magnitude: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor]):
    """(y, S, U, c, norm) for 2-D x (see the module docstring)."""
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    col_scale = magnitude.detach().to(norm.dtype) / norm
    if seed is None:
        u, shrink = ops._forward(x2d, weight, None, lora_A, lora_B, scaling, 0.0, None)
        return _scale_cols(u, col_scale, bias, None), shrink, u, col_scale, norm
    dropped, rest, _ = _dropped(x2d, dropout_p, seed)
    u, shrink = ops._forward(dropped, weight, None, lora_A, lora_B, scaling, 0.0, None)
    base = F.linear(rest, weight, bias)  # (x − x̃) W0ᵀ + b
    return _scale_cols(u, col_scale, None, base), shrink, u, col_scale, norm


def _grad_scale(grad_y: Tensor, u: Tensor, col_scale: Tensor) -> tuple[Tensor, Tensor]:
    """(G = dY ⊙ c, Σ_rows dY ⊙ U in c's dtype)."""
    if use_triton(grad_y, grad_y):
        scaled, colsum = _kernels().grad_scale(grad_y, u, col_scale)
        return scaled, colsum.to(col_scale.dtype)
    colsum = (grad_y * u).sum(0, dtype=col_scale.dtype)
    return grad_y * col_scale.to(grad_y.dtype), colsum


@on_tensor_device
def _grads(grad_y: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, shrink: Tensor,
           u: Tensor, col_scale: Tensor, norm: Tensor, magnitude: Tensor, seed: Optional[Tensor],
           scaling: float, dropout_p: float, needs: tuple) -> tuple:
    """(dX, dW0, db, dA, dB, dm), None where ``needs`` (the same six flags) says not needed."""
    need_x, need_w, need_bias, need_a, need_b, need_m = needs
    scaled, colsum = _grad_scale(grad_y, u, col_scale)
    grad_m = (colsum / norm).to(magnitude.dtype) if need_m else None
    if seed is None:
        dropped = rest = factor = None
        lora_x = x2d
    else:
        dropped, rest, factor = _dropped(x2d, dropout_p, seed)
        lora_x = dropped
    grad_x = grad_a = grad_b = grad_w = grad_bias = None
    if need_x or need_a or need_b:
        dx, grad_a, grad_b = ops._lora_grads(scaled, lora_x, weight, lora_A, lora_B, shrink, scaling, 0.0,
                                            None, need_x, need_a or need_b)
        if need_x:
            grad_x = dx if seed is None else _dropout_grad_x(grad_y, dx, weight, seed, dropout_p, x2d, factor)
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
        return _kernels().dropout_mix(base, grad_dropped, seed, dropout_p, x2d)
    return grad_dropped.sub_(base).mul_(factor).add_(base)  # dX̃ is this backward's own tensor


# The torch.compile / torch.export route: custom ops opaque to the tracer (the row-norm cache
# and the host-side seed read run inside them); eager calls take the autograd.Function below.
@torch.library.custom_op("lora_fused::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    magnitude: Tensor, scaling: float, dropout_p: float,
                    seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, S, U, c, norm) for 2-D x (see ``_forward``)."""
    return _forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed)


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed):
    M, N, dtype = x.shape[0], weight.shape[0], norm_dtype(weight.dtype)
    return (x.new_empty((M, N)), x.new_empty((M, lora_A.shape[0])), x.new_empty((M, N)),
            x.new_empty((N,), dtype=dtype), x.new_empty((N,), dtype=dtype))


@torch.library.custom_op("lora_fused::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, shrink: Tensor,
                    u: Tensor, col_scale: Tensor, norm: Tensor, magnitude: Tensor, seed: Optional[Tensor],
                    scaling: float, dropout_p: float, needs: list[bool]) -> list[Tensor]:
    """(dX, dW0, db, dA, dB, dm); a gradient not needed is an empty tensor."""
    grads = _grads(grad_y, x, weight, lora_A, lora_B, shrink, u, col_scale, norm, magnitude, seed, scaling,
                   dropout_p, tuple(needs))
    return [g if g is not None else grad_y.new_empty(0) for g in grads]


@dora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, shrink, u, col_scale, norm, magnitude, seed, scaling, dropout_p, needs):
    likes = (x, weight, weight[:, 0], lora_A, lora_B, magnitude)
    return [t.new_empty(t.shape) if need else grad_y.new_empty(0) for t, need in zip(likes, needs)]


def _save(ctx, inputs: tuple, output: tuple) -> None:
    x2d, weight, _bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed = inputs
    _y, shrink, u, col_scale, norm = output
    ctx.save_for_backward(x2d, weight, lora_A, lora_B, shrink, u, col_scale, norm, magnitude, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _op_backward(ctx, grad_y, *_unused):
    saved = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    grads = torch.ops.lora_fused.dora_linear_bwd(grad_y.contiguous(), *saved, ctx.scaling, ctx.dropout_p, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None, None)


torch.library.register_autograd("lora_fused::dora_linear_fwd", _op_backward, setup_context=_save)


class _DoRALinearFunction(torch.autograd.Function):
    """The eager route: the same forward and backward as the custom ops, without their dispatch cost."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = _forward(*inputs)
        _save(ctx, inputs, outputs)
        # The backward strategy forced around this call (lf.use_strategy), as lora_linear keeps
        # it: autograd may run the backward in another thread, which does not see the ContextVar.
        ctx.backward_strategy = strategies.current_strategy().backward
        return outputs[0]

    @staticmethod
    def backward(ctx, grad_y):
        with strategies.use_strategy(backward=ctx.backward_strategy):
            return _grads(grad_y.contiguous(), *ctx.saved_tensors, ctx.scaling, ctx.dropout_p,
                          tuple(ctx.needs_input_grad[:6])) + (None, None, None)


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
    if torch.compiler.is_compiling():
        y = torch.ops.lora_fused.dora_linear_fwd(*inputs)[0]
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs[:6]):
        y = _DoRALinearFunction.apply(*inputs)
    else:
        y = _forward(*inputs)[0]
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


@on_tensor_device
def dora_linear_inference(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                          scaling: float, bias: Optional[Tensor], norm: Tensor) -> Tensor:
    """``dora_linear`` without dropout or gradients, given the norm (``DoRALinear``'s eval cache)."""
    scaling, _ = check_lora_linear_args(x, weight, lora_A, lora_B, scaling, bias, 0.0)
    check_magnitude(magnitude, x, weight)
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    u, _shrink = ops._forward(x2d, weight, None, lora_A, lora_B, scaling, 0.0, None)
    y = _scale_cols(u, magnitude.detach().to(norm.dtype) / norm, bias, None)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------
class DoRALinear(LoRALinear):
    """A ``LoRALinear`` with DoRA's magnitude: ``lora_magnitude_vector`` [out] (see :func:`dora_linear`).

    The magnitude starts as ‖W0[o] + s·(B A)[o]‖₂ (PEFT's initialisation; ‖W0[o]‖ for a
    fresh adapter, B = 0), so a fresh layer computes the base layer exactly. ``merge()``
    writes (m/norm) ⊙ (W0 + s·B A) into ``weight`` as PEFT does and keeps the norm it used,
    so ``unmerge()`` restores W0 (up to rounding); the norm is saved with ``merged`` so that
    a merged checkpoint unmerges after loading too.

    ``cache_weight_norm = True`` (off by default, as PEFT's ``ENABLE_DORA_CACHING``) keeps the
    norm between inference calls (eval mode, no grad), so decoding does not read W0 twice per
    call. It is recomputed when weight, lora_A or lora_B is replaced or written in place through
    the parameter (their version counters), when scaling or the compute dtype changes, and after
    any call that records gradients; a write through ``.data`` is invisible to it.
    """

    #: Keep the norm between eval-mode, no-grad calls (see the class docstring).
    cache_weight_norm: bool = False

    def _attach_lora_parameters(self) -> None:
        super()._attach_lora_parameters()
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, **factory))
        self.register_buffer("_merged_norm", None, persistent=False)
        if self.weight.device.type != "meta":
            self.reset_magnitude()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> "DoRALinear":
        if isinstance(linear, LoRALinear):
            raise TypeError(f"linear is already a {type(linear).__name__} (r={linear.r}); use it as it is")
        return super().from_linear(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                   use_rslora=use_rslora)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        super().reset_lora_parameters()
        if "lora_magnitude_vector" in self._parameters:
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = ‖W0[o] + s·(B A)[o]‖₂ (PEFT's ``DoraLinearLayer.update_layer``)."""
        self.lora_magnitude_vector.copy_(self.weight_norm())

    def weight_norm(self) -> Tensor:
        """‖W0[o] + s·(B A)[o]‖₂ [out] of the unmerged weight, without forming B A."""
        if self.merged:
            raise ValueError("DoRALinear.weight_norm(): the layer is merged; unmerge() first")
        return dora_weight_norm(self.weight, self.lora_A.to(self.weight.dtype),
                                self.lora_B.to(self.weight.dtype), self.scaling)

    def forward(self, x: Tensor) -> Tensor:
        if self._bypass:
            return F.linear(x, self.weight, self.bias)
        x, weight, bias, lora_A, lora_B = compute_inputs(x, self.weight, self.bias, self.lora_A, self.lora_B)
        if self.cache_weight_norm and not self.training and not torch.is_grad_enabled() \
                and not torch.compiler.is_compiling():
            norm = self._cached_norm(weight, lora_A, lora_B)
            return dora_linear_inference(x, weight, lora_A, lora_B, self.lora_magnitude_vector, self._scaling, bias,
                                         norm)
        self.__dict__.pop("_norm_cache", None)  # a training step may change what the norm depends on
        return dora_linear(x, weight, lora_A, lora_B, self.lora_magnitude_vector, self._scaling, bias,
                           dropout_p=self.lora_dropout, training=self.training)

    def _cached_norm(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> Tensor:
        """The norm of the (cast) weights, kept while the parameters behind them are unchanged."""
        own = (self.weight, self.lora_A, self.lora_B)
        key = (self._scaling, weight.dtype)
        cached = self.__dict__.get("_norm_cache")
        if cached is not None and cached[0] == key and all_match(cached[1], own):
            return cached[2]
        norm = dora_weight_norm(weight, lora_A, lora_B, self._scaling)
        # stamps, not ids: a parameter replaced by another at a freed one's id and address, or a
        # .data swap to new memory at the old address, must not match (lora_fused.value_cache)
        stamps = [stamp(t, contents=False) for t in own]
        if None not in stamps:
            self.__dict__["_norm_cache"] = (key, stamps, norm)
        return norm

    @torch.no_grad()
    def merge(self) -> None:
        """weight ← (m/norm) ⊙ (W0 + s·B A), norm of the unmerged weight (as PEFT); refuses NaN/inf."""
        if self.merged:
            super().merge()  # warns
            return
        if self.disabled:
            super().merge()  # raises
        norm = self.weight_norm().float()
        factor = (self.lora_magnitude_vector.float() / norm)[:, None]
        self._write_weight(factor * (self.weight.float() + self._delta_weight()), "merge")
        self._merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """weight ← weight / (m/norm) − s·B A with the norm merge() used."""
        if not self.merged:
            super().unmerge()  # warns
            return
        if self._merged_norm is None:
            raise ValueError("DoRALinear.unmerge(): the norm used to merge is unknown (a merged checkpoint "
                             "saved without it); reload the unmerged weight instead")
        factor = (self.lora_magnitude_vector.float() / self._merged_norm.float())[:, None]
        self._write_weight(self.weight.float() / factor - self._delta_weight(), "unmerge")
        self._merged_norm = None
        self.merged = False

    def get_extra_state(self) -> Tensor:
        """A tensor, so that ``state_dict`` stays all tensors (safetensors, Trainer checkpoints):
        unmerged, LoRALinear's 0-d bool ``merged``; merged, the norm merge() used (fp32 [out],
        needed to unmerge), or a 0-d True when that norm is unknown."""
        if self.merged and self._merged_norm is not None:
            return self._merged_norm
        return torch.tensor(self.merged)

    def set_extra_state(self, state) -> None:
        merged, norm = _decode_merge_state(state)
        self.merged = merged
        self._merged_norm = None if norm is None else norm.to(self.weight.device, torch.float32)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + self.EXTRA_STATE_KEY
        saved, norm = state_dict.get(key), None
        if saved is not None:  # LoRALinear reads the entry as the 0-d flag
            merged, norm = _decode_merge_state(saved)
            state_dict = dict(state_dict)
            state_dict[key] = torch.tensor(merged)
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if len(error_msgs) > errors:
            return
        if not self.merged:
            self._merged_norm = None
        elif prefix + "weight" in state_dict:  # a merged weight loaded: the norm it was merged with
            self._merged_norm = None if norm is None else norm.to(self.weight.device, torch.float32)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", use_dora=True"


def _decode_merge_state(state) -> tuple[bool, Optional[Tensor]]:
    """``(merged, merge norm or None)`` from a DoRALinear extra-state entry: a 0-d flag, a 1-D
    norm (merged), or the dict ``{"merged", "merged_norm"}`` of checkpoints saved before the entry
    was a tensor."""
    if isinstance(state, dict):
        return bool(state["merged"]), state.get("merged_norm")
    if not isinstance(state, Tensor) or state.dim() > 1:
        raise ValueError(f"a DoRALinear extra state must be a 0-d merged flag or the 1-D merge norm, got "
                         f"{type(state).__name__} {tuple(getattr(state, 'shape', ()))}")
    if state.dim() == 0:
        return bool(state), None
    return True, state


def is_dora_layer(module: nn.Module) -> bool:
    return isinstance(module, DoRALinear)


__all__ = ["DoRALinear", "dora_linear", "dora_weight_norm"]
