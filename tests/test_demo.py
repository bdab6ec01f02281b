"""The main job, `python -m lora_fused.demo`, runs end to end (few steps; torch backend).

The kernels are tested elsewhere; here the torch backend keeps the tiny Llama
fast, and what is checked is the job's plumbing: pretrain, inject, fine-tune,
PEFT save/reload, three adapters, mixed-batch serving (MultiLoRALinear slots loaded from the saved adapters), the step-time table.
"""
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tqdm")

from lora_fused import demo  # noqa: E402


def test_demo_runs_end_to_end(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    demo.main(["--device", "cpu", "--pretrain-steps", "3", "--steps", "3", "--timing-steps", "1",
               "--rank", "4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "max |logit difference| = 0.00e+00" in out
    for name in ("capitals", "mirror", "river"):
        assert (tmp_path / name / "adapter_model.safetensors").exists()
        assert (tmp_path / name / "adapter_config.json").exists()
    assert "mixed batch" in out and "provider" in out and "fused" in out and "eager" in out
    assert "one mixed batch (lf.multi_lora_linear)" in out and "same completions for" in out


def test_checkout_root_does_not_shadow_pypi_kernels():
    """A process started in the checkout's root (the README's commands) has kernels/ on sys.path
    under the name of PyPI's ``kernels``, which transformers >= 5.25 imports: ``import kernels``
    there must give the installed package (or fail as if the folder were absent), never ours."""
    import os
    import subprocess
    import sys
    from importlib.metadata import PackageNotFoundError, distribution

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = ("import kernels, lora_fused.kernels as ours, transformers; transformers.LlamaConfig(); "
             "assert kernels is not ours; print(kernels.__file__)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120)
    try:
        installed = distribution("kernels")
    except PackageNotFoundError:
        assert done.returncode != 0 and "No module named 'kernels'" in done.stderr, (done.stdout, done.stderr)
        return
    assert done.returncode == 0, done.stderr
    assert os.path.samefile(done.stdout.strip(), installed.locate_file("kernels/__init__.py")), done.stdout
