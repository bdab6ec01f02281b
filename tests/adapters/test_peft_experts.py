"""PEFT ``target_parameters`` adapters (ParamWrapper) and LoRAExperts, both ways: parity of logits
and of every gradient in fp32, greedy generation, files written by each loaded by the other,
live conversion (``from_peft_model``), rank / alpha patterns, and the errors for bad files."""
from __future__ import annotations

import json
import os

import pytest
import torch

import lora_fused as lf
from lora_cases import rel_error
from lora_fused.adapters.expert_layout import from_peft_factors
from lora_fused.modules.experts import LoRAExperts

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from moe_cases import tiny_moe  # noqa: E402  (needs transformers)

TOL = 1e-5
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PARITY_FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]


def peft_moe(family, *, targets=TARGETS, seed=0, **config):
    """A tiny ``family`` model under PEFT target_parameters LoRA with random nonzero factors."""
    config = {"r": 3, "lora_alpha": 6, "target_modules": [], **config}
    model = peft.get_peft_model(tiny_moe(family, seed), peft.LoraConfig(target_parameters=targets, **config))
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    return model


def ours_through_file(peft_model, family, tmp_path, seed=0):
    """The PEFT adapter saved by PEFT and loaded by lf.load_peft_adapter into a fresh base model."""
    peft_model.save_pretrained(tmp_path / "peft")
    return lf.load_peft_adapter(tiny_moe(family, seed), tmp_path / "peft")


def tokens(batch=2, length=7, seed=3):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def forward_backward(model, ids):
    """(logits, d(logits·g)/d(input embeddings' output), {param name: grad}) for a fixed upstream g."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))
    (logits * g).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), embeds.grad, grads


def peft_grads_in_our_layout(peft_model, grads) -> dict:
    """PEFT's ParamWrapper gradients keyed and laid out as LoRAExperts' ``<m>.lora.<p>.lora_A`` / ``_B``."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, peft.tuners.lora.ParamWrapper):
            experts = name.replace("base_model.model.", "", 1)
            while experts.endswith(".base_layer"):
                experts = experts[: -len(".base_layer")]
            gA = grads[f"{name}.lora_A.default.weight"]
            gB = grads[f"{name}.lora_B.default.weight"]
            A, B = from_peft_factors(gA, gB, module.num_experts)
            out[f"{experts}.lora.{module.parameter_name}.lora_A"] = A
            out[f"{experts}.lora.{module.parameter_name}.lora_B"] = B
    return out


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_parity_with_peft_logits_and_every_gradient(family, tmp_path):
    reference = peft_moe(family)
    ours = ours_through_file(reference, family, tmp_path)
    assert len([m for m in ours.modules() if isinstance(m, LoRAExperts)]) == 2
    ids = tokens()
    ref_logits, ref_dembeds, ref_grads = forward_backward(reference, ids)
    logits, dembeds, grads = forward_backward(ours, ids)
    assert rel_error(logits, ref_logits) <= TOL
    assert rel_error(dembeds, ref_dembeds) <= TOL
    expected = peft_grads_in_our_layout(reference, ref_grads)
    assert set(grads) == set(expected) and len(grads) == 8
    for name, grad in grads.items():
        assert rel_error(grad, expected[name]) <= TOL, name


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_greedy_generation_equal(family, tmp_path):
    reference = peft_moe(family)
    ours = ours_through_file(reference, family, tmp_path)
    ids = tokens(batch=1, length=5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kwargs), reference.generate(input_ids=ids, **kwargs))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_peft_loads_our_file(family, tmp_path):
    ours = lf.inject_lora(tiny_moe(family), None, r=2, lora_alpha=5.0, target_parameters=TARGETS)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad:
                param.normal_(0, 0.2)
    lf.save_peft_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and len(config["target_parameters"]) == 4
    reference = peft.PeftModel.from_pretrained(tiny_moe(family), tmp_path / "ours")
    ids = tokens()
    with torch.no_grad():
        assert rel_error(ours(ids).logits, reference(ids).logits) <= TOL
    # and back: the file PEFT saves again loads into lora-fused with the same factors
    reference.save_pretrained(tmp_path / "again")
    again = lf.load_peft_adapter(tiny_moe(family), tmp_path / "again")
    for key, value in lf.lora_state_dict(ours).items():
        assert torch.equal(lf.lora_state_dict(again)[key], value), key


