"""Serving (and training) many adapters at once: ``MultiLoRALinear`` and model-level routing.

``MultiLoRALinear`` is an ``nn.Linear`` with named adapter *slots*: stacks
``lora_A`` [max_adapters, max_rank, in] and ``lora_B`` [max_adapters, out, max_rank],
per-slot ``scalings`` and ``ranks``. Adding, replacing (hot swap) or removing
an adapter writes into those buffers in place: nothing is re-allocated, so a
``torch.compile``d model does not recompile and a captured CUDA graph sees it.

Model level: ``inject_multi_lora`` swaps target ``nn.Linear``s for
``MultiLoRALinear``; ``add_adapter`` / ``load_peft_adapter_slot`` put one adapter
into the *same* slot of every layer (``save_peft_adapter_slot`` writes one back); ``adapter_batch(model, names)`` routes one
adapter name per sequence (None = base model) for the forwards inside it, with
one segment plan per batch shape, shared by every layer.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .injection import TargetModules, _set_submodule, find_targets, mark_only_lora_as_trainable
from .layers import lora_scaling
from .multi_ops import apply_multi_lora
from .segments import SegmentPlan, plan_segments
from .validation import check_multi_lora_args, check_positive_int, check_scaling

#: Where a model keeps its one AdapterRouting between adapter_batch blocks.
ROUTING_ATTRIBUTE = "_lora_fused_routing"
#: PEFT's name for "no adapter" in a mixed batch (``adapter_names=["__base__", ...]``).
BASE_NAME = "__base__"


class MultiLoRALinear(nn.Linear):
    """``y[t] = x[t] W0ᵀ + b + s_i · (x[t] A_iᵀ) B_iᵀ`` with adapter i chosen per row.

    The base weight and bias are frozen; ``lora_A`` / ``lora_B`` are parameters
    (one batch can train several adapters: each slot gets the gradient of its
    own rows only). Outside ``adapter_batch`` and without ``adapter_ids`` the
    layer is the base ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, max_adapters: int,
                 max_rank: int, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.max_adapters = check_positive_int(max_adapters, "max_adapters")
        self.max_rank = check_positive_int(max_rank, "max_rank")
        self._slots: dict[str, int] = {}
        self.routing: Optional[AdapterRouting] = None
        self._attach_slots()

    def _attach_slots(self) -> None:
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.zeros(self.max_adapters, self.max_rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.max_adapters, self.out_features, self.max_rank, **factory))
        # Empty slots: rank 1, scaling 0, zero weights (no row should route there; if one does, it adds 0).
        self.register_buffer("scalings", torch.zeros(self.max_adapters, device=self.weight.device))
        self.register_buffer("ranks", torch.ones(self.max_adapters, dtype=torch.int32, device=self.weight.device))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, max_adapters: int, max_rank: int) -> "MultiLoRALinear":
        """Wrap an existing ``nn.Linear``: its weight and bias are reused (not copied) and frozen."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    max_adapters=max_adapters, max_rank=max_rank, device="meta", dtype=linear.weight.dtype)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._attach_slots()  # on the base's device, without a copy of W0
        return layer

    # ------------------------------------------------------------------ slots
    @property
    def adapter_names(self) -> list[str]:
        """Loaded adapters, in slot order."""
        return sorted(self._slots, key=self._slots.get)

    def slot_of(self, name: str) -> int:
        if name not in self._slots:
            raise KeyError(f"no adapter named {name!r}; loaded: {self.adapter_names}")
        return self._slots[name]

    def free_slots(self) -> list[int]:
        used = set(self._slots.values())
        return [i for i in range(self.max_adapters) if i not in used]

    def check_adapter(self, name: str, lora_A: Tensor, lora_B: Tensor, scaling) -> tuple[int, float]:
        """``(rank, scaling)`` of an adapter that fits this layer; ValueError/TypeError otherwise."""
        if not isinstance(name, str) or not name or name == BASE_NAME:
            raise ValueError(f"adapter name must be a non-empty str other than {BASE_NAME!r}, got {name!r}")
        scaling = check_scaling(scaling)
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != self.in_features \
                or lora_B.shape[0] != self.out_features or lora_B.shape[1] != lora_A.shape[0]:
            raise ValueError(f"adapter {name!r}: lora_A must be [r, in_features={self.in_features}] and "
                             f"lora_B [out_features={self.out_features}, r], got {tuple(lora_A.shape)} and "
                             f"{tuple(lora_B.shape)}")
        r = lora_A.shape[0]
        if not 1 <= r <= self.max_rank:
            raise ValueError(f"adapter {name!r} has rank {r} but this layer holds ranks 1..max_rank="
                             f"{self.max_rank} (shapes {tuple(lora_A.shape)}, {tuple(lora_B.shape)})")
        return r, scaling

    @torch.no_grad()
    def add_adapter(self, name: str, lora_A: Tensor, lora_B: Tensor, scaling: float, *,
                    slot: Optional[int] = None) -> int:
        """Load an adapter (A [r, in], B [out, r], r <= max_rank) into a slot; returns the slot.

        A name already loaded is replaced in place (hot swap, same slot). Otherwise
        ``slot`` (default: the first free one) must be free. The slot's padding
        past rank r is zeroed; other slots are untouched.
        """
        r, scaling = self.check_adapter(name, lora_A, lora_B, scaling)
        if name in self._slots:
            if slot is not None and slot != self._slots[name]:
                raise ValueError(f"adapter {name!r} is in slot {self._slots[name]}, not {slot}")
            slot = self._slots[name]
        elif slot is None:
            free = self.free_slots()
            if not free:
                raise ValueError(f"all {self.max_adapters} adapter slots are in use ({self.adapter_names}); "
                                 "remove one or build the layer with a larger max_adapters")
            slot = free[0]
        elif not 0 <= slot < self.max_adapters or slot not in self.free_slots():
            raise ValueError(f"slot {slot} is not a free slot in [0, {self.max_adapters}) "
                             f"(used: {dict(self._slots)})")
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r].copy_(lora_A)
        self.lora_B[slot, :, :r].copy_(lora_B)
        self.scalings[slot] = scaling
        self.ranks[slot] = r
        self._slots[name] = slot
        return slot

    @torch.no_grad()
    def remove_adapter(self, name: str) -> None:
        """Empty the adapter's slot (zeros, rank 1, scaling 0) and forget its name."""
        slot = self.slot_of(name)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scalings[slot] = 0.0
        self.ranks[slot] = 1
        del self._slots[name]

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, adapter_ids: Union[Tensor, SegmentPlan, None] = None) -> Tensor:
        """x [..., in]; ``adapter_ids`` (slot per row, -1 = base) or a plan, else the
        ``adapter_batch`` routing, else the base layer."""
        route = adapter_ids
        if route is None and self.routing is not None:
            route = self.routing.plan_for(x)
        if route is None:
            return F.linear(x, self.weight, self.bias)
        weight, bias, lora_A, lora_B = self.weight, self.bias, self.lora_A, self.lora_B
        if torch.is_autocast_enabled(x.device.type):  # compute in autocast's dtype, as F.linear would
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, lora_A, lora_B = x.to(dtype), weight.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        # The slots' ranks were checked by add_adapter: no host read of them per call.
        check_multi_lora_args(x, weight, lora_A, lora_B, self.scalings, bias, self.ranks)
        return apply_multi_lora(x, weight, lora_A, lora_B, route, self.scalings, bias, self.ranks)

    # The slot names travel with state_dict() (the weights, scalings and ranks already do).
    def get_extra_state(self) -> dict:
        return {"adapter_slots": dict(self._slots)}

    def set_extra_state(self, state: dict) -> None:
        slots = dict(state.get("adapter_slots", {}))
        bad = {n: i for n, i in slots.items() if not (isinstance(i, int) and 0 <= i < self.max_adapters)}
        if bad or len(set(slots.values())) != len(slots):
            raise ValueError(f"state_dict names adapter slots {slots}, not valid for max_adapters="
                             f"{self.max_adapters} (each name its own slot in [0, {self.max_adapters}))")
        self._slots = slots

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, max_adapters={self.max_adapters}, max_rank={self.max_rank}, "
                f"adapters={self.adapter_names}")


