"""DoRA providers and inputs: ``lf.DoRALinear`` against PEFT's DoRA and lora-fused's LoRA
(goals D1-D4, bench/goals.py; ``python -m bench --cases dora``).

  base        F.linear(x, W0, b): the frozen layer alone
  fused       ``lf.DoRALinear`` (the norm from W0 Aᵀ and A Aᵀ, no out x in tensor)
  fused-lora  ``lf.lora_linear`` on the same W0, A, B: the LoRA step DoRA adds to (D1)
  peft-dora   PEFT's ``lora.Linear`` with ``use_dora=True`` (built by ``inject_adapter_in_model``),
              its adapters and magnitude set to the same tensors, in the case's dtype

Each is checked against float64 (:func:`reference_outputs`, :func:`reference_grads`):
``y = (m / norm) ⊙ (x W0ᵀ + s (x Aᵀ) Bᵀ) + b`` with ``norm[o] = ‖W0[o] + s (B A)[o]‖₂``
held constant in backward (PEFT detaches it), gradients in x, A, B and m. The magnitude is
the norm times (1 + 0.1 N(0, 1)), so a provider that ignored m, or that took m / norm as
1, fails the check. ``python -m bench.dora`` (bench/dora.py) is the stand-alone step timer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cases import Case
from ..measure import TORCH_DTYPES
from .base import Bound, Layer, element_size, input_set, random_fn, random_projection

PROVIDERS = ("base", "fused", "fused-lora", "peft-dora")
DESCRIPTIONS = {
    "fused-lora": "DoRA cases: lf.lora_linear on the same W0, A, B (LoRA without the magnitude: D1's denominator)",
    "peft-dora": "DoRA cases: PEFT's lora.Linear with use_dora=True (forms B·A and W0 + s·B·A for the norm)",
}
#: What "base" and "fused" mean on a DoRA case (printed with the provider list).
CASE_NOTE = ("DoRA cases (bench/providers/dora.py): base = F.linear alone, fused = lf.DoRALinear, fused-lora = "
             "lf.lora_linear on the same weights; D3 is a CPU goal at 1024x1024, M=256")


def norm64(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """float64 ‖W0[o] + s (B A)[o]‖₂ [N] (formed in full: the reference may)."""
    return (W.double() + s * B.double() @ A.double()).norm(dim=1)


def make_sets(case: Case, device: torch.device, n_sets: int, g: torch.Generator) -> list:
    """Input sets of a DoRA case: x, one Layer (W0, A, B, b in the case's dtype) with ``m`` the
    magnitude [N] (the norm x (1 + 0.1 N(0, 1))), dy in training."""
    if case.projections != 1 or case.multi:
        raise ValueError(f"{case.name}: DoRA cases have one projection and one adapter")
    dtype = TORCH_DTYPES[case.dtype]
    rand = random_fn(g, device, dtype)
    sets = []
    for _ in range(n_sets):
        W, A, B, b = random_projection(rand, case)
        layer = Layer(W, A, B, b)
        jitter = 1.0 + 0.1 * torch.randn(case.N, generator=g, device=device)
        layer.m = (norm64(W, A, B, case.scaling) * jitter).to(dtype)
        sets.append(input_set(rand, case, [layer]))
    return sets


def peft_dora_layer(W, b, A, B, m, r: int, alpha: float, dropout: float) -> nn.Module:
    """PEFT's DoRA layer around frozen W (and b), its lora_A, lora_B and magnitude replaced by
    the given tensors (as Parameters sharing their storage)."""
    from peft import LoraConfig, inject_adapter_in_model
    holder = nn.Module()
    holder.lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        holder.lin.weight.copy_(W)
    holder = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True,
                                                target_modules=["lin"]), holder)
    layer = holder.lin
    layer.base_layer.weight = nn.Parameter(W, requires_grad=False)
    if b is not None:
        layer.base_layer.bias = nn.Parameter(b, requires_grad=False)
    layer.lora_A["default"].weight = A
    layer.lora_B["default"].weight = B
    layer.lora_magnitude_vector["default"].weight = m
    return layer


def bind(provider: str, case: Case, st, *, training: bool):
    """``provider`` over the DoRA input set ``st``; in training x, A, B and m are fresh leaves
    (Parameters sharing storage with the set)."""
    import lora_fused as lf

    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r} for the DoRA case {case.name}")
    L = st.layers[0]
    s, p = case.scaling, case.dropout if training else 0.0
    x = st.x.detach().requires_grad_(True) if training else st.x
    lora_grad = training and provider != "base"
    A, B, m = (nn.Parameter(t, requires_grad=lora_grad) for t in (L.A, L.B, L.m))
    modules: list = []
    if provider == "base":
        def run():
            return [F.linear(x, L.W, L.b)]
    elif provider == "fused-lora":
        def run():
            return [lf.lora_linear(x, L.W, A, B, s, L.b, dropout_p=p, training=training)]
    elif provider == "fused":
        lin = nn.Linear(case.K, case.N, bias=L.b is not None, device="meta")
        lin.weight = nn.Parameter(L.W, requires_grad=False)
        if L.b is not None:
            lin.bias = nn.Parameter(L.b, requires_grad=False)
        mod = lf.DoRALinear.from_linear(lin, r=case.r, lora_alpha=s * case.r, lora_dropout=case.dropout)
        mod.lora_A, mod.lora_B, mod.lora_magnitude_vector = A, B, m
        modules = [mod]
    else:  # peft-dora
        modules = [peft_dora_layer(L.W, L.b, A, B, m, case.r, s * case.r, case.dropout)]
    if modules:
        (mod,) = modules
        mod.train(training)

        def run():
            return [mod(x)]
    lora = [(A, B)] if provider != "base" else []
    leaves = ([x] if training else []) + ([A, B] + ([m] if provider != "fused-lora" else []) if lora_grad else [])

    def grads():
        return [t.grad for t in leaves]
    params = [t for t in (L.W, L.b, L.A, L.B, L.m) if t is not None] + [t for mod in modules for t in mod.parameters()]
    return Bound(run=run, x=x, lora=lora, dy=list(st.dy), leaves=leaves, params=params, modules=modules,
                 grads_fn=grads)


def _reference(case: Case, st, x, A, B, m, provider: str):
    L = st.layers[0]
    W, b = L.W.double(), (L.b.double() if L.b is not None else None)
    if provider == "base":
        return F.linear(x, W, b)
    lora = case.scaling * F.linear(F.linear(x, A), B)
    if provider == "fused-lora":
        return F.linear(x, W, b) + lora
    scale = m / norm64(L.W, L.A, L.B, case.scaling)   # the norm is a constant (detached)
    y = scale * (F.linear(x, W) + lora)
    return y + b if b is not None else y


def reference_outputs(case: Case, st, provider: str) -> list:
    """float64 ``(m / norm) ⊙ (x W0ᵀ + s (x Aᵀ) Bᵀ) + b`` (fused-lora: LoRA; base: x W0ᵀ + b)."""
    L = st.layers[0]
    with torch.no_grad():
        return [_reference(case, st, st.x.double(), L.A.double(), L.B.double(), L.m.double(), provider)]


def reference_grads(case: Case, st, provider: str) -> list:
    """float64 [dX, dA, dB, dm] of the reference (fused-lora: [dX, dA, dB]; base: [dX]), dropout 0."""
    L = st.layers[0]
    x, A, B, m = (t.detach().double().requires_grad_() for t in (st.x, L.A, L.B, L.m))
    y = _reference(case, st, x, A, B, m, provider)
    torch.autograd.backward([y], [st.dy[0].double()])
    return {"base": [x.grad], "fused-lora": [x.grad, A.grad, B.grad]}.get(provider, [x.grad, A.grad, B.grad, m.grad])


def set_bytes(case: Case, read_only: bool = False) -> int:
    """Bytes of one input set (``read_only``: only x, W0, A, B; the magnitude [N] is left out)."""
    dy = case.M * case.N if (case.training and not read_only) else 0
    return element_size(case) * (case.M * case.K + case.N * case.K + case.r * (case.K + case.N) + dy)
