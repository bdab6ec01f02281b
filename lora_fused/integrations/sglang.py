"""SGLang's LoRA backend interface on lora-fused's delta kernels.

Follows SGLang's ``python/sglang/srt/lora/backend/`` (``base_backend.py``, ``triton_backend.py``,
``chunked_backend.py``; ``LoRABatchInfo`` from ``lora/utils.py``; tests/integrations/test_engine_wrappers.py
cites the commits read). Layouts and meaning:

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
- B: [n, out_total, r_max], of which columns ``:r_i`` are used; the slice bounds are
  ``output_offset`` ([0, q, q+kv, q+2kv] for q|k|v), gate|up's two halves of out_total.
- ``base_output``: added into in place and returned; None: a fresh output of the delta.

Two ways in:

- :class:`LoRAFusedBackend`, SGLang's backend object: its LoRA manager constructs it, gives
  each batch to ``prepare_lora_batch``, and its layers call the ``run_*`` methods;
  :func:`register` adds it to SGLang's backend choice (``--lora-backend lora_fused``).
- The free functions, which take a ``LoRABatchInfo`` (any object with those field names) as
  an argument.

What differs from SGLang: entries SGLang leaves unwritten (lora-A columns past c·r_i,
tokens outside every segment, rank-0 slots) are zeros here; ``output_offset`` is read on
the host (its pinned CPU copy ``output_offset_cpu`` when given), again only when it changes
(slice widths decide the launch); the tuple forms of the B weights are concatenated per call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..ops.delta import PackedA, apply_delta, apply_expand, apply_shrink, check_writable_output
from ..dispatch.segments import SegmentPlan, plan_segments
from ..value_cache import derived
from . import RowPlans, cached_plan, copy_from_host, opt_in_entry_point, refuse_unknown

__all__ = ["LoRAFusedBackend", "run_lora_a_sgemm", "run_lora_b_sgemm", "run_qkv_lora", "run_gate_up_lora",
           "batch_plan", "register", "load_plugin", "BACKEND_NAME", "OPT_IN_VARIABLE"]

#: The name SGLang selects the backend by (``--lora-backend lora_fused``) once :func:`register` ran.
BACKEND_NAME = "lora_fused"
#: The environment variable that lets the ``sglang.srt.plugins`` entry point act (see :func:`load_plugin`).
OPT_IN_VARIABLE = "LORA_FUSED_SGLANG"


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


# --------------------------------------------------------------------------
# The computations, given a plan and the slot vectors
# --------------------------------------------------------------------------

def _lora_a(x: Tensor, weights: Tensor, stack_num: int, plan: SegmentPlan, ranks: Tensor) -> Tensor:
    """[s, stack_num·r_max]: row t (slot i) holds x[t] weights[i, :stack_num·r_i]ᵀ in its first
    stack_num·r_i columns (compact slices), zeros elsewhere. weights [n, stack_num·r_max, in]."""
    _check_x(x, weights, "weights")
    n, rows, in_features = weights.shape
    if x.shape[1] != in_features or rows % stack_num:
        raise ValueError(f"weights {tuple(weights.shape)} must be [num_lora, stack_num={stack_num} x r, "
                         f"in={x.shape[1]}]")
    with torch.no_grad():
        return apply_shrink(x, PackedA(weights.unsqueeze(1), compact=True, n_slices=stack_num), plan, ranks)


def _lora_b(x: Tensor, weights: Tensor, widths: tuple[int, ...], base_output, plan: SegmentPlan, ranks: Tensor,
            scalings: Tensor) -> Tensor:
    """out (+)= s_i · x[t, slice j of rank r_i] B_i[slice j, :r_i]ᵀ (compact lora-A output)."""
    _check_x(x, weights, "weights")
    n, out_total, r_max = weights.shape
    if x.shape[1] != len(widths) * r_max:
        raise ValueError(f"x must be the lora-A output [s, {len(widths)} x r_max={r_max}], got {tuple(x.shape)}")
    if sum(widths) != out_total:
        raise ValueError(f"slice widths {widths} sum to {sum(widths)} but weights have {out_total} output rows")
    out = _output(base_output, x, out_total)
    with torch.no_grad():
        return apply_expand(out, x, weights, plan, scalings, ranks, widths, compact=True)


def _fused(x, lora_a, lora_b, widths, base_output, plan: SegmentPlan, ranks: Tensor, scalings: Tensor, name: str):
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
    with torch.no_grad():
        return apply_delta(out, x, PackedA(lora_a.unsqueeze(1), compact=True, n_slices=c), lora_b, plan,
                           scalings, ranks, widths)


def _read_bounds(output_offset: Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in output_offset.tolist())


def _offset_widths(output_offset, n_slices: int = 3) -> tuple[int, ...]:
    """Slice widths from SGLang's ``output_offset`` [0, o_1, ..., o_S] (a tensor is read on the
    host, again only when it changes: :func:`lora_fused.value_cache.derived`)."""
    if isinstance(output_offset, Tensor):
        bounds = derived(_read_bounds, (output_offset,))
    else:
        bounds = tuple(int(v) for v in output_offset)
    if len(bounds) != n_slices + 1 or bounds[0] != 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
        example = "[0, q, q+kv, q+2kv]" if n_slices == 3 else f"[0, o_1, ..., o_{n_slices}]"
        raise ValueError(f"output_offset must be {example} (increasing, {n_slices} slices), got {bounds}")
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


# --------------------------------------------------------------------------
# Free functions: the batch info as an argument
# --------------------------------------------------------------------------

def run_lora_a_sgemm(x: Tensor, weights: Tensor, batch_info, stack_num: int = 1) -> Tensor:
    """[s, stack_num·r_max]: row t (slot i) holds x[t] weights[i, :stack_num·r_i]ᵀ in its first
    stack_num·r_i columns (compact slices), zeros elsewhere. weights [n, stack_num·r_max, in]."""
    n = weights.shape[0]
    return _lora_a(x, weights, stack_num, batch_plan(batch_info, n, x.shape[0], x.device),
                   _slot_vectors(batch_info, n, x.device)[0])


def run_lora_b_sgemm(x: Tensor, weights: Tensor, batch_info, base_output: Optional[Tensor] = None) -> Tensor:
    """out[t] (+)= scalings[i] · x[t, :r_i] weights[i, :, :r_i]ᵀ; x [s, r_max], weights [n, out, r_max]."""
    n = weights.shape[0]
    return _lora_b(x, weights, (weights.shape[1],), base_output, batch_plan(batch_info, n, x.shape[0], x.device),
                   *_slot_vectors(batch_info, n, x.device))


def _batch_fused(x, lora_a, lora_b, batch_info, widths, base_output, name):
    n = lora_a.shape[0]
    return _fused(x, lora_a, lora_b, widths, base_output, batch_plan(batch_info, n, x.shape[0], x.device),
                  *_slot_vectors(batch_info, n, x.device), name)


def run_qkv_lora(x: Tensor, qkv_lora_a: Tensor, qkv_lora_b: Tensor, batch_info, output_offset,
                 max_qkv_out_dim: Optional[int] = None, base_output: Optional[Tensor] = None) -> Tensor:
    """q|k|v LoRA: qkv_lora_a [n, 3·r, in], qkv_lora_b [n, q + 2·kv, r], output_offset [0, q, q+kv, q+2kv].

    ``max_qkv_out_dim`` is accepted for SGLang's signature (the launch grid here is sized from
    the slice widths)."""
    return _batch_fused(x, qkv_lora_a, qkv_lora_b, batch_info, _offset_widths(output_offset), base_output, "qkv")


def _halves(gate_up_lora_b: Tensor) -> tuple[int, int]:
    half = gate_up_lora_b.shape[1] // 2
    if gate_up_lora_b.dim() != 3 or 2 * half != gate_up_lora_b.shape[1]:
        raise ValueError(f"gate_up_lora_b must be [num_lora, 2 x out, r], got {tuple(gate_up_lora_b.shape)}")
    return half, half


def run_gate_up_lora(x: Tensor, gate_up_lora_a: Tensor, gate_up_lora_b: Tensor, batch_info,
                     base_output: Optional[Tensor] = None) -> Tensor:
    """gate|up LoRA: gate_up_lora_a [n, 2·r, in], gate_up_lora_b [n, 2·out, r]."""
    return _batch_fused(x, gate_up_lora_a, gate_up_lora_b, batch_info, _halves(gate_up_lora_b), base_output,
                        "gate_up")


# --------------------------------------------------------------------------
# The backend object
# --------------------------------------------------------------------------

@dataclass
class FusedBatchInfo:
    """The backend's ``batch_info``: what SGLang reads of it (its layers test it for None, its
    LoRA manager sets ``has_active_lora``). The metadata itself is in the backend's buffers."""
    bs: int
    num_tokens: int
    use_cuda_graph: bool
    has_active_lora: bool


