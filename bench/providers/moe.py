"""MoE providers and inputs: one mixture-of-experts experts block with LoRA on its 3-D expert
parameters (cases M1-M3, goals M-GPU, M-speed-CPU, M-memory; ``python -m bench --cases moe``).

The block is transformers' ``Qwen3MoeExperts`` built from a config (E experts, hidden H = the
case's K, expert intermediate I = its N, SiLU gate): ``gate_up_proj`` [E, 2I, H], ``down_proj``
[E, H, I], called as ``experts(x, top_k_index, top_k_weights)``, with LoRA of rank r on both
projections: per (token t, chosen expert e), ``h = x_t W1_eᵀ + s (x_t A1_eᵀ) B1_eᵀ``, ``a =
silu(h[:I]) ⊙ h[I:]``, ``d = a W2_eᵀ + s (a A2_eᵀ) B2_eᵀ``, ``y_t = Σ_k w_tk d``.

  base        the experts block alone, no LoRA (transformers' ``grouped_mm`` experts
              implementation: on CUDA the vendor grouped GEMM; the floor of goal M-GPU)
  fused       ``LoRAExperts`` (lora_fused/modules/experts.py: the pairs sorted by expert once per
              call, one grouped op per projection, B_e A_e never formed)
  eager-loop  the unfused baseline: a Python loop over the experts with routed tokens, per
              expert ``F.linear`` plus the LoRA term ``s F.linear(F.linear(x, A_e), B_e)``
              (transformers' eager experts forward with LoRA added)
  peft-moe    PEFT's ``LoraConfig(target_parameters=[gate_up_proj, down_proj])`` (``ParamWrapper``:
              W + einsum(B, A) for every expert on every forward, then the same grouped_mm forward)

Every provider is checked against float64 (:func:`reference_outputs`, :func:`reference_grads`:
the pairs grouped per expert and summed over top-k as transformers' grouped forward does, in
float64), outputs and, in training, the gradients of x and of every LoRA factor. The router is
outside the block: ``top_k_index`` / ``top_k_weights`` come with the input set (softmax of random
logits, top-k, renormalised as Qwen3-MoE's ``norm_topk_prob``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..cases import Case
from ..measure import TORCH_DTYPES
from .base import Bound, InputSet, Layer, element_size, random_fn

PROVIDERS = ("base", "fused", "eager-loop", "peft-moe")
#: The LoRA-targeted parameters, in the order the block runs them.
PARAMETERS = ("gate_up_proj", "down_proj")
DESCRIPTIONS = {
    "eager-loop": "MoE cases: a Python loop over experts, per expert F.linear + s*F.linear(F.linear(x, A_e), B_e) "
                  "(transformers' eager experts forward with LoRA)",
    "peft-moe": "MoE cases: PEFT LoraConfig(target_parameters=[gate_up_proj, down_proj]) (ParamWrapper: "
                "W + einsum(B, A) over every expert, every forward)",
}
#: What "base" and "fused" mean on an MoE case (printed with the provider list).
CASE_NOTE = ("MoE cases (bench/providers/moe.py): one Qwen3MoeExperts block; base = the block alone "
             "(transformers' grouped_mm experts implementation), fused = LoRAExperts around it (one grouped "
             "op per projection); the CPU goals' "
             "block is timed in interleaved rounds on a CPU")


@dataclass
class MoESet(InputSet):
    """x [T, H], the two projections (gate_up, down) as :class:`Layer` s of 3-D W, A, B, the
    router's choice ``top_k_index`` [T, k] and ``top_k_weights`` [T, k], dy [T, H] in training."""
    top_k_index: Optional[torch.Tensor] = None
    top_k_weights: Optional[torch.Tensor] = None


def transformers_status() -> Optional[str]:
    """Why the MoE cases cannot run (transformers' Qwen3MoeExperts not importable), or None."""
    try:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: F401
    except Exception as exc:
        return f"transformers' Qwen3MoeExperts not importable ({type(exc).__name__}: {exc})"[:200]
    return None


