"""Segment plans: a batch's rows grouped by adapter, computed once and shared by every layer.

A :class:`SegmentPlan` is one int32 device tensor (``packed``) of fixed size for a
batch of T rows and n adapters. Its regions, readable as attributes (views):

- ``sorted_rows`` [T]: row indices stably sorted by adapter, base rows (id -1) last;
- ``seg_start``, ``seg_len`` [n + 1]: segment i (index n = base rows) is
  ``sorted_rows[seg_start[i] : seg_start[i] + seg_len[i]]``;
- ``chunk_adapter``, ``chunk_start``, ``chunk_len`` [capacity]: the segments cut
  into chunks of at most ``block_rows`` rows (the kernels' row tile); unused
  slots have ``chunk_len = 0``. capacity = cdiv(T, block_rows) + min(n + 1, T)
  bounds the chunk count for any ids, so the shapes depend on (T, n) only;
- ``adapter_ids`` [T]: the ids themselves;
- for the torch backend's batched matmuls over chunks: ``slot_rows`` [capacity ·
  block_rows] (the row of each chunk slot, 0 for an empty slot), ``slot_live``
  (1 where that slot is a row of an adapter), ``row_slot`` [T] (each row's slot)
  and ``chunk_weights`` [capacity] (the adapter whose A_i, B_i a chunk gathers; 0
  for base and unused chunks, whose slots are not live);
- for the torch backend's per-row gather path (few rows): ``row_weights`` [T] (each
  row's adapter, 0 for a base row) and ``row_key`` [T] (each row's adapter, n for a
  base row: the index of a zero row appended to a per-adapter table).

One tensor keeps the ops' schemas short (the plan is one argument) and makes
:meth:`SegmentPlan.update_` a single in-place copy. Building a plan never
synchronises with the host (sort, scatter, cumsum, searchsorted, gathers),
except for the optional range check of the ids, which is skipped while a CUDA
graph is captured or ``torch.compile`` traces. A forward given a plan launches
fixed grids, so it is CUDA-graph safe; refill the same buffer for a new batch of
the same size with :meth:`SegmentPlan.update_`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .backend import multi_kernels
from .strategies import forced_regime
from ..validation import check_positive_int

INDEX_DTYPES = (torch.int32, torch.int64)


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



def plan_layout(num_rows: int, n_adapters: int, capacity: int, block_rows: int) -> dict[str, tuple[int, int]]:
    """(offset, length) of each region of a packed plan, in order."""
    lengths = {
        "sorted_rows": num_rows, "seg_start": n_adapters + 1, "seg_len": n_adapters + 1,
        "chunk_adapter": capacity, "chunk_start": capacity, "chunk_len": capacity, "adapter_ids": num_rows,
        "slot_rows": capacity * block_rows, "slot_live": capacity * block_rows, "row_slot": num_rows,
        "chunk_weights": capacity, "row_weights": num_rows, "row_key": num_rows,
    }
    layout, offset = {}, 0
    for name, length in lengths.items():
        layout[name] = (offset, length)
        offset += length
    return layout


@dataclass(eq=False)
class SegmentPlan:
    """Rows of one batch grouped by adapter; see the module docstring. Build with :func:`plan_segments`.

    The region attributes (``sorted_rows`` ... ``chunk_weights``) are views of ``packed``."""
    packed: Tensor
    num_rows: int
    n_adapters: int
    regime: str
    block_rows: int
    sorted_rows: Tensor = field(init=False, repr=False)
    seg_start: Tensor = field(init=False, repr=False)
    seg_len: Tensor = field(init=False, repr=False)
    chunk_adapter: Tensor = field(init=False, repr=False)
    chunk_start: Tensor = field(init=False, repr=False)
    chunk_len: Tensor = field(init=False, repr=False)
    adapter_ids: Tensor = field(init=False, repr=False)
    slot_rows: Tensor = field(init=False, repr=False)
    slot_live: Tensor = field(init=False, repr=False)
    row_slot: Tensor = field(init=False, repr=False)
    chunk_weights: Tensor = field(init=False, repr=False)
    row_weights: Tensor = field(init=False, repr=False)
    row_key: Tensor = field(init=False, repr=False)
    #: Values the torch backend derives from this plan and a layer's coefficient table (each
    #: row's or chunk's coefficients), stamped with ``packed``'s version: ``update_`` invalidates them.
    host_cache: dict = field(init=False, repr=False, default_factory=dict)
    #: ``packed``'s device, read once (a plain attribute: the ops compare it with x's per call).
    device: torch.device = field(init=False, repr=False)

    def __post_init__(self) -> None:
        capacity = multi_kernels().chunk_capacity(self.num_rows, self.n_adapters, self.block_rows)
        layout = plan_layout(self.num_rows, self.n_adapters, capacity, self.block_rows)
        total = sum(length for _, length in layout.values())
        if self.packed.dim() != 1 or self.packed.shape[0] != total or self.packed.dtype != torch.int32:
            raise ValueError(f"a packed plan for {self.num_rows} rows and {self.n_adapters} adapters "
                             f"(regime {self.regime!r}) is int32 [{total}], got {self.packed.dtype} "
                             f"{tuple(self.packed.shape)}")
        for name, (offset, length) in layout.items():
            setattr(self, name, self.packed[offset:offset + length])
        self.device = self.packed.device

    @staticmethod
    def chunk_geometry(num_rows: int, n_adapters: int, regime: str) -> tuple[int, int]:
        """(block_rows, capacity) of a plan for ``num_rows`` rows, ``n_adapters`` adapters, ``regime``."""
        kernels = multi_kernels()
        block = kernels.multi_config(regime).block_rows
        return block, kernels.chunk_capacity(num_rows, n_adapters, block)

    @classmethod
    def from_packed(cls, packed: Tensor, num_rows: int, n_adapters: int, regime: str) -> "SegmentPlan":
        """The plan whose buffer is ``packed`` (as the custom ops receive it)."""
        block, _ = cls.chunk_geometry(num_rows, n_adapters, regime)
        return cls(packed, num_rows, n_adapters, regime, block)

    def tensors(self) -> tuple[Tensor, ...]:
        """The plan's tensors in the order the custom ops take them (one packed buffer)."""
        return (self.packed,)

    def update_(self, adapter_ids: Tensor, *, validate: bool = True) -> "SegmentPlan":
        """Recompute this plan for new ids of the same length, in place (same buffer: a
        captured CUDA graph that reads this plan then serves the new batch)."""
        fresh = plan_segments(adapter_ids, self.n_adapters, regime=self.regime, validate=validate)
        if fresh.num_rows != self.num_rows:
            raise ValueError(f"update_ needs {self.num_rows} adapter ids (the plan's batch), "
                             f"got {fresh.num_rows}")
        self.packed.copy_(fresh.packed)
        return self


