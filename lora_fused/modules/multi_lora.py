"""Serving (and training) many adapters at once: ``MultiLoRALinear`` and model-level routing.

``MultiLoRALinear`` is an ``nn.Linear`` with named adapter *slots*: stacks
``lora_A`` [max_adapters, max_rank, in] and ``lora_B`` [max_adapters, out, max_rank],
per-slot ``scalings`` and ``ranks``. A packed projection (one ``qkv_proj`` for q|k|v,
built with ``slices=(w_q, w_k, w_v)``) keeps one A per slice, ``lora_A``
[max_adapters, S, max_rank, in], and one ``lora_B`` [max_adapters, out, max_rank] whose
rows o_j .. o_j+w_j are slice j's B. Adding, replacing (hot swap) or removing
an adapter writes into those buffers in place: nothing is re-allocated, so a
``torch.compile``d model does not recompile and a captured CUDA graph sees it.

Model level: ``inject_multi_lora`` swaps target ``nn.Linear``s for
``MultiLoRALinear``; ``add_adapter`` / ``load_peft_adapter_slot`` put one adapter
into the *same* slot of every layer (``save_peft_adapter_slot`` writes one back;
``load_peft_adapter_slot(..., packed=...)`` maps separate q_proj / k_proj / v_proj
adapters into a packed layer's slices);
``adapter_batch(model, names)`` routes one adapter name per sequence (None = base
model) for the forwards inside it, with one segment plan per batch shape, shared
by every layer.

Concurrency contract (threads and asyncio tasks serving one model):

- Routing belongs to the caller. ``adapter_batch`` stores its routing in a
  ``contextvars.ContextVar`` (keyed by layer), never on the shared modules, so
  each thread and each asyncio task sees only its own batch. Nested blocks:
  the inner batch routes the forwards inside it, and the outer batch is
  restored when it exits (blocks on different models are independent).
- A batch is bound to the adapter *versions* it named. On entry its names are
  resolved to slots and those slots are *pinned* until it exits. A hot swap
  (``add_adapter`` on a loaded name) of a pinned adapter writes the new
  weights into a free slot and publishes the name there in one step under a
  lock; a remove of a pinned adapter only unpublishes it. Open batches keep
  reading the old slot, whose weights are untouched until the last batch that
  pinned it exits (its slot is then free again, reused by a later add). So a
  forward sees all old or all new weights in every layer, never a mix, and a
  row is never served another adapter that took its slot. An unpinned adapter
  is swapped in place. Swapping a pinned adapter needs one free slot; with
  none free, ``add_adapter`` waits (``timeout=``) until open batches of other
  threads exit and free one. Build with one more slot than adapters you load:
  then a swap waits only for batches that pin a retired version, which no new
  batch can pin, so the wait ends (with no spare slot, it waits for a moment when
  no batch serves the adapter, which a steady stream of batches may never leave).
  It never waits for what only the calling thread's own open batches hold (nor,
  in an event loop, its tasks' batches): it raises instead of waiting for itself.
- Cost: one lock acquire at ``adapter_batch`` entry and exit (name lookups,
  O(distinct names x layers)); nothing per layer call beyond a ContextVar
  lookup; no host sync in the forward. Writers hold the lock while they copy
  weights, and on CUDA synchronise the device before and after (streams of
  other threads may still read or soon read the slot).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import threading
import time
import types
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.compiler import is_compiling  # bound once: an attribute lookup less per eager forward

from ..adapters.injection import TargetModules, find_targets, mark_only_lora_as_trainable
from .lora_linear import lora_scaling
from ..ops.delta import check_slices, packed_multi_lora_linear
from ..ops.multi_lora import checked_multi_lora
from ..ops.lora_linear import _any_autocast_enabled, autocast_dtype, cast_all
from ..dispatch.segments import SegmentPlan, plan_segments
from ..validation import check_finite_number, check_positive_int, check_scaling

#: PEFT's name for "no adapter" in a mixed batch (``adapter_names=["__base__", ...]``).
BASE_NAME = "__base__"

#: The routing of the current thread / asyncio task: ``id(layer)`` -> the AdapterRouting of the
#: innermost open ``adapter_batch`` over that layer. A ContextVar: each thread starts empty and each
#: asyncio task works on a copy of its creator's context, so no caller sees another's batch.
_ROUTES: contextvars.ContextVar[Mapping[int, "AdapterRouting"]] = contextvars.ContextVar(
    "lora_fused_routes", default=types.MappingProxyType({}))
#: Guards every layer's name -> slot table and retired slots, and the set of open batches. Held
#: for name lookups at adapter_batch entry/exit and for adapter writes; never during a forward.
_SLOT_LOCK = threading.RLock()
#: Notified (under _SLOT_LOCK) when a slot may have become usable: a batch exited or re-routed
#: (dropping its pins), or an adapter was removed. An add_adapter that found no slot waits on it.
_SLOT_RELEASED = threading.Condition(_SLOT_LOCK)
_OPEN_BATCHES: set["AdapterRouting"] = set()
_LAYERS_WITH_RETIRED: set["MultiLoRALinear"] = set()


class MultiLoRALinear(nn.Linear):
    """``y[t] = x[t] W0ᵀ + b + s_i · (x[t] A_iᵀ) B_iᵀ`` with adapter i chosen per row.

    With ``slices`` (S output widths summing to out_features: a packed projection such as
    q|k|v) each adapter has one A per slice and slice j of y adds
    ``s_i · (x[t] A_{i,j}ᵀ) B_i[o_j:o_j+w_j]ᵀ`` (``lf.multi_lora_linear(..., slices=...)``).

    The base weight and bias are frozen; ``lora_A`` / ``lora_B`` are parameters
    (one batch can train several adapters: each slot gets the gradient of its
    own rows only). Outside ``adapter_batch`` and without ``adapter_ids`` the
    layer is the base ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, max_adapters: int,
                 max_rank: int, slices: Optional[Sequence[int]] = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.max_adapters = check_positive_int(max_adapters, "max_adapters")
        self.max_rank = check_positive_int(max_rank, "max_rank")
        # None: one slice (lora_A [max_adapters, max_rank, in]); else the packed widths.
        self.slices: Optional[tuple[int, ...]] = None
        if slices is not None:
            try:
                self.slices = check_slices(slices, out_features, len(slices) if isinstance(slices, Sequence) else 1)
            except ValueError as e:  # the layer's words: its out_features, not lora_B / y
                raise ValueError(f"slices {slices!r} must be positive output widths summing to out_features="
                                 f"{out_features}: {e}") from None
        self._slots: dict[str, int] = {}
        # Slots that held a replaced or removed adapter still pinned by an open adapter_batch:
        # neither named nor free until the last batch that pinned them exits.
        self._retired: set[int] = set()
        # Set (once, never reset) by the first adapter_batch over this layer: a torch.compile'd
        # forward then reads its routing through routed_sequence_ids (one guard, one recompile).
        self._serving = False
        self._attach_slots()

    def _attach_slots(self) -> None:
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        packed = () if self.slices is None else (len(self.slices),)
        self.lora_A = nn.Parameter(torch.zeros(self.max_adapters, *packed, self.max_rank, self.in_features,
                                               **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.max_adapters, self.out_features, self.max_rank, **factory))
        # Empty slots: rank 1, scaling 0, zero weights (no row should route there; if one does, it adds 0).
        self.register_buffer("scalings", torch.zeros(self.max_adapters, device=self.weight.device))
        self.register_buffer("ranks", torch.ones(self.max_adapters, dtype=torch.int32, device=self.weight.device))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, max_adapters: int, max_rank: int,
                    slices: Optional[Sequence[int]] = None) -> "MultiLoRALinear":
        """Wrap an existing ``nn.Linear``: its weight and bias are reused (not copied) and frozen.
        ``slices``: the output widths of a packed projection (e.g. ``(q, k, v)`` of a ``qkv_proj``),
        summing to ``linear.out_features``; each adapter then has one A per slice."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    max_adapters=max_adapters, max_rank=max_rank, slices=slices, device="meta",
                    dtype=linear.weight.dtype)
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
        """Slots holding no adapter (neither a loaded one nor a retired one an open batch still reads)."""
        used = set(self._slots.values()) | self._retired
        return [i for i in range(self.max_adapters) if i not in used]

    def slot_tensors(self, name: str, lora_A, lora_B) -> tuple:
        """A packed layer's per-slice A / B given as sequences, stacked to the slot layout:
        S tensors [r, in] -> lora_A [S, r, in]; S tensors [w_j, r] -> lora_B [out, r] (rows of slice
        j at o_j). Tensors, and any adapter of an unpacked layer, are returned as they are."""
        if self.slices is None:
            return lora_A, lora_B
        parts = []
        for arg, value, join in (("lora_A", lora_A, torch.stack), ("lora_B", lora_B, torch.cat)):
            if isinstance(value, (list, tuple)):
                if len(value) != len(self.slices) or not all(isinstance(v, Tensor) and v.dim() == 2 for v in value):
                    raise ValueError(f"adapter {name!r}: {arg} given as a sequence must hold one 2-D tensor per "
                                     f"slice (slices={self.slices}), got {len(value)} items")
                shapes = [tuple(v.shape) for v in value]
                # one rank for all slices: A's shapes all equal, B's widths the slices and one rank
                if arg == "lora_A":
                    bad = len(set(shapes)) != 1
                else:
                    bad = [w for w, _ in shapes] != list(self.slices) or len({r for _, r in shapes}) != 1
                if bad:
                    want = "[r, in] each, one r" if arg == "lora_A" else "[w_j, r] with w_j = slices[j], one r"
                    raise ValueError(f"adapter {name!r}: the slices' {arg} must be {want}, got shapes {shapes} "
                                     f"(slices={self.slices})")
                value = join(list(value))
            parts.append(value)
        return tuple(parts)

    def check_adapter(self, name: str, lora_A: Tensor, lora_B: Tensor, scaling) -> tuple[int, float]:
        """``(rank, scaling)`` of an adapter that fits this layer; ValueError/TypeError otherwise."""
        if not isinstance(name, str):
            raise TypeError(f"adapter name must be a str, got {type(name).__name__} ({name!r})")
        if not name or name == BASE_NAME:
            raise ValueError(f"adapter name must be a non-empty str other than {BASE_NAME!r}, got {name!r}")
        for arg, value in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(value, Tensor):
                raise TypeError(f"adapter {name!r}: {arg} must be a torch.Tensor, got {type(value).__name__}")
        scaling = check_scaling(scaling)
        if self.slices is not None:
            S = len(self.slices)
            if lora_A.dim() != 3 or lora_A.shape[0] != S or lora_A.shape[2] != self.in_features \
                    or lora_B.dim() != 2 or lora_B.shape[0] != self.out_features or lora_B.shape[1] != lora_A.shape[1]:
                raise ValueError(f"adapter {name!r}: this layer is packed (slices={self.slices}), so lora_A must be "
                                 f"[S={S}, r, in_features={self.in_features}] (or S tensors [r, in]) and lora_B "
                                 f"[out_features={self.out_features}, r] (or S tensors [w_j, r], w_j = slices[j]), "
                                 f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
        elif lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != self.in_features \
                or lora_B.shape[0] != self.out_features or lora_B.shape[1] != lora_A.shape[0]:
            raise ValueError(f"adapter {name!r}: lora_A must be [r, in_features={self.in_features}] and "
                             f"lora_B [out_features={self.out_features}, r], got {tuple(lora_A.shape)} and "
                             f"{tuple(lora_B.shape)}")
        r = lora_A.shape[-2]
        if not 1 <= r <= self.max_rank:
            raise ValueError(f"adapter {name!r} has rank {r} but this layer holds ranks 1..max_rank="
                             f"{self.max_rank} (shapes {tuple(lora_A.shape)}, {tuple(lora_B.shape)})")
        return r, scaling

    def add_adapter(self, name: str, lora_A: Tensor, lora_B: Tensor, scaling: float, *,
                    slot: Optional[int] = None, timeout: Optional[float] = None) -> int:
        """Load an adapter (A [r, in], B [out, r], r <= max_rank) into a slot; returns the slot.

        A packed layer (``slices`` set) takes lora_A [S, r, in] (slice j's A at [j]) or a
        sequence of S tensors [r, in], and lora_B [out, r] (slice j's B in rows o_j .. o_j+w_j)
        or a sequence of S tensors [w_j, r]: one rank r and one scaling for all slices (a
        slice the adapter does not adapt is given zeros).

        A name already loaded is replaced (hot swap): in place, or, while an open
        ``adapter_batch`` pins it, into a free slot (the open batches keep the old
        weights until they exit). Otherwise ``slot`` (default: the first free one)
        must be free. The slot's padding past rank r is zeroed; other slots are untouched.
        With no slot usable while open batches pin one, waits as :func:`add_adapter` (``timeout``).
        """
        return _install({"": self}, name, {"": (lora_A, lora_B, scaling)}, slot=slot, timeout=timeout)

    def remove_adapter(self, name: str) -> None:
        """Forget the adapter's name and empty its slot (zeros, rank 1, scaling 0); while an open
        ``adapter_batch`` pins the slot, it is emptied when reused, after that batch exits."""
        _uninstall({"": self}, name)

    @torch.no_grad()
    def _write_slot(self, slot: int, lora_A: Optional[Tensor] = None, lora_B: Optional[Tensor] = None,
                    scaling: float = 0.0) -> None:
        """Slot ``slot`` := the adapter (A, B, scaling), or empty (zeros, rank 1, scaling 0)."""
        r = 1 if lora_A is None else lora_A.shape[-2]
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if lora_A is not None:
            self.lora_A[slot, ..., :r, :].copy_(lora_A)
            self.lora_B[slot, :, :r].copy_(lora_B)
        self.scalings[slot] = scaling
        self.ranks[slot] = r

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, adapter_ids: Union[Tensor, SegmentPlan, None] = None) -> Tensor:
        """x [..., in]; ``adapter_ids`` (slot per row, -1 = base) or a plan, else the
        routing of the caller's open ``adapter_batch``, else the base layer."""
        route = adapter_ids
        if route is None:
            if is_compiling():
                if self._serving:  # the routing is read when the graph runs, not when it is traced
                    route = self._traced_plan(x)
            else:
                routing = _ROUTES.get().get(id(self))
                if routing is not None:
                    route = routing.plan_for(x)
            if route is None:
                return F.linear(x, self.weight, self.bias)
        # Straight from the dicts (Module.__getattr__ costs ~0.5 µs a name); a name moved
        # elsewhere (a parametrization, say) takes the attribute route.
        params, buffers = self._parameters, self._buffers
        try:
            weight, bias, lora_A, lora_B = params["weight"], params["bias"], params["lora_A"], params["lora_B"]
            scalings, ranks = buffers["scalings"], buffers["ranks"]
        except KeyError:
            weight, bias, lora_A, lora_B = self.weight, self.bias, self.lora_A, self.lora_B
            scalings, ranks = self.scalings, self.ranks
        if _any_autocast_enabled():  # one call; then autocast's dtype for x's device, as F.linear would
            dtype = autocast_dtype(x)
            if dtype is not None:
                x, weight, bias, lora_A, lora_B = cast_all(dtype, x, weight, bias, lora_A, lora_B)
        if self.slices is not None:  # one A per slice: the packed op (checks its arguments per call)
            return packed_multi_lora_linear(x, weight, lora_A, lora_B, route, scalings, bias, ranks=ranks,
                                            slices=self.slices)
        # The slots' ranks were checked by add_adapter: no host read of them per call.
        return checked_multi_lora(x, weight, lora_A, lora_B, route, scalings, bias, ranks, False)

    def _traced_plan(self, x: Tensor) -> SegmentPlan:
        """Under torch.compile: the plan built in the graph from the ids the op reads at run time
        (a new batch, a hot swap or a new adapter changes tensor values only: no recompile)."""
        _check_batch_dim(x, None)
        ids = torch.ops.lora_fused.routed_sequence_ids(x.detach(), id(self))
        return plan_segments(_row_ids(ids, x), self.max_adapters, validate=False)

    # The slot names travel with state_dict() (the weights, scalings and ranks already do), as a
    # tensor: safetensors (save_pretrained, Trainer checkpoints) stores tensors only.
    def get_extra_state(self) -> Tensor:
        """The name -> slot table, as the UTF-8 bytes of a JSON object in a uint8 tensor."""
        return torch.tensor(list(json.dumps(self._slots).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        slots = _decode_slot_table(state)
        bad = {n: i for n, i in slots.items() if not (isinstance(i, int) and 0 <= i < self.max_adapters)}
        if bad or len(set(slots.values())) != len(slots):
            raise ValueError(f"state_dict names adapter slots {slots}, not valid for max_adapters="
                             f"{self.max_adapters} (each name its own slot in [0, {self.max_adapters}))")
        with _SLOT_LOCK:
            self._slots = slots
            self._retired = set()
            _LAYERS_WITH_RETIRED.discard(self)

    def extra_repr(self) -> str:
        packed = "" if self.slices is None else f", slices={self.slices}"
        return (f"{super().extra_repr()}, max_adapters={self.max_adapters}, max_rank={self.max_rank}{packed}, "
                f"adapters={self.adapter_names}")


def _decode_slot_table(state) -> dict:
    """``{name: slot}`` from a MultiLoRALinear extra-state entry: the uint8 tensor of JSON bytes,
    or the dict ``{"adapter_slots": {...}}`` of checkpoints saved before the entry was a tensor."""
    if isinstance(state, dict):
        return dict(state.get("adapter_slots", {}))
    if isinstance(state, Tensor) and state.dtype == torch.uint8 and state.dim() == 1:
        try:
            slots = json.loads(bytes(state.tolist()).decode())
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            slots = None
        if isinstance(slots, dict):
            return slots
    raise ValueError(f"a MultiLoRALinear extra state must be the uint8 tensor of its slot table's JSON "
                     f"(get_extra_state), got {type(state).__name__} {getattr(state, 'dtype', '')} "
                     f"{tuple(getattr(state, 'shape', ()))}")


# ---------------------------------------------------------------------- routing
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
    routing = _ROUTES.get().get(layer_key)
    if routing is None:
        return torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
    if routing._closed:
        raise _exited_error()
    _check_batch_dim(x, routing.sequence_ids.shape[0])
    return routing.sequence_ids.clone()


@routed_sequence_ids.register_fake
def _(x, layer_key):
    return x.new_empty((x.shape[0],), dtype=torch.int64)


class AdapterRouting:
    """One ``adapter_batch``: the slot of each sequence, the slots it pins, and one segment plan per
    input shape (built on the first layer's call, shared by every layer of the batch).

    Owned by the caller's context, never stored on a module. ``update_(names)`` re-routes the
    same object for the next forward: same batch size, so ``sequence_ids`` and every cached plan
    are refilled in place, which is how a captured CUDA graph (capture and replay inside the
    block) gets its next batch's routing.
    """

    def __init__(self, layers: Sequence[MultiLoRALinear], n_adapters: int) -> None:
        self.layers = tuple(layers)
        self.layer_ids = frozenset(id(layer) for layer in self.layers)
        self.n_adapters = n_adapters
        self.device = self.layers[0].weight.device
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
        with _SLOT_LOCK:
            slot_of = {n: _model_slot(self.layers, n) for n in set(names) if n is not None}
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
            rerouted = bool(self.slots)  # the previous names' slots may be unpinned now
            self.slots = frozenset(slot_of.values())
            _OPEN_BATCHES.add(self)
            _free_retired_slots()
            if rerouted:
                _SLOT_RELEASED.notify_all()
        return self

    def close_(self) -> None:
        """Unpin this batch's slots (a retired slot no open batch pins becomes free)."""
        with _SLOT_LOCK:
            self._closed = True
            _OPEN_BATCHES.discard(self)
            _free_retired_slots()
            if self.slots:
                _SLOT_RELEASED.notify_all()  # an add_adapter waiting for a slot looks again

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


def _open_batches_over(layers: Iterable[MultiLoRALinear]) -> list[AdapterRouting]:
    """The open adapter_batch blocks that route any of ``layers`` (under _SLOT_LOCK)."""
    ids = {id(layer) for layer in layers}
    return [batch for batch in _OPEN_BATCHES if not batch.layer_ids.isdisjoint(ids)]


def _pinned_slots(layers: Iterable[MultiLoRALinear], *, thread_id: Optional[int] = None) -> set[int]:
    """Slots of ``layers`` that an open adapter_batch reads (only batches opened by thread
    ``thread_id``, when given; under _SLOT_LOCK)."""
    return set().union(*(batch.slots for batch in _open_batches_over(layers)
                         if thread_id is None or batch.thread_id == thread_id))


def _free_retired_slots() -> None:
    """Retired slots that no open batch pins become free (under _SLOT_LOCK). Their old weights stay
    until the slot is reused: every write clears the slot first, and no name routes to it."""
    for layer in list(_LAYERS_WITH_RETIRED):
        layer._retired &= _pinned_slots([layer])
        if not layer._retired:
            _LAYERS_WITH_RETIRED.discard(layer)


def _device_barrier(layers: Iterable[MultiLoRALinear]) -> None:
    """Before and after a slot write on CUDA: kernels of other streams (other threads) may still read
    the slot, or start reading it, so the writer waits for the device (writes are rare; forwards
    never wait)."""
    for device in {layer.lora_A.device for layer in layers if layer.lora_A.is_cuda}:
        torch.cuda.synchronize(device)


def _model_slot(layers: Iterable[MultiLoRALinear], name: str, *, required: bool = True) -> Optional[int]:
    """The one slot ``name`` has in every layer that holds it (KeyError if none, when required)."""
    layers = list(layers)
    slots = {layer._slots[name] for layer in layers if name in layer._slots}
    if not slots:
        if not required:
            return None
        loaded = sorted({n for layer in layers for n in layer._slots})
        raise KeyError(f"no adapter named {name!r} in the model; loaded: {loaded}")
    if len(slots) > 1:
        raise ValueError(f"adapter {name!r} sits in different slots across layers ({sorted(slots)}); "
                         "load it with lf.add_adapter(model, ...) so every layer uses one slot")
    return slots.pop()


def _check_timeout(timeout) -> Optional[float]:
    if timeout is None:
        return None
    timeout = check_finite_number(timeout, "timeout")
    if timeout < 0:
        raise ValueError(f"timeout must be None (wait without limit) or seconds >= 0, got timeout={timeout}")
    return timeout


def _usable_slot(layers: Mapping[str, MultiLoRALinear], old: Optional[int], slot: Optional[int],
                 pinned: set[int]) -> Optional[int]:
    """The slot to write an adapter now in slot ``old`` (None: not loaded) into, or None when none
    is usable now (under _SLOT_LOCK)."""
    if old is not None and old not in pinned:
        return old  # nobody reads it now: swap in place
    free = set.intersection(*(set(layer.free_slots()) for layer in layers.values()))
    if slot is not None:
        return slot if slot in free else None
    return min(free) if free else None


def _no_slot_error(layers: Mapping[str, MultiLoRALinear], name: str, old: Optional[int], slot: Optional[int],
                   pinned: set[int]) -> str:
    """Why no slot is usable now, with how many open batches pin which slots."""
    max_adapters = next(iter(layers.values())).max_adapters
    holders = sum(1 for batch in _open_batches_over(layers.values()) if batch.slots)
    held = f"{holders} open adapter_batch block{'s' * (holders != 1)} pin slots {sorted(pinned)}"
    if slot is not None:
        free = set.intersection(*(set(layer.free_slots()) for layer in layers.values()))
        return f"slot {slot} is not a free slot in [0, {max_adapters}) (free: {sorted(free)}; {held})"
    if old is not None:
        return (f"adapter {name!r} is being served by open adapter_batch blocks and no slot is free for its new "
                f"version (max_adapters={max_adapters}; {held}); swap it after those batches exit (timeout=None "
                "waits for that), or keep one slot spare for hot swaps")
    return (f"all {max_adapters} adapter slots are in use or held by open batches "
            f"({sorted({n for layer in layers.values() for n in layer._slots})}; {held}); remove one or build "
            "the layers with a larger max_adapters")


def _wait_for_slot(layers: Mapping[str, MultiLoRALinear], name: str, slot: Optional[int],
                   timeout: Optional[float]) -> tuple[Optional[int], int]:
    """``(the slot name is in now or None, the slot to write it into)``, under _SLOT_LOCK.

    While no slot is usable, but open batches pin one that this write could take once they exit
    (a retired version, or ``name``'s own slot, swapped in place), waits for them: up to
    ``timeout`` seconds (None: no limit; 0: not at all), the lock released meanwhile. It never
    waits for a remove_adapter, nor for batches that only this thread can exit (it would wait
    for itself). ValueError when no slot comes."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:  # everything is read again after a wait: other writers may have run
        old = _model_slot(layers.values(), name, required=False)
        if old is not None and slot is not None and slot != old:
            raise ValueError(f"adapter {name!r} is in slot {old}, not {slot}")
        pinned = _pinned_slots(layers.values())
        target = _usable_slot(layers, old, slot, pinned)
        if target is not None:
            return old, target
        named = {i for layer in layers.values() for n, i in layer._slots.items() if n != name}
        awaited = pinned - named if slot is None else (pinned - named) & {slot}
        error = _no_slot_error(layers, name, old, slot, pinned)
        if not awaited or timeout == 0:
            raise ValueError(error)
        if awaited <= _pinned_slots(layers.values(), thread_id=threading.get_ident()):
            raise ValueError(f"{error}. Not waiting: this thread opened the batches that pin slots "
                             f"{sorted(awaited)}, and it would wait for itself; exit them first, or add from "
                             "another thread (from asyncio: await asyncio.to_thread(lf.add_adapter, ...))")
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise ValueError(f"{error} (waited timeout={timeout} s for open batches to exit)")
        _SLOT_RELEASED.wait(remaining)


def _install(layers: Mapping[str, MultiLoRALinear], name: str,
             weights: Mapping[str, tuple[Tensor, Tensor, float]], *, slot: Optional[int] = None,
             timeout: Optional[float] = None) -> int:
    """Write adapter ``name`` into one slot of every layer and publish it there, atomically for
    every open batch (under _SLOT_LOCK; waiting for a slot as :func:`_wait_for_slot`). ``weights``
    maps module names to (A, B, scaling); layers it does not name hold nothing for ``name``.
    Returns the slot."""
    timeout = _check_timeout(timeout)
    checked = {}
    for module_name, (A, B, scaling) in weights.items():  # validate all before writing any
        try:
            A, B = layers[module_name].slot_tensors(name, A, B)
            _, scaling = layers[module_name].check_adapter(name, A, B, scaling)
        except (TypeError, ValueError) as e:
            raise type(e)(f"module {module_name!r}: {e}" if module_name else str(e)) from None
        checked[module_name] = (A, B, scaling)
    with _SLOT_LOCK:
        old, target = _wait_for_slot(layers, name, slot, timeout)
        _device_barrier(layers.values())
        for module_name, layer in layers.items():
            if module_name in checked:
                layer._write_slot(target, *checked[module_name])
            elif layer._slots.get(name) == target or target in layer.free_slots():
                layer._write_slot(target)  # dropped from this layer, or a reused slot's freed old version
            if old is not None and old != target and layer._slots.get(name) == old:
                layer._retired.add(old)  # open batches still read it
                _LAYERS_WITH_RETIRED.add(layer)
            if module_name in checked:
                layer._slots[name] = target
            else:
                layer._slots.pop(name, None)
        _device_barrier(layers.values())
    return target


def _uninstall(layers: Mapping[str, MultiLoRALinear], name: str) -> None:
    """Unpublish ``name`` from every layer; empty its slot now, or retire it while batches read it."""
    with _SLOT_LOCK:
        slot = _model_slot(layers.values(), name)
        pinned = slot in _pinned_slots(layers.values())
        if not pinned:
            _device_barrier(layers.values())
        for layer in layers.values():
            if layer._slots.get(name) == slot:
                del layer._slots[name]
                if pinned:
                    layer._retired.add(slot)
                    _LAYERS_WITH_RETIRED.add(layer)
                else:
                    layer._write_slot(slot)
        if not pinned:
            _device_barrier(layers.values())
            _SLOT_RELEASED.notify_all()  # its slot is free: an add_adapter waiting for one looks again


# ---------------------------------------------------------------------- model level
def multi_lora_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def inject_multi_lora(model: nn.Module, target_modules: TargetModules, *, max_adapters: int,
                      max_rank: int, slices: Optional[Mapping[str, Sequence[int]]] = None) -> nn.Module:
    """Replace the targeted ``nn.Linear``s (PEFT's matching rules) with empty ``MultiLoRALinear``s.

    Base weights are reused and frozen; the slot stacks are the only trainable parameters.
    ``slices`` maps a target's last name to its packed output widths (e.g.
    ``{"qkv_proj": (q, k, v)}``): those layers are built packed (``from_linear(..., slices=)``).
    """
    if slices is not None and not isinstance(slices, Mapping):
        raise TypeError(f"slices must be a mapping {{last module name: output widths}}, got {type(slices).__name__}")
    names = find_targets(model, target_modules)
    unused = sorted(set(slices or ()) - {name.rpartition(".")[2] for name in names})
    if unused:
        raise ValueError(f"slices names {unused}, which is the last name of no target (targets are e.g. "
                         f"{names[:4]}): add them to target_modules")
    for name in names:
        widths = None if slices is None else slices.get(name.rpartition(".")[2])
        model.set_submodule(name, MultiLoRALinear.from_linear(model.get_submodule(name), max_adapters=max_adapters,
                                                              max_rank=max_rank, slices=widths))
    return mark_only_lora_as_trainable(model)


def _layers_or_raise(model: nn.Module) -> dict[str, MultiLoRALinear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
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
    with _SLOT_LOCK:
        return _model_slot(_layers_or_raise(model).values(), name)


def add_adapter(model: nn.Module, name: str, weights: Mapping[str, tuple[Tensor, Tensor, float]], *,
                timeout: Optional[float] = None) -> int:
    """Load one adapter into the same slot of every ``MultiLoRALinear``; returns the slot.

    ``weights`` maps module names to ``(lora_A [r, in], lora_B [out, r], scaling)`` (a packed
    layer: the layouts of :meth:`MultiLoRALinear.add_adapter`); layers it does not name hold
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
        raise ValueError(f"adapter {name!r} has weights for {unknown[:6]}, which are not MultiLoRALinear "
                         f"modules of the model (those are e.g. {sorted(layers)[:6]}); inject_multi_lora "
                         "with target_modules that cover them")
    _shared_max_adapters(layers)
    return _install(layers, name, weights, timeout=timeout)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer that holds it (open batches that named it keep
    its weights until they exit)."""
    _uninstall(_layers_or_raise(model), name)


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

    ``timeout``: how long to wait for a slot, as :func:`add_adapter` (None: no limit).
    """
    from ..adapters.peft_config import module_lora_settings
    from ..adapters.peft_read import check_peft_targets, read_peft_adapter_with_keys
    config, tensors, keys = read_peft_adapter_with_keys(directory)
    if config["use_dora"]:
        raise ValueError(f"{directory!r} is a DoRA adapter (use_dora): multi-adapter slots serve plain LoRA "
                         "only (DoRA rescales each output column by its own magnitude / norm); load it with "
                         "lf.load_peft_adapter into a single-adapter model instead")
    weights = {}
    if packed is not None:
        tensors = dict(tensors)  # the packed slices' modules are taken out; the rest load as usual
        weights = _packed_peft_weights(model, config, tensors, _check_packed(packed), directory)
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
    from ..adapters.peft_config import module_lora_settings
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
    ``target_modules``, for the unpacked model. Without ``packed``, a packed layer raises."""
    from ..adapters.peft_write import target_modules_for, write_peft_adapter
    packed = None if packed is None else _check_packed(packed)
    with _SLOT_LOCK:  # one consistent version of the adapter
        slot = model_slot_of(model, name)
        entries, unpacked = {}, []
        for module_name, layer in multi_lora_layers(model).items():
            if name not in layer._slots:
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
    write_peft_adapter(model, directory, entries, use_rslora=False, lora_dropout=0.0, target_modules=targets)


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
            if not layer._serving:
                layer._serving = True
        token = _ROUTES.set({**_ROUTES.get(), **dict.fromkeys(routing.layer_ids, routing)})
        try:
            yield routing
        finally:
            _ROUTES.reset(token)
    finally:
        routing.close_()
