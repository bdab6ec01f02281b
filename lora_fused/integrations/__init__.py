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
built from it is cached by the metadata tensors' identity and version counters (an
in-place refill bumps the version: the next call plans again). Nothing is cached while
``torch.compile`` traces or a CUDA graph is captured (the plan is then built inside the
graph, so a replay plans the batch it is given), nor for inference tensors (created under
``torch.inference_mode``: they have no version counter, so a change could not be seen).
"""
from __future__ import annotations

import collections
from typing import Callable, Hashable

import torch
from torch import Tensor

from ..dispatch.segments import SegmentPlan

__all__ = ["sglang", "vllm"]

#: Plans kept per process (one per recent batch and stack size).
PLAN_CACHE_SIZE = 8

_plans: "collections.OrderedDict[Hashable, SegmentPlan]" = collections.OrderedDict()


#: A key part for a tensor whose changes cannot be seen (an inference tensor has no version
#: counter): a key holding it is never cached.
UNTRACKED = object()


def tensor_key(t) -> Hashable:
    """What identifies a metadata tensor's current contents without reading them."""
    if t is None:
        return None
    if t.is_inference():
        return UNTRACKED
    return (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def caching_allowed(t: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def cached_plan(make_key: Callable[[], tuple], like: Tensor, build: Callable[[], SegmentPlan]) -> SegmentPlan:
    """``build()``, reused while ``make_key()`` (a tuple of :func:`tensor_key` values and ints)
    stays the same. The key is not made while tracing (Dynamo cannot ask a tensor's version)."""
    if not caching_allowed(like):
        return build()
    key = make_key()
    if any(part is UNTRACKED for part in key):
        return build()
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = build()
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def clear_caches() -> None:
    """Forget every cached plan."""
    _plans.clear()


def __getattr__(name):  # lf.integrations.vllm / .sglang without importing both at package import
    if name in ("vllm", "sglang"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(name)
