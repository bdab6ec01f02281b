"""The test setup (tests/conftest.py): a backend this machine cannot run is skipped, not failed.

With TRITON_INTERPRET=0 set explicitly on a machine without CUDA, CPU tensors cannot take the
Triton kernels (lora_fused/backend.py refuses LORA_FUSED_BACKEND=triton): the "triton" instance
of a test parametrised over ``backend`` must then be skipped with the reason, the "torch" one run.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent

BACKEND_PARAMETRISED = '''
import pytest
import torch
import lora_fused as lf


def check_lora_linear():
    g = torch.Generator().manual_seed(0)
    x, w, a, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((3, 8), (5, 8), (2, 8), (5, 2)))
    y = lf.lora_linear(x.float(), w.float(), a.float(), b.float(), 2.0).double()
    ref = x @ w.T + 2.0 * (x @ a.T) @ b.T
    assert ((y - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", request.param)
    return request.param


def test_fixture_form(backend):
    check_lora_linear()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_parametrize_form(backend, monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", backend)
    check_lora_linear()
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the Triton backend runs: nothing to skip")
def test_triton_backend_parameter_skips_when_the_interpreter_is_off_and_there_is_no_cuda(tmp_path):
    (tmp_path / "test_backends.py").write_text(textwrap.dedent(BACKEND_PARAMETRISED))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LORA_FUSED_BACKEND"))}
    env.update(TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))
    # tests/conftest.py as a plugin: the file under test lives outside tests/
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-p",
                          "no:xdist", "-q", "-rs", "test_backends.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "2 passed, 2 skipped" in out, out
    assert "no CUDA device, and TRITON_INTERPRET is not 1" in out, out
