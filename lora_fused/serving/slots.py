"""Slot lifetime of ``MultiLoRALinear`` layers: which adapter name is published in which slot,
the slots open ``adapter_batch`` blocks pin, install (add, hot swap) and uninstall (remove),
and the wait for a slot. The contract, in full: docs/serving.md ("The concurrency contract").

In short:

- A batch pins the slots its names resolved to, until it exits (:func:`pin` / :func:`unpin`).
- :func:`install` of a pinned adapter (a hot swap) writes the new weights into a free slot
  and publishes the name there in every layer in one step under ``SLOT_LOCK``; the old slot
  is *retired*: neither named nor free, its weights untouched, until the last batch that
  pinned it exits. :func:`uninstall` of a pinned adapter only unpublishes it. An unpinned
  adapter is swapped in place.
- With no slot usable, :func:`install` waits on ``SLOT_RELEASED`` (``timeout=``) for open
  batches of other threads to exit; never for batches only the calling thread can exit.
- Writers hold ``SLOT_LOCK`` while they copy weights and, on CUDA, synchronise the device
  before and after; forwards never take the lock.

A layer here is any object with ``max_adapters``, ``adapter_slots`` ({name: slot}, the
published names), ``retired_slots`` (a set), ``scalings`` (a tensor on the layer's device) and
the methods ``free_slots()``, ``slot_tensors()``, ``check_adapter()`` and ``write_slot()`` of
``MultiLoRALinear`` and ``MultiLoRAExperts`` (the slot table's part: :class:`AdapterSlots`); a
batch any object with ``slots`` (the frozenset it pins), ``layer_ids``
(the ``id()`` of the layers it routes) and ``thread_id`` (the thread that exits it).
"""
from __future__ import annotations

import json
import threading
import time
from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor

from ..validation import check_finite_number

#: Guards every layer's name -> slot table and retired slots, and the set of open batches. Held
#: for name lookups at adapter_batch entry/exit and for adapter writes; never during a forward.
SLOT_LOCK = threading.RLock()
#: Notified (under SLOT_LOCK) when a slot may have become usable: a batch exited or re-routed
#: (dropping its pins), or an adapter was removed. An install that found no slot waits on it.
SLOT_RELEASED = threading.Condition(SLOT_LOCK)
#: PEFT's name for "no adapter" in a mixed batch (``adapter_names=["__base__", ...]``).
BASE_NAME = "__base__"
_OPEN_BATCHES: set = set()
_LAYERS_WITH_RETIRED: set = set()


# ---------------------------------------------------------------------- pins
def pin(batch, released: bool) -> None:
    """``batch`` is open and pins ``batch.slots`` (under SLOT_LOCK). ``released``: it pinned
    other slots before (a re-route), which may be free now."""
    _OPEN_BATCHES.add(batch)
    _free_retired_slots()
    if released:
        SLOT_RELEASED.notify_all()


def unpin(batch) -> None:
    """``batch`` exited: its slots are no longer pinned by it (under SLOT_LOCK); a retired slot
    no open batch pins becomes free."""
    _OPEN_BATCHES.discard(batch)
    _free_retired_slots()
    if batch.slots:
        SLOT_RELEASED.notify_all()  # an install waiting for a slot looks again


def _open_batches_over(layers: Iterable) -> list:
    """The open adapter_batch blocks that route any of ``layers`` (under SLOT_LOCK)."""
    ids = {id(layer) for layer in layers}
    return [batch for batch in _OPEN_BATCHES if not batch.layer_ids.isdisjoint(ids)]


def _pinned_slots(layers: Iterable, *, thread_id: Optional[int] = None) -> set[int]:
    """Slots of ``layers`` that an open adapter_batch reads (only batches opened by thread
    ``thread_id``, when given; under SLOT_LOCK)."""
    return set().union(*(batch.slots for batch in _open_batches_over(layers)
                         if thread_id is None or batch.thread_id == thread_id))


def _free_retired_slots() -> None:
    """Retired slots that no open batch pins become free (under SLOT_LOCK). Their old weights stay
    until the slot is reused: every write clears the slot first, and no name routes to it."""
    for layer in list(_LAYERS_WITH_RETIRED):
        layer.retired_slots &= _pinned_slots([layer])
        if not layer.retired_slots:
            _LAYERS_WITH_RETIRED.discard(layer)


def _retire(layer, slot: int) -> None:
    """``slot`` of ``layer`` held a version open batches still read (under SLOT_LOCK)."""
    layer.retired_slots.add(slot)
    _LAYERS_WITH_RETIRED.add(layer)


def reset_slot_table(layer, adapter_slots: dict[str, int]) -> None:
    """``layer`` publishes ``adapter_slots`` and retires nothing (a loaded state dict)."""
    with SLOT_LOCK:
        layer.adapter_slots = adapter_slots
        layer.retired_slots = set()
        _LAYERS_WITH_RETIRED.discard(layer)


