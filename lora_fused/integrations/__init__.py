"""Serving-engine adapters: the engines' own tensor layouts and batch metadata, mapped onto
:func:`lora_fused.add_lora` and its shrink / expand halves.

- :mod:`lora_fused.integrations.vllm`: ``PunicaWrapper``-style ``add_lora_linear``,
  ``add_lora_embedding``, ``add_lora_logits``, and ``LoRAFusedPunicaWrapper``, the object
  vLLM's layers call (``register()`` makes vLLM choose it).
- :mod:`lora_fused.integrations.sglang`: ``run_lora_a_sgemm``, ``run_lora_b_sgemm``,
  ``run_qkv_lora``, ``run_gate_up_lora`` over a ``LoRABatchInfo``, and ``LoRAFusedBackend``,
  SGLang's LoRA backend (``register()`` adds it to SGLang's backend choice).

Neither engine is imported (until ``register()``): the functions take plain tensors and any
object with the engine's field names. Both are thin: metadata becomes a
:class:`~lora_fused.SegmentPlan` (no host sync), then the delta ops run.

The free functions get the batch's metadata tensors on every call. The engine objects get
the batch once (vLLM's ``update_metadata``, SGLang's ``prepare_lora_batch``) and keep each
row's adapter in a :class:`RowPlans` buffer, whose plan every layer call then shares.

Engines call a layer's LoRA once per layer with the same batch metadata, so the plan
built from it is cached, keyed by the metadata tensors and confirmed by their stamps
(:mod:`lora_fused.value_cache`: the same tensor or a view of the same buffer, its version
counter, and on the CPU its values, which numpy may have written without a version bump).
Nothing is cached while ``torch.compile`` traces or a CUDA graph is captured (the plan is
then built inside the graph, so a replay plans the batch it is given), nor for inference
tensors (created under ``torch.inference_mode``: they have no version counter).
"""
from __future__ import annotations

import collections
import os
from typing import Callable, Hashable

import torch
from torch import Tensor

from ..dispatch.segments import SegmentPlan, plan_segments
from ..value_cache import all_match, identity, stamp

__all__ = ["RowPlans", "constant_vector", "copy_from_host", "opt_in_entry_point", "refuse_unknown", "sglang", "vllm"]

#: Plans kept per process (one per recent batch and stack size).
PLAN_CACHE_SIZE = 8

#: key -> (stamps of the metadata tensors, plan), least recently used first.
_plans: "collections.OrderedDict[Hashable, tuple]" = collections.OrderedDict()


