"""The serving delta: multi-adapter LoRA added in place into an output the caller computed.

A serving engine computes its own base GEMM (often quantized, often over packed
projections: one ``qkv_proj`` for q|k|v) and adds the LoRA delta per slice:

    y[t, o_j : o_j + w_j] += scalings[i] · (x[t] A[i, j, :r_i]ᵀ) B[i, o_j : o_j + w_j, :r_i]ᵀ

for every row t whose adapter i = ids[t] >= 0 (rows with -1 are left as they are),
slices j = 0..S-1 of widths w_j (``slices``) at offsets o_j = w_0 + ... + w_{j-1}.
:func:`add_lora` is that operation. Inference only: nothing is recorded for autograd.

Two layouts of the S slices' rank rows (the *stacked rank axis*, length S · r_max):

- padded (:func:`add_lora`, vLLM): slice j, rank row k is ``A[i, j, k]``;
- compact (SGLang's stacked buffers): A is [n, S · r_max, in] and slice j's rank rows
  are ``A[i, j·r_i : (j+1)·r_i]`` (each adapter packs its slices at its own rank).

Both backends work on a :class:`~lora_fused.dispatch.segments.SegmentPlan`'s chunks, with no host
sync and no Python loop over adapters: Triton (``lora_fused.kernels.lora_delta``: one
shrink launch reading x once for all slices, one expand launch with a slice axis adding
into y) or plain torch (batched matmuls over the chunks, a loop over the S slices only).
Given a plan, a call is CUDA-graph safe (fixed grids, no host reads).
"""
from __future__ import annotations

import itertools
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ._scaffold import define_custom_op
from .._compat import has_internal_overlap
from ..dispatch.backend import backend_for, delta_kernels, device_type, on_tensor_device
from ..dispatch import segments
from ..dispatch.segments import SegmentPlan, values_checkable
from ..validation import SUPPORTED_DTYPES
from ..value_cache import derived

__all__ = ["add_lora"]


# --------------------------------------------------------------------------
# Checks (ValueError / TypeError naming the argument and the shapes seen)
# --------------------------------------------------------------------------


def check_slices(slices, out_total: int, n_slices: int) -> tuple[int, ...]:
    """``slices`` as a tuple of S positive ints summing to ``out_total`` (None: one slice)."""
    if slices is None:
        if n_slices != 1:
            raise ValueError(f"lora_A has {n_slices} slices (shape [n, S={n_slices}, r_max, in]) but slices is "
                             f"None: give the {n_slices} output widths, summing to out_total={out_total}")
        return (out_total,)
    if isinstance(slices, (str, bytes)) or not isinstance(slices, Sequence):
        raise TypeError(f"slices must be a sequence of ints (output widths), got {type(slices).__name__}")
    widths = tuple(slices)
    if any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w <= 0 for w in widths):
        raise ValueError(f"slices must hold positive ints (output widths), got {widths}")
    if len(widths) != n_slices:
        raise ValueError(f"slices has {len(widths)} widths {widths} but lora_A has {n_slices} slices")
    if sum(widths) != out_total:
        raise ValueError(f"slices {widths} sum to {sum(widths)} but lora_B / y have out_total={out_total} "
                         "columns: the widths must sum to out_total")
    return tuple(int(w) for w in widths)


def check_writable_output(y: Tensor, name: str = "y") -> None:
    """``y`` can be updated in place by an inference op: no autograd, no inference tensor
    outside inference mode, no overlapping memory (an expanded view)."""
    if y.requires_grad:
        raise ValueError(f"{name} requires grad ({tuple(y.shape)}); the LoRA delta is added in place and is "
                         f"inference-only: pass a tensor that does not require grad (e.g. computed under "
                         f"torch.no_grad() or detached)")
    if torch.compiler.is_compiling():
        return  # Dynamo cannot ask these; the compiled graph writes y through the custom op
    if y.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name} is an inference tensor, which cannot be updated in place outside "
                         f"torch.inference_mode(): call inside inference_mode, or pass a normal tensor")
    if has_internal_overlap(y):  # elements share memory
        raise ValueError(f"{name} has overlapping memory (strides {y.stride()}, e.g. an expanded view) and "
                         "cannot be updated in place: pass a tensor with its own storage (.contiguous())")