def make_sets(case: Case, device: torch.device, n_sets: int, g: torch.Generator) -> list:
    """Input sets of an MoE case, scaled so every term is O(1); never zeros (the B factors included)."""
    if not case.experts or case.top_k < 1 or case.top_k > case.experts:
        raise ValueError(f"{case.name}: an MoE case needs experts >= top_k >= 1, got experts={case.experts}, "
                         f"top_k={case.top_k}")
    dtype = TORCH_DTYPES[case.dtype]
    rand = random_fn(g, device, dtype)
    E, H, I, r, T = case.experts, case.K, case.N, case.r, case.M
    sets = []
    for _ in range(n_sets):
        layers = [Layer(rand(E, out_f, in_f, scale=in_f ** -0.5), rand(E, r, in_f, scale=in_f ** -0.5),
                        rand(E, out_f, r, scale=r ** -0.5))
                  for out_f, in_f in ((2 * I, H), (H, I))]
        x = rand(T, H)
        probs = torch.randn(T, E, generator=g, device=device).softmax(-1)
        weights, index = torch.topk(probs, case.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
        dy = [rand(T, H)] if case.training else []
        sets.append(MoESet(x, layers, dy, top_k_index=index, top_k_weights=weights))
    return sets


def set_bytes(case: Case, read_only: bool = False) -> int:
    """Bytes of one input set: x, every expert's W, A, B of both projections (+ dy in training)."""
    H, I, E, r, T = case.K, case.N, case.experts, case.r, case.M
    dy = T * H if (case.training and not read_only) else 0
    return element_size(case) * (T * H + 3 * E * H * I + E * r * (3 * H + 3 * I) + dy) + 12 * T * case.top_k


# --------------------------------------------------------------------------
# The block, four ways
# --------------------------------------------------------------------------
def swiglu(h: torch.Tensor) -> torch.Tensor:
    """Qwen3-MoE's gate: silu(gate) ⊙ up over h = [gate | up] (transformers' ``_default_apply_gate``)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def experts_module(case: Case, st: MoESet) -> nn.Module:
    """transformers' ``Qwen3MoeExperts`` over the set's frozen weights (shared storage), its
    ``grouped_mm`` experts implementation selected."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    config = Qwen3MoeConfig(hidden_size=case.K, moe_intermediate_size=case.N, num_experts=case.experts,
                            num_experts_per_tok=case.top_k, hidden_act="silu")
    config._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        experts = Qwen3MoeExperts(config)
    for name, layer in zip(PARAMETERS, st.layers):
        setattr(experts, name, nn.Parameter(layer.W, requires_grad=False))
    return experts


def fused_block(experts: nn.Module, lora: list, case: Case) -> nn.Module:
    """``LoRAExperts`` around ``experts`` (lora-fused's module: one plan per call, one grouped op
    per projection), its factors set to the given ones (Parameters sharing storage)."""
    from lora_fused.modules.experts import LoRAExperts
    module = LoRAExperts.from_experts(experts, r=case.r, lora_alpha=case.scaling * case.r, lora_dropout=case.dropout,
                                      parameters=PARAMETERS)
    for name, (A, B) in zip(PARAMETERS, lora):
        module.lora[name].lora_A, module.lora[name].lora_B = A, B
    return module


