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
