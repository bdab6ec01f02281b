"""Results derived from tensors' values, computed again only when a tensor changes.

Per call, the multi-adapter op needs things that depend only on slowly changing
tensors: that ``ranks`` lies in [1, r_max] (a host read), and the torch backend's
per-adapter coefficient table (5 small ops). :func:`derived` keeps the last result
per (function, tensors, extra key) and returns it while every tensor is unchanged:
the same object (a weak reference, so a freed tensor's reused id never matches),
the same version counter (every in-place write bumps it, ``layers.scalings[i] = s``
and ``load_state_dict`` included), the same data pointer, shape and dtype (a ``.data``
swap, as ``module.to()`` does, changes one of them). Writes through ``t.data`` do not
bump the version and are not seen: autograd's saved-tensor check has the same blind spot.

Never use it for a tensor that a captured CUDA graph reads: the graph would keep
the result of its capture. The torch backend uses it for CPU tensors only.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

from torch import Tensor

#: Entries kept at most; past it the cache starts again (a model has a few (scalings, ranks) pairs).
MAX_ENTRIES = 256
_cache: dict = {}


def _stamp(t: Optional[Tensor]) -> tuple:
    if t is None:
        return (None,)
    return (t._version, t.data_ptr(), t.shape, t.dtype)


def _alive(refs: tuple, tensors: tuple) -> bool:
    return all((ref is None and t is None) or (ref is not None and ref() is t) for ref, t in zip(refs, tensors))


def derived(fn: Callable, tensors: tuple, extra: tuple = ()):
    """``fn(*tensors, *extra)``, reused while every tensor of ``tensors`` (or None) is unchanged."""
    key = (fn, extra) + tuple(id(t) for t in tensors)
    stamps = tuple(_stamp(t) for t in tensors)
    entry = _cache.get(key)
    if entry is not None and entry[1] == stamps and _alive(entry[0], tensors):
        return entry[2]
    value = fn(*tensors, *extra)  # an exception leaves nothing cached
    if len(_cache) >= MAX_ENTRIES:
        _cache.clear()
    _cache[key] = (tuple(None if t is None else weakref.ref(t) for t in tensors), stamps, value)
    return value


def clear() -> None:
    _cache.clear()
