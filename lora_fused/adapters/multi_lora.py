"""Many adapters on a whole model: ``MultiLoRALinear`` layers in it (and ``MultiLoRAExperts`` for
MoE experts), one slot per adapter name shared by every layer, and the routing of a batch.

``inject_multi_lora`` swaps target ``nn.Linear``s for ``MultiLoRALinear`` and experts modules
whose parameters ``target_parameters`` names for ``MultiLoRAExperts``; ``add_adapter`` puts
one adapter into the *same* slot of every layer (``remove_adapter`` takes it out);
``adapter_batch(model, names)`` routes one adapter name per sequence (None = base model) for
the forwards inside it, with one segment plan per batch shape, shared by every layer. PEFT
adapter directories in and out of slots: ``peft_slots``. The slot lifetime and routing below
these: ``lora_fused.serving``; the concurrency contract: docs/serving.md.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional, Sequence, Union

from torch import Tensor, nn

from .injection import (TargetModules, find_target_parameters, find_targets, mark_only_lora_as_trainable,
                        refuse_wrapped_experts)
from ..modules.multi_experts import MultiLoRAExperts
from ..modules.multi_lora import MultiLoRALinear
from ..serving.routing import ROUTES, AdapterRouting
from ..serving.slots import SLOT_LOCK, install, model_slot, uninstall


MultiLayer = Union[MultiLoRALinear, MultiLoRAExperts]


def multi_lora_layers(model: nn.Module) -> dict[str, MultiLayer]:
    """``{module name: layer}`` of every ``MultiLoRALinear`` and ``MultiLoRAExperts`` in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (MultiLoRALinear, MultiLoRAExperts))}


def inject_multi_lora(model: nn.Module, target_modules: Optional[TargetModules], *, max_adapters: int,
                      max_rank: int, slices: Optional[Mapping[str, Sequence[int]]] = None,
                      target_parameters: Optional[Sequence[str]] = None) -> nn.Module:
    """Replace the targeted ``nn.Linear``s (PEFT's matching rules) with empty ``MultiLoRALinear``s.

    Base weights are reused and frozen; the slot stacks are the only trainable parameters.
    ``slices`` maps a target's last name to its packed output widths (e.g.
    ``{"qkv_proj": (q, k, v)}``): those layers are built packed (``from_linear(..., slices=)``).

    ``target_parameters`` (PEFT's meaning: ``"mlp.experts.gate_up_proj"``, or a ``.name`` suffix
    of one) names 3-D expert parameters: their experts modules become ``MultiLoRAExperts``
    (inference only) with slots for those parameters. ``target_modules`` may then be None or [].
    """
    if slices is not None and not isinstance(slices, Mapping):
        raise TypeError(f"slices must be a mapping {{last module name: output widths}}, got {type(slices).__name__}")
    experts = find_target_parameters(model, target_parameters) if target_parameters is not None else {}
    refuse_wrapped_experts(model, experts)
    if not experts and not target_modules:
        raise ValueError("inject_multi_lora needs target_modules or target_parameters, got neither")
    names = find_targets(model, target_modules) if target_modules else []
    unused = sorted(set(slices or ()) - {name.rpartition(".")[2] for name in names})
    if unused:
        raise ValueError(f"slices names {unused}, which is the last name of no target (targets are e.g. "
                         f"{names[:4]}): add them to target_modules")
    for name in names:
        widths = None if slices is None else slices.get(name.rpartition(".")[2])
        model.set_submodule(name, MultiLoRALinear.from_linear(model.get_submodule(name), max_adapters=max_adapters,
                                                              max_rank=max_rank, slices=widths))
    for name, parameters in experts.items():
        model.set_submodule(name, MultiLoRAExperts.from_experts(model.get_submodule(name), max_adapters=max_adapters,
                                                                max_rank=max_rank, parameters=parameters))
    return mark_only_lora_as_trainable(model)


def _layers_or_raise(model: nn.Module) -> dict[str, MultiLayer]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = multi_lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MultiLoRALinear or MultiLoRAExperts; call "
                         "inject_multi_lora first")
    return layers


def _shared_max_adapters(layers: Mapping[str, MultiLayer]) -> int:
    """The one max_adapters of a model's layers (a plan and a slot index must mean the same in all)."""
    n_slots = {layer.max_adapters for layer in layers.values()}
    if len(n_slots) > 1:
        raise ValueError(f"multi-adapter layers disagree on max_adapters ({sorted(n_slots)})")
    return n_slots.pop()


