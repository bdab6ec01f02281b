"""Reading PEFT LoRA adapter directories (the format: ``peft_config``).

- ``read_peft_adapter(directory)`` checks and reads one: ``(config, {module: (A, B)})``.
  It never touches a model; the multi-adapter loader (``peft_slots``) reuses it.
- ``load_peft_adapter(model, directory)`` injects ``LoRALinear`` where the config
  says (``LoRAExperts`` for ``target_parameters``: ``peft_experts``), or reuses ones already
  there, and loads the weights.

Only safetensors is read: a pickled ``adapter_model.bin`` is refused, never unpickled.
"""
from __future__ import annotations

import json
import os
import re
from typing import Container, Mapping, Optional

import torch
from torch import Tensor, nn

from .injection import mark_only_lora_as_trainable
from .peft_experts import apply_expert_loading, may_be_expert_entry, plan_expert_loading
from .peft_config import (CONFIG_NAME, KEY_PREFIX, PICKLE_NAME, SAFETENSORS_NAME, check_peft_config,
                          directory_argument, lora_key, module_lora_settings, peft_target_names)
from ..modules.lora_linear import LoRALinear, lora_scaling
from ..modules.dora import DoRALinear
from ..modules.embedding import LoRAEmbedding
from ..modules.qlora import is_lora_base, lora_class
from ..validation import check_dropout_p, check_rank

_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
#: DoRA's magnitude: PEFT saves ``<m>.lora_magnitude_vector``; its in-memory state dict has
#: ``<m>.lora_magnitude_vector.<adapter>.weight``.
_MAGNITUDE_RE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+)\.weight|\.weight)?$")
_MAGNITUDE = "magnitude"
#: LoRA on nn.Embedding: PEFT saves ``<m>.lora_embedding_A`` [r, num_embeddings] and
#: ``<m>.lora_embedding_B`` [dim, r] (parameters, no ``.weight``); in memory ``...lora_embedding_A.<adapter>``.
_EMBEDDING_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?$")
#: PEFT also saves a targeted embedding's base weight (``save_embedding_layers``) as
#: ``<m>.base_layer.weight``; loading it into the base embedding is what PEFT does.
_BASE_LAYER_RE = re.compile(r"^(?P<module>.+)\.base_layer\.weight(?P<adapter>(?!))?$")  # no adapter name
_BASE_LAYER = "base_layer"


class EmbeddingLoRATensors(tuple):
    """``(lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r])`` of an embedding module, as
    ``read_peft_adapter`` returns them; ``base_weight`` is the file's ``<m>.base_layer.weight`` or None."""
    base_weight: Optional[Tensor] = None


def _shapes(*tensors: Tensor) -> str:
    return ", ".join(str(tuple(t.shape)) for t in tensors)


