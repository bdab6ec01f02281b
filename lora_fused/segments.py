"""Segment plans: a batch's rows grouped by adapter, computed once and shared by every layer.

A :class:`SegmentPlan` holds, as device tensors of fixed size for a batch of
T rows and n adapters:

- ``sorted_rows`` [T]: row indices stably sorted by adapter, base rows (id -1) last;
- ``seg_start``, ``seg_len`` [n + 1]: segment i (index n = base rows) is
  ``sorted_rows[seg_start[i] : seg_start[i] + seg_len[i]]``;
- ``chunk_adapter``, ``chunk_start``, ``chunk_len`` [capacity]: the segments cut
  into chunks of at most ``block_rows`` rows (the kernels' row tile); unused
  slots have ``chunk_len = 0``. capacity = cdiv(T, block_rows) + min(n + 1, T)
  bounds the chunk count for any ids, so the shapes depend on (T, n) only.

Building a plan never synchronises with the host (sort, scatter-add, cumsum,
searchsorted), except for the optional range check of the ids, which is
skipped while a CUDA graph is captured or ``torch.compile`` traces. A forward
given a plan launches fixed grids, so it is CUDA-graph safe; refill the same
buffers for a new batch of the same size with :meth:`SegmentPlan.update_`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

from .validation import check_positive_int

INDEX_DTYPES = (torch.int32, torch.int64)


def _kernels():
    from lora_fused.kernels import multi_lora
    return multi_lora


def values_checkable(t: Tensor) -> bool:
    """Whether reading ``t``'s values on the host is allowed now (not tracing, not capturing,
    not a meta tensor: it has no values)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_adapter_ids(adapter_ids, n_adapters: int, num_rows: Optional[int] = None, *,
                      check_values: bool = True) -> Tensor:
    """``adapter_ids`` as a 1-D view; TypeError/ValueError/IndexError name what is wrong.
    The range check reads the ids on the host (skipped when tracing, capturing or told to)."""
    if not isinstance(adapter_ids, Tensor):
        raise TypeError(f"adapter_ids must be an int32 or int64 torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"adapter_ids must be int32 or int64, got {adapter_ids.dtype} "
                        f"(shape {tuple(adapter_ids.shape)})")
    ids = adapter_ids.reshape(-1)
    if num_rows is not None and ids.shape[0] != num_rows:
        raise ValueError(f"adapter_ids has {ids.shape[0]} entries (shape {tuple(adapter_ids.shape)}) "
                         f"but x has {num_rows} rows: give one adapter id per row")
    if check_values and ids.numel() and values_checkable(ids):
        low, high = int(ids.min()), int(ids.max())
        if low < -1 or high >= n_adapters:
            raise IndexError(f"adapter_ids must lie in [-1, {n_adapters}) for {n_adapters} adapters "
                             f"(-1 = base only), got values in [{low}, {high}]")
    return ids


@dataclass
class SegmentPlan:
    """Rows of one batch grouped by adapter; see the module docstring. Build with :func:`plan_segments`."""
    sorted_rows: Tensor
    seg_start: Tensor
    seg_len: Tensor
    chunk_adapter: Tensor
    chunk_start: Tensor
    chunk_len: Tensor
    adapter_ids: Tensor  # the ids, int64 [T] (the torch backend and the checks read them)
    n_adapters: int
    regime: str
    block_rows: int

    @property
    def num_rows(self) -> int:
        return self.sorted_rows.shape[0]

    @property
    def device(self) -> torch.device:
        return self.sorted_rows.device

    def tensors(self) -> tuple[Tensor, ...]:
        """The plan's tensors in the order the custom ops take them."""
        return (self.sorted_rows, self.seg_start, self.seg_len, self.chunk_adapter, self.chunk_start,
                self.chunk_len, self.adapter_ids)

    def update_(self, adapter_ids: Tensor, *, validate: bool = True) -> "SegmentPlan":
        """Recompute this plan for new ids of the same length, in place (same buffers: a
        captured CUDA graph that reads this plan then serves the new batch)."""
        fresh = plan_segments(adapter_ids, self.n_adapters, regime=self.regime, validate=validate)
        if fresh.num_rows != self.num_rows:
            raise ValueError(f"update_ needs {self.num_rows} adapter ids (the plan's batch), "
                             f"got {fresh.num_rows}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value.copy_(getattr(fresh, f.name))
        return self


def plan_segments(adapter_ids: Tensor, n_adapters: int, *, regime: Optional[str] = None,
                  validate: bool = True) -> SegmentPlan:
    """Group a batch's rows by adapter, on the ids' device, without a host sync.

    adapter_ids: int32/int64 [T] (any shape; flattened), values in [-1, n_adapters).
    regime: "decode" | "prefill" (the kernels' block config); by default from T.
    validate: range-check the ids (one host read; ``False`` for ids known to be valid).
    Compute it once per batch and pass it to every layer's ``multi_lora_linear``.
    """
    check_positive_int(n_adapters, "n_adapters")
    ids = check_adapter_ids(adapter_ids, n_adapters, check_values=validate).to(torch.int64, copy=True)  # update_ writes it
    kernels = _kernels()
    T = ids.shape[0]
    regime = regime or kernels.regime_for(T)
    block = kernels.multi_config(regime).block_rows
    capacity = kernels.chunk_capacity(T, n_adapters, block)
    device = ids.device
    n_seg = n_adapters + 1

    key = torch.where(ids < 0, n_adapters, ids)  # base rows sort last, as segment n
    _, sorted_rows = torch.sort(key, stable=True)
    seg_len = torch.zeros(n_seg, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    seg_start = torch.cumsum(seg_len, 0) - seg_len
    seg_chunks = (seg_len + block - 1) // block
    chunk_end = torch.cumsum(seg_chunks, 0)
    slots = torch.arange(capacity, dtype=torch.int64, device=device)
    slot_seg = torch.searchsorted(chunk_end, slots, right=True)  # n_seg for unused slots
    used = slot_seg < n_seg
    seg = slot_seg.clamp(max=n_seg - 1)
    first_row = (slots - (chunk_end - seg_chunks)[seg]) * block
    chunk_len = torch.where(used, (seg_len[seg] - first_row).clamp(0, block), 0)
    chunk_adapter = torch.where(used & (seg < n_adapters), seg, -1)
    chunk_start = torch.where(used, seg_start[seg] + first_row, 0)

    i32 = torch.int32
    return SegmentPlan(sorted_rows=sorted_rows.to(i32), seg_start=seg_start.to(i32), seg_len=seg_len.to(i32),
                       chunk_adapter=chunk_adapter.to(i32), chunk_start=chunk_start.to(i32),
                       chunk_len=chunk_len.to(i32), adapter_ids=ids, n_adapters=n_adapters,
                       regime=regime, block_rows=block)
