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


def test_layer_checks_its_own_tensors_on_every_call():
    """A slot stack or the base weight swapped behind the layer's back (``.data``) is refused with
    the checks' error, inside adapter_batch too, never handed to the kernels."""
    _, layer, _ = make_layer()
    x = torch.randn(3, IN, device=DEVICE)
    ids = torch.tensor([0, -1, 1], device=DEVICE)
    holder = nn.Sequential(layer)
    for name, bad, match in (("lora_B", lambda t: t[:, :, :-1], "lora_B must be"),
                             ("lora_A", lambda t: t[:2], "lora_B must be"),
                             ("weight", lambda t: t[:, :-1], "x has 21 features"),
                             ("scalings", lambda t: t[:2], "scalings must be"),
                             ("ranks", lambda t: t.float(), "ranks must be an int32 or int64")):
        tensor = getattr(layer, name)
        good = tensor.data
        tensor.data = bad(good)
        try:
            with pytest.raises((TypeError, ValueError), match=match):
                layer(x, ids)
            with lf.adapter_batch(holder, ["a", None, "b"]), pytest.raises((TypeError, ValueError), match=match):
                layer(x.unsqueeze(1))
        finally:
            tensor.data = good
    torch.testing.assert_close(layer(x, ids), layer(x, lf.plan_segments(ids, 4)))


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


