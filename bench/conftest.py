"""pytest setup for the benchmark tests in bench/ (``pytest bench/ --benchmark-only``).

Not collected by the normal test run (pytest.ini's testpaths is tests/). On a
machine without CUDA the layer runs lora-fused's torch path (the Triton
interpreter is never timed) and the shapes shrink, as with ``python -m bench``.
Without pytest-benchmark installed, a stand-in ``benchmark`` fixture runs each
case once (no timing), so ``pytest bench/`` still proves the cases run.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _torch_paths_without_cuda(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")


class _RunOnce:
    """pytest-benchmark's fixture surface, minus the timing: calls the function once."""

    def __init__(self):
        self.group = None
        self.extra_info = {}

    def __call__(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def pedantic(self, target, args=(), kwargs=None, setup=None, teardown=None, rounds=1,
                 warmup_rounds=0, iterations=1):
        if setup is not None:
            setup()
        out = target(*args, **(kwargs or {}))
        if teardown is not None:
            teardown()
        return out


class _FallbackBenchmarkPlugin:
    """Registered when pytest-benchmark is missing (or disabled with -p no:benchmark)."""

    @pytest.fixture
    def benchmark(self):
        return _RunOnce()


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        config.pluginmanager.register(_FallbackBenchmarkPlugin(), "lora-fused-benchmark-fallback")
