"""PEFT's LoRA adapter format: the directory, its key names, and the config checks.

A PEFT LoRA adapter directory holds ``adapter_config.json`` (a serialised
``peft.LoraConfig``) and ``adapter_model.safetensors`` with, for each adapted
module ``<m>`` (named as in the base model, e.g. ``model.layers.0.self_attn.q_proj``),
``base_model.model.<m>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r].
``peft_read`` reads and loads one, ``peft_write`` writes one, ``peft_live`` converts a live
PEFT model; all check the config here.

Config fields (PEFT 0.21 ``LoraConfig``) and what happens to each:

- used: ``r``, ``lora_alpha``, ``use_rslora``, ``use_dora`` (DoRALinear layers; the file's
  ``<m>.lora_magnitude_vector`` [out] is the magnitude), ``rank_pattern``, ``alpha_pattern``
  (PEFT's rule: key ``k`` matches module ``n`` when ``re.match(rf"(.*\\.)?({k})$", n)``,
  first key in order wins), ``target_modules`` (list: full name or ``.name`` suffix;
  str: regex fullmatch; ``"all-linear"``), ``exclude_modules`` (same rules),
  ``lora_dropout``, ``target_parameters`` (3-D expert parameters: ``LoRAExperts``, see
  ``peft_experts``).
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

import math
import os
import re
import warnings
from typing import Any, Mapping

from torch import nn

from .injection import check_pattern, matches_target, pattern_value, select_modules
from ..validation import check_dropout_p, check_positive_int

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
                "alpha_pattern", "target_modules", "exclude_modules", "bias", "init_lora_weights", "use_dora",
                "target_parameters"}
#: init_lora_weights values after which the base weights no longer match the original model.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


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
    config["target_parameters"] = _checked_target_parameters(config.get("target_parameters"), source)
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if isinstance(value, (set, tuple)):
            value = sorted(value)
        if field == "target_modules" and value is None and config["target_parameters"]:
            value = []  # PEFT allows target_parameters alone
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


def _checked_target_parameters(value, source: str) -> list:
    """``target_parameters`` as a list of str ([] when absent); ValueError for anything else."""
    if value is None:
        return []
    if isinstance(value, (set, tuple)):
        value = sorted(value)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{source}: target_parameters={value!r} must be a list of parameter names")
    return value


def module_lora_settings(config: Mapping, name: str) -> tuple[int, float, bool]:
    """``(r, lora_alpha, use_rslora)`` a checked config gives module ``name`` (PEFT's pattern rule)."""
    return (pattern_value(name, config["rank_pattern"], config["r"]),
            float(pattern_value(name, config["alpha_pattern"], config["lora_alpha"])),
            config["use_rslora"])


def peft_target_names(model: nn.Module, config: Mapping) -> list[str]:
    """The modules of ``model`` that a checked config's target_modules / exclude_modules select."""
    names = select_modules(model, config["target_modules"])
    exclude = config.get("exclude_modules")
    if exclude:
        names = [n for n in names if not matches_target(n, exclude)]
    return names


def lora_key(module: str, ab: str) -> str:
    """The file's key of module ``module``'s ``lora_A`` / ``lora_B`` (``ab``: "A" | "B") weight."""
    return f"{KEY_PREFIX}{module}.lora_{ab}.weight"


def directory_argument(directory) -> str:
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