def caching_allowed(t: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def cached_plan(tag: tuple, tensors: tuple, like: Tensor, build: Callable[[], SegmentPlan]) -> SegmentPlan:
    """``build()``, reused while ``tag`` (ints and names) is the same and every metadata tensor
    of ``tensors`` (or None) matches its stamp. ``like``: a tensor on the plan's device."""
    if not caching_allowed(like):
        return build()
    key = (tag, *[identity(t) for t in tensors])
    entry = _plans.get(key)
    if entry is not None and all_match(entry[0], tensors):
        _plans.move_to_end(key)
        return entry[1]
    stamps = [stamp(t, contents=True) for t in tensors]
    plan = build()
    if None not in stamps:  # else an inference tensor: nothing to tell a change by
        _plans[key] = (stamps, plan)
        _plans.move_to_end(key)
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    return plan


#: Plans a :class:`RowPlans` keeps for eager calls (one per row count and stack size seen
#: recently); plans made while a CUDA graph is captured are kept for the graph's life.
EAGER_PLANS_KEPT = 16


class RowPlans:
    """One batch's adapter id per row in a fixed device buffer (``ids``; -1 = no adapter), and
    the :class:`SegmentPlan` of its first T rows, shared by every layer call of the batch.

    An engine object gives each batch once (:meth:`set_rows`: a host-to-device copy from
    pinned memory, no host sync); the first layer call of the batch builds the plan on the
    device and every later call reuses it (a dict lookup). Rows past the batch (an engine's
    CUDA-graph padding) hold -1: no adapter.

    CUDA graphs: the buffer never moves, so a graph may read it. A call made while a graph is
    captured uses a plan of its own, refreshed inside the capture (its first call after a new
    batch), so each replay plans the rows the engine wrote before it. Both engines write the
    rows (``update_metadata`` / ``prepare_lora_batch``) before each capture and each replay;
    a second capture with no new batch between would reuse the first one's refresh.
    Under ``torch.compile`` the plan is built inside the traced graph on every call."""

    def __init__(self, capacity: int, device) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int (rows a batch may have), got {capacity!r}")
        self.ids = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        self.num_rows = 0  # rows of the current batch
        self._batch = 0  # counts set_rows calls; a plan is fresh while it holds this count
        self._eager: "collections.OrderedDict[tuple, list]" = collections.OrderedDict()
        self._graph: dict = {}  # (T, n) -> [plan, batch]; never dropped: a captured graph reads them

    @property
    def capacity(self) -> int:
        return self.ids.shape[0]

    def set_rows(self, host_ids: Tensor) -> None:
        """A new batch: ``host_ids`` int64 [T] on the CPU (-1 = no adapter), copied into the
        buffer without waiting for the device; rows past T are set to -1."""
        T = host_ids.shape[0]
        if T > self.capacity:
            raise ValueError(f"the batch has {T} rows but this buffer holds {self.capacity} (the engine's "
                             f"max_num_batched_tokens / CUDA-graph batch size)")
        copy_from_host(self.ids[:T], host_ids)
        self.ids[T:].fill_(-1)
        self.num_rows = T
        self._batch += 1

    def plan(self, num_rows: int, n_adapters: int) -> SegmentPlan:
        """The plan of rows ``[0, num_rows)`` for stacks of ``n_adapters`` adapters."""
        if num_rows > self.capacity:
            raise ValueError(f"x has {num_rows} rows but this batch buffer holds {self.capacity}")
        if torch.compiler.is_compiling():
            return plan_segments(self.ids[:num_rows], n_adapters, validate=False)
        key = (num_rows, n_adapters)
        if self.ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return self._fresh(self._graph, key)
        entry = self._eager.get(key)
        if entry is not None and entry[1] == self._batch:
            return entry[0]
        plan = self._fresh(self._eager, key)
        while len(self._eager) > EAGER_PLANS_KEPT:
            self._eager.popitem(last=False)
        return plan

    def _fresh(self, plans: dict, key: tuple) -> SegmentPlan:
        """The plan under ``key`` in ``plans``, recomputed in place if an older batch made it."""
        entry = plans.get(key)
        ids = self.ids[:key[0]]  # ids are written by set_rows only: valid, no range check
        if entry is None:
            entry = plans[key] = [plan_segments(ids, key[1], validate=False), self._batch]
        elif entry[1] != self._batch:
            entry[0].update_(ids, validate=False)
            entry[1] = self._batch
        return entry[0]


def copy_from_host(dest: Tensor, host: Tensor) -> None:
    """``dest.copy_(host)`` without waiting for the device: a CPU tensor is staged in pinned memory
    first (the caching host allocator keeps it until the copy ran)."""
    if dest.is_cuda:
        host = host.pin_memory()
    dest.copy_(host, non_blocking=True)


#: (value, n, dtype, device) -> a constant vector (an engine's scale, a full rank per slot). Never
#: dropped: a CUDA graph captured after one was made reads its memory (an engine uses a few).
_constants: dict = {}


def constant_vector(value, n: int, dtype: torch.dtype, device) -> Tensor:
    """``torch.full((n,), value)`` on ``device``, made once per (value, n, dtype, device): a
    layer call would otherwise pay an allocation and a fill for it. Not kept while tracing or
    capturing (a tensor made in a capture holds its values only once the graph replays)."""
    key = (value, n, dtype, device)
    vector = _constants.get(key)
    if vector is None:
        vector = torch.full((n,), value, dtype=dtype, device=device)
        if caching_allowed(vector):
            _constants[key] = vector
    return vector


def refuse_unknown(kwargs: dict, method: str) -> None:
    """TypeError for arguments an engine passed that lora-fused does not know: a newer engine's
    argument is refused, never ignored (it may change what the call must compute)."""
    if kwargs:
        raise TypeError(f"{method}() got argument(s) lora-fused does not know: {sorted(kwargs)}. It follows "
                        f"the engine versions its module docstring names; refusing rather than ignoring them")


def opt_in_entry_point(variable: str, register: Callable[[], object], engine: str) -> Callable[[], None]:
    """An engine's plugin entry point (setup.py: ``vllm.general_plugins``, ``sglang.srt.plugins``),
    which the engine calls in each of its processes: it calls ``register`` only when ``variable``
    is ``1``, so installing lora-fused never changes what the engine does on its own."""
    def load_plugin() -> None:
        if os.environ.get(variable, "0") == "1":
            register()
    load_plugin.__doc__ = (f"{engine}'s plugin entry point: registers lora-fused in {engine} when {variable}=1 "
                           f"(lora_fused.integrations.opt_in_entry_point).")
    return load_plugin


def clear_caches() -> None:
    """Forget every cached plan (the constant vectors stay: they depend on their key alone, and
    a captured graph may read them)."""
    _plans.clear()


def __getattr__(name):  # lf.integrations.vllm / .sglang without importing both at package import
    if name in ("vllm", "sglang"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(name)