def read_peft_adapter_with_keys(directory) -> tuple[dict, dict[str, tuple[Tensor, Tensor]],
                                                    dict[str, tuple[str, str]]]:
    """read_peft_adapter plus the file's key names for each module (for error messages)."""
    directory = directory_argument(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"PEFT adapter directory {directory!r} does not exist")
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: {directory!r} is not a PEFT adapter directory")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    config = check_peft_config(raw, source=config_path)

    weights_path = os.path.join(directory, SAFETENSORS_NAME)
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(directory, PICKLE_NAME)):
            raise ValueError(
                f"{directory!r} has only {PICKLE_NAME} (a pickle, which can run code when loaded): "
                f"lora-fused reads {SAFETENSORS_NAME} only. If you trust the file, convert it once:\n"
                "  python -c \"import torch, safetensors.torch as st; "
                "st.save_file(torch.load('adapter_model.bin', weights_only=True), "
                "'adapter_model.safetensors', metadata={'format': 'pt'})\"")
        raise FileNotFoundError(f"{weights_path} not found")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from None

    keys = list(state)
    strip = bool(keys) and all(k.startswith(KEY_PREFIX) for k in keys)
    if not strip and any(k.startswith(KEY_PREFIX) for k in keys):
        odd = next(k for k in keys if not k.startswith(KEY_PREFIX))
        raise ValueError(f"{weights_path}: keys mix the {KEY_PREFIX!r} prefix with unprefixed ones "
                         f"(e.g. {odd!r})")
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    adapters, unexpected = set(), []
    for key in keys:
        bare = key[len(KEY_PREFIX):] if strip else key
        m = _KEY_RE.match(bare) or _MAGNITUDE_RE.match(bare) or _EMBEDDING_KEY_RE.match(bare) \
            or _BASE_LAYER_RE.match(bare)
        if m is None:
            unexpected.append(key)
            continue
        adapters.add(m["adapter"])
        slot = parts.setdefault(m["module"], {})
        part = m.groupdict().get("ab") or (_BASE_LAYER if m.re is _BASE_LAYER_RE else _MAGNITUDE)
        if part in slot:
            raise ValueError(f"{weights_path}: keys {slot[part][0]!r} and {key!r} both give "
                             f"lora_{part} of module {m['module']!r}")
        slot[part] = (key, state[key])
    if unexpected:
        hint = ""
        if any(k.endswith(".bias") for k in unexpected) and config.get("bias", "none") != "none":
            hint = (f" (bias={config['bias']!r}: trained base-layer biases are saved with the adapter; "
                    "lora-fused keeps the base model's biases frozen and does not load them)")
        raise ValueError(f"{weights_path}: unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}{hint}; expected only "
                         "'<module>.lora_A.weight' / '<module>.lora_B.weight' (embeddings: "
                         "'<module>.lora_embedding_A' / '<module>.lora_embedding_B')")
    if len(adapters) > 1:
        raise ValueError(f"{weights_path}: keys name several adapters "
                         f"{sorted(a or '<none>' for a in adapters)}; save one adapter per directory")

    tensors, names = {}, {}
    for module, slot in parts.items():
        embedding = "lora_embedding_" in next((k for k, _ in slot.values() if "lora_" in k), "")
        if _BASE_LAYER in slot and not embedding:
            raise ValueError(f"{weights_path}: unexpected key {slot[_BASE_LAYER][0]!r}: a base-layer weight is "
                             "only read beside an embedding's lora_embedding_A / lora_embedding_B")
        if embedding and config["use_dora"]:
            raise ValueError(f"{weights_path}: module {module!r} has embedding LoRA but use_dora is true: "
                             "lora-fused's DoRA adapts nn.Linear only")
        _check_magnitude_key(weights_path, config, module, slot)
        for ab in "AB":
            if ab not in slot:
                present = next(iter(slot.values()))[0]
                raise ValueError(f"{weights_path}: missing key for lora_{ab} of module {module!r} "
                                 f"(found {present!r} but not its lora_{ab} partner)")
        (key_a, A), (key_b, B) = slot["A"], slot["B"]
        if not (A.is_floating_point() and B.is_floating_point()):
            raise ValueError(f"{weights_path}: {key_a!r} / {key_b!r} must be floating point, got "
                             f"{A.dtype} / {B.dtype}")
        r, _, _ = module_lora_settings(config, module)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"{weights_path}: {key_a!r} must be [r, in] and {key_b!r} [out, r] with the "
                             f"same r; got shapes {_shapes(A, B)}")
        if A.shape[0] != r and not may_be_expert_entry(config, module):  # experts: [E·r, in], checked on loading
            raise ValueError(f"{weights_path}: {key_a!r} / {key_b!r} have rank {A.shape[0]} (shapes "
                             f"{_shapes(A, B)}) but {CONFIG_NAME} gives module {module!r} r={r} "
                             "(r / rank_pattern)")
        tensors[module], names[module] = (A, B), (key_a, key_b)
        if embedding:
            tensors[module] = EmbeddingLoRATensors((A, B))
            tensors[module].base_weight = slot[_BASE_LAYER][1] if _BASE_LAYER in slot else None
        if config["use_dora"]:
            key_m, magnitude = slot[_MAGNITUDE]
            if magnitude.dim() != 1 or magnitude.shape[0] != B.shape[0] or not magnitude.is_floating_point():
                raise ValueError(f"{weights_path}: {key_m!r} must be a floating [out={B.shape[0]}] vector "
                                 f"(lora_B {tuple(B.shape)}), got {magnitude.dtype} {tuple(magnitude.shape)}")
            tensors[module] = (A, B, magnitude)
    return config, tensors, names


def _check_magnitude_key(weights_path: str, config: Mapping, module: str, slot: Mapping) -> None:
    """A DoRA file (use_dora) holds a magnitude for every module; a plain LoRA file none."""
    if config["use_dora"] and _MAGNITUDE not in slot:
        raise ValueError(f"{weights_path}: use_dora is true in {CONFIG_NAME} but module {module!r} has no "
                         f"'{KEY_PREFIX}{module}.lora_magnitude_vector' (DoRA's magnitude)")
    if not config["use_dora"] and _MAGNITUDE in slot:
        raise ValueError(f"{weights_path}: unexpected key {slot[_MAGNITUDE][0]!r}: a DoRA magnitude, but "
                         f"{CONFIG_NAME} has use_dora false")