def _b_tensor(b, name: str) -> Tensor:
    """SGLang's tuple form of a B weight as one [n, out_total, r] tensor (a copy per call): q|k|v as
    (q [1, n, q, r], kv [2, n, kv, r]), gate|up as two [n, out, r]."""
    if isinstance(b, Tensor):
        return b
    if not isinstance(b, (tuple, list)) or len(b) != 2 or not all(isinstance(t, Tensor) for t in b):
        raise TypeError(f"{name} must be a tensor or SGLang's tuple of two tensors, got {type(b).__name__}")
    parts = [b[0][0], b[1][0], b[1][1]] if b[0].dim() == 4 else list(b)
    return torch.cat(parts, dim=1)


def _widths(output_offset, output_offset_cpu, n_slices: int, default: Optional[tuple], name: str) -> tuple:
    """The slice widths: from ``output_offset_cpu`` (SGLang's pinned copy: no device read) or
    ``output_offset``, else ``default``."""
    offset = output_offset_cpu if output_offset_cpu is not None else output_offset
    if offset is not None:
        return _offset_widths(offset, n_slices)
    if default is None:
        raise ValueError(f"{name} needs output_offset (the slice bounds) when its B weight is one tensor")
    return default


class LoRAFusedBackend:
    """SGLang's LoRA backend (``BaseLoRABackend``'s interface) on lora-fused's delta kernels.

    SGLang's LoRA manager constructs it (``max_loras_per_batch``, ``device``, its server args),
    calls ``init_cuda_graph_batch_info`` before capturing CUDA graphs, and gives each forward
    batch to ``prepare_lora_batch`` (each request's slot, the slots' ranks and scalings); every
    LoRA layer then calls ``run_lora_a_sgemm`` / ``run_lora_b_sgemm`` / ``run_qkv_lora`` /
    ``run_gate_up_lora``. Each token's slot goes into a fixed device buffer and the plan is
    built on the device at the first layer call of the batch, then shared by every other one
    (:class:`~lora_fused.integrations.RowPlans`: no host sync, CUDA-graph safe, rows past the
    batch get no LoRA); ranks and scalings go into fixed [max_loras_per_batch] buffers.

    Signatures take every argument SGLang's layers pass (``output_offset`` and its pinned CPU
    copy ``output_offset_cpu``, ``max_qkv_out_dim``, ``n_slices``, ``pruned_batch_info``, the
    older ``batch_info=`` and the newer ``use_cuda_graph=`` of ``prepare_lora_batch``); an
    unknown argument raises TypeError. Not provided: embedding LoRA (``run_lora_a_embedding``),
    MoE LoRA, the prefill CUDA graph, and the lm head's pruned rows in extend batches unless
    SGLang passes ``pruned_batch_info`` (a run with fewer rows than the batch raises)."""

    name = BACKEND_NAME
    supports_prefill_cuda_graph = False
    prefill_cuda_graph_max_bs: Optional[int] = None  # SGLang reads them: None, no prefill CUDA graph
    prefill_cuda_graph_max_tokens: Optional[int] = None

    def __init__(self, max_loras_per_batch: int, device, *, server_args=None, **kwargs):
        refuse_unknown(kwargs, "LoRAFusedBackend")
        self.max_loras_per_batch = max_loras_per_batch
        self.device = torch.device(device)
        self.server_args = server_args
        self.batch_info: Optional[FusedBatchInfo] = None
        # SGLang's lm head layer reads these: no pruned lm head batch (see the class docstring)
        self.lm_head_batch_info = None
        self.lm_head_pass_batch_infos = None
        self._lm_head_pass_idx = None
        self._ranks = torch.zeros(max_loras_per_batch, dtype=torch.int32, device=self.device)
        self._scalings = torch.zeros(max_loras_per_batch, dtype=torch.float32, device=self.device)
        self._eager_rows = RowPlans(256, self.device)  # grows with the batches (eager only)
        self._graph_rows: Optional[RowPlans] = None
        self._tokens_per_req = 1
        self._rows: Optional[RowPlans] = None

    @property
    def is_moe_lora(self) -> bool:
        return False

    @is_moe_lora.setter
    def is_moe_lora(self, value: bool) -> None:
        if value:
            raise NotImplementedError(f"LoRAFusedBackend has no MoE LoRA: use another --lora-backend for LoRA on "
                                      f"MoE experts")

    # ---- the batch --------------------------------------------------------

    def init_cuda_graph_batch_info(self, *, max_bs_in_cuda_graph: int, cuda_graph_batch_info=None,
                                   num_tokens_per_req: Optional[int] = None, num_tokens_per_bs: Optional[int] = None):
        """Fixed buffers for CUDA-graph batches of up to ``max_bs_in_cuda_graph`` requests of
        ``num_tokens_per_req`` (``num_tokens_per_bs`` in some SGLang versions) tokens each. The
        older form passes the manager's ``cuda_graph_batch_info``; it is then the CUDA-graph
        signal of ``prepare_lora_batch`` (its tensors are not read)."""
        per_req = num_tokens_per_req or num_tokens_per_bs or 1
        self._tokens_per_req = per_req
        self._graph_rows = RowPlans(max_bs_in_cuda_graph * per_req, self.device)

    def init_prefill_cuda_graph_batch_info(self, max_num_tokens: int):
        raise NotImplementedError("LoRAFusedBackend has no prefill CUDA graph (supports_prefill_cuda_graph is False)")

    def prepare_lora_batch(self, forward_batch, weight_indices, lora_ranks, scalings, batch_info=None, *,
                           use_cuda_graph: bool = False, use_prefill_cuda_graph: bool = False):
        """Each request's slot (``weight_indices``, one per request) repeated over its tokens
        (``forward_batch.extend_seq_lens_cpu`` when extending, else one), and the slots' ranks
        and scalings, copied to the device without a host sync. ``use_cuda_graph`` (or the older
        ``batch_info=``, or a bool in its place) selects the CUDA-graph buffers."""
        if isinstance(batch_info, bool):  # SGLang's newer positional form: (..., use_cuda_graph)
            use_cuda_graph, batch_info = batch_info, None
        if use_prefill_cuda_graph:
            raise ValueError("LoRAFusedBackend has no prefill CUDA graph (supports_prefill_cuda_graph is False)")
        graph = bool(use_cuda_graph) or batch_info is not None
        if graph and self._graph_rows is None:
            raise RuntimeError("prepare_lora_batch(use_cuda_graph=True) before init_cuda_graph_batch_info()")
        slots = torch.as_tensor(list(weight_indices), dtype=torch.int64)
        ids = torch.repeat_interleave(slots, torch.as_tensor(self._request_lengths(forward_batch, graph,
                                                                                 len(slots)), dtype=torch.int64))
        self._check_slot_lists(slots, lora_ranks, scalings)
        rows = self._graph_rows if graph else self._eager_rows_for(ids.shape[0])
        rows.set_rows(ids)
        copy_from_host(self._ranks, torch.as_tensor(list(lora_ranks), dtype=torch.int32))
        copy_from_host(self._scalings, torch.as_tensor(list(scalings), dtype=torch.float32))
        self._rows = rows
        active = any(lora_ranks[w] > 0 for w in slots.tolist())
        self.batch_info = FusedBatchInfo(len(slots), ids.shape[0], graph, active)

    def reset_batch_state(self) -> None:
        """No batch prepared (SGLang's idle forwards): the layers then skip LoRA."""
        self.batch_info = None
        self._rows = None

    def _request_lengths(self, forward_batch, graph: bool, bs: int) -> list:
        if getattr(forward_batch, "batch_size", bs) != bs:
            raise ValueError(f"weight_indices has {bs} entries but forward_batch.batch_size is "
                             f"{forward_batch.batch_size}: give one slot per request")
        if graph:  # SGLang's CUDA-graph batches: the same token count per request
            return [self._tokens_per_req] * bs
        if forward_batch.forward_mode.is_extend():
            lengths = getattr(forward_batch, "extend_seq_lens_cpu", None)
            if lengths is None or len(lengths) != bs:
                raise ValueError(f"an extend batch needs forward_batch.extend_seq_lens_cpu (one length per request, "
                                 f"{bs} requests), got {lengths!r}")
            return list(lengths)
        return [1] * bs

    def _check_slot_lists(self, slots: Tensor, lora_ranks, scalings) -> None:
        n = self.max_loras_per_batch
        if len(lora_ranks) != n or len(scalings) != n:
            raise ValueError(f"lora_ranks ({len(lora_ranks)}) and scalings ({len(scalings)}) must have one entry per "
                             f"slot (max_loras_per_batch={n})")
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= n):
            raise ValueError(f"weight_indices must lie in [0, {n}) (max_loras_per_batch), got {slots.tolist()}")

    def _eager_rows_for(self, num_rows: int) -> RowPlans:
        if num_rows > self._eager_rows.capacity:  # eager only: no captured graph reads this buffer
            self._eager_rows = RowPlans(max(num_rows, 2 * self._eager_rows.capacity), self.device)
        return self._eager_rows

    def _batch(self, x: Tensor, weights: Tensor, pruned_batch_info=None):
        """(plan, ranks, scalings) of x's rows: the prepared batch's, or those of SGLang's
        ``pruned_batch_info`` (its lm head's rows) through the free functions' cached plans."""
        n = weights.shape[0]
        if pruned_batch_info is not None:
            return (batch_plan(pruned_batch_info, n, x.shape[0], x.device),
                    *_slot_vectors(pruned_batch_info, n, x.device))
        if self._rows is None:
            raise RuntimeError("LoRAFusedBackend: no batch prepared (prepare_lora_batch() first)")
        if x.shape[0] < self.batch_info.num_tokens:
            raise ValueError(f"x has {x.shape[0]} rows, fewer than the batch's {self.batch_info.num_tokens} tokens, "
                             f"and no pruned_batch_info says which: LoRAFusedBackend has no lm head LoRA for "
                             f"pruned extend batches (remove lm_head from the LoRA target modules)")
        if n != self.max_loras_per_batch:
            raise ValueError(f"the weights hold {n} slots but the backend has max_loras_per_batch="
                             f"{self.max_loras_per_batch}, got weights {tuple(weights.shape)}")
        return self._rows.plan(x.shape[0], n), self._ranks, self._scalings

    # ---- the layer calls --------------------------------------------------

    def run_lora_a_sgemm(self, x: Tensor, weights: Tensor, pruned_batch_info=None, stack_num: int = 1,
                         **kwargs) -> Tensor:
        """[s, stack_num·r_max], see :func:`run_lora_a_sgemm`."""
        refuse_unknown(kwargs, "run_lora_a_sgemm")
        plan, ranks, _ = self._batch(x, weights, pruned_batch_info)
        return _lora_a(x, weights, stack_num, plan, ranks)

    def run_lora_b_sgemm(self, x: Tensor, weights: Tensor, output_offset=None, base_output: Optional[Tensor] = None,
                         pruned_batch_info=None, *, output_offset_cpu=None, **kwargs) -> Tensor:
        """out (+)= s_i · x[t, :r_i] weights[i, :, :r_i]ᵀ, see :func:`run_lora_b_sgemm`; output_offset
        (SGLang's [0, out]) must span weights' output rows."""
        refuse_unknown(kwargs, "run_lora_b_sgemm")
        widths = _widths(output_offset, output_offset_cpu, 1, (weights.shape[1],), "run_lora_b_sgemm")
        if widths != (weights.shape[1],):
            raise ValueError(f"output_offset {[0, *widths]} must be [0, {weights.shape[1]}] (weights "
                             f"{tuple(weights.shape)})")
        return _lora_b(x, weights, widths, base_output, *self._batch(x, weights, pruned_batch_info))

    def run_qkv_lora(self, x: Tensor, qkv_lora_a: Tensor, qkv_lora_b, output_offset=None,
                     max_qkv_out_dim: Optional[int] = None, base_output: Optional[Tensor] = None,
                     n_slices: Optional[int] = None, *, output_offset_cpu=None, **kwargs) -> Tensor:
        """The n_slices (default 3: q|k|v) LoRA of a merged projection, see :func:`run_qkv_lora`.
        ``max_qkv_out_dim``, SGLang's launch width, must cover the widest slice."""
        refuse_unknown(kwargs, "run_qkv_lora")
        tuple_form = not isinstance(qkv_lora_b, Tensor)
        b = _b_tensor(qkv_lora_b, "qkv_lora_b")
        default = (qkv_lora_b[0].shape[2], *[qkv_lora_b[1].shape[2]] * 2) if tuple_form else None
        widths = _widths(output_offset, output_offset_cpu, n_slices or 3, default, "run_qkv_lora")
        if max_qkv_out_dim is not None and max_qkv_out_dim < max(widths):
            raise ValueError(f"max_qkv_out_dim={max_qkv_out_dim} is narrower than the widest slice of {widths}")
        return _fused(x, qkv_lora_a, b, widths, base_output, *self._batch(x, qkv_lora_a), "qkv")

    def run_gate_up_lora(self, x: Tensor, gate_up_lora_a: Tensor, gate_up_lora_b, output_offset=None,
                         base_output: Optional[Tensor] = None, *, output_offset_cpu=None, **kwargs) -> Tensor:
        """gate|up LoRA, see :func:`run_gate_up_lora` (gate_up_lora_b a tensor or two [n, out, r])."""
        refuse_unknown(kwargs, "run_gate_up_lora")
        b = _b_tensor(gate_up_lora_b, "gate_up_lora_b")
        widths = _widths(output_offset, output_offset_cpu, 2, _halves(b), "run_gate_up_lora")
        return _fused(x, gate_up_lora_a, b, widths, base_output, *self._batch(x, gate_up_lora_a), "gate_up")

    def run_lora_a_embedding(self, *args, **kwargs):
        raise NotImplementedError("LoRAFusedBackend has no embedding LoRA: remove embed_tokens from the LoRA target "
                                  "modules, or use another --lora-backend")


