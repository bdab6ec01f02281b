"""The LoRA linear op: custom ops with autograd, and the public function.

``lora_fused::lora_linear_fwd`` and ``lora_fused::lora_linear_bwd`` are
``torch.library`` custom ops, opaque to ``torch.compile`` (no graph breaks)
with fake kernels for tracing; each dispatches to the Triton kernels or the
torch reference (see :mod:`lora_fused.backend`). Saved for backward: x, S and
the dropout seed, never a mask or a copy of drop(x).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .backend import select_backend
from .validation import check_lora_linear_args

_SEED_HIGH = 2**62


def _kernels():
    from lora_fused.kernels import lora_linear as kernels
    return kernels


def _use_triton(x: Tensor, weight: Tensor) -> bool:
    """Triton for non-empty problems its backend selects; empty ones are the reference's."""
    return select_backend(x.device, x.dtype) == "triton" and x.numel() > 0 and weight.shape[0] > 0


def _keep_mask(seed: Optional[Tensor], x2d: Tensor, dropout_p: float) -> Optional[Tensor]:
    if dropout_p == 0.0 or seed is None:
        return None
    return reference.torch_backend_keep_mask(int(seed.item()), x2d.shape[0], x2d.shape[1],
                                             dropout_p, device=x2d.device)


@torch.library.custom_op("lora_fused::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                    lora_B: Tensor, scaling: float, dropout_p: float,
                    seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(y, S) for 2-D x [M, in]: y = x W0ᵀ + b + s·S Bᵀ, S = drop(x) Aᵀ [M, r]."""
    if _use_triton(x, weight):
        return _kernels().lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    keep = _keep_mask(seed, x, dropout_p)
    return reference.lora_forward_torch(x, weight, bias, lora_A, lora_B, scaling, keep, dropout_p)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("lora_fused::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                    shrink: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                    need_dx: bool, need_dlora: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dA, dB); a gradient that is not needed comes back as an empty tensor."""
    if _use_triton(x, weight):
        grads = _kernels().lora_backward(grad_y, x, weight, lora_A, lora_B, shrink, scaling,
                                         dropout_p, seed, need_dx, need_dlora)
    else:
        keep = _keep_mask(seed, x, dropout_p)
        grads = reference.lora_backward_torch(grad_y, x, weight, lora_A, lora_B, shrink, scaling,
                                              keep, dropout_p, need_dx, need_dlora)
    return tuple(g if g is not None else grad_y.new_empty(0) for g in grads)


@lora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed, need_dx, need_dlora):
    empty = grad_y.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else empty,
            lora_A.new_empty(lora_A.shape) if need_dlora else empty,
            lora_B.new_empty(lora_B.shape) if need_dlora else empty)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, shrink = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, shrink, seed)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p


def _backward(ctx, grad_y, _grad_shrink):
    x, weight, lora_A, lora_B, shrink, seed = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if need_x or need_a or need_b:
        dx, da, db = torch.ops.lora_fused.lora_linear_bwd(
            grad_y, x, weight, lora_A, lora_B, shrink, ctx.scaling, ctx.dropout_p, seed,
            need_x, need_a or need_b)
        grad_x = dx if need_x else None
        grad_a = da if need_a else None
        grad_b = db if need_b else None
    if need_w:  # only when the base weight itself is trained: dW0 = dYᵀ x (out × in, by request)
        grad_w = grad_y.t() @ x
    if need_bias:
        grad_bias = grad_y.sum(0)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


torch.library.register_autograd("lora_fused::lora_linear_fwd", _backward, setup_context=_setup_context)


def draw_dropout_seed(device: torch.device) -> Tensor:
    """An int64 [1] seed from torch's generator for ``device``: ``torch.manual_seed`` reproduces it."""
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                bias: Optional[Tensor] = None, *, dropout_p: float = 0.0,
                training: bool = False) -> Tensor:
    """``y = x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T``.

    x [..., in], weight [out, in], lora_A [r, in], lora_B [out, r], bias [out] | None.
    Dropout (probability ``dropout_p``) applies to the LoRA branch only and only
    when ``training``. Differentiable in x, lora_A, lora_B, and in weight/bias
    when they require grad. ``B A`` is never formed.
    """
    scaling, dropout_p = check_lora_linear_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    active_p = dropout_p if training else 0.0
    seed = draw_dropout_seed(x.device) if active_p > 0.0 else None
    x2d = x.reshape(-1, x.shape[-1])
    y, _ = torch.ops.lora_fused.lora_linear_fwd(x2d, weight, bias, lora_A, lora_B, scaling,
                                                active_p, seed)
    return y.reshape(*x.shape[:-1], weight.shape[0])
