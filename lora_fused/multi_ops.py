"""The segmented multi-adapter LoRA op: custom ops with autograd, and the public function.

``lora_fused::multi_lora_fwd`` / ``multi_lora_bwd`` are ``torch.library`` custom
ops (fake kernels for ``torch.compile``), dispatched to the Triton kernels of
``lora_fused.kernels.multi_lora`` or the torch reference. The backward gives
every row its dX and every adapter its own dA_i, dB_i, reduced over its rows
only: one batch trains several adapters at once. Saved for backward: x, the
small S = x A_iᵀ per row, and the plan; never any B·A.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import reference
from .ops import _use_triton
from .segments import SegmentPlan, check_adapter_ids, plan_segments, values_checkable
from .validation import check_multi_lora_args, check_rank_values


def _kernels():
    from lora_fused.kernels import multi_lora
    return multi_lora


def _shrink_layout(x: Tensor, weight: Tensor, lora_A: Tensor, regime: str) -> tuple[tuple, torch.dtype]:
    """Shape and dtype of the saved S: fp32 split-K partials (Triton) or one x-dtype slice (torch)."""
    T, r_max = x.shape[0], lora_A.shape[1]
    if _use_triton(x, weight):
        splits, _ = _kernels().split_k(x.shape[1], _kernels().multi_config(regime))
        return (splits, T, r_max), torch.float32
    return (1, T, r_max), x.dtype


def _plan(plan_tensors, n_adapters: int, regime: str) -> SegmentPlan:
    block = _kernels().multi_config(regime).block_rows
    return SegmentPlan(*plan_tensors, n_adapters=n_adapters, regime=regime, block_rows=block)


@torch.library.custom_op("lora_fused::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   scalings: Tensor, ranks: Tensor, sorted_rows: Tensor, seg_start: Tensor,
                   seg_len: Tensor, chunk_adapter: Tensor, chunk_start: Tensor, chunk_len: Tensor,
                   adapter_ids: Tensor, regime: str) -> tuple[Tensor, Tensor]:
    """(y [T, out], S): y[t] = x[t] W0ᵀ + b + s_i · (x[t] A_i[:r_i]ᵀ) B_i[:, :r_i]ᵀ."""
    plan_tensors = (sorted_rows, seg_start, seg_len, chunk_adapter, chunk_start, chunk_len, adapter_ids)
    if _use_triton(x, weight):
        return _kernels().multi_lora_forward(x, weight, bias, lora_A, lora_B, scalings.float().contiguous(),
                                             ranks.to(torch.int32).contiguous(),
                                             _plan(plan_tensors, lora_A.shape[0], regime), regime)
    return reference.multi_lora_forward_torch(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_ids)


@multi_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scalings, ranks, sorted_rows, seg_start, seg_len,
      chunk_adapter, chunk_start, chunk_len, adapter_ids, regime):
    shape, dtype = _shrink_layout(x, weight, lora_A, regime)
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty(shape, dtype=dtype)


@torch.library.custom_op("lora_fused::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                   scalings: Tensor, ranks: Tensor, shrink: Tensor, sorted_rows: Tensor,
                   seg_start: Tensor, seg_len: Tensor, chunk_adapter: Tensor, chunk_start: Tensor,
                   chunk_len: Tensor, adapter_ids: Tensor, regime: str, need_dx: bool,
                   need_dlora: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dA, dB); a gradient that is not needed comes back as an empty tensor."""
    plan_tensors = (sorted_rows, seg_start, seg_len, chunk_adapter, chunk_start, chunk_len, adapter_ids)
    if _use_triton(x, weight):
        grads = _kernels().multi_lora_backward(
            grad_y.contiguous(), x, weight, lora_A, lora_B, scalings.float().contiguous(),
            ranks.to(torch.int32).contiguous(), shrink, _plan(plan_tensors, lora_A.shape[0], regime),
            regime, need_dx, need_dlora)
    else:
        grads = reference.multi_lora_backward_torch(grad_y, x, weight, lora_A, lora_B, scalings, ranks,
                                                    shrink, adapter_ids, need_dx, need_dlora)
    return tuple(g if g is not None else grad_y.new_empty(0) for g in grads)


