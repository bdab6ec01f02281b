"""Serving expert adapters: ``MultiLoRAExperts`` slots on a tiny Qwen3-MoE (built from a config).

A batch mixing four PEFT ``target_parameters`` adapters (different ranks, one also on q_proj,
one on down_proj only) and base rows equals, row for row, each adapter's PEFT model run in
float64 (and the base model for base rows). The module alone is checked against a float64 loop
over tokens; hot swap and pinning reuse test_slot_wait.py's batch-in-a-thread pattern.
"""
from __future__ import annotations

import copy

import pytest
import torch

import lora_fused as lf
from lora_cases import DEVICE, TOLERANCE, rel_error
from test_slot_wait import BatchInThread, slot_waits, swap_in_thread, wait_until  # noqa: F401

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

EXPERTS = 6
TOP_K = 2
HIDDEN = 24
INTER = 10  # gate_up_proj [E, 20, 24], down_proj [E, 24, 10]
VOCAB = 64
PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ADAPTER_CONFIGS = {
    "a0": dict(r=2, lora_alpha=4, target_parameters=PARAMS),
    "a1": dict(r=4, lora_alpha=3, use_rslora=True, target_parameters=PARAMS),
    "a2": dict(r=3, lora_alpha=5, target_parameters=["mlp.experts.down_proj"]),
    "a3": dict(r=5, lora_alpha=2, target_modules=["q_proj"], target_parameters=PARAMS),
}
NAMES = ["a0", None, "a1", "a2", None, "a3"]
MAX_RANK = 5


def qwen3_moe_config():
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, moe_intermediate_size=INTER,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=12, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64)
    config._experts_implementation = "eager"  # any dtype on CPU (the float64 reference)
    return config


def tiny_qwen3_moe():
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(qwen3_moe_config()).eval()


def randomize_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 * min(p.shape) ** -0.5)


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """Each adapter trained-looking (random A and B), saved by PEFT to its own directory."""
    base = tiny_qwen3_moe()
    dirs = {}
    for seed, (name, config) in enumerate(ADAPTER_CONFIGS.items()):
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{"target_modules": [], **config}))
        randomize_lora(model, seed + 1)
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
    return base, dirs


