"""Routing: which slot each row of a ``MultiLoRALinear`` forward reads, per caller.

In short (the contract in full: docs/serving.md, "The concurrency contract"):

- Routing belongs to the caller. ``adapter_batch`` keeps its :class:`AdapterRouting` in the
  ContextVar :data:`ROUTES` (keyed by layer), never on the shared modules, so each thread and
  each asyncio task sees only its own batch. A nested block routes the forwards inside it and
  the outer batch is routed again when it exits; blocks on different models are independent.
- A batch is bound to the adapter *versions* it named: on entry its names are resolved to
  slots, pinned (``lora_fused.serving.slots``) until it exits.
- Cost: one lock acquire at ``adapter_batch`` entry and exit (name lookups, O(distinct names
  x layers)); per layer call one ContextVar lookup and one dict lookup of the plan, no lock,
  no host sync.
- ``torch.compile``: a compiled forward reads the routing when the graph runs, through the
  opaque op ``lora_fused::routed_sequence_ids`` (:func:`traced_plan`), so a new batch, a hot
  swap or a new adapter changes tensor values only.

An :class:`AdapterRouting` works on any layer objects with ``scalings`` (its device holds the
routing's tensors) and ``adapter_slots`` ({name: slot}, read under the slot lock).
"""
from __future__ import annotations

import contextvars
import threading
import types
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..dispatch.segments import SegmentPlan, plan_segments
from .slots import BASE_NAME, SLOT_LOCK, model_slot, pin, unpin

#: The routing of the current thread / asyncio task: ``id(layer)`` -> the AdapterRouting of the
#: innermost open ``adapter_batch`` over that layer. A ContextVar: each thread starts empty and each
#: asyncio task works on a copy of its creator's context, so no caller sees another's batch.
ROUTES: contextvars.ContextVar[Mapping[int, "AdapterRouting"]] = contextvars.ContextVar(
    "lora_fused_routes", default=types.MappingProxyType({}))


def _check_batch_dim(x: Tensor, batch: Optional[int]) -> None:
    if x.dim() < 2 or (batch is not None and x.shape[0] != batch):
        seen = "" if batch is None else f"{batch} adapter names (one per sequence) but "
        raise ValueError(f"adapter_batch was given {seen}a layer got x of shape {tuple(x.shape)}: "
                         "its first dimension must be the batch ([batch, ..., in_features])")


def _row_ids(sequence_ids: Tensor, x: Tensor) -> Tensor:
    """Each row's slot: sequence b's id repeated over x's other leading dims, flattened."""
    lead = tuple(x.shape[:-1])
    return sequence_ids.reshape(lead[0], *([1] * (len(lead) - 1))).expand(lead).reshape(-1)


def _routed_ids_tags() -> tuple:
    # The op's Python body picks the caller's routing; a CUDA graph would freeze its first answer.
    tag = getattr(torch._C.Tag, "cudagraph_unsafe", None)
    return (tag,) if tag is not None else ()


@torch.library.custom_op("lora_fused::routed_sequence_ids", mutates_args=(), tags=_routed_ids_tags())
def routed_sequence_ids(x: Tensor, layer_key: int) -> Tensor:
    """Slot per sequence (x's first dim) of the caller's open adapter_batch over the layer whose
    ``id()`` is ``layer_key``; -1 (base) for every sequence when none is open. An opaque op, so
    a compiled graph reads the ContextVar each run instead of baking one batch in."""
    routing = ROUTES.get().get(layer_key)
    if routing is None:
        return torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
    if routing._closed:
        raise _exited_error()
    _check_batch_dim(x, routing.sequence_ids.shape[0])
    return routing.sequence_ids.clone()


@routed_sequence_ids.register_fake
def _(x, layer_key):
    return x.new_empty((x.shape[0],), dtype=torch.int64)


def traced_plan(x: Tensor, layer_key: int, n_adapters: int) -> SegmentPlan:
    """Under torch.compile: the plan of the layer whose ``id()`` is ``layer_key``, built in the
    graph from the ids the op reads at run time (a new batch, a hot swap or a new adapter changes
    tensor values only: no recompile)."""
    _check_batch_dim(x, None)
    ids = torch.ops.lora_fused.routed_sequence_ids(x.detach(), layer_key)
    return plan_segments(_row_ids(ids, x), n_adapters, validate=False)