@multi_lora_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, scalings, ranks, shrink, sorted_rows, seg_start, seg_len,
      chunk_adapter, chunk_start, chunk_len, adapter_ids, regime, need_dx, need_dlora):
    empty = grad_y.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else empty,
            lora_A.new_empty(lora_A.shape) if need_dlora else empty,
            lora_B.new_empty(lora_B.shape) if need_dlora else empty)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scalings, ranks, *plan_tensors, regime = inputs
    _, shrink = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, scalings, ranks, shrink, *plan_tensors)
    ctx.regime = regime


def _backward(ctx, grad_y, _grad_shrink):
    x, weight, lora_A, lora_B, scalings, ranks, shrink, *plan_tensors = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if need_x or need_a or need_b:
        dx, da, db = torch.ops.lora_fused.multi_lora_bwd(
            grad_y, x, weight, lora_A, lora_B, scalings, ranks, shrink, *plan_tensors, ctx.regime,
            need_x, need_a or need_b)
        grad_x = dx if need_x else None
        grad_a = da if need_a else None
        grad_b = db if need_b else None
    if need_w:  # only when the base weight itself is trained
        grad_w = grad_y.t() @ x
    if need_bias:
        grad_bias = grad_y.sum(0)
    return (grad_x, grad_w, grad_bias, grad_a, grad_b) + (None,) * 10


torch.library.register_autograd("lora_fused::multi_lora_fwd", _backward, setup_context=_setup_context)


def _resolve_plan(adapter_ids: Union[Tensor, SegmentPlan], n: int, T: int, device) -> SegmentPlan:
    if isinstance(adapter_ids, SegmentPlan):
        plan = adapter_ids
        if plan.n_adapters != n or plan.num_rows != T:
            raise ValueError(f"the plan was built for {plan.num_rows} rows and {plan.n_adapters} adapters, "
                             f"but x has {T} rows and lora_A {n} adapters")
        if plan.device != device:
            raise ValueError(f"the plan is on {plan.device} but x is on {device}")
        return plan
    ids = check_adapter_ids(adapter_ids, n, T)
    if ids.device != device:
        raise ValueError(f"adapter_ids is on {ids.device} but x is on {device}; move it to x's device")
    return plan_segments(ids, n)


def multi_lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                      adapter_ids: Union[Tensor, SegmentPlan], scalings: Tensor,
                      bias: Optional[Tensor] = None, *, ranks: Optional[Tensor] = None) -> Tensor:
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
    """
    check_multi_lora_args(x, weight, lora_A, lora_B, scalings, bias, ranks)
    if ranks is not None and values_checkable(ranks):
        check_rank_values(ranks, lora_A.shape[1])
    return apply_multi_lora(x, weight, lora_A, lora_B, adapter_ids, scalings, bias, ranks)


def apply_multi_lora(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                     adapter_ids: Union[Tensor, SegmentPlan], scalings: Tensor, bias: Optional[Tensor],
                     ranks: Optional[Tensor]) -> Tensor:
    """``multi_lora_linear`` once its arguments are checked, trusting ``ranks``' values: with a
    plan, no host sync (``MultiLoRALinear`` checks its ranks when an adapter is added)."""
    n, r_max = lora_A.shape[0], lora_A.shape[1]
    x2d = x.reshape(-1, x.shape[-1])
    plan = _resolve_plan(adapter_ids, n, x2d.shape[0], x.device)
    if ranks is None:
        ranks = torch.full((n,), r_max, dtype=torch.int32, device=x.device)
    y, _ = torch.ops.lora_fused.multi_lora_fwd(x2d, weight, bias, lora_A, lora_B, scalings, ranks,
                                               *plan.tensors(), plan.regime)
    return y.reshape(*x.shape[:-1], weight.shape[0])
