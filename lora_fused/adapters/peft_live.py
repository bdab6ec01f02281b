"""Live PEFT models to lora-fused layers: ``from_peft_model(peft_model)`` swaps a PEFT model's
LoRA linears (and embeddings) for ``LoRALinear`` / ``DoRALinear`` / ``LoRAEmbedding``.

``peft`` is imported only inside ``from_peft_model``; ``transformers`` never (``import lora_fused``
stays light).
"""
from __future__ import annotations

import math
from typing import Mapping

from torch import nn

from .injection import mark_only_lora_as_trainable
from .peft_config import REFUSED_FIELDS, check_peft_config
from .peft_experts import from_param_wrappers
from ..modules.lora_linear import lora_scaling
from ..modules.dora import DoRALinear
from ..modules.embedding import LoRAEmbedding
from ..modules.qlora import is_lora_base, is_peft_linear4bit, lora_class
from ..validation import check_dropout_p


def from_peft_model(peft_model: nn.Module) -> nn.Module:
    """Swap a live PEFT LoRA model's ``lora.Linear`` layers for ``LoRALinear``; returns the base model.

    Takes a ``peft.PeftModel`` (or its ``LoraModel``) with one active adapter. Each adapted
    ``nn.Linear`` keeps its weight and bias objects (reused) and the adapter's lora_A / lora_B
    are copied (device and dtype kept). Returns ``peft_model.base_model.model``, changed in place:
    the PEFT wrapper must not be used afterwards; DoRA modules become ``DoRALinear`` (magnitude
    copied). ``ParamWrapper`` layers (``target_parameters``) become ``LoRAExperts`` (factors
    converted from PEFT's layout, ``peft_experts``). Merged or disabled adapters and the config
    features of ``REFUSED_FIELDS`` are
    refused; nothing is changed then.
    """
    import peft
    from peft.tuners.lora import LoraLayer, LoraModel
    from peft.tuners.lora import Embedding as PeftLoraEmbedding
    from peft.tuners.lora import Linear as PeftLoraLinear
    from peft.tuners.lora import ParamWrapper

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
            if isinstance(module, ParamWrapper):  # target_parameters (nested wrappers: one LoRAExperts)
                plan.append((name, from_param_wrappers(name, module, adapter, config["use_rslora"]), None))
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
