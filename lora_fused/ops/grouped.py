"""Grouped (mixture-of-experts) LoRA: every row through its own expert's weight and LoRA factors.

    y[t] = x[t] W[e]ᵀ + b[e] + s · (drop(x[t]) A[e]ᵀ) B[e]ᵀ,      e = expert_ids[t]

W [E, out, in] (any strides: a transposed view of an [E, in, out] stack is fine), A [E, r, in],
B [E, out, r], b [E, out]. B[e] A[e] is never formed, forward or backward.

The rows (pairs of a token and one of its chosen experts) are grouped by expert once per batch
(:func:`plan_experts`: a stable sort on the device, no host sync) and every projection of an
experts block works on that sorted order: the first projection reads ``x[rows[j]]`` for sorted
pair j (the kernels read x through the index; x is never copied k times), the second takes the
first's sorted output as it is. :func:`grouped_lora_sorted` and :func:`grouped_linear_sorted`
are those projections (what ``LoRAExperts`` calls); :func:`grouped_lora_linear` is the public
function in the caller's row order.

The ops ``lora_fused::grouped_lora_fwd`` / ``_bwd`` and ``grouped_linear_fwd`` / ``_bwd`` run
by the scaffold's two routes (an eager autograd Function, or the custom ops under
``torch.compile``), on the Triton kernels (``kernels/moe_lora.py``) or the torch backend
(``backends/torch_grouped.py``). Saved for backward: x, the small S = drop(x_sorted) Aᵀ [P, r],
the plan's rows and offsets and the dropout seed: never a mask, never a gathered copy of x.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..backends import torch_grouped
from ..dispatch import tuning
from ..dispatch.backend import moe_kernels, on_tensor_device, use_triton
from ..dispatch.segments import INDEX_DTYPES, values_checkable
from ..validation import check_dropout_p, check_grouped_args, check_scaling, require_tensors
from ._scaffold import define_op, fake_grads_like
from .lora_linear import autocast_dtype, cast_all, draw_dropout_seed


# --------------------------------------------------------------------------
# The plan: pairs grouped by expert
# --------------------------------------------------------------------------
@dataclass(eq=False)
class ExpertPlan:
    """One batch's (token, expert) pairs sorted by expert, shared by every projection of a block.

    ``order`` [P]: sorted position -> pair index (pair = token · k + choice); ``rows`` [P]: the
    x row of each sorted pair (``order // k``); ``position`` [P]: pair -> sorted position (the
    inverse of ``order``); ``offsets`` int32 [E]: the inclusive cumulative end of each expert's
    segment (``torch._grouped_mm``'s ``offs``). Pairs whose id lies outside [0, E) (the
    expert-parallel sentinels of transformers' experts modules) sort last, past ``offsets[-1]``:
    they get y = 0 and pass no gradient."""
    order: Tensor
    rows: Tensor
    position: Tensor
    offsets: Tensor
    num_experts: int
    top_k: int

    @property
    def num_pairs(self) -> int:
        return self.order.shape[0]


def _check_expert_ids(expert_ids, num_experts: int) -> Tensor:
    if not isinstance(expert_ids, Tensor):
        raise TypeError(f"expert_ids must be an int32 or int64 torch.Tensor, got {type(expert_ids).__name__}")
    if expert_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"expert_ids must be int32 or int64, got {expert_ids.dtype} (shape {tuple(expert_ids.shape)})")
    if expert_ids.dim() not in (1, 2):
        raise ValueError(f"expert_ids must be [T] or [T, k], got shape {tuple(expert_ids.shape)}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    return expert_ids


@functools.lru_cache(maxsize=64)
def _cached_arange(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """0 ... n-1, made once per size (read only: a plan's sort and scatter never write it)."""
    return torch.arange(n, dtype=dtype, device=device)


def _arange_like(n: int, like: Tensor) -> Tensor:
    """0 ... n-1 like ``like``: cached, except while tracing (a graph constant would be baked in) or
    capturing a CUDA graph (a tensor made then holds its values only once the graph replays)."""
    if torch.compiler.is_compiling() or (like.is_cuda and tuning.capturing()):
        return torch.arange(n, dtype=like.dtype, device=like.device)
    return _cached_arange(n, like.dtype, like.device)


def plan_experts(expert_ids: Tensor, num_experts: int, *, validate: bool = False) -> ExpertPlan:
    """Group a batch's (token, expert) pairs by expert, on the ids' device, without a host sync.

    expert_ids: int [T] (one expert per row) or [T, k] (a token's k chosen experts, as a router's
    ``top_k_index``). ``validate``: raise IndexError for an id outside [0, num_experts) (one host
    read, skipped while tracing or capturing); without it such ids are sentinels (no output)."""
    ids = _check_expert_ids(expert_ids, num_experts)
    if validate and ids.numel() and values_checkable(ids):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_experts:
            raise IndexError(f"expert_ids must lie in [0, {num_experts}) for {num_experts} experts, "
                             f"got values in [{low}, {high}]")
    top_k = 1 if ids.dim() == 1 else ids.shape[1]
    flat = ids.reshape(-1)
    key = flat.clamp(max=num_experts)  # ids >= E and (next line) < 0 are sentinels: segment E, last
    key.masked_fill_(key < 0, num_experts)
    sorted_key, order = torch.sort(key, stable=True)
    # offsets[e] = how many keys are <= e: expert e's segment ends there (a search, no host read).
    offsets = torch.searchsorted(sorted_key, _arange_like(num_experts, key), right=True, out_int32=True)
    P = order.shape[0]
    position = torch.empty_like(order).scatter_(0, order, _arange_like(P, order))
    rows = order if top_k == 1 else torch.div(order, top_k, rounding_mode="floor")
    return ExpertPlan(order, rows, position, offsets, num_experts, top_k)


# --------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------
def _strategy(x: Tensor, rows: Optional[Tensor], weight: Tensor, lora_A: Tensor, dropout_p: float) -> str:
    """The kernels' strategy for this call: forced, cached or measured (``tuning.choose_grouped``)."""
    return tuning.choose_grouped(_num_pairs(x, rows), x, weight, lora_A, dropout_p)


def _num_pairs(x: Tensor, rows: Optional[Tensor]) -> int:
    return x.shape[0] if rows is None else rows.shape[0]


@on_tensor_device
def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
             dropout_p: float, seed: Optional[Tensor], rows: Optional[Tensor],
             offsets: Tensor) -> tuple[Tensor, Tensor]:
    """(y [P, out], S) in sorted pair order."""
    if use_triton(x, weight):
        return moe_kernels().grouped_lora_forward(x, rows, weight, bias, lora_A, lora_B, offsets, scaling, dropout_p,
                                                  seed, _strategy(x, rows, weight, lora_A, dropout_p))
    return torch_grouped.grouped_lora_forward(x, rows, weight, bias, lora_A, lora_B, offsets, scaling, dropout_p,
                                              seed)


def _pairs_to_rows(dx_pairs: Optional[Tensor], x: Tensor, rows: Optional[Tensor]) -> Optional[Tensor]:
    """dX [N, in] from the per-pair dX: each x row gets the sum over the pairs that read it."""
    if dx_pairs is None or rows is None:
        return dx_pairs
    return x.new_zeros(x.shape).index_add_(0, rows, dx_pairs.to(x.dtype))


@on_tensor_device
def _grads(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, shrink: Tensor,
           scaling: float, dropout_p: float, seed: Optional[Tensor], rows: Optional[Tensor], offsets: Tensor,
           needs: Sequence[bool]) -> tuple:
    """(dX, dW, db, dA, dB), None where ``needs`` says not needed."""
    need_x, need_w, need_bias, need_a, need_b = needs
    grad_y = grad_y.contiguous()
    need_lora = need_a or need_b
    if not (need_x or need_lora):  # the base alone is trained
        dx = d_a = d_b = None
    elif use_triton(x, weight):
        dx, d_a, d_b = moe_kernels().grouped_lora_backward(grad_y, x, rows, weight, lora_A, lora_B, shrink, offsets,
                                                           scaling, dropout_p, seed, need_x, need_lora,
                                                           _strategy(x, rows, weight, lora_A, dropout_p))
    else:
        dx, d_a, d_b = torch_grouped.grouped_lora_backward(grad_y, x, rows, weight, lora_A, lora_B, shrink, offsets,
                                                           scaling, dropout_p, seed, need_x, need_lora)
    d_w, d_bias = torch_grouped.base_param_grads(grad_y, x, rows, weight, offsets, need_w, need_bias)
    return (_pairs_to_rows(dx, x, rows) if need_x else None, d_w, d_bias,
            d_a if need_a else None, d_b if need_b else None)


def _fake_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, rows, offsets):
    P = _num_pairs(x, rows)
    shrink_dtype = torch.float32 if use_triton(x, weight) else x.dtype  # the kernels keep S in fp32
    return x.new_empty((P, weight.shape[1])), x.new_empty((P, lora_A.shape[1]), dtype=shrink_dtype)


