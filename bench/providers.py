"""The implementations compared, each a callable over the same random inputs.

Single-adapter providers (``y = x W0ᵀ + b + s·(drop(x) Aᵀ) Bᵀ``):

  base      F.linear(x, W, b) alone: the floor (frozen base in training modes)
  fused     lf.lora_linear (the Triton kernels on CUDA; the torch path on a CPU)
  eager     loralib-style F.linear(x,W,b) + s*F.linear(F.linear(drop(x),A),B)
  merged    one F.linear with W0 + s·B·A precomputed: the inference lower bound (fwd only)
  compiled  torch.compile of the eager function (Inductor; compiled outside the timing)
  peft      a real peft ``lora.Linear`` (LoraLayer) wrapping the same nn.Linear weights

Multi-adapter providers (cases with ``adapters > 0``; ``y[t] = x[t] W0ᵀ + b +
s_i (x[t] A_i[:r_i]ᵀ) B_i[:, :r_i]ᵀ``, i = the row's adapter, -1 = base only):

  base        F.linear(x, W, b) alone
  fused       lf.multi_lora_linear over a SegmentPlan built once per input set, outside
              the timing (a serving engine builds it once per batch and every layer reuses it)
  loop        lf.lora_linear once per adapter present, on its rows (index_select), base rows
              by F.linear, the outputs put back in row order: the obvious baseline
  peft-mixed  one peft lora.Linear holding the n adapters (each its own rank and alpha),
              called with adapter_names=[...] ("__base__" for base rows): PEFT's mixed batch,
              inference only (n/a in training modes, where PEFT refuses adapter_names)

QLoRA cases (``quant``: a bitsandbytes 4-bit W0; bench/qlora.py): ``base`` (the
Linear4bit alone), ``fused`` (lf.LoRALinear4bit), ``eager-qlora`` and ``peft-qlora``.

DoRA cases (``dora``; bench/dora.py): ``base`` (F.linear), ``fused`` (lf.DoRALinear),
``fused-lora`` (lf.lora_linear on the same W, A, B: the LoRA cost DoRA adds to) and
``peft-dora`` (PEFT's lora.Linear with ``use_dora=True``).

Serving cases (``slices``; bench/serving.py): ``base`` (the base GEMM x Wᵀ alone),
``packed`` (lf.add_lora over every slice), ``three-calls`` (lf.add_lora once per slice),
``vllm`` and ``sglang`` (the engine-layout adapters of lora_fused.integrations).

Every provider sees the same input set: x, and per projection W, b, A, B and
the merged weight (multi-adapter: one projection with the stacked A [n, r_max, in],
B [n, out, r_max], scalings [n], ranks [n] or None, and the row ids). In training
modes x and the LoRA weights are fresh leaves per provider (sharing storage with
the set), so gradients never mix.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import lora_fused as lf
from lora_fused.kernels.multi_lora import MULTI_DECODE_MAX_ROWS

from .cases import Case
from .measure import TORCH_DTYPES

#: Strategy providers: lf.lora_linear with both directions forced (lf.use_strategy); "fused"
#: itself is the default, "auto" (the measured choice, or the heuristic without one).
STRATEGY_PROVIDERS = {"fused_kernel": ("fused", "fused"), "shrink_first": ("shrink_first", "fused"),
                      "composite": ("composite", "composite")}
SINGLE_PROVIDERS = ("base", "fused", *STRATEGY_PROVIDERS, "eager", "merged", "compiled", "peft")
MULTI_PROVIDERS = ("base", "fused", "fused-cublas", "loop", "peft-mixed")
QLORA_PROVIDERS = ("base", "fused", "eager-qlora", "peft-qlora")   # bench/qlora.py
DORA_PROVIDERS = ("base", "fused", "fused-lora", "peft-dora")       # bench/dora.py
SERVING_PROVIDERS = ("base", "packed", "three-calls", "vllm", "sglang")   # bench/serving.py
ALL_PROVIDERS = tuple(dict.fromkeys(SINGLE_PROVIDERS + MULTI_PROVIDERS + QLORA_PROVIDERS + DORA_PROVIDERS
                                    + SERVING_PROVIDERS))
#: Providers that do nothing LoRA: no LoRA leaves, no dropout.
NO_LORA = ("base", "merged")
DESCRIPTIONS = {
    "base": "F.linear(x, W, b) alone (frozen base): the floor",
    "fused": "lf.lora_linear with its default strategy choice, auto (multi-adapter cases: lf.multi_lora_linear given a SegmentPlan built once "
             "per input set outside the timing, as a serving engine shares one plan across all layers)",
    "fused_kernel": "lf.lora_linear forced to the fused strategy (one Triton GEMM with the shrink in its "
                    "K loop; S-first where that does not exist: dropout, r > 32), Triton dX GEMM",
    "shrink_first": "lf.lora_linear forced to shrink_first (Triton shrink, then a Triton GEMM started "
                    "from s*S*B^T), Triton dX GEMM",
    "composite": "lf.lora_linear forced to composite (Triton shrink, cuBLAS base GEMM, Triton in-place "
                 "add of s*S*B^T; backward cuBLAS dY*W0 + in-place masked dS*A)",
    "eager": "loralib-style F.linear(x,W,b) + s*F.linear(F.linear(drop(x),A),B)",
    "merged": "F.linear(x, W + s*B@A, b): the inference lower bound (forward only)",
    "compiled": "torch.compile of the eager version (Inductor, static shapes)",
    "peft": "peft lora.Linear (LoraLayer) around the same nn.Linear",
    "fused-cublas": "lf.multi_lora_linear in the prefill_cublas regime: cuBLAS base GEMM, LoRA added "
                    "into y (prefill cases only; the alternative to the default fused grouped GEMM)",
    "peft-mixed": "one peft lora.Linear with n adapters, called with adapter_names=[...] (PEFT's mixed "
                  "batch; inference only; host-built row lists: not CUDA-graph capturable, timed eagerly)",
    "loop": "lf.lora_linear once per adapter present on its rows (index_select), base rows by F.linear, "
            "rows put back in order (row index tensors built outside the timing)",
    "eager-qlora": "QLoRA cases: bitsandbytes Linear4bit(x) + s*F.linear(F.linear(drop(x), A), B) "
                   "(fp32 A, B cast to the compute dtype)",
    "peft-qlora": "QLoRA cases: PEFT's QLoRA layer (peft.tuners.lora.bnb.Linear4bit) around the same "
                  "bitsandbytes Linear4bit, fp32 adapters",
    "fused-lora": "DoRA cases: lf.lora_linear on the same W0, A, B (LoRA without the magnitude: D1's denominator)",
    "peft-dora": "DoRA cases: PEFT's lora.Linear with use_dora=True (forms B·A and W0 + s·B·A for the norm)",
    "packed": "serving cases: lf.add_lora(y, x, A [n, S, r, in], B [n, out, r], plan, scalings, slices=...): "
              "the delta of every slice in one call (plan built once, as an engine's batch metadata)",
    "three-calls": "serving cases: lf.add_lora once per slice into y's column views (A, B per slice, contiguous)",
    "vllm": "serving cases: integrations.vllm.add_lora_linear (vLLM's tuple-of-4-D stacks, token mapping)",
    "sglang": "serving cases: integrations.sglang.run_qkv_lora (SGLang's qkv layout and batch info)",
}
#: Providers whose call cannot be captured in a CUDA graph (timed as eager launches only).
NOT_GRAPH_CAPTURABLE = ("peft-mixed",)
PEFT_MIXED_TRAINING = ("n/a: PEFT's mixed batch (adapter_names) is inference only "
                       "(PEFT refuses adapter_names in training mode)")


def applies(provider: str, case: Case) -> bool:
    """Whether ``provider`` has a row for ``case``."""
    if getattr(case, "dora", False):
        return provider in DORA_PROVIDERS
    if getattr(case, "slices", ()):
        return provider in SERVING_PROVIDERS
    if getattr(case, "quant", ""):
        return provider in QLORA_PROVIDERS
    if case.multi:
        if provider == "fused-cublas":  # a prefill strategy: decode batches already use cuBLAS's base
            return case.M > MULTI_DECODE_MAX_ROWS
        return provider in MULTI_PROVIDERS
    if provider not in SINGLE_PROVIDERS:
        return False
    if provider == "merged":
        return case.mode == "fwd"   # inference only: a merged weight has no LoRA gradients
    return True


def provider_unavailable(provider: str, case: Case) -> Optional[str]:
    """Why ``provider`` has an n/a row for ``case`` (None when it runs): PEFT's mixed batch
    in a training mode."""
    if case.multi and provider == "peft-mixed" and case.training:
        return PEFT_MIXED_TRAINING
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


@dataclass
class InputSet:
    x: torch.Tensor
    layers: list
    dy: list = field(default_factory=list)   # upstream gradients, one per projection (training)


def multi_scalings(case: Case) -> list:
    """Per-adapter scalings: case.scaling x (1, 1.25, 1.5, 1.75) in turn (they differ, so a
    provider applying the wrong adapter's scaling fails the check)."""
    return [case.scaling * (1.0 + 0.25 * (i % 4)) for i in range(case.adapters)]


def _make_multi_sets(case: Case, device: torch.device, n_sets: int, g: torch.Generator) -> list[InputSet]:
    """Stacked A [n, r_max, K] and B [n, N, r_max] (B scaled by each adapter's r_i^-1/2; the
    padding past r_i random too, so a provider reading it fails the check), one id per row."""
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

    def rand(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    sets = []
    for _ in range(n_sets):
        W = rand(case.N, case.K, scale=case.K ** -0.5)
        A = rand(n, r_max, case.K, scale=case.K ** -0.5)
        B = (torch.randn(n, case.N, r_max, generator=g, device=device) * b_scale).to(dtype)
        b = rand(case.N) if case.bias else None
        layer = MultiLayer(W, A, B, scalings, ranks, ids, ids_list, rank_list, b)
        st = InputSet(rand(case.M, case.K), [layer])
        if case.training:
            st.dy = [rand(case.M, case.N)]
        sets.append(st)
    return sets


def make_input_sets(case: Case, device: torch.device, n_sets: int, *, seed: int = 0) -> list[InputSet]:
    """Random inputs scaled so every term of y is O(1); never zeros (lora_B included)."""
    dtype = TORCH_DTYPES[case.dtype]
    g = torch.Generator(device=device).manual_seed(seed)
    if case.quant:
        from .qlora import make_sets
        return make_sets(case, device, n_sets, g)
    if case.dora:
        from .dora import make_sets
        return make_sets(case, device, n_sets, g)
    if case.slices:
        from .serving import make_sets
        return make_sets(case, device, n_sets, g)
    if case.multi:
        if case.projections != 1:
            raise ValueError(f"{case.name}: multi-adapter cases have one projection")
        return _make_multi_sets(case, device, n_sets, g)

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
    if case.quant:
        from .qlora import set_bytes
        return set_bytes(case, read_only)
    if case.slices:
        from .serving import set_bytes
        return set_bytes(case, read_only)
    if case.multi:
        used = set(i for i in case.adapter_ids() if i >= 0)
        ranks = case.adapter_ranks
        lora = (sum(ranks[i] for i in used) if read_only else case.adapters * case.r) * (case.K + case.N)
        dy = case.M * case.N if (case.training and not read_only) else 0
        return es * (case.M * case.K + case.N * case.K + lora + dy)
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
    graph: bool = True                    # run() can be captured in a CUDA graph
    grads_fn: Optional[Callable[[], list]] = None   # grads() where the leaves are not [x, A, B, ...]

    def grads(self) -> list:
        """[dX, dA_0, dB_0, ...] after a backward (the base provider: [dX])."""
        if self.grads_fn is not None:
            return self.grads_fn()
        out = [self.x.grad]
        for A, B in self.lora:
            out += [A.grad, B.grad]
        return out


def bind(provider: str, case: Case, st: InputSet, *, training: bool) -> Bound:
    """``provider`` over input set ``st``. In training, x (and A, B for LoRA providers)
    become fresh leaves that require grad; W and b stay frozen."""
    if case.quant:
        from . import qlora
        return qlora.bind(provider, case, st, training=training)
    if case.dora or case.slices:
        from . import dora, serving
        return (dora if case.dora else serving).bind(provider, case, st, training=training)
    if case.multi:
        return _bind_multi(provider, case, st, training=training)
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


def _bind_multi(provider: str, case: Case, st: InputSet, *, training: bool) -> Bound:
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
    """fp32 eager outputs on set ``st`` (base/merged: F.linear, merged with its own Wm;
    multi-adapter: float64, see :data:`ORACLE_MAX_ROWS`; QLoRA: float64 over deq(W0))."""
    if case.quant:
        from . import qlora
        return qlora.reference_outputs(case, st, provider)
    if case.dora or case.slices:
        from . import dora, serving
        return (dora if case.dora else serving).reference_outputs(case, st, provider)
    if case.multi:
        L = st.layers[0]
        with torch.no_grad():
            if provider == "base":
                return [F.linear(st.x.double(), L.W.double(), L.b.double() if L.b is not None else None)]
            return [_multi_reference(case, st, st.x.double(), L.A.double(), L.B.double())]
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
    """fp32 eager [dX, dA_0, dB_0, ...] for dropout 0 (base: [dX]; multi-adapter: float64,
    dA / dB the stacked [n, r_max, K] / [n, N, r_max], zero past each rank; QLoRA: float64)."""
    if case.quant:
        from . import qlora
        return qlora.reference_grads(case, st, provider)
    if case.dora:
        from . import dora
        return dora.reference_grads(case, st, provider)
    if case.multi:
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