def model_slot_of(model: nn.Module, name: str) -> int:
    """The slot adapter ``name`` has in every layer of ``model`` (ValueError if they disagree)."""
    with SLOT_LOCK:
        return model_slot(_layers_or_raise(model).values(), name)


def add_adapter(model: nn.Module, name: str, weights: Mapping[str, tuple[Tensor, Tensor, float]], *,
                timeout: Optional[float] = None) -> int:
    """Load one adapter into the same slot of every multi-adapter layer; returns the slot.

    ``weights`` maps module names to ``(lora_A [r, in], lora_B [out, r], scaling)`` (a packed
    layer: the layouts of :meth:`MultiLoRALinear.add_adapter`; a ``MultiLoRAExperts``:
    ``({parameter: A [E, r, in]}, {parameter: B [E, out, r]}, scaling)``); layers it does not name hold
    nothing for this adapter. A name already loaded is replaced (hot swap): in place, or, while open ``adapter_batch`` blocks serve it, into
    a free slot, published in every layer at once (those blocks keep the old version).
    Everything is checked before any write.

    With no slot usable while open batches of other threads pin one (a hot swap with every spare
    slot pinned), waits until they exit: ``timeout`` None waits without limit, 0 raises at once,
    a number waits up to that many seconds. The ValueError says how many open batches pin
    slots. It raises at once, whatever ``timeout``, when waiting cannot help: every slot holds
    a loaded adapter (remove one), or only batches this thread opened pin the slots it needs
    (it would wait for itself; from asyncio, add from a worker thread: ``asyncio.to_thread``).
    """
    layers = _layers_or_raise(model)
    if not isinstance(weights, Mapping):
        raise TypeError("weights must be a mapping {module name: (lora_A, lora_B, scaling)}, got "
                        f"{type(weights).__name__}")
    if not weights:
        raise ValueError(f"adapter {name!r}: weights is empty, so it would touch no layer (loading it "
                         "as a hot swap would silently remove the adapter)")
    bad = [m for m, entry in weights.items() if not (isinstance(entry, (tuple, list)) and len(entry) == 3)]
    if bad:
        raise TypeError(f"weights[{bad[0]!r}] must be a (lora_A, lora_B, scaling) tuple, got "
                        f"{type(weights[bad[0]]).__name__}")
    unknown = [m for m in weights if m not in layers]
    if unknown:
        raise ValueError(f"adapter {name!r} has weights for {unknown[:6]}, which are not MultiLoRALinear modules "
                         f"(nor MultiLoRAExperts) of the model (those are e.g. {sorted(layers)[:6]}); "
                         "inject_multi_lora with target_modules (target_parameters for experts) that cover them")
    _shared_max_adapters(layers)
    return install(layers, name, weights, timeout=timeout)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer that holds it (open batches that named it keep
    its weights until they exit)."""
    uninstall(_layers_or_raise(model), name)


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names: Sequence[Optional[str]]) -> Iterator[AdapterRouting]:
    """Route a batch: sequence b of every forward inside uses adapter ``adapter_names[b]``.

    ``None`` (or ``"__base__"``, PEFT's name) means the base model. Every
    ``MultiLoRALinear`` of ``model`` takes its rows' adapters from one plan per
    input shape, built once and shared by all layers. The routing belongs to the
    calling thread / asyncio task (a ContextVar), and the block is bound to the
    adapter versions it named: a hot swap or remove during the block does not
    change what it serves. Nested blocks: the inner one routes the forwards inside
    it; on exit the outer batch is routed again. Yields the :class:`AdapterRouting`
    (``routing.update_(names)`` re-routes it in place, e.g. between CUDA graph replays).
    """
    layers = _layers_or_raise(model)
    routing = AdapterRouting(list(layers.values()), _shared_max_adapters(layers))
    routing.update_(adapter_names)
    try:
        for layer in routing.layers:
            if not layer.batch_routed:
                layer.batch_routed = True
        token = ROUTES.set({**ROUTES.get(), **dict.fromkeys(routing.layer_ids, routing)})
        try:
            yield routing
        finally:
            ROUTES.reset(token)
    finally:
        routing.close_()
