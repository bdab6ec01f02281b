"""PEFT's on-disk LoRA adapter format, both ways, and live PEFT models to ``LoRALinear``.

A PEFT LoRA adapter directory holds ``adapter_config.json`` (a serialised
``peft.LoraConfig``) and ``adapter_model.safetensors`` with, for each adapted
module ``<m>`` (named as in the base model, e.g. ``model.layers.0.self_attn.q_proj``),
``base_model.model.<m>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r].

- ``read_peft_adapter(directory)`` checks and reads one: ``(config, {module: (A, B)})``.
  It never touches a model; the multi-adapter loader reuses it.
- ``load_peft_adapter(model, directory)`` injects ``LoRALinear`` where the config
  says (or reuses ones already there) and loads the weights.
- ``save_peft_adapter(model, directory)`` writes a directory that
  ``peft.PeftModel.from_pretrained(base_model, directory)`` loads.
- ``from_peft_model(peft_model)`` swaps a live PEFT model's LoRA linears for ``LoRALinear``.

Only safetensors is read: a pickled ``adapter_model.bin`` is refused, never unpickled.
``peft`` is imported only inside ``from_peft_model``; ``transformers`` never (``import lora_fused`` stays light).

Config fields (PEFT 0.21 ``LoraConfig``) and what happens to each:

- used: ``r``, ``lora_alpha``, ``use_rslora``, ``use_dora`` (DoRALinear layers; the file's
  ``<m>.lora_magnitude_vector`` [out] is the magnitude), ``rank_pattern``, ``alpha_pattern``
  (PEFT's rule: key ``k`` matches module ``n`` when ``re.match(rf"(.*\\.)?({k})$", n)``,
  first key in order wins), ``target_modules`` (list: full name or ``.name`` suffix;
  str: regex fullmatch; ``"all-linear"``), ``exclude_modules`` (same rules),
  ``lora_dropout``.
- refused (they change the forward or backward math, or the set of parameters):
  see ``REFUSED_FIELDS``; also ``peft_type`` other than ``"LORA"``,
  ``init_lora_weights`` in pissa*/olora/corda/lora_ga/loftq (the adapter is only valid
  on a base model whose weights were modified at init), and ``bias`` other than
  ``"none"`` when the file holds bias tensors.
- ignored (metadata, or used only when initialising a fresh adapter): see ``IGNORED_FIELDS``.
  ``init_lora_weights="mica"`` is loaded as plain LoRA (same math) with ``lora_B`` frozen, as
  PEFT trains it. Unknown fields that are set produce a warning.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from typing import Any, Container, Mapping, Optional

import torch
from torch import Tensor, nn

from .injection import (check_pattern, lora_layers, mark_only_lora_as_trainable,
                        matches_target, pattern_value, select_modules)
from ..modules.lora_linear import LoRALinear, lora_scaling
from ..modules.dora import DoRALinear
from ..modules.embedding import LoRAEmbedding
from ..modules.qlora import is_lora_base, is_peft_linear4bit, lora_class
from ..validation import check_dropout_p, check_positive_int, check_rank

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
#: Key prefix PEFT's ``save_pretrained`` writes (PeftModel.base_model → LoraModel.model).
KEY_PREFIX = "base_model.model."

#: Config fields lora-fused cannot honour; an adapter that sets one is refused.
REFUSED_FIELDS = {
    "lora_bias": "a trainable bias on lora_B is not part of LoRALinear's math",
    "modules_to_save": "it stores full trained copies of extra modules (e.g. a classifier head) "
                       "that would have to replace the base model's",
    "fan_in_fan_out": "it marks Conv1D-style (in, out) weights (GPT-2); lora-fused adapts nn.Linear only",
    "layers_to_transform": "per-layer-index targeting is not implemented; list the modules in target_modules",
    "layers_pattern": "it only works with layers_to_transform, which is not implemented",
    "target_parameters": "LoRA on bare nn.Parameters (e.g. MoE experts) is not supported",
    "megatron_config": "Megatron tensor-parallel layers are not supported",
    "use_qalora": "QALoRA pools the input in groups before lora_A",
    "layer_replication": "it rebuilds the model's layer stack",
    "trainable_token_indices": "it trains embedding rows (TrainableTokens) saved beside the LoRA weights",
    "velora_config": "VeLoRA replaces lora_A's backward with a compressed approximation",
    "alora_invocation_tokens": "activated LoRA applies the adapter only from the invocation tokens on",
    "monteclora_config": "MonteCLoRA samples the adapter stochastically",
    "use_bdlora": "block-diagonal LoRA factors are not supported",
    "arrow_config": "Arrow routes tokens between several adapters",
    "kasa_config": "KaSA truncates the base weight's SVD and puts a learned diagonal between A and B",
}

#: Config fields read but without effect here, and why.
IGNORED_FIELDS = {
    "task_type": "metadata (which PeftModel subclass PEFT builds); the math is the same",
    "auto_mapping": "metadata",
    "base_model_name_or_path": "metadata: the caller chooses the base model",
    "revision": "metadata",
    "inference_mode": "PEFT's trainability switch; LoRA parameters are trainable here, as after inject_lora",
    "peft_version": "metadata",
    "runtime_config": "runtime-only, not part of the adapter",
    "megatron_core": "only used with megatron_config (refused when set)",
    "qalora_group_size": "only used with use_qalora (refused when set)",
    "loftq_config": "init-time only (init_lora_weights='loftq' itself is refused)",
    "eva_config": "init-time only: EVA initialises A from activations; the trained weights are plain LoRA",
    "corda_config": "init-time only (init_lora_weights='corda' itself is refused)",
    "lora_ga_config": "init-time only (init_lora_weights='lora_ga' itself is refused)",
    "ensure_weight_tying": "only ties adapters on tied embeddings / modules_to_save, which are not supported",
}

_USED_FIELDS = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern",
                "alpha_pattern", "target_modules", "exclude_modules", "bias", "init_lora_weights", "use_dora"}
#: init_lora_weights values after which the base weights no longer match the original model.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
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


def _is_set(value) -> bool:
    """Whether a config value turns its feature on (0 is a valid layer index, so it counts)."""
    if value is None or value is False:
        return False
    if isinstance(value, (list, tuple, dict, set, str)) and len(value) == 0:
        return False
    return True


def check_peft_config(config: Any, *, source: str = CONFIG_NAME) -> dict:
    """Validate a PEFT LoRA config (a dict as in ``adapter_config.json``); returns it with defaults.

    Raises ``ValueError`` naming the field for every feature lora-fused cannot honour.
    The returned dict has ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
    ``rank_pattern``, ``alpha_pattern``, ``target_modules`` and ``exclude_modules`` filled in
    (PEFT's defaults where absent).
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    config = dict(config)
    peft_type = config.get("peft_type")
    peft_type = getattr(peft_type, "value", peft_type)  # a live config holds a PeftType enum
    if peft_type is None:
        raise ValueError(f"{source}: no 'peft_type' field; this is not a PEFT adapter config")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"{source}: peft_type={peft_type!r}; lora-fused reads LoRA adapters only "
                         "(peft_type 'LORA')")
    for field, reason in REFUSED_FIELDS.items():
        if _is_set(config.get(field)):
            raise ValueError(f"{source}: {field}={config[field]!r} is not supported by lora-fused: {reason}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise ValueError(
            f"{source}: init_lora_weights={init!r} changes the base model's weights at init, so this "
            "adapter only reproduces on that modified base; convert it to a plain LoRA adapter first "
            "(PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    bias = config.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"{source}: bias={bias!r}; PEFT allows 'none', 'all' or 'lora_only'")
    unknown = sorted(k for k, v in config.items()
                     if k not in _USED_FIELDS and k not in REFUSED_FIELDS and k not in IGNORED_FIELDS
                     and _is_set(v))
    if unknown:
        warnings.warn(f"{source}: fields unknown to lora-fused are ignored: "
                      f"{ {k: config[k] for k in unknown} }", stacklevel=3)

    config.setdefault("r", 8)
    config.setdefault("lora_alpha", 8)
    config.setdefault("lora_dropout", 0.0)
    config.setdefault("use_rslora", False)
    config["use_dora"] = bool(config.get("use_dora") or False)
    # A bad value inside a file is a ValueError (the file's content is wrong), whatever the
    # check behind it raises for a bad argument.
    for field in ("rank_pattern", "alpha_pattern"):
        try:
            config[field] = check_pattern(config.get(field), field)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
    ranks = [("r", config["r"])] + [(f"rank_pattern[{k!r}]", v) for k, v in config["rank_pattern"].items()]
    for field, value in ranks:
        try:
            check_positive_int(value, field)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
    alphas = [("lora_alpha", config["lora_alpha"])] + [(f"alpha_pattern[{k!r}]", v)
                                                        for k, v in config["alpha_pattern"].items()]
    for field, value in alphas:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{source}: {field}={value!r} must be a finite number")
    try:
        check_dropout_p(config["lora_dropout"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: lora_dropout={config['lora_dropout']!r}: {e}") from None
    if not isinstance(config["use_rslora"], bool):
        raise ValueError(f"{source}: use_rslora={config['use_rslora']!r} must be true or false")
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if isinstance(value, (set, tuple)):
            value = sorted(value)
        if field == "target_modules" and value is None:
            raise ValueError(f"{source}: target_modules is missing (PEFT fills it in from the model "
                             "architecture before saving; write the module names in)")
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{source}: {field}={value!r} must be a string or a list of strings")
        for pattern in [value] if isinstance(value, str) else ():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{source}: {field}={pattern!r} is not a valid regex: {e}") from None
        config[field] = value
    return config


def module_lora_settings(config: Mapping, name: str) -> tuple[int, float, bool]:
    """``(r, lora_alpha, use_rslora)`` a checked config gives module ``name`` (PEFT's pattern rule)."""
    return (pattern_value(name, config["rank_pattern"], config["r"]),
            float(pattern_value(name, config["alpha_pattern"], config["lora_alpha"])),
            config["use_rslora"])


def _key(module: str, ab: str) -> str:
    return f"{KEY_PREFIX}{module}.lora_{ab}.weight"


def _shapes(*tensors: Tensor) -> str:
    return ", ".join(str(tuple(t.shape)) for t in tensors)


def _directory_argument(directory) -> str:
    """``directory`` as a str path; TypeError if it is no path, ValueError if it names a file."""
    try:
        directory = os.fspath(directory)
    except TypeError:
        raise TypeError(f"directory must be a str or os.PathLike path, got {type(directory).__name__}") from None
    if os.path.exists(directory) and not os.path.isdir(directory):
        name = os.path.basename(directory)
        hint = (f" (pass its folder, {os.path.dirname(directory) or '.'!r})"
                if name in (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME) else "")
        raise ValueError(f"directory={directory!r} is a file, not a directory: a PEFT adapter is a "
                         f"directory holding {CONFIG_NAME} and {SAFETENSORS_NAME}{hint}")
    return directory


def _read(directory) -> tuple[dict, dict[str, tuple[Tensor, Tensor]], dict[str, tuple[str, str]]]:
    """read_peft_adapter plus the file's key names for each module (for error messages)."""
    directory = _directory_argument(directory)
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
        if A.shape[0] != r:
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
    config, tensors, _ = _read(directory)
    return config, tensors


def peft_target_names(model: nn.Module, config: Mapping) -> list[str]:
    """The modules of ``model`` that a checked config's target_modules / exclude_modules select."""
    names = select_modules(model, config["target_modules"])
    exclude = config.get("exclude_modules")
    if exclude:
        names = [n for n in names if not matches_target(n, exclude)]
    return names


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
                         f"{[_key(n, 'A') for n in missing[:8]]}{' ...' if len(missing) > 8 else ''} "
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
    config, tensors, keys = _read(directory)
    source = os.path.join(os.fspath(directory), SAFETENSORS_NAME)
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


def _target_modules_for(model: nn.Module, injected: list[str]) -> list[str]:
    """Module-name suffixes (or full names) that select exactly ``injected`` under PEFT's list rule."""
    names = [n for n, _ in model.named_modules() if n]
    injected_set = set(injected)

    def selected(keys) -> set[str]:
        return {n for n in names if matches_target(n, keys)}

    keys = set()
    for name in injected:
        leaf = name.rsplit(".", 1)[-1]
        keys.add(leaf if selected([leaf]) <= injected_set else name)
    if selected(keys) != injected_set:
        raise ValueError("cannot write target_modules that select exactly the LoRA modules of this "
                         f"model (the names {sorted(selected(keys) - injected_set)[:4]} would be "
                         "selected too)")
    return sorted(keys)


def _json_number(value: float):
    return int(value) if float(value).is_integer() else float(value)


def save_peft_adapter(model: nn.Module, directory) -> None:
    """Write ``model``'s LoRA layers as a PEFT LoRA adapter directory.

    ``adapter_config.json`` gets ``r`` / ``lora_alpha`` as the most common values, with
    ``rank_pattern`` / ``alpha_pattern`` (keys ``^<escaped full name>``) for the modules that
    differ, and ``target_modules`` as suffixes (or full names) selecting exactly the adapted
    modules. ``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight`` /
    ``.lora_B.weight`` in the layers' dtype. ``peft.PeftModel.from_pretrained(base, directory)``
    loads it. Merged layers are refused (``unmerge_lora(model)`` first).
    """
    layers = lora_layers(model)
    embeddings = {n: m for n, m in model.named_modules() if isinstance(m, LoRAEmbedding)}
    if not layers and not embeddings:
        raise ValueError(f"{type(model).__name__} has no LoRALinear (or LoRAEmbedding) layers to save")
    merged_embeddings = [n for n, m in embeddings.items() if m.merged]
    if merged_embeddings:
        raise ValueError(f"LoRA embeddings {merged_embeddings[:4]} are merged; unmerge() them before "
                         "save_peft_adapter (a merged adapter would be applied twice on load)")
    if "" in layers:
        raise ValueError("the model itself is a LoRALinear; PEFT names adapted modules inside a "
                         "model, so wrap it in a module (e.g. nn.Sequential(layer)) to save it")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"LoRA layers {merged[:4]} are merged into their base weights; call "
                         "lf.unmerge_lora(model) before save_peft_adapter (a merged adapter would "
                         "be applied twice on load)")
    for field in ("use_rslora", "lora_dropout"):
        values = {getattr(layer, field) for layer in layers.values()}
        if len(values) > 1:
            raise ValueError(f"PEFT's adapter_config.json has one {field} for all modules, but this "
                             f"model's LoRA layers use {sorted(values)}")
    dora = {isinstance(layer, DoRALinear) for layer in layers.values()}
    if len(dora) > 1:
        raise ValueError("PEFT's adapter_config.json has one use_dora for all modules, but this model mixes "
                         "DoRALinear and LoRALinear layers")
    rslora = {layer.use_rslora for layer in [*layers.values(), *embeddings.values()]}
    if len(rslora) > 1:
        raise ValueError("PEFT's adapter_config.json has one use_rslora for all modules, but this model's "
                         f"LoRA layers and embeddings use {sorted(rslora)}")
    first = next(iter(layers.values())) if layers else next(iter(embeddings.values()))
    entries = {name: (layer.lora_A, layer.lora_B, layer.lora_alpha) for name, layer in layers.items()}
    entries.update({name: (layer.lora_embedding_A, layer.lora_embedding_B, layer.lora_alpha)
                    for name, layer in embeddings.items()})
    magnitudes = ({name: layer.lora_magnitude_vector for name, layer in layers.items()}
                  if dora == {True} else None)
    write_peft_adapter(model, directory, entries, use_rslora=first.use_rslora,
                       lora_dropout=first.lora_dropout if layers else 0.0, magnitudes=magnitudes,
                       embedding_modules=set(embeddings))


def write_peft_adapter(model: nn.Module, directory, entries: Mapping[str, tuple[Tensor, Tensor, float]], *,
                       use_rslora: bool, lora_dropout: float,
                       magnitudes: Optional[Mapping[str, Tensor]] = None, embedding_modules=(),
                       target_modules: Optional[list[str]] = None) -> None:
    """Write ``{module name: (lora_A [r, in], lora_B [out, r], lora_alpha)}`` of ``model`` as a PEFT
    LoRA adapter directory (the writer behind ``save_peft_adapter`` and the multi-adapter
    ``save_peft_adapter_slot``): ``r`` / ``lora_alpha`` the most common values, ``rank_pattern`` /
    ``alpha_pattern`` (keys ``^<escaped full name>``) for the modules that differ. ``magnitudes``
    ``{module name: [out]}``: a DoRA adapter (``use_dora``, keys ``<m>.lora_magnitude_vector`` as PEFT).
    ``target_modules``: written as given (entries that are not modules of ``model``: packed slices)."""
    ranks = {name: A.shape[0] for name, (A, _, _) in entries.items()}
    alphas = {name: alpha for name, (_, _, alpha) in entries.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    rank_pattern = {"^" + re.escape(n): v for n, v in ranks.items() if v != r}
    alpha_pattern = {"^" + re.escape(n): _json_number(v) for n, v in alphas.items() if v != alpha}
    model_config = getattr(model, "config", None)
    name_or_path = (getattr(model_config, "_name_or_path", None) or getattr(model_config, "name_or_path", None)
                    or getattr(model, "name_or_path", None) or None)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name_or_path if isinstance(name_or_path, str) else None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _json_number(alpha),
        "lora_dropout": lora_dropout,
        "use_rslora": use_rslora,
        "target_modules": _target_modules_for(model, list(entries)) if target_modules is None else target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": magnitudes is not None,
    }
    from safetensors.torch import save_file
    tensors = {}
    for name, (A, B, _) in entries.items():
        for ab, t in (("A", A), ("B", B)):
            key = f"{KEY_PREFIX}{name}.lora_embedding_{ab}" if name in embedding_modules else _key(name, ab)
            tensors[key] = t.detach().to("cpu").contiguous().clone()
    for name, magnitude in (magnitudes or {}).items():
        tensors[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = magnitude.detach().to("cpu").contiguous().clone()
    def write_config(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    directory = _directory_argument(directory)
    _replace_files(directory, {
        SAFETENSORS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
        CONFIG_NAME: write_config,
    })
    stale = os.path.join(directory, PICKLE_NAME)
    if os.path.isfile(stale):
        # It held an older adapter: next to the new files it would be a second, different
        # adapter (tools that read .bin first, or by glob, would load it).
        os.remove(stale)
        warnings.warn(f"save_peft_adapter: removed the stale {stale} (an older adapter) beside "
                      f"the new {SAFETENSORS_NAME}", stacklevel=3)


def _replace_files(directory: str, writers: Mapping[str, Any]) -> None:
    """Write each ``{name: write(path)}`` of ``directory`` all-or-nothing.

    Every file is first written under a temporary name beside its final one; only when all
    writes succeeded are they renamed into place (``os.replace``: atomic per file on POSIX
    and Windows). A failure while writing leaves the directory as it was (temporary files
    removed; a directory this call created is removed again). Between the renames a crash
    could still mix files, a window of microseconds rather than the length of a write.
    """
    created = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    temporary = {name: os.path.join(directory, f".{name}.{os.getpid()}.tmp") for name in writers}
    try:
        for name, write in writers.items():
            write(temporary[name])
    except BaseException:
        for path in temporary.values():
            if os.path.exists(path):
                os.remove(path)
        if created and not os.listdir(directory):
            os.rmdir(directory)
        raise
    for name, path in temporary.items():
        os.replace(path, os.path.join(directory, name))


def from_peft_model(peft_model: nn.Module) -> nn.Module:
    """Swap a live PEFT LoRA model's ``lora.Linear`` layers for ``LoRALinear``; returns the base model.

    Takes a ``peft.PeftModel`` (or its ``LoraModel``) with one active adapter. Each adapted
    ``nn.Linear`` keeps its weight and bias objects (reused) and the adapter's lora_A / lora_B
    are copied (device and dtype kept). Returns ``peft_model.base_model.model``, changed in place:
    the PEFT wrapper must not be used afterwards; DoRA modules become ``DoRALinear`` (magnitude
    copied). Merged or disabled adapters and the config features of ``REFUSED_FIELDS`` are
    refused; nothing is changed then.
    """
    import peft
    from peft.tuners.lora import LoraLayer, LoraModel
    from peft.tuners.lora import Embedding as PeftLoraEmbedding
    from peft.tuners.lora import Linear as PeftLoraLinear

    tuner = peft_model.base_model if isinstance(peft_model, peft.PeftModel) else peft_model
    if not isinstance(tuner, LoraModel):
        raise TypeError(f"from_peft_model expects a peft.PeftModel with LoRA adapters (or a LoraModel), "
                        f"got {type(peft_model).__name__} wrapping {type(tuner).__name__}")
    active = tuner.active_adapters
    active = [active] if isinstance(active, str) else list(active)
    if len(active) != 1:
        raise ValueError(f"from_peft_model converts one adapter; active adapters are {active} "
                         "(set_adapter(name) to pick one)")
    adapter = active[0]
    config = check_peft_config(tuner.peft_config[adapter].to_dict(), source=f"adapter {adapter!r} config")
    base = tuner.model

    plan = []
    inside_lora = set()
    for name, module in base.named_modules():
        if any(name.startswith(p + ".") for p in inside_lora):
            continue
        if isinstance(module, LoraLayer):
            inside_lora.add(name)
            if type(module) is PeftLoraEmbedding:
                plan.append(_peft_embedding_step(name, module, adapter, config))
                continue
            if type(module) is not PeftLoraLinear and not is_peft_linear4bit(module):
                raise TypeError(f"module {name!r} is a PEFT {type(module).__name__}; lora-fused converts "
                                "lora.Linear over nn.Linear only")
            base_layer = module.get_base_layer()
            if not is_lora_base(base_layer):
                raise TypeError(f"module {name!r} wraps a {type(base_layer).__name__}; lora-fused "
                                "adapts nn.Linear only")
            _check_peft_layer_active(name, module)
            if adapter not in module.lora_A:
                plan.append((name, base_layer, None))  # not adapted by the active adapter
                continue
            dora = bool(module.use_dora.get(adapter, False))
            if dora and type(base_layer) is not nn.Linear:
                raise TypeError(f"module {name!r} uses DoRA over a {type(base_layer).__name__}; lora-fused's "
                                "DoRA adapts nn.Linear only")
            if module.lora_bias.get(adapter, False):
                raise ValueError(f"module {name!r} has lora_bias: {REFUSED_FIELDS['lora_bias']}")
            variant = getattr(module, "lora_variant", {}).get(adapter)
            if variant is not None and type(variant).__name__ not in ("MiCALinearVariant", "DoraLinearVariant"):
                raise ValueError(f"module {name!r} uses the LoRA variant {type(variant).__name__}, "
                                 "which lora-fused does not implement")
            if getattr(module, "fan_in_fan_out", False):
                raise ValueError(f"module {name!r}: {REFUSED_FIELDS['fan_in_fan_out']}")
            r, alpha = module.r[adapter], module.lora_alpha[adapter]
            use_rslora = getattr(module, "use_rslora", {}).get(adapter, config["use_rslora"])
            scaling = lora_scaling(r, alpha, use_rslora)
            if not math.isclose(scaling, module.scaling[adapter], rel_tol=1e-6):
                raise ValueError(f"module {name!r}: scaling {module.scaling[adapter]} is not "
                                 f"lora_alpha/{'sqrt(r)' if use_rslora else 'r'} = {scaling} "
                                 "(set_scale / scale_layer was used); LoRALinear derives it from alpha")
            drop = module.lora_dropout[adapter]
            p = drop.p if isinstance(drop, nn.Dropout) else 0.0
            A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            magnitude = module.lora_magnitude_vector[adapter].weight if dora else None
            plan.append((name, base_layer, (r, alpha, use_rslora, check_dropout_p(float(p)), A, B, magnitude)))
        elif type(module).__module__.startswith("peft."):
            raise TypeError(f"module {name!r} is a PEFT {type(module).__name__}, which lora-fused "
                            "cannot convert")

    for name, base_layer, lora in plan:
        if lora is None:
            base.set_submodule(name, base_layer)
            continue
        if isinstance(base_layer, nn.Embedding):
            r, alpha, use_rslora, A, B = lora
            layer = LoRAEmbedding.from_embedding(base_layer, r=r, lora_alpha=alpha, use_rslora=use_rslora)
            layer.lora_embedding_A = nn.Parameter(A.detach().clone())
            layer.lora_embedding_B = nn.Parameter(B.detach().clone())
            base.set_submodule(name, layer)
            continue
        r, alpha, use_rslora, p, A, B, magnitude = lora
        cls = DoRALinear if magnitude is not None else lora_class(base_layer)
        layer = cls.from_linear(base_layer, r=r, lora_alpha=alpha, lora_dropout=p, use_rslora=use_rslora)
        layer.lora_A = nn.Parameter(A.detach().clone())
        layer.lora_B = nn.Parameter(B.detach().clone())
        if magnitude is not None:
            layer.lora_magnitude_vector = nn.Parameter(magnitude.detach().clone())
        base.set_submodule(name, layer)
    mark_only_lora_as_trainable(base)
    if str(config.get("init_lora_weights")).lower() == "mica":
        for name, _, lora in plan:
            if lora is not None:
                base.get_submodule(name).lora_B.requires_grad_(False)
    return base


def _check_peft_layer_active(name: str, module) -> None:
    """A live PEFT layer converts only unmerged and enabled (its weights then are W0 and A, B)."""
    if module.merged:
        raise ValueError(f"module {name!r} has merged adapters {module.merged_adapters}; call "
                         "unmerge_adapter() first")
    if module.disable_adapters:
        raise ValueError(f"module {name!r} has its adapters disabled; enable them first")


def _peft_embedding_step(name: str, module, adapter: str, config: Mapping):
    """(name, base nn.Embedding, (r, alpha, use_rslora, A, B) | None) for a PEFT lora.Embedding."""
    base_layer = module.get_base_layer()
    if type(base_layer) is not nn.Embedding:
        raise TypeError(f"module {name!r} wraps a {type(base_layer).__name__}; LoRAEmbedding adapts nn.Embedding")
    _check_peft_layer_active(name, module)
    if adapter not in module.lora_embedding_A:
        return name, base_layer, None
    if module.use_dora.get(adapter, False):
        raise TypeError(f"module {name!r} uses DoRA on an embedding; lora-fused's DoRA adapts nn.Linear only")
    r, alpha = module.r[adapter], module.lora_alpha[adapter]
    use_rslora = getattr(module, "use_rslora", {}).get(adapter, config["use_rslora"])
    if not math.isclose(lora_scaling(r, alpha, use_rslora), module.scaling[adapter], rel_tol=1e-6):
        raise ValueError(f"module {name!r}: scaling {module.scaling[adapter]} is not derived from lora_alpha "
                         "(set_scale / scale_layer was used); LoRAEmbedding derives it from alpha")
    return name, base_layer, (r, alpha, use_rslora, module.lora_embedding_A[adapter],
                              module.lora_embedding_B[adapter])
