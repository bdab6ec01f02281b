"""Put LoRA into an existing model: ``inject_lora`` and its small companions.

Target matching follows PEFT (``peft.tuners.tuners_utils.check_target_module_exists``):
a list (or set/tuple) matches a module whose full name equals an entry or
ends with ``"." + entry``; a string is a regex that must match the full
name; ``"all-linear"`` is every ``nn.Linear`` except the output layer.
Per-module ``rank_pattern`` / ``alpha_pattern`` use PEFT's rule too: a key
matches a module name ``n`` when ``re.match(rf"(.*\\.)?({key})$", n)``.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Union

from torch import Tensor, nn

from ..modules.dora import DoRALinear
from ..modules.embedding import LoRAEmbedding
from ..modules.experts import ExpertLoRAFactors, LoRAExperts, check_experts_module
from ..modules.lora_linear import LoRALinear
from ..modules.qlora import is_lora_base, lora_class

ALL_LINEAR = "all-linear"
TargetModules = Union[str, Iterable[str]]


def _output_layer_names(model: nn.Module) -> set[str]:
    """The output projection that "all-linear" leaves alone: PEFT skips the module that
    ``model.get_output_embeddings()`` returns; lora-fused also skips any module named
    ``lm_head`` (models without that method, e.g. plain ``nn.Module`` stacks)."""
    names = {"lm_head"}
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if isinstance(output, nn.Module):
        names |= {name for name, module in model.named_modules() if module is output}
    return names


def is_all_linear(target_modules) -> bool:
    """Whether ``target_modules`` is the ``"all-linear"`` shorthand: any letter case, as PEFT
    (``_maybe_include_all_linear_layers`` compares ``target_modules.lower()``)."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def select_modules(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """Names of the modules of ``model`` that ``target_modules`` selects, by PEFT's rules
    (``"all-linear"``: every ``nn.Linear`` but the output layer). No check of what they are."""
    if is_all_linear(target_modules):
        skip = _output_layer_names(model)
        return [n for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n not in skip and n.rsplit(".", 1)[-1] not in skip]
    return [n for n, _ in model.named_modules() if n and matches_target(n, target_modules)]


def check_pattern(pattern, name: str) -> dict:
    """``rank_pattern`` / ``alpha_pattern`` as a dict ``{regex: value}`` (None: empty)."""
    if pattern is None:
        return {}
    if not isinstance(pattern, Mapping):
        raise TypeError(f"{name} must be a dict {{module-name regex: value}} as in PEFT, got "
                        f"{type(pattern).__name__} ({pattern!r})")
    for key in pattern:
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str (module-name regexes), got {key!r}")
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"{name} key {key!r} is not a valid regex: {e}") from None
    return dict(pattern)


def matches_target(name: str, target_modules: TargetModules) -> bool:
    """PEFT's rule for whether module ``name`` is a target."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == key or name.endswith("." + key) for key in target_modules)