# ---------------------------------------------------------------------- model level
def multi_lora_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def inject_multi_lora(model: nn.Module, target_modules: TargetModules, *, max_adapters: int,
                      max_rank: int) -> nn.Module:
    """Replace the targeted ``nn.Linear``s (PEFT's matching rules) with empty ``MultiLoRALinear``s.

    Base weights are reused and frozen; the slot stacks are the only trainable parameters.
    """
    for name in find_targets(model, target_modules):
        _set_submodule(model, name, MultiLoRALinear.from_linear(model.get_submodule(name),
                                                                max_adapters=max_adapters, max_rank=max_rank))
    return mark_only_lora_as_trainable(model)


def _layers_or_raise(model: nn.Module) -> dict[str, MultiLoRALinear]:
    layers = multi_lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MultiLoRALinear; call inject_multi_lora first")
    return layers


def _shared_max_adapters(layers: Mapping[str, MultiLoRALinear]) -> int:
    """The one max_adapters of a model's layers (a plan and a slot index must mean the same in all)."""
    n_slots = {layer.max_adapters for layer in layers.values()}
    if len(n_slots) > 1:
        raise ValueError(f"MultiLoRALinear layers disagree on max_adapters ({sorted(n_slots)})")
    return n_slots.pop()


def model_slot_of(model: nn.Module, name: str) -> int:
    """The slot adapter ``name`` has in every layer of ``model`` (ValueError if they disagree)."""
    slots = {layer._slots[name] for layer in _layers_or_raise(model).values() if name in layer._slots}
    if not slots:
        loaded = sorted({n for layer in multi_lora_layers(model).values() for n in layer._slots})
        raise KeyError(f"no adapter named {name!r} in the model; loaded: {loaded}")
    if len(slots) > 1:
        raise ValueError(f"adapter {name!r} sits in different slots across layers ({sorted(slots)}); "
                         "load it with lf.add_adapter(model, ...) so every layer uses one slot")
    return slots.pop()


