"""vLLM's LoRA interface (``PunicaWrapperGPU``) on lora-fused's delta kernels.

Follows vLLM v0.11 (``vllm/lora/punica_wrapper/punica_gpu.py``: ``add_lora_linear``,
``add_lora_embedding``, ``add_lora_logits``; layouts from
``vllm/lora/layers/base_linear.py`` and ``vocal_parallel_embedding.py``):

- ``lora_a_stacked``: a tuple, one per output slice, of [max_loras, 1, max_rank, in];
- ``lora_b_stacked``: a tuple of [max_loras, 1, out_j, max_rank];
- ``token_lora_mapping`` int [T] (the wrapper's ``token_lora_indices``), -1 = no LoRA;
  the logits use the per-sample mapping (``sampler_indices``) instead;
- ``scale`` multiplies the delta (vLLM passes 1.0: PEFT's scaling is folded into B
  when an adapter is loaded); every adapter uses all max_rank rows (zero-padded).

y is updated in place; x and y may carry leading dimensions (viewed as 2-D, as vLLM does).
A layer would call, where it calls ``self.punica_wrapper.add_lora_linear``::

    from lora_fused.integrations import vllm as lf_vllm
    lf_vllm.add_lora_linear(output, x, self.lora_a_stacked, self.lora_b_stacked, 1.0,
                            self.output_slices, punica_wrapper.token_lora_indices)

The slices stay vLLM's own tensors: the Triton kernels read each slice from its base address
(an int64 table per layer, made once: addresses do not change when ``set_lora`` writes in
place), so nothing is copied; the torch backend (CPU) stacks them per call. vLLM's ``buffer``
argument and ``add_inputs=False`` of ``add_lora_linear`` are not offered.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..ops.delta import add_lora, add_lora_slices, apply_expand, check_writable_output, resolve_plan
from ..dispatch.segments import SegmentPlan
from . import cached_plan

__all__ = ["add_lora_linear", "add_lora_embedding", "add_lora_logits"]

def _check_stacks(lora_a_stacked, lora_b_stacked, output_slices) -> tuple[int, ...]:
    if not isinstance(lora_a_stacked, (tuple, list)) or not isinstance(lora_b_stacked, (tuple, list)):
        raise TypeError("lora_a_stacked and lora_b_stacked must be tuples of tensors, one per output slice "
                        f"(vLLM's layout), got {type(lora_a_stacked).__name__} and {type(lora_b_stacked).__name__}")
    widths = tuple(int(w) for w in output_slices)
    if not (len(lora_a_stacked) == len(lora_b_stacked) == len(widths) >= 1):
        raise ValueError(f"lora_a_stacked ({len(lora_a_stacked)}), lora_b_stacked ({len(lora_b_stacked)}) and "
                         f"output_slices {widths} must have one entry per slice")
    a0 = lora_a_stacked[0]
    for j, (a, b) in enumerate(zip(lora_a_stacked, lora_b_stacked)):
        if a.dim() != 4 or a.shape[1] != 1 or a.shape != a0.shape:
            raise ValueError(f"lora_a_stacked[{j}] must be [max_loras, 1, max_rank, in] like slice 0 "
                             f"{tuple(a0.shape)}, got {tuple(a.shape)}")
        if tuple(b.shape) != (a0.shape[0], 1, widths[j], a0.shape[2]):
            raise ValueError(f"lora_b_stacked[{j}] must be [max_loras={a0.shape[0]}, 1, out_j={widths[j]}, "
                             f"max_rank={a0.shape[2]}] (output_slices {widths}), got {tuple(b.shape)}")
    return widths


def _plan(mapping: Tensor, n: int, T: int, device, name: str) -> SegmentPlan:
    """The plan of the first T entries of an engine's (possibly longer, preallocated) mapping."""
    if not isinstance(mapping, Tensor):
        raise TypeError(f"{name} must be an int tensor [T], got {type(mapping).__name__}")
    if mapping.dim() != 1 or mapping.shape[0] < T:
        raise ValueError(f"{name} must be 1-D with at least T={T} entries (one per token), got shape "
                         f"{tuple(mapping.shape)}")
    ids = mapping[:T]
    return cached_plan(("vllm", name, n, T), (ids,), ids, lambda: resolve_plan(ids, n, T, device, name))


def _scale_vector(scale, n: int, device) -> Tensor:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    return torch.full((n,), float(scale), dtype=torch.float32, device=device)


