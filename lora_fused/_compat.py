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
