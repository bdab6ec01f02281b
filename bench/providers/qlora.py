"""QLoRA providers and inputs: LoRA over a bitsandbytes 4-bit base weight (goals Q1-Q3).

Every QLoRA case (``Case.quant``, e.g. ``nf4dq``) quantizes one random W0 per input set
with bitsandbytes (``Linear4bit``, compute dtype = the case's dtype; NF4/FP4, double
quantization, blocksize 64: :func:`bench.cases.quant_spec`). The LoRA weights are fp32,
as PEFT's QLoRA adapters are. Providers (each gets its own deep copy of the
``Linear4bit``, so no provider sees another's in-place repacking of the weight):

  base         the ``Linear4bit`` alone (bitsandbytes' own 4-bit matmul): the floor
  fused        ``lf.LoRALinear4bit`` around it (Triton dequantize + GEMM + LoRA kernels,
               fused dequant-GEMV + LoRA at decode; bitsandbytes + the torch path on a CPU)
  eager-qlora  ``Linear4bit(x) + s * F.linear(F.linear(drop(x), A), B)``, A and B cast to
               the compute dtype (the hand-written QLoRA of many training scripts)
  peft-qlora   PEFT's QLoRA layer (``peft.tuners.lora.bnb.Linear4bit``) around it: the
               base layer's output cloned, its LoRA branch in fp32 (the adapters' dtype)

Only ``fused`` is timed as a CUDA-graph replay at decode: bitsandbytes' Python around its
launches is not promised capturable, so the others are timed as eager launches and goal
Q2 compares eager launches on both sides (bench/goals.py).

The check: float64 ``x deq(W0)ᵀ + b + s (x Aᵀ) Bᵀ`` and its gradients in x, A and B, with
deq(W0) = ``bitsandbytes.functional.dequantize_4bit`` of the packed weight (computed once
per input set, before any provider runs).

bitsandbytes is optional: without it every QLoRA row is ``skipped`` with the reason
(:func:`bnb_status`), nothing is imported.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..cases import Case, quant_spec, quant_weight_bytes
from ..measure import TORCH_DTYPES
from .base import Bound, Layer, element_size, input_set, random_fn, random_projection

PROVIDERS = ("base", "fused", "eager-qlora", "peft-qlora")
DESCRIPTIONS = {
    "eager-qlora": "QLoRA cases: bitsandbytes Linear4bit(x) + s*F.linear(F.linear(drop(x), A), B) "
                   "(fp32 A, B cast to the compute dtype)",
    "peft-qlora": "QLoRA cases: PEFT's QLoRA layer (peft.tuners.lora.bnb.Linear4bit) around the same "
                  "bitsandbytes Linear4bit, fp32 adapters",
}
#: What "base" and "fused" mean on a QLoRA case (printed with the provider list).
CASE_NOTE = ("QLoRA cases (bench/providers/qlora.py): base = the bitsandbytes Linear4bit alone, fused = "
             "lf.LoRALinear4bit around it; bitsandbytes providers are timed as eager launches")


def bnb_status() -> Optional[str]:
    """Why the QLoRA cases cannot run (bitsandbytes missing or broken), or None."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a failing native library underneath
        return (f"bitsandbytes not importable ({type(exc).__name__}: {exc}); "
                "pip install lora-fused[qlora]")[:200]
    return None


def quantize(W: torch.Tensor, b: Optional[torch.Tensor], quant: str) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding W [N, K] (and b) quantized as ``quant`` on W's device;
    compute dtype = W's dtype."""
    import bitsandbytes as bnb
    quant_type, nested, blocksize = quant_spec(quant)
    N, K = W.shape
    lin = bnb.nn.Linear4bit(K, N, bias=b is not None, compute_dtype=W.dtype, quant_type=quant_type,
                            compress_statistics=nested, quant_storage=torch.uint8, device="meta")
    lin.weight = bnb.nn.Params4bit(W.detach().cpu(), requires_grad=False, quant_type=quant_type,
                                   compress_statistics=nested, blocksize=blocksize)
    if b is not None:
        lin.bias = nn.Parameter(b.detach().cpu(), requires_grad=False)
    # On a CPU with AVX512-BF16, Linear4bit's forward without grad in eval mode would repack the
    # weight in place for a kernel that computes in bf16, not in the case's dtype (and needs
    # N % 32 == 0): every provider computes in the case's dtype, as bitsandbytes does on a GPU.
    lin.support_avx512bf16_for_cpu = False
    return lin.to(W.device)  # bitsandbytes quantizes when the layer moves to its device


def dequantized(lin: nn.Module) -> torch.Tensor:
    """deq(W0) by bitsandbytes itself, in the quant state's dtype (the compute dtype here). Read
    before the layer first runs: a CPU forward may repack the weight for bitsandbytes' own CPU
    kernel, and the dequantize reads the standard layout only."""
    import bitsandbytes as bnb
    state = lin.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        raise RuntimeError("dequantized: the Linear4bit already ran on a CPU (its weight is repacked); "
                           "dequantize it before its first forward")
    return bnb.functional.dequantize_4bit(lin.weight.data, state)


