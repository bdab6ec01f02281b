"""Which implementation runs an op: the Triton kernels or the torch backend.

CUDA tensors → Triton. CPU tensors → torch, unless ``TRITON_INTERPRET=1``,
where the Triton kernels run on CPU tensors through Triton's interpreter.
``LORA_FUSED_BACKEND=triton|torch`` overrides both.

The configuration is read once: whether triton imports is cached for the
process, and each decision is cached by the *values* of the two environment
variables (plus device type and dtype). Reading them costs two dictionary
lookups per call, so a test that sets either variable (``monkeypatch.setenv``)
is obeyed on the next call, with nothing to reset.

This is lora_fused's one importer of ``lora_fused.kernels``. The kernel families are
imported on first use (:func:`lora_kernels`, :func:`multi_kernels`, :func:`delta_kernels`,
:func:`dora_kernels`, :func:`dequant_kernels`, :func:`moe_kernels`, :func:`kernel_common`): each imports triton,
which the torch backend never needs. ``kernels/host.py``, which imports no triton, is
imported here at once: the strategies' names and the environment read.

Triton launches a kernel on the current CUDA device (and that device's current
stream), wherever its tensors live; :func:`on_tensor_device` makes the tensors'
device current around each op's launches.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Callable, TypeVar

import torch
from torch import Tensor

from lora_fused.kernels.host import (BACKWARD_STRATEGIES, FORWARD_STRATEGIES, GROUPED_STRATEGIES,  # noqa: F401
                                     MULTI_LORA_STRATEGIES, env_lookup)

BACKEND_ENV = "LORA_FUSED_BACKEND"
INTERPRET_ENV = "TRITON_INTERPRET"
BACKENDS = ("triton", "torch")


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (tried once per process)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get(INTERPRET_ENV, "0") == "1"


# Two environment reads a call, at dict speed (``kernels/host.py``: a private CPython route with
# its public fallback). The raw values serve only as the cache key; decisions are made from
# decoded values.
_env_get, (_BACKEND_KEY, _INTERPRET_KEY) = env_lookup(BACKEND_ENV, INTERPRET_ENV)
#: Decisions by (raw LORA_FUSED_BACKEND, raw TRITON_INTERPRET, device type, dtype).
_decisions: dict = {}


def _env_key() -> tuple:
    return _env_get(_BACKEND_KEY), _env_get(_INTERPRET_KEY)


def select_backend(device: torch.device, dtype: torch.dtype) -> str:
    """'triton' or 'torch' for tensors on ``device`` with ``dtype``."""
    return backend_for(device.type, dtype)


def backend_for(device_type: str, dtype: torch.dtype) -> str:
    """:func:`select_backend` by the device's type: one dict lookup once a decision is known."""
    key = (_env_get(_BACKEND_KEY), _env_get(_INTERPRET_KEY), device_type, dtype)
    decision = _decisions.get(key)
    if decision is None:
        decision = _select(os.environ.get(BACKEND_ENV, ""), os.environ.get(INTERPRET_ENV, "0"), device_type, dtype)
        _decisions[key] = decision  # errors are raised above, never cached
    return decision


def _select(forced: str, interpret: str, device_type: str, dtype: torch.dtype) -> str:
    """The decision for one (environment, device type, dtype)."""
    forced = forced.strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {forced!r}")
    # The interpreter computes in numpy, which has no bfloat16.
    triton_can_run = triton_available() and (
        device_type == "cuda"
        or (device_type == "cpu" and interpret == "1" and dtype != torch.bfloat16))
    if forced == "triton":
        if not triton_can_run:
            raise ValueError(f"{BACKEND_ENV}=triton needs CUDA tensors (or TRITON_INTERPRET=1 for "
                             f"float16/float32 CPU tensors) and an installed triton; got {dtype} "
                             f"tensors on {device_type}")
        if dtype == torch.float64:
            raise TypeError("the Triton kernels take float16, bfloat16 or float32, got float64")
        return "triton"
    if forced == "torch":
        return "torch"
    # float64 is the oracle's dtype: tl.dot has no fp64 tensor-core path, so it stays on torch.
    if triton_can_run and dtype != torch.float64:
        return "triton"
    return "torch"


