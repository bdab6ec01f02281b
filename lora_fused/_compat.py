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

# --- autograd and autocast (used by ops/) -----------------------------------------------


# --- end of autograd and autocast ---------------------------------------------------------


# --- environment and precision (used by dispatch/ and backends/) ---------------------------


# --- end of environment and precision ------------------------------------------------------
