"""Multi-adapter providers (cases with ``adapters > 0``): ``y[t] = x[t] W0ᵀ + b +
s_i (x[t] A_i[:r_i]ᵀ) B_i[:, :r_i]ᵀ``, i = the row's adapter, -1 = base only.

  base          F.linear(x, W, b) alone
  fused         lf.multi_lora_linear over a SegmentPlan built once per input set, outside
                the timing (a serving engine builds it once per batch and every layer reuses it);
                the plan's default regime (``decode`` up to MULTI_DECODE_MAX_ROWS rows, else
                ``prefill``: one grouped GEMM that adds the LoRA term in its epilogue)
  fused-cublas  lf.multi_lora_linear in the ``prefill_cublas`` regime (prefill cases only)
  loop          lf.lora_linear once per adapter present, on its rows (index_select), base rows
                by F.linear, the outputs put back in row order: the obvious baseline
  peft-mixed    one peft lora.Linear holding the n adapters (each its own rank and alpha),
                called with adapter_names=[...] ("__base__" for base rows): PEFT's mixed batch,
                inference only (n/a in training modes, where PEFT refuses adapter_names)

One projection per input set: the stacked A [n, r_max, in], B [n, out, r_max], scalings [n],
ranks [n] or None, and the row ids.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import lora_fused as lf
from lora_fused.kernels.multi_lora import MULTI_DECODE_MAX_ROWS

from ..cases import Case
from ..measure import TORCH_DTYPES
from .base import NO_LORA, Bound, InputSet, element_size, input_set, random_fn

PROVIDERS = ("base", "fused", "fused-cublas", "loop", "peft-mixed")
DESCRIPTIONS = {
    "fused-cublas": "lf.multi_lora_linear in the prefill_cublas regime: cuBLAS base GEMM, LoRA added "
                    "into y (prefill cases only; the alternative to the default prefill regime's grouped GEMM)",
    "peft-mixed": "one peft lora.Linear with n adapters, called with adapter_names=[...] (PEFT's mixed "
                  "batch; inference only; host-built row lists: not CUDA-graph capturable, timed eagerly)",
    "loop": "lf.lora_linear once per adapter present on its rows (index_select), base rows by F.linear, "
            "rows put back in order (row index tensors built outside the timing)",
}
#: Providers whose call cannot be captured in a CUDA graph (timed as eager launches only).
NOT_GRAPH_CAPTURABLE = ("peft-mixed",)
PEFT_MIXED_TRAINING = ("n/a: PEFT's mixed batch (adapter_names) is inference only "
                       "(PEFT refuses adapter_names in training mode)")


def applies(provider: str, case: Case) -> bool:
    """Whether ``provider`` has a row for the multi-adapter ``case``."""
    if provider == "fused-cublas":  # a prefill regime: decode batches already use cuBLAS's base
        return case.M > MULTI_DECODE_MAX_ROWS
    return provider in PROVIDERS


def provider_unavailable(provider: str, case: Case) -> Optional[str]:
    """Why ``provider`` has an n/a row for ``case`` (None when it runs): PEFT's mixed batch
    in a training mode."""
    if provider == "peft-mixed" and case.training:
        return PEFT_MIXED_TRAINING
    return None


@dataclass
class MultiLayer:
    """One multi-adapter projection: frozen W (and b), stacked LoRA weights, per-adapter
    scalings and ranks, and the batch's row ids (device int64 and as a host list)."""
    W: torch.Tensor
    A: torch.Tensor                       # [n, r_max, K]
    B: torch.Tensor                       # [n, N, r_max]
    scalings: torch.Tensor                # float32 [n]
    ranks: Optional[torch.Tensor]         # int32 [n], None: every adapter at r_max
    ids: torch.Tensor                     # int64 [M], -1 = base only
    ids_list: list
    rank_list: list
    b: Optional[torch.Tensor] = None
    Wm = None                             # no merged weight: a batch mixes adapters

    @property
    def scaling_list(self) -> list:
        return [float(v) for v in self.scalings.tolist()]