def serving_model(base, max_adapters=5):
    return lf.inject_multi_lora(copy.deepcopy(base), ["q_proj"], max_adapters=max_adapters, max_rank=MAX_RANK,
                                target_parameters=PARAMS)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """The delta op's two backends (Triton through the interpreter on CPU: tests/conftest.py)."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", request.param)
    return request.param


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (len(NAMES), 5), generator=torch.Generator().manual_seed(3))


def test_the_file_layout_is_what_the_loader_reads(saved_adapters):
    """PEFT nests one ParamWrapper per parameter, the first parameter innermost (base_layer.)."""
    from safetensors.torch import load_file
    _, dirs = saved_adapters
    keys = load_file(dirs["a0"] / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.mlp.experts."
    assert tuple(keys[prefix + "base_layer.lora_A.weight"].shape) == (EXPERTS * 2, HIDDEN)  # gate_up_proj
    assert tuple(keys[prefix + "lora_B.weight"].shape) == (HIDDEN, 2 * EXPERTS)  # down_proj


def test_mixed_batch_matches_each_adapters_peft_model_row_for_row(saved_adapters, tokens, backend):
    base, dirs = saved_adapters
    ours = serving_model(base)
    for slot, name in enumerate(ADAPTER_CONFIGS):
        assert lf.load_peft_adapter_slot(ours, dirs[name], name) == slot
    experts = ours.model.layers[0].mlp.experts
    assert isinstance(experts, lf.MultiLoRAExperts)
    assert experts.ranks[:, :4, 0].tolist() == [[2, 4, 1, 5], [2, 4, 3, 5]]  # gate_up, down; a2: down only
    ours.to(DEVICE)
    with torch.no_grad(), lf.adapter_batch(ours, NAMES):
        mixed = ours(input_ids=tokens.to(DEVICE)).logits.cpu()
    with torch.no_grad():
        for b, name in enumerate(NAMES):
            ref_model = copy.deepcopy(base).double()
            if name is not None:
                ref_model = peft.PeftModel.from_pretrained(ref_model, dirs[name]).eval()
            ref = ref_model(input_ids=tokens[b:b + 1]).logits[0]
            assert rel_error(mixed[b], ref) <= TOLERANCE[torch.float32], f"sequence {b} ({name})"
        unrouted = ours(input_ids=tokens.to(DEVICE)).logits.cpu()  # outside adapter_batch: the base model
        base_logits = copy.deepcopy(base).to(DEVICE)(input_ids=tokens.to(DEVICE)).logits
        assert rel_error(unrouted, base_logits) <= TOLERANCE[torch.float32]


# ------------------------------------------------------------------ the module alone
def random_experts(dtype=torch.float32):
    experts = Qwen3MoeExperts(qwen3_moe_config())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return experts.to(dtype)


def random_adapter(r, g, params=("gate_up_proj", "down_proj")):
    dims = {"gate_up_proj": (HIDDEN, 2 * INTER), "down_proj": (INTER, HIDDEN)}
    A = {p: torch.randn(EXPERTS, r, dims[p][0], generator=g) for p in params}
    B = {p: torch.randn(EXPERTS, dims[p][1], r, generator=g) * 0.3 for p in params}
    return A, B


def reference(experts, adapters, x, top_k_index, top_k_weights, slot_ids):
    """float64, one token and one chosen expert at a time; adapters[slot] = (A, B, scaling)."""
    x = x.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(top_k_index.shape[1]):
            e = int(top_k_index[t, k])
            if e >= EXPERTS:  # an expert-parallel sentinel: no output
                continue
            A, B, s = adapters[int(slot_ids[t])] if slot_ids[t] >= 0 else ({}, {}, 0.0)

            def proj(name, v):
                y = v @ getattr(experts, name)[e].detach().cpu().double().T
                if name in A:
                    y = y + s * (v @ A[name][e].double().T) @ B[name][e].double().T
                return y
            gate, up = proj("gate_up_proj", x[t]).chunk(2)
            out[t] += top_k_weights[t, k].double() * proj("down_proj", torch.nn.functional.silu(gate) * up)
    return out


@pytest.mark.parametrize("T", [1, 13])
def test_module_alone_per_slot_rank_against_float64(T, backend):
    experts = random_experts()
    layer = lf.MultiLoRAExperts.from_experts(experts, max_adapters=4, max_rank=MAX_RANK)
    g = torch.Generator().manual_seed(7)
    adapters = {}
    for name, r, params, scaling in (("c", 3, ("down_proj",), -1.5), ("a", 1, ("gate_up_proj", "down_proj"), 0.5),
                                     ("b", 5, ("gate_up_proj",), 2.0)):
        A, B = random_adapter(r, g, params)
        adapters[layer.add_adapter(name, A, B, scaling)] = (A, B, scaling)
    x = torch.randn(T, HIDDEN, generator=g)
    top_k_index = torch.randint(0, EXPERTS, (T, TOP_K), generator=g)
    top_k_index[T // 2, 1] = EXPERTS  # a sentinel (transformers' expert parallelism): the pair adds nothing
    top_k_weights = torch.rand(T, TOP_K, generator=g)
    slot_ids = torch.randint(-1, 3, (T,), generator=g)
    slot_ids[T // 2] = 0  # the sentinel's id slot·E + E would name slot 1's expert 0 (both parameters adapted)
    layer.to(DEVICE)
    with torch.no_grad():
        inputs = [t.to(DEVICE) for t in (x, top_k_index, top_k_weights)]
        y = layer(*inputs, adapter_ids=slot_ids.to(DEVICE))
        base = layer(*inputs)
    assert rel_error(y, reference(experts, adapters, x, top_k_index, top_k_weights, slot_ids)) <= 1e-5
    assert rel_error(base, reference(experts, {}, x, top_k_index, top_k_weights, torch.full((T,), -1))) <= 1e-5
    assert layer.ranks[:, :3, 0].tolist() == [[1, 1, 5], [3, 1, 1]]  # unadapted: rank 1, scaling 0
    assert layer.scalings[:, :3, 0].tolist() == [[0.0, 0.5, 2.0], [-1.5, 0.5, 0.0]]


def test_bad_ids_and_bad_adapters_are_refused():
    layer = lf.MultiLoRAExperts.from_experts(random_experts(), max_adapters=2, max_rank=3)
    A, B = random_adapter(2, torch.Generator().manual_seed(1))
    layer.add_adapter("a", A, B, 1.0)
    x, idx, w = torch.randn(4, HIDDEN), torch.zeros(4, TOP_K, dtype=torch.long), torch.rand(4, TOP_K)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"adapter_ids: adapter_ids must lie in \[-1, 2\).*\[-1, 2\]"):
            layer(x, idx, w, adapter_ids=torch.tensor([0, 1, 2, -1]))
        with pytest.raises(ValueError, match="adapter_ids has 3 entries"):
            layer(x, idx, w, adapter_ids=torch.tensor([0, 1, -1]))
        with pytest.raises(TypeError, match="adapter_ids must be int32 or int64"):
            layer(x, idx, w, adapter_ids=torch.zeros(4))
        with pytest.raises(ValueError, match=r"top_k_index and top_k_weights \[T, k\]"):
            layer(x, idx[:3], w[:3], adapter_ids=torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="inference only"):
        layer(x.requires_grad_(), idx, w, adapter_ids=torch.zeros(4, dtype=torch.long))
    A4, B4 = random_adapter(4, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"rank 4 for 'gate_up_proj'.*max_rank=3"):
        layer.add_adapter("big", A4, B4, 1.0)
    with pytest.raises(ValueError, match=r"'down_proj' needs lora_A \[E=6, r, in=10\]"):
        layer.add_adapter("bad", {"down_proj": A["gate_up_proj"]}, {"down_proj": B["down_proj"]}, 1.0)
    with pytest.raises(TypeError, match="must be a mapping"):
        layer.add_adapter("bad", A["down_proj"], B["down_proj"], 1.0)
    with pytest.raises(ValueError, match="same parameters"):
        layer.add_adapter("bad", {"up_proj": A["down_proj"]}, {"up_proj": B["down_proj"]}, 1.0)
    assert layer.adapter_names == ["a"]  # nothing written by a refused add


def test_a_model_whose_experts_are_not_targeted_is_refused(saved_adapters):
    base, dirs = saved_adapters
    linear_only = lf.inject_multi_lora(copy.deepcopy(base), ["q_proj"], max_adapters=2, max_rank=MAX_RANK)
    with pytest.raises(ValueError, match=r"select \['gate_up_proj', 'down_proj'\] of 'model.layers.0.mlp.experts', "
                                         r"a Qwen3MoeExperts without adapter slots: inject_multi_lora"):
        lf.load_peft_adapter_slot(linear_only, dirs["a3"], "a3")
    assert all(not layer.adapter_names for layer in lf.multi_lora_layers(linear_only).values())
    down_only = lf.inject_multi_lora(copy.deepcopy(base), None, max_adapters=2, max_rank=MAX_RANK,
                                     target_parameters=["down_proj"])
    with pytest.raises(ValueError, match=r"adapts \['gate_up_proj'\] of 'model.layers.0.mlp.experts', but its "
                                         r"MultiLoRAExperts has slots for \['down_proj'\] only"):
        lf.load_peft_adapter_slot(down_only, dirs["a0"], "a0")
    assert lf.load_peft_adapter_slot(down_only, dirs["a2"], "a2") == 0  # down_proj only: fits
    with pytest.raises(ValueError, match=r"target_parameters \['mlp.gate.weight_x'\] matched no parameter"):
        lf.inject_multi_lora(copy.deepcopy(base), None, max_adapters=2, max_rank=2,
                             target_parameters=["mlp.gate.weight_x"])
    with pytest.raises(ValueError, match=r"select 'model.layers.0.mlp.gate.weight' of shape \(6, 24\); only 3-D"):
        lf.inject_multi_lora(copy.deepcopy(base), None, max_adapters=2, max_rank=2, target_parameters=["gate.weight"])
    with pytest.raises(ValueError, match="needs target_modules or target_parameters"):
        lf.inject_multi_lora(copy.deepcopy(base), [], max_adapters=2, max_rank=2)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.experts'\] already have expert LoRA \(they are "
                                         r"MultiLoRAExperts\)"):
        lf.inject_multi_lora(down_only, None, max_adapters=2, max_rank=2, target_parameters=["down_proj"])


def test_an_adapter_saved_from_lora_experts_serves_as_lora_experts_computes(tmp_path, tokens, backend):
    """lf.save_peft_adapter of a trained LoRAExperts model -> a slot: the same logits."""
    base = tiny_qwen3_moe()
    trained = lf.inject_lora(copy.deepcopy(base), None, r=2, lora_alpha=6.0, target_parameters=PARAMS,
                             rank_pattern={"gate_up_proj": 3})
    randomize_lora(trained, 11)
    lf.save_peft_adapter(trained, tmp_path)
    ours = serving_model(base, max_adapters=2)
    lf.load_peft_adapter_slot(ours, tmp_path, "t")
    assert ours.model.layers[1].mlp.experts.ranks[:, 0, 0].tolist() == [3, 2]
    with torch.no_grad(), lf.adapter_batch(ours, ["t", None] * 3):
        served = ours(input_ids=tokens).logits
        expected = trained(input_ids=tokens).logits
    assert rel_error(served[0::2], expected[0::2]) <= TOLERANCE[torch.float32]
    assert rel_error(served[1::2], base(input_ids=tokens[1::2]).logits) <= TOLERANCE[torch.float32]


# ------------------------------------------------------------------ slots: pinning and hot swap
def expert_only_model(max_adapters):
    """A one-block model: the experts module behind a fixed router, routed by adapter_batch."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = random_experts()

        def forward(self, hidden):  # [batch, seq, H]
            flat = hidden.reshape(-1, HIDDEN)
            idx = torch.arange(flat.shape[0])[:, None] * torch.tensor([1, 2]) % EXPERTS
            return self.experts(flat, idx, torch.full(idx.shape, 0.5)).view_as(hidden)
    return lf.inject_multi_lora(Block(), None, max_adapters=max_adapters, max_rank=3,
                                target_parameters=["experts.gate_up_proj", "experts.down_proj"])