def plan_segments(adapter_ids: Tensor, n_adapters: int, *, regime: Optional[str] = None,
                  validate: bool = True) -> SegmentPlan:
    """Group a batch's rows by adapter, on the ids' device, without a host sync.

    adapter_ids: int32/int64 [T] (any shape; flattened), values in [-1, n_adapters).
    regime: "decode" | "prefill" | "prefill_cublas" (the kernels' block config); by default the
    one ``lf.use_strategy(multi_lora=...)`` forces, else from T.
    validate: range-check the ids (one host read; ``False`` for ids known to be valid).
    Compute it once per batch and pass it to every layer's ``multi_lora_linear``.
    """
    check_positive_int(n_adapters, "n_adapters")
    ids = check_adapter_ids(adapter_ids, n_adapters, check_values=validate).to(torch.int64)
    T = ids.shape[0]
    # Dynamo cannot trace ContextVar.get: a compiled graph plans by the number of rows.
    forced = None if torch.compiler.is_compiling() else forced_regime()
    regime = regime or forced or multi_kernels().regime_for(T)
    block, capacity = SegmentPlan.chunk_geometry(T, n_adapters, regime)
    device = ids.device
    n_seg = n_adapters + 1

    key = torch.where(ids < 0, n_adapters, ids)  # base rows sort last, as segment n
    _, sorted_rows = torch.sort(key, stable=True)
    seg_len = torch.zeros(n_seg, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    seg_start = torch.cumsum(seg_len, 0) - seg_len
    seg_chunks = (seg_len + block - 1) // block
    chunk_end = torch.cumsum(seg_chunks, 0)
    chunk_first = chunk_end - seg_chunks  # each segment's first chunk
    slots = torch.arange(capacity, dtype=torch.int64, device=device)
    slot_seg = torch.searchsorted(chunk_end, slots, right=True)  # n_seg for unused slots
    used = slot_seg < n_seg
    seg = slot_seg.clamp(max=n_seg - 1)
    first_row = (slots - chunk_first[seg]) * block
    chunk_len = torch.where(used, (seg_len[seg] - first_row).clamp(0, block), 0)
    chunk_adapter = torch.where(used & (seg < n_adapters), seg, -1)
    chunk_start = torch.where(used, seg_start[seg] + first_row, 0)

    # The torch backend's view: slot j of chunk c holds sorted position chunk_start[c] + j.
    offsets = torch.arange(block, dtype=torch.int64, device=device)
    slot_ok = offsets < chunk_len[:, None]  # [capacity, block]
    slot_pos = (chunk_start[:, None] + offsets).clamp(max=max(T - 1, 0))
    slot_rows = torch.where(slot_ok, sorted_rows[slot_pos], 0)
    slot_live = slot_ok & (chunk_adapter >= 0)[:, None]
    position = torch.empty_like(sorted_rows).scatter_(0, sorted_rows, torch.arange(T, device=device))
    within = position - seg_start[key]  # a row's place in its segment
    row_slot = (chunk_first[key] + within // block) * block + within % block
    chunk_weights = chunk_adapter.clamp(min=0)

    parts = (sorted_rows, seg_start, seg_len, chunk_adapter, chunk_start, chunk_len, ids,
             slot_rows.reshape(-1), slot_live.reshape(-1), row_slot, chunk_weights, ids.clamp(min=0), key)
    packed = torch.cat([p.to(torch.int32) for p in parts])
    return SegmentPlan(packed, T, n_adapters, regime, block)


def resolve_plan(ids_or_plan, n_adapters: int, num_rows: int, device: torch.device,
                 name: str = "adapter_ids") -> SegmentPlan:
    """The plan given, checked against (num_rows, n_adapters, device), or one built from ids.

    Ids are range-checked once on the host (IndexError; skipped when tracing or capturing),
    so the plan is built without a second check."""
    if isinstance(ids_or_plan, SegmentPlan):
        plan = ids_or_plan
        if plan.n_adapters != n_adapters or plan.num_rows != num_rows:
            raise ValueError(f"the plan was built for {plan.num_rows} rows and {plan.n_adapters} adapters, "
                             f"but x has {num_rows} rows and the adapter stacks {n_adapters} adapters")
        if plan.device != device:
            raise ValueError(f"the plan is on {plan.device} but x is on {device}")
        return plan
    ids = check_adapter_ids(ids_or_plan, n_adapters, num_rows)
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but x is on {device}; move it to x's device")
    return plan_segments(ids, n_adapters, validate=False)
