"""Every LoRA module keeps its state through the ways models are built, moved, copied and saved.

Beside its parameters a module holds state of its own: the float64 mirrors of ``scaling`` and
``lora_dropout`` that compiled forwards read (LoRALinear, DoRALinear), the merged flag and DoRA's
merge norm (extra state), slot names (MultiLoRALinear), the quant state (LoRALinear4bit), slot
scalings and ranks (MultiLoRAEmbedding). Each module kind, after ``to_empty`` (from meta) +
``load_state_dict``, ``.half()``, deepcopy, pickle, and a safetensors round trip
of its ``state_dict``, gives the output it gave before, eagerly and under ``torch.compile``.

The reference is the freshly built module's eager fp32 output: what is checked here is that a
transformation keeps the function (each kind's own test file checks the function against float64).
Then: Trainer checkpoints and ``save_pretrained`` of a tiny Llama with multi-adapter layers and
with merged DoRA layers save, load back and resume.
"""
from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from torch import nn

import lora_fused as lf
from lora_cases import TINY_LLAMA_VOCAB, TOLERANCE, rel_error, tiny_llama

safetensors_torch = pytest.importorskip("safetensors.torch")

IN, OUT, R, VOCAB = 19, 12, 4, 23
X = torch.randn(5, IN, generator=torch.Generator().manual_seed(1))
TOKENS = torch.tensor([[3, 0, 22], [7, 7, 1]])
#: The backend that runs the registered fake kernels and autograd, fast on CPU.
COMPILE_BACKEND = "eager"


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random values in every parameter (a DoRA magnitude kept positive)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dtype.is_floating_point:
            value = torch.randn(p.shape, generator=g) * 0.5
            p.copy_(value.abs() + 0.5 if name.endswith("magnitude_vector") else value)
    return module


# ------------------------------------------------------------------------------------------ kinds
def linear_layer(cls, merged: bool):
    def build(device: str, seed: int = 0) -> nn.Module:
        layer = cls(IN, OUT, r=R, lora_alpha=12.0, lora_dropout=0.25, device=device)
        if device != "meta":
            randomize(layer, seed)
            if merged:
                layer.merge()
        return layer.eval()
    return build


def linear_outputs(module: nn.Module, dtype: torch.dtype) -> list:
    """The eval output and, unmerged, a training output (dropout drawn from a fixed seed)."""
    x = X.to(dtype)
    outputs = [module.eval()(x)]
    if not getattr(module, "merged", False):
        torch.manual_seed(7)
        outputs.append(module.train()(x))
        module.eval()
    return outputs


