"""Serving-engine adapters: the engines' own tensor layouts and batch metadata, mapped onto
:func:`lora_fused.add_lora` and its shrink / expand halves.

- :mod:`lora_fused.integrations.vllm`: ``PunicaWrapper``-style ``add_lora_linear``,
  ``add_lora_embedding``, ``add_lora_logits``.
- :mod:`lora_fused.integrations.sglang`: ``run_lora_a_sgemm``, ``run_lora_b_sgemm``,
  ``run_qkv_lora``, ``run_gate_up_lora`` over a ``LoRABatchInfo``.

Neither engine is imported: the functions take plain tensors and any object with the
engine's field names. Both are thin: metadata becomes a :class:`~lora_fused.SegmentPlan`
(no host sync), then the delta ops run.

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
from typing import Callable, Hashable

import torch
from torch import Tensor

from ..dispatch.segments import SegmentPlan
from ..value_cache import all_match, identity, stamp

__all__ = ["sglang", "vllm"]

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


def clear_caches() -> None:
    """Forget every cached plan."""
    _plans.clear()


def __getattr__(name):  # lf.integrations.vllm / .sglang without importing both at package import
    if name in ("vllm", "sglang"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(name)
