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