def linear4bit_layer(device: str, seed: int = 0) -> nn.Module:
    """A bitsandbytes nf4 layer wrapped by LoRALinear4bit. bitsandbytes quantizes a Linear4bit
    when it is moved to a device, so a meta one has no packed layout to load into: "meta" builds
    it on the CPU (to_empty then discards its values, as it does a meta module's)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT)
    q = bnb.nn.Linear4bit(IN, OUT, compute_dtype=torch.float32, quant_type="nf4", quant_storage=torch.uint8)
    q.weight = bnb.nn.Params4bit(base.weight.data, requires_grad=False, quant_type="nf4", blocksize=64)
    q.bias = nn.Parameter(base.bias.data, requires_grad=False)
    layer = lf.LoRALinear4bit.from_linear4bit(q.to("cpu"), r=R, lora_alpha=12.0, lora_dropout=0.25)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer.eval()


def embedding_layer(merged: bool):
    def build(device: str, seed: int = 0) -> nn.Module:
        layer = lf.LoRAEmbedding(VOCAB, OUT, r=R, lora_alpha=6.0, device=device)
        if device != "meta":
            randomize(layer, seed)
            if merged:
                layer.merge()
        return layer
    return build


def embedding_outputs(module: nn.Module, dtype: torch.dtype) -> list:
    return [module(TOKENS)]


def adapter(seed: int, r: int, rows: int, cols: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, cols, generator=g) * 0.5, torch.randn(rows, r, generator=g) * 0.5


def multi_linear_layer(device: str, seed: int = 0) -> nn.Module:
    layer = lf.MultiLoRALinear(IN, OUT, max_adapters=3, max_rank=R, device=device)
    if device != "meta":
        randomize(layer, seed)
        layer.add_adapter("b", *adapter(seed + 1, R, OUT, IN), scaling=0.75, slot=2)
        layer.add_adapter("a", *adapter(seed + 2, 2, OUT, IN), scaling=2.5)
    return layer


def multi_linear_outputs(module: nn.Module, dtype: torch.dtype) -> list:
    a, b = module.slot_of("a"), module.slot_of("b")  # the slot names travel with the state
    return [module(X.to(dtype), torch.tensor([a, b, -1, b, a]))]


def multi_embedding_layer(device: str, seed: int = 0) -> nn.Module:
    layer = lf.MultiLoRAEmbedding(nn.Embedding(VOCAB, OUT, device=device), n_slots=3, r_max=R)
    if device != "meta":
        randomize(layer, seed)
        layer.set_adapter(0, *adapter(seed + 1, R, OUT, VOCAB), scaling=0.75)
        layer.set_adapter(2, *adapter(seed + 2, 3, OUT, VOCAB), scaling=2.5)
    return layer


def multi_embedding_outputs(module: nn.Module, dtype: torch.dtype) -> list:
    return [module(TOKENS, torch.tensor([0, 2, -1, 0, 2, 2]))]


@dataclass
class Kind:
    build: Callable[..., nn.Module]        # build(device, seed=0): random values unless on meta
    outputs: Callable[[nn.Module, torch.dtype], list]
    #: builds a module that a checkpoint loads into (default: build; an unmerged one for merged kinds)
    load_target: Optional[Callable[..., nn.Module]] = None


KINDS = {
    "lora": Kind(linear_layer(lf.LoRALinear, merged=False), linear_outputs),
    "lora-merged": Kind(linear_layer(lf.LoRALinear, merged=True), linear_outputs,
                        linear_layer(lf.LoRALinear, merged=False)),
    "dora": Kind(linear_layer(lf.DoRALinear, merged=False), linear_outputs),
    "dora-merged": Kind(linear_layer(lf.DoRALinear, merged=True), linear_outputs,
                        linear_layer(lf.DoRALinear, merged=False)),
    "lora-4bit": Kind(linear4bit_layer, linear_outputs),
    "embedding": Kind(embedding_layer(merged=False), embedding_outputs),
    "embedding-merged": Kind(embedding_layer(merged=True), embedding_outputs, embedding_layer(merged=False)),
    "multi-linear": Kind(multi_linear_layer, multi_linear_outputs),
    "multi-embedding": Kind(multi_embedding_layer, multi_embedding_outputs),
}


# ------------------------------------------------------------------------------------ transforms
def meta_then_load(kind: Kind, module: nn.Module, tmp_path) -> nn.Module:
    """The FSDP2 recipe: built on meta, materialised with to_empty, then loaded."""
    built = kind.build("meta")
    built.to_empty(device="cpu")
    built.load_state_dict(module.state_dict(), strict=True)
    return built


def safetensors_round_trip(kind: Kind, module: nn.Module, tmp_path) -> nn.Module:
    """save_file / load_file (what save_pretrained and Trainer checkpoints use) into another module."""
    path = tmp_path / "state.safetensors"
    safetensors_torch.save_file(module.state_dict(), str(path))
    other = (kind.load_target or kind.build)("cpu", seed=5)
    other.load_state_dict(safetensors_torch.load_file(str(path)), strict=True)
    return other


TRANSFORMS = {  # name: (transform(kind, module, tmp_path) -> module, the dtype it leaves)
    "meta+to_empty+load": (meta_then_load, torch.float32),
    "half": (lambda kind, m, tmp_path: m.half(), torch.float16),
    "deepcopy": (lambda kind, m, tmp_path: copy.deepcopy(m), torch.float32),
    "pickle": (lambda kind, m, tmp_path: pickle.loads(pickle.dumps(m)), torch.float32),
    "safetensors": (safetensors_round_trip, torch.float32),
}


def use_torch_backend(monkeypatch) -> None:
    """Compiled tests run the torch backend, reference included (its own dropout draw): dynamo
    would trace into the Triton interpreter (Python) where a forward is no registered op (4-bit,
    multi-adapter embedding). The state under test is the same for every backend;
    tests/compile/test_compile.py compiles the Triton path."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")


