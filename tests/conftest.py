"""Test setup: on a machine without CUDA, run the Triton kernels through the interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, i.e. before
``lora_fused`` is imported, so it is set here at collection time.
"""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The strategy choice is not measured in tests (lora_fused.dispatch.tuning): timing every candidate
# on each new shape would slow the GPU tests and write ~/.cache; tests/dispatch/test_tuning.py
# turns measuring on where it is the subject.
os.environ.setdefault("LORA_FUSED_AUTOTUNE", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker: n workers x default threads oversubscribe the
    # cores (a tiny Llama step measured 0.5 s with defaults, 0.011 s with one thread).
    torch.set_num_threads(1)

from lora_fused.kernels import common as kernel_common  # noqa: E402

#: Whether the Triton kernels can run on the tests' tensors: CUDA tensors, or CPU tensors through
#: the interpreter (lora_fused/backend.py). Not so when TRITON_INTERPRET=0 is set on a machine
#: without CUDA: then a test's "triton" backend parameter is skipped, not failed.
TRITON_KERNELS_RUN = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
NO_TRITON_REASON = ("the Triton backend cannot run here: no CUDA device, and TRITON_INTERPRET is not 1 "
                    "(the interpreter is off)" if importlib.util.find_spec("triton") is not None
                    else "the Triton backend cannot run here: triton is not installed")


def pytest_collection_modifyitems(config, items):
    """Skip the "triton" instance of every test parametrised over ``backend`` where the kernels cannot run."""
    if TRITON_KERNELS_RUN:
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "triton":
            item.add_marker(pytest.mark.skip(reason=NO_TRITON_REASON))


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every kernel output starts as NaN: an unwritten element fails the comparison."""
    monkeypatch.setattr(kernel_common, "POISON_OUTPUTS", True)


@pytest.fixture(autouse=True)
def default_backend(monkeypatch):
    monkeypatch.delenv("LORA_FUSED_BACKEND", raising=False)


@pytest.fixture
def gpu_precision_flags():
    """GPU tests: TF32 off unless a test turns it on; restored afterwards; memory freed between tests."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
