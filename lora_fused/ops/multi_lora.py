"""The segmented multi-adapter LoRA op: custom ops with autograd, and the public function.

``lora_fused::multi_lora_fwd`` / ``multi_lora_bwd`` are ``torch.library`` custom
ops (fake kernels for ``torch.compile``; eager calls take a plain autograd Function; both
defined by :func:`lora_fused.ops._scaffold.define_lora_op`), dispatched to the Triton kernels of
``lora_fused.kernels.multi_lora`` or :mod:`lora_fused.backends.torch_backend`. The backward gives
every row its dX and every adapter its own dA_i, dB_i, reduced over its rows
only: one batch trains several adapters at once. Saved for backward: x, the
small S = x A_iᵀ per row, and the plan; never any B·A.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..backends import torch_backend
from . import delta
from ._scaffold import apply_function, define_lora_op, needs_autograd, records_autograd
from ..dispatch import tuning
from ..dispatch.backend import multi_kernels, on_tensor_device, use_triton
from ..dispatch.segments import SegmentPlan, resolve_plan, values_checkable
from ..validation import check_multi_lora_args, check_rank_values, multi_lora_dims
from ..value_cache import derived

#: Bound once (an attribute lookup less per eager call); torch.compile still sees the call.
_is_compiling = torch.compiler.is_compiling


def _shrink_layout(x: Tensor, weight: Tensor, lora_A: Tensor, regime: str) -> tuple[tuple, torch.dtype]:
    """Shape and dtype of the saved S: fp32 split-K partials [splits, T, r_max] (Triton), or
    one [block, r_max] tile per chunk in the torch backend's compute dtype."""
    T, n, r_max = x.shape[0], lora_A.shape[0], lora_A.shape[1]
    if use_triton(x, weight):
        kernels = multi_kernels()
        splits, _ = kernels.split_k(x.shape[1], kernels.multi_config(regime))
        return (splits, T, r_max), torch.float32
    return torch_backend.multi_shrink_shape(T, n, r_max, regime), torch_backend.compute_dtype(x.dtype)


def _dense(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as a contiguous ``dtype`` tensor for a kernel, without a dispatch when it is one."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


@functools.lru_cache(maxsize=64)
def _full_ranks(n: int, r_max: int, device: torch.device) -> Tensor:
    """ranks = r_max for every adapter (ranks=None), made once per shape and device: the kernels
    only read it, so a captured CUDA graph may keep it."""
    return torch.full((n,), r_max, dtype=torch.int32, device=device)


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
             scalings: Tensor, ranks: Optional[Tensor], plan: SegmentPlan) -> tuple[Tensor, Tensor]:
    """(y [T, out], S): y[t] = x[t] W0ᵀ + b + s_i · (x[t] A_i[:r_i]ᵀ) B_i[:, :r_i]ᵀ (ranks None:
    every adapter at r_max; only the torch backend is given None)."""
    if use_triton(x, weight):
        return _triton_forward(x, weight, bias, lora_A, lora_B, scalings, ranks, plan)
    return torch_backend.multi_lora_forward(x, weight, bias, lora_A, lora_B, scalings, ranks, plan)


@on_tensor_device
def _triton_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    scalings: Tensor, ranks: Tensor, plan: SegmentPlan) -> tuple[Tensor, Tensor]:
    """:func:`_forward` on the Triton backend (its cached launcher), on x's device."""
    return multi_kernels().multi_lora_forward(x, weight, bias, lora_A, lora_B, _dense(scalings, torch.float32),
                                              _dense(ranks, torch.int32), plan, plan.regime)


@on_tensor_device
def _lora_grads(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scalings: Tensor,
                ranks: Tensor, shrink: Tensor, plan: SegmentPlan, need_dx: bool, need_dlora: bool):
    """(dX, dA, dB), None where not needed; every adapter's dA_i, dB_i from its own rows only."""
    if use_triton(x, weight):
        return multi_kernels().multi_lora_backward(
            grad_y.contiguous(), x, weight, lora_A, lora_B, _dense(scalings, torch.float32),
            _dense(ranks, torch.int32), shrink, plan, plan.regime, need_dx, need_dlora)
    return torch_backend.multi_lora_backward(grad_y, x, weight, lora_A, lora_B, scalings, ranks, shrink,
                                             plan, need_dx, need_dlora)