def assert_same_outputs(outputs: list, expected: list, dtype: torch.dtype) -> None:
    tol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    for out, ref in zip(outputs, expected, strict=True):
        assert out.dtype == dtype
        assert rel_error(out, ref) <= tol, f"relative error {rel_error(out, ref):.3g} > {tol}"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("kind_name", list(KINDS))
def test_transformed_module_gives_the_reference_output(kind_name, transform, compiled, tmp_path, monkeypatch):
    """Built, transformed, (compiled,) run: the output of the module as built."""
    kind = KINDS[kind_name]
    if compiled:
        use_torch_backend(monkeypatch)
    expected = kind.outputs(kind.build("cpu"), torch.float32)
    apply, dtype = TRANSFORMS[transform]
    module = apply(kind, kind.build("cpu"), tmp_path)
    if compiled:
        torch._dynamo.reset()
        module = torch.compile(module, backend=COMPILE_BACKEND)
    assert_same_outputs(kind.outputs(module, dtype), expected, dtype)


@pytest.mark.parametrize("kind_name", list(KINDS))
def test_a_compiled_module_follows_to_empty_and_load_in_place(kind_name, monkeypatch):
    """The same module object, compiled and run, then re-materialised and loaded: the compiled
    model reads the loaded state (nothing derived keeps the values of before)."""
    kind = KINDS[kind_name]
    use_torch_backend(monkeypatch)
    module = kind.build("cpu")
    expected = kind.outputs(kind.build("cpu"), torch.float32)
    state = copy.deepcopy(module.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=COMPILE_BACKEND)
    kind.outputs(compiled, torch.float32)
    module.to_empty(device="cpu")
    module.load_state_dict(state, strict=True)
    assert_same_outputs(kind.outputs(compiled, torch.float32), expected, torch.float32)