def test_file_keys_follow_peft_nesting(tmp_path):
    """The first registered parameter's wrapper is innermost: gate_up_proj under '.base_layer'."""
    reference = peft_moe("qwen3_moe")
    reference.save_pretrained(tmp_path / "peft")
    ours = lf.inject_lora(tiny_moe("qwen3_moe"), None, r=3, lora_alpha=6, target_parameters=TARGETS)
    lf.save_peft_adapter(ours, tmp_path / "ours")
    from safetensors.torch import load_file
    peft_keys = {k: v.shape for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    our_keys = {k: v.shape for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    assert our_keys == peft_keys
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in our_keys


def test_one_parameter_and_rank_alpha_patterns(tmp_path):
    reference = peft_moe("qwen3_moe", targets=["down_proj"], rank_pattern={"layers.1.mlp.experts.down_proj": 5},
                         alpha_pattern={"layers.0.mlp.experts.down_proj": 2})
    ours = ours_through_file(reference, "qwen3_moe", tmp_path)
    first, second = (ours.get_submodule(f"model.layers.{i}.mlp.experts") for i in (0, 1))
    assert list(first.lora) == ["down_proj"] and first.lora["down_proj"].lora_alpha == 2
    assert second.lora["down_proj"].r == 5 and first.lora["down_proj"].r == 3
    ids = tokens()
    with torch.no_grad():
        assert rel_error(ours(ids).logits, reference(ids).logits) <= TOL
    lf.save_peft_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_moe("qwen3_moe"), tmp_path / "ours")
    with torch.no_grad():
        assert rel_error(back(ids).logits, reference(ids).logits) <= TOL


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_from_peft_model(family):
    reference = peft_moe(family)
    ids = tokens()
    with torch.no_grad():
        expected = reference(ids).logits
    model = lf.from_peft_model(reference)
    layers = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    assert len(layers) == 2 and all(list(m.lora) == ["gate_up_proj", "down_proj"] for m in layers)
    assert not any(type(m).__module__.startswith("peft.") for m in model.modules())
    with torch.no_grad():
        assert rel_error(model(ids).logits, expected) <= TOL
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lf.lora_state_dict(model))


def test_from_peft_model_refuses_merged_wrappers():
    reference = peft_moe("qwen3_moe")
    reference.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        lf.from_peft_model(reference)


def test_save_refuses_merged_experts(tmp_path):
    ours = lf.inject_lora(tiny_moe("qwen3_moe"), None, target_parameters=["down_proj"])
    lf.merge_lora(ours)
    with pytest.raises(ValueError, match="merged"):
        lf.save_peft_adapter(ours, tmp_path / "x")


