"""The implementations compared, each a callable over the same random inputs.

Single-adapter providers (``y = x W0ᵀ + b + s·(drop(x) Aᵀ) Bᵀ``):

  base      F.linear(x, W, b) alone: the floor (frozen base in training modes)
  fused     lf.lora_linear (the Triton kernels on CUDA; the torch path on a CPU)
  eager     loralib-style F.linear(x,W,b) + s*F.linear(F.linear(drop(x),A),B)
  merged    one F.linear with W0 + s·B·A precomputed: the inference lower bound (fwd only)
  compiled  torch.compile of the eager function (Inductor; compiled outside the timing)
  peft      a real peft ``lora.Linear`` (LoraLayer) wrapping the same nn.Linear weights

Multi-adapter providers (cases with ``adapters > 0``): ``fused`` is then
``lf.multi_lora_linear``, ``base`` is F.linear, ``peft-mixed`` is PEFT's mixed
batch (``adapter_names=``), and ``loop`` calls ``lf.lora_linear`` once per adapter
segment. Until ``lf.multi_lora_linear`` exists these cases are n/a (see
:func:`case_unavailable`); the hooks to fill in are marked ``MULTI:``.

Every provider sees the same input set: x, and per projection W, b, A, B and
the merged weight. In training modes x and the LoRA weights are fresh leaves
per provider (sharing storage with the set), so gradients never mix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import lora_fused as lf

from .cases import Case
from .goals import MULTI_NA
from .measure import TORCH_DTYPES

SINGLE_PROVIDERS = ("base", "fused", "eager", "merged", "compiled", "peft")
MULTI_PROVIDERS = ("base", "fused", "loop", "peft-mixed")
ALL_PROVIDERS = tuple(dict.fromkeys(SINGLE_PROVIDERS + MULTI_PROVIDERS))
#: Providers that do nothing LoRA: no LoRA leaves, no dropout.
NO_LORA = ("base", "merged")
DESCRIPTIONS = {
    "base": "F.linear(x, W, b) alone (frozen base): the floor",
    "fused": "lf.lora_linear (multi-adapter cases: lf.multi_lora_linear)",
    "eager": "loralib-style F.linear(x,W,b) + s*F.linear(F.linear(drop(x),A),B)",
    "merged": "F.linear(x, W + s*B@A, b): the inference lower bound (forward only)",
    "compiled": "torch.compile of the eager version (Inductor, static shapes)",
    "peft": "peft lora.Linear (LoraLayer) around the same nn.Linear",
    "peft-mixed": "PEFT mixed-adapter batch (adapter_names=...)",
    "loop": "lf.lora_linear once per adapter segment",
}


def applies(provider: str, case: Case) -> bool:
    """Whether ``provider`` has a row for ``case``."""
    if case.multi:
        return provider in MULTI_PROVIDERS
    if provider not in SINGLE_PROVIDERS:
        return False
    if provider == "merged":
        return case.mode == "fwd"   # inference only: a merged weight has no LoRA gradients
    return True


def case_unavailable(case: Case) -> Optional[str]:
    """Why a whole case cannot run in this build (None when it can)."""
    if case.multi and not hasattr(lf, "multi_lora_linear"):
        return MULTI_NA
    return None


# --------------------------------------------------------------------------
# Availability of optional providers (checked once per run)
# --------------------------------------------------------------------------
def peft_status() -> tuple[Optional[str], str]:
    """(reason it cannot run or None, label with version)."""
    try:
        import peft
    except Exception as exc:  # ImportError, or a broken transformers underneath
        return f"peft not importable ({type(exc).__name__}: {exc})"[:200], ""
    return None, f"peft {peft.__version__}"


def compile_status(device: torch.device) -> Optional[str]:
    if not hasattr(torch, "compile"):
        return "torch.compile missing"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401  (Inductor's GPU code generator)
        except ImportError:
            return "torch.compile on CUDA needs triton"
    return None


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------
@dataclass
class Layer:
    """One projection's weights: frozen W (and b), LoRA A/B, and W0 + s·B·A."""
    W: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    b: Optional[torch.Tensor] = None
    Wm: Optional[torch.Tensor] = None


@dataclass
class InputSet:
    x: torch.Tensor
    layers: list
    dy: list = field(default_factory=list)   # upstream gradients, one per projection (training)


def make_input_sets(case: Case, device: torch.device, n_sets: int, *, seed: int = 0) -> list[InputSet]:
    """Random inputs scaled so every term of y is O(1); never zeros (lora_B included)."""
    if case.multi:  # MULTI: stacked A [n, r_max, K], B [n, N, r_max], adapter_ids, scalings, ranks
        raise NotImplementedError(MULTI_NA)
    dtype = TORCH_DTYPES[case.dtype]
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    sets = []
    for _ in range(n_sets):
        layers = []
        for _ in range(case.projections):
            W = rand(case.N, case.K, scale=case.K ** -0.5)
            A = rand(case.r, case.K, scale=case.K ** -0.5)
            B = rand(case.N, case.r, scale=case.r ** -0.5)
            b = rand(case.N) if case.bias else None
            Wm = None
            if case.mode == "fwd":
                Wm = (W.float() + case.scaling * (B.float() @ A.float())).to(dtype)
            layers.append(Layer(W, A, B, b, Wm))
        st = InputSet(rand(case.M, case.K), layers)
        if case.training:
            st.dy = [rand(case.M, case.N) for _ in range(case.projections)]
        sets.append(st)
    return sets


def input_set_bytes(case: Case, read_only: bool = False) -> int:
    """Bytes of one input set (``read_only``: only x, W, A, B, which every LoRA call reads)."""
    es = torch.empty((), dtype=TORCH_DTYPES[case.dtype]).element_size()
    merged = case.N * case.K if (case.mode == "fwd" and not read_only) else 0
    per_layer = case.N * case.K + case.r * (case.K + case.N) + merged
    dy = case.M * case.N * case.projections if (case.training and not read_only) else 0
    return es * (case.M * case.K + case.projections * per_layer + dy)


# --------------------------------------------------------------------------
# Provider functions
# --------------------------------------------------------------------------
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


@dataclass
class Bound:
    """A provider bound to one input set: ``run()`` computes every projection's output."""
    run: Callable[[], list]
    x: torch.Tensor                       # the input as the provider sees it (a leaf in training)
    lora: list                            # per projection (A, B) as the provider sees them
    dy: list
    leaves: list                          # tensors whose .grad is reset between calls
    params: list                          # storages not to count as saved activations
    modules: list = field(default_factory=list)

    def grads(self) -> list:
        """[dX, dA_0, dB_0, ...] after a backward (the base provider: [dX])."""
        out = [self.x.grad]
        for A, B in self.lora:
            out += [A.grad, B.grad]
        return out


def bind(provider: str, case: Case, st: InputSet, *, training: bool) -> Bound:
    """``provider`` over input set ``st``. In training, x (and A, B for LoRA providers)
    become fresh leaves that require grad; W and b stay frozen."""
    if case.multi:  # MULTI: fused = lf.multi_lora_linear, loop, peft-mixed, base over a plan
        raise NotImplementedError(MULTI_NA)
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
    """fp32 eager [dX, dA_0, dB_0, ...] for dropout 0 (base: [dX])."""
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