def eager_loop(x, top_k_index, top_k_weights, weights: list, lora: list, scaling: float,
               dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """The unfused baseline: transformers' eager experts loop (a one-hot mask, one iteration per
    expert with routed tokens) with ``F.linear(x, W_e) + s F.linear(F.linear(drop(x), A_e), B_e)``
    in both projections."""
    (W1, W2), ((A1, B1), (A2, B2)) = weights, lora

    def drop(t):
        return F.dropout(t, dropout_p, True) if training and dropout_p else t
    out = torch.zeros_like(x)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=W1.shape[0]).permute(2, 1, 0)   # [E, k, T]
        hit = (mask.sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist()
    for e in hit:
        pos, tokens = torch.where(mask[e])
        xe = x[tokens]
        h = F.linear(xe, W1[e]) + scaling * F.linear(F.linear(drop(xe), A1[e]), B1[e])
        a = swiglu(h)
        d = F.linear(a, W2[e]) + scaling * F.linear(F.linear(drop(a), A2[e]), B2[e])
        out.index_add_(0, tokens, d * top_k_weights[tokens, pos, None])
    return out


def peft_block(experts: nn.Module, lora: list, case: Case) -> tuple[nn.Module, list]:
    """(PEFT's ParamWrapper stack around ``experts``, its [(lora_A.weight, lora_B.weight)] per
    projection in the block's order), the factors set to the given ones in PEFT's layout."""
    from peft import LoraConfig, inject_adapter_in_model

    from lora_fused.adapters.expert_layout import to_peft_factors
    holder = nn.Module()
    holder.experts = experts
    config = LoraConfig(r=case.r, lora_alpha=case.scaling * case.r, lora_dropout=case.dropout, target_modules=[],
                        target_parameters=[f"experts.{p}" for p in PARAMETERS])
    holder = inject_adapter_in_model(config, holder)
    wrappers = {m.parameter_name: m for m in holder.modules() if hasattr(m, "parameter_name")}
    factors = []
    for name, (A, B) in zip(PARAMETERS, lora):
        A_w, B_w = (nn.Parameter(t.detach(), requires_grad=A.requires_grad) for t in to_peft_factors(A, B))
        wrappers[name].lora_A["default"].weight = A_w
        wrappers[name].lora_B["default"].weight = B_w
        factors.append((A_w, B_w))
    return holder.experts, factors


def bind(provider: str, case: Case, st: MoESet, *, training: bool) -> Bound:
    """``provider`` over the MoE input set ``st``; in training x and the LoRA factors are fresh
    leaves (Parameters sharing storage with the set; PEFT's: copies in its layout)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r} for the MoE case {case.name}")
    x = st.x.detach().requires_grad_(True) if training else st.x
    lora_grad = training and provider != "base"
    lora = [tuple(nn.Parameter(t, requires_grad=lora_grad) for t in (L.A, L.B)) for L in st.layers]
    block, modules, peft_factors = _block(provider, case, st, lora, training)
    if provider in ("base", "peft-moe"):  # no factors of ours (PEFT's are in its own layout)
        lora = []
    leaves = ([x] if training else []) + ([t for pair in peft_factors or lora for t in pair] if lora_grad else [])
    grads_fn = _peft_grads(x, peft_factors, case.experts) if peft_factors and lora_grad else None
    route = (st.top_k_index, st.top_k_weights)

    def run():
        return [block(x, *route)]
    params = [t for L in st.layers for t in (L.W, L.A, L.B)] + [t for m in modules for t in m.parameters()]
    return Bound(run=run, x=x, lora=lora, dy=list(st.dy), leaves=leaves, params=params, modules=modules,
                 graph=False, grads_fn=grads_fn)


def _block(provider: str, case: Case, st: MoESet, lora: list, training: bool) -> tuple[Callable, list, list]:
    """(the block as a callable of (x, top_k_index, top_k_weights), its modules, PEFT's factors
    or [])."""
    if provider == "eager-loop":
        weights, p = [L.W for L in st.layers], case.dropout if training else 0.0

        def loop(x, index, w):
            return eager_loop(x, index, w, weights, lora, case.scaling, p, training)
        return loop, [], []
    experts = experts_module(case, st)
    if provider == "base":
        return experts, [experts], []
    if provider == "fused":
        module, factors = fused_block(experts, lora, case), []
    else:
        module, factors = peft_block(experts, lora, case)
    module.train(training)
    return module, [module], factors


def _peft_grads(x: torch.Tensor, factors: list, num_experts: int) -> Callable[[], list]:
    """[dX, dA1, dB1, dA2, dB2] in lora-fused's layout from PEFT's [E·r, in] / [out, r·E] gradients."""
    from lora_fused.adapters.expert_layout import from_peft_factors

    def grads():
        out = [x.grad]
        for A_w, B_w in factors:
            if A_w.grad is None or B_w.grad is None:
                out += [A_w.grad, B_w.grad]
            else:
                out += list(from_peft_factors(A_w.grad, B_w.grad, num_experts))
        return out
    return grads


# --------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------
def _reference(case: Case, st: MoESet, x, lora: Optional[list]) -> torch.Tensor:
    """float64 y: the (token, expert) pairs grouped per expert, both projections (LoRA where
    ``lora`` is given), weighted and summed over each token's k pairs."""
    T, k = st.top_k_index.shape
    W1, W2 = (L.W.double() for L in st.layers)
    flat = st.top_k_index.reshape(-1)
    pairs = x.new_zeros(T * k, x.shape[1])
    for e in flat.unique().tolist():
        sel = (flat == e).nonzero().flatten()
        xe = x[sel // k]
        h = xe @ W1[e].T
        if lora is not None:
            h = h + case.scaling * (xe @ lora[0][e].T) @ lora[1][e].T
        a = swiglu(h)
        d = a @ W2[e].T
        if lora is not None:
            d = d + case.scaling * (a @ lora[2][e].T) @ lora[3][e].T
        pairs = pairs.index_copy(0, sel, d)
    return (pairs * st.top_k_weights.double().reshape(-1, 1)).reshape(T, k, -1).sum(1)


def _factors64(st: MoESet) -> list:
    return [t.detach().double() for L in st.layers for t in (L.A, L.B)]


def reference_outputs(case: Case, st: MoESet, provider: str) -> list:
    """float64 y (base: without LoRA)."""
    with torch.no_grad():
        return [_reference(case, st, st.x.double(), None if provider == "base" else _factors64(st))]


def reference_grads(case: Case, st: MoESet, provider: str) -> list:
    """float64 [dX, dA1, dB1, dA2, dB2] (base: [dX]), dropout 0."""
    x = st.x.detach().double().requires_grad_()
    lora = None if provider == "base" else [t.requires_grad_() for t in _factors64(st)]
    torch.autograd.backward([_reference(case, st, x, lora)], [st.dy[0].double()])
    return [x.grad] + ([t.grad for t in lora] if lora is not None else [])