def pattern_value(name: str, pattern: Optional[Mapping[str, float]], default):
    """The value of the first ``pattern`` key matching module ``name`` (PEFT's rule), else default."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def find_targets(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """Names of the modules ``target_modules`` selects; errors name what was wrong."""
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not all(isinstance(t, str) for t in target_modules):
            raise TypeError(f"target_modules must be a str or a list of str, got {target_modules!r}")
    names = select_modules(model, target_modules)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"target_modules={target_modules!r} matched no module of "
                         f"{type(model).__name__}; its nn.Linear modules are e.g. {linears[:8]}")
    if "" in names:  # the model itself: there is no parent to put a LoRA layer into
        raise ValueError(f"target_modules={target_modules!r} selects the model itself, a "
                         f"{type(model).__name__}; inject_lora replaces submodules in place: wrap the layer "
                         "(e.g. LoRALinear.from_linear(layer)) or pass its parent model")
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            raise ValueError(f"module {name!r} already has LoRA (it is a {type(module).__name__})")
        if type(module) is nn.Embedding:  # named explicitly ("all-linear" selects nn.Linear only)
            continue
        if not is_lora_base(module):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; lora-fused "
                            "adapts nn.Linear only (and bitsandbytes Linear4bit; nn.Embedding when named): "
                            "narrow target_modules")
    return names


def inject_lora(model: nn.Module, target_modules: Optional[TargetModules], *, r: int = 8,
                lora_alpha: float = 8.0, lora_dropout: float = 0.0, use_rslora: bool = False,
                rank_pattern: Optional[Mapping[str, int]] = None,
                alpha_pattern: Optional[Mapping[str, float]] = None, use_dora: bool = False,
                target_parameters: Optional[Iterable[str]] = None) -> nn.Module:
    """Replace the targeted ``nn.Linear``s of ``model`` in place with ``LoRALinear``s
    (``DoRALinear``s with ``use_dora=True``: PEFT's DoRA, not on 4-bit bases), and the
    targeted ``nn.Embedding``s (when named) with ``LoRAEmbedding``s, as PEFT does.

    ``target_parameters`` (PEFT's ``LoraConfig.target_parameters``): names of 3-D expert
    parameters, each the full name (``model.layers.0.mlp.experts.gate_up_proj``) or a ``.name``
    suffix of one (``mlp.experts.gate_up_proj``); each experts module holding one becomes a
    ``LoRAExperts`` adapting those parameters. ``target_modules`` may then be None or [].

    Weights, device and dtype are kept (the base parameters are reused, not
    copied). Every parameter that is not a LoRA parameter is frozen.
    ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha`` per
    module (per ``<module>.<parameter>`` for target_parameters) as in PEFT. Returns ``model``.
    """
    rank_pattern = check_pattern(rank_pattern, "rank_pattern")
    alpha_pattern = check_pattern(alpha_pattern, "alpha_pattern")
    experts = find_target_parameters(model, target_parameters) if target_parameters is not None else {}
    already = [n for n in experts if isinstance(model.get_submodule(n), LoRAExperts)]
    if already:
        raise ValueError(f"modules {already[:4]} already have expert LoRA (they are LoRAExperts)")
    if experts and use_dora:
        raise ValueError("use_dora=True with target_parameters: DoRA on expert parameters is not supported "
                         "(PEFT's ParamWrapper refuses it too)")
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
    if not target_modules:
        if not experts:
            raise ValueError(f"inject_lora: target_modules={target_modules!r} and no target_parameters: "
                             "nothing to adapt")
        names = []
    else:
        names = find_targets(model, target_modules)
    # Every LoRAExperts is built (its arguments checked) before the model changes.
    wrapped = {name: LoRAExperts.from_experts(
        model.get_submodule(name), parameters=parameters, lora_dropout=lora_dropout, use_rslora=use_rslora,
        r={p: pattern_value(f"{name}.{p}", rank_pattern, r) for p in parameters},
        lora_alpha={p: pattern_value(f"{name}.{p}", alpha_pattern, lora_alpha) for p in parameters})
        for name, parameters in experts.items()}
    for name, layer in wrapped.items():
        model.set_submodule(name, layer)
    for name in names:
        linear = model.get_submodule(name)
        if type(linear) is nn.Embedding:
            if use_dora:
                raise TypeError(f"use_dora=True: module {name!r} is an nn.Embedding; lora-fused's DoRA "
                                "adapts nn.Linear only")
            model.set_submodule(name, LoRAEmbedding.from_embedding(
                linear, r=pattern_value(name, rank_pattern, r),
                lora_alpha=pattern_value(name, alpha_pattern, lora_alpha), use_rslora=use_rslora))
            continue
        layer = _layer_class(name, linear, use_dora).from_linear(
            linear, r=pattern_value(name, rank_pattern, r),
            lora_alpha=pattern_value(name, alpha_pattern, lora_alpha),
            lora_dropout=lora_dropout, use_rslora=use_rslora)
        model.set_submodule(name, layer)
    mark_only_lora_as_trainable(model)
    return model


def _layer_class(name: str, base: nn.Module, use_dora: bool) -> type[LoRALinear]:
    """``lora_class(base)``, or ``DoRALinear`` for an ``nn.Linear`` when ``use_dora``."""
    if not use_dora:
        return lora_class(base)
    if type(base) is not nn.Linear:
        raise TypeError(f"use_dora=True: module {name!r} is a {type(base).__name__}; lora-fused's DoRA "
                        "adapts nn.Linear only (not 4-bit bases)")
    return DoRALinear


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_experts_layers(model: nn.Module) -> dict[str, LoRAExperts]:
    """The ``LoRAExperts`` modules of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAExperts)}


