"""The torch backend of the grouped (mixture-of-experts) LoRA op: plain PyTorch, one expert at a time.

Pairs (token, chosen expert) come sorted by expert (``ops.grouped.ExpertPlan``): expert e's
pairs are the sorted positions ``offsets[e-1] : offsets[e]``; sorted pair j reads ``x[rows[j]]``
(``rows`` None: ``x[j]``). With c = s / (1 - p) and keep the 0/1 dropout mask over the sorted
LoRA input rows (absent without dropout, c = s), per expert e and its rows X_e:

    forward    Y_e = X_e W_eᵀ + b_e + c · S_e B_eᵀ,        S_e = (keep ⊙ X_e) A_eᵀ   (saved)
    backward   G_e = c · dY_e B_e;  dB_e = c · dY_eᵀ S_e;  dA_e = G_eᵀ (keep ⊙ X_e);
               dX_e = dY_e W_e + keep ⊙ (G_e A_e)

Nothing of one expert's out × in size is formed (unless the base weight itself is trained:
then dW_e = dY_eᵀ X_e is that gradient). The gathered X (sorted pair rows) is a temporary of
each call, regathered in the backward; the mask is regenerated from the seed
(``torch_backend.keep_mask``). Pairs past the last expert's end (expert-parallel sentinels)
get y = 0, S = 0 and no gradient. The loop over experts reads ``offsets`` on the host: this
backend runs on the host's data (on a GPU it is a forced, debugging route, and that read syncs).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .torch_backend import keep_mask


def expert_segments(offsets: Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, end) of each expert with rows, from the inclusive cumulative ends ``offsets``."""
    segments, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            segments.append((e, start, end))
        start = end
    return segments


def gathered_rows(x: Tensor, rows: Optional[Tensor]) -> Tensor:
    """The LoRA and base input of each sorted pair: ``x[rows]`` (a temporary), or x itself."""
    return x if rows is None else x.index_select(0, rows)


def _dropped(xs: Tensor, dropout_p: float, seed: Optional[Tensor]) -> tuple[Optional[Tensor], Tensor]:
    """(keep, keep ⊙ xs), keep None (and xs itself) without dropout."""
    if seed is None or dropout_p == 0.0:
        return None, xs
    keep = keep_mask(seed, xs.shape[0], xs.shape[1], dropout_p, xs.dtype, xs.device)
    return keep, keep * xs


def grouped_linear_forward(x: Tensor, rows: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                           offsets: Tensor) -> Tensor:
    """The base alone: y_j = x_j W_eᵀ + b_e per sorted pair (autograd records through these ops)."""
    xs = gathered_rows(x, rows)
    parts = []
    for e, start, end in expert_segments(offsets):
        part = xs[start:end] @ weight[e].t()
        parts.append(part if bias is None else part + bias[e])
    used = int(offsets[-1]) if offsets.numel() else 0
    if used < xs.shape[0]:
        parts.append(xs.new_zeros(xs.shape[0] - used, weight.shape[1]))
    return torch.cat(parts) if parts else xs.new_zeros(0, weight.shape[1])


def grouped_lora_forward(x: Tensor, rows: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                         lora_A: Tensor, lora_B: Tensor, offsets: Tensor, scaling: float, dropout_p: float,
                         seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(y [P, out], S [P, r]) in sorted pair order (see the module docstring)."""
    xs = gathered_rows(x, rows)
    P = xs.shape[0]
    _, dropped = _dropped(xs, dropout_p, seed)
    c = scaling / (1.0 - dropout_p) if seed is not None else scaling
    y = xs.new_zeros(P, weight.shape[1])
    shrink = xs.new_zeros(P, lora_A.shape[1])
    for e, start, end in expert_segments(offsets):
        y_e, s_e = y[start:end], shrink[start:end]
        torch.mm(dropped[start:end], lora_A[e].t(), out=s_e)
        if bias is None:
            torch.mm(xs[start:end], weight[e].t(), out=y_e)
        else:
            torch.addmm(bias[e], xs[start:end], weight[e].t(), out=y_e)
        y_e.addmm_(s_e, lora_B[e].t(), alpha=c)
    return y, shrink


def grouped_lora_backward(grad_y: Tensor, x: Tensor, rows: Optional[Tensor], weight: Tensor, lora_A: Tensor,
                          lora_B: Tensor, shrink: Tensor, offsets: Tensor, scaling: float, dropout_p: float,
                          seed: Optional[Tensor], need_dx: bool, need_dlora: bool):
    """(dx_pairs [P, in], dA, dB), None where not needed (as the kernels' launcher); experts
    without rows get exact zeros. dx_pairs is per sorted pair (the op sums it into x's rows)."""
    xs = gathered_rows(x, rows)
    keep, dropped = _dropped(xs, dropout_p, seed)
    c = scaling / (1.0 - dropout_p) if seed is not None else scaling
    dx = xs.new_zeros(xs.shape) if need_dx else None
    d_a = lora_A.new_zeros(lora_A.shape) if need_dlora else None
    d_b = lora_B.new_zeros(lora_B.shape) if need_dlora else None
    for e, start, end in expert_segments(offsets):
        dy_e = grad_y[start:end]
        g_e = torch.mm(dy_e, lora_B[e]).mul_(c)
        if need_dx:
            dx_e = dx[start:end]
            torch.mm(dy_e, weight[e], out=dx_e)
            lora_dx = g_e @ lora_A[e]
            dx_e.add_(lora_dx if keep is None else lora_dx.mul_(keep[start:end]))
        if need_dlora:
            torch.mm(g_e.t(), dropped[start:end], out=d_a[e])
            torch.mm(dy_e.t(), shrink[start:end], out=d_b[e])
            d_b[e].mul_(c)
    return dx, d_a, d_b


def base_param_grads(grad_y: Tensor, x: Tensor, rows: Optional[Tensor], weight: Tensor, offsets: Tensor,
                     need_w: bool, need_bias: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """dW_e = dY_eᵀ X_e and db_e = Σ dY_e, None where not needed: for a trained base (rare: LoRA
    freezes it), on either backend (this is where a trained base's dW is formed, one expert at a time)."""
    if not (need_w or need_bias):
        return None, None
    xs = gathered_rows(x, rows)
    d_w = weight.new_zeros(weight.shape) if need_w else None
    d_bias = grad_y.new_zeros(weight.shape[0], weight.shape[1]) if need_bias else None
    for e, start, end in expert_segments(offsets):
        if need_w:
            torch.mm(grad_y[start:end].t(), xs[start:end].to(grad_y.dtype), out=d_w[e])
        if need_bias:
            torch.sum(grad_y[start:end], 0, out=d_bias[e])
    return d_w, d_bias