def test_a_hot_swap_waits_while_a_batch_pins_the_slot_and_raises_at_timeout_0(slot_waits, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")  # forwards in threads: Triton's interpreter is not thread-safe
    model = expert_only_model(max_adapters=2)
    g = torch.Generator().manual_seed(9)
    versions = [random_adapter(2, g) for _ in range(3)]
    lf.add_adapter(model, "a", {"experts": (*versions[0], 1.0)})
    x = torch.randn(2, 3, HIDDEN, generator=g)

    def served(version):
        layer = model.experts
        fresh = lf.MultiLoRAExperts.from_experts(layer.base_layer, max_adapters=1, max_rank=3)
        fresh.add_adapter("v", *version, 1.0)
        flat = x.reshape(-1, HIDDEN)
        idx = torch.arange(flat.shape[0])[:, None] * torch.tensor([1, 2]) % EXPERTS
        with torch.no_grad():
            return fresh(flat, idx, torch.full(idx.shape, 0.5), adapter_ids=torch.zeros(6, dtype=torch.long))

    with BatchInThread(model, ["a", "a"], x) as first:
        lf.add_adapter(model, "a", {"experts": (*versions[1], 1.0)})  # into the spare slot 1
        assert model.experts.slot_of("a") == 1 and model.experts.free_slots() == []
        with BatchInThread(model, ["a", "a"], x) as second:
            with pytest.raises(ValueError, match="no slot is free for its new version"):
                lf.add_adapter(model, "a", {"experts": (*versions[2], 1.0)}, timeout=0)
            swapper, result = swap_in_thread(model, "a", {"experts": (*versions[2], 1.0)}, timeout=30)
            wait_until(lambda: slot_waits.waits > 0 or result, "the swap to wait")
            assert not result, result
            first.release()  # frees slot 0: the swap lands there
            swapper.join(10)
            assert result == [0], result
    assert torch.equal(first.y.reshape(-1, HIDDEN), served(versions[0]))
    assert torch.equal(second.y.reshape(-1, HIDDEN), served(versions[1]))
    with torch.no_grad(), lf.adapter_batch(model, ["a", None]):
        y = model(x).reshape(-1, HIDDEN)
    assert torch.equal(y[:3], served(versions[2])[:3])
    lf.remove_adapter(model, "a")
    # its slot emptied (slot 1's old version stays until reused: no name routes to it)
    assert model.experts.free_slots() == [0, 1] and not model.experts.lora["down_proj"].lora_A[0].any()
    assert model.experts.scalings[:, 0].eq(0).all() and model.experts.ranks[:, 0].eq(1).all()


def test_slot_table_travels_with_the_state_dict():
    model = expert_only_model(max_adapters=3)
    lf.add_adapter(model, "b", {"experts": (*random_adapter(3, torch.Generator().manual_seed(4)), 0.25)})
    lf.add_adapter(model, "c", {"experts": (*random_adapter(1, torch.Generator().manual_seed(5)), 1.0)})
    fresh = expert_only_model(max_adapters=3)
    fresh.load_state_dict(model.state_dict())
    assert fresh.experts.adapter_names == ["b", "c"] and fresh.experts.slot_of("c") == 1
    assert torch.equal(fresh.experts.ranks, model.experts.ranks)
    # serving tables: in the state dict (lora_state_dict too), never trainable parameters
    assert set(lf.lora_state_dict(model)) == {f"experts.lora.{p}.lora_{ab}" for p in ("gate_up_proj", "down_proj")
                                              for ab in "AB"}
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, HIDDEN)
    with torch.no_grad(), lf.adapter_batch(model, ["c", "b"]):
        y = model(x)
    with torch.no_grad(), lf.adapter_batch(fresh, ["c", "b"]):
        assert torch.equal(fresh(x), y)


