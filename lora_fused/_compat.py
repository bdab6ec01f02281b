"""Every private PyTorch and Triton API lora-fused calls, each beside its public fallback.

Private APIs buy host time on the per-call path (microseconds per layer call, see
``bench/goals.py``, goal H7); they may change or vanish in any release. Each entry here
takes the private route when it exists and behaves as documented, and the public route
otherwise, so an upgrade costs speed, never correctness. ``tests/test_compat.py`` runs
every fallback against the private route.

The kernels (``kernels/``) import nothing from lora_fused; their own private Triton calls
live in ``kernels/common.py`` with their fallbacks.
"""
from __future__ import annotations

from typing import Callable

import torch

# --- autograd and autocast (used by ops/ and modules/) ------------------------------------


def _private(owner, *path: str):
    """``owner.<path...>`` when every attribute exists, else None (a removed private API)."""
    for name in path:
        owner = getattr(owner, name, None)
        if owner is None:
            return None
    return owner


def function_apply(function: type) -> Callable:
    """The public route of :func:`direct_apply`: ``function.apply`` itself."""
    return function.apply


def direct_apply(function: type) -> Callable:
    """``function.apply`` without its Python wrapper: the C++ ``_FunctionBase.apply``, bound to
    ``function`` (a ``torch.autograd.Function`` without ``setup_context``).

    ``Function.apply`` (Python) binds default arguments, checks for functorch transforms and
    unwraps dead wrappers before it calls this; that generic handling costs a few µs a call.
    A caller of the direct apply does those steps itself (``ops/_scaffold.apply_function``,
    with :data:`unwrap_if_dead` and :data:`functorch_transforms_active`). Fallback, when the C++
    base or the unwrap is missing: ``function.apply``, which does them all."""
    if unwrap_if_dead is keep_tensor or _private(torch._C, "_FunctionBase") is None:
        return function_apply(function)
    return super(torch.autograd.Function, function).apply


def keep_tensor(tensor):
    """The public route of :data:`unwrap_if_dead`: the tensor as it is (without functorch's
    private hook, a wrapper left from a finished transform stays; ``Function.apply`` unwraps it)."""
    return tensor


#: A tensor without the functorch wrapper of a transform that has finished (what
#: ``Function.apply`` does to its arguments before the C++ apply).
unwrap_if_dead = _private(torch._C, "_functorch", "unwrap_if_dead") or keep_tensor


def transforms_maybe_active() -> bool:
    """The public route of :data:`functorch_transforms_active`: always True, so that callers
    take the public ``Function.apply``, which handles transforms itself."""
    return True


#: Whether a functorch transform (vmap, grad, jvp) is active around the call.
functorch_transforms_active = _private(torch._C, "_are_functorch_transforms_active") or transforms_maybe_active

#: The device types whose autocast state ``torch._C._is_any_autocast_enabled`` reads.
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "ipu", "xla", "hpu", "privateuseone", "mtia")


def autocast_enabled_on_a_device() -> bool:
    """The public route of :data:`any_autocast_enabled`: ``torch.is_autocast_enabled`` per
    device type (each call parses its string: slower, the same answer)."""
    return any(torch.is_autocast_enabled(device) for device in AUTOCAST_DEVICE_TYPES)


#: Whether autocast is on for any device, in one call without a device argument (what
#: torch.utils.checkpoint asks).
any_autocast_enabled = _private(torch._C, "_is_any_autocast_enabled") or autocast_enabled_on_a_device


def strides_overlap(tensor) -> bool:
    """The public route of :func:`has_internal_overlap`: a dimension of size > 1 with stride 0
    (an expanded view), the one case ATen reports as overlapping for certain."""
    return any(stride == 0 and size > 1 for size, stride in zip(tensor.shape, tensor.stride()))


_debug_overlap = _private(torch, "_debug_has_internal_overlap")


def has_internal_overlap(tensor) -> bool:
    """Whether elements of ``tensor`` share memory for certain (ATen's ``MemOverlap::Yes``), so
    an in-place write into it is refused."""
    if _debug_overlap is None:
        return strides_overlap(tensor)
    return _debug_overlap(tensor) == 1  # 0 No, 1 Yes, 2 TooHard


# --- end of autograd and autocast ---------------------------------------------------------


# --- environment and precision (used by dispatch/ and backends/) ---------------------------
# Both private calls of this kind, each with its public fallback, live in the kernels, which
# make the same reads on their own per-call paths and import nothing from lora_fused (one home
# each, below every module here):
# - ``os.environ._data``, an environment read at dict speed: ``kernels/host.py``
#   (``env_lookup``, ``env_raw``), which imports no triton; ``dispatch/backend.py`` reads
#   LORA_FUSED_BACKEND and TRITON_INTERPRET through it.
# - ``torch._C._get_fp32_precision_getter`` / ``_get_cublas_allow_tf32``, the TF32 setting:
#   ``kernels/common.py`` (``tf32_matmul_enabled``, ``dot_precision``).
# ``tests/test_compat.py`` forces each fallback and compares it with the private route.
# --- end of environment and precision ------------------------------------------------------
