"""MultiLoRALinear, adapter slots, batch routing, and PEFT's mixed-adapter batches on a tiny Llama."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_fused as lf
from lora_cases import DEVICE, TOLERANCE, rel_error

IN, OUT = 21, 26


def random_adapter(r, seed, in_features=IN, out_features=OUT):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, in_features, generator=g) * in_features ** -0.5,
            torch.randn(out_features, r, generator=g) * r ** -0.5)


def make_layer(max_adapters=4, max_rank=8):
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT).to(DEVICE)
    layer = lf.MultiLoRALinear.from_linear(linear, max_adapters=max_adapters, max_rank=max_rank)
    adapters = {"a": (*random_adapter(3, 1), 0.5), "b": (*random_adapter(8, 2), 2.0),
                "c": (*random_adapter(1, 3), 1.5)}
    for name, (A, B, s) in adapters.items():
        layer.add_adapter(name, A.to(DEVICE), B.to(DEVICE), s)
    return linear, layer, adapters


def per_row_reference(linear, adapters, names, x):
    """Row t: the base layer plus adapter names[t] alone, in float64."""
    out = []
    for t, name in enumerate(names):
        y = nn.functional.linear(x[t].double(), linear.weight.double(), linear.bias.double())
        if name is not None:
            A, B, s = adapters[name]
            y = y + s * (B.double() @ (A.double() @ x[t].double().cpu()).to(y.device))
        out.append(y)
    return torch.stack(out)


def test_from_linear_shares_the_frozen_base():
    linear, layer, _ = make_layer()
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    assert layer.adapter_names == ["a", "b", "c"]
    assert layer.ranks.tolist() == [3, 8, 1, 1] and layer.scalings.tolist() == [0.5, 2.0, 1.5, 0.0]
    x = torch.randn(5, IN, device=DEVICE)
    torch.testing.assert_close(layer(x), linear(x))  # not routed: the base layer


def test_rows_use_their_own_adapter():
    linear, layer, adapters = make_layer()
    names = ["b", None, "a", "c", "b", "a", None]
    ids = torch.tensor([-1 if n is None else layer.slot_of(n) for n in names], device=DEVICE)
    x = torch.randn(len(names), IN, device=DEVICE)
    y = layer(x, ids)
    assert rel_error(y, per_row_reference(linear, adapters, names, x)) <= TOLERANCE[torch.float32]


def test_hot_swap_and_remove_in_place():
    linear, layer, adapters = make_layer()
    storage = (layer.lora_A.data_ptr(), layer.lora_B.data_ptr(), layer.ranks.data_ptr())
    A, B = random_adapter(5, 9)
    assert layer.add_adapter("b", A.to(DEVICE), B.to(DEVICE), 0.25) == 1  # same slot, smaller rank
    assert (layer.lora_A.data_ptr(), layer.lora_B.data_ptr(), layer.ranks.data_ptr()) == storage
    assert int(layer.ranks[1]) == 5 and (layer.lora_A[1, 5:] == 0).all() and (layer.lora_B[1, :, 5:] == 0).all()
    adapters["b"] = (A, B, 0.25)
    x = torch.randn(3, IN, device=DEVICE)
    ids = torch.tensor([1, 0, 1], device=DEVICE)
    assert rel_error(layer(x, ids), per_row_reference(linear, adapters, ["b", "a", "b"], x)) <= 1e-5
    layer.remove_adapter("a")
    assert layer.adapter_names == ["b", "c"] and (layer.lora_A[0] == 0).all()
    assert layer.add_adapter("d", *[t.to(DEVICE) for t in random_adapter(2, 4)], 1.0) == 0  # reuses the slot


@pytest.mark.parametrize("call, error, match", [
    (lambda l: l.add_adapter("big", *random_adapter(9, 1), 1.0), ValueError, r"rank 9 .*max_rank=8"),
    (lambda l: l.add_adapter("bad", torch.randn(3, IN + 1), torch.randn(OUT, 3), 1.0), ValueError,
     r"lora_A must be \[r, in_features=21\]"),
    (lambda l: l.add_adapter("__base__", *random_adapter(2, 1), 1.0), ValueError, r"__base__"),
    (lambda l: l.add_adapter("nan", *random_adapter(2, 1), float("nan")), ValueError, r"finite"),
    (lambda l: l.add_adapter("a", *random_adapter(2, 1), 1.0, slot=2), ValueError, r"is in slot 0, not 2"),
    (lambda l: l.add_adapter("e", *random_adapter(2, 1), 1.0, slot=1), ValueError, r"slot 1 is not a free"),
    (lambda l: l.remove_adapter("zzz"), KeyError, r"no adapter named 'zzz'"),
])
def test_slot_errors(call, error, match):
    _, layer, _ = make_layer()
    layer.cpu()
    with pytest.raises(error, match=match):
        call(layer)


def test_full_slots_are_refused():
    _, layer, _ = make_layer(max_adapters=3)
    with pytest.raises(ValueError, match="all 3 adapter slots are in use"):
        layer.add_adapter("d", *[t.to(DEVICE) for t in random_adapter(2, 5)], 1.0)


def test_one_batch_trains_several_adapters():
    """dA_i, dB_i of a mixed batch equal the gradients of adapter i on its own rows alone."""
    linear, layer, adapters = make_layer()
    names = ["a", "b", None, "a", "b", "b"]
    ids = torch.tensor([-1 if n is None else layer.slot_of(n) for n in names], device=DEVICE)
    x = torch.randn(len(names), IN, device=DEVICE)
    grad_y = torch.randn(len(names), OUT, device=DEVICE)
    layer(x, ids).backward(grad_y)
    for name in ("a", "b"):
        rows = [t for t, n in enumerate(names) if n == name]
        A, B, s = (t.to(DEVICE) if torch.is_tensor(t) else t for t in adapters[name])
        single = lf.LoRALinear.from_linear(copy.deepcopy(linear), r=A.shape[0], lora_alpha=s * A.shape[0])
        with torch.no_grad():
            single.lora_A.copy_(A)
            single.lora_B.copy_(B)
        single(x[rows]).backward(grad_y[rows])
        slot, r = layer.slot_of(name), A.shape[0]
        assert rel_error(layer.lora_A.grad[slot, :r], single.lora_A.grad) <= 1e-5
        assert rel_error(layer.lora_B.grad[slot, :, :r], single.lora_B.grad) <= 1e-5
    assert (layer.lora_A.grad[layer.slot_of("c")] == 0).all()  # no rows: exactly zero


def test_hot_swap_does_not_recompile():
    from torch._dynamo.testing import CompileCounter
    _, layer, _ = make_layer()
    x = torch.randn(4, IN, device=DEVICE)
    plan = lf.plan_segments(torch.tensor([0, 1, -1, 2], device=DEVICE), 4)
    counter = CompileCounter()
    compiled = torch.compile(lambda inp: layer(inp, plan), backend=counter, fullgraph=True)
    before = compiled(x)
    layer.add_adapter("b", *[t.to(DEVICE) for t in random_adapter(6, 11)], 3.0)
    after = compiled(x)
    assert counter.frame_count == 1, "swapping an adapter's weights recompiled the model"
    torch.testing.assert_close(after, layer(x, plan))
    assert not torch.allclose(before[1], after[1]) and torch.equal(before[0], after[0])


# --------------------------------------------------------------------------
# a tiny Llama: PEFT's mixed-adapter batch, row for row
# --------------------------------------------------------------------------
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
ADAPTER_CONFIGS = {
    "a0": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "a1": dict(r=6, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
               rank_pattern={"up_proj": 2}),
}


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


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


def test_compiled_model_serves_new_batches_without_recompiling():
    """The plan is traced into the graph; a new mix of adapters (same batch size), a hot
    swap and a new adapter change no guard, so one compile serves them all."""
    from torch._dynamo.testing import CompileCounter
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8)).to(DEVICE)
    lf.inject_multi_lora(model, ["0", "2"], max_adapters=3, max_rank=4)

    def adapter(seed, r0, r2):
        (A0, B0), (A2, B2) = random_adapter(r0, seed, 16, 24), random_adapter(r2, seed + 1, 24, 8)
        return {"0": (A0.to(DEVICE), B0.to(DEVICE), 1.0), "2": (A2.to(DEVICE), B2.to(DEVICE), 0.5)}

    lf.add_adapter(model, "a", adapter(1, 4, 2))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(3, 5, 16, device=DEVICE)
    for names in (["a", None, "a"], [None, "a", "a"], ["b", "a", None], ["b", "b", "a"]):
        if names[0] == "b" and "b" not in lf.multi_lora_layers(model)["0"].adapter_names:
            lf.add_adapter(model, "b", adapter(3, 3, 4))
        if names == ["b", "b", "a"]:
            lf.add_adapter(model, "a", adapter(5, 1, 1))  # hot swap, smaller ranks
        with lf.adapter_batch(model, names):
            y, expected = compiled(x), model(x)
        torch.testing.assert_close(y, expected)
    assert counter.frame_count == 1


def test_state_dict_round_trip_keeps_slot_names():
    _, layer, _ = make_layer()
    fresh = lf.MultiLoRALinear(IN, OUT, max_adapters=4, max_rank=8).to(DEVICE)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.adapter_names == ["a", "b", "c"] and fresh.slot_of("c") == 2
    x = torch.randn(3, IN, device=DEVICE)
    ids = torch.tensor([2, -1, 1], device=DEVICE)
    torch.testing.assert_close(fresh(x, ids), layer(x, ids))
    small = lf.MultiLoRALinear(IN, OUT, max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match=r"not valid for max_adapters=2"):
        small.set_extra_state({"adapter_slots": {"a": 0, "c": 2}})
    with pytest.raises(ValueError, match=r"each name its own slot"):
        small.set_extra_state({"adapter_slots": {"a": 0, "b": 0}})
