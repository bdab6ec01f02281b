"""PEFT interoperability: adapters saved by PEFT load here, ours load in PEFT, live models convert.

Models are a tiny Llama built from a ``LlamaConfig`` (no downloads). Parity is checked in
fp32 against PEFT itself: logits and every LoRA gradient, relative error <= 1e-4.
"""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import lora_fused as lf
from lora_cases import rel_error, TINY_LLAMA_VOCAB, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

TOL = 1e-4
VOCAB = TINY_LLAMA_VOCAB


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def randomize(pairs, seed=1):
    """Random A and B (PEFT starts B at zero, which would make every test trivially pass).

    Sized so the adapters change the logits by O(1) without saturating the attention
    softmax (at 3x this size, all-linear's fp32 gradients differ from float64 by ~2e-4
    in PEFT itself: conditioning, not a bug).
    """
    g = torch.Generator().manual_seed(seed)
    for A, B in pairs:
        A.copy_(torch.randn(A.shape, generator=g) * 0.3 * A.shape[1] ** -0.5)
        B.copy_(torch.randn(B.shape, generator=g) * 0.3 * A.shape[0] ** -0.5)


def peft_lora_modules(peft_model):
    """{module name in the base model: peft lora.Linear}."""
    return {name: m for name, m in peft_model.base_model.model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def make_peft(base, **config):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    randomize([(m.lora_A["default"].weight, m.lora_B["default"].weight)
               for m in peft_lora_modules(model).values()])
    return model.eval()


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, lf.LoRALinear)}


def logits_and_grads(model, tokens, lora_params):
    """Logits of ``model`` and the gradients of a fixed random projection of them."""
    for p in lora_params.values():
        p.grad = None
    logits = model(input_ids=tokens).logits
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(11))
    (logits * weight).sum().backward()
    return logits.detach(), {k: p.grad.clone() for k, p in lora_params.items()}


def peft_params(peft_model):
    out = {}
    for name, m in peft_lora_modules(peft_model).items():
        out[f"{name}.A"], out[f"{name}.B"] = m.lora_A["default"].weight, m.lora_B["default"].weight
    return out


def our_params(model):
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.A"], out[f"{name}.B"] = m.lora_A, m.lora_B
    return out


def assert_parity(ours, ref_logits, ref_grads, tokens):
    params = our_params(ours)
    assert sorted(params) == sorted(ref_grads), "different sets of adapted modules"
    logits, grads = logits_and_grads(ours, tokens, params)
    errors = {"logits": rel_error(logits, ref_logits)}
    errors.update({k: rel_error(grads[k], ref_grads[k]) for k in ref_grads})
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


PEFT_CONFIGS = {
    "list": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6},
                     alpha_pattern={"up_proj": 3, r"layers\.0\.self_attn\.q_proj": 16}),
    "regex": dict(r=3, lora_alpha=5, target_modules=r".*\.layers\.0\.mlp\.(gate|up)_proj",
                  lora_dropout=0.1),
    "all-linear": dict(r=2, lora_alpha=4, target_modules="all-linear", use_rslora=True,
                       rank_pattern={"down_proj": 5}),
    "exclude": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                    exclude_modules=["layers.0.self_attn.q_proj"]),
}


@pytest.mark.parametrize("case", list(PEFT_CONFIGS))
def test_load_peft_saved_adapter_matches_peft(case, base, tokens, tmp_path):
    ref = make_peft(base, **PEFT_CONFIGS[case])
    ref_logits, ref_grads = logits_and_grads(ref, tokens, peft_params(ref))
    ref.save_pretrained(tmp_path)
    if case == "all-linear":  # PEFT saves the expanded list; check the shorthand too
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert isinstance(config["target_modules"], list)
        config["target_modules"] = "all-linear"
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    ours = lf.load_peft_adapter(copy.deepcopy(base), tmp_path).eval()
    for name, module in peft_lora_modules(ref).items():
        layer = ours.get_submodule(name)
        assert isinstance(layer, lf.LoRALinear)
        assert layer.r == module.r["default"] and layer.scaling == pytest.approx(module.scaling["default"])
        assert layer.lora_dropout == PEFT_CONFIGS[case].get("lora_dropout", 0.0)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in lora_modules(ours) for ab in "AB"}
    assert_parity(ours, ref_logits, ref_grads, tokens)