def test_the_issue_example_gives_the_eager_output_under_compile():
    """Meta init + to_empty + load_state_dict (strict) + torch.compile, as reported."""
    torch.manual_seed(0)
    ref = lf.inject_lora(nn.Sequential(nn.Linear(32, 48)), ["0"], r=4, lora_alpha=32)
    randomize(ref, 0)
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(32, 48))
    lf.inject_lora(net, ["0"], r=4, lora_alpha=32)
    net.to_empty(device="cpu")
    net.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(6, 32)
    torch._dynamo.reset()
    assert rel_error(torch.compile(net, backend="eager")(x), ref(x)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_load_state_dict_with_assign_materialises_a_meta_layer(compiled):
    """load_state_dict(assign=True) into a meta-built layer (materialising by assignment): the
    mirrors the compiled forward reads follow the weight off meta."""
    reference = linear_layer(lf.LoRALinear, merged=False)("cpu")
    layer = linear_layer(lf.LoRALinear, merged=False)("meta")
    layer.load_state_dict(reference.state_dict(), assign=True)
    if compiled:
        torch._dynamo.reset()
        layer = torch.compile(layer, backend=COMPILE_BACKEND)
    assert_same_outputs(linear_outputs(layer, torch.float32), linear_outputs(reference, torch.float32), torch.float32)


def test_scaling_set_after_a_cast_under_inference_mode():
    """A module cast under inference_mode holds inference tensors, read-only outside it: setting
    scaling (or moving the module) afterwards still writes the mirror the compiled forward reads."""
    layer = randomize(lf.LoRALinear(IN, OUT, r=R, lora_alpha=4.0), 0).eval()
    with torch.inference_mode():
        layer.half()
    layer.scaling = 3.0
    layer.to("cpu")
    torch._dynamo.reset()
    with torch.no_grad():  # the parameters are inference tensors too: autograd cannot save them
        out = torch.compile(layer, backend=COMPILE_BACKEND)(X.half())
    reference = randomize(lf.LoRALinear(IN, OUT, r=R, lora_alpha=4.0), 0)
    reference.scaling = 3.0
    assert rel_error(out, reference(X)) <= TOLERANCE[torch.float16]


# ------------------------------------------------------------------- Trainer and save_pretrained
def multi_adapter_llama(seed: int, adapters: bool = True):
    pytest.importorskip("transformers")
    model = lf.inject_multi_lora(tiny_llama(seed), ["q_proj", "v_proj"], max_adapters=3, max_rank=R)
    if adapters:
        for i, name in enumerate(("b", "a")):  # "a" lands in slot 1: the names are not slot order
            weights = {layer_name: (*adapter(10 * i + j, R - i, layer.out_features, layer.in_features), 1.5 + i)
                       for j, (layer_name, layer) in enumerate(lf.multi_lora_layers(model).items())}
            lf.add_adapter(model, name, weights)
    return model


BATCH_ADAPTERS = ["a", "b"]
SEQUENCES = torch.randint(0, TINY_LLAMA_VOCAB, (8, 6), generator=torch.Generator().manual_seed(4))


def mixed_adapter_trainer(model, output_dir):
    """A Trainer whose every step trains adapters a and b at once (sequence 0 of each batch
    through a, sequence 1 through b: adapter_batch around the loss), checkpointing every step."""
    transformers = pytest.importorskip("transformers")

    class MixedAdapterTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            with lf.adapter_batch(model, BATCH_ADAPTERS[:inputs["input_ids"].shape[0]]):
                return super().compute_loss(model, inputs, *args, **kwargs)

    training = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=2, learning_rate=5e-2, max_steps=2,
        save_steps=1, save_strategy="steps", report_to=[], use_cpu=True, seed=0, data_seed=0,
        logging_steps=1, disable_tqdm=True)
    data = [{"input_ids": s, "labels": s} for s in SEQUENCES]
    return MixedAdapterTrainer(model=model, args=training, train_dataset=data)


def routed_logits(model):
    with torch.no_grad(), lf.adapter_batch(model, BATCH_ADAPTERS):
        return model(input_ids=SEQUENCES[:2]).logits


def test_trainer_checkpoints_and_resumes_a_multi_adapter_model(tmp_path):
    """A Trainer training two adapters in one model checkpoints (safetensors), the checkpoint
    loads into a fresh model, and a run resumed from the first checkpoint ends where the
    uninterrupted run ended."""
    model = multi_adapter_llama(0)
    before = routed_logits(model)
    mixed_adapter_trainer(model, tmp_path / "run").train()
    trained = routed_logits(model)
    assert rel_error(trained, before) > 1e-3  # the adapters trained

    loaded = multi_adapter_llama(1, adapters=False)
    state = safetensors_torch.load_file(str(tmp_path / "run" / "checkpoint-2" / "model.safetensors"))
    loaded.load_state_dict(state, strict=True)
    assert all(layer.adapter_names == ["b", "a"] for layer in lf.multi_lora_layers(loaded).values())
    assert rel_error(routed_logits(loaded), trained) <= TOLERANCE[torch.float32]

    resumed = multi_adapter_llama(1, adapters=False)
    mixed_adapter_trainer(resumed, tmp_path / "run").train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert rel_error(routed_logits(resumed), trained) <= TOLERANCE[torch.float32]