def multi_scalings(case: Case) -> list:
    """Per-adapter scalings: case.scaling x (1, 1.25, 1.5, 1.75) in turn (they differ, so a
    provider applying the wrong adapter's scaling fails the check)."""
    return [case.scaling * (1.0 + 0.25 * (i % 4)) for i in range(case.adapters)]


def make_sets(case: Case, device: torch.device, n_sets: int, g: torch.Generator) -> list[InputSet]:
    """Stacked A [n, r_max, K] and B [n, N, r_max] (B scaled by each adapter's r_i^-1/2; the
    padding past r_i random too, so a provider reading it fails the check), one id per row."""
    if case.projections != 1:
        raise ValueError(f"{case.name}: multi-adapter cases have one projection")
    dtype = TORCH_DTYPES[case.dtype]
    n, r_max = case.adapters, case.r
    rank_list = list(case.adapter_ranks)
    if len(rank_list) != n or max(rank_list) > r_max:
        raise ValueError(f"{case.name}: ranks {rank_list} do not fit {n} adapters of r_max {r_max}")
    ids_list = case.adapter_ids()
    ids = torch.tensor(ids_list, dtype=torch.int64, device=device)
    ranks = torch.tensor(rank_list, dtype=torch.int32, device=device) if case.mixed_ranks else None
    scalings = torch.tensor(multi_scalings(case), dtype=torch.float32, device=device)
    b_scale = torch.tensor([r ** -0.5 for r in rank_list], device=device).view(n, 1, 1)

    rand = random_fn(g, device, dtype)
    sets = []
    for _ in range(n_sets):
        W = rand(case.N, case.K, scale=case.K ** -0.5)
        A = rand(n, r_max, case.K, scale=case.K ** -0.5)
        B = (torch.randn(n, case.N, r_max, generator=g, device=device) * b_scale).to(dtype)
        b = rand(case.N) if case.bias else None
        layer = MultiLayer(W, A, B, scalings, ranks, ids, ids_list, rank_list, b)
        sets.append(input_set(rand, case, [layer]))
    return sets


def set_bytes(case: Case, read_only: bool = False) -> int:
    """Bytes of one input set (``read_only``: x, W and the used adapters' A, B at their ranks)."""
    used = set(i for i in case.adapter_ids() if i >= 0)
    ranks = case.adapter_ranks
    lora = (sum(ranks[i] for i in used) if read_only else case.adapters * case.r) * (case.K + case.N)
    dy = case.M * case.N if (case.training and not read_only) else 0
    return element_size(case) * (case.M * case.K + case.N * case.K + lora + dy)


def make_peft_mixed_layer(W: torch.Tensor, b: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
                          ranks: list, scalings: list):
    """One peft lora.Linear around frozen W (and b) holding adapter "a{i}" for every slice of
    the stacked A [n, r_max, K], B [n, N, r_max]: rank ranks[i], lora_alpha scalings[i]*ranks[i]
    (PEFT's scaling is alpha / r), weights A[i, :r_i] and B[i, :, :r_i] (B copied contiguous:
    PEFT keeps each adapter in its own tensors). Built through ``inject_adapter_in_model``, one
    call per adapter; in eval mode (the mixed batch is inference only)."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Module()
    holder.lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device="meta")
    # On the meta device: PEFT's random init of n adapters (replaced below) costs nothing.
    # The warning "Already found a peft_config ... multiple adapters" is what is intended.
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        for i, (r, s) in enumerate(zip(ranks, scalings)):
            cfg = LoraConfig(r=int(r), lora_alpha=float(s) * int(r), lora_dropout=0.0, target_modules=["lin"])
            holder = inject_adapter_in_model(cfg, holder, adapter_name=f"a{i}")
    layer = holder.lin
    layer.base_layer.weight = nn.Parameter(W, requires_grad=False)
    if b is not None:
        layer.base_layer.bias = nn.Parameter(b, requires_grad=False)
    for i, r in enumerate(ranks):
        layer.lora_A[f"a{i}"].weight = nn.Parameter(A[i, :r], requires_grad=False)
        layer.lora_B[f"a{i}"].weight = nn.Parameter(B[i, :, :r].contiguous(), requires_grad=False)
    layer.eval()
    return layer


def peft_adapter_names(ids_list: list) -> list:
    """PEFT's adapter_names for row ids: "a{i}", "__base__" for -1."""
    return ["__base__" if i < 0 else f"a{i}" for i in ids_list]


