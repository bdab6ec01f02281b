"""PEFT LoRA adapter directories in and out of multi-adapter slots: ``load_peft_adapter_slot``
(with ``packed=``: separate q_proj / k_proj / v_proj adapters into a packed layer's slices) and
``save_peft_adapter_slot``. The reader, target checks and writer are the single-adapter ones
(``peft_read``, ``peft_write``).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .multi_lora import add_adapter, model_slot_of, multi_lora_layers
from .peft_config import SAFETENSORS_NAME, module_lora_settings
from .peft_experts import expert_slot_entries, plan_expert_loading
from .peft_read import check_peft_targets, read_peft_adapter_with_keys
from .peft_write import target_modules_for, write_peft_adapter
from ..modules.lora_linear import lora_scaling
from ..modules.multi_experts import MultiLoRAExperts
from ..serving.slots import SLOT_LOCK


def load_peft_adapter_slot(model: nn.Module, directory, name: str, *,
                           packed: Optional[Mapping[str, Sequence[str]]] = None,
                           timeout: Optional[float] = None) -> int:
    """Load a PEFT LoRA adapter directory (safetensors only) into slot ``name``; returns the slot.

    Shares its reader and its target checks with :func:`lora_fused.load_peft_adapter`: every
    module the config's ``target_modules`` selects in ``model`` must have weights in the file
    and the file must hold no others (ValueError otherwise, with the same messages), and each
    target must be a ``MultiLoRALinear``. Per-module rank and scaling follow the config's
    ``r`` / ``rank_pattern``, ``lora_alpha`` / ``alpha_pattern`` and ``use_rslora``.
    ``lora_dropout`` is a training-time setting the multi-adapter op does not apply.

    ``packed`` serves an adapter trained on separate projections from packed layers: it maps a
    packed layer's last name to the modules whose weights fill its slices, in slice order, e.g.
    ``{"qkv_proj": ("q_proj", "k_proj", "v_proj")}``: ``...self_attn.qkv_proj`` (a
    ``MultiLoRALinear`` built with ``slices=(w_q, w_k, w_v)``) takes the file's
    ``...self_attn.q_proj`` / ``k_proj`` / ``v_proj``. Modules of different ranks are padded with
    zeros to the largest (exact: padded rank rows add 0); a module the adapter does not target
    (PEFT's default q_proj, v_proj only) is a zero slice. The modules of one packed layer must
    share one scaling (alpha / r, or alpha / sqrt(r) with use_rslora): ValueError otherwise.

    ``target_parameters`` (expert LoRA, PEFT's ``ParamWrapper`` layout) loads into the model's
    ``MultiLoRAExperts`` (``inject_multi_lora(..., target_parameters=...)``): each targeted
    parameter at the file's rank (padded to the module's max_rank) and the config's scaling
    for ``<module>.<parameter>``. ValueError when a targeted parameter belongs to an experts
    module without slots for it, or its keys are missing.

    ``timeout``: how long to wait for a slot, as :func:`add_adapter` (None: no limit).
    """
    config, tensors, keys = read_peft_adapter_with_keys(directory)
    if config["use_dora"]:
        raise ValueError(f"{directory!r} is a DoRA adapter (use_dora): multi-adapter slots serve plain LoRA "
                         "only (DoRA rescales each output column by its own magnitude / norm); load it with "
                         "lf.load_peft_adapter into a single-adapter model instead")
    weights = {}
    tensors = dict(tensors)  # packed slices' and expert stacks' modules are taken out; the rest load as usual
    if packed is not None:
        weights = _packed_peft_weights(model, config, tensors, _check_packed(packed), directory)
    weights.update(_expert_peft_weights(model, config, tensors, keys, directory))
    targets = check_peft_targets(model, config, tensors, keys, directory, skip=weights)
    if not targets and not weights:
        raise ValueError(f"{directory!r}: the adapter's target_modules={config['target_modules']!r} select "
                         f"no module of {type(model).__name__}, so it would load nothing"
                         + ("" if packed is None else f" (packed={packed!r} matched no module of the file)"))
    for module_name in targets:
        A, B = tensors[module_name]
        r, alpha, use_rslora = module_lora_settings(config, module_name)
        weights[module_name] = (A, B, lora_scaling(r, alpha, use_rslora))
    return add_adapter(model, name, weights, timeout=timeout)


def _check_packed(packed) -> dict[str, tuple[str, ...]]:
    if not isinstance(packed, Mapping):
        raise TypeError(f"packed must be a mapping {{packed layer name: (module names, in slice order)}}, e.g. "
                        f"{{'qkv_proj': ('q_proj', 'k_proj', 'v_proj')}}, got {type(packed).__name__}")
    checked = {}
    for key, parts in packed.items():
        if not isinstance(key, str) or isinstance(parts, str) or not isinstance(parts, Sequence) \
                or not parts or not all(isinstance(p, str) for p in parts):
            raise TypeError(f"packed[{key!r}] must be a non-empty sequence of module names (str), got {parts!r}")
        checked[key] = tuple(parts)
    return checked


def _packed_peft_weights(model: nn.Module, config: Mapping, tensors: dict, packed: Mapping[str, tuple[str, ...]],
                         directory) -> dict[str, tuple[Tensor, Tensor, float]]:
    """``{packed layer: (A [S, r, in], B [out, r], scaling)}`` from the file's per-slice modules,
    which are removed from ``tensors``."""
    layers = multi_lora_layers(model)
    weights, matched = {}, set()
    for layer_name, layer in layers.items():
        parent, _, leaf = layer_name.rpartition(".")
        if leaf not in packed:
            continue
        matched.add(leaf)
        sources = [f"{parent}.{part}" if parent else part for part in packed[leaf]]
        if layer.slices is None or len(layer.slices) != len(sources):
            raise ValueError(f"packed[{leaf!r}] names {len(sources)} modules {packed[leaf]} but {layer_name!r} has "
                             f"slices={layer.slices}: build it with MultiLoRALinear.from_linear(..., slices=...) "
                             "giving one output width per module")
        present = [m for m in sources if m in tensors]
        if not present:
            continue  # the adapter does not adapt this packed layer
        scalings = {m: lora_scaling(*module_lora_settings(config, m)) for m in present}
        if len(set(scalings.values())) > 1:
            raise ValueError(f"{directory!r}: modules {present} packed into {layer_name!r} have different scalings "
                             f"{scalings} (lora_alpha / r per module); one packed slot holds one scaling per adapter")
        r = max(tensors[m][0].shape[0] for m in present)
        like = tensors[present[0]][0]
        a_parts, b_parts = [], []
        for module, width in zip(sources, layer.slices):
            A, B = tensors.pop(module) if module in tensors else (like.new_zeros(0, layer.in_features),
                                                                  like.new_zeros(width, 0))
            if A.shape[1] != layer.in_features or B.shape[0] != width:
                raise ValueError(f"{directory!r}: module {module!r} has lora_A {tuple(A.shape)} / lora_B "
                                 f"{tuple(B.shape)} but its slice of {layer_name!r} is [{width}, "
                                 f"in_features={layer.in_features}] (slices={layer.slices})")
            a_parts.append(torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])]))  # zero rank padding
            b_parts.append(torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1))
        weights[layer_name] = (torch.stack(a_parts), torch.cat(b_parts), scalings[present[0]])
    unmatched = [key for key in packed if key not in matched]
    if unmatched:
        raise ValueError(f"packed names {unmatched}, but no MultiLoRALinear of {type(model).__name__} has that last "
                         f"name (its MultiLoRALinear layers are e.g. {sorted(layers)[:4]})")
    return weights


def save_peft_adapter_slot(model: nn.Module, name: str, directory, *,
                           packed: Optional[Mapping[str, Sequence[str]]] = None) -> None:
    """Write adapter ``name`` (from every layer that holds it) as a PEFT LoRA adapter directory:
    each layer's ``lora_A[slot, :r]`` / ``lora_B[slot, :, :r]``, its rank, and
    ``lora_alpha = scaling · r`` (so PEFT's alpha / r gives the slot's scaling back).
    ``peft.PeftModel.from_pretrained`` and :func:`load_peft_adapter_slot` load it.

    A packed layer is written as the separate modules ``packed`` names for it (as
    :func:`load_peft_adapter_slot`'s ``packed``; PEFT has no packed format): slice j becomes
    module j with ``lora_A[slot, j, :r]`` / its rows of ``lora_B``, at the slot's rank r (a module
    loaded at a smaller rank comes back zero-padded: the same numbers); an all-zero slice (a
    module the adapter did not adapt) is not written. Those modules are named in full in
    ``target_modules``, for the unpacked model. Without ``packed``, a packed layer raises.
    A ``MultiLoRAExperts`` slot is written as PEFT's ``target_parameters`` adapter (ParamWrapper keys,
    ``peft_experts.expert_slot_entries``): the parameters the adapter adapts, at its rank."""
    packed = None if packed is None else _check_packed(packed)
    with SLOT_LOCK:  # one consistent version of the adapter
        slot = model_slot_of(model, name)
        entries, unpacked, experts = {}, [], {}
        for module_name, layer in multi_lora_layers(model).items():
            if name not in layer.adapter_slots:
                continue
            if isinstance(layer, MultiLoRAExperts):  # PEFT's target_parameters (ParamWrapper) layout
                experts.update(expert_slot_entries(module_name, layer, slot))
                continue
            r, scaling = int(layer.ranks[slot]), float(layer.scalings[slot])
            if layer.slices is None:
                entries[module_name] = (layer.lora_A[slot, :r].clone(), layer.lora_B[slot, :, :r].clone(),
                                        scaling * r)
                unpacked.append(module_name)
                continue
            parent, _, leaf = module_name.rpartition(".")
            if packed is None or leaf not in packed or len(packed[leaf]) != len(layer.slices):
                raise ValueError(f"{module_name!r} is a packed layer (slices={layer.slices}): PEFT has no packed "
                                 f"LoRA format, so give packed={{{leaf!r}: (one module name per slice)}} to write "
                                 f"adapter {name!r} as separate modules (got packed={packed!r})")
            start = 0
            for j, (part, width) in enumerate(zip(packed[leaf], layer.slices)):
                A, B = layer.lora_A[slot, j, :r], layer.lora_B[slot, start:start + width, :r]
                start += width
                if A.any() or B.any():
                    entries[f"{parent}.{part}" if parent else part] = (A.clone(), B.clone(), scaling * r)
    # ordinary layers: PEFT's suffix keys for this model; packed slices: their full names
    targets = sorted(set(target_modules_for(model, unpacked) if unpacked else []) | (set(entries) - set(unpacked)))
    write_peft_adapter(model, directory, entries, use_rslora=False, lora_dropout=0.0, target_modules=targets,
                       experts=experts)


def _expert_peft_weights(model: nn.Module, config: Mapping, tensors: dict, keys: Mapping,
                         directory) -> dict[str, tuple[dict, dict, dict]]:
    """``{MultiLoRAExperts name: ({parameter: A [E, r, in]}, {parameter: B [E, out, r]},
    {parameter: scaling})}`` from the file's ``ParamWrapper`` entries (read and checked as
    ``load_peft_adapter`` does: ``peft_experts.plan_expert_loading``), which are removed from
    ``tensors``. ValueError for a targeted experts module without slots for its parameters."""
    weights = {}
    source = os.path.join(os.fspath(directory), SAFETENSORS_NAME)
    for step in plan_expert_loading(model, config, tensors, keys, source):
        layer = model.get_submodule(step.module)
        if not isinstance(layer, MultiLoRAExperts):
            raise ValueError(f"{directory!r}: target_parameters={config['target_parameters']!r} select "
                             f"{step.parameters} of {step.module!r}, a {type(layer).__name__} without adapter slots: "
                             f"inject_multi_lora(model, ..., target_parameters=...) first")
        unslotted = [p for p in step.parameters if p not in layer.dims]
        if unslotted:
            raise ValueError(f"{directory!r} adapts {unslotted} of {step.module!r}, but its MultiLoRAExperts has "
                             f"slots for {list(layer.parameter_names)} only: inject_multi_lora with "
                             "target_parameters that cover them")
        scalings = {p: lora_scaling(step.ranks[p], step.alphas[p], config["use_rslora"]) for p in step.parameters}
        weights[step.module] = ({p: A for p, (A, _) in step.factors.items()},
                                {p: B for p, (_, B) in step.factors.items()}, scalings)
    return weights