def add_adapter(model: nn.Module, name: str,
                weights: Mapping[str, tuple[Tensor, Tensor, float]]) -> int:
    """Load one adapter into the same slot of every ``MultiLoRALinear``; returns the slot.

    ``weights`` maps module names to ``(lora_A [r, in], lora_B [out, r], scaling)``;
    layers it does not name keep that slot empty (the adapter does not touch them).
    A name already loaded is replaced in place. Everything is checked before any write.
    """
    layers = _layers_or_raise(model)
    unknown = [m for m in weights if m not in layers]
    if unknown:
        raise ValueError(f"adapter {name!r} has weights for {unknown[:6]}, which are not MultiLoRALinear "
                         f"modules of the model (those are e.g. {sorted(layers)[:6]}); inject_multi_lora "
                         "with target_modules that cover them")
    max_adapters = _shared_max_adapters(layers)
    if any(name in layer._slots for layer in layers.values()):
        slot = model_slot_of(model, name)
    else:
        free = set.intersection(*(set(layer.free_slots()) for layer in layers.values()))
        if not free:
            raise ValueError(f"no slot is free in every layer (max_adapters={max_adapters}); remove an adapter")
        slot = min(free)
    for module_name, (A, B, scaling) in weights.items():  # validate all before writing any
        try:
            layers[module_name].check_adapter(name, A, B, scaling)
        except (TypeError, ValueError) as e:
            raise type(e)(f"module {module_name!r}: {e}") from None
    for module_name, layer in layers.items():
        if module_name in weights:
            A, B, scaling = weights[module_name]
            layer.add_adapter(name, A, B, scaling, slot=slot)
        elif name in layer._slots:
            layer.remove_adapter(name)  # a replaced adapter that no longer touches this layer
    return slot