# ------------------------------------------------------------ serving: routing, nesting, slot lifetime
def served_model(max_adapters=6):
    """Two MultiLoRALinear layers in a row (the second reads the first's output) and adapters a, b, c."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT), nn.Linear(OUT, IN)).to(DEVICE)
    lf.inject_multi_lora(model, ["0", "1"], max_adapters=max_adapters, max_rank=8)
    adapters = {name: model_adapter(seed) for seed, name in enumerate("abc")}
    for name, weights in adapters.items():
        lf.add_adapter(model, name, weights)
    return model, adapters


def model_adapter(seed, r0=3, r1=5):
    (A0, B0), (A1, B1) = random_adapter(r0, 10 * seed, IN, OUT), random_adapter(r1, 10 * seed + 1, OUT, IN)
    return {"0": (A0.to(DEVICE), B0.to(DEVICE), 1.5), "1": (A1.to(DEVICE), B1.to(DEVICE), 0.75)}


def model_reference(model, adapters, names, x):
    """Sequence b through both layers with adapter names[b] alone (None: base), in float64."""
    out = []
    for b, name in enumerate(names):
        h = x[b].double()
        for key, linear in (("0", model[0]), ("1", model[1])):
            y = h @ linear.weight.double().T + linear.bias.double()
            if name is not None:
                A, B, s = adapters[name][key]
                y = y + s * (h @ A.double().T) @ B.double().T
            h = y
        out.append(h)
    return torch.stack(out)


def assert_served(model, adapters, names, x, y):
    assert rel_error(y, model_reference(model, adapters, names, x)) <= TOLERANCE[torch.float32]


def test_routing_belongs_to_each_thread(monkeypatch):
    """Two threads in their own adapter_batch on one model, forwards interleaved by a barrier:
    each gets its own adapters (the routing used to live on the shared modules)."""
    import threading
    if DEVICE == "cpu":  # Triton's interpreter is not thread-safe (compiled kernels are)
        monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    model, adapters = served_model()
    x = torch.randn(3, 4, IN, device=DEVICE)
    batches = [["a", None, "b"], ["c", "c", "a"]]
    barrier, outputs, errors = threading.Barrier(2, timeout=60), {}, []

    def serve(i):
        try:
            with lf.adapter_batch(model, batches[i]):
                barrier.wait()  # both blocks are open now
                outputs[i, 0] = model(x)
                barrier.wait()
                outputs[i, 1] = model(x)
        except Exception as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)
            barrier.abort()  # do not leave the other thread waiting

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (i, _), y in outputs.items():
        assert_served(model, adapters, batches[i], x, y)


def test_routing_belongs_to_each_asyncio_task():
    import asyncio
    model, adapters = served_model()
    x = torch.randn(3, 2, IN, device=DEVICE)

    async def serve(names):
        with lf.adapter_batch(model, names):
            await asyncio.sleep(0)  # the other task opens its block here
            y = model(x)
            await asyncio.sleep(0)
            return y, model(x)

    async def main():
        return await asyncio.gather(serve(["a", "b", None]), serve(["c", None, "c"]))

    for names, ys in zip((["a", "b", None], ["c", None, "c"]), asyncio.run(main())):
        for y in ys:
            assert_served(model, adapters, names, x, y)


def test_nested_batch_restores_the_outer_one():
    model, adapters = served_model()
    x = torch.randn(2, IN, device=DEVICE)
    with lf.adapter_batch(model, ["a", "b"]):
        with lf.adapter_batch(model, ["c", None]):
            assert_served(model, adapters, ["c", None], x, model(x))
        assert_served(model, adapters, ["a", "b"], x, model(x))
    assert_served(model, adapters, [None, None], x, model(x))


def test_a_batch_keeps_the_adapters_it_named():
    """remove("c") then add("d") inside a batch that asked for "c": the rows keep c's weights
    (d gets another slot); a hot swap of "a" inside the batch is not seen until it exits."""
    model, adapters = served_model()
    x = torch.randn(3, IN, device=DEVICE)
    names = ["c", "a", None]
    with lf.adapter_batch(model, names):
        lf.remove_adapter(model, "c")
        slot_d = lf.add_adapter(model, "d", model_adapter(7))
        assert slot_d != 2  # c's slot stays with this batch
        new_a = model_adapter(8, r0=2, r1=1)
        slot_a = lf.add_adapter(model, "a", new_a)
        assert slot_a not in (0, 2, slot_d)
        assert_served(model, adapters, names, x, model(x))
    adapters.update(a=new_a, d=model_adapter(7))
    with lf.adapter_batch(model, ["a", "d", None]):
        assert_served(model, adapters, ["a", "d", None], x, model(x))
    layer = model[0]
    assert layer.free_slots() == [0, 2, 5]  # the old slots of a and c were freed on exit
    assert lf.add_adapter(model, "e", model_adapter(9)) == 0


def test_a_swap_outside_batches_is_in_place():
    model, adapters = served_model()
    assert lf.add_adapter(model, "b", model_adapter(4, r0=1, r1=8)) == 1


def test_swapping_a_served_adapter_needs_a_spare_slot():
    model, _ = served_model(max_adapters=3)
    with lf.adapter_batch(model, ["a"]):
        with pytest.raises(ValueError, match="being served by open adapter_batch blocks and no slot is free"):
            lf.add_adapter(model, "a", model_adapter(5))
        lf.add_adapter(model, "b", model_adapter(5))  # b is not pinned: swapped in place
    assert lf.add_adapter(model, "a", model_adapter(5)) == 0


def test_compiled_model_reads_each_callers_routing():
    """The compiled graph reads the routing when it runs (routed_sequence_ids), so two contexts
    served alternately by one compiled model each get their own batch, with one compile."""
    import contextvars
    from torch._dynamo.testing import CompileCounter
    model, adapters = served_model()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(3, 2, IN, device=DEVICE)
    contexts = [contextvars.copy_context() for _ in range(2)]
    batches = [["a", None, "b"], ["c", "a", "a"]]
    blocks = [lf.adapter_batch(model, names) for names in batches]
    for ctx, block in zip(contexts, blocks):
        ctx.run(block.__enter__)
    for _ in range(2):
        for ctx, names in zip(contexts, batches):
            assert_served(model, adapters, names, x, ctx.run(compiled, x))
    assert_served(model, adapters, [None] * 3, x, compiled(x))  # this context has no open batch
    assert counter.frame_count == 1
    for ctx, block in zip(contexts, blocks):
        ctx.run(block.__exit__, None, None, None)


@pytest.mark.parametrize("call, error, match", [
    (lambda m: lf.add_adapter(m, "x", [torch.randn(2, IN), torch.randn(OUT, 2), 1.0]), TypeError,
     r"weights must be a mapping"),
    (lambda m: lf.add_adapter(m, "x", {"0": torch.randn(2, IN)}), TypeError, r"weights\['0'\] must be a"),
    (lambda m: lf.add_adapter(m, "x", {}), ValueError, r"weights is empty"),
    (lambda m: lf.add_adapter(m, 3, model_adapter(1)), TypeError, r"adapter name must be a str"),
    (lambda m: m[0].add_adapter("x", [[0.0] * IN], torch.randn(OUT, 1), 1.0), TypeError,
     r"lora_A must be a torch.Tensor, got list"),
    (lambda m: lf.adapter_batch(m, "a").__enter__(), TypeError, r"adapter_names must be a sequence"),
    (lambda m: lf.adapter_batch(m, [1]).__enter__(), TypeError, r"adapter_names must hold str or None"),
    (lambda m: lf.add_adapter([m], "x", model_adapter(1)), TypeError, r"model must be an nn.Module"),
])
def test_model_level_errors(call, error, match):
    model, _ = served_model()
    with pytest.raises(error, match=match):
        call(model)


def test_update_refills_the_routing_in_place():
    """routing.update_(names) re-routes an open batch through the same buffers (what a captured
    CUDA graph reads on replay) and moves its pins to the new names' slots."""
    model, adapters = served_model()
    x = torch.randn(3, 2, IN, device=DEVICE)
    with lf.adapter_batch(model, ["a", "b", None]) as routing:
        model(x)
        ids, plan = routing.sequence_ids, routing.plan_for(x)
        buffers = [t.data_ptr() for t in (ids, plan.sorted_rows, plan.chunk_adapter)]
        routing.update_(["c", None, "c"])
        assert [t.data_ptr() for t in (ids, plan.sorted_rows, plan.chunk_adapter)] == buffers
        assert routing.plan_for(x) is plan
        assert_served(model, adapters, ["c", None, "c"], x, model(x))
        assert lf.add_adapter(model, "a", model_adapter(6)) == 0  # "a" is no longer pinned: in place
    with pytest.raises(RuntimeError, match="has exited"):
        routing.update_(["a", "b", None])
    token = lf.serving.routing.ROUTES.set({id(model[0]): routing})  # as a task that outlived the block
    with pytest.raises(RuntimeError, match="has exited"):
        model(x)
    lf.serving.routing.ROUTES.reset(token)