def _fake_grads(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed, rows, offsets, needs):
    return fake_grads_like(grad_y, (x, weight, weight[:, :, 0], lora_A, lora_B), needs)


#: ``lora_fused::grouped_lora_fwd`` / ``_bwd`` and the eager Function (``_scaffold.define_op``).
GROUPED_LORA = define_op(("lora_fused::grouped_lora_fwd", "lora_fused::grouped_lora_bwd"), _forward, _grads,
                         outputs=("y", "shrink"), n_differentiable=5, fake_forward=_fake_forward,
                         fake_grads=_fake_grads, function_name="_GroupedLoRAFunction")


@on_tensor_device
def _linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Optional[Tensor],
                    offsets: Tensor) -> tuple[Tensor]:
    """(y [P, out],): the base alone, y_j = x_j W_eᵀ + b_e."""
    if use_triton(x, weight):
        strategy = tuning.grouped_heuristic(x, weight)  # the vendor grouped GEMM on CUDA where it runs
        return (moe_kernels().grouped_linear_forward(x, rows, weight, bias, offsets, strategy),)
    with torch.no_grad():  # the op's own backward differentiates it
        return (torch_grouped.grouped_linear_forward(x, rows, weight, bias, offsets),)


@on_tensor_device
def _linear_grads(grad_y: Tensor, x: Tensor, weight: Tensor, rows: Optional[Tensor], offsets: Tensor,
                  needs: Sequence[bool]) -> tuple:
    """(dX, dW, db): dX_j = dY_j W_e, the same grouped GEMM with W_eᵀ (a transposed view)."""
    need_x, need_w, need_bias = needs
    grad_y = grad_y.contiguous()
    dx = None
    if need_x:
        dx_pairs = _linear_forward(grad_y, weight.transpose(-2, -1), None, None, offsets)[0]
        dx = _pairs_to_rows(dx_pairs, x, rows)
    d_w, d_bias = torch_grouped.base_param_grads(grad_y, x, rows, weight, offsets, need_w, need_bias)
    return dx, d_w, d_bias