def test_load_errors_name_the_keys_and_shapes(tmp_path):
    reference = peft_moe("qwen3_moe", targets=["down_proj"])
    reference.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file, save_file
    path = tmp_path / "peft" / "adapter_model.safetensors"
    state = load_file(path)
    key = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
    save_file({**state, key: state[key][:, :-1].contiguous()}, path)  # in = 15, not the expert's 16
    with pytest.raises(ValueError, match=r"lora_A\.weight.*\(18, 15\).*needs \(18, 16\)"):
        lf.load_peft_adapter(tiny_moe("qwen3_moe"), tmp_path / "peft")
    del state[key]
    del state[key.replace("lora_A", "lora_B")]
    save_file(state, path)
    with pytest.raises(ValueError, match="missing key.*layers.0.mlp.experts.lora_A"):
        lf.load_peft_adapter(tiny_moe("qwen3_moe"), tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_parameters"] = "down_proj"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="target_parameters.*list of parameter names"):
        lf.load_peft_adapter(tiny_moe("qwen3_moe"), tmp_path / "peft")


def test_linear_and_expert_targets_together(tmp_path):
    """target_modules (attention linears) and target_parameters in one adapter, both ways."""
    reference = peft_moe("qwen3_moe", targets=["down_proj"], target_modules=["q_proj", "v_proj"])
    ours = ours_through_file(reference, "qwen3_moe", tmp_path)
    assert len(lf.lora_state_dict(ours)) == 2 * 2 + 2 * 2 * 2  # 2 experts modules, 4 linears, A and B each
    ids = tokens()
    with torch.no_grad():
        assert rel_error(ours(ids).logits, reference(ids).logits) <= TOL
    lf.save_peft_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and len(config["target_parameters"]) == 2
    back = peft.PeftModel.from_pretrained(tiny_moe("qwen3_moe"), tmp_path / "ours")
    with torch.no_grad():
        assert rel_error(back(ids).logits, reference(ids).logits) <= TOL
    converted = lf.from_peft_model(peft_moe("qwen3_moe", targets=["down_proj"], target_modules=["q_proj", "v_proj"]))
    assert set(lf.lora_state_dict(converted)) == set(lf.lora_state_dict(ours))


def test_load_into_existing_lora_experts(tmp_path):
    """A second adapter loads into the LoRAExperts the first one made (same r), replacing its factors."""
    first = peft_moe("qwen3_moe", seed=0)
    second = peft_moe("qwen3_moe", seed=0, lora_alpha=4)
    with torch.no_grad():
        for param in second.parameters():
            if param.requires_grad:
                param.mul_(-1.5)
    ours = ours_through_file(first, "qwen3_moe", tmp_path)
    layers = [m for m in ours.modules() if isinstance(m, LoRAExperts)]
    second.save_pretrained(tmp_path / "second")
    lf.load_peft_adapter(ours, tmp_path / "second")
    assert [m for m in ours.modules() if isinstance(m, LoRAExperts)] == layers  # reused, not re-wrapped
    assert all(f.lora_alpha == 4 for m in layers for f in m.lora.values())
    ids = tokens()
    with torch.no_grad():
        assert rel_error(ours(ids).logits, second(ids).logits) <= TOL
    wrong_rank = peft_moe("qwen3_moe", r=5)
    wrong_rank.save_pretrained(tmp_path / "r5")
    with pytest.raises(ValueError, match="r=3 for gate_up_proj, but the adapter has r=5"):
        lf.load_peft_adapter(ours, tmp_path / "r5")


def trainer_losses(model, output_dir) -> list[float]:
    """Per-step training losses of 3 HF Trainer steps (AdamW, fixed data order) over tiny sequences."""
    sequences = torch.randint(0, 96, (6, 7), generator=torch.Generator().manual_seed(21))
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=2, learning_rate=2e-2, max_steps=3,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=model.train(), args=args,
                                   train_dataset=[{"input_ids": s, "labels": s} for s in sequences])
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_steps_match_peft(tmp_path):
    """HF Trainer on a Qwen3-MoE with expert LoRA: the same per-step losses as PEFT's target_parameters
    run from the same adapter, and the trained factors agree (so the optimizer sees every factor)."""
    peft_model = peft_moe("qwen3_moe")
    ours = ours_through_file(peft_model, "qwen3_moe", tmp_path)
    peft_losses = trainer_losses(peft_model, tmp_path / "peft-run")
    our_losses = trainer_losses(ours, tmp_path / "our-run")
    assert len(our_losses) == 3 and peft_losses[0] != peft_losses[-1]
    for ours_loss, peft_loss in zip(our_losses, peft_losses):
        assert abs(ours_loss - peft_loss) <= 1e-4 * abs(peft_loss)
    trained = peft_grads_in_our_layout(peft_model, dict(peft_model.named_parameters()))
    ours_params = dict(ours.named_parameters())
    for name, value in trained.items():
        assert rel_error(ours_params[name].detach(), value.detach()) <= 1e-4, name