def add_lora_linear(y: Tensor, x: Tensor, lora_a_stacked: Sequence[Tensor], lora_b_stacked: Sequence[Tensor],
                    scale: float, output_slices: Sequence[int], token_lora_mapping: Tensor) -> Tensor:
    """``y[t, o_j:o_j+w_j] += scale · (x[t] A_j[i,0]ᵀ) B_j[i,0]ᵀ`` for ``i = token_lora_mapping[t] >= 0``.

    vLLM's ``add_lora_linear`` semantics (one shrink for all slices, one expand); y [T, sum(out_j)]
    in place (returned)."""
    widths = _check_stacks(lora_a_stacked, lora_b_stacked, output_slices)
    y2d, x2d = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
    n, _, r_max, _ = lora_a_stacked[0].shape
    plan = _plan(token_lora_mapping, n, x2d.shape[0], x.device, "token_lora_mapping")
    scalings = _scale_vector(scale, n, x.device)
    if len(widths) == 1:  # views: nothing copied
        add_lora(y2d, x2d, lora_a_stacked[0], lora_b_stacked[0][:, 0], plan, scalings, slices=widths)
    else:
        add_lora_slices(y2d, x2d, [a[:, 0] for a in lora_a_stacked], [b[:, 0] for b in lora_b_stacked], plan,
                        scalings)
    return y


def add_lora_embedding(y: Tensor, x: Tensor, lora_b_stacked: Tensor, token_lora_mapping: Tensor,
                       add_inputs: bool = True) -> Tensor:
    """``y[t] += x[t] B[i, 0]ᵀ`` for ``i = token_lora_mapping[t] >= 0`` (no scale), vLLM's embedding expand.

    x [T, max_rank] holds each token's LoRA-A embedding row (vLLM gathers it from
    ``lora_a_stacked_2d`` with the token ids offset by adapter); lora_b_stacked
    [max_loras, 1, dim, max_rank]; y [T, dim]. ``add_inputs=False``: rows with a LoRA are
    overwritten by their delta, as vLLM's expand does; rows with -1 are left alone."""
    if not isinstance(lora_b_stacked, Tensor) or lora_b_stacked.dim() != 4 or lora_b_stacked.shape[1] != 1:
        raise ValueError("lora_b_stacked must be a tensor [max_loras, 1, dim, max_rank], got "
                         f"{getattr(lora_b_stacked, 'shape', type(lora_b_stacked).__name__)}")
    n, _, dim, r_max = lora_b_stacked.shape
    y2d, x2d = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
    if y2d.shape[1] != dim or x2d.shape != (y2d.shape[0], r_max):
        raise ValueError(f"y must be [T, dim={dim}] and x [T, max_rank={r_max}] (lora_b_stacked "
                         f"{tuple(lora_b_stacked.shape)}), got y {tuple(y.shape)}, x {tuple(x.shape)}")
    for name, t in (("x", x), ("lora_b_stacked", lora_b_stacked)):
        if t.dtype != y.dtype or t.device != y.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device} but y is {y.dtype} on {y.device}")
    check_writable_output(y)
    plan = _plan(token_lora_mapping, n, y2d.shape[0], y.device, "token_lora_mapping")
    with torch.no_grad():
        if not add_inputs:
            y2d.masked_fill_((plan.adapter_ids >= 0)[:, None], 0)
        ranks = torch.full((n,), r_max, dtype=torch.int32, device=y.device)
        apply_expand(y2d, x2d, lora_b_stacked[:, 0], plan, torch.ones(n, device=y.device), ranks,
                     (dim,), compact=False)
    return y


def add_lora_logits(y: Tensor, x: Tensor, lora_a_stacked: Tensor, lora_b_stacked: Tensor, scale: float,
                    sampler_lora_mapping: Tensor) -> Tensor:
    """``y[s, :V] += scale · (x[s] A[i, 0]ᵀ) B[i, 0, :V]ᵀ`` for ``i = sampler_lora_mapping[s] >= 0``,
    V = min(y's width, the LoRA vocabulary).

    vLLM's ``add_lora_logits`` (the LM head's LoRA over the sampled rows): x [S, hidden],
    lora_a_stacked [max_loras, 1, max_rank, hidden], lora_b_stacked [max_loras, 1, vocab, max_rank],
    y [S, width] in place. The logits may be wider than the LoRA vocabulary (vLLM pads them for
    the lm head and cuts the padding off afterwards): the delta goes into the leading columns,
    as vLLM's ``bgmv_expand`` (``vllm/lora/ops/torch_ops/lora_ops.py``) adds into
    ``min(outputs.shape[1], output_tensor.shape[1])`` columns; the rest of y is left as it is."""
    for name, t in (("lora_a_stacked", lora_a_stacked), ("lora_b_stacked", lora_b_stacked)):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[1] != 1:
            raise ValueError(f"{name} must be a tensor [max_loras, 1, rows, cols], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    n = lora_a_stacked.shape[0]
    y2d, x2d = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
    common = min(y2d.shape[1], lora_b_stacked.shape[2])
    plan = _plan(sampler_lora_mapping, n, x2d.shape[0], x.device, "sampler_lora_mapping")
    add_lora(y2d[:, :common], x2d, lora_a_stacked, lora_b_stacked[:, 0, :common], plan,
             _scale_vector(scale, n, x.device))
    return y