def dora_llama(seed: int):
    pytest.importorskip("transformers")
    return randomize(lf.inject_lora(tiny_llama(seed), ["q_proj", "v_proj", "down_proj"], r=R, lora_alpha=8,
                                    use_dora=True), seed)


def test_save_pretrained_of_a_merged_dora_model_loads_and_unmerges(tmp_path):
    """A merged DoRA model saves with save_pretrained (safetensors), loads into a fresh DoRA
    model (as a Trainer resume does: load_file + load_state_dict), computes the same, and
    unmerges to the unmerged model's output (the merge norms travel with the checkpoint)."""
    model = dora_llama(0).eval()
    tokens = SEQUENCES[:2]
    with torch.no_grad():
        unmerged = model(input_ids=tokens).logits
        lf.merge_lora(model)
        merged = model(input_ids=tokens).logits
    model.save_pretrained(str(tmp_path))
    fresh = dora_llama(1).eval()
    fresh.load_state_dict(safetensors_torch.load_file(str(tmp_path / "model.safetensors")), strict=True)
    with torch.no_grad():
        assert rel_error(fresh(input_ids=tokens).logits, merged) <= TOLERANCE[torch.float32]
        lf.unmerge_lora(fresh)
        assert rel_error(fresh(input_ids=tokens).logits, unmerged) <= TOLERANCE[torch.float32]


def test_trainer_saves_a_merged_dora_model(tmp_path):
    """Trainer.save_model (the checkpoint writer) of a model trained with DoRA and then merged."""
    transformers = pytest.importorskip("transformers")
    model = dora_llama(0)
    training = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2,
                                              max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=training,
                                   train_dataset=[{"input_ids": s, "labels": s} for s in SEQUENCES])
    trainer.train()
    model.eval()
    lf.merge_lora(model)
    with torch.no_grad():
        merged = model(input_ids=SEQUENCES[:2]).logits
    trainer.save_model(str(tmp_path / "merged"))
    fresh = dora_llama(1).eval()
    fresh.load_state_dict(safetensors_torch.load_file(str(tmp_path / "merged" / "model.safetensors")), strict=True)
    with torch.no_grad():
        assert rel_error(fresh(input_ids=SEQUENCES[:2]).logits, merged) <= TOLERANCE[torch.float32]


def test_extra_state_is_tensors_only():
    """safetensors stores tensors only: every module's extra state is one."""
    for kind in KINDS.values():
        for key, value in kind.build("cpu").state_dict().items():
            assert isinstance(value, torch.Tensor), f"{key} is a {type(value).__name__}"


def test_older_checkpoints_load():
    """Extra states saved as dicts (before they were tensors) still load."""
    multi = multi_linear_layer("cpu")
    state = multi.state_dict()
    state["_extra_state"] = {"adapter_slots": {"a": 1, "b": 2}}
    fresh = multi_linear_layer("cpu", seed=3)
    fresh.load_state_dict(state)
    assert fresh.slot_of("a") == 1 and fresh.slot_of("b") == 2
    dora = linear_layer(lf.DoRALinear, merged=True)("cpu")
    state = dora.state_dict()
    state["_extra_state"] = {"merged": torch.tensor(True), "merged_norm": dora._merged_norm.clone()}
    fresh = linear_layer(lf.DoRALinear, merged=False)("cpu", seed=3)
    fresh.load_state_dict(state)
    fresh.unmerge()
    assert rel_error(fresh.weight, linear_layer(lf.DoRALinear, merged=False)("cpu").weight) <= 1e-6


def test_bad_extra_state_is_refused():
    with pytest.raises(ValueError, match="MultiLoRALinear extra state"):
        multi_linear_layer("cpu").set_extra_state(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="MultiLoRALinear extra state"):
        multi_linear_layer("cpu").set_extra_state(torch.tensor(list(b"[1, 2]"), dtype=torch.uint8))
    with pytest.raises(ValueError, match="DoRALinear extra state"):
        lf.DoRALinear(IN, OUT, r=R).set_extra_state(torch.ones(2, 2))
