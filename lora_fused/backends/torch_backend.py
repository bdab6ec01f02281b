"""The torch backend: the ops in plain PyTorch calls, for CPU tensors and float64.

Fewest ops per call, since at small shapes host time is the cost:

    forward    y = addmm(b, x, W0ᵀ);  S = (keep ⊙ x) Aᵀ;  y += c · S Bᵀ        c = s / (1 - p)
    backward   G = dY B;  dB = c · dYᵀ S;  dA = c · Gᵀ (keep ⊙ x);  dX = dY W0 + c · keep ⊙ (G A)

``keep`` is 0/1 (no dropout: absent, c = s), so the saved S is ``keep ⊙ x Aᵀ``
without the 1/(1-p) factor, which rides in c. The mask (:func:`keep_mask`: a uniform per
element, or on a CPU with a small p the drop positions alone) comes from a generator seeded
with the op's seed, so forward and backward regenerate the same mask and nothing of size
M × in is saved. It differs from the Triton kernels' Philox mask (``reference.dropout_keep_mask``).

The multi-adapter path: for a few rows and adapters (``DENSE_MAX_COLUMNS`` ranks in all)
the dense path multiplies every row by all adapters' stacked A at once, masks each row's
coefficients to its adapter's ranks and adds S B_allᵀ (four ops; the stack's operands
cached while its tensors are unchanged); for a few rows (decode, ``GATHER_MAX_ROWS``)
each row gathers its adapter's A_i, B_i and two batched matmuls over rows do the rest; for more rows
it works on a :class:`~lora_fused.dispatch.segments.SegmentPlan`'s chunks: each chunk (at most
``block_rows`` rows of one adapter) gathers its rows and its adapter's A_i, B_i, and
one batched matmul serves all chunks. The per-adapter coefficients (s_i on ranks
below r_i) come from a table reused while scalings and ranks are unchanged. No host
sync, no Python loop over adapters. Scalings multiply in fp32 (float64 for
float64 inputs), so a scaling above fp16's range does not overflow.
"""
from __future__ import annotations

from typing import Optional

import functools
import math
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch.segments import SegmentPlan
from ..value_cache import all_match, derived, identity, stamp