# ---------------------------------------------------------------------- names
def model_slot(layers: Iterable, name: str, *, required: bool = True) -> Optional[int]:
    """The one slot ``name`` has in every layer that holds it (KeyError if none, when required)."""
    layers = list(layers)
    slots = {layer.adapter_slots[name] for layer in layers if name in layer.adapter_slots}
    if not slots:
        if not required:
            return None
        loaded = sorted({n for layer in layers for n in layer.adapter_slots})
        raise KeyError(f"no adapter named {name!r} in the model; loaded: {loaded}")
    if len(slots) > 1:
        raise ValueError(f"adapter {name!r} sits in different slots across layers ({sorted(slots)}); "
                         "load it with lf.add_adapter(model, ...) so every layer uses one slot")
    return slots.pop()


# ---------------------------------------------------------------------- writes
def _device_barrier(layers: Iterable) -> None:
    """Before and after a slot write on CUDA: kernels of other streams (other threads) may still read
    the slot, or start reading it, so the writer waits for the device (writes are rare; forwards
    never wait)."""
    for device in {layer.scalings.device for layer in layers if layer.scalings.is_cuda}:
        torch.cuda.synchronize(device)


def _check_timeout(timeout) -> Optional[float]:
    if timeout is None:
        return None
    timeout = check_finite_number(timeout, "timeout")
    if timeout < 0:
        raise ValueError(f"timeout must be None (wait without limit) or seconds >= 0, got timeout={timeout}")
    return timeout


def _usable_slot(layers: Mapping, old: Optional[int], slot: Optional[int], pinned: set[int]) -> Optional[int]:
    """The slot to write an adapter now in slot ``old`` (None: not loaded) into, or None when none
    is usable now (under SLOT_LOCK)."""
    if old is not None and old not in pinned:
        return old  # nobody reads it now: swap in place
    free = set.intersection(*(set(layer.free_slots()) for layer in layers.values()))
    if slot is not None:
        return slot if slot in free else None
    return min(free) if free else None


def _no_slot_error(layers: Mapping, name: str, old: Optional[int], slot: Optional[int], pinned: set[int]) -> str:
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
            f"({sorted({n for layer in layers.values() for n in layer.adapter_slots})}; {held}); remove one or "
            "build the layers with a larger max_adapters")


