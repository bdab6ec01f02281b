"""Which implementation runs an op: the Triton kernels or the torch reference.

CUDA tensors → Triton. CPU tensors → torch, unless ``TRITON_INTERPRET=1``,
where the Triton kernels run on CPU tensors through Triton's interpreter.
``LORA_FUSED_BACKEND=triton|torch`` overrides both.
"""
from __future__ import annotations

import os

import torch

BACKEND_ENV = "LORA_FUSED_BACKEND"
BACKENDS = ("triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(device: torch.device, dtype: torch.dtype) -> str:
    """'triton' or 'torch' for tensors on ``device`` with ``dtype``."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {forced!r}")
    # The interpreter computes in numpy, which has no bfloat16.
    triton_can_run = triton_available() and (
        device.type == "cuda"
        or (device.type == "cpu" and interpreter_enabled() and dtype != torch.bfloat16))
    if forced == "triton":
        if not triton_can_run:
            raise ValueError(f"{BACKEND_ENV}=triton needs CUDA tensors (or TRITON_INTERPRET=1 for "
                             f"float16/float32 CPU tensors) and an installed triton; got {dtype} "
                             f"tensors on {device}")
        if dtype == torch.float64:
            raise TypeError("the Triton kernels take float16, bfloat16 or float32, got float64")
        return "triton"
    if forced == "torch":
        return "torch"
    # float64 is the oracle's dtype: tl.dot has no fp64 tensor-core path, so it stays on torch.
    if triton_can_run and dtype != torch.float64:
        return "triton"
    return "torch"