def _loop_segments(L: MultiLayer, device) -> tuple[list, Optional[torch.Tensor], torch.Tensor]:
    """([(adapter, row index tensor)], base rows or None, the permutation that puts the
    concatenated segment outputs back in row order), from the host id list: no sync in run()."""
    by_adapter: dict = {}
    for t, i in enumerate(L.ids_list):
        by_adapter.setdefault(i, []).append(t)
    segs = [(i, torch.tensor(rows, dtype=torch.int64, device=device))
            for i, rows in sorted(by_adapter.items()) if i >= 0]
    base = (torch.tensor(by_adapter[-1], dtype=torch.int64, device=device) if -1 in by_adapter else None)
    order = [t for i, rows in sorted(by_adapter.items()) if i >= 0 for t in rows] + by_adapter.get(-1, [])
    inv = torch.empty(len(order), dtype=torch.int64)
    inv[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))
    return segs, base, inv.to(device)


def bind(provider: str, case: Case, st: InputSet, *, training: bool) -> Bound:
    """Multi-adapter providers over input set ``st`` (one projection)."""
    L = st.layers[0]
    x = st.x.detach().requires_grad_(True) if training else st.x
    lora_leaves = provider in ("fused", "fused-cublas") and training  # loop: per-adapter leaves, below
    A, B = ((L.A.detach().requires_grad_(True), L.B.detach().requires_grad_(True)) if lora_leaves
            else (L.A, L.B))
    lora = [(A, B)] if provider != "base" else []
    frozen = [t for t in (L.W, L.b, L.scalings, L.ranks) if t is not None]
    params = frozen + [A, B]
    leaves = ([x] if training else []) + ([A, B] if lora_leaves else [])
    modules: list = []
    graph = provider not in NOT_GRAPH_CAPTURABLE
    grads_fn = None
    W, bias = L.W, L.b

    if provider == "base":
        def run():
            return [F.linear(x, W, bias)]
    elif provider in ("fused", "fused-cublas"):
        regime = "prefill_cublas" if provider == "fused-cublas" else None
        plan = lf.plan_segments(L.ids, case.adapters, regime=regime)  # once per batch, shared by every layer
        params = params + list(plan.tensors())
        ranks, scalings = L.ranks, L.scalings

        def run():
            return [lf.multi_lora_linear(x, W, A, B, plan, scalings, bias, ranks=ranks)]
    elif provider == "loop":
        segs, base_rows, inv = _loop_segments(L, x.device)
        s_list, r_list = L.scaling_list, L.rank_list
        # Each adapter its own (A_i, B_i), as a per-adapter model holds them: in training,
        # leaves of their own (slices of the stacked set's storage), gradients stacked back.
        pieces = []
        for i, rows in segs:
            a, b_ = L.A[i, :r_list[i]], L.B[i, :, :r_list[i]]
            if training:
                a, b_ = a.detach().requires_grad_(True), b_.detach().requires_grad_(True)
            pieces.append((i, rows, a, b_, s_list[i]))
        if training:
            lora = []
            leaves = [x] + [t for p_ in pieces for t in p_[2:4]]
            params = frozen + [L.A, L.B]

            def stacked_grads():
                dA, dB = torch.zeros_like(L.A), torch.zeros_like(L.B)
                for i, _, a, b_, _ in pieces:
                    if a.grad is not None:
                        dA[i, :a.shape[0]] = a.grad
                        dB[i, :, :b_.shape[1]] = b_.grad
                return [x.grad, dA, dB]
            grads_fn = stacked_grads

        def run():
            outs = [lf.lora_linear(x.index_select(0, rows), W, a, b_, s, bias) for _, rows, a, b_, s in pieces]
            if base_rows is not None:
                outs.append(F.linear(x.index_select(0, base_rows), W, bias))
            return [torch.cat(outs).index_select(0, inv)]
    elif provider == "peft-mixed":
        if training:
            raise ValueError(PEFT_MIXED_TRAINING)
        layer = make_peft_mixed_layer(W, bias, A, B, L.rank_list, L.scaling_list)
        modules = [layer]
        names = peft_adapter_names(L.ids_list)
        params = params + list(layer.parameters())

        def run():
            return [layer(x, adapter_names=names)]
    else:
        raise ValueError(f"unknown provider {provider!r} for {case.name}")
    return Bound(run=run, x=x, lora=lora, dy=list(st.dy), leaves=leaves, params=params, modules=modules,
                 graph=graph, grads_fn=grads_fn)