def test_key_variants_load_the_same(base, tmp_path):
    """Keys without the base_model.model. prefix, or with PEFT's adapter-name infix."""
    ref = make_peft(base, r=3, target_modules=["k_proj", "gate_proj"])
    ref.save_pretrained(tmp_path / "plain")
    expected = lf.lora_state_dict(lf.load_peft_adapter(copy.deepcopy(base), tmp_path / "plain"))
    state = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    variants = {
        "no_prefix": {k.removeprefix("base_model.model."): v for k, v in state.items()},
        "infix": {k.replace(".weight", ".default.weight"): v for k, v in state.items()},
        "both": {k.removeprefix("base_model.model.").replace(".weight", ".other.weight"): v
                 for k, v in state.items()},
    }
    for name, variant in variants.items():
        shutil.copytree(tmp_path / "plain", tmp_path / name)
        save_file(variant, tmp_path / name / "adapter_model.safetensors")
        got = lf.lora_state_dict(lf.load_peft_adapter(copy.deepcopy(base), tmp_path / name))
        assert got.keys() == expected.keys(), name
        assert all(torch.equal(got[k], expected[k]) for k in expected), name


def test_read_peft_adapter(base, tmp_path):
    ref = make_peft(base, r=4, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2})
    ref.save_pretrained(tmp_path)
    config, tensors = lf.read_peft_adapter(tmp_path)
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert sorted(tensors) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    A, B = tensors["model.layers.1.self_attn.q_proj"]
    assert A.shape == (2, 32) and B.shape == (32, 2)
    m = peft_lora_modules(ref)["model.layers.1.self_attn.q_proj"]
    assert torch.equal(A, m.lora_A["default"].weight) and torch.equal(B, m.lora_B["default"].weight)


def test_load_into_existing_lora_layers(base, tokens, tmp_path):
    ref = make_peft(base, r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"])
    ref_logits, ref_grads = logits_and_grads(ref, tokens, peft_params(ref))
    ref.save_pretrained(tmp_path)
    model = lf.inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=1.0)
    layer = model.model.layers[0].self_attn.q_proj
    assert lf.load_peft_adapter(model, tmp_path) is model
    assert model.model.layers[0].self_attn.q_proj is layer and layer.scaling == 3.0
    assert_parity(model.eval(), ref_logits, ref_grads, tokens)

    wrong_r = lf.inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=2)
    with pytest.raises(ValueError, match=r"already a LoRALinear with r=2.*r=4"):
        lf.load_peft_adapter(wrong_r, tmp_path)