def _unpack(plan: Tensor, x: Tensor, lora_A: Tensor, regime: str) -> SegmentPlan:
    return SegmentPlan.from_packed(plan, x.shape[0], lora_A.shape[0], regime)


# The custom ops take the plan as its packed buffer and regime (a schema holds no plan object);
# the eager Function takes the plan itself (its views: nothing to unpack per call).
def _op_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                scalings: Tensor, ranks: Tensor, plan: Tensor, regime: str) -> tuple[Tensor, Tensor]:
    """(y [T, out], S); ``plan`` is a :class:`SegmentPlan`'s packed buffer (see ``_forward``)."""
    return _forward(x, weight, bias, lora_A, lora_B, scalings, ranks, _unpack(plan, x, lora_A, regime))


def _op_lora_grads(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scalings: Tensor,
                   ranks: Tensor, shrink: Tensor, plan: Tensor, regime: str, need_dx: bool, need_dlora: bool):
    """:func:`_lora_grads` with the plan as its packed buffer and regime."""
    return _lora_grads(grad_y, x, weight, lora_A, lora_B, scalings, ranks, shrink, _unpack(plan, x, lora_A, regime),
                       need_dx, need_dlora)


def _fake_forward(x, weight, bias, lora_A, lora_B, scalings, ranks, plan, regime):
    shape, dtype = _shrink_layout(x, weight, lora_A, regime)
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty(shape, dtype=dtype)


#: The custom ops ``lora_fused::multi_lora_fwd`` / ``_bwd`` and the eager Function (``_scaffold``). The
#: Function also saves the plan's packed buffer, so a plan rewritten in place (``SegmentPlan.update_``)
#: between forward and backward is refused by autograd instead of read.
MULTI_LORA = define_lora_op(("lora_fused::multi_lora_fwd", "lora_fused::multi_lora_bwd"), _op_forward,
                            _op_lora_grads, fake_forward=_fake_forward, function_name="_EagerMultiLoRA",
                            eager_forward=_forward, eager_lora_grads=_lora_grads,
                            eager_guard=("plan", "packed"))
_EagerMultiLoRA = MULTI_LORA.function  # a module global: what apply_multi_lora looks up per call


def multi_lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                      adapter_ids: Union[Tensor, SegmentPlan], scalings: Tensor,
                      bias: Optional[Tensor] = None, *, ranks: Optional[Tensor] = None,
                      slices: Optional[Sequence[int]] = None) -> Tensor:
    """A different LoRA adapter for each row of one batch.

    ``y[t] = x[t] W0ᵀ + b + scalings[i] · (x[t] lora_A[i, :r_i]ᵀ) lora_B[i, :, :r_i]ᵀ`` with
    ``i = adapter_ids[t]``; rows with ``i = -1`` get the base layer only.

    x [..., in] (T rows), weight [out, in], lora_A [n, r_max, in], lora_B [n, out, r_max],
    adapter_ids int32/int64 with T entries, or a :class:`SegmentPlan` from
    ``plan_segments(ids, n)`` (build it once per batch and share it across layers;
    no host sync then), scalings float tensor [n] (applied at run time, never folded
    into B), ranks int tensor [n] | None (adapter i uses its first ranks[i] rank rows;
    its padded rows of A / columns of B get zero gradient). Differentiable in x,
    lora_A, lora_B, and in weight/bias when they require grad.

    ``slices`` (S output widths summing to out, e.g. q|k|v of a packed ``qkv_proj``): lora_A is
    then [n, S, r_max, in] (one A per slice; [n, r_max, in] is one slice) and slice j of y adds
    ``scalings[i] · (x[t] lora_A[i, j, :r_i]ᵀ) lora_B[i, o_j:o_j+w_j, :r_i]ᵀ`` over its own columns
    of lora_B; see :func:`packed_multi_lora_linear`, which this delegates to.
    """
    if slices is not None:  # the packed path; the one-slice path below is untouched
        if isinstance(lora_A, Tensor) and lora_A.dim() == 3:
            lora_A = lora_A.unsqueeze(1)  # [n, r_max, in]: one slice
        return packed_multi_lora_linear(x, weight, lora_A, lora_B, adapter_ids, scalings, bias, ranks=ranks,
                                        slices=slices)
    return checked_multi_lora(x, weight, lora_A, lora_B, adapter_ids, scalings, bias, ranks, True)