def make_sets(case: Case, device: torch.device, n_sets: int, g: torch.Generator) -> list:
    """Input sets of a QLoRA case: x (compute dtype), one Layer with W = deq(W0) (the float
    reference's weight), fp32 A [r, K] and B [N, r], b, and ``q`` the Linear4bit."""
    if case.projections != 1 or case.multi:
        raise ValueError(f"{case.name}: QLoRA cases have one projection and one adapter")
    rand = random_fn(g, device, TORCH_DTYPES[case.dtype])
    sets = []
    for _ in range(n_sets):
        W, A, B, b = random_projection(rand, case, lora_dtype=torch.float32)
        q = quantize(W, b, case.quant)
        del W  # only the 4-bit weight and its exact dequantization stay
        layer = Layer(dequantized(q), A, B, b)
        layer.q = q
        sets.append(input_set(rand, case, [layer]))
    return sets


def set_bytes(case: Case, read_only: bool = False) -> int:
    """Bytes of one input set: x, the 4-bit W0, fp32 A and B (+ deq(W0) and dy unless read_only)."""
    es = element_size(case)
    n = case.M * case.K * es + quant_weight_bytes(case.N, case.K, case.quant) + 4 * case.r * (case.K + case.N)
    if not read_only:
        n += case.N * case.K * es + (case.M * case.N * es if case.training else 0)
    return int(n)


def _quant_tensors(lin: nn.Module) -> list:
    """The packed weight, bias and quant-state tensors (parameters: never saved activations)."""
    out = [lin.weight, lin.bias]
    state = getattr(lin.weight, "quant_state", None)
    for obj in (state, getattr(state, "state2", None)):
        if obj is not None:
            out += [getattr(obj, k, None) for k in ("absmax", "code", "offset")]
    return [t for t in out if torch.is_tensor(t)]


def peft_layer(lin: nn.Module, r: int, alpha: float, dropout: float) -> nn.Module:
    """PEFT's QLoRA layer around ``lin`` (a bitsandbytes Linear4bit), built with
    ``inject_adapter_in_model`` as PEFT does for a 4-bit model."""
    from peft import LoraConfig, inject_adapter_in_model
    holder = nn.Module()
    holder.lin = lin
    holder = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                target_modules=["lin"]), holder)
    return holder.lin


def bind(provider: str, case: Case, st, *, training: bool):
    """``provider`` over the QLoRA input set ``st``; in training x and the fp32 LoRA weights are
    fresh leaves (the modules' own Parameters, sharing storage with the set)."""
    import lora_fused as lf

    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r} for the QLoRA case {case.name}")
    L = st.layers[0]
    lin = copy.deepcopy(L.q)
    lin.train(training)
    s, p = case.scaling, case.dropout if training else 0.0
    x = st.x.detach().requires_grad_(True) if training else st.x
    dtype = x.dtype
    lora_grad = training and provider != "base"
    A = nn.Parameter(L.A, requires_grad=lora_grad)
    B = nn.Parameter(L.B, requires_grad=lora_grad)
    modules: list = []

    if provider == "base":
        def run():
            return [lin(x)]
    elif provider == "eager-qlora":
        def run():
            h = F.dropout(x, p, True) if p > 0.0 else x
            return [lin(x) + s * F.linear(F.linear(h, A.to(dtype)), B.to(dtype))]
    elif provider == "fused":
        m = lf.LoRALinear4bit.from_linear4bit(lin, r=case.r, lora_alpha=s * case.r, lora_dropout=case.dropout)
        m.lora_A, m.lora_B = A, B
        m.train(training)
        modules = [m]

        def run():
            return [m(x)]
    else:  # peft-qlora
        m = peft_layer(lin, case.r, s * case.r, case.dropout)
        m.lora_A["default"].weight = A
        m.lora_B["default"].weight = B
        m.train(training)
        modules = [m]

        def run():
            return [m(x)]
    lora = [(A, B)] if provider != "base" else []
    leaves = ([x] if training else []) + ([A, B] if lora_grad else [])
    params = _quant_tensors(lin) + [L.A, L.B] + [t for m in modules for t in m.parameters()]
    return Bound(run=run, x=x, lora=lora, dy=list(st.dy), leaves=leaves, params=params, modules=modules,
                 graph=provider == "fused")


def _reference(case: Case, st, x, A, B, provider: str):
    L = st.layers[0]
    y = F.linear(x, L.W.double(), L.b.double() if L.b is not None else None)
    return y if provider == "base" else y + case.scaling * F.linear(F.linear(x, A), B)


def reference_outputs(case: Case, st, provider: str) -> list:
    """float64 ``x deq(W0)ᵀ + b + s (x Aᵀ) Bᵀ`` (base: without the LoRA term)."""
    L = st.layers[0]
    with torch.no_grad():
        return [_reference(case, st, st.x.double(), L.A.double(), L.B.double(), provider)]


def reference_grads(case: Case, st, provider: str) -> list:
    """float64 [dX, dA, dB] of the reference (base: [dX]), dropout 0."""
    L = st.layers[0]
    x = st.x.detach().double().requires_grad_()
    A = L.A.detach().double().requires_grad_()
    B = L.B.detach().double().requires_grad_()
    y = _reference(case, st, x, A, B, provider)
    torch.autograd.backward([y], [st.dy[0].double()])
    return [x.grad] if provider == "base" else [x.grad, A.grad, B.grad]