# --------------------------------------------------------------------------
# Selection by SGLang
# --------------------------------------------------------------------------

def backend_class() -> type:
    """What SGLang's backend registry calls to get the class (its entries are factories)."""
    return LoRAFusedBackend


def register(name: str = BACKEND_NAME) -> str:
    """Add :class:`LoRAFusedBackend` to SGLang's backend choice under ``name`` (``--lora-backend
    lora_fused``) in this process, and return the name.

    SGLang picks the backend class by name from ``LORA_SUPPORTED_BACKENDS`` in
    ``sglang/srt/lora/backend/lora_registry.py`` (its ``register_lora_backend`` decorator), and
    its command line checks the name against ``server_args.LORA_BACKEND_CHOICES``: both get the
    name. SGLang runs its model in scheduler processes, which run their ``sglang.srt.plugins``
    entry points but not this: set ``LORA_FUSED_SGLANG=1`` for every SGLang process instead
    (lora-fused's entry point, :func:`load_plugin`, then calls this). ImportError when SGLang,
    or its backend registry, is not installed."""
    try:
        from sglang.srt.lora.backend import lora_registry
    except ImportError as error:
        raise ImportError("lora_fused.integrations.sglang.register() needs SGLang with its LoRA backend registry "
                          f"(sglang.srt.lora.backend.lora_registry: {error}); install or upgrade sglang, or call "
                          "the free functions run_qkv_lora / run_gate_up_lora / ... yourself") from error
    lora_registry.register_lora_backend(name)(backend_class)
    try:
        from sglang.srt import server_args
    except ImportError:  # the registry without the command line: nothing more to tell
        return name
    choices = getattr(server_args, "LORA_BACKEND_CHOICES", None)
    if isinstance(choices, list) and name not in choices:
        choices.append(name)
    return name


#: The plugin entry point (setup.py), run by SGLang in each of its processes: registers the backend only
#: when ``LORA_FUSED_SGLANG=1``.
load_plugin = opt_in_entry_point(OPT_IN_VARIABLE, register, "SGLang")