def remove_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer that holds it."""
    model_slot_of(model, name)
    for layer in multi_lora_layers(model).values():
        if name in layer._slots:
            layer.remove_adapter(name)


def load_peft_adapter_slot(model: nn.Module, directory, name: str) -> int:
    """Load a PEFT LoRA adapter directory (safetensors only) into slot ``name``; returns the slot.

    Shares its reader and checks with :func:`lora_fused.load_peft_adapter`
    (``read_peft_adapter``); per-module rank and scaling follow the config's
    ``r`` / ``rank_pattern``, ``lora_alpha`` / ``alpha_pattern`` and ``use_rslora``.
    ``lora_dropout`` is a training-time setting the multi-adapter op does not apply.
    """
    from .peft_io import module_lora_settings, read_peft_adapter
    config, tensors = read_peft_adapter(directory)
    weights = {}
    for module_name, (A, B) in tensors.items():
        r, alpha, use_rslora = module_lora_settings(config, module_name)
        weights[module_name] = (A, B, lora_scaling(r, alpha, use_rslora))
    return add_adapter(model, name, weights)


def save_peft_adapter_slot(model: nn.Module, name: str, directory) -> None:
    """Write adapter ``name`` (from every layer that holds it) as a PEFT LoRA adapter directory:
    each layer's ``lora_A[slot, :r]`` / ``lora_B[slot, :, :r]``, its rank, and
    ``lora_alpha = scaling · r`` (so PEFT's alpha / r gives the slot's scaling back).
    ``peft.PeftModel.from_pretrained`` and :func:`load_peft_adapter_slot` load it."""
    from .peft_io import write_peft_adapter
    slot = model_slot_of(model, name)
    entries = {}
    for module_name, layer in multi_lora_layers(model).items():
        if name in layer._slots:
            r, scaling = int(layer.ranks[slot]), float(layer.scalings[slot])
            entries[module_name] = (layer.lora_A[slot, :r], layer.lora_B[slot, :, :r], scaling * r)
    write_peft_adapter(model, directory, entries, use_rslora=False, lora_dropout=0.0)


class AdapterRouting:
    """One adapter id per sequence, and the segment plan for each batch shape seen (shared by all layers).

    A model keeps one routing object; each ``adapter_batch`` refills it (the ids
    in place when the batch size repeats), so a ``torch.compile``d model sees
    the same object and tensor and does not recompile per batch.
    """

    def __init__(self, sequence_ids: Tensor, n_adapters: int) -> None:
        self.sequence_ids = sequence_ids
        self.n_adapters = n_adapters
        self._plans: dict[tuple, SegmentPlan] = {}

    def reset_(self, sequence_ids: Tensor) -> None:
        if sequence_ids.shape == self.sequence_ids.shape and sequence_ids.device == self.sequence_ids.device:
            self.sequence_ids.copy_(sequence_ids)
        else:
            self.sequence_ids = sequence_ids
        self._plans.clear()

    def plan_for(self, x: Tensor) -> SegmentPlan:
        lead = tuple(x.shape[:-1])
        batch = self.sequence_ids.shape[0]
        if not lead or lead[0] != batch:
            raise ValueError(f"adapter_batch was given {batch} adapter names (one per sequence) but a "
                             f"layer got x of shape {tuple(x.shape)}: its first dimension must be the batch")
        compiling = torch.compiler.is_compiling()
        plan = None if compiling else self._plans.get(lead)
        if plan is None:
            ids = self.sequence_ids.reshape(batch, *([1] * (len(lead) - 1))).expand(lead)
            # ids come from slot indices: valid by construction, so no host read to check them
            plan = plan_segments(ids.reshape(-1), self.n_adapters, validate=False)
            if not compiling:  # a traced graph recomputes it (a few tiny ops; no cache to guard on)
                self._plans[lead] = plan
        return plan


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names: Sequence[Optional[str]]) -> Iterator[AdapterRouting]:
    """Route a batch: sequence b of every forward inside uses adapter ``adapter_names[b]``.

    ``None`` (or ``"__base__"``, PEFT's name) means the base model. Every
    ``MultiLoRALinear`` of ``model`` takes its rows' adapters from one plan per
    input shape, built once and shared by all layers.
    """
    layers = _layers_or_raise(model)
    max_adapters = _shared_max_adapters(layers)
    if isinstance(adapter_names, str):
        raise TypeError("adapter_names must be a sequence of names (one per sequence), not a str")
    ids = [-1 if name is None or name == BASE_NAME else model_slot_of(model, name) for name in adapter_names]
    device = next(iter(layers.values())).weight.device
    sequence_ids = torch.tensor(ids, dtype=torch.int64, device=device)
    routing = getattr(model, ROUTING_ATTRIBUTE, None)
    if isinstance(routing, AdapterRouting) and routing.n_adapters == max_adapters:
        routing.reset_(sequence_ids)
    else:
        routing = AdapterRouting(sequence_ids, max_adapters)
        object.__setattr__(model, ROUTING_ATTRIBUTE, routing)  # a plain attribute, not a submodule
    for layer in layers.values():
        layer.routing = routing
    try:
        yield routing
    finally:
        for layer in layers.values():
            layer.routing = None