def as_scalings(scalings, n: int, device: torch.device, name: str = "scalings") -> Tensor:
    """A float tensor [n] on ``device`` (a Python number is broadcast to every adapter)."""
    if isinstance(scalings, numbers.Real) and not isinstance(scalings, bool):
        return torch.full((n,), float(scalings), dtype=torch.float32, device=device)
    if not isinstance(scalings, Tensor):
        raise TypeError(f"{name} must be a float tensor [n_adapters={n}] or a number, "
                        f"got {type(scalings).__name__}")
    if not scalings.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor [n_adapters={n}], got {scalings.dtype}")
    if tuple(scalings.shape) != (n,):
        raise ValueError(f"{name} must be [n_adapters={n}], got shape {tuple(scalings.shape)}")
    if scalings.device != device:
        raise ValueError(f"{name} is on {scalings.device} but x is on {device}; move it to x's device")
    return scalings


def as_ranks(ranks, n: int, r_max: int, device: torch.device, *, check_values: bool = True) -> Tensor:
    """int32 [n]: ``ranks`` checked to lie in [0, r_max] (0: the adapter adds nothing; the
    host read is skipped while tracing or capturing, or when told), or r_max for every adapter.
    Unchecked values are still safe: the kernels and the torch path clamp them to [0, r_max]."""
    if ranks is None:
        return torch.full((n,), r_max, dtype=torch.int32, device=device)
    if not isinstance(ranks, Tensor):
        raise TypeError(f"ranks must be an int32 or int64 tensor [n_adapters={n}], got {type(ranks).__name__}")
    if ranks.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ranks must be an int32 or int64 tensor, got {ranks.dtype}")
    if tuple(ranks.shape) != (n,):
        raise ValueError(f"ranks must be [n_adapters={n}], got shape {tuple(ranks.shape)}")
    if ranks.device != device:
        raise ValueError(f"ranks is on {ranks.device} but x is on {device}; move it to x's device")
    if check_values and n and values_checkable(ranks):
        if ranks.is_inference():  # no version counter to tell a change: check every call
            _check_rank_range(ranks, r_max)
        else:
            derived(_check_rank_range, (ranks,), (r_max,))  # a host read, again only when ranks changes
    return ranks.to(torch.int32)


def _check_rank_range(ranks: Tensor, r_max: int) -> bool:
    low, high = int(ranks.min()), int(ranks.max())
    if low < 0 or high > r_max:
        raise ValueError(f"ranks must lie in [0, r_max={r_max}] (r_max = lora_A's rank dimension), got "
                         f"values in [{low}, {high}]: a rank above r_max would read past the stack")
    return True


def resolve_plan(ids_or_plan: Union[Tensor, SegmentPlan], n: int, T: int, device: torch.device,
                 name: str = "adapter_ids") -> SegmentPlan:
    """:func:`segments.resolve_plan`, with out-of-range ids reported as a bad value
    (ValueError naming ``name``), as every check of the delta API does."""
    try:
        return segments.resolve_plan(ids_or_plan, n, T, device, name)
    except IndexError as error:
        raise ValueError(f"{name}: {error}") from None


def _check_same(name: str, t: Tensor, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; all tensors must share one "
                        f"dtype (cast them, e.g. {name}.to(x.dtype))")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move all tensors to one device")


# --------------------------------------------------------------------------
# The public op
# --------------------------------------------------------------------------


