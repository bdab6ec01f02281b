"""SGLang's LoRA backend interface on lora-fused's delta kernels.

Follows SGLang v0.5 (``python/sglang/srt/lora/backend/triton_backend.py`` and
``triton_ops/{sgemm_lora_a,sgemm_lora_b,qkv_lora_b,gate_up_lora_b}.py``, with
``LoRABatchInfo`` from ``lora/utils.py``). Layouts and meaning:

- x [s, in]: the tokens of all segments; segment b < ``num_segments`` (``bs`` when the
  field is absent) is positions ``seg_indptr[b] : seg_indptr[b] + seg_lens[b]`` of adapter
  slot ``weight_indices[b]``. The csgmv backend (``backend/chunked_backend.py``) cuts each
  adapter's tokens into chunks, so a request may span several segments, and leaves
  ``seg_lens`` None: a segment then ends at ``seg_indptr[b + 1]``. With ``permutation``,
  position p inside a segment is token row ``permutation[p]`` (SGLang's sorted-by-adapter
  order), else row p; entries past the segments are never read (they may be stale).
- ``lora_ranks`` [n] (0: the slot adds nothing, SGLang's base-model slot) and ``scalings``
  [n] per slot; a slot's scaling multiplies its B product (``*_lora_b`` kernels).
- Stacked A: [n, c·r_max, in] with c = 1, 2 (gate|up) or 3 (q|k|v), packed *compactly*:
  slice j of a rank-r_i adapter is rows ``j·r_i : (j+1)·r_i`` (SGLang's memory pool
  copies ``cat(A_q, A_k, A_v)`` into ``buffer[slot, :c·r_i]``), and the lora-A output
  [s, c·r_max] holds slice j at columns ``j·r_i : (j+1)·r_i``.
- B: [n, out_total, r_max], of which columns ``:r_i`` are used; qkv's slice bounds are
  ``output_offset`` = [0, q, q+kv, q+2kv], gate|up's two halves of out_total.
- ``base_output``: added into in place and returned; None: a fresh output of the delta.

Each function takes the batch info as an argument (any object with those field names);
:class:`LoRAFusedBackend` holds it as SGLang's backends do::

    backend = LoRAFusedBackend(batch_info)            # per forward batch
    out = backend.run_qkv_lora(x, qkv_lora_a, qkv_lora_b, output_offset, max_qkv_out_dim,
                               base_output=base_output)

What differs from SGLang: entries SGLang leaves unwritten (lora-A columns past c·r_i,
tokens outside every segment, rank-0 slots) are zeros here; ``output_offset`` is read
on the host, again only when it changes (slice widths decide the launch); the tuple
forms of ``qkv_lora_b`` / ``gate_up_lora_b`` are not accepted.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.delta import PackedA, apply_delta, apply_expand, apply_shrink, check_writable_output
from ..dispatch.segments import SegmentPlan, plan_segments
from ..value_cache import derived
from . import cached_plan

__all__ = ["LoRAFusedBackend", "run_lora_a_sgemm", "run_lora_b_sgemm", "run_qkv_lora", "run_gate_up_lora",
           "batch_plan"]


def _field(batch_info, name: str, required: bool = True):
    value = getattr(batch_info, name, None)
    if value is None and required:
        raise ValueError(f"batch_info has no {name!r} (SGLang's LoRABatchInfo field)")
    return value


def _segment_count(batch_info) -> int:
    """How many segments SGLang's kernels loop over: ``num_segments`` (the csgmv backend cuts a
    request into chunks, so one request may be several segments; the triton backend sets it to
    ``bs``), or ``bs`` for a batch info without the field."""
    count = getattr(batch_info, "num_segments", None)
    return int(batch_info.bs if count is None else count)


def _segment_fields(batch_info, count: int, num_tokens: int, device):
    """(start, length, slot) int64 [count] of the segments, and the permutation [num_tokens] or
    None, on ``device``; ValueError naming a field too short for ``count`` segments."""
    indptr = _field(batch_info, "seg_indptr")
    weights = _field(batch_info, "weight_indices")
    seg_lens = _field(batch_info, "seg_lens", required=False)
    permutation = _field(batch_info, "permutation", required=False)
    needed = (("seg_indptr", indptr, count + 1), ("weight_indices", weights, count),
              ("seg_lens", seg_lens, count), ("permutation", permutation, num_tokens))
    for name, t, length in needed:
        if t is not None and (t.dim() != 1 or t.shape[0] < length):
            raise ValueError(f"batch_info.{name} must be 1-D with at least {length} entries ({count} segments, "
                             f"{num_tokens} tokens), got shape {tuple(t.shape)}")
    indptr = indptr.to(device=device, dtype=torch.int64)[:count + 1]
    starts = indptr[:-1]
    # the csgmv backend leaves seg_lens None: a segment ends where the next starts
    lens = indptr[1:] - starts if seg_lens is None else seg_lens.to(device=device, dtype=torch.int64)[:count]
    slots = weights.to(device=device, dtype=torch.int64)[:count]
    if permutation is not None:
        permutation = permutation.to(device=device, dtype=torch.int64)[:num_tokens]
    return starts, lens, slots, permutation


def _row_adapters(batch_info, num_tokens: int, device) -> Tensor:
    """int64 [s]: each token row's adapter slot, -1 outside every segment (no host sync).

    As SGLang's kernels: segment b < ``num_segments`` covers positions
    ``seg_indptr[b] : seg_indptr[b] + len_b``, and position p is row ``permutation[p]`` (or p)."""
    count = _segment_count(batch_info)
    starts, lens, slots, permutation = _segment_fields(batch_info, count, num_tokens, device)
    pos = torch.arange(num_tokens, device=device)
    if count == 0:
        return torch.full_like(pos, -1)
    seg = torch.searchsorted((starts + lens).contiguous(), pos, right=True).clamp(max=count - 1)
    inside = (pos >= starts[seg]) & (pos < starts[seg] + lens[seg])
    ids_at_pos = torch.where(inside, slots[seg], -1)
    if permutation is None:
        return ids_at_pos
    # SGLang reads permutation[p] only inside a segment: entries past the segments may be stale
    # (a CUDA-graph buffer keeps the previous batch's) and name live rows, so they go to a spare
    # row num_tokens, dropped after the scatter.
    rows = torch.where(inside, permutation, num_tokens)
    return torch.full((num_tokens + 1,), -1, dtype=torch.int64, device=device).scatter_(0, rows, ids_at_pos)[:-1]


def batch_plan(batch_info, n: int, num_tokens: int, device) -> SegmentPlan:
    """The :class:`SegmentPlan` of a ``LoRABatchInfo`` for ``num_tokens`` rows and n slots.

    Built without a host sync (a range check of the slots reads them once per batch, skipped
    while capturing); cached while the metadata tensors are unchanged
    (:func:`lora_fused.integrations.cached_plan`)."""
    tensors = tuple(getattr(batch_info, f, None) for f in ("seg_indptr", "weight_indices", "seg_lens", "permutation"))
    tag = ("sglang", _segment_count(batch_info), n, num_tokens)
    return cached_plan(tag, tensors, _field(batch_info, "seg_indptr"),
                       lambda: plan_segments(_row_adapters(batch_info, num_tokens, device), n))


def _slot_vectors(batch_info, n: int, device) -> tuple[Tensor, Tensor]:
    """(ranks int32 [n], scalings fp32 [n]) of the slots."""
    ranks = _field(batch_info, "lora_ranks").to(device=device)[:n]
    scalings = _field(batch_info, "scalings").to(device=device)[:n]
    if ranks.shape[0] != n or scalings.shape[0] != n:
        raise ValueError(f"batch_info.lora_ranks {tuple(ranks.shape)} and scalings {tuple(scalings.shape)} must "
                         f"have an entry per slot of the weight stacks (n={n})")
    return ranks.to(torch.int32), scalings.float()


def _check_x(x: Tensor, weights: Tensor, name: str) -> None:
    if x.dim() != 2 or weights.dim() != 3:
        raise ValueError(f"x must be [s, cols] and {name} [num_lora, rows, cols], got x {tuple(x.shape)}, "
                         f"{name} {tuple(weights.shape)}")
    if x.dtype != weights.dtype or x.device != weights.device:
        raise TypeError(f"{name} is {weights.dtype} on {weights.device} but x is {x.dtype} on {x.device}")


def _output(base_output: Optional[Tensor], x: Tensor, out_total: int) -> Tensor:
    if base_output is None:
        return torch.zeros((x.shape[0], out_total), dtype=x.dtype, device=x.device)
    if tuple(base_output.shape) != (x.shape[0], out_total) or base_output.dtype != x.dtype \
            or base_output.device != x.device:
        raise ValueError(f"base_output must be {x.dtype} [s={x.shape[0]}, {out_total}] on {x.device}, got "
                         f"{base_output.dtype} {tuple(base_output.shape)} on {base_output.device}")
    check_writable_output(base_output, "base_output")
    return base_output


def run_lora_a_sgemm(x: Tensor, weights: Tensor, batch_info, stack_num: int = 1) -> Tensor:
    """[s, stack_num·r_max]: row t (slot i) holds x[t] weights[i, :stack_num·r_i]ᵀ in its first
    stack_num·r_i columns (compact slices), zeros elsewhere. weights [n, stack_num·r_max, in]."""
    _check_x(x, weights, "weights")
    n, rows, in_features = weights.shape
    if x.shape[1] != in_features or rows % stack_num:
        raise ValueError(f"weights {tuple(weights.shape)} must be [num_lora, stack_num={stack_num} x r, "
                         f"in={x.shape[1]}]")
    plan = batch_plan(batch_info, n, x.shape[0], x.device)
    ranks, _ = _slot_vectors(batch_info, n, x.device)
    with torch.no_grad():
        return apply_shrink(x, PackedA(weights.unsqueeze(1), compact=True, n_slices=stack_num), plan, ranks)


def _run_b(x: Tensor, weights: Tensor, batch_info, widths: tuple[int, ...], base_output):
    """out (+)= s_i · x[t, slice j of rank r_i] B_i[slice j, :r_i]ᵀ (compact lora-A output)."""
    _check_x(x, weights, "weights")
    n, out_total, r_max = weights.shape
    if x.shape[1] != len(widths) * r_max:
        raise ValueError(f"x must be the lora-A output [s, {len(widths)} x r_max={r_max}], got {tuple(x.shape)}")
    if sum(widths) != out_total:
        raise ValueError(f"slice widths {widths} sum to {sum(widths)} but weights have {out_total} output rows")
    out = _output(base_output, x, out_total)
    plan = batch_plan(batch_info, n, x.shape[0], x.device)
    ranks, scalings = _slot_vectors(batch_info, n, x.device)
    with torch.no_grad():
        return apply_expand(out, x, weights, plan, scalings, ranks, widths, compact=True)


def run_lora_b_sgemm(x: Tensor, weights: Tensor, batch_info, base_output: Optional[Tensor] = None) -> Tensor:
    """out[t] (+)= scalings[i] · x[t, :r_i] weights[i, :, :r_i]ᵀ; x [s, r_max], weights [n, out, r_max]."""
    return _run_b(x, weights, batch_info, (weights.shape[1],), base_output)


def _fused(x, lora_a, lora_b, batch_info, widths, base_output, name):
    """Shrink over the c compact slices (x read once), then the expand of every slice."""
    _check_x(x, lora_a, f"{name}_lora_a")
    _check_x(x, lora_b, f"{name}_lora_b")
    c = len(widths)
    n, rows, in_features = lora_a.shape
    r_max = lora_b.shape[2]
    if x.shape[1] != in_features or rows != c * r_max or lora_b.shape[0] != n or lora_b.shape[1] != sum(widths):
        raise ValueError(f"{name}_lora_a must be [num_lora, {c} x r, in={x.shape[1]}] and {name}_lora_b "
                         f"[num_lora, {sum(widths)}, r] (slices {widths}), got {tuple(lora_a.shape)} and "
                         f"{tuple(lora_b.shape)}")
    out = _output(base_output, x, sum(widths))
    plan = batch_plan(batch_info, n, x.shape[0], x.device)
    ranks, scalings = _slot_vectors(batch_info, n, x.device)
    with torch.no_grad():
        return apply_delta(out, x, PackedA(lora_a.unsqueeze(1), compact=True, n_slices=c), lora_b, plan,
                           scalings, ranks, widths)


def _read_bounds(output_offset: Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in output_offset.tolist())


def _offset_widths(output_offset) -> tuple[int, ...]:
    """Slice widths from SGLang's ``output_offset`` [0, q, q+kv, q+2kv] (a tensor is read on the
    host, again only when it changes: :func:`lora_fused.value_cache.derived`)."""
    if isinstance(output_offset, Tensor):
        bounds = derived(_read_bounds, (output_offset,))
    else:
        bounds = tuple(int(v) for v in output_offset)
    if len(bounds) != 4 or bounds[0] != 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"output_offset must be [0, q, q+kv, q+2kv] (increasing), got {bounds}")
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def run_qkv_lora(x: Tensor, qkv_lora_a: Tensor, qkv_lora_b: Tensor, batch_info, output_offset,
                 max_qkv_out_dim: Optional[int] = None, base_output: Optional[Tensor] = None) -> Tensor:
    """q|k|v LoRA: qkv_lora_a [n, 3·r, in], qkv_lora_b [n, q + 2·kv, r], output_offset [0, q, q+kv, q+2kv].

    ``max_qkv_out_dim`` is accepted for SGLang's signature (the launch grid here is sized from
    the slice widths)."""
    return _fused(x, qkv_lora_a, qkv_lora_b, batch_info, _offset_widths(output_offset), base_output, "qkv")


def run_gate_up_lora(x: Tensor, gate_up_lora_a: Tensor, gate_up_lora_b: Tensor, batch_info,
                     base_output: Optional[Tensor] = None) -> Tensor:
    """gate|up LoRA: gate_up_lora_a [n, 2·r, in], gate_up_lora_b [n, 2·out, r]."""
    half = gate_up_lora_b.shape[1] // 2
    if gate_up_lora_b.dim() != 3 or 2 * half != gate_up_lora_b.shape[1]:
        raise ValueError(f"gate_up_lora_b must be [num_lora, 2 x out, r], got {tuple(gate_up_lora_b.shape)}")
    return _fused(x, gate_up_lora_a, gate_up_lora_b, batch_info, (half, half), base_output, "gate_up")


class LoRAFusedBackend:
    """SGLang's backend methods over one batch's ``LoRABatchInfo`` (``self.batch_info``)."""

    name = "lora_fused"

    def __init__(self, batch_info=None):
        self.batch_info = batch_info

    def run_lora_a_sgemm(self, x: Tensor, weights: Tensor, *args, stack_num: int = 1, **kwargs) -> Tensor:
        return run_lora_a_sgemm(x, weights, self.batch_info, stack_num)

    def run_lora_b_sgemm(self, x: Tensor, weights: Tensor, base_output: Optional[Tensor] = None,
                         *args, **kwargs) -> Tensor:
        return run_lora_b_sgemm(x, weights, self.batch_info, base_output)

    def run_qkv_lora(self, x: Tensor, qkv_lora_a: Tensor, qkv_lora_b: Tensor, output_offset,
                     max_qkv_out_dim: Optional[int] = None, base_output: Optional[Tensor] = None,
                     *args, **kwargs) -> Tensor:
        return run_qkv_lora(x, qkv_lora_a, qkv_lora_b, self.batch_info, output_offset, max_qkv_out_dim,
                            base_output)

    def run_gate_up_lora(self, x: Tensor, gate_up_lora_a: Tensor, gate_up_lora_b: Tensor,
                         base_output: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        return run_gate_up_lora(x, gate_up_lora_a, gate_up_lora_b, self.batch_info, base_output)