def _fake_linear_forward(x, weight, bias, rows, offsets):
    return (x.new_empty((_num_pairs(x, rows), weight.shape[1])),)


def _fake_linear_grads(grad_y, x, weight, rows, offsets, needs):
    return fake_grads_like(grad_y, (x, weight, weight[:, :, 0]), needs)


#: ``lora_fused::grouped_linear_fwd`` / ``_bwd``: a projection whose parameter is not adapted.
GROUPED_LINEAR = define_op(("lora_fused::grouped_linear_fwd", "lora_fused::grouped_linear_bwd"), _linear_forward,
                           _linear_grads, outputs=("y",), n_differentiable=3, fake_forward=_fake_linear_forward,
                           fake_grads=_fake_linear_grads, function_name="_GroupedLinearFunction")


# --------------------------------------------------------------------------
# Checks and entry points
# --------------------------------------------------------------------------
def _compute_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Optional[Tensor] = None,
                    lora_B: Optional[Tensor] = None) -> tuple:
    """The operands in the dtype the op computes in, as ``ops.lora_linear.compute_inputs`` for the dense
    op: under autocast for x's device all of them in autocast's dtype (as autocast casts F.linear's,
    the weight stack too); otherwise the factors in x's dtype (kept in fp32 beside a bf16 base, as
    PEFT does; the cast is differentiable) and the rest as given."""
    require_tensors(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias)  # before x's device is read
    dtype = autocast_dtype(x)
    if dtype is not None:
        return cast_all(dtype, x, weight, bias, lora_A, lora_B)
    return x, weight, bias, *cast_all(x.dtype, lora_A, lora_B)