def add_lora(y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor,
             adapter_ids_or_plan: Union[Tensor, SegmentPlan], scalings, *,
             ranks: Optional[Tensor] = None, slices: Optional[Sequence[int]] = None) -> Tensor:
    """Add each row's LoRA delta into ``y`` in place and return ``y``; inference only.

    ``y[t, o_j:o_j+w_j] += scalings[i] · (x[t] lora_A[i, j, :r_i]ᵀ) lora_B[i, o_j:o_j+w_j, :r_i]ᵀ``
    for ``i = ids[t] >= 0``; rows with id -1 are left unchanged.

    y [..., out_total] (written in place), x [..., in] with the same leading shape;
    lora_A [n, r_max, in] (one slice) or [n, S, r_max, in]; lora_B [n, out_total, r_max];
    adapter_ids_or_plan: int ids with one entry per row, values in [-1, n), or a
    :class:`SegmentPlan` from ``plan_segments(ids, n)`` (build once per batch, share across
    layers: no host sync then); scalings: float tensor [n] (or one number for all);
    ranks: int tensor [n] in [0, r_max] | None (r_max); slices: the S output widths, summing
    to out_total (None: one slice). Gradients are not tracked.
    """
    for name, value in (("y", y), ("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, value in (("y", y), ("lora_A", lora_A), ("lora_B", lora_B)):
        _check_same(name, value, x)
    if x.dim() < 1 or y.dim() < 1 or tuple(y.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(f"y must be [..., out_total] with x's leading shape: x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}")
    if lora_A.dim() == 3:
        n, r_max, in_features = lora_A.shape
        a4 = lora_A.unsqueeze(1)
    elif lora_A.dim() == 4:
        n, _, r_max, in_features = lora_A.shape
        a4 = lora_A
    else:
        raise ValueError(f"lora_A must be [n, r_max, in] or [n, S, r_max, in], got shape {tuple(lora_A.shape)}")
    if n < 1 or r_max < 1 or a4.shape[1] < 1:
        raise ValueError(f"lora_A needs n >= 1 adapters, S >= 1 slices and r_max >= 1, got shape "
                         f"{tuple(lora_A.shape)}")
    if in_features != x.shape[-1]:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} has in={in_features} but x has {x.shape[-1]} features "
                         f"(x shape {tuple(x.shape)})")
    out_total = y.shape[-1]
    if tuple(lora_B.shape) != (n, out_total, r_max):
        raise ValueError(f"lora_B must be [n={n}, out_total={out_total}, r_max={r_max}] (y's width, lora_A's "
                         f"n and r_max), got shape {tuple(lora_B.shape)} (lora_A {tuple(lora_A.shape)}, "
                         f"y {tuple(y.shape)})")
    widths = check_slices(slices, out_total, a4.shape[1])
    check_writable_output(y)
    scalings = as_scalings(scalings, n, x.device)
    ranks = as_ranks(ranks, n, r_max, x.device)
    x2d = x.reshape(-1, in_features)
    y2d = y if y.dim() == 2 else y.view(-1, out_total)  # a view: the update lands in y
    plan = resolve_plan(adapter_ids_or_plan, n, x2d.shape[0], x.device)
    if torch.compiler.is_compiling():  # an op that mutates y: traced without a graph break
        ADD_LORA_DELTA(y2d, x2d, a4, lora_B, plan.packed, scalings, ranks, list(widths), plan.regime, False,
                       a4.shape[1])
        return y
    with torch.no_grad():
        apply_delta(y2d, x2d, PackedA(a4, compact=False), lora_B, plan, scalings, ranks, widths)
    return y


def _add_lora_delta(y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, plan: Tensor, scalings: Tensor,
                    ranks: Tensor, widths: list[int], regime: str, compact: bool, n_slices: int) -> None:
    """:func:`apply_delta` as a custom op (``torch.compile``): y += the delta, in place; ``plan`` is a
    :class:`SegmentPlan`'s packed buffer, ``lora_A`` the [n, S, r_max, in] (or compact) stack."""
    segments = SegmentPlan.from_packed(plan, x.shape[0], lora_A.shape[0], regime)
    with torch.no_grad():
        apply_delta(y, x, PackedA(lora_A, compact, n_slices), lora_B, segments, scalings, ranks, tuple(widths))


def _add_lora_delta_fake(y, x, lora_A, lora_B, plan, scalings, ranks, widths, regime, compact, n_slices):
    return None


#: ``lora_fused::add_lora_delta``: one custom op that mutates y (inference only: no backward, no
#: eager Function; eager calls run :func:`apply_delta` directly). The scaffold's single-op part.
ADD_LORA_DELTA = define_custom_op("lora_fused::add_lora_delta", _add_lora_delta, _add_lora_delta_fake,
                                  mutates_args=("y",))


#: Offset tables of per-slice tensors, by (values, device): addresses do not change when the
#: tensors are written in place, so an entry never goes stale while its tensors live.
_offset_tables: dict = {}
OFFSET_TABLE_CACHE_SIZE = 1024


def element_offsets(parts: Sequence[Tensor], values: Sequence[int] = ()) -> Optional[Tensor]:
    """int64 [S] device tensor of ``values`` (default: each part's offset in elements from part 0,
    so a kernel reads part j at ``part0_ptr + offset_j``), or None while a CUDA graph is captured
    and the table was not made before (it is a host-to-device copy)."""
    if not values:
        size, first = parts[0].element_size(), parts[0].data_ptr()
        values = [(p.data_ptr() - first) // size for p in parts]  # same dtype: a whole number
    values = tuple(values)
    key = (values, parts[0].device)
    table = _offset_tables.get(key)
    if table is None:
        if parts[0].is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        if len(_offset_tables) >= OFFSET_TABLE_CACHE_SIZE:
            _offset_tables.clear()
        table = _offset_tables[key] = torch.tensor(values, dtype=torch.int64, device=parts[0].device)
    return table


def add_lora_slices(y: Tensor, x: Tensor, a_parts: Sequence[Tensor], b_parts: Sequence[Tensor],
                    plan: SegmentPlan, scalings: Tensor) -> Tensor:
    """:func:`add_lora` with each slice's A and B its own tensor (vLLM keeps them so), never stacked
    on the Triton path: the kernels read slice j at slice 0's pointer + its element offset (an
    int64 table; GPU addresses are flat, so tensors of one dtype on one device are reachable so).

    a_parts: S tensors [n, r_max, in] with equal strides; b_parts: S tensors [n, w_j, r_max] with
    equal out and rank strides; y [T, Σ w_j] (written in place), x [T, in]; plan for T rows and n
    adapters; scalings fp32 [n]. Every adapter uses all r_max rank rows. Inference only."""
    n, r_max, in_features = a_parts[0].shape
    widths = tuple(b.shape[1] for b in b_parts)
    if torch.compiler.is_compiling():  # addresses cannot be traced: stacked in the graph, then the op
        return add_lora(y, x, torch.stack(list(a_parts), dim=1), torch.cat(list(b_parts), dim=1), plan,
                        scalings, slices=widths)
    for name, parts in (("lora_a", a_parts), ("lora_b", b_parts)):
        for j, part in enumerate(parts):
            _check_same(f"{name}[{j}]", part, x)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != in_features or tuple(y.shape) != (x.shape[0], sum(widths)):
        raise ValueError(f"x must be [T, in={in_features}] and y [T, {sum(widths)}] (slices {widths}), got "
                         f"x {tuple(x.shape)}, y {tuple(y.shape)}")
    _check_same("y", y, x)
    check_writable_output(y)
    ranks = torch.full((n,), r_max, dtype=torch.int32, device=x.device)
    same_a = all(a.shape == a_parts[0].shape and a.stride() == a_parts[0].stride() for a in a_parts)
    same_b = all(b.shape[0] == n and b.shape[2] == r_max and b.stride()[1:] == b_parts[0].stride()[1:]
                 for b in b_parts)
    # The kernels take the offsets as multiples of 16 elements (vectorized loads): true of separate
    # allocations (256-byte aligned at least); a view at an odd offset takes the stacked path.
    aligned = all((p.data_ptr() - parts[0].data_ptr()) % (16 * p.element_size()) == 0
                  for parts in (a_parts, b_parts) for p in parts)
    with torch.no_grad():
        if _use_triton(x, y) and same_a and same_b and aligned:
            a_offsets, b_offsets = element_offsets(a_parts), element_offsets(b_parts)
            b_strides = element_offsets(b_parts, [b.stride(0) for b in b_parts])
            if a_offsets is not None and b_offsets is not None and b_strides is not None:
                return _add_slices_by_offsets(y, x, a_parts[0], b_parts[0], (a_offsets, b_offsets, b_strides),
                                              widths, plan, scalings, ranks)
        # the torch path (and a table that cannot be made inside a capture): stacked for this call
        a4 = torch.stack(list(a_parts), dim=1)
        lora_B = torch.cat(list(b_parts), dim=1)
        return apply_delta(y, x, PackedA(a4, compact=False), lora_B, plan, scalings, ranks, widths)


@on_tensor_device
def _add_slices_by_offsets(y: Tensor, x: Tensor, a0: Tensor, b0: Tensor, tables: tuple[Tensor, Tensor, Tensor],
                           widths: tuple[int, ...], plan: SegmentPlan, scalings: Tensor, ranks: Tensor) -> Tensor:
    """:func:`add_lora_slices`' Triton launches: slice j read at slice 0's pointer (a0, b0) + its
    offset; ``tables`` = (A offsets, B offsets, B adapter strides)."""
    a_offsets, b_offsets, b_strides = tables
    k = delta_kernels()
    r_max = a0.shape[1]
    sa, sb = a0.stride(), b0.stride()
    part = k.delta_shrink(x, a0, (sa[0], 0, sa[1], sa[2]), len(widths), r_max, False, ranks, plan,
                          a_offsets=a_offsets)
    return k.delta_expand(y, part, b0, (0, sb[1], sb[2]), tuple(itertools.accumulate(widths)), r_max, False,
                          scalings.float().contiguous(), ranks, plan, b_table=(b_offsets, b_strides))


class PackedA:
    """The A stacks with their stacked-rank layout: ``a4`` [n, S, r_max, in] (padded), or
    [n, 1, S·r_max, in] with ``compact=True`` (slice j of adapter i at rows j·r_i ...)."""

    def __init__(self, a4: Tensor, compact: bool, n_slices: Optional[int] = None):
        self.a4 = a4
        self.compact = compact
        self.n_slices = n_slices if compact else a4.shape[1]
        self.r_max = a4.shape[2] // self.n_slices if compact else a4.shape[2]

    def strides(self) -> tuple[int, int, int, int]:
        """(adapter, slice, rank, k) strides (compact: the slice stride is unused)."""
        s = self.a4.stride()
        return s[0], s[1], s[2], s[3]

    def flat(self) -> Tensor:
        """[n, S·r_max, in]: the stacked rank axis (a copy only if the slices are not evenly strided)."""
        return self.a4.reshape(self.a4.shape[0], -1, self.a4.shape[3])


def _use_triton(x: Tensor, y: Tensor) -> bool:
    return backend_for(device_type(x), x.dtype) == "triton" and x.shape[0] > 0 and y.shape[1] > 0


@on_tensor_device
def apply_delta(y: Tensor, x: Tensor, a: PackedA, lora_B: Tensor, plan: SegmentPlan, scalings: Tensor,
                ranks: Tensor, widths: tuple[int, ...]) -> Tensor:
    """y [T, out_total] += the delta (arguments checked): shrink then expand."""
    if x.shape[0] == 0 or y.shape[1] == 0:
        return y
    if _use_triton(x, y):
        k = delta_kernels()
        part = k.delta_shrink(x, a.a4, a.strides(), a.n_slices, a.r_max, a.compact, ranks.contiguous(), plan)
        return _triton_expand(y, part, lora_B, plan, scalings, ranks, widths, a.compact)
    tiles = _torch_shrink_tiles(x, a.flat(), plan)
    return _torch_expand(y, tiles, lora_B, plan, scalings, ranks, widths, a.compact)


@on_tensor_device
def apply_shrink(x: Tensor, a: PackedA, plan: SegmentPlan, ranks: Tensor) -> Tensor:
    """[T, S·r_max] in x's dtype: x A_iᵀ at each row's valid stacked rank positions, 0 elsewhere
    (and on rows without an adapter)."""
    if _use_triton(x, x):
        part = delta_kernels().delta_shrink(x, a.a4, a.strides(), a.n_slices, a.r_max, a.compact,
                                            ranks.contiguous(), plan, zero=True)
        return part.sum(0).to(x.dtype)
    tiles = _torch_shrink_tiles(x, a.flat(), plan)
    valid = _valid_positions(ranks, a.r_max, a.n_slices, a.compact).to(tiles.dtype)
    chunks = plan.chunk_weights.shape[0]
    tiles = tiles * valid.index_select(0, plan.chunk_weights)[:, None, :] \
        * plan.slot_live.view(chunks, plan.block_rows, 1)
    return _scatter_rows(tiles, plan).to(x.dtype)


@on_tensor_device
def apply_expand(y: Tensor, shrink: Tensor, lora_B: Tensor, plan: SegmentPlan, scalings: Tensor, ranks: Tensor,
                 widths: tuple[int, ...], compact: bool) -> Tensor:
    """y [T, out_total] += s_i · L_j B_i[slice j]ᵀ with L given: ``shrink`` [T, S·r_max] (the
    stacked rank axis, padded or compact). The expand half of :func:`apply_delta`."""
    if shrink.shape[0] == 0 or y.shape[1] == 0:
        return y
    if _use_triton(shrink, y):
        part = shrink.to(torch.float32).unsqueeze(0)
        return _triton_expand(y, part, lora_B, plan, scalings, ranks, widths, compact)
    return _torch_expand(y, _gather_rows(shrink, plan, _compute_dtype(shrink.dtype)), lora_B, plan,
                         scalings, ranks, widths, compact)


def _triton_expand(y, part, lora_B, plan, scalings, ranks, widths, compact):
    ends = tuple(itertools.accumulate(widths))  # host ints: no device read
    return delta_kernels().delta_expand(y, part, lora_B, lora_B.stride(), ends, lora_B.shape[2], compact,
                                        scalings.float().contiguous(), ranks.to(torch.int32).contiguous(), plan)


# --------------------------------------------------------------------------
# Torch backend: batched matmuls over the plan's chunks (as torch_backend's multi path)
# --------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _gather_rows(t: Tensor, plan: SegmentPlan, dtype: torch.dtype) -> Tensor:
    """[chunks, block, cols]: the rows of ``t`` in each chunk slot (empty slots repeat row 0)."""
    chunks = plan.chunk_weights.shape[0]
    return t.index_select(0, plan.slot_rows).view(chunks, plan.block_rows, t.shape[1]).to(dtype)


def _scatter_rows(tiles: Tensor, plan: SegmentPlan) -> Tensor:
    """[T, cols]: each row's slot of ``tiles`` [chunks, block, cols]."""
    return tiles.reshape(-1, tiles.shape[2]).index_select(0, plan.row_slot)


def _valid_positions(ranks: Tensor, r_max: int, n_slices: int, compact: bool) -> Tensor:
    """bool [n, S·r_max]: the stacked rank positions adapter i uses."""
    q = torch.arange(n_slices * r_max, device=ranks.device)
    r = ranks.clamp(0, r_max)[:, None]
    return q < n_slices * r if compact else (q % r_max) < r


def _torch_shrink_tiles(x: Tensor, a_flat: Tensor, plan: SegmentPlan) -> Tensor:
    """[chunks, block, S·r_max] = each chunk's rows times its adapter's stacked A (compute dtype)."""
    dtype = _compute_dtype(x.dtype)
    a = a_flat.index_select(0, plan.chunk_weights).to(dtype)
    return torch.bmm(_gather_rows(x, plan, dtype), a.transpose(1, 2))


def _torch_expand(y: Tensor, tiles: Tensor, lora_B: Tensor, plan: SegmentPlan, scalings: Tensor, ranks: Tensor,
                  widths: tuple[int, ...], compact: bool) -> Tensor:
    """y[:, slice j] += the chunks' L_j (masked to r_i, times s_i) B_i[slice j]ᵀ, one slice at a time."""
    dtype = tiles.dtype
    r_max = lora_B.shape[2]
    chunks = plan.chunk_weights.shape[0]
    chunk_of = plan.chunk_weights
    r_chunk = ranks.clamp(0, r_max).index_select(0, chunk_of).to(torch.int64)  # [chunks]
    k = torch.arange(r_max, device=y.device)
    # coefficient per (chunk, slot, k): s_i where k < r_i and the slot is an adapter's row
    coef = torch.where(k[None, :] < r_chunk[:, None], scalings.to(dtype).index_select(0, chunk_of)[:, None], 0)
    coef = coef[:, None, :] * plan.slot_live.view(chunks, plan.block_rows, 1).to(dtype)
    b = lora_B.index_select(0, chunk_of).to(dtype)  # [chunks, out_total, r_max]
    q_max = tiles.shape[2] - 1
    start = 0
    for j, width in enumerate(widths):
        first = j * r_chunk if compact else torch.full_like(r_chunk, j * r_max)
        cols = (first[:, None] + k[None, :]).clamp(max=q_max)  # [chunks, r_max]
        l_j = torch.gather(tiles, 2, cols[:, None, :].expand(-1, tiles.shape[1], -1)) * coef
        delta = _scatter_rows(torch.bmm(l_j, b[:, start:start + width].transpose(1, 2)), plan)
        out = y[:, start:start + width]
        out.copy_(out.to(dtype) + delta)  # rounded once, as the kernel: (y + delta) in fp32, then y's dtype
        start += width
    return y
