"""PEFT's mixed-adapter batches on a tiny Llama (built from a config, no downloads): the
same adapters loaded into MultiLoRALinear slots agree row for row, and one mixed backward
gives each adapter PEFT's gradient on its own sequences."""
from __future__ import annotations

import copy

import pytest
import torch

import lora_fused as lf
from lora_cases import DEVICE, rel_error, TINY_LLAMA_VOCAB, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = TINY_LLAMA_VOCAB
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
ADAPTER_CONFIGS = {
    "a0": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "a1": dict(r=6, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
               rank_pattern={"up_proj": 2}),
}


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """Each adapter trained-looking (random A and B), saved by PEFT to its own directory."""
    base = tiny_llama()
    dirs = {}
    for seed, (name, config) in enumerate(ADAPTER_CONFIGS.items()):
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p_name, p in model.named_parameters():
                if "lora_" in p_name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3 * min(p.shape) ** -0.5)
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
    return base, dirs


def peft_with_both(base, dirs):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["a0"], adapter_name="a0")
    model.load_adapter(dirs["a1"], adapter_name="a1")
    return model.eval()


def ours_with_both(base, dirs):
    model = lf.inject_multi_lora(copy.deepcopy(base), TARGETS, max_adapters=3, max_rank=8)
    assert lf.load_peft_adapter_slot(model, dirs["a0"], "a0") == 0
    assert lf.load_peft_adapter_slot(model, dirs["a1"], "a1") == 1
    return model.to(DEVICE)


NAMES = [None, "a0", "a1"] * 2


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (len(NAMES), 7), generator=torch.Generator().manual_seed(3))


def test_mixed_batch_matches_peft_row_for_row(saved_adapters, tokens):
    base, dirs = saved_adapters
    ref = peft_with_both(base, dirs)
    with torch.no_grad():
        peft_mixed = ref(input_ids=tokens, adapter_names=[n or "__base__" for n in NAMES]).logits
        alone = {}
        for name in ("a0", "a1"):
            ref.set_adapter(name)
            alone[name] = ref(input_ids=tokens).logits
        with ref.disable_adapter():
            alone[None] = ref(input_ids=tokens).logits
        ours = ours_with_both(base, dirs)
        with lf.adapter_batch(ours, NAMES):
            mixed = ours(input_ids=tokens.to(DEVICE)).logits.cpu()
    for b, name in enumerate(NAMES):
        assert rel_error(mixed[b], peft_mixed[b]) <= 1e-4, f"sequence {b} ({name})"
        assert rel_error(mixed[b], alone[name][b]) <= 1e-4, f"sequence {b} ({name}) vs the adapter alone"
    assert rel_error(alone["a0"][1], alone[None][1]) > 1e-2, "the adapters must change the logits"


def test_mixed_batch_training_gives_each_adapter_its_own_gradient(saved_adapters, tokens):
    """One backward over [base, a0, a1] * 2 gives slot i the gradient PEFT computes for
    adapter i on its own sequences."""
    base, dirs = saved_adapters
    ours = ours_with_both(base, dirs)
    weight = torch.randn(len(NAMES), tokens.shape[1], VOCAB, generator=torch.Generator().manual_seed(5))
    with lf.adapter_batch(ours, NAMES):
        (ours(input_ids=tokens.to(DEVICE)).logits.cpu() * weight).sum().backward()
    ref = peft_with_both(base, dirs)
    for slot, name in enumerate(("a0", "a1")):
        ref.set_adapter(name)  # trainable: this adapter only
        rows = [b for b, n in enumerate(NAMES) if n == name]
        ref.zero_grad()
        (ref(input_ids=tokens[rows]).logits * weight[rows]).sum().backward()
        for module_name, module in ref.base_model.model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer) and name in module.lora_A:
                layer = ours.get_submodule(module_name)
                A_grad, B_grad = module.lora_A[name].weight.grad, module.lora_B[name].weight.grad
                r = A_grad.shape[0]
                assert rel_error(layer.lora_A.grad[slot, :r].cpu(), A_grad) <= 1e-4, f"{module_name} A ({name})"
                assert rel_error(layer.lora_B.grad[slot, :, :r].cpu(), B_grad) <= 1e-4, f"{module_name} B ({name})"
                assert (layer.lora_A.grad[slot, r:] == 0).all()
    assert (ours.model.layers[0].self_attn.v_proj.lora_A.grad[1] == 0).all(), "a1 does not adapt v_proj"


def test_routing_errors(saved_adapters):
    base, dirs = saved_adapters
    ours = ours_with_both(base, dirs)
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        with lf.adapter_batch(ours, ["a0", "zz"]):
            pass
    with pytest.raises(ValueError, match="2 adapter names .* first dimension must be the batch"):
        with lf.adapter_batch(ours, ["a0", None]):
            ours(input_ids=torch.zeros(3, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="has no MultiLoRALinear"):
        with lf.adapter_batch(tiny_llama(), ["a0"]):
            pass
    lf.remove_adapter(ours, "a0")
    assert all("a0" not in layer.adapter_names for layer in lf.multi_lora_layers(ours).values())
    with pytest.raises(ValueError, match="not MultiLoRALinear modules"):
        lf.add_adapter(ours, "x", {"model.layers.0.mlp.down_proj": (torch.randn(2, 64), torch.randn(32, 2), 1.0)})


def test_a_slot_saved_in_peft_format_loads_in_peft_and_back(saved_adapters, tokens, tmp_path):
    """Train-then-save: a slot written by save_peft_adapter_slot is the same adapter for PEFT
    (from_pretrained) and for a fresh model's slot."""
    base, dirs = saved_adapters
    ours = ours_with_both(base, dirs)
    lf.save_peft_adapter_slot(ours, "a1", tmp_path / "a1")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a1").eval()
    fresh = lf.inject_multi_lora(copy.deepcopy(base), TARGETS, max_adapters=2, max_rank=8).to(DEVICE)
    lf.load_peft_adapter_slot(fresh, tmp_path / "a1", "again")
    with torch.no_grad():
        expected = ref(input_ids=tokens).logits
        with lf.adapter_batch(ours, ["a1"] * len(NAMES)):
            mine = ours(input_ids=tokens.to(DEVICE)).logits.cpu()
        with lf.adapter_batch(fresh, ["again"] * len(NAMES)):
            reloaded = fresh(input_ids=tokens.to(DEVICE)).logits.cpu()
    assert rel_error(mine, expected) <= 1e-5
    assert rel_error(reloaded, mine) <= 1e-6
    for name, layer in lf.multi_lora_layers(fresh).items():  # same modules, ranks and scalings
        held = "again" in layer.adapter_names
        assert held == ("a1" in lf.multi_lora_layers(ours)[name].adapter_names), name