def mergeable_layers(model: nn.Module) -> dict[str, Union[LoRALinear, LoRAExperts]]:
    """The layers ``merge_lora`` / ``unmerge_lora`` act on: LoRALinear and LoRAExperts."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))}


def expert_parameter_owners(model: nn.Module):
    """``(module name, module, its own parameters)`` for every module of ``model``, with a
    ``LoRAExperts`` owning its base module's parameters (``<m>.base_layer.gate_up_proj`` is
    ``<m>.gate_up_proj``, the name PEFT and the base model use); its base module and factors skipped."""
    modules = dict(model.named_modules())
    for name, module in modules.items():
        parent, _, leaf = name.rpartition(".")
        if leaf == "base_layer" and isinstance(modules.get(parent), LoRAExperts) or isinstance(module, ExpertLoRAFactors):
            continue
        owner = module.base_layer if isinstance(module, LoRAExperts) else module
        yield name, module, dict(owner.named_parameters(recurse=False))


def find_target_parameters(model: nn.Module, target_parameters: Iterable[str]) -> dict[str, list[str]]:
    """``{experts module name: [its targeted parameter names]}`` by PEFT's rule: the parameter's
    full name ``<module>.<parameter>`` equals an entry or ends with ``"." + entry``. The names per
    module keep the module's registration order (PEFT nests its wrappers in that order). A module
    that is a ``LoRAExperts`` already is listed under its own name. Errors name what matched
    nothing, a parameter that is not 3-D, a module that is no experts module."""
    if isinstance(target_parameters, str):
        raise TypeError(f"target_parameters must be a list of parameter names (PEFT takes no regex "
                        f"here), got the str {target_parameters!r}")
    targets = list(target_parameters)
    if not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"target_parameters must be a list of non-empty str, got {targets!r}")
    found: dict[str, list[str]] = {}
    matched, candidates = set(), []
    for module_name, module, parameters in expert_parameter_owners(model):
        for pname, param in parameters.items():
            key = f"{module_name}.{pname}" if module_name else pname
            candidates += [key] if param.dim() == 3 else []
            hits = [t for t in targets if key == t or key.endswith("." + t)]
            if not hits:
                continue
            matched.update(hits)
            if param.dim() != 3:
                raise ValueError(f"target_parameters {hits} select {key!r} of shape {tuple(param.shape)}; "
                                 "only 3-D expert parameters ([E, out, in] or [E, in, out]) can be targeted")
            if module_name == "":
                raise ValueError(f"target_parameters select {key!r} of the model itself, a {type(model).__name__}; "
                                 "pass its parent model or wrap it with LoRAExperts.from_experts")
            if not isinstance(module, LoRAExperts) and module_name not in found:
                check_experts_module(module)
            found.setdefault(module_name, []).append(pname)
    unmatched = [t for t in targets if t not in matched]
    if unmatched:
        raise ValueError(f"target_parameters {unmatched} matched no parameter of {type(model).__name__}; "
                         f"its 3-D parameters are e.g. {candidates[:6]}")
    return found


def is_lora_parameter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A",
                                        "lora_embedding_B")


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """requires_grad on LoRA parameters only (and a quantized transformers model is told that it
    now trains through adapters: :func:`_trains_through_adapters`)."""
    trainable = False
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_parameter(name))
        trainable |= param.requires_grad
    if trainable:
        _trains_through_adapters(model)
    return model


def _trains_through_adapters(model: nn.Module) -> None:
    """A transformers model that its quantizer loaded carries ``is_quantized = True``, and the
    ``Trainer`` refuses it as "purely quantized" unless adapters were attached the PEFT way (see
    ``transformers.trainer_utils.validate_quantization_for_training``): a ``PeftModel``, or
    ``_hf_peft_config_loaded``, which also makes ``save_pretrained`` write a PEFT adapter through
    PEFT's functions (wrong for lora-fused layers, and a checkpoint the Trainer cannot resume
    outside a ``PeftModel``). With lora-fused adapters the model is no longer a quantized model
    with nothing to train, so ``is_quantized`` is cleared, when the quantization supports training
    (``hf_quantizer.is_trainable``: else the Trainer's own refusal stands). What else stays as
    loaded: ``hf_quantizer`` (``save_pretrained`` writes the packed weights and the adapters, a
    checkpoint the Trainer resumes with ``load_state_dict``), ``quantization_method`` and
    ``is_loaded_in_4bit``. ``.half()`` / ``.float()``, which transformers refuses on a quantized
    model, are then nn.Module's: they leave the packed 4-bit weights as they are."""
    quantizer = getattr(model, "hf_quantizer", None)
    if getattr(model, "is_quantized", False) and quantizer is not None and quantizer.is_trainable:
        model.is_quantized = False


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the LoRA tensors of ``model.state_dict()``, under their usual keys."""
    return {k: v for k, v in model.state_dict().items() if is_lora_parameter(k)}


def merge_lora(model: nn.Module) -> nn.Module:
    """``merge()`` every LoRALinear and LoRAExperts that is not merged yet: all of them or none.

    Every layer is asked first (``merge_refusal``: a 4-bit base, a disabled layer), so a refusal
    raises before any weight changes, naming each refusing layer. A merge that fails on its own
    values (NaN/inf in the weight's dtype) unmerges the layers this call merged before it raises
    (exact up to the weight dtype's rounding)."""
    pending = {name: layer for name, layer in mergeable_layers(model).items() if not layer.merged}
    refusals = {name: layer.merge_refusal() for name, layer in pending.items()}
    refusals = {name: why for name, why in refusals.items() if why is not None}
    if refusals:
        listed = "; ".join(f"{name or '<root>'}: {why}" for name, why in refusals.items())
        raise ValueError(f"merge_lora: {len(refusals)} of {len(pending)} layers cannot merge, so none "
                         f"was merged: {listed}")
    merged = []
    try:
        for layer in pending.values():
            layer.merge()
            merged.append(layer)
    except Exception:
        for layer in reversed(merged):
            layer.unmerge()
        raise
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """``unmerge()`` every merged LoRALinear and LoRAExperts."""
    for layer in mergeable_layers(model).values():
        if layer.merged:
            layer.unmerge()
    return model