SAVE_CASES = {
    "uniform": dict(target=["q_proj", "v_proj"], r=4, lora_alpha=8.0),
    "mixed": dict(target="all-linear", r=4, lora_alpha=8.0, use_rslora=True,
                  rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                  alpha_pattern={"o_proj": 3.5}),
    "not_suffixes": dict(target=r"model\.layers\.0\.self_attn\.q_proj|model\.layers\.1\.mlp\.up_proj",
                         r=3, lora_alpha=6.0, lora_dropout=0.05),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_loads_in_peft(case, base, tokens, tmp_path):
    kwargs = dict(SAVE_CASES[case])
    target = kwargs.pop("target")
    ours = lf.inject_lora(copy.deepcopy(base), target, **kwargs).eval()
    randomize([(m.lora_A, m.lora_B) for m in lora_modules(ours).values()], seed=5)
    with torch.no_grad():
        expected = ours(input_ids=tokens).logits
    lf.save_peft_adapter(ours, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none" and config["task_type"] is None
    if case == "not_suffixes":
        assert sorted(config["target_modules"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    if case == "uniform":
        assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and not config["rank_pattern"]
    assert peft.LoraConfig.from_pretrained(str(tmp_path)).r == config["r"]

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    peft_layers = peft_lora_modules(loaded)
    assert sorted(peft_layers) == sorted(lora_modules(ours))
    for name, layer in lora_modules(ours).items():
        assert peft_layers[name].r["default"] == layer.r
        assert peft_layers[name].scaling["default"] == pytest.approx(layer.scaling)
    with torch.no_grad():
        got = loaded(input_ids=tokens).logits
    assert rel_error(got, expected) <= TOL

    again = lf.load_peft_adapter(copy.deepcopy(base), tmp_path)  # and our own round trip
    state, ref_state = lf.lora_state_dict(again), lf.lora_state_dict(ours)
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    assert {n: (m.r, m.scaling, m.lora_dropout) for n, m in lora_modules(again).items()} == \
        {n: (m.r, m.scaling, m.lora_dropout) for n, m in lora_modules(ours).items()}


def test_from_peft_model_matches_peft(base, tokens):
    ref = make_peft(base, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"],
                    rank_pattern={"o_proj": 2}, lora_dropout=0.1)
    ref_logits, ref_grads = logits_and_grads(ref, tokens, peft_params(ref))
    peft_layers = peft_lora_modules(ref)
    base_weights = {n: m.get_base_layer().weight for n, m in peft_layers.items()}
    converted = lf.from_peft_model(ref)
    assert converted is ref.base_model.model and isinstance(converted, transformers.LlamaForCausalLM)
    assert not any(type(m).__module__.startswith("peft") for m in converted.modules())
    for name, weight in base_weights.items():
        layer = converted.get_submodule(name)
        assert layer.weight is weight and layer.lora_dropout == 0.1
        assert layer.lora_A.data_ptr() != peft_layers[name].lora_A["default"].weight.data_ptr()
    assert_parity(converted.eval(), ref_logits, ref_grads, tokens)


def test_from_peft_model_refusals(base):
    dora = make_peft(base, r=2, target_modules=["q_proj"], use_dora=True)
    converted = lf.from_peft_model(dora)  # DoRA converts now (parity: tests/modules/test_dora.py)
    assert all(isinstance(m, lf.DoRALinear) for n, m in converted.named_modules() if n.endswith("q_proj"))

    two = make_peft(base, r=2, target_modules=["q_proj"])
    two.add_adapter("other", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    two.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one adapter"):
        lf.from_peft_model(two)

    merged = make_peft(base, r=2, target_modules=["q_proj"])
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        lf.from_peft_model(merged)
    assert type(merged.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith("peft")

    with pytest.raises(TypeError, match="PeftModel"):
        lf.from_peft_model(copy.deepcopy(base))


def test_from_peft_model_picks_the_active_adapter(base, tokens):
    model = make_peft(base, r=2, target_modules=["q_proj"])
    model.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=6, target_modules=["v_proj"]))
    randomize([(m.lora_A["other"].weight, m.lora_B["other"].weight)
               for m in peft_lora_modules(model).values() if "other" in m.lora_A], seed=9)
    model.set_adapter("other")
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    converted = lf.from_peft_model(model)
    assert sorted(lora_modules(converted)) == [f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)]
    assert type(converted.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert rel_error(converted(input_ids=tokens).logits, expected) <= TOL


# --- errors -------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """A PEFT-saved adapter (r=4 on q_proj and v_proj) to break in various ways."""
    path = tmp_path_factory.mktemp("peft_adapter")
    make_peft(base, r=4, target_modules=["q_proj", "v_proj"]).save_pretrained(path)
    return path


@pytest.fixture
def adapter(saved, tmp_path):
    path = tmp_path / "adapter"
    shutil.copytree(saved, path)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(path, fn):
    state = load_file(path / "adapter_model.safetensors")
    fn(state)
    save_file(state, path / "adapter_model.safetensors")


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def test_missing_directory_and_files(base, adapter, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lf.load_peft_adapter(copy.deepcopy(base), tmp_path / "nope")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        lf.read_peft_adapter(adapter)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lf.read_peft_adapter(adapter)


def test_bin_only_is_refused_without_unpickling(base, adapter, monkeypatch):
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"not a pickle")

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle was loaded")
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    with pytest.raises(ValueError, match="safetensors only.*convert"):
        lf.load_peft_adapter(copy.deepcopy(base), adapter)


def test_bad_json(base, adapter):
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        lf.load_peft_adapter(copy.deepcopy(base), adapter)
    (adapter / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        lf.load_peft_adapter(copy.deepcopy(base), adapter)


@pytest.mark.parametrize("change, match", [
    (dict(use_dora=True), "use_dora"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(layers_to_transform=0), "layers_to_transform"),
    (dict(layers_pattern="layers"), "layers_pattern"),
    (dict(peft_type="IA3"), "peft_type"),
    (dict(peft_type=None), "peft_type"),
    (dict(target_parameters=["mlp.experts.down_proj"]), "target_parameters"),
    (dict(init_lora_weights="pissa_niter_4"), "init_lora_weights"),
    (dict(init_lora_weights="olora"), "init_lora_weights"),
    (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
    (dict(use_qalora=True), "use_qalora"),
    (dict(alora_invocation_tokens=[1, 2]), "alora_invocation_tokens"),
    (dict(trainable_token_indices=[1]), "trainable_token_indices"),
    (dict(megatron_config={"x": 1}), "megatron_config"),
    (dict(target_modules=None), "target_modules"),
    (dict(r=0), "r=0"),
    (dict(r="4"), "r must be an int"),
    (dict(rank_pattern=["q_proj", 2]), "rank_pattern must be a dict"),
    (dict(alpha_pattern=[["q_proj", 2]]), "alpha_pattern must be a dict"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"),
    (dict(lora_dropout=1.5), "lora_dropout"),
])
def test_unsupported_config_is_refused(base, adapter, change, match):
    edit_config(adapter, **change)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=match):
        lf.load_peft_adapter(model, adapter)
    assert not lora_modules(model), "the model was changed before the error"


def test_ignored_config_fields_load(base, adapter):
    edit_config(adapter, init_lora_weights="gaussian", task_type="CAUSAL_LM", inference_mode=False,
                eva_config={"rho": 2.0}, layers_to_transform=[], loftq_config={})
    assert len(lora_modules(lf.load_peft_adapter(copy.deepcopy(base), adapter))) == 4
    edit_config(adapter, init_lora_weights="mica")  # plain LoRA math; PEFT trains A only
    model = lf.load_peft_adapter(copy.deepcopy(base), adapter)
    assert all(m.lora_A.requires_grad and not m.lora_B.requires_grad for m in lora_modules(model).values())
    edit_config(adapter, some_future_field=True)
    with pytest.warns(UserWarning, match="some_future_field"):
        lf.load_peft_adapter(copy.deepcopy(base), adapter)


def test_missing_key(base, adapter):
    edit_tensors(adapter, lambda s: s.pop(f"{Q0}.lora_B.weight"))
    with pytest.raises(ValueError, match=r"missing key for lora_B of module 'model\.layers\.0\.self_attn\.q_proj'"):
        lf.load_peft_adapter(copy.deepcopy(base), adapter)
    edit_tensors(adapter, lambda s: s.pop(f"{Q0}.lora_A.weight"))
    with pytest.raises(ValueError, match=r"missing keys .*layers\.0\.self_attn\.q_proj\.lora_A\.weight"):
        lf.load_peft_adapter(copy.deepcopy(base), adapter)


def test_extra_keys(base, adapter):
    down = "base_model.model.model.layers.0.mlp.down_proj"
    edit_tensors(adapter, lambda s: s.update({f"{down}.lora_A.weight": torch.zeros(4, 64),
                                              f"{down}.lora_B.weight": torch.zeros(32, 4)}))
    with pytest.raises(ValueError, match=r"unexpected keys.*down_proj.*not a target"):
        lf.load_peft_adapter(copy.deepcopy(base), adapter)


def test_extra_non_lora_keys(base, adapter):
    edit_tensors(adapter, lambda s: s.update({"base_model.model.model.norm.weight": torch.ones(32)}))
    with pytest.raises(ValueError, match=r"unexpected keys \['base_model\.model\.model\.norm\.weight'\]"):
        lf.read_peft_adapter(adapter)


def test_trained_biases_are_refused(base, adapter):
    edit_config(adapter, bias="all")
    lf.read_peft_adapter(adapter)  # bias="all" without bias tensors (Llama has none) is fine
    edit_tensors(adapter, lambda s: s.update({"base_model.model.model.layers.0.self_attn.q_proj.bias":
                                              torch.zeros(32)}))
    with pytest.raises(ValueError, match=r"unexpected keys.*q_proj\.bias.*bias='all'"):
        lf.load_peft_adapter(copy.deepcopy(base), adapter)


def test_keys_for_modules_the_model_lacks(adapter):
    small = tiny_llama()
    small.model.layers = small.model.layers[:1]
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn.*not a module of the model"):
        lf.load_peft_adapter(small, adapter)


def test_shape_mismatch(base, adapter):
    edit_tensors(adapter, lambda s: s.update({f"{Q0}.lora_A.weight": torch.zeros(4, 31)}))
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.*\(4, 31\), \(32, 4\).*32 -> 32"):
        lf.load_peft_adapter(copy.deepcopy(base), adapter)


def test_rank_disagrees_with_config(base, adapter):
    edit_tensors(adapter, lambda s: s.update({f"{Q0}.lora_A.weight": torch.zeros(3, 32),
                                              f"{Q0}.lora_B.weight": torch.zeros(32, 3)}))
    with pytest.raises(ValueError, match=r"rank 3 \(shapes \(3, 32\), \(32, 3\)\).*r=4"):
        lf.load_peft_adapter(copy.deepcopy(base), adapter)
    edit_tensors(adapter, lambda s: s.update({f"{Q0}.lora_B.weight": torch.zeros(32, 5)}))
    with pytest.raises(ValueError, match=r"same r; got shapes \(3, 32\), \(32, 5\)"):
        lf.load_peft_adapter(copy.deepcopy(base), adapter)


def test_save_refuses_merged_and_empty(base, tmp_path):
    model = lf.inject_lora(copy.deepcopy(base), ["q_proj"], r=2)
    lf.merge_lora(model)
    with pytest.raises(ValueError, match="merged.*unmerge_lora"):
        lf.save_peft_adapter(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ValueError, match="no LoRALinear"):
        lf.save_peft_adapter(copy.deepcopy(base), tmp_path / "empty")


def test_import_does_not_pull_peft_or_transformers():
    code = ("import sys, lora_fused; bad = [m for m in ('peft', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_a_file_given_as_the_directory_is_named(base, adapter):
    for path in (adapter / "adapter_config.json", adapter / "adapter_model.safetensors"):
        with pytest.raises(ValueError, match=r"is a file, not a directory.*pass its folder"):
            lf.load_peft_adapter(copy.deepcopy(base), path)
    model = lf.inject_lora(copy.deepcopy(base), ["q_proj"], r=2)
    with pytest.raises(ValueError, match="is a file, not a directory"):
        lf.save_peft_adapter(model, adapter / "adapter_config.json")
    with pytest.raises(TypeError, match="directory must be a str or os.PathLike"):
        lf.read_peft_adapter(3)


def test_saving_over_an_adapter_replaces_it_and_removes_a_stale_bin(base, adapter):
    """The new files replace the old ones; a stale pickle of the old adapter goes (warned)."""
    (adapter / "adapter_model.bin").write_bytes(b"an older adapter")
    model = lf.inject_lora(copy.deepcopy(base), ["v_proj"], r=3)
    randomize([(m.lora_A, m.lora_B) for m in lora_modules(model).values()])
    with pytest.warns(UserWarning, match="removed the stale .*adapter_model.bin"):
        lf.save_peft_adapter(model, adapter)
    left = sorted(os.listdir(adapter))
    assert "adapter_model.bin" not in left and not [n for n in left if n.startswith(".")], left
    config, tensors = lf.read_peft_adapter(adapter)
    assert config["r"] == 3 and sorted(tensors) == sorted(lora_modules(model))


def test_a_failed_save_leaves_the_directory_as_it_was(base, adapter, tmp_path, monkeypatch):
    """The config is written after the weights: a failure there must not leave new weights
    beside the old config (nor any temporary file)."""
    before = {name: (adapter / name).read_bytes() for name in os.listdir(adapter)}
    model = lf.inject_lora(copy.deepcopy(base), ["v_proj"], r=3)

    def failing_dump(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(json, "dump", failing_dump)
    with pytest.raises(OSError, match="disk full"):
        lf.save_peft_adapter(model, adapter)
    assert {name: (adapter / name).read_bytes() for name in os.listdir(adapter)} == before
    with pytest.raises(OSError, match="disk full"):
        lf.save_peft_adapter(model, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()

