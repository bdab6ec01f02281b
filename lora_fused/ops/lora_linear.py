"""The LoRA linear op and the public function ``lora_linear``.

``lora_linear(x)`` checks its arguments once, then runs the forward below by the
route its context needs: a plain autograd Function in eager mode, the ``torch.library``
custom ops ``lora_fused::lora_linear_fwd`` / ``lora_linear_bwd`` under ``torch.compile`` /
``torch.export``, all defined from ``_forward`` and ``_lora_grads`` by
:func:`lora_fused.ops._scaffold.define_lora_op`. The forward and
backward dispatch to the Triton kernels (:mod:`lora_fused.kernels.lora_linear`)
or to :mod:`lora_fused.backends.torch_backend` (see :mod:`lora_fused.dispatch.backend`). Saved for
backward: x, S and the dropout seed, never a mask or a copy of drop(x).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import torch_backend
from ..dispatch import tuning
from ._scaffold import apply_function, define_lora_op, needs_autograd, records_autograd
from .._compat import any_autocast_enabled
from ..dispatch.backend import backend_for, device_type, use_triton
from ..validation import check_lora_linear_args, lora_linear_args_ok

_SEED_HIGH = 2**62


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             scaling: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(y, S) for 2-D x [M, in]: y = x W0ᵀ + b + s·drop(x) Aᵀ Bᵀ, S the backend's saved shrink."""
    if use_triton(x, weight):  # the strategy forced, cached or measured; the launcher cached by call signature
        return tuning.triton_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return torch_backend.lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _lora_grads(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, shrink: Tensor,
                scaling: float, dropout_p: float, seed: Optional[Tensor], need_dx: bool, need_dlora: bool):
    """(dX, dA, dB), None where not needed."""
    if use_triton(x, weight):
        return tuning.triton_backward(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed,
                                      need_dx, need_dlora)
    return torch_backend.lora_backward(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p,
                                       seed, need_dx, need_dlora)


def _fake_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


#: The custom ops ``lora_fused::lora_linear_fwd`` / ``_bwd`` and the eager Function (``_scaffold``).
LORA_LINEAR = define_lora_op(("lora_fused::lora_linear_fwd", "lora_fused::lora_linear_bwd"), _forward,
                             _lora_grads, fake_forward=_fake_forward, function_name="_EagerLoRALinear",
                             keeps_strategy=True)
_EagerLoRALinear = LORA_LINEAR.function  # a module global: what the eager entry points look up per call


# The same ops with s and p as 0-d tensors: what a compiled ``LoRALinear`` calls (``lora_linear_scaled_by``).
# p is None when dropout is off (no seed), a 0-d float64 tensor (0 < p < 1) when on.
def _p_or_zero(dropout_p: Optional[Tensor]):
    return 0.0 if dropout_p is None else dropout_p