def read_peft_adapter(directory) -> tuple[dict, dict[str, tuple[Tensor, Tensor]]]:
    """Check and read a PEFT LoRA adapter directory, without touching any model.

    Returns ``(config, tensors)``: ``config`` is ``adapter_config.json`` as a dict, checked by
    ``check_peft_config`` (unsupported features refused) with PEFT's defaults filled in;
    ``tensors`` maps each module name (as in the base model, prefix and adapter-name infix
    removed) to ``(lora_A [r, in], lora_B [out, r])`` CPU tensors in the file's dtype; for a
    DoRA adapter (``config["use_dora"]``) ``(lora_A, lora_B, lora_magnitude_vector [out])``.
    Every module's rank is checked against the config's ``r`` / ``rank_pattern``; use
    ``module_lora_settings(config, name)`` for its ``(r, lora_alpha, use_rslora)``.
    Missing files raise ``FileNotFoundError``; a bad config or file ``ValueError``.
    """
    config, tensors, _ = read_peft_adapter_with_keys(directory)
    return config, tensors


def check_peft_targets(model: nn.Module, config: Mapping, tensors: Mapping, keys: Mapping, directory,
                       skip: Container[str] = ()) -> list[str]:
    """The modules of ``model`` the config targets, once the file is known to hold weights for
    exactly those (ValueError naming the missing or unexpected keys otherwise). Shared by
    ``load_peft_adapter`` and ``load_peft_adapter_slot``; modules in ``skip`` (packed layers
    loaded from other modules' weights) are not targets."""
    source = os.path.join(os.fspath(directory), SAFETENSORS_NAME)
    targets = [n for n in peft_target_names(model, config) if n not in skip]
    missing = [n for n in targets if n not in tensors]
    if missing:
        found = sorted(tensors)[:3]
        raise ValueError(f"{source}: missing keys for target modules of {CONFIG_NAME}: "
                         f"{[lora_key(n, 'A') for n in missing[:8]]}{' ...' if len(missing) > 8 else ''} "
                         f"(the file's modules are e.g. {found}: was the adapter saved from a "
                         f"differently nested model, e.g. a *ForCausalLM rather than its base model?)")
    target_set = set(targets)
    extra = [n for n in tensors if n not in target_set]
    if extra:
        modules = dict(model.named_modules())
        why = [f"{keys[n][0]!r} (" + ("not a module of the model" if n not in modules
                                      else f"not a target of {CONFIG_NAME}") + ")" for n in extra[:8]]
        raise ValueError(f"{source}: unexpected keys: {', '.join(why)}")
    return targets


