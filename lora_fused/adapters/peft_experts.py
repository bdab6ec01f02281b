"""PEFT adapters with ``target_parameters`` (LoRA on 3-D expert parameters) to and from ``LoRAExperts``.

PEFT adapts one 3-D parameter with one ``ParamWrapper`` around the experts module; two targeted
parameters of one module nest: the parameter registered first on the module is wrapped first,
innermost (PEFT's ``inject_adapter`` walks a module's ``named_parameters(recurse=False)``). So
for an experts module ``<m>`` with targeted parameters p_1 ... p_n in registration order, p_i's
factors sit under ``<m>`` + ``.base_layer`` × (n − i) in the file:
``base_model.model.<that path>.lora_A.weight`` [E·r, in] and ``...lora_B.weight`` [out, r·E]
(``expert_layout`` converts them). ``rank_pattern`` / ``alpha_pattern`` keys match the
parameter's name ``<m>.<p>`` (PEFT's ``_create_and_replace`` uses that key).
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .expert_layout import from_peft_factors, to_peft_factors
from .injection import EXPERT_WRAPPERS, find_target_parameters, lora_experts_layers, pattern_value
from ..modules.experts import LoRAExperts, matmul_shape
from ..modules.lora_linear import lora_scaling

BASE_LAYER = "base_layer"


def peft_paths(module_name: str, parameters: Sequence[str]) -> dict[str, str]:
    """``{parameter: the module path PEFT saves its factors under}`` for an experts module's
    targeted ``parameters`` in registration order (the module docstring's nesting rule)."""
    n = len(parameters)
    return {p: module_name + f".{BASE_LAYER}" * (n - 1 - i) for i, p in enumerate(parameters)}


def registration_order(experts: nn.Module, parameters) -> list[str]:
    """``parameters`` in the order ``experts`` registered them (PEFT's nesting order)."""
    return [n for n in experts._parameters if n in set(parameters)]


def may_be_expert_entry(config: Mapping, module: str) -> bool:
    """Whether a file's module path (``<m>`` or ``<m>.base_layer...``) can hold expert factors
    under the config's ``target_parameters`` (decidable without the model: the module part of a
    target, ``mlp.experts`` of ``mlp.experts.gate_up_proj``, is ``<m>`` or a suffix of it)."""
    while module.endswith("." + BASE_LAYER):
        module = module[: -len(BASE_LAYER) - 1]
    for target in config.get("target_parameters") or ():
        owner = target.rpartition(".")[0]
        if not owner or module == owner or module.endswith("." + owner):
            return True
    return False


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------
class ExpertEntry(NamedTuple):
    """One targeted parameter as written: its factors in PEFT's layout, rank and alpha."""
    path: str
    lora_A: Tensor
    lora_B: Tensor
    r: int
    lora_alpha: float


def expert_entries(model: nn.Module) -> dict[str, ExpertEntry]:
    """``{<m>.<parameter>: ExpertEntry}`` for every LoRAExperts of ``model`` (merged ones refused)."""
    entries = {}
    for name, layer in lora_experts_layers(model).items():
        if layer.merged:
            raise ValueError(f"LoRAExperts {name!r} is merged into its base parameters; call "
                             "lf.unmerge_lora(model) before save_peft_adapter (a merged adapter would be applied "
                             "twice on load)")
        if name == "":
            raise ValueError("the model itself is a LoRAExperts; PEFT names adapted modules inside a model, so "
                             "wrap it in a module to save it")
        order = registration_order(layer.base_layer, layer.lora)
        for pname, path in peft_paths(name, order).items():
            factors = layer.lora[pname]
            A_w, B_w = to_peft_factors(factors.lora_A.detach(), factors.lora_B.detach())
            entries[f"{name}.{pname}"] = ExpertEntry(path, A_w, B_w, factors.r, factors.lora_alpha)
    return entries


def expert_slot_entries(module_name: str, layer: nn.Module, slot: int) -> dict[str, ExpertEntry]:
    """``{<m>.<parameter>: ExpertEntry}`` of one slot of a ``MultiLoRAExperts``: each parameter the
    adapter in ``slot`` adapts (a parameter it left out holds scaling 0 and zero factors), at the slot's
    rank, with ``lora_alpha = scaling · r`` (PEFT's alpha / r gives the scaling back). The nesting
    follows the adapted parameters alone, as PEFT's own file of that adapter would."""
    adapted = {}
    for j, pname in enumerate(layer.parameter_names):
        tables, scaling = layer.lora[pname], float(layer.scalings[j, slot, 0])
        r = int(layer.ranks[j, slot, 0])
        A, B = tables.lora_A[slot, :, :r], tables.lora_B[slot, :, :, :r]
        if scaling != 0.0 or A.any() or B.any():
            adapted[pname] = (A, B, r, scaling * r)
    entries = {}
    for pname, path in peft_paths(module_name, registration_order(layer.base_layer, adapted)).items():
        A, B, r, alpha = adapted[pname]
        A_w, B_w = to_peft_factors(A, B)
        entries[f"{module_name}.{pname}"] = ExpertEntry(path, A_w, B_w, r, alpha)
    return entries


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------
class ExpertLoadStep(NamedTuple):
    module: str
    parameters: list
    factors: dict  # parameter -> (A [E, r, in], B [E, out, r])
    ranks: dict
    alphas: dict


def _shapes(*tensors: Tensor) -> str:
    return ", ".join(str(tuple(t.shape)) for t in tensors)


def plan_expert_loading(model: nn.Module, config: Mapping, tensors: dict, keys: Mapping,
                        source: str) -> list[ExpertLoadStep]:
    """Check the file's expert factors against ``model`` and take them out of ``tensors`` (what is
    left is linear LoRA). Errors name the missing key, the shapes seen and expected."""
    if not config.get("target_parameters"):
        return []
    steps = []
    for module_name, parameters in find_target_parameters(model, config["target_parameters"]).items():
        module = model.get_submodule(module_name)
        experts = module.base_layer if isinstance(module, EXPERT_WRAPPERS) else module
        order = registration_order(experts, parameters)
        factors, ranks, alphas = {}, {}, {}
        for pname, path in peft_paths(module_name, order).items():
            if path not in tensors:
                raise ValueError(f"{source}: missing key 'base_model.model.{path}.lora_A.weight' for target parameter "
                                 f"{module_name}.{pname} (PEFT nests one ParamWrapper per targeted parameter of a "
                                 "module, the first registered innermost)")
            A_w, B_w = tensors.pop(path)[:2]
            key = f"{module_name}.{pname}"
            r = pattern_value(key, config["rank_pattern"], config["r"])
            alpha = float(pattern_value(key, config["alpha_pattern"], config["lora_alpha"]))
            param = experts._parameters[pname]
            E = param.shape[0]
            out_f, in_f = matmul_shape(experts, param)
            if tuple(A_w.shape) != (E * r, in_f) or tuple(B_w.shape) != (out_f, r * E):
                raise ValueError(f"{source}: {keys[path][0]!r} / {keys[path][1]!r} have shapes {_shapes(A_w, B_w)} but "
                                 f"{key} ({E} experts, {in_f} -> {out_f}) with r={r} needs ({E * r}, {in_f}), "
                                 f"({out_f}, {r * E})")
            if isinstance(module, LoRAExperts):
                _check_existing(module_name, module, pname, r)
            factors[pname] = from_peft_factors(A_w, B_w, E)
            ranks[pname], alphas[pname] = r, alpha
        if isinstance(module, LoRAExperts) and set(module.lora) != set(parameters):
            raise ValueError(f"module {module_name!r} is a LoRAExperts adapting {list(module.lora)}, but the adapter "
                             f"targets {parameters} of it")
        steps.append(ExpertLoadStep(module_name, order, factors, ranks, alphas))
    return steps


def _check_existing(module_name: str, module: LoRAExperts, pname: str, r: int) -> None:
    if module.merged:
        raise ValueError(f"module {module_name!r} is a merged LoRAExperts; unmerge it before loading new weights")
    if pname in module.lora and module.lora[pname].r != r:
        raise ValueError(f"module {module_name!r} is a LoRAExperts with r={module.lora[pname].r} for {pname}, but "
                         f"the adapter has r={r}")


def apply_expert_loading(model: nn.Module, steps: Sequence[ExpertLoadStep], *, dropout: float,
                         use_rslora: bool) -> None:
    """Wrap (or reuse) each planned experts module and copy the factors in (device and dtype kept)."""
    for step in steps:
        module = model.get_submodule(step.module)
        if not isinstance(module, LoRAExperts):
            module = LoRAExperts.from_experts(module, r=step.ranks, lora_alpha=step.alphas, lora_dropout=dropout,
                                              parameters=step.parameters, use_rslora=use_rslora)
            model.set_submodule(step.module, module)
        module.lora_dropout, module.use_rslora = dropout, use_rslora
        for pname, (A, B) in step.factors.items():
            target = module.lora[pname]
            target.lora_alpha = step.alphas[pname]
            target.scaling = lora_scaling(target.r, target.lora_alpha, use_rslora)
            with torch.no_grad():
                target.lora_A.copy_(A)
                target.lora_B.copy_(B)


# --------------------------------------------------------------------------
# Live PEFT models
# --------------------------------------------------------------------------
def param_wrapper_chain(wrapper) -> tuple[list, nn.Module]:
    """(the nested ParamWrappers from the outside in, the experts module they wrap)."""
    from peft.tuners.lora import ParamWrapper
    chain, inner = [], wrapper
    while isinstance(inner, ParamWrapper):
        chain.append(inner)
        inner = inner.base_layer
    return chain, inner


def from_param_wrappers(name: str, wrapper, adapter: str, use_rslora_default: bool) -> nn.Module:
    """A LoRAExperts equal to a live (possibly nested) ParamWrapper's active adapter (the bare
    experts module if that adapter does not adapt it); checks first (unmerged, enabled, scaling
    from alpha, 3-D parameters), the factors copied."""
    chain, experts = param_wrapper_chain(wrapper)
    ranks, alphas, factors = {}, {}, {}
    use_rslora = set()
    for layer in chain:
        pname = layer.parameter_name
        if layer.merged or layer.disable_adapters:
            raise ValueError(f"module {name!r}: the ParamWrapper of {pname} is "
                             f"{'merged' if layer.merged else 'disabled'}; unmerge / enable it first")
        if adapter not in layer.lora_A:
            continue
        if getattr(layer, "_param_ndim", 3) != 3:
            raise TypeError(f"module {name!r}: PEFT targets the {layer._param_ndim}-D parameter {pname}; "
                            "lora-fused adapts 3-D expert parameters only")
        r, alpha = layer.r[adapter], layer.lora_alpha[adapter]
        rslora = bool(getattr(layer, "use_rslora", {}).get(adapter, use_rslora_default))
        if not math.isclose(lora_scaling(r, alpha, rslora), layer.scaling[adapter], rel_tol=1e-6):
            raise ValueError(f"module {name!r}: {pname}'s scaling {layer.scaling[adapter]} is not derived from "
                             "lora_alpha (set_scale / scale_layer was used)")
        use_rslora.add(rslora)
        ranks[pname], alphas[pname] = r, alpha
        factors[pname] = from_peft_factors(layer.lora_A[adapter].weight.detach(),
                                           layer.lora_B[adapter].weight.detach(), layer.num_experts)
    if len(use_rslora) > 1:
        raise ValueError(f"module {name!r}: its ParamWrappers mix use_rslora values")
    parameters = registration_order(experts, factors)
    if not parameters:  # not adapted by the active adapter
        return experts
    layer = LoRAExperts.from_experts(experts, r=ranks, lora_alpha=alphas, parameters=parameters,
                                     use_rslora=use_rslora.pop())
    with torch.no_grad():
        for pname, (A, B) in factors.items():
            layer.lora[pname].lora_A.copy_(A)
            layer.lora[pname].lora_B.copy_(B)
    return layer


__all__ = ["peft_paths", "may_be_expert_entry", "expert_entries", "plan_expert_loading", "apply_expert_loading",
           "from_param_wrappers"]
