"""The multi-adapter embedding op: ``multi_lora_embedding`` (inference only).

For token ids ``idx`` and n adapter slots, each token its own slot ``i`` (or -1):

    y[t] = E[idx[t]] + s_i · A_i[idx[t], :r_i] B_i[:, :r_i]ᵀ

The A stack is [n, num_embeddings, r_max] (each token's rank row contiguous, as vLLM's
``lora_a_stacked``), so the LoRA shrink is a gather of one row per token (no matmul over the
vocabulary); the expand is ``lora_fused.ops.delta``'s (Triton: one launch adding into y). The
layer is :class:`lora_fused.modules.embedding.MultiLoRAEmbedding`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch.segments import SegmentPlan
from .delta import apply_expand, as_ranks, as_scalings, resolve_plan

__all__ = ["multi_lora_embedding"]


def _check_ids(idx: Tensor) -> None:
    if not isinstance(idx, Tensor) or idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be an int32/int64 tensor of token ids, got "
                        f"{getattr(idx, 'dtype', type(idx).__name__)}")


def multi_lora_embedding(idx: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                         adapter_ids_or_plan: Union[Tensor, SegmentPlan], scalings, *,
                         ranks: Optional[Tensor] = None, padding_idx: Optional[int] = None,
                         check_ranks: bool = True) -> Tensor:
    """``y[t] = E[idx[t]] + s_i · A_i[idx[t], :r_i] B_i[:, :r_i]ᵀ`` with ``i = ids[t]`` (-1: E alone).

    weight [V, dim]; lora_A [n, V, r_max] (each slot's Aᵀ: PEFT's lora_embedding_A transposed);
    lora_B [n, dim, r_max]; ids (or a plan) with one entry per token of ``idx``; scalings [n];
    ranks [n] in [0, r_max] (their values are read on the host unless ``check_ranks=False``).
    ``padding_idx`` only matters for gradients in ``F.embedding``: the values are E's row, as here.
    Inference only (no autograd)."""
    _check_ids(idx)
    if lora_A.dim() != 3 or lora_B.dim() != 3 or lora_A.shape[1] != weight.shape[0] \
            or tuple(lora_B.shape) != (lora_A.shape[0], weight.shape[1], lora_A.shape[2]):
        raise ValueError(f"lora_A must be [n, num_embeddings={weight.shape[0]}, r_max] and lora_B "
                         f"[n, embedding_dim={weight.shape[1]}, r_max], got {tuple(lora_A.shape)} and "
                         f"{tuple(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != weight.dtype or t.device != weight.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device} but weight is {weight.dtype} on {weight.device}")
    n, V, r_max = lora_A.shape
    flat_idx = idx.reshape(-1)
    with torch.no_grad():
        y = F.embedding(flat_idx, weight, padding_idx)
        plan = resolve_plan(adapter_ids_or_plan, n, flat_idx.shape[0], weight.device)
        scalings = as_scalings(scalings, n, weight.device)
        ranks = as_ranks(ranks, n, r_max, weight.device, check_values=check_ranks)
        # the gather-shrink: row (slot i, token v) of the [n·V, r_max] view of A
        shrink = lora_A.reshape(n * V, r_max).index_select(0, plan.adapter_ids.clamp(min=0) * V + flat_idx)
        apply_expand(y, shrink, lora_B, plan, scalings, ranks, (weight.shape[1],), compact=False)
    return y.view(*idx.shape, weight.shape[1])
