"""DoRA training step: lora-fused's DoRALinear against PEFT's DoRA (and lora-fused's LoRA).

    python -m bench.dora [--size 1024] [--rows 256] [--rank 16] [--dropout 0.1] [--rounds 31]
                         [--dtype fp32|bf16|fp16] [--device cpu|cuda] [--threads N]

One ``nn.Linear(size, size)`` wrapped three ways over the same weights: ``peft-dora``
(``get_peft_model(..., LoraConfig(use_dora=True))``), ``dora`` (``lf.inject_lora(...,
use_dora=True)``) and ``lora`` (``lf.inject_lora``: the floor DoRA adds to). A step is
forward + backward (x requires grad) with the same upstream gradient. Rounds are
interleaved (one step of each provider per round, in turn), so a slow stretch of a
shared host hits all three; the medians are printed with the ratios the issue's goals
read: dora / peft-dora (CPU goal <= 0.8 at 1024², M = 256; GPU goal <= 1 / 1.6) and
dora / lora (GPU goal <= 1.15). Outputs are checked against PEFT's before timing (exit 1 if off).

``python -m bench --cases dora`` runs the same comparison as cases of the sweep (goals D1-D4,
bench/goals.py) with the providers defined below (:func:`bind`):

  base        F.linear(x, W0, b): the frozen layer alone
  fused       ``lf.DoRALinear`` (the norm from W0 Aᵀ and A Aᵀ, no out x in tensor)
  fused-lora  ``lf.lora_linear`` on the same W0, A, B: the LoRA step DoRA adds to (D1)
  peft-dora   PEFT's ``lora.Linear`` with ``use_dora=True`` (built by ``inject_adapter_in_model``),
              its adapters and magnitude set to the same tensors, in the case's dtype

Each is checked against float64 (:func:`reference_outputs`, :func:`reference_grads`):
``y = (m / norm) ⊙ (x W0ᵀ + s (x Aᵀ) Bᵀ) + b`` with ``norm[o] = ‖W0[o] + s (B A)[o]‖₂``
held constant in backward (PEFT detaches it), gradients in x, A, B and m. The magnitude is
the norm times (1 + 0.1 N(0, 1)), so a provider that ignored m, or that took m / norm as
1, fails the check.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .cases import Case
from .measure import TORCH_DTYPES

#: What "base" and "fused" mean on a DoRA case (printed with the provider list).
CASE_NOTE = ("DoRA cases (bench/dora.py): base = F.linear alone, fused = lf.DoRALinear, fused-lora = "
             "lf.lora_linear on the same weights; D3 is a CPU goal at 1024x1024, M=256")


def norm64(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """float64 ‖W0[o] + s (B A)[o]‖₂ [N] (formed in full: the reference may)."""
    return (W.double() + s * B.double() @ A.double()).norm(dim=1)


def make_sets(case: Case, device: torch.device, n_sets: int, g: torch.Generator) -> list:
    """Input sets of a DoRA case: x, one Layer (W0, A, B, b in the case's dtype) with ``m`` the
    magnitude [N] (the norm x (1 + 0.1 N(0, 1))), dy in training."""
    from .providers import InputSet, Layer
    if case.projections != 1 or case.multi:
        raise ValueError(f"{case.name}: DoRA cases have one projection and one adapter")
    dtype = TORCH_DTYPES[case.dtype]

    def rand(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    sets = []
    for _ in range(n_sets):
        W = rand(case.N, case.K, scale=case.K ** -0.5)
        A = rand(case.r, case.K, scale=case.K ** -0.5)
        B = rand(case.N, case.r, scale=case.r ** -0.5)
        b = rand(case.N) if case.bias else None
        layer = Layer(W, A, B, b)
        jitter = 1.0 + 0.1 * torch.randn(case.N, generator=g, device=device)
        layer.m = (norm64(W, A, B, case.scaling) * jitter).to(dtype)
        st = InputSet(rand(case.M, case.K), [layer])
        if case.training:
            st.dy = [rand(case.M, case.N)]
        sets.append(st)
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

    from .providers import DORA_PROVIDERS, Bound
    if provider not in DORA_PROVIDERS:
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

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Largest relative output difference to PEFT accepted before timing (PEFT rounds its norm in
#: the compute dtype, lora-fused in fp32).
MAX_ERROR = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}


def build(size: int, rank: int, dropout: float, dtype, device):
    import peft
    import torch
    from torch import nn

    import lora_fused as lf

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(size, size)).to(device=device, dtype=dtype)
    config = peft.LoraConfig(target_modules=["0"], r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                             use_dora=True, init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).train()
    dora = lf.inject_lora(copy.deepcopy(base), ["0"], r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                          use_dora=True).train()
    lora = lf.inject_lora(copy.deepcopy(base), ["0"], r=rank, lora_alpha=2 * rank, lora_dropout=dropout).train()
    layer, peft_layer = dora[0], peft_model.base_model.model[0]
    with torch.no_grad():  # the same (nonzero) adapter everywhere
        for ours, theirs in ((layer.lora_A, peft_layer.lora_A["default"].weight),
                             (layer.lora_B, peft_layer.lora_B["default"].weight),
                             (layer.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight)):
            ours.copy_(theirs)
        lora[0].lora_A.copy_(layer.lora_A)
        lora[0].lora_B.copy_(layer.lora_B)
    return {"peft-dora": peft_model, "dora": dora, "lora": lora}


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, DTYPES[args.dtype]), torch.device(args.device)
    models = build(args.size, args.rank, args.dropout, dtype, device)
    x = torch.randn(args.rows, args.size, device=device, dtype=dtype)
    dy = torch.randn(args.rows, args.size, device=device, dtype=dtype)

    with torch.no_grad():
        for m in models.values():
            m.eval()
        ref = models["peft-dora"](x).float()
        err = (models["dora"](x).float() - ref).norm() / ref.norm()
        for m in models.values():
            m.train()
    print(f"dora vs peft-dora output (eval): relative error {err:.2e}")
    if not err <= MAX_ERROR[args.dtype]:
        print(f"FAILED: above {MAX_ERROR[args.dtype]:g}; not timing")
        return 1

    def step(model):
        xx = x.clone().requires_grad_()
        model(xx).backward(dy)
        for p in model.parameters():
            p.grad = None

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for model in models.values():
        for _ in range(3):
            step(model)
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            sync()
            start = time.perf_counter()
            step(model)
            sync()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"{args.size}x{args.size}, M={args.rows}, r={args.rank}, p={args.dropout}, {args.dtype} on {device} "
          f"({torch.get_num_threads()} threads), median of {args.rounds} interleaved rounds:")
    for name, ms in med.items():
        print(f"  {name:10s} {ms:9.3f} ms")
    print(f"  dora / peft-dora = {med['dora'] / med['peft-dora']:.3f}   dora / lora = {med['dora'] / med['lora']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
