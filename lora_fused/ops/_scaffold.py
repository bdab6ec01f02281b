"""The plumbing both LoRA ops share (``lora_linear`` and ``multi_lora`` in this folder).

Each op takes ``(x, weight, bias, lora_A, lora_B, *rest)`` and returns ``(y, S)``.
It runs by one of two routes, with the same forward and backward functions (each op's
entry point picks its route: ``lora_linear.lora_linear``, ``lora_linear.lora_linear_layer_call``,
``multi_lora.apply_multi_lora``):

- eager: a plain ``torch.autograd.Function`` (about 10 µs of host time), or the
  forward alone when nothing needs a gradient or when the forward's own torch ops
  record the same backward (the torch backend without dropout, see ``lora_linear``);
- ``torch.compile`` / ``torch.export``: the ``torch.library`` custom ops, opaque
  to the tracer (zero graph breaks) with fake kernels (about 20-35 µs a call
  eagerly, which is why eager calls do not use them).

Both routes compute bit-identical results (tests/test_eager_path.py).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

#: The differentiable inputs every op starts with: x, weight, bias, lora_A, lora_B.
N_DIFFERENTIABLE = 5

LoRAGrads = Callable[[bool, bool], tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]


def records_autograd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor) -> bool:
    """Whether a call must record a backward: grad mode on and a differentiable input requires grad."""
    return torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                        or weight.requires_grad or (bias is not None and bias.requires_grad))


def needs_autograd(inputs: Sequence) -> bool:
    """:func:`records_autograd` of an op's inputs (the differentiable tensors first)."""
    x, weight, bias, lora_A, lora_B = inputs[:N_DIFFERENTIABLE]  # unrolled: a generator costs ~1 µs
    return records_autograd(x, weight, bias, lora_A, lora_B)


_direct_apply: dict = {}
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def apply_function(function: type[torch.autograd.Function], inputs: tuple) -> Tensor:
    """``function.apply(*inputs)`` for a Function without ``setup_context``, less its Python wrapper.

    ``Function.apply`` (Python) checks for functorch transforms, unwraps tensors left from a
    finished transform (``unwrap_if_dead``) and calls the C++ ``_FunctionBase.apply``; its
    generic argument handling costs about 5 µs a call. Here: the same steps for our
    argument layout (the differentiable tensors first), the wrapper itself under a transform."""
    if torch._C._are_functorch_transforms_active():
        return function.apply(*inputs)
    apply = _direct_apply.get(function)
    if apply is None:
        apply = _direct_apply[function] = super(torch.autograd.Function, function).apply
    # Only the differentiable inputs: a dead wrapper elsewhere is unwrapped by the ops that read it.
    # Unrolled for the ops' eight inputs: a comprehension or slices cost 2-4 µs more.
    x, weight, bias, lora_A, lora_B, rest0, rest1, rest2 = inputs
    return apply(_unwrap_if_dead(x), _unwrap_if_dead(weight), bias if bias is None else _unwrap_if_dead(bias),
                 _unwrap_if_dead(lora_A), _unwrap_if_dead(lora_B), rest0, rest1, rest2)


def input_grads(needs_input_grad: Sequence[bool], grad_y: Tensor, x: Tensor, lora_grads: LoRAGrads) -> tuple:
    """Gradients for all of an op's inputs: (dX, dW0, db, dA, dB) then None for each other input.

    ``lora_grads(need_dx, need_dlora)`` gives (dX, dA, dB). dW0 = dYᵀ x and db = Σ dY only
    when the base weight or bias itself is trained."""
    need_x, need_w, need_bias, need_a, need_b = needs_input_grad[:N_DIFFERENTIABLE]
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if need_x or need_a or need_b:
        dx, da, db = lora_grads(need_x, need_a or need_b)
        grad_x = dx if need_x else None
        grad_a = da if need_a else None
        grad_b = db if need_b else None
    if need_w:
        grad_w = grad_y.t() @ x
    if need_bias:
        grad_bias = grad_y.sum(0)
    others = (None,) * (len(needs_input_grad) - N_DIFFERENTIABLE)
    return (grad_x, grad_w, grad_bias, grad_a, grad_b) + others


def as_op_outputs(grads: tuple, like: Tensor) -> tuple[Tensor, ...]:
    """A custom op returns tensors: an unneeded gradient (None) becomes an empty tensor."""
    return tuple(g if g is not None else like.new_empty(0) for g in grads)


def fake_grads(grad_y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, need_dx: bool,
               need_dlora: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The fake kernel of a backward op: (dX, dA, dB) shaped like their inputs, or empty."""
    empty = grad_y.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else empty,
            lora_A.new_empty(lora_A.shape) if need_dlora else empty,
            lora_B.new_empty(lora_B.shape) if need_dlora else empty)