def use_triton(x: Tensor, weight: Tensor) -> bool:
    """Triton for non-empty problems its backend selects; empty ones are the torch backend's."""
    # backend_for's lookup inlined (a call per op saved): ~0.4 µs in all once a decision is known.
    device = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type
    decision = _decisions.get((_env_get(_BACKEND_KEY), _env_get(_INTERPRET_KEY), device, x.dtype))
    if decision is None:
        decision = backend_for(device, x.dtype)
    return decision == "triton" and x.numel() > 0 and weight.shape[0] > 0


def device_type(t: Tensor) -> str:
    """``t.device.type`` without building a device object for the two common types (0.1 vs 0.4 µs)."""
    return "cuda" if t.is_cuda else "cpu" if t.is_cpu else t.device.type


# ------------------------------------------------------------------ the kernel families, imported on first use


# Each family is imported by an import statement, which dynamo traces when the first call of
# a process is inside a compiled region (it refuses importlib.import_module).
@functools.cache
def lora_kernels() -> ModuleType:
    """``lora_fused.kernels.lora_linear`` (imported on first use: it imports triton)."""
    from lora_fused.kernels import lora_linear
    return lora_linear


@functools.cache
def multi_kernels() -> ModuleType:
    """``lora_fused.kernels.multi_lora`` (imported on first use: it imports triton)."""
    from lora_fused.kernels import multi_lora
    return multi_lora


@functools.cache
def delta_kernels() -> ModuleType:
    """``lora_fused.kernels.lora_delta`` (imported on first use: it imports triton)."""
    from lora_fused.kernels import lora_delta
    return lora_delta


@functools.cache
def dora_kernels() -> ModuleType:
    """``lora_fused.kernels.dora`` (imported on first use: it imports triton)."""
    from lora_fused.kernels import dora
    return dora


@functools.cache
def dequant_kernels() -> ModuleType:
    """``lora_fused.kernels.dequant4bit`` (imported on first use: it imports triton)."""
    from lora_fused.kernels import dequant4bit
    return dequant4bit


@functools.cache
def moe_kernels() -> ModuleType:
    """``lora_fused.kernels.moe_lora`` (imported on first use: it imports triton)."""
    from lora_fused.kernels import moe_lora
    return moe_lora


@functools.cache
def kernel_common() -> ModuleType:
    """``lora_fused.kernels.common``, what the families share (imported on first use: it imports triton)."""
    from lora_fused.kernels import common
    return common


# --------------------------------------------------------------------------
# The device a Triton launch runs on
# --------------------------------------------------------------------------
def _cuda_index(t: Tensor) -> int:
    """t's CUDA device index; -1 for a tensor off CUDA, or while dynamo traces: the guarded
    functions run inside custom ops, which are not traced, and a traced caller (qlora's
    autograd Function) is left to the compiled graph, which the device query is not for."""
    return t.get_device() if t.is_cuda and not torch.compiler.is_compiling() else -1


#: The current CUDA device's index: ``torch.cuda.current_device`` without its lazy-init check
#: (asked only about a CUDA tensor, which exists only once CUDA is initialised). Absent from
#: CPU-only builds, where no tensor is on CUDA.
_current_cuda_index = getattr(torch._C, "_cuda_getDevice", None)
#: Makes a device current for a block (the device before it is restored after).
_cuda_device = torch.cuda.device

_Fn = TypeVar("_Fn", bound=Callable)


def on_tensor_device(fn: _Fn) -> _Fn:
    """``fn(t, ...)`` with t's CUDA device current, so that the Triton kernels it launches run on
    t's GPU (Triton launches on the current device and stream; a model split over GPUs calls
    ops on tensors of a device that is not current). For the function that runs an op's
    launches (every tensor of an op is on one device, as its checks ensure). When t is off CUDA,
    or its device is current already (always with one GPU), ``fn`` is called as it is: a device
    query and a compare, no context. Nested calls switch once: the inner ones find it current."""
    @functools.wraps(fn)
    def on_device(t, *args, **kwargs):
        index = _cuda_index(t)
        if index < 0 or index == _current_cuda_index():
            return fn(t, *args, **kwargs)
        with _cuda_device(index):
            return fn(t, *args, **kwargs)
    return on_device