def grouped_lora_sorted(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                        plan: ExpertPlan, scaling: float, *, rows: bool, dropout_p: float = 0.0,
                        training: bool = False) -> Tensor:
    """One adapted projection of an experts block, y [P, out] in ``plan``'s sorted pair order.

    ``rows=True``: x [N, in] holds the tokens and sorted pair j reads ``x[plan.rows[j]]``;
    ``rows=False``: x [P, in] is already in sorted pair order (the second projection)."""
    x, weight, bias, lora_A, lora_B = _compute_inputs(x, weight, bias, lora_A, lora_B)
    check_grouped_args(x, weight, lora_A, lora_B, bias)
    scaling, dropout_p = check_scaling(scaling), check_dropout_p(dropout_p)
    seed = draw_dropout_seed(x.device) if training and dropout_p > 0.0 else None
    inputs = (x, weight, bias, lora_A, lora_B, scaling, dropout_p if seed is not None else 0.0, seed,
              _rows_of(plan, rows, x), plan.offsets)
    return GROUPED_LORA.run(inputs)


def grouped_linear_sorted(x: Tensor, weight: Tensor, bias: Optional[Tensor], plan: ExpertPlan, *,
                          rows: bool) -> Tensor:
    """A projection whose parameter is not adapted: y_j = x_j W_eᵀ + b_e in sorted pair order."""
    x, weight, bias, _, _ = _compute_inputs(x, weight, bias)
    check_grouped_args(x, weight, None, None, bias)
    return GROUPED_LINEAR.run((x, weight, bias, _rows_of(plan, rows, x), plan.offsets))


def _rows_of(plan: ExpertPlan, rows: bool, x: Tensor) -> Optional[Tensor]:
    if rows:
        return plan.rows
    if x.shape[0] != plan.num_pairs:
        raise ValueError(f"rows=False: x must hold the plan's {plan.num_pairs} sorted pairs, got x "
                         f"{tuple(x.shape)}")
    return None


def grouped_lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, expert_ids: Tensor,
                        scaling: float, bias: Optional[Tensor] = None, *, dropout_p: float = 0.0,
                        training: bool = False) -> Tensor:
    """``y[t] = x[t] W[e]ᵀ + b[e] + scaling · (drop(x[t]) A[e]ᵀ) B[e]ᵀ``, e = ``expert_ids[t]``.

    x [..., in]; weight [E, out, in]; lora_A [E, r, in]; lora_B [E, out, r]; bias [E, out] | None;
    expert_ids int with x's leading shape (one expert per row: y [..., out]) or that shape plus
    k (each row through k experts, as a router's ``top_k_index``: y [..., k, out]; x is not
    copied k times). Ids must lie in [0, E). Dropout (``dropout_p``) on the LoRA branch only,
    when ``training``. Differentiable in x, lora_A, lora_B (and weight / bias when they require
    grad). B[e] A[e] is never formed."""
    check_grouped_args(x, weight, None, None, bias)
    if not isinstance(expert_ids, Tensor):
        raise TypeError(f"expert_ids must be an int torch.Tensor, got {type(expert_ids).__name__}")
    lead = tuple(x.shape[:-1])
    if tuple(expert_ids.shape) == lead:
        ids = expert_ids.reshape(-1)
    elif expert_ids.dim() == x.dim() and tuple(expert_ids.shape[:-1]) == lead:
        ids = expert_ids.reshape(-1, expert_ids.shape[-1])
    else:
        raise ValueError(f"expert_ids must have x's leading shape {lead} (one expert per row) or {lead} + (k,) "
                         f"(k experts per row), got expert_ids {tuple(expert_ids.shape)} for x {tuple(x.shape)}")
    plan = plan_experts(ids, weight.shape[0], validate=True)
    x2d = x.reshape(-1, x.shape[-1])
    y_sorted = grouped_lora_sorted(x2d, weight, bias, lora_A, lora_B, plan, scaling, rows=True,
                                   dropout_p=dropout_p, training=training)
    return y_sorted.index_select(0, plan.position).reshape(*expert_ids.shape, weight.shape[1])


__all__ = ["ExpertPlan", "plan_experts", "grouped_lora_sorted", "grouped_linear_sorted", "grouped_lora_linear"]