class AdapterRouting:
    """One ``adapter_batch``: the slot of each sequence, the slots it pins, and one segment plan per
    input shape (built on the first layer's call, shared by every layer of the batch).

    Owned by the caller's context, never stored on a module. ``update_(names)`` re-routes the
    same object for the next forward: same batch size, so ``sequence_ids`` and every cached plan
    are refilled in place, which is how a captured CUDA graph (capture and replay inside the
    block) gets its next batch's routing.
    """

    def __init__(self, layers: Sequence, n_adapters: int) -> None:
        self.layers = tuple(layers)
        self.layer_ids = frozenset(id(layer) for layer in self.layers)
        self.n_adapters = n_adapters
        self.device = self.layers[0].scalings.device
        self.sequence_ids: Optional[Tensor] = None
        self.slots: frozenset[int] = frozenset()  # pinned while the batch is open
        # The thread that opens the batch exits it (the ContextVar token resets only there), so an
        # add_adapter waiting in that thread for these slots would wait for itself.
        self.thread_id = threading.get_ident()
        self._plans: dict[tuple, SegmentPlan] = {}
        # The same plans by x's whole shape (one entry per layer width): the per-call lookup
        # then slices nothing (x.shape[:-1] builds a new Size: ~1 µs a layer call in place).
        self._plans_by_shape: dict[torch.Size, SegmentPlan] = {}
        self._closed = False

    def update_(self, adapter_names: Sequence[Optional[str]]) -> "AdapterRouting":
        """Route the following forwards to ``adapter_names`` and pin their slots (the batch's own
        previous slots are unpinned). A new batch size re-allocates the ids and drops the plans."""
        names = _check_names(adapter_names)
        if self._closed:  # re-opening would pin its slots with nobody left to unpin them
            raise _exited_error()
        with SLOT_LOCK:
            slot_of = {n: model_slot(self.layers, n) for n in set(names) if n is not None}
            ids = [-1 if n is None else slot_of[n] for n in names]
            sequence_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
            if self.sequence_ids is not None and self.sequence_ids.shape == sequence_ids.shape:
                self.sequence_ids.copy_(sequence_ids)
                for lead, plan in self._plans.items():
                    plan.update_(_row_ids(self.sequence_ids, self.sequence_ids.new_empty(*lead, 1)),
                                 validate=False)
            else:
                self.sequence_ids = sequence_ids
                self._plans = {}
                self._plans_by_shape = {}
            released = bool(self.slots)  # the previous names' slots may be unpinned now
            self.slots = frozenset(slot_of.values())
            pin(self, released)
        return self

    def close_(self) -> None:
        """Unpin this batch's slots (a retired slot no open batch pins becomes free)."""
        with SLOT_LOCK:
            self._closed = True
            unpin(self)

    def plan_for(self, x: Tensor) -> SegmentPlan:
        """The plan for input ``x`` [batch, ..., in] (cached per leading shape; eager mode)."""
        if self._closed:
            raise _exited_error()
        plan = self._plans_by_shape.get(x.shape)
        if plan is None:
            lead = tuple(x.shape[:-1])
            plan = self._plans.get(lead)
            if plan is None:
                _check_batch_dim(x, self.sequence_ids.shape[0])
                # ids come from slot indices: valid by construction, so no host read to check them
                plan = plan_segments(_row_ids(self.sequence_ids, x), self.n_adapters, validate=False)
                self._plans[lead] = plan
            self._plans_by_shape[x.shape] = plan
        return plan


def _exited_error() -> RuntimeError:
    # e.g. an asyncio task created inside the block (it inherits the context) still running after it
    return RuntimeError("this adapter_batch has exited (its slots are no longer pinned): open a new "
                        "adapter_batch to route another batch, in the task or thread that runs the forward")


def _check_names(adapter_names) -> list[Optional[str]]:
    """adapter_names as a list, ``None`` for the base model (PEFT's ``"__base__"`` too)."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError("adapter_names must be a sequence of names (one per sequence), got "
                        f"{type(adapter_names).__name__}")
    bad = [n for n in adapter_names if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"adapter_names must hold str or None, got {bad[:4]}")
    return [None if n is None or n == BASE_NAME else n for n in adapter_names]