def test_one_plan_per_leading_shape_whatever_the_width():
    """Layers of different widths share the plan of one leading shape; update_ keeps it for the
    same batch size, and a new batch size plans afresh (the per-shape lookup follows)."""
    model, _ = served_model()
    with lf.adapter_batch(model, ["a", "b", None]) as routing:
        plan = routing.plan_for(torch.randn(3, 2, IN, device=DEVICE))
        assert routing.plan_for(torch.randn(3, 2, IN + 5, device=DEVICE)) is plan
        assert routing.plan_for(torch.randn(3, 4, IN, device=DEVICE)) is not plan
        routing.update_(["b", None, "a"])
        assert routing.plan_for(torch.randn(3, 2, IN + 5, device=DEVICE)) is plan
        routing.update_(["b", None])
        fresh = routing.plan_for(torch.randn(2, 2, IN, device=DEVICE))
        assert fresh is not plan and fresh.num_rows == 4
        assert routing.plan_for(torch.randn(2, 2, IN + 5, device=DEVICE)) is fresh
        with pytest.raises(ValueError, match="2 adapter names"):
            routing.plan_for(torch.randn(3, 2, IN, device=DEVICE))


def peft_dir(model, name, tmp_path, drop=()):
    """Adapter ``name`` saved in PEFT's format, with the modules in ``drop`` removed from its file."""
    from safetensors.torch import load_file, save_file
    directory = tmp_path / name
    lf.save_peft_adapter_slot(model, name, directory)
    path = directory / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not any(f".{m}.lora_" in k for m in drop)}
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("drop", [("0", "1"), ("1",)], ids=["no-tensors", "one-layer-missing"])
def test_load_peft_adapter_slot_refuses_a_file_missing_targets(tmp_path, drop):
    """An adapter file that misses target modules raises as load_peft_adapter does, and a hot swap
    with it leaves the loaded adapter as it was (it used to load nothing and return slot 0, or
    load part of it, silently removing the adapter from the other layers)."""
    model, adapters = served_model()
    directory = peft_dir(model, "b", tmp_path, drop=drop)
    with pytest.raises(ValueError, match="missing keys for target modules"):
        lf.load_peft_adapter_slot(model, directory, "b")
    with pytest.raises(ValueError, match="missing keys for target modules"):
        lf.load_peft_adapter(copy.deepcopy(model), directory)  # the same check, the same words
    x = torch.randn(2, IN, device=DEVICE)
    with lf.adapter_batch(model, ["b", "a"]):
        assert_served(model, adapters, ["b", "a"], x, model(x))


def test_load_peft_adapter_slot_round_trip_and_unexpected_keys(tmp_path):
    model, adapters = served_model()
    directory = peft_dir(model, "c", tmp_path)
    lf.remove_adapter(model, "c")
    assert lf.load_peft_adapter_slot(model, directory, "c2") == 2
    x = torch.randn(2, IN, device=DEVICE)
    with lf.adapter_batch(model, ["c2", None]):
        y = model(x)
    adapters["c2"] = adapters["c"]
    assert_served(model, adapters, ["c2", None], x, y)
    other = nn.Sequential(nn.Linear(IN, OUT))
    lf.inject_multi_lora(other, ["0"], max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match=r"unexpected keys: .*'base_model\.model\.1\.lora_A\.weight'"):
        lf.load_peft_adapter_slot(other, directory, "c")