def _wait_for_slot(layers: Mapping, name: str, slot: Optional[int],
                   timeout: Optional[float]) -> tuple[Optional[int], int]:
    """``(the slot name is in now or None, the slot to write it into)``, under SLOT_LOCK.

    While no slot is usable, but open batches pin one that this write could take once they exit
    (a retired version, or ``name``'s own slot, swapped in place), waits for them: up to
    ``timeout`` seconds (None: no limit; 0: not at all), the lock released meanwhile. It never
    waits for a remove_adapter, nor for batches that only this thread can exit (it would wait
    for itself). ValueError when no slot comes."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:  # everything is read again after a wait: other writers may have run
        old = model_slot(layers.values(), name, required=False)
        if old is not None and slot is not None and slot != old:
            raise ValueError(f"adapter {name!r} is in slot {old}, not {slot}")
        pinned = _pinned_slots(layers.values())
        target = _usable_slot(layers, old, slot, pinned)
        if target is not None:
            return old, target
        named = {i for layer in layers.values() for n, i in layer.adapter_slots.items() if n != name}
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
        SLOT_RELEASED.wait(remaining)


def install(layers: Mapping, name: str, weights: Mapping[str, tuple[Tensor, Tensor, float]], *,
            slot: Optional[int] = None, timeout: Optional[float] = None) -> int:
    """Write adapter ``name`` into one slot of every layer of ``layers`` ({module name: layer}) and
    publish it there, atomically for every open batch (under SLOT_LOCK; waiting for a slot as
    :func:`_wait_for_slot`). ``weights`` maps module names to (A, B, scaling); layers it does not
    name hold nothing for ``name``. Returns the slot."""
    timeout = _check_timeout(timeout)
    checked = {}
    for module_name, (A, B, scaling) in weights.items():  # validate all before writing any
        try:
            A, B = layers[module_name].slot_tensors(name, A, B)
            _, scaling = layers[module_name].check_adapter(name, A, B, scaling)
        except (TypeError, ValueError) as e:
            raise type(e)(f"module {module_name!r}: {e}" if module_name else str(e)) from None
        checked[module_name] = (A, B, scaling)
    with SLOT_LOCK:
        old, target = _wait_for_slot(layers, name, slot, timeout)
        _device_barrier(layers.values())
        for module_name, layer in layers.items():
            if module_name in checked:
                layer.write_slot(target, *checked[module_name])
            elif layer.adapter_slots.get(name) == target or target in layer.free_slots():
                layer.write_slot(target)  # dropped from this layer, or a reused slot's freed old version
            if old is not None and old != target and layer.adapter_slots.get(name) == old:
                _retire(layer, old)  # open batches still read it
            if module_name in checked:
                layer.adapter_slots[name] = target
            else:
                layer.adapter_slots.pop(name, None)
        _device_barrier(layers.values())
    return target


def uninstall(layers: Mapping, name: str) -> None:
    """Unpublish ``name`` from every layer; empty its slot now, or retire it while batches read it."""
    with SLOT_LOCK:
        slot = model_slot(layers.values(), name)
        pinned = slot in _pinned_slots(layers.values())
        if not pinned:
            _device_barrier(layers.values())
        for layer in layers.values():
            if layer.adapter_slots.get(name) == slot:
                del layer.adapter_slots[name]
                if pinned:
                    _retire(layer, slot)
                else:
                    layer.write_slot(slot)
        if not pinned:
            _device_barrier(layers.values())
            SLOT_RELEASED.notify_all()  # its slot is free: an install waiting for one looks again


# ---------------------------------------------------------------------- the table
class AdapterSlots:
    """The name -> slot table of a multi-adapter layer (a mixin before ``nn.Module``): published
    names, retired slots, the name check, and the table as the module's tensor extra state.
    The layer adds ``max_adapters`` and the slot writes (``slot_tensors``, ``check_adapter``,
    ``write_slot``)."""

    max_adapters: int

    def init_slot_table(self) -> None:
        # The published adapter names, name -> slot. Guarded by SLOT_LOCK, which changes them
        # (install, uninstall); read there and by adapter_batch.
        self.adapter_slots: dict[str, int] = {}
        # Slots that held a replaced or removed adapter still pinned by an open adapter_batch:
        # neither named nor free until the last batch that pinned them exits.
        self.retired_slots: set[int] = set()
        # Set (once, never reset) by the first adapter_batch over this layer: a torch.compile'd
        # forward then reads its routing through routed_sequence_ids (one guard, one recompile).
        self.batch_routed = False

    @property
    def adapter_names(self) -> list[str]:
        """Loaded adapters, in slot order."""
        return sorted(self.adapter_slots, key=self.adapter_slots.get)

    def slot_of(self, name: str) -> int:
        if name not in self.adapter_slots:
            raise KeyError(f"no adapter named {name!r}; loaded: {self.adapter_names}")
        return self.adapter_slots[name]

    def free_slots(self) -> list[int]:
        """Slots holding no adapter (neither a loaded one nor a retired one an open batch still reads)."""
        used = set(self.adapter_slots.values()) | self.retired_slots
        return [i for i in range(self.max_adapters) if i not in used]

    @staticmethod
    def check_adapter_name(name) -> None:
        if not isinstance(name, str):
            raise TypeError(f"adapter name must be a str, got {type(name).__name__} ({name!r})")
        if not name or name == BASE_NAME:
            raise ValueError(f"adapter name must be a non-empty str other than {BASE_NAME!r}, got {name!r}")

    # The slot names travel with state_dict() (the weights, scalings and ranks already do), as a
    # tensor: safetensors (save_pretrained, Trainer checkpoints) stores tensors only.
    def get_extra_state(self) -> Tensor:
        """The name -> slot table, as the UTF-8 bytes of a JSON object in a uint8 tensor."""
        return torch.tensor(list(json.dumps(self.adapter_slots).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        slots = _decode_slot_table(state, type(self).__name__)
        bad = {n: i for n, i in slots.items() if not (isinstance(i, int) and 0 <= i < self.max_adapters)}
        if bad or len(set(slots.values())) != len(slots):
            raise ValueError(f"state_dict names adapter slots {slots}, not valid for max_adapters="
                             f"{self.max_adapters} (each name its own slot in [0, {self.max_adapters}))")
        reset_slot_table(self, slots)


def _decode_slot_table(state, owner: str) -> dict:
    """``{name: slot}`` from an ``owner`` extra-state entry: the uint8 tensor of JSON bytes, or
    the dict ``{"adapter_slots": {...}}`` of checkpoints saved before the entry was a tensor."""
    if isinstance(state, dict):
        return dict(state.get("adapter_slots", {}))
    if isinstance(state, Tensor) and state.dtype == torch.uint8 and state.dim() == 1:
        try:
            slots = json.loads(bytes(state.tolist()).decode())
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            slots = None
        if isinstance(slots, dict):
            return slots
    raise ValueError(f"a {owner} extra state must be the uint8 tensor of its slot table's JSON "
                     f"(get_extra_state), got {type(state).__name__} {getattr(state, 'dtype', '')} "
                     f"{tuple(getattr(state, 'shape', ()))}")