def test_compiled_model_reads_the_routing_when_it_runs():
    """torch.compile (not fullgraph) serves each batch's routing, not the one it was traced with."""
    model = expert_only_model(max_adapters=2)
    g = torch.Generator().manual_seed(6)
    lf.add_adapter(model, "a", {"experts": (*random_adapter(2, g), 0.5)})
    lf.add_adapter(model, "b", {"experts": (*random_adapter(3, g), 2.0)})
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 3, HIDDEN, generator=g)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))  # never routed yet: the base experts, traced
        for names in (["a", "b"], ["b", None], [None, None]):
            with lf.adapter_batch(model, names):
                assert torch.equal(compiled(x), model(x)), names
        assert torch.equal(compiled(x), model(x))


def test_an_expert_slot_saved_loads_in_peft_and_back(saved_adapters, tokens, tmp_path):
    """save_peft_adapter_slot writes an expert slot as PEFT's target_parameters adapter: PEFT loads it
    with the logits of the adapter's own PEFT model, and it loads back into a slot unchanged. Covered:
    both parameters with linear targets (a3), one parameter only (a2: no nesting), rslora (a1)."""
    base, dirs = saved_adapters
    ours = serving_model(base)
    for name in ADAPTER_CONFIGS:
        lf.load_peft_adapter_slot(ours, dirs[name], name)
    for name in ("a1", "a2", "a3"):
        out = tmp_path / name
        lf.save_peft_adapter_slot(ours, name, out)
        with torch.no_grad():
            saved = peft.PeftModel.from_pretrained(copy.deepcopy(base).double(), out).eval()
            original = peft.PeftModel.from_pretrained(copy.deepcopy(base).double(), dirs[name]).eval()
            # the slot keeps its scaling in fp32, so alpha = scaling · r comes back to fp32's precision
            assert rel_error(saved(input_ids=tokens).logits, original(input_ids=tokens).logits) <= 1e-6, name
        reloaded = serving_model(base)
        lf.load_peft_adapter_slot(reloaded, out, name)
        layers = lf.multi_lora_layers(reloaded)
        for layer_name, ours_layer in lf.multi_lora_layers(ours).items():
            held = name in ours_layer.adapter_slots
            assert held == (name in layers[layer_name].adapter_slots), layer_name
            if not held:
                continue
            slot, new_slot = ours_layer.adapter_slots[name], layers[layer_name].adapter_slots[name]
            new_state = layers[layer_name].state_dict()
            for key, value in ours_layer.state_dict().items():
                if "lora_" in key or key in ("scalings", "ranks"):
                    dim = 1 if key in ("scalings", "ranks") and value.dim() == 3 else 0
                    kept, back = value.select(dim, slot), new_state[key].select(dim, new_slot)
                    assert torch.allclose(kept.double(), back.double(), rtol=1e-6, atol=1e-7), (layer_name, key)