def _forward_t(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
               scaling: Tensor, dropout_p: Optional[Tensor], seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``_forward`` with s and p 0-d float64 tensors (read by the kernels through pointers)."""
    return _forward(x, weight, bias, lora_A, lora_B, scaling, _p_or_zero(dropout_p), seed)


def _lora_grads_t(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, shrink: Tensor,
                  scaling: Tensor, dropout_p: Optional[Tensor], seed: Optional[Tensor], need_dx: bool,
                  need_dlora: bool):
    """``_lora_grads`` with s and p 0-d float64 tensors (p None: no dropout)."""
    return _lora_grads(grad_y, x, weight, lora_A, lora_B, shrink, scaling, _p_or_zero(dropout_p), seed,
                       need_dx, need_dlora)


#: ``lora_fused::lora_linear_fwd_t`` / ``_bwd_t``: called by compiled graphs only, so no eager Function.
LORA_LINEAR_T = define_lora_op(("lora_fused::lora_linear_fwd_t", "lora_fused::lora_linear_bwd_t"), _forward_t,
                               _lora_grads_t, fake_forward=_fake_forward, function_name=None)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)  # .to even as a no-op costs a dispatch


def compute_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor):
    """A layer's (x, weight, bias, lora_A, lora_B) in the dtype its LoRA op computes in.

    Under autocast for x's device: autocast's dtype for all of them, as autocast does for
    F.linear (W0 too). Otherwise x's dtype for lora_A / lora_B only: LoRA weights may be kept
    in fp32 beside a bf16 base (as PEFT does; the cast is differentiable, so their gradients
    arrive in fp32), while a base-weight dtype mismatch stays the caller's error (the op
    raises naming both dtypes): W0 is never copied per call. Tensors already in the dtype
    are passed through without a call."""
    if not isinstance(x, Tensor):  # before x's device is read
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dtype = autocast_dtype(x)
    if dtype is not None:
        return cast_all(dtype, x, weight, bias, lora_A, lora_B)
    return x, weight, bias, _cast(lora_A, x.dtype), _cast(lora_B, x.dtype)


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """Autocast's dtype for x's device, or None when autocast is off there."""
    device = device_type(x)
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def cast_all(dtype: torch.dtype, *tensors: Optional[Tensor]) -> tuple:
    """Each tensor in ``dtype`` (None stays None), as autocast casts F.linear's inputs."""
    return tuple(_cast(t, dtype) for t in tensors)


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
    if not lora_linear_args_ok(x, weight, lora_A, lora_B, scaling, bias, dropout_p):
        scaling, dropout_p = check_lora_linear_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    if training and dropout_p > 0.0:
        seed = draw_dropout_seed(x.device)
    else:
        seed, dropout_p = None, 0.0
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    inputs = (x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    if torch.compiler.is_compiling():
        y = LORA_LINEAR.fwd(*inputs)[0]
    elif use_triton(x2d, weight):  # the Function, or the launcher directly when nothing needs a gradient
        y = apply_function(_EagerLoRALinear, inputs) if needs_autograd(inputs) else tuning.triton_forward(*inputs)[0]
    elif not needs_autograd(inputs) or _native_autograd_applies(x2d, weight, lora_A, lora_B, seed):
        y = torch_backend.lora_forward(*inputs)[0]  # the torch backend directly (see _native_autograd_applies)
    else:
        y = apply_function(_EagerLoRALinear, inputs)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_layer_call(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                           lora_B: Tensor, scaling: float, dropout_p: float = 0.0) -> Optional[Tensor]:
    """A layer's eager forward in the fewest host steps: ``y`` of :func:`lora_linear`
    (``training=True``), bit for bit, or None when the call needs the general route (autocast
    on, LoRA weights in another dtype than x, 1-D x). On the Triton backend see
    :func:`_layer_call_triton`; on the torch backend, without
    dropout the forward's own ops record autograd where that gives the Function's gradients
    bit for bit (``_native_autograd_applies``; otherwise None); with dropout (``dropout_p`` > 0,
    the caller's training-mode value) the Function runs, which saves the seed, never the mask.

    For a caller that validated ``scaling`` and whose parameters are its own (``LoRALinear``):
    the shapes, dtypes and devices of x against them are checked by the torch ops themselves,
    and a failure is re-raised as the clear error of :func:`check_lora_linear_args`. The bias
    is the layer's ``[out]`` parameter; one replaced by a broadcastable tensor of another
    shape broadcasts, as in ``nn.Linear``.
    """
    dtype = x.dtype if isinstance(x, Tensor) else None
    if lora_A.dtype != dtype or lora_B.dtype != dtype or x.dim() < 2 or any_autocast_enabled():
        return None  # not a tensor, LoRA weights to cast, 0-d / 1-D x, autocast (any device): the general route
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if backend_for("cpu" if x.is_cpu else device_type(x), dtype) != "torch":
        return _layer_call_triton(x, x2d, weight, bias, lora_A, lora_B, scaling, dropout_p)
    if dropout_p:
        return _layer_call_function(x, x2d, weight, bias, lora_A, lora_B, scaling, dropout_p)
    if (records_autograd(x, weight, bias, lora_A, lora_B)
            and not _native_autograd_applies(x2d, weight, lora_A, lora_B, None)):
        return None  # autograd through operands only the Function differentiates bit-identically
    try:  # torch_backend.lora_forward without dropout, inlined (its checks of s and p are done)
        y = torch_backend.add_lora_term(F.linear(x2d, weight, bias), F.linear(x2d, lora_A), lora_B.t(), scaling)
    except RuntimeError:  # a shape, dtype or device mismatch: the message names the argument
        check_lora_linear_args(x, weight, lora_A, lora_B, scaling, bias, 0.0)
        raise
    return y if x2d is x else y.view(*x.shape[:-1], weight.shape[0])


def _layer_call_triton(x: Tensor, x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                       lora_B: Tensor, scaling: float, dropout_p: float) -> Optional[Tensor]:
    """:func:`lora_linear_layer_call` on the Triton backend: the kernels read what they are given,
    so the arguments are checked first (one expression, the full checks when it fails); then
    :func:`_layer_call_function`. None for an empty problem (the torch backend's, as
    ``use_triton`` decides)."""
    if not lora_linear_args_ok(x, weight, lora_A, lora_B, scaling, bias, dropout_p):
        check_lora_linear_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    if x2d.numel() == 0 or weight.shape[0] == 0:
        return None
    return _layer_call_function(x, x2d, weight, bias, lora_A, lora_B, scaling, dropout_p)


def _layer_call_function(x: Tensor, x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                         lora_B: Tensor, scaling: float, dropout_p: float) -> Tensor:
    """:func:`lora_linear_layer_call` by the Function (dropout on the torch backend; Triton): a
    seed when dropout is on, then the Function, or the forward alone when nothing needs a
    gradient, as :func:`lora_linear` runs it."""
    inputs = (x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, draw_dropout_seed(x.device) if dropout_p else None)
    try:
        y = apply_function(_EagerLoRALinear, inputs) if needs_autograd(inputs) else _forward(*inputs)[0]
    except RuntimeError:  # as in lora_linear_layer_call
        check_lora_linear_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
        raise
    return y if x2d is x else y.view(*x.shape[:-1], weight.shape[0])


def _check_0d_on(name: str, value, x: Tensor) -> None:
    """``value`` must be a 0-d tensor on x's device (a host tensor would not reach the kernels)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"lora_linear_scaled_by: {name} must be a 0-d tensor, got {type(value).__name__}")
    if value.dim() != 0 or value.device != x.device:
        raise ValueError(f"lora_linear_scaled_by: {name} must be a 0-d tensor on x's device ({x.device}), "
                         f"got shape {tuple(value.shape)} on {value.device}")


def lora_linear_scaled_by(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor,
                          bias: Optional[Tensor] = None, *, dropout_p=0.0,
                          training: bool = False) -> Tensor:
    """``lora_linear`` under ``torch.compile`` with s a 0-d float64 tensor (``LoRALinear``'s
    ``scaling`` buffer, validated when set): dynamo guards no float value of s, so a new s
    reuses the compiled graph, and the kernels read s through a pointer, so a CUDA-graph
    replay sees the value written last (a float would be baked in at capture).

    ``dropout_p``: a float, or a 0-d float64 tensor that the caller validated to lie in
    (0, 1) (``LoRALinear``'s ``lora_dropout`` buffer, passed only while dropout is on): a
    tensor turns dropout on without a look at its value, so a new non-zero p reuses the
    graph (dynamo guards the float, and only the switch 0 <-> non-zero changes the graph)."""
    if isinstance(dropout_p, Tensor):
        _check_0d_on("dropout_p", dropout_p, x)
        check_lora_linear_args(x, weight, lora_A, lora_B, 1.0, bias, 0.5)  # s, p: any valid
        dropout_on = True
    else:
        _, dropout_p = check_lora_linear_args(x, weight, lora_A, lora_B, 1.0, bias, dropout_p)  # s: any valid
        dropout_on = dropout_p > 0.0
    _check_0d_on("scaling", scaling, x)
    seed = draw_dropout_seed(x.device) if training and dropout_on else None
    if seed is None:
        dropout_p = None
    elif not isinstance(dropout_p, Tensor):
        dropout_p = torch.tensor(dropout_p, dtype=torch.float64, device=x.device)
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = LORA_LINEAR_T.fwd(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)[0]
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def _native_autograd_applies(x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                             seed: Optional[Tensor]) -> bool:
    """Whether the torch backend's forward (F.linear, F.linear, addmm_) may record its own autograd:
    no dropout (its mask would be saved) and contiguous x, W0, A, B, the layouts for which
    ``torch_backend.lora_backward`` computes autograd's own GEMMs (autograd picks other GEMMs
    for column-major operands), so both routes stay bit-identical."""
    # M = r = 1 makes S [1, 1] column-major too: autograd then takes (Bᵀ dYᵀ)ᵀ for dS.
    return (seed is None and x2d.is_contiguous() and weight.is_contiguous() and lora_A.is_contiguous()
            and lora_B.is_contiguous() and (x2d.shape[0] != 1 or lora_A.shape[0] != 1))