def checked_multi_lora(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                       adapter_ids: Union[Tensor, SegmentPlan], scalings: Tensor, bias: Optional[Tensor],
                       ranks: Optional[Tensor], check_ranks: bool) -> Tensor:
    """``multi_lora_linear`` without slices: the arguments checked in one expression (the full
    checks raise when it fails), then :func:`apply_multi_lora` with the dimensions it read.
    ``check_ranks``: check ranks' values too (a host read, again only when ranks changes;
    ``MultiLoRALinear`` checks its ranks when an adapter is added instead)."""
    dims = multi_lora_dims(x, weight, lora_A, lora_B, scalings, bias, ranks)
    if dims is None:
        check_multi_lora_args(x, weight, lora_A, lora_B, scalings, bias, ranks)  # raises with the details
    if check_ranks and ranks is not None and values_checkable(ranks):
        derived(check_rank_values, (ranks,), (lora_A.shape[1],))  # lora_fused.value_cache
    return apply_multi_lora(x, weight, lora_A, lora_B, adapter_ids, scalings, bias, ranks, dims)


def apply_multi_lora(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                     adapter_ids: Union[Tensor, SegmentPlan], scalings: Tensor, bias: Optional[Tensor],
                     ranks: Optional[Tensor], dims: Optional[tuple] = None) -> Tensor:
    """``multi_lora_linear`` once its arguments are checked, trusting ``ranks``' values: with a
    plan, no host sync. ``dims``: what the check read, ``(x.shape, n, r_max, out_features,
    dtype, device)`` (:func:`lora_fused.validation.multi_lora_dims`), or None to read it here.

    Routes: compiling: the custom op; Triton: the cached launcher directly when nothing needs a
    gradient, else the Function; torch: the backend directly when nothing needs a gradient, else
    the Function. ``ranks`` None: every adapter at r_max (a cached int32 tensor for Triton)."""
    if dims is None:
        dims = (x.shape, lora_A.shape[0], lora_A.shape[1], weight.shape[0], x.dtype, x.device)
    x_shape, n, r_max, out_features, dtype, device = dims
    if len(x_shape) == 2:
        x2d, T = x, x_shape[0]
    else:
        x2d = x.reshape(-1, x_shape[-1])
        T = x2d.shape[0]
    plan = adapter_ids
    # A plan of this batch's shape and device (the common call) in one expression; anything else
    # (ids, a plan for another batch, another device) is checked and built by resolve_plan.
    if not (type(plan) is SegmentPlan and plan.n_adapters == n and plan.num_rows == T and plan.device == device):
        plan = resolve_plan(adapter_ids, n, T, device)
    if _is_compiling():
        if ranks is None:  # a tensor made in the graph
            ranks = torch.full((n,), r_max, dtype=torch.int32, device=device)
        y = MULTI_LORA.fwd(x2d, weight, bias, lora_A, lora_B, scalings, ranks, plan.packed, plan.regime)[0]
        return y if x2d is x else y.reshape(*x_shape[:-1], out_features)
    grad = records_autograd(x, weight, bias, lora_A, lora_B)
    # use_triton reads its own (device.type costs ~0.3 µs: x.is_cuda / is_cpu are cheaper)
    if use_triton(x2d, weight):
        if ranks is None:  # cached outside a capture only: a tensor made while capturing has values after a replay
            ranks = (torch.full((n,), r_max, dtype=torch.int32, device=device) if tuning.capturing()
                     else _full_ranks(n, r_max, device))
        if grad:
            y = apply_function(_EagerMultiLoRA, (x2d, weight, bias, lora_A, lora_B, scalings, ranks, plan))
        else:  # _forward's Triton branch, without the Function or a second backend decision
            y = _triton_forward(x2d, weight, bias, lora_A, lora_B, scalings, ranks, plan)[0]
    elif grad:  # the torch backend (ranks None: every adapter at r_max)
        y = apply_function(_EagerMultiLoRA, (x2d, weight, bias, lora_A, lora_B, scalings, ranks, plan))
    else:
        y = torch_backend.multi_lora_forward(x2d, weight, bias, lora_A, lora_B, scalings, ranks, plan, False)[0]
    return y if x2d is x else y.reshape(*x_shape[:-1], out_features)


