"""Results derived from tensors' values, computed again only when a tensor changes.

Every cache in the package that is keyed by tensors keeps a :class:`Stamp` of each and
reuses a result only while every tensor still matches its stamp. A cache must never return
a value computed for another tensor, or for values the tensor no longer holds. What can
change the values behind a key, and what the stamp holds against it:

- another tensor at a freed one's address or ``id`` (allocators hand freed memory out at
  once): the stamp refers weakly to the tensor that owns the version counter (``t._base``
  for a view: a fresh view of the same buffer on every call, as vLLM passes its mapping, is
  recognised) and to its storage; a dead reference never matches;
- a write through torch (``copy_``, ``t[i] = v``, ``out=``, ``load_state_dict``): each bumps
  the version counter, which a tensor shares with its views;
- a ``.data`` swap (``module.to()``): a new storage, even at the freed one's address;
- a write that bypasses the version counter: a numpy array sharing a CPU tensor's memory
  (``torch.from_numpy``, ``t.numpy()``: engines build batch metadata that way), a write
  through ``.data``, another library through DLPack. With ``contents=True`` a CPU tensor's
  stamp is a copy of its values, compared at each use (``torch.equal``: about a microsecond
  for metadata and per-slot vectors); a result derived from equal values is the result for
  them, whichever tensor holds them. Device tensors are never compared (a device read waits
  for the device), nor weights (``contents=False``: a copy per cached weight would double its
  memory): such writes to them are not seen, the blind spot autograd's saved-tensor check
  has too. On a device the writers that matter go through torch: an engine refills its
  metadata with ``copy_`` (a version bump) before it replays a CUDA graph.

Inference tensors (``torch.inference_mode``) have no version counter: they are never stamped,
so a result derived from one is computed on every call.

:func:`derived` is the shared cache of small results (a rank check's host read, the torch
backend's coefficient table). Never use it for a tensor that a captured CUDA graph reads:
the graph would keep the result of its capture.
"""
from __future__ import annotations

import weakref
from typing import Callable, Hashable, Optional

import torch
from torch import Tensor

#: Entries kept at most; past it the cache starts again (a model has a few (scalings, ranks) pairs).
MAX_ENTRIES = 256
_cache: dict = {}


def _owner(t: Tensor) -> Tensor:
    """The tensor whose version counter ``t`` uses: its base for a view, else itself."""
    base = t._base
    return t if base is None else base


class Stamp:
    """What a cache keeps of a tensor to tell, at its next use, whether the tensor still holds
    the values a result was computed from (see the module docstring).

    With ``contents`` and a CPU tensor the stamp is the values themselves (and the dtype): a
    result derived from equal values is the result for these, whichever tensor holds them.
    Otherwise it is the tensor's identity: its owner and storage (weakly), version counter,
    data pointer, shape, strides and dtype."""

    __slots__ = ("owner", "storage", "version", "ptr", "shape", "stride", "dtype", "values")

    def __init__(self, t: Tensor, contents: bool, on_free: Optional[Callable] = None) -> None:
        self.owner = weakref.ref(_owner(t), on_free)
        self.storage = weakref.ref(t.untyped_storage())
        self.version = t._version
        self.ptr = t.data_ptr()
        self.shape = t.shape
        self.stride = t.stride()
        self.dtype = t.dtype
        self.values = t.detach().clone() if contents and t.is_cpu else None

    def matches(self, t: Optional[Tensor]) -> bool:
        if t is None:
            return False
        if self.values is not None:
            return t.is_cpu and self.dtype is t.dtype and torch.equal(self.values, t)
        return (self.owner() is _owner(t) and self.version == t._version and self.ptr == t.data_ptr()
                and self.storage() is t.untyped_storage() and self.shape == t.shape
                and self.stride == t.stride() and self.dtype is t.dtype)


class _Absent:
    """The stamp of a missing tensor (None): matches None only."""

    @staticmethod
    def matches(t: Optional[Tensor]) -> bool:
        return t is None


ABSENT = _Absent()


def stamp(t: Optional[Tensor], *, contents: bool, on_free: Optional[Callable] = None):
    """A :class:`Stamp` of ``t`` (:data:`ABSENT` for None), or None for an inference tensor (no
    version counter: never cache it). ``on_free(ref)`` runs when ``t``'s owner is freed."""
    if t is None:
        return ABSENT
    if t.is_inference():
        return None
    return Stamp(t, contents, on_free)


def all_match(stamps, tensors) -> bool:
    """Every tensor (or None) of ``tensors`` matches its stamp (a loop: cheaper than ``all()``)."""
    for s, t in zip(stamps, tensors):
        if not s.matches(t):
            return False
    return True


def identity(t: Optional[Tensor]) -> Hashable:
    """A dict key part for ``t`` (a stamp confirms it): its owner's id and its data pointer."""
    if t is None:
        return None
    base = t._base
    return id(t if base is None else base), t.data_ptr()


def derived(fn: Callable, tensors: tuple, extra: tuple = ()):
    """``fn(*tensors, *extra)``, reused while every tensor of ``tensors`` (or None) matches its
    stamp (CPU values compared: these are small vectors)."""
    key = (fn, extra, *[identity(t) for t in tensors])
    entry = _cache.get(key)
    if entry is not None and all_match(entry[0], tensors):
        return entry[1]
    stamps = [stamp(t, contents=True) for t in tensors]
    value = fn(*tensors, *extra)  # an exception leaves nothing cached
    if None in stamps:  # an inference tensor: computed every call
        return value
    if len(_cache) >= MAX_ENTRIES:
        _cache.clear()
    _cache[key] = (stamps, value)
    return value


def clear() -> None:
    _cache.clear()
