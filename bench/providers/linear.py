"""Single-adapter providers: ``y = x W0ᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` over one or more projections.

  base          F.linear(x, W, b) alone: the floor (frozen base in training modes)
  fused         lf.lora_linear, lora-fused with its default choices (strategy "auto"; the
                Triton kernels on CUDA, the torch path on a CPU)
  fused_kernel  lf.lora_linear forced to the one-GEMM strategy (lf.use_strategy(forward="fused"))
  shrink_first  lf.lora_linear forced to shrink_first
  composite     lf.lora_linear forced to composite (the vendor GEMM for the base product)
  eager         loralib-style F.linear(x,W,b) + s*F.linear(F.linear(drop(x),A),B)
  merged        one F.linear with W0 + s·B·A precomputed: the inference lower bound (fwd only)
  compiled      torch.compile of the eager function (Inductor; compiled outside the timing)
  peft          a real peft ``lora.Linear`` (LoraLayer) wrapping the same nn.Linear weights

Every provider sees the same input set: x, and per projection W, b, A, B and the merged
weight. In training modes x and the LoRA weights are fresh leaves per provider (sharing
storage with the set), so gradients never mix.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import lora_fused as lf

from ..cases import Case
from ..measure import TORCH_DTYPES
from .base import NO_LORA, Bound, InputSet, Layer, element_size, input_set, random_fn, random_projection

#: Strategy providers: lf.lora_linear with both directions forced (lf.use_strategy). The
#: provider "fused" is lora-fused's default, "auto" (the measured choice, or the heuristic
#: without one); the provider "fused_kernel" forces the strategy named "fused".
STRATEGY_PROVIDERS = {"fused_kernel": ("fused", "fused"), "shrink_first": ("shrink_first", "fused"),
                      "composite": ("composite", "composite")}
PROVIDERS = ("base", "fused", *STRATEGY_PROVIDERS, "eager", "merged", "compiled", "peft")
DESCRIPTIONS = {
    "base": "F.linear(x, W, b) alone (frozen base): the floor",
    "fused": "lf.lora_linear with its default strategy choice, auto (multi-adapter cases: lf.multi_lora_linear given a SegmentPlan built once "
             "per input set outside the timing, as a serving engine shares one plan across all layers)",
    "fused_kernel": "lf.lora_linear forced to the strategy \"fused\" (one Triton GEMM with the shrink in its "
                    "K loop; shrink_first where that does not exist: dropout, r > 32), Triton dX GEMM",
    "shrink_first": "lf.lora_linear forced to shrink_first (Triton shrink, then a Triton GEMM started "
                    "from s*S*B^T), Triton dX GEMM",
    "composite": "lf.lora_linear forced to composite (Triton shrink, cuBLAS base GEMM, Triton in-place "
                 "add of s*S*B^T; backward cuBLAS dY*W0 + in-place masked dS*A)",
    "eager": "loralib-style F.linear(x,W,b) + s*F.linear(F.linear(drop(x),A),B)",
    "merged": "F.linear(x, W + s*B@A, b): the inference lower bound (forward only)",
    "compiled": "torch.compile of the eager version (Inductor, static shapes)",
    "peft": "peft lora.Linear (LoraLayer) around the same nn.Linear",
}


def applies(provider: str, case: Case) -> bool:
    """Whether ``provider`` has a row for the single-adapter ``case``."""
    if provider not in PROVIDERS:
        return False
    if provider == "merged":
        return case.mode == "fwd"   # inference only: a merged weight has no LoRA gradients
    return True


def compile_status(device: torch.device) -> Optional[str]:
    """Why the ``compiled`` provider cannot run on ``device``, or None."""
    if not hasattr(torch, "compile"):
        return "torch.compile missing"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401  (Inductor's GPU code generator)
        except ImportError:
            return "torch.compile on CUDA needs triton"
    return None


def make_sets(case: Case, device: torch.device, n_sets: int, g: torch.Generator) -> list[InputSet]:
    """Input sets of a single-adapter case: x, per projection W, A, B, b (and the merged weight
    in forward cases), dy per projection in training."""
    dtype = TORCH_DTYPES[case.dtype]
    rand = random_fn(g, device, dtype)
    sets = []
    for _ in range(n_sets):
        layers = []
        for _ in range(case.projections):
            W, A, B, b = random_projection(rand, case)
            Wm = None
            if case.mode == "fwd":
                Wm = (W.float() + case.scaling * (B.float() @ A.float())).to(dtype)
            layers.append(Layer(W, A, B, b, Wm))
        sets.append(input_set(rand, case, layers))
    return sets


def set_bytes(case: Case, read_only: bool = False) -> int:
    """Bytes of one input set (``read_only``: only x, W, A, B, which every LoRA call reads)."""
    merged = case.N * case.K if (case.mode == "fwd" and not read_only) else 0
    per_layer = case.N * case.K + case.r * (case.K + case.N) + merged
    dy = case.M * case.N * case.projections if (case.training and not read_only) else 0
    return element_size(case) * (case.M * case.K + case.projections * per_layer + dy)


def eager_lora(x, W, A, B, s, b=None, p=0.0, training=False):
    """loralib-style: F.linear(x, W, b) + s * F.linear(F.linear(drop(x), A), B)."""
    h = F.dropout(x, p, True) if (p > 0.0 and training) else x
    return F.linear(x, W, b) + s * F.linear(F.linear(h, A), B)


def _eager_for_compile(x, W, A, B, s, b, p, training):
    # A separate function object: torch.compile caches on its code, shared by all cases.
    h = F.dropout(x, p, True) if (p > 0.0 and training) else x
    return F.linear(x, W, b) + s * F.linear(F.linear(h, A), B)


_COMPILED: Optional[Callable] = None


def compiled_eager() -> Callable:
    """torch.compile(eager) — one wrapper per process, static shapes, recompile limit raised
    (every case shape is a new graph; the default limit of 8 would fall back to eager), AOT
    autograd's donated buffers off (they forbid the retain_graph a backward-alone timing needs;
    they only let the backward reuse memory)."""
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo.config as dcfg
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, key):
                setattr(dcfg, key, max(getattr(dcfg, key), 512))
                break
        if hasattr(dcfg, "accumulated_recompile_limit"):
            dcfg.accumulated_recompile_limit = max(dcfg.accumulated_recompile_limit, 4096)
        try:  # donated buffers forbid backward(retain_graph=True), which backward-alone cases use
            import torch._functorch.config as fcfg
            if hasattr(fcfg, "donated_buffer"):
                fcfg.donated_buffer = False
        except ImportError:
            pass
        _COMPILED = torch.compile(_eager_for_compile, dynamic=False)
    return _COMPILED


def make_peft_layers(layers: list, r: int, alpha: float, dropout: float,
                     names: Optional[list] = None) -> list:
    """peft lora.Linear layers around frozen W (and b), LoRA weights set to (A, B) as given
    (the tensors themselves, wrapped as Parameters: they share storage).

    Built through ``peft.inject_adapter_in_model`` (stable across peft versions). The
    adapter weights stay in the base dtype (PeftModel would upcast bf16 adapters to fp32
    by default; here every provider computes in one dtype)."""
    from peft import LoraConfig, inject_adapter_in_model

    names = names or [f"p{i}" for i in range(len(layers))]
    holder = nn.Module()
    for name, (W, b, _, _) in zip(names, layers):
        lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device="meta")
        setattr(holder, name, lin)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(names))
    holder = inject_adapter_in_model(cfg, holder)
    out = []
    for name, (W, b, A, B) in zip(names, layers):
        layer = getattr(holder, name)
        layer.base_layer.weight = nn.Parameter(W, requires_grad=False)
        if b is not None:
            layer.base_layer.bias = nn.Parameter(b, requires_grad=False)
        layer.lora_A["default"].weight = nn.Parameter(A, requires_grad=A.requires_grad)
        layer.lora_B["default"].weight = nn.Parameter(B, requires_grad=B.requires_grad)
        out.append(layer)
    return out


def bind(provider: str, case: Case, st: InputSet, *, training: bool) -> Bound:
    """``provider`` over input set ``st``. In training, x (and A, B for LoRA providers)
    become fresh leaves that require grad; W and b stay frozen."""
    s, p = case.scaling, case.dropout if training else 0.0
    x = st.x.detach().requires_grad_(True) if training else st.x
    lora_leaves = provider not in NO_LORA and training
    lora = [(L.A.detach().requires_grad_(True), L.B.detach().requires_grad_(True)) if lora_leaves
            else (L.A, L.B) for L in st.layers]
    frozen = [t for L in st.layers for t in (L.W, L.b, L.Wm) if t is not None]
    params = frozen + [t for ab in lora for t in ab]
    leaves = ([x] if training else []) + ([t for ab in lora for t in ab] if lora_leaves else [])
    layers = st.layers
    modules: list = []

    if provider == "base":
        def run():
            return [F.linear(x, L.W, L.b) for L in layers]
    elif provider == "merged":
        def run():
            return [F.linear(x, L.Wm, L.b) for L in layers]
    elif provider == "fused":
        def run():
            return [lf.lora_linear(x, L.W, A, B, s, L.b, dropout_p=p, training=training)
                    for L, (A, B) in zip(layers, lora)]
    elif provider in STRATEGY_PROVIDERS:
        forward, backward = STRATEGY_PROVIDERS[provider]

        def run():  # the backward follows what was forced when the forward ran
            with lf.use_strategy(forward=forward, backward=backward):
                return [lf.lora_linear(x, L.W, A, B, s, L.b, dropout_p=p, training=training)
                        for L, (A, B) in zip(layers, lora)]
    elif provider == "eager":
        def run():
            return [eager_lora(x, L.W, A, B, s, L.b, p, training) for L, (A, B) in zip(layers, lora)]
    elif provider == "compiled":
        fn = compiled_eager()

        def run():
            return [fn(x, L.W, A, B, s, L.b, p, training) for L, (A, B) in zip(layers, lora)]
    elif provider == "peft":
        modules = make_peft_layers([(L.W, L.b, A, B) for L, (A, B) in zip(layers, lora)], case.r,
                                   s * case.r, case.dropout,
                                   names=["q", "k", "v"] if case.projections == 3 else None)
        for m in modules:
            m.train(training)
        # peft wraps A/B in new Parameters: those are the leaves, and what the check reads
        lora = [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in modules]
        if lora_leaves:
            leaves = [x] + [t for ab in lora for t in ab]
        params = params + [t for m in modules for t in m.parameters()]

        def run():
            return [m(x) for m in modules]
    else:
        raise ValueError(f"unknown provider {provider!r} for {case.name}")
    return Bound(run=run, x=x, lora=lora, dy=list(st.dy), leaves=leaves, params=params, modules=modules)


def reference_outputs(case: Case, st: InputSet, provider: str) -> list:
    """fp32 eager outputs on set ``st`` (base/merged: F.linear, merged with its own Wm)."""
    with torch.no_grad():
        out = []
        for L in st.layers:
            x = st.x.float()
            b = L.b.float() if L.b is not None else None
            if provider == "base":
                out.append(F.linear(x, L.W.float(), b))
            elif provider == "merged":
                out.append(F.linear(x, L.Wm.float(), b))
            else:
                out.append(eager_lora(x, L.W.float(), L.A.float(), L.B.float(), case.scaling, b))
        return out


def reference_grads(case: Case, st: InputSet, provider: str) -> list:
    """fp32 eager [dX, dA_0, dB_0, ...] for dropout 0 (base, merged: [dX])."""
    x = st.x.detach().float().requires_grad_()
    outs, ab = [], []
    for L in st.layers:
        b = L.b.float() if L.b is not None else None
        if provider in NO_LORA:
            outs.append(F.linear(x, L.W.float(), b))
        else:
            A = L.A.detach().float().requires_grad_()
            B = L.B.detach().float().requires_grad_()
            ab.append((A, B))
            outs.append(eager_lora(x, L.W.float(), A, B, case.scaling, b))
    torch.autograd.backward(outs, [d.float() for d in st.dy])
    grads = [x.grad]
    for A, B in ab:
        grads += [A.grad, B.grad]
    return grads