def base_linear(x2d: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x W0ᵀ + b`` in one op, as a fresh tensor the LoRA term is added into (``F.linear``
    is ``addmm(b, x, W0ᵀ)`` / ``mm(x, W0ᵀ)`` for 2-D x, with the transpose done in C++)."""
    return F.linear(x2d, weight, bias)


#: One generator per thread and device (a Generator costs several µs to build; one shared
#: by threads would race between manual_seed and the draw).
_generators = threading.local()


def _generator(device: torch.device) -> torch.Generator:
    cache = _generators.__dict__
    generator = cache.get(device)
    if generator is None:
        generator = cache[device] = torch.Generator(device=device)
    return generator


def keep_mask(seed: Tensor, rows: int, cols: int, p: float, dtype: torch.dtype,
              device: torch.device) -> Tensor:
    """0/1 [rows, cols] in ``dtype``: each element kept (1) with probability 1 − p, independently,
    from a generator seeded with ``seed``; the same mask for every dtype.

    Two exact draws of the same distribution, chosen by size and p (:func:`draws_drop_positions`):
    on a CPU with a small p and many elements, the positions of the dropped elements
    (:func:`_keep_from_drop_positions`: ~p·n draws instead of n); otherwise a float32 uniform
    per element compared with p (``rand`` then an in-place ``ge_``, which keeps the float dtype:
    no bool tensor, no conversion). On CPU the generator's per-element cost is what a mask
    costs, and ``rand`` draws one 32-bit word per element where ``bernoulli_`` with a float p
    takes a slower per-element path (128 × 128: 65 vs 104 µs, measured in one process on a CPU;
    bench/results/README-history.md, "The torch backend's dropout draw")."""
    generator = _generator(device)
    generator.manual_seed(int(seed))  # a host read of the seed; the torch backend runs on the host's data
    n = rows * cols
    if draws_drop_positions(n, p, device):
        return _keep_from_drop_positions(generator, rows, cols, p, dtype, device)
    keep = torch.rand((rows, cols), generator=generator, dtype=torch.float32, device=device)
    keep.ge_(_threshold(p, device))
    return keep if dtype == torch.float32 else keep.to(dtype)


# The cost model that picks the draw (measured on a CPU, bench/results/README-history.md, "The
# torch backend's dropout draw"; masks of 4 x 64 to 4096 x 512 at p = 0.05 ... 0.5, 1 and 2
# threads alike): a uniform per element costs ~5.6 ns;
# drawing the drop positions costs ~40 µs of fixed op overhead, ~40 ns per drop (torch's
# geometric_) and ~0.3 ns per element (filling the ones). Measured ratios of the positions
# draw to the uniforms: p 0.05: 1.09 at 8K elements, 1.01 at 12K, 0.87 at 16K, 0.62 at 32K,
# 0.42 at 1024 x 128, 0.40 at 4096 x 512; p 0.1: 1.11 at 12K, 1.01 at 24K, 0.75 at 64K, 0.6-0.8
# at 1024 x 128; p 0.2: 1.3 at every size (never chosen: the break-even p is ~0.13).
_UNIFORM_NS_PER_ELEMENT = 5.6
_POSITIONS_NS_PER_DROP = 40.0
_POSITIONS_NS_PER_ELEMENT = 0.3
_POSITIONS_FIXED_NS = 40_000.0
#: Gaps drawn per batch: p·n plus this many standard deviations (tests shrink it to run the loop).
_GAP_BATCH_SDS = 6.0


def draws_drop_positions(n: int, p: float, device: torch.device) -> bool:
    """Whether :func:`keep_mask` draws n elements' mask as drop positions: on a CPU, where that
    costs less than n uniforms by the cost model above (on a GPU ``rand`` is one fast kernel)."""
    saved_ns_per_element = _UNIFORM_NS_PER_ELEMENT - _POSITIONS_NS_PER_ELEMENT - _POSITIONS_NS_PER_DROP * p
    return device.type == "cpu" and n * saved_ns_per_element > _POSITIONS_FIXED_NS


def _drop_positions(generator: torch.Generator, n: int, p: float, device: torch.device) -> Tensor:
    """The 1-based positions of the dropped elements among n i.i.d. Bernoulli(p) drops, sorted,
    int64, with positions past the end clamped to n + 1 (a sentinel). The gaps between
    successive drops of i.i.d. Bernoulli(p) trials are i.i.d. Geometric(p) on {1, 2, ...}, so
    the running sum of geometric draws is the drops' positions: exact, not an approximation.
    Gaps are drawn in batches of p·n plus ``_GAP_BATCH_SDS`` standard deviations (a second
    batch is needed in well under one call in a million); the generator's stream makes the
    batches one sequence of draws, so the mask does not depend on the batch size."""
    mean = n * p
    batch = max(int(mean + _GAP_BATCH_SDS * math.sqrt(mean) + 16), 1)
    positions = torch.empty(batch, dtype=torch.int64, device=device).geometric_(p, generator=generator).cumsum_(0)
    while int(positions[-1]) <= n:  # the last drop drawn is within the n elements: later ones may be too
        more = torch.empty(batch, dtype=torch.int64, device=device).geometric_(p, generator=generator)
        positions = torch.cat((positions, more.cumsum_(0).add_(positions[-1])))
    return positions.clamp_(max=n + 1)


def _keep_from_drop_positions(generator: torch.Generator, rows: int, cols: int, p: float,
                              dtype: torch.dtype, device: torch.device) -> Tensor:
    """keep_mask's [rows, cols] from :func:`_drop_positions`: ones with zeros written at the
    drops, in a buffer of n + 2 whose element 0 (position 0 never occurs) and element n + 1
    (the sentinel) are outside the view: 1-based positions need no shift (one op less: this
    draw's fixed cost decides where it pays)."""
    n = rows * cols
    keep = torch.ones(n + 2, dtype=dtype, device=device)
    keep.index_fill_(0, _drop_positions(generator, n, p, device), 0.0)
    return keep.as_strided((rows, cols), (cols, 1), 1)


@functools.lru_cache(maxsize=64)
def _threshold(p: float, device: torch.device) -> Tensor:
    """p as a 0-d float32 tensor on ``device``: ``ge_`` with a Python float wraps it into a tensor
    per call (measured 8.6 vs 3.0 µs a call for a 4 × 64 mask). Read only, never written."""
    return torch.tensor(p, dtype=torch.float32, device=device)


def _keep_like(seed: Tensor, x2d: Tensor, p: float) -> Tensor:
    """:func:`keep_mask` for x2d's shape, dtype and device."""
    return keep_mask(seed, x2d.shape[0], x2d.shape[1], p, x2d.dtype, x2d.device)


def _host_scaling(scaling):
    """s as the GEMMs' ``alpha``: a float as it is; a 0-d tensor (the compiled route,
    ``ops.lora_linear_fwd_t``) read when it lives on the host (exact, no sync: bit for bit
    the float route). A tensor on a device stays a tensor: reading it would sync and, in a
    CUDA graph, bake its value at capture; the callers then multiply by it on the device
    (no sync, never stale; may differ from ``alpha`` by a rounding)."""
    if isinstance(scaling, Tensor) and scaling.is_cpu:
        return scaling.item()
    return scaling


def _host_dropout_p(dropout_p) -> float:
    """p as a float: a 0-d tensor (the compiled route, ``ops.lora_linear_fwd_t``) is read with
    ``.item()``: exact (float64), so mask and 1/(1-p) are bit for bit the float route's. On the
    host that costs no sync. A tensor on a device syncs here (and a CUDA graph would keep the
    value read at capture); that does not happen in practice: on CUDA the Triton kernels run,
    reading p through a pointer (the torch backend on a GPU is a forced, debugging route)."""
    return dropout_p.item() if isinstance(dropout_p, Tensor) else dropout_p


def add_lora_term(y: Tensor, a: Tensor, b: Tensor, alpha) -> Tensor:
    """y += alpha · a b in place (y is the base GEMM's fresh output, which no backward node
    saves), alpha a float or a 0-d device tensor (``_host_scaling``). In place under autograd
    too: out of place, ``addmm`` first copies y into its result (measured on the tiny-Llama
    step: 0.877 vs 0.894 of PEFT's time, interleaved in one process); both record AddmmBackward0."""
    if isinstance(alpha, Tensor):
        return y.add_(torch.mm(a, b).mul_(alpha))
    return y.addmm_(a, b, alpha=alpha)


def lora_forward(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 scaling, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(y, S)`` with ``S = (keep ⊙ x) Aᵀ`` (see the module docstring). ``scaling``: a float
    or a 0-d tensor (``_host_scaling``)."""
    if type(scaling) is not float:  # the check alone on the eager route (a call costs ~0.1 µs)
        scaling = _host_scaling(scaling)
    if type(dropout_p) is not float:
        dropout_p = _host_dropout_p(dropout_p)
    y = F.linear(x2d, weight, bias)
    if seed is None or dropout_p == 0.0:
        shrink = F.linear(x2d, lora_A)
        return add_lora_term(y, shrink, lora_B.t(), scaling), shrink
    shrink = F.linear(_keep_like(seed, x2d, dropout_p).mul_(x2d), lora_A)  # keep ⊙ x in the mask's own buffer
    return add_lora_term(y, shrink, lora_B.t(), scaling / (1.0 - dropout_p)), shrink


def lora_backward(grad_y: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                  shrink: Tensor, scaling, dropout_p: float, seed: Optional[Tensor],
                  need_dx: bool, need_dlora: bool) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(dX, dA, dB)``, None where not needed; nothing of size out × in is formed.

    Without dropout these are the GEMMs torch's autograd runs for :func:`lora_forward` on
    contiguous operands (eager calls record that autograd: ``ops._native_autograd_applies``),
    so both routes agree bit for bit: dS = (dY B)·s, dB = (dYᵀ S)·s, dA = dSᵀ x,
    dX = dY W0 + dS A. With dropout, c = s/(1-p) multiplies inside the GEMMs
    (``addmm(.., beta=0, alpha=c)``: the first argument gives the shape, its values are never read).
    ``scaling``: a float or a 0-d tensor (``_host_scaling``)."""
    if type(scaling) is not float:  # the check alone on the eager route (a call costs ~0.1 µs)
        scaling = _host_scaling(scaling)
    if type(dropout_p) is not float:
        dropout_p = _host_dropout_p(dropout_p)
    if seed is None or dropout_p == 0.0:
        grad_x = grad_a = grad_b = None
        grad_s = torch.mm(grad_y, lora_B).mul_(scaling)
        if need_dlora:
            grad_b = torch.mm(grad_y.t(), shrink).mul_(scaling)
            grad_a = torch.mm(grad_s.t(), x2d)
        if need_dx:
            grad_x = torch.mm(grad_y, weight).add_(torch.mm(grad_s, lora_A))
        return grad_x, grad_a, grad_b
    keep = _keep_like(seed, x2d, dropout_p)
    factor = scaling / (1.0 - dropout_p)
    g = torch.mm(grad_y, lora_B)  # dY B [M, r]
    grad_x = grad_a = grad_b = None
    # dX first: dA then turns the mask's own buffer into keep ⊙ x (no second M × in tensor).
    if isinstance(factor, Tensor):  # on a device (_host_scaling): multiply by it there
        if need_dx:
            grad_x = torch.mm(grad_y, weight).add_(torch.mm(g, lora_A).mul_(keep).mul_(factor))
        if need_dlora:
            grad_b = torch.mm(grad_y.t(), shrink).mul_(factor)
            grad_a = torch.mm(g.t(), keep.mul_(x2d)).mul_(factor)
        return grad_x, grad_a, grad_b
    if need_dx:
        grad_x = torch.mm(grad_y, weight).addcmul_(torch.mm(g, lora_A), keep, value=factor)
    if need_dlora:
        grad_b = torch.addmm(lora_B, grad_y.t(), shrink, beta=0, alpha=factor)
        grad_a = torch.addmm(lora_A, g.t(), keep.mul_(x2d), beta=0, alpha=factor)
    return grad_x, grad_a, grad_b


# --------------------------------------------------------------------------
# Segmented multi-adapter LoRA over a plan's chunks.
# --------------------------------------------------------------------------

_COMPUTE_DTYPES = {dtype: torch.promote_types(dtype, torch.float32)
                   for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the multi-adapter LoRA term is scaled and summed: fp32, or float64 for float64."""
    return _COMPUTE_DTYPES.get(dtype) or torch.promote_types(dtype, torch.float32)


#: Batches of at most this many rows take the per-row gather path: each row gathers its
#: adapter's A_i [r, in] and B_i [out, r] (T·r·(in + out) elements), then two batched
#: matmuls over rows (fewest ops for decode); larger batches go by the plan's chunks.
GATHER_MAX_ROWS = 16


def uses_gather(num_rows: int) -> bool:
    return num_rows <= GATHER_MAX_ROWS


def multi_shrink_shape(plan_rows: int, n_adapters: int, r_max: int, regime: str) -> tuple[int, ...]:
    """Shape of the saved S: [T, r_max, 1] on the gather path, else one [block_rows, r_max] tile per chunk."""
    if uses_gather(plan_rows):
        return plan_rows, r_max, 1
    block, capacity = SegmentPlan.chunk_geometry(plan_rows, n_adapters, regime)
    return capacity, block, r_max


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skip the dispatch of a no-op .to


def _build_table(scalings: Tensor, ranks: Optional[Tensor], r_max: int, dtype: torch.dtype) -> Tensor:
    rows = _as(scalings, dtype)[:, None].expand(scalings.shape[0], r_max)
    if ranks is not None:
        rows = torch.where(torch.arange(r_max, device=ranks.device) < ranks[:, None], rows, 0)
    return F.pad(rows, (0, 0, 0, 1)).unsqueeze(2)  # row n: zeros, for base rows (plan.row_key = n)


def coefficient_table(scalings: Tensor, ranks: Optional[Tensor], r_max: int, dtype: torch.dtype) -> Tensor:
    """[n + 1, r_max, 1] in ``dtype``: s_i on ranks k < r_i of adapter i (all r_max when ranks is
    None), 0 on rank padding; row n is 0 (base rows). Reused while scalings and ranks are
    unchanged for CPU tensors (:mod:`lora_fused.value_cache`; on CUDA it is computed per call,
    so a captured graph computes it from the current values)."""
    if scalings.is_cpu:
        return derived(_build_table, (scalings, ranks), (r_max, dtype))
    return _build_table(scalings, ranks, r_max, dtype)


def _select_chunk_coefficients(table: Tensor, plan: SegmentPlan) -> Tensor:
    """[chunks, block, r_max]: the table's row of each chunk's adapter; 0 on base rows and empty slots."""
    chunks = plan.chunk_weights.shape[0]
    return table.index_select(0, plan.chunk_weights).transpose(1, 2) * plan.slot_live.view(chunks, plan.block_rows, 1)


def _select_row_coefficients(table: Tensor, plan: SegmentPlan) -> Tensor:
    """[T, ...]: each row's adapter's row of ``table`` (row n, zeros, for a base row)."""
    return table.index_select(0, plan.row_key)


#: Values kept on one plan at most (one per layer and kind); past it the plan's cache starts again.
PLAN_CACHE_MAX_ENTRIES = 4096


def _on_plan(select, table: Tensor, plan: SegmentPlan) -> Tensor:
    """``select(table, plan)``, kept on the plan while the plan is unchanged (its buffer's
    version: ``update_`` bumps it) for this very ``table`` object (the cached tables and
    coefficients are never written; a changed scaling or rank makes a new one). CPU only: a
    captured CUDA graph must select from the plan's values at replay, not at capture."""
    if not table.is_cpu:
        return select(table, plan)
    try:
        version = plan.packed._version
    except RuntimeError:  # a plan of inference tensors: no version counter
        return select(table, plan)
    cache = plan.host_cache
    key = (select, id(table))
    entry = cache.get(key)
    if entry is not None and entry[1] == version and entry[0]() is table:
        return entry[2]
    value = select(table, plan)
    if len(cache) >= PLAN_CACHE_MAX_ENTRIES:
        cache.clear()
    cache[key] = (weakref.ref(table), version, value)
    return value


def _row_coefficients(table: Tensor, plan: SegmentPlan) -> Tensor:
    return _on_plan(_select_row_coefficients, table, plan)


def _chunk_coefficients(table: Tensor, plan: SegmentPlan) -> Tensor:
    return _on_plan(_select_chunk_coefficients, table, plan)


def _gather_rows(t: Tensor, plan: SegmentPlan, dtype: torch.dtype) -> Tensor:
    """[chunks, block, cols]: the rows of ``t`` in each chunk slot (empty slots repeat row 0)."""
    chunks = plan.chunk_weights.shape[0]
    tiles = t.index_select(0, plan.slot_rows).view(chunks, plan.block_rows, t.shape[1])
    return _as(tiles, dtype)


def _scatter_rows(tiles: Tensor, plan: SegmentPlan) -> Tensor:
    """[T, cols]: each row's slot of ``tiles`` [chunks, block, cols] (a gather: empty slots are never read)."""
    return tiles.view(-1, tiles.shape[2]).index_select(0, plan.row_slot)


#: Few adapters (n · r_max columns at most) and few rows: every row goes through all the
#: adapters' A in one GEMM, masked by its own coefficients, then one GEMM with all the B
#: (T · n · r_max · (in + out) flops: for decode with a handful of adapters, fewer ops than
#: gathering A_i, B_i per row). Only with finite stacks: 0 · inf would carry one adapter's
#: non-finite weights into another's rows.
DENSE_MAX_COLUMNS = 256
#: Stacks whose dense operands are kept at most; past it the table starts again.
DENSE_MAX_ENTRIES = 4096

#: The dense path's per-stack operands, shared by every plan: key (identities of lora_A, lora_B,
#: scalings, ranks; dtype) -> (stamps, operands or None). An entry leaves when one of its
#: tensors' owners is freed (its B copy and its view of A go with it).
_DENSE_STACKS: dict = {}


def _stack_stamps(lora_A: Tensor, lora_B: Tensor, scalings: Tensor, ranks: Optional[Tensor], on_free) -> list:
    """The stamps (:mod:`lora_fused.value_cache`) a reuse must match: the weights by identity,
    storage and version counter (a copy of their values would double their memory), the
    per-adapter vectors by their values too (numpy may write a CPU tensor without a version
    bump). A None entry: an inference tensor (no version counter), not cached."""
    return [stamp(lora_A, contents=False, on_free=on_free), stamp(lora_B, contents=False, on_free=on_free),
            stamp(scalings, contents=True, on_free=on_free),
            stamp(ranks, contents=True, on_free=on_free)]


def _stack_operands(lora_A: Tensor, lora_B: Tensor, scalings: Tensor, ranks: Optional[Tensor],
                    dtype: torch.dtype) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """(A_allᵀ [in, n · r_max] (a view of lora_A: block i = A_iᵀ), B_allᵀ [n · r_max, out]
    (block i = B_iᵀ; the transpose of a copy), coefficients [n + 1, n · r_max]: row i holds
    adapter i's (s_i on ranks < r_i) in its own block and zeros elsewhere, row n zeros), or
    None when a stack holds NaN/inf (a host read: CPU tensors only)."""
    with torch.no_grad():  # views and copies of the stacks, never part of a graph
        lora_A, lora_B = lora_A.detach(), lora_B.detach()
        if not (bool(torch.isfinite(lora_A).all()) and bool(torch.isfinite(lora_B).all())):
            return None
        n, r_max = lora_A.shape[0], lora_A.shape[1]
        table = _build_table(scalings, ranks, r_max, dtype)  # [n + 1, r_max, 1]
        own_block = torch.eye(n + 1, n, dtype=dtype, device=table.device)[:, :, None]
        coefficients = (own_block * table[:, None, :, 0]).reshape(n + 1, -1)
        flat_B = lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], -1).to(dtype)
        return lora_A.reshape(n * r_max, -1).t(), flat_B.t(), coefficients


def _cached_stack_operands(lora_A: Tensor, lora_B: Tensor, scalings: Tensor, ranks: Optional[Tensor],
                           dtype: torch.dtype):
    """:func:`_stack_operands`, reused while the four tensors match their stamps."""
    tensors = (lora_A, lora_B, scalings, ranks)
    key = (identity(lora_A), identity(lora_B), identity(scalings), identity(ranks), dtype)
    entry = _DENSE_STACKS.get(key)
    if entry is not None and all_match(entry[0], tensors):
        return entry[1]

    def evict(_dead_ref, key=key):  # a tensor of this entry was freed (before any reuse of its id)
        _DENSE_STACKS.pop(key, None)

    stamps = _stack_stamps(lora_A, lora_B, scalings, ranks, evict)
    operands = _stack_operands(lora_A, lora_B, scalings, ranks, dtype)  # an exception caches nothing
    if None in stamps:  # inference tensors have no version counter: computed every call
        return operands
    if len(_DENSE_STACKS) >= DENSE_MAX_ENTRIES:
        _DENSE_STACKS.clear()
    _DENSE_STACKS[key] = (stamps, operands)
    return operands


def dense_operands(x2d: Tensor, lora_A: Tensor, lora_B: Tensor, scalings: Tensor, ranks: Optional[Tensor],
                   plan: SegmentPlan) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """The all-adapters path's operands ``(A_allᵀ, B_allᵀ, row coefficients [T, n · r_max])``
    when it applies: few rows and columns, x in its own compute dtype (fp32 / fp64), finite CPU
    stacks; else None.

    Host time is the cost at these sizes, so they are cached: per stack (a host read of the
    stacks' finiteness, a copy of B, the coefficients; shared by every plan) and, on the plan,
    the rows' coefficients. Stamps (version counters, data pointers, shapes, strides) and weak
    references make a stale reuse impossible."""
    dtype = x2d.dtype
    if (x2d.shape[0] > GATHER_MAX_ROWS or lora_A.shape[0] * lora_A.shape[1] > DENSE_MAX_COLUMNS
            or not lora_A.is_cpu or (dtype is not torch.float32 and dtype is not torch.float64)):
        return None
    operands = _cached_stack_operands(lora_A, lora_B, scalings, ranks, dtype)
    if operands is None:
        return None
    a_t, b_t, coefficients = operands
    return a_t, b_t, _row_coefficients(coefficients, plan)


def multi_lora_forward(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                       scalings: Tensor, ranks: Optional[Tensor], plan: SegmentPlan,
                       need_shrink: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """``(y, S')``: y[t] = x[t] W0ᵀ + b + (x[t] A_iᵀ ⊙ coef_i) B_iᵀ, coef_i = s_i on ranks < r_i.

    S' = x A_iᵀ ⊙ coef in :func:`compute_dtype`: [T, r_max, 1] per row (gather and dense
    paths) or [chunks, block, r_max] per chunk slot. ``need_shrink=False`` (an eager call
    without autograd) may return None for it; y is the same either way."""
    dense = dense_operands(x2d, lora_A, lora_B, scalings, ranks, plan)
    if dense is not None:  # y += (x A_allᵀ ⊙ coef_row) B_allᵀ: the other adapters' blocks are zeros
        a_t, b_t, row_coef = dense
        y = base_linear(x2d, weight, bias)
        shrink = torch.mm(x2d, a_t).mul_(row_coef)
        y.addmm_(shrink, b_t)
        if not need_shrink:
            return y, None
        return y, shrink.view(-1, lora_A.shape[0], lora_A.shape[1]).sum(1).unsqueeze(2)
    dtype = compute_dtype(x2d.dtype)
    table = coefficient_table(scalings, ranks, lora_A.shape[1], dtype)
    y = base_linear(x2d, weight, bias)
    if uses_gather(x2d.shape[0]):
        rows = plan.row_weights
        coef = _row_coefficients(table, plan)  # [T, r_max, 1]
        shrink = torch.bmm(lora_A.index_select(0, rows), x2d.unsqueeze(2))  # [T, r_max, 1]
        b_rows = lora_B.index_select(0, rows)  # [T, out, r_max]
        if dtype == x2d.dtype:
            shrink.mul_(coef)
            y.unsqueeze(2).baddbmm_(b_rows, shrink)
        else:  # fp16 / bf16: scaled and summed in fp32
            shrink = shrink * coef
            y += torch.bmm(b_rows.to(dtype), shrink).squeeze(2)
        return y, shrink
    coef = _chunk_coefficients(table, plan)
    a = lora_A.index_select(0, plan.chunk_weights)
    b = lora_B.index_select(0, plan.chunk_weights)
    shrink = torch.bmm(_gather_rows(x2d, plan, x2d.dtype), a.transpose(1, 2)) * coef
    y += _scatter_rows(torch.bmm(shrink, _as(b, dtype).transpose(1, 2)), plan)
    return y, shrink


def multi_lora_backward(grad_y: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                        scalings: Tensor, ranks: Optional[Tensor], shrink: Tensor, plan: SegmentPlan,
                        need_dx: bool, need_dlora: bool
                        ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(dX, dA, dB)``, None where not needed. Per row (or chunk): dS = (dY B_i) ⊙ coef,
    dA_i += dSᵀ x, dB_i += dYᵀ S'; dX = dY W0 + dS A_i. Absent adapters and padding get 0."""
    dtype = shrink.dtype
    table = coefficient_table(scalings, ranks, lora_A.shape[1], dtype)
    if uses_gather(x2d.shape[0]):
        return _gather_backward(grad_y, x2d, weight, lora_A, lora_B, table, shrink, plan, need_dx, need_dlora)
    coef = _chunk_coefficients(table, plan)
    chunk_of = plan.chunk_weights
    grad_tiles = _gather_rows(grad_y, plan, dtype)
    grad_shrink = torch.bmm(grad_tiles, _as(lora_B.index_select(0, chunk_of), dtype)) * coef
    grad_x = grad_a = grad_b = None
    if need_dlora:
        x_tiles = _gather_rows(x2d, plan, dtype)
        grad_a = lora_A.new_zeros(lora_A.shape, dtype=dtype).index_add_(
            0, chunk_of, torch.bmm(grad_shrink.transpose(1, 2), x_tiles))
        grad_a = _as(grad_a, lora_A.dtype)
        grad_b = lora_B.new_zeros(lora_B.shape, dtype=dtype).index_add_(
            0, chunk_of, torch.bmm(grad_tiles.transpose(1, 2), shrink))
        grad_b = _as(grad_b, lora_B.dtype)
    if need_dx:
        grad_x = torch.mm(grad_y, weight)
        grad_x += _scatter_rows(torch.bmm(grad_shrink, _as(lora_A.index_select(0, chunk_of), dtype)), plan)
    return grad_x, grad_a, grad_b


def _gather_backward(grad_y: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, table: Tensor,
                     shrink: Tensor, plan: SegmentPlan, need_dx: bool, need_dlora: bool):
    """The gather path's backward: S' [T, r_max, 1], each row with its own A_i, B_i."""
    dtype = shrink.dtype
    rows = plan.row_weights
    coef = _row_coefficients(table, plan)  # [T, r_max, 1]
    grad_y3 = _as(grad_y, dtype).unsqueeze(2)  # [T, out, 1]
    grad_shrink = torch.bmm(_as(lora_B.index_select(0, rows), dtype).transpose(1, 2), grad_y3).mul_(coef)
    grad_x = grad_a = grad_b = None
    if need_dlora:  # base rows: dS = 0 and S' = 0, so adapter 0 (their gathered row) gets zeros
        grad_a = lora_A.new_zeros(lora_A.shape, dtype=dtype).index_add_(
            0, rows, torch.bmm(grad_shrink, _as(x2d, dtype).unsqueeze(1)))
        grad_a = _as(grad_a, lora_A.dtype)
        grad_b = lora_B.new_zeros(lora_B.shape, dtype=dtype).index_add_(
            0, rows, torch.bmm(grad_y3, shrink.transpose(1, 2)))
        grad_b = _as(grad_b, lora_B.dtype)
    if need_dx:
        grad_x = torch.mm(grad_y, weight)
        grad_x += torch.bmm(grad_shrink.transpose(1, 2), _as(lora_A.index_select(0, rows), dtype)).squeeze(1)
    return grad_x, grad_a, grad_b