#: Multi-adapter checks use lf.multi_lora_linear_reference (the per-row float64 oracle) up to
#: this many rows (the CPU --quick shapes: 64 and 512), :func:`multi_reference_by_adapter` in
#: float64 beyond: same formula, one matmul pair per adapter instead of one per row (and no code
#: shared with the backends it checks).
ORACLE_MAX_ROWS = 512


def multi_reference_by_adapter(x, W, b, A, B, scalings, ranks, ids):
    """``y[t] = x[t] W0ᵀ + b + s_i (x[t] A_i[:r_i]ᵀ) B_i[:, :r_i]ᵀ``, i = ids[t] (-1: base only),
    computed adapter by adapter over its rows."""
    y = F.linear(x, W, b)
    for i in sorted(set(ids.tolist()) - {-1}):
        rows = (ids == i).nonzero().squeeze(1)
        r = int(ranks[i])
        lora = (x[rows] @ A[i, :r].T) @ B[i, :, :r].T
        y = y.index_add(0, rows, scalings[i] * lora)
    return y


def _multi_reference(case: Case, st: InputSet, x, A, B):
    """float64 y of the multi-adapter case on set ``st`` (x, A, B float64, maybe leaves)."""
    L = st.layers[0]
    W = L.W.double()
    b = L.b.double() if L.b is not None else None
    if case.M <= ORACLE_MAX_ROWS:
        return lf.multi_lora_linear_reference(x, W, A, B, L.ids, L.scalings.double(), b, ranks=L.ranks)
    ranks = L.ranks if L.ranks is not None else torch.full((case.adapters,), case.r, device=x.device)
    return multi_reference_by_adapter(x, W, b, A, B, L.scalings.double(), ranks, L.ids)


def reference_outputs(case: Case, st: InputSet, provider: str) -> list:
    """float64 y on set ``st`` (base: x W0ᵀ + b), see :data:`ORACLE_MAX_ROWS`."""
    L = st.layers[0]
    with torch.no_grad():
        if provider == "base":
            return [F.linear(st.x.double(), L.W.double(), L.b.double() if L.b is not None else None)]
        return [_multi_reference(case, st, st.x.double(), L.A.double(), L.B.double())]


def reference_grads(case: Case, st: InputSet, provider: str) -> list:
    """float64 [dX, dA, dB] for dropout 0, dA / dB the stacked [n, r_max, K] / [n, N, r_max],
    zero past each rank (base: [dX])."""
    L = st.layers[0]
    x = st.x.detach().double().requires_grad_()
    if provider in NO_LORA:
        y = F.linear(x, L.W.double(), L.b.double() if L.b is not None else None)
        torch.autograd.backward([y], [st.dy[0].double()])
        return [x.grad]
    A = L.A.detach().double().requires_grad_()
    B = L.B.detach().double().requires_grad_()
    y = _multi_reference(case, st, x, A, B)
    torch.autograd.backward([y], [st.dy[0].double()])
    return [x.grad, A.grad, B.grad]