# --------------------------------------------------------------------------
# Packed projections (q|k|v, gate|up): the base GEMM included, differentiable
# --------------------------------------------------------------------------


def packed_multi_lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                             adapter_ids_or_plan: Union[Tensor, SegmentPlan], scalings: Tensor,
                             bias: Optional[Tensor] = None, *, ranks: Optional[Tensor] = None,
                             slices: Sequence[int]) -> Tensor:
    """``multi_lora_linear`` over a packed projection (q|k|v, gate|up), differentiable.

    ``y[t, o_j:o_j+w_j] = x[t] W[o_j:o_j+w_j]ᵀ + b[o_j:o_j+w_j]
                          + scalings[i] · (x[t] A[i,j,:r_i]ᵀ) B[i, o_j:o_j+w_j, :r_i]ᵀ``

    weight [out_total, in], bias [out_total] | None, lora_A [n, S, r_max, in], lora_B
    [n, out_total, r_max], slices the S widths. Gradients reach x, lora_A, lora_B (and weight /
    bias when they require grad), each slice's from its own rows of lora_A and columns of lora_B.
    With autograd: one ``lf.multi_lora_linear`` per slice over views of the packed tensors (one
    plan shared): x is read once per slice. Without (no grad mode, or nothing requires grad):
    the base GEMM, then :func:`lora_fused.ops.delta.add_lora` into its output: one shrink reads
    x once for all slices.
    """
    if not isinstance(lora_A, Tensor) or lora_A.dim() != 4:
        raise ValueError(f"lora_A must be [n, S, r_max, in] (one r_max x in block per slice of slices="
                         f"{slices!r}), got {getattr(lora_A, 'shape', type(lora_A).__name__)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be [out_total, in], got {getattr(weight, 'shape', type(weight).__name__)}")
    if lora_A.shape[0] < 1 or lora_A.shape[1] < 1 or lora_A.shape[2] < 1 or lora_A.shape[3] != weight.shape[1]:
        raise ValueError(f"lora_A must be [n >= 1, S >= 1, r_max >= 1, in={weight.shape[1]}] (weight "
                         f"{tuple(weight.shape)}, slices={slices!r}), got shape {tuple(lora_A.shape)}")
    widths = delta.check_slices(slices, weight.shape[0], lora_A.shape[1])
    # The whole-width checks (lora_B [n, out_total, r_max], bias [out_total], dtypes, devices) once,
    # so a too-wide lora_B or bias is refused rather than read in part by the per-slice calls.
    check_multi_lora_args(x, weight, lora_A[:, 0], lora_B, scalings, bias, ranks)
    n = lora_A.shape[0]
    x2d = x.reshape(-1, x.shape[-1])
    plan = delta.resolve_plan(adapter_ids_or_plan, n, x2d.shape[0], x.device)  # bad ids: ValueError
    if not torch.compiler.is_compiling() and not needs_autograd((x2d, weight, bias, lora_A, lora_B)):
        # Inference: the base GEMM, then add_lora's one shrink over all slices (x read once) and
        # one expand into y. Ranks checked as multi_lora_linear does ([1, r_max], cached).
        if ranks is not None and values_checkable(ranks):
            derived(check_rank_values, (ranks,), (lora_A.shape[2],))
        y = torch.nn.functional.linear(x2d, weight, bias)
        delta.add_lora(y, x2d, lora_A, lora_B, plan, scalings, ranks=ranks, slices=widths)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    outs, start = [], 0
    for j, width in enumerate(widths):
        cols = slice(start, start + width)
        outs.append(multi_lora_linear(x2d, weight[cols], lora_A[:, j], lora_B[:, cols], plan, scalings,
                                      None if bias is None else bias[cols], ranks=ranks))
        start += width
    return torch.cat(outs, dim=1).reshape(*x.shape[:-1], weight.shape[0])