def load_peft_adapter(model: nn.Module, directory) -> nn.Module:
    """Inject ``LoRALinear`` as a PEFT adapter directory says and load its weights; returns ``model``.

    ``model`` is the base model the adapter was trained on (e.g. a ``LlamaForCausalLM``), with
    ``nn.Linear`` at the targets, or ``LoRALinear`` already there (then each one's ``r`` must
    match; its alpha, rslora and dropout are set from the config). Per-module rank and alpha
    follow ``r`` / ``rank_pattern`` and ``lora_alpha`` / ``alpha_pattern``. Everything is
    checked before the model is changed. As with ``inject_lora``, every parameter that is not
    a LoRA parameter is frozen. LoRA weights are copied into the layers' device and dtype.
    """
    config, tensors, keys = read_peft_adapter_with_keys(directory)
    source = os.path.join(os.fspath(directory), SAFETENSORS_NAME)
    expert_steps = plan_expert_loading(model, config, tensors, keys, source)  # takes the experts' tensors out
    targets = check_peft_targets(model, config, tensors, keys, directory)
    modules = dict(model.named_modules())

    plan, embedding_plan = [], []
    for name in targets:
        module = modules[name]
        if isinstance(tensors[name], EmbeddingLoRATensors) or isinstance(module, (nn.Embedding, LoRAEmbedding)):
            embedding_plan.append(_embedding_load_step(name, module, tensors[name], keys[name], config, source))
            continue
        if not isinstance(module, LoRALinear) and not is_lora_base(module):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; lora-fused adapts "
                            "nn.Linear only")
        A, B = tensors[name][:2]
        key_a, key_b = keys[name]
        if config["use_dora"] and not isinstance(module, DoRALinear) and (
                isinstance(module, LoRALinear) or type(module) is not nn.Linear):
            raise TypeError(f"module {name!r} is a {type(module).__name__}: a DoRA adapter (use_dora) loads "
                            "into an nn.Linear or a DoRALinear only")
        if not config["use_dora"] and isinstance(module, DoRALinear):
            raise TypeError(f"module {name!r} is a DoRALinear but the adapter is plain LoRA (use_dora false)")
        if A.shape[1] != module.in_features or B.shape[0] != module.out_features:
            raise ValueError(f"{source}: {key_a!r} / {key_b!r} have shapes {_shapes(A, B)} but module "
                             f"{name!r} is {module.in_features} -> {module.out_features}: expected "
                             f"({A.shape[0]}, {module.in_features}), ({module.out_features}, {A.shape[0]})")
        r, alpha, use_rslora = module_lora_settings(config, name)
        if isinstance(module, LoRALinear):
            if module.r != r:
                raise ValueError(f"module {name!r} is already a LoRALinear with r={module.r}, but the "
                                 f"adapter's {key_a!r} has r={r} (shapes {_shapes(A, B)})")
            if module.merged:
                raise ValueError(f"module {name!r} is a merged LoRALinear; unmerge it before loading "
                                 "new adapter weights into it")
        plan.append((name, module, A, B, r, alpha, use_rslora))

    dropout = check_dropout_p(config["lora_dropout"])
    apply_expert_loading(model, expert_steps, dropout=dropout, use_rslora=config["use_rslora"])
    for name, module, A, B, r, alpha, use_rslora in plan:
        if isinstance(module, LoRALinear):
            layer = module
            layer.lora_alpha, layer.use_rslora, layer.lora_dropout = alpha, use_rslora, dropout
            layer.scaling = lora_scaling(r, alpha, use_rslora)
        else:
            cls = DoRALinear if config["use_dora"] else lora_class(module)
            layer = cls.from_linear(module, r=check_rank(r), lora_alpha=alpha,
                                    lora_dropout=dropout, use_rslora=use_rslora)
            model.set_submodule(name, layer)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            if config["use_dora"]:
                layer.lora_magnitude_vector.copy_(tensors[name][2])
    for name, module, (A, B), base_weight, r, alpha, use_rslora in embedding_plan:
        with torch.no_grad():
            if base_weight is not None:  # PEFT loads the saved base embedding too
                module.weight.copy_(base_weight)
        if isinstance(module, LoRAEmbedding):
            layer = module
            layer.lora_alpha, layer.use_rslora, layer.scaling = alpha, use_rslora, lora_scaling(r, alpha, use_rslora)
        else:
            layer = LoRAEmbedding.from_embedding(module, r=check_rank(r), lora_alpha=alpha, use_rslora=use_rslora)
            model.set_submodule(name, layer)
        with torch.no_grad():
            layer.lora_embedding_A.copy_(A)
            layer.lora_embedding_B.copy_(B)
    mark_only_lora_as_trainable(model)
    if str(config.get("init_lora_weights")).lower() == "mica":
        for name, *_ in plan:  # MiCA trains A only (PEFT freezes B); the forward math is plain LoRA
            model.get_submodule(name).lora_B.requires_grad_(False)
    return model


def _embedding_load_step(name: str, module: nn.Module, pair, keys, config: Mapping, source: str):
    """Checks for loading embedding LoRA into module ``name``; what load_peft_adapter applies after."""
    if not isinstance(pair, EmbeddingLoRATensors):
        raise TypeError(f"module {name!r} is a {type(module).__name__} but the file holds linear LoRA keys for it "
                        f"({keys[0]!r}); an embedding's keys are '<module>.lora_embedding_A' / '..._B'")
    if not isinstance(module, LoRAEmbedding) and type(module) is not nn.Embedding:
        raise TypeError(f"module {name!r} is a {type(module).__name__} but the file holds embedding LoRA for it "
                        f"({keys[0]!r}): it loads into an nn.Embedding")
    A, B = pair
    r, alpha, use_rslora = module_lora_settings(config, name)
    if A.shape[1] != module.num_embeddings or B.shape[0] != module.embedding_dim:
        raise ValueError(f"{source}: {keys[0]!r} / {keys[1]!r} have shapes {_shapes(A, B)} but module {name!r} "
                         f"is an embedding of {module.num_embeddings} x {module.embedding_dim}: expected "
                         f"({A.shape[0]}, {module.num_embeddings}), ({module.embedding_dim}, {A.shape[0]})")
    if pair.base_weight is not None and tuple(pair.base_weight.shape) != tuple(module.weight.shape):
        raise ValueError(f"{source}: '{name}.base_layer.weight' has shape {tuple(pair.base_weight.shape)} but "
                         f"module {name!r} has weight {tuple(module.weight.shape)} (was the vocabulary resized?)")
    if isinstance(module, LoRAEmbedding):
        if module.r != r:
            raise ValueError(f"module {name!r} is already a LoRAEmbedding with r={module.r}, but the adapter has "
                             f"r={r} (shapes {_shapes(A, B)})")
        if module.merged:
            raise ValueError(f"module {name!r} is a merged LoRAEmbedding; unmerge it before loading new weights")
    return name, module, (A, B), pair.base_weight, r, alpha, use_rslora
