"""The case registry: every benchmark problem, by name, with its groups and goal tags.

A case is one problem (mode, M rows, in K -> out N, rank r, dtype, dropout, ...);
each provider in :mod:`bench.providers` that applies to it is measured on the
same random inputs. Names are stable and shell-friendly, e.g.::

    fwd-M8192-4096x4096-r16-bf16            forward (inference, no grad)
    bwd-M8192-4096x11008-r64-p0.1-bf16      backward alone (forward outside the timing)
    fwdbwd-M2048-11008x4096-r8-bf16         forward + backward (x requires grad, W frozen)
    saved-qkv-M8192-4096x4096-r16-p0.1-bf16 bytes saved for backward, q/k/v sharing x
    multi-fwd-M64-4096x4096-a64-r16-bf16    multi-adapter forward, 64 adapters
    multi-fwd-M64-4096x4096-a64-rmix8-16-64-bf16     ... ranks 8/16/64 in turn (stacked at r_max 64)
    multi-fwd-M64-4096x4096-a64-rmix8x56-64x8-bf16   ... 56 adapters of rank 8, 8 of rank 64
    multi-fwdbwd-M8192-4096x4096-a16-r16-bf16        multi-adapter forward + backward
    qlora-fwdbwd-M8192-4096x4096-r16-nf4dq-bf16      QLoRA: LoRA over a bitsandbytes NF4 weight
                                                     (double quant, blocksize 64), forward + backward
    dora-fwdbwd-M8192-4096x4096-r16-bf16             DoRA (weight-decomposed LoRA), forward + backward
    serving-fwd-M64-4096x6144-a64-r16-slices4096_1024_1024-bf16
                                                     serving delta only (lf.add_lora), packed q|k|v
    moe-fwdbwd-M4096-2048x768-e128k8-r16-bf16        one MoE experts block (Qwen3-MoE): 4096 tokens,
                                                     hidden 2048, expert intermediate 768, 128 experts, top-8

Groups: ``headline`` (one case per goal, the device script's run; the default),
``host`` (µs per call at 64 -> 64, r 8, 4 rows: :class:`HostCase`, goals H1-H7),
``sweep`` (the full grid), ``pytest`` (the few cases of bench/test_benchmarks.py),
``decode`` (M <= 64), ``prefill`` (M >= 2048), ``single``, ``multi``, ``qlora``, ``dora``,
``serving``, ``moe`` (with ``M1``..``M3``), the modes
``fwd``/``bwd``/``fwdbwd``/``saved``, and each goal id ``P1``..``P7c``.

Selection (``--cases``): comma-separated terms, united; a term is a group name or
an fnmatch pattern on names (``fwd-M8192-*``); ``a+b`` intersects (``sweep+decode``);
a leading ``-`` removes (``sweep,-multi``). Only removals: taken from ``headline``.

Multi-adapter cases (``adapters > 0``) run ``lf.multi_lora_linear``: stacked
lora_A [n, r_max, in], lora_B [n, out, r_max], one adapter id per row
(:func:`multi_adapter_ids`: contiguous blocks of rows per adapter, as a serving
batch of requests; with fewer rows than adapters, one row each). ``ranks``
gives the per-adapter ranks (empty: all r); ``base_rows`` rows get id -1 (base
only). Goals P5-P7c read them (see goals.py).

QLoRA cases (``quant``, e.g. ``"nf4dq"``: :func:`quant_spec`) quantize W0 with
bitsandbytes (``Linear4bit``, compute dtype = the case's dtype) and compare
lora-fused's ``LoRALinear4bit`` with PEFT's QLoRA layer; goals Q1-Q3.

DoRA cases (``dora``; bench/providers/dora.py) compare ``lf.DoRALinear`` with PEFT's DoRA
(``use_dora=True``) and with lora-fused's LoRA on the same weights; goals D1-D4 (D3 is
a CPU goal at fixed 1024 x 1024, M = 256, never scaled).

Serving cases (``slices``: the packed output widths, e.g. q|k|v; bench/providers/serving.py) time
only the delta ``y += s B_i (A_i x)`` that an engine adds after its own base GEMM:
``lf.add_lora`` over all slices in one call, three single-slice calls, the vLLM and
SGLang layout adapters (the free functions, and the engine objects ``engine`` /
``engine-sglang`` after their per-batch metadata call), and the base GEMM alone; goals S1-S3. They are multi-adapter
(``adapters``, one id per row as for ``multi`` cases) but in the ``serving`` group only.

MoE cases (``experts``: E, ``top_k``; bench/providers/moe.py) run one mixture-of-experts experts
block (transformers' ``Qwen3MoeExperts``: gate_up_proj [E, 2I, H], down_proj [E, H, I]) over M
tokens routed to ``top_k`` experts each, K = H the hidden size and N = I the expert intermediate
size, LoRA of rank r on both projections: M1 a training step, M2 decode, M3 prefill (groups
``M1``..``M3``); goals M-GPU, M-speed-CPU and M-memory (the last two CPU goals at the fixed
:data:`MOE_CPU_SHAPE`, never scaled).

This module imports no torch (``--list`` and the tests use it cheaply).
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Optional

DTYPE_NAMES = ("bf16", "fp16", "fp32")
ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
MODES = ("fwd", "bwd", "fwdbwd", "saved")

#: Llama-7B projections (in, out): attention, MLP up/gate, MLP down.
LLAMA7B_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
DECODE_M = (1, 16, 64)
PREFILL_M = (2048, 8192)
RANKS = (8, 16, 64, 128)
DROPOUTS = (0.0, 0.1)
ADAPTER_COUNTS = (1, 16, 64)
MIXED_RANKS = (8, 16, 64, 128)
#: Goal P7b's mixed-rank batch: ranks {8, 16, 64}, adapter i has GOAL_MIXED_RANKS[i % 3].
GOAL_MIXED_RANKS = (8, 16, 64)
#: "Most adapters small": rank 8, except every MOSTLY_SMALL_EVERY-th adapter at the largest rank.
MOSTLY_SMALL_EVERY = 8
HEADLINE_RANK = 16
#: The QLoRA goals' base: NF4 with double quantization (nested absmax), blocksize 64.
QLORA_QUANT = "nf4dq"
#: bitsandbytes' default 4-bit blocksize.
QLORA_BLOCKSIZE = 64
SCALING = 2.0  # lora_alpha = 2 r


@dataclass(frozen=True)
class Case:
    mode: str                    # fwd | bwd | fwdbwd | saved
    M: int                       # rows (tokens)
    K: int                       # in_features
    N: int                       # out_features
    r: int                       # rank (multi-adapter: the largest)
    dtype: str = "bf16"
    dropout: float = 0.0         # LoRA dropout (training modes; forward cases are inference)
    bias: bool = False
    projections: int = 1         # saved mode: projections sharing one input (q/k/v: 3)
    adapters: int = 0            # multi-adapter: distinct adapters (0: single-adapter case)
    ranks: tuple = ()            # multi-adapter: per-adapter ranks (empty: all r)
    base_rows: int = 0           # multi-adapter: rows with adapter id -1 (base layer only)
    quant: str = ""              # QLoRA: the 4-bit base weight's format (quant_spec), "" = full precision
    dora: bool = False           # DoRA: a magnitude vector over the LoRA layer (bench/providers/dora.py)
    slices: tuple = ()           # serving: packed output widths (sum = N), delta only (bench/providers/serving.py)
    experts: int = 0             # MoE: experts E of one experts block, K = hidden, N = expert intermediate
    top_k: int = 0               # MoE: experts per token (bench/providers/moe.py)
    scaling: float = SCALING
    goals: tuple = ()            # goal ids this case feeds
    groups: frozenset = field(default_factory=frozenset)
    full_shape: Optional[tuple] = None  # (M, K, N) before a CPU down-scaling, else None

    # -- identity -------------------------------------------------------------
    @property
    def multi(self) -> bool:
        return self.adapters > 0

    @property
    def name(self) -> str:
        parts = []
        if self.experts:
            parts.append("moe")
        if self.slices:
            parts.append("serving")
        elif self.multi:
            parts.append("multi")
        if self.quant:
            parts.append("qlora")
        if self.dora:
            parts.append("dora")
        parts.append(self.mode)
        if self.projections == 3:
            parts.append("qkv")
        elif self.projections > 1:
            parts.append(f"x{self.projections}")
        parts += [f"M{self.M}", f"{self.K}x{self.N}"]
        if self.multi:
            parts.append(f"a{self.adapters}")
        if self.experts:
            parts.append(f"e{self.experts}k{self.top_k}")
        if self.ranks and len(set(self.ranks)) > 1:
            parts.append(_rmix_label(self.ranks))
        else:
            parts.append(f"r{self.r}")
        if self.slices:
            parts.append("slices" + "_".join(str(w) for w in self.slices))
        if self.base_rows:
            parts.append(f"base{self.base_rows}")
        if self.dropout:
            parts.append(f"p{self.dropout:g}")
        if self.bias:
            parts.append("bias")
        if self.quant:
            parts.append(self.quant)
        parts.append(self.dtype)
        return "-".join(parts)

    def __str__(self) -> str:
        return self.name

    @property
    def training(self) -> bool:
        return self.mode in ("bwd", "fwdbwd", "saved")

    @property
    def timed(self) -> bool:
        return self.mode != "saved"

    @property
    def adapter_ranks(self) -> tuple:
        return tuple(self.ranks) if self.ranks else (self.r,) * max(self.adapters, 1)

    @property
    def mixed_ranks(self) -> bool:
        return len(set(self.adapter_ranks)) > 1

    def adapter_ids(self) -> list:
        """The adapter id of every row (multi-adapter cases; -1 = base only)."""
        return multi_adapter_ids(self.M, self.adapters, self.base_rows)

    def config(self) -> dict:
        """The case as plain data (JSON rows)."""
        d = asdict(self)
        d["groups"] = sorted(self.groups)
        d["goals"] = list(self.goals)
        d["ranks"] = list(self.ranks)
        d["name"] = self.name
        return d

    # -- work -----------------------------------------------------------------
    def flops_bytes(self) -> tuple[float, float]:
        """FLOPs and bytes of the LoRA layer's work, counted once for every provider
        (TFLOP/s and GB/s are useful work per second; see :func:`forward_flops_bytes`)."""
        es = ELEMENT_SIZE[self.dtype]
        if self.experts:
            return moe_flops_bytes(self.M, self.K, self.N, self.experts, self.top_k, self.r, es,
                                   training=self.training)
        if self.slices:
            return serving_flops_bytes(self.M, self.K, self.slices, self.r, es, self.adapter_ids())
        if self.multi:
            ids = self.adapter_ids()
            f_fwd, b_fwd = multi_forward_flops_bytes(self.M, self.K, self.N, self.adapter_ranks, es,
                                                     self.bias, ids=ids)
        else:
            f_fwd, b_fwd = forward_flops_bytes(self.M, self.K, self.N, self.r, es, self.bias)
        if self.quant:  # W0 is read as 4-bit codes + absmax, once forward and once backward
            w_less = es * self.K * self.N - quant_weight_bytes(self.N, self.K, self.quant)
            b_fwd -= w_less
        # DoRA's norm: W0 Aᵀ [N, r] (one more read of W0 and 2NKr flops) once per call
        f_norm, b_norm = (2 * self.N * self.K * self.r, es * self.N * self.K) if self.dora else (0, 0)
        f_fwd, b_fwd = f_fwd + f_norm, b_fwd + b_norm
        if self.mode == "fwd":
            return f_fwd, b_fwd
        if self.multi:
            f_tr, b_tr = multi_train_flops_bytes(self.M, self.K, self.N, self.adapter_ranks, es, self.bias,
                                                 ids=ids)
        else:
            f_tr, b_tr = train_flops_bytes(self.M, self.K, self.N, self.r, es, self.bias)
            if self.quant:
                b_tr -= 2 * w_less
            f_tr, b_tr = f_tr + f_norm, b_tr + b_norm
        if self.mode == "fwdbwd":
            return f_tr, b_tr
        if self.mode == "bwd":
            return f_tr - f_fwd, b_tr - b_fwd
        return 0.0, 0.0  # saved: not timed


def quant_spec(quant: str) -> tuple[str, bool, int]:
    """(bitsandbytes quant_type, double quantization, blocksize) of a case's ``quant`` label:
    ``nf4`` / ``fp4``, ``dq`` suffix = nested absmax (``compress_statistics``), blocksize 64."""
    kind, nested = (quant[:-2], True) if quant.endswith("dq") else (quant, False)
    if kind not in ("nf4", "fp4"):
        raise ValueError(f"unknown quant {quant!r}: nf4, fp4, with 'dq' for double quantization")
    return kind, nested, QLORA_BLOCKSIZE


def quant_weight_bytes(N: int, K: int, quant: str) -> float:
    """Bytes of a 4-bit N x K weight: NK/2 codes + one absmax per block (uint8 nested, else fp32)."""
    _, nested, blocksize = quant_spec(quant)
    return N * K / 2 + (N * K / blocksize) * (1 if nested else 4)


def serving_flops_bytes(T, K, slices, r, es, ids) -> tuple[float, float]:
    """The delta alone over S packed slices: flops 2TKrS (shrink) + 2T·out·r (expand); bytes
    es*(used adapters * (S r K + out r) + TK x + 2 T out: y read and written) -- the byte floor
    of goal S1 (each used adapter's A and B read once)."""
    S, out = len(slices), sum(slices)
    used = len({i for i in ids if i >= 0})
    flops = 2 * T * K * r * S + 2 * T * out * r
    nbytes = es * (used * (S * r * K + out * r) + T * K + 2 * T * out)
    return float(flops), float(nbytes)


def moe_flops_bytes(T, H, I, E, k, r, es, *, training: bool) -> tuple[float, float]:
    """One experts block over T tokens, P = T·k (token, expert) pairs, each through gate_up
    (H -> 2I) then down (I -> H), LoRA rank r on both. Forward: flops 2P·3HI (base) +
    2P·r(3H + 3I) (shrink and expand of both projections); bytes es*(TH x + 3EHI every expert's W
    + Er(3H + 3I) every expert's A and B + P(2I + I + H) the pairs' gate_up, gated and down
    outputs + TH y). Training adds dX through both projections (2P·3HI, no dW) and the LoRA
    backward (4P·r(3H + 3I)); bytes: dY, W again, A and B again with dA and dB, the pairs'
    intermediates read again with their gradients, dX (counted as :func:`train_flops_bytes` does)."""
    P = T * k
    base, lora = 2 * P * 3 * H * I, 2 * P * r * (3 * H + 3 * I)
    weights, factors, pairs = 3 * E * H * I, E * r * (3 * H + 3 * I), P * (2 * I + I + H)
    flops, nbytes = base + lora, es * (2 * T * H + weights + factors + pairs)
    if training:
        flops += base + 2 * lora
        nbytes += es * (2 * T * H + weights + 3 * factors + 2 * pairs)
    return float(flops), float(nbytes)


def forward_flops_bytes(M, K, N, r, es, bias=False) -> tuple[float, float]:
    """flops 2MNK + 2MKr + 2MNr; bytes es*(MK x + NK W + rK A + Nr B + MN y + Mr S [+ N b])."""
    flops = 2 * M * N * K + 2 * M * K * r + 2 * M * N * r
    nbytes = es * (M * K + N * K + r * K + N * r + M * N + M * r + (N if bias else 0))
    return float(flops), float(nbytes)


def train_flops_bytes(M, K, N, r, es, bias=False) -> tuple[float, float]:
    """forward + backward (dX = dY W0 + dS A, dA, dB; no dW0):
    flops 4MNK + 6MKr + 6MNr; bytes forward + es*(MN dY + NK W + MK x + MK dX + 2(rK + Nr) A,B
    + 2(rK + Nr) dA,dB + 2Mr S,dS) - the backward re-reads A and B once for dS/dX and once
    for the gradients' shapes; counted as in the original layer benchmark."""
    f_fwd, b_fwd = forward_flops_bytes(M, K, N, r, es, bias)
    flops = f_fwd + 2 * M * N * K + 4 * M * N * r + 4 * M * K * r
    nbytes = b_fwd + es * (M * N + N * K + 2 * M * K + 2 * (r * K + N * r) + 2 * M * r)
    return float(flops), float(nbytes)


def _rmix_label(ranks) -> str:
    """``rmix8-16-64`` when the ranks take turns (counts within one of each other), else with
    the counts: ``rmix8x56-64x8``."""
    counts: dict = {}
    for r in ranks:
        counts[r] = counts.get(r, 0) + 1
    keys = sorted(counts)
    if max(counts.values()) - min(counts.values()) <= 1:
        return "rmix" + "-".join(str(r) for r in keys)
    return "rmix" + "-".join(f"{r}x{counts[r]}" for r in keys)


def multi_adapter_ids(M: int, n: int, base_rows: int = 0) -> list:
    """Adapter id per row: M >= n: contiguous blocks (row t -> t*n // M: requests of a serving
    batch, each its own adapter); M < n: row t -> adapter t. Then ``base_rows`` rows spread
    evenly (every M // base_rows-th, from the last) get -1 (base layer only)."""
    ids = [t * n // M for t in range(M)] if M >= n else list(range(M))
    if base_rows > 0:
        step = max(M // base_rows, 1)
        for j in range(min(base_rows, M)):
            ids[M - 1 - j * step] = -1
    return ids


def _rows_per_adapter(M: int, n: int, ids=None) -> dict:
    counts: dict = {}
    for i in (ids if ids is not None else multi_adapter_ids(M, n)):
        if i >= 0:
            counts[i] = counts.get(i, 0) + 1
    return counts


def multi_forward_flops_bytes(M, K, N, ranks, es, bias=False, ids=None) -> tuple[float, float]:
    """Rows as :func:`multi_adapter_ids` assigns them (or ``ids``), adapter a with m_a rows and
    rank r_a: flops 2MNK + sum_a 2 m_a (K+N) r_a; bytes es*(MK x + NK W + MN y + sum over
    used adapters (K+N) r_a [+ N b] + sum_a m_a r_a S) + 4M (row ids / plan)."""
    rows = _rows_per_adapter(M, len(ranks), ids)
    flops = 2 * M * N * K + sum(2 * m * (K + N) * ranks[a] for a, m in rows.items())
    lora_w = sum((K + N) * ranks[a] for a in rows)
    shrink = sum(m * ranks[a] for a, m in rows.items())
    nbytes = es * (M * K + N * K + M * N + lora_w + shrink + (N if bias else 0)) + 4 * M
    return float(flops), float(nbytes)


def multi_train_flops_bytes(M, K, N, ranks, es, bias=False, ids=None) -> tuple[float, float]:
    """forward + backward (dX = dY W0 + dS_a A_a, dA_a, dB_a per adapter over its rows; no dW0),
    the single-adapter count per adapter: flops forward + 2MNK + sum_a 4 m_a (K+N) r_a;
    bytes forward + es*(MN dY + NK W + 2MK x,dX + 2 sum_used (K+N) r_a A,B and dA,dB
    + 2 sum_a m_a r_a S,dS)."""
    f_fwd, b_fwd = multi_forward_flops_bytes(M, K, N, ranks, es, bias, ids)
    rows = _rows_per_adapter(M, len(ranks), ids)
    lora_w = sum((K + N) * ranks[a] for a in rows)
    shrink = sum(m * ranks[a] for a, m in rows.items())
    flops = f_fwd + 2 * M * N * K + sum(4 * m * (K + N) * ranks[a] for a, m in rows.items())
    nbytes = b_fwd + es * (M * N + N * K + 2 * M * K + 2 * lora_w + 2 * shrink)
    return float(flops), float(nbytes)


# --------------------------------------------------------------------------
# Scaling for CPU runs (the torch paths on small shapes prove the harness)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    """Maps the GPU problem sizes to smaller ones (identity on a GPU)."""
    dims: tuple = ()   # ((4096, 512), ...)
    rows: tuple = ()   # ((8192, 512), ...)
    label: str = "full"
    experts: tuple = ()  # ((128, 16),): MoE expert counts

    def dim(self, d: int) -> int:
        return dict(self.dims).get(d, d)

    def m(self, m: int) -> int:
        return dict(self.rows).get(m, m)

    def e(self, n: int) -> int:
        return dict(self.experts).get(n, n)


FULL = Scale()
#: CPU: in/out / 8 (4096 -> 512, 11008 -> 1376; MoE hidden 2048 -> 256, intermediate 768 -> 96),
#: prefill rows 2048 -> 256, 4096 and 8192 -> 512, MoE experts 128 -> 16.
CPU_SMALL = Scale(dims=((4096, 512), (11008, 1376), (2048, 256), (768, 96)),
                  rows=((2048, 256), (4096, 512), (8192, 512)), label="cpu-small", experts=((128, 16),))


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------
def _mk(scale: Scale, dtype: str, mode: str, M: int, K: int, N: int, r: int, *, groups=(), goals=(),
        **kw) -> Case:
    sM, sK, sN = scale.m(M), scale.dim(K), scale.dim(N)
    kind = ("serving" if kw.get("slices") else "multi" if kw.get("adapters") else "moe" if kw.get("experts")
            else "single")
    g = set(groups) | {mode, kind} | set(goals)
    if kw.get("quant"):
        g.add("qlora")
    if kw.get("dora"):
        g.add("dora")
    if M <= 64:
        g.add("decode")
    if M >= 2048:
        g.add("prefill")
    full = (M, K, N) if (sM, sK, sN) != (M, K, N) else None
    return Case(mode=mode, M=sM, K=sK, N=sN, r=r, dtype=dtype, goals=tuple(goals),
                groups=frozenset(g), full_shape=full, **kw)


def headline_cases(scale: Scale, dtype: str, rank: int = HEADLINE_RANK) -> list[Case]:
    """One case per goal, then two cases as information, H200-sized: Llama-7B attention
    projection 4096 -> 4096, r = 16, bf16. Multi-adapter: decode 64 rows
    each with its own adapter (P5, P6); prefill 8192 rows over 16 adapters (P7); the decode
    batch with ranks {8, 16, 64} in turn (P7b), with most adapters at rank 8 (P7c), and the
    same rows and adapters all at rank 64 (their denominator: "padded to 64"). Information
    (no goal; last): backward alone, and multi-adapter forward + backward over 16 adapters
    (the op trains)."""
    K = N = 4096
    hl = ("headline",)
    r_pad = max(GOAL_MIXED_RANKS)
    n_dec = 64
    mixed = tuple(GOAL_MIXED_RANKS[i % len(GOAL_MIXED_RANKS)] for i in range(n_dec))
    mostly_small = tuple(r_pad if i % MOSTLY_SMALL_EVERY == MOSTLY_SMALL_EVERY - 1 else min(GOAL_MIXED_RANKS)
                         for i in range(n_dec))
    cases = [
        _mk(scale, dtype, "fwd", 8192, K, N, rank, groups=hl + ("pytest",), goals=("P1", "F1")),
        _mk(scale, dtype, "fwd", 1, K, N, rank, groups=hl, goals=("P2", "F1")),
        _mk(scale, dtype, "fwd", 16, K, N, rank, groups=hl + ("pytest",), goals=("P2", "F1")),
        _mk(scale, dtype, "fwdbwd", 8192, K, N, rank, groups=hl + ("pytest",), goals=("P3", "P3b", "F1")),
        _mk(scale, dtype, "fwdbwd", 8192, K, N, rank, dropout=0.1, groups=hl, goals=("P3", "P3b", "F1")),
        _mk(scale, dtype, "saved", 8192, K, N, rank, dropout=0.1, projections=3, groups=hl, goals=("P4",)),
        _mk(scale, dtype, "fwd", 64, K, N, rank, adapters=n_dec, groups=hl + ("pytest",), goals=("P5", "P6")),
        _mk(scale, dtype, "fwd", 8192, K, N, rank, adapters=16, groups=hl, goals=("P7",)),
        _mk(scale, dtype, "fwd", 64, K, N, r_pad, adapters=n_dec, ranks=mixed, groups=hl, goals=("P7b",)),
        _mk(scale, dtype, "fwd", 64, K, N, r_pad, adapters=n_dec, ranks=mostly_small, groups=hl,
            goals=("P7c",)),
        _mk(scale, dtype, "fwd", 64, K, N, r_pad, adapters=n_dec, groups=hl, goals=("P7b", "P7c")),
        # QLoRA: NF4 + double quant, fwd+bwd at 8192 rows (Q1), decode (Q2), peak memory (Q3)
        *qlora_cases(scale, dtype, rank, groups=hl),
        # DoRA: fwd+bwd at 8192 rows (D1, D2, D4) and the CPU goal's 1024², M = 256 (D3)
        *dora_cases(scale, dtype, rank, groups=hl),
        # serving delta: packed q|k|v decode (S1, S2) and prefill over 16 adapters (S3)
        *serving_cases(scale, dtype, rank, groups=hl),
        # one MoE experts block: the training step (M-GPU) and the CPU goals' block (M-speed-CPU, M-memory)
        *moe_cases(scale, dtype, rank, groups=hl)[:2],
        # information, no goal; last, so that a time budget cuts these first
        _mk(scale, dtype, "bwd", 8192, K, N, rank, groups=hl + ("pytest",)),
        _mk(scale, dtype, "fwdbwd", 8192, K, N, rank, adapters=16, groups=hl),
        *moe_cases(scale, dtype, rank, groups=hl)[2:],
    ]
    return cases


def qlora_cases(scale: Scale, dtype: str, rank: int = HEADLINE_RANK, groups=()) -> list[Case]:
    """QLoRA, 4096 -> 4096 over an NF4 double-quantized W0 (:data:`QLORA_QUANT`): forward +
    backward at M = 8192 (goals Q1, Q3) and decode forwards at M = 1 and 16 (Q2, Q3)."""
    K = N = 4096
    q = dict(quant=QLORA_QUANT, groups=groups)
    return [
        _mk(scale, dtype, "fwdbwd", 8192, K, N, rank, goals=("Q1", "Q3"), **q),
        _mk(scale, dtype, "fwd", 1, K, N, rank, goals=("Q2", "Q3"), **q),
        _mk(scale, dtype, "fwd", 16, K, N, rank, goals=("Q2", "Q3"), **q),
    ]


#: Goal D3 (a CPU goal): DoRA's training step at 1024 x 1024, M = 256 (never scaled).
DORA_CPU_SHAPE = (256, 1024, 1024)


def dora_cases(scale: Scale, dtype: str, rank: int = HEADLINE_RANK, groups=()) -> list[Case]:
    """DoRA forward + backward, 4096 -> 4096 at M = 8192 (goals D1, D2, D4; scaled on a CPU)
    and at :data:`DORA_CPU_SHAPE` (D3, a CPU goal: the same shape on every device)."""
    M, K, N = DORA_CPU_SHAPE
    return [
        _mk(scale, dtype, "fwdbwd", 8192, 4096, 4096, rank, dora=True, goals=("D1", "D2", "D4"), groups=groups),
        _mk(FULL, dtype, "fwdbwd", M, K, N, rank, dora=True, goals=("D3",), groups=groups),
    ]


#: The serving goals' packed projection: q|k|v of Llama-3-8B-like GQA, 4096 -> 4096 + 1024 + 1024.
SERVING_SLICES = (4096, 1024, 1024)


def serving_cases(scale: Scale, dtype: str, rank: int = HEADLINE_RANK, groups=()) -> list[Case]:
    """The serving delta over packed q|k|v (:data:`SERVING_SLICES`, from 4096): decode T = 64,
    a row per adapter, 64 adapters (S1, S2) and prefill T = 8192 over 16 adapters (S3). On a
    CPU every width shrinks as in/out do (4096 -> 512: slices 512 | 128 | 128)."""
    K = 4096
    sK = scale.dim(K)
    sl = tuple(w * sK // K for w in SERVING_SLICES)
    out = []
    for T, n, goals in ((64, 64, ("S1", "S2")), (8192, 16, ("S3",))):
        c = _mk(scale, dtype, "fwd", T, K, sum(SERVING_SLICES), rank, adapters=n, slices=sl, goals=goals,
                groups=groups)
        full = (T, K, sum(SERVING_SLICES)) if (c.M, sK, sum(sl)) != (T, K, sum(SERVING_SLICES)) else None
        out.append(replace(c, N=sum(sl), full_shape=full))
    return out


#: The MoE cases' experts block, Qwen3-30B-A3B-like: (hidden H, expert intermediate I, experts E, top-k).
MOE_BLOCK = (2048, 768, 128, 8)
#: Tokens of M1 (training step), M2 (decode) and M3 (prefill).
MOE_TOKENS = {"M1": 4096, "M2": 64, "M3": 4096}
#: Goals M-speed-CPU and M-memory (CPU goals): the block (T tokens, H, I, E, top-k), never scaled.
MOE_CPU_SHAPE = (512, 512, 256, 64, 8)


def moe_cases(scale: Scale, dtype: str, rank: int = HEADLINE_RANK, groups=()) -> list[Case]:
    """One MoE experts block (:data:`MOE_BLOCK`, E and the dims scaled on a CPU): M1 forward +
    backward at 4096 tokens (goal M-GPU), the CPU goals' training step at :data:`MOE_CPU_SHAPE`
    (M-speed-CPU, M-memory; the same shape on every device), then M2 decode (64 tokens) and M3
    prefill (4096), inference, no goal."""
    H, I, E, k = MOE_BLOCK
    T, cH, cI, cE, ck = MOE_CPU_SHAPE

    def moe(sc, mode, tag, T, H, I, E, k, goals=()):
        return _mk(sc, dtype, mode, T, H, I, rank, experts=sc.e(E), top_k=k, goals=goals,
                   groups=tuple(groups) + (tag,))
    return [
        moe(scale, "fwdbwd", "M1", MOE_TOKENS["M1"], H, I, E, k, goals=("M-GPU",)),
        moe(FULL, "fwdbwd", "M1", T, cH, cI, cE, ck, goals=("M-speed-CPU", "M-memory")),
        moe(scale, "fwd", "M2", MOE_TOKENS["M2"], H, I, E, k),
        moe(scale, "fwd", "M3", MOE_TOKENS["M3"], H, I, E, k),
    ]


def sweep_cases(scale: Scale, dtype: str) -> list[Case]:
    """The full grid: M 1..8192 x Llama-7B shapes x r {8,16,64,128}; dropout {0, 0.1} for
    the training modes; saved bytes of q/k/v triples; multi-adapter 1/16/64 adapters at r 16
    and mixed ranks 8/16/64/128 (forward), forward + backward at r 16."""
    sw = ("sweep",)
    out = []
    for K, N in LLAMA7B_SHAPES:
        for r in RANKS:
            for M in DECODE_M + PREFILL_M:
                out.append(_mk(scale, dtype, "fwd", M, K, N, r, groups=sw))
            for p in DROPOUTS:
                for M in DECODE_M + PREFILL_M:
                    out.append(_mk(scale, dtype, "fwdbwd", M, K, N, r, dropout=p, groups=sw))
                    out.append(_mk(scale, dtype, "bwd", M, K, N, r, dropout=p, groups=sw))
                out.append(_mk(scale, dtype, "saved", 8192, K, N, r, dropout=p, projections=3, groups=sw))
    K = N = 4096
    for M in (64, 8192):
        for n in ADAPTER_COUNTS:
            out.append(_mk(scale, dtype, "fwd", M, K, N, HEADLINE_RANK, adapters=n, groups=sw))
            if n > 1:
                ranks = tuple(MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(n))
                out.append(_mk(scale, dtype, "fwd", M, K, N, max(ranks), adapters=n, ranks=ranks, groups=sw))
                out.append(_mk(scale, dtype, "fwdbwd", M, K, N, HEADLINE_RANK, adapters=n, groups=sw))
    return out


# --------------------------------------------------------------------------
# Host-time cases (goals H1-H7): microseconds per call where compute is negligible
# --------------------------------------------------------------------------
#: The host cases' problem: 64 -> 64, rank 8, 4 rows, fp32 (compute is a few hundred ns,
#: so a call's time is its Python, dispatch and launch overhead); 8 adapters for multi.
HOST_M, HOST_K, HOST_N, HOST_R, HOST_ADAPTERS = 4, 64, 64, 8, 8
#: The tiny Llama of the training-step case: the demo's CPU model, batch 4 x 32, all-linear r 16.
HOST_LLAMA_BATCH, HOST_LLAMA_SEQ, HOST_LLAMA_RANK = 4, 32, 16


@dataclass(frozen=True)
class HostCase:
    """One host-time problem: ``subject`` against its ``providers`` (the first, ``eager``,
    is the baseline every ratio divides by), timed in interleaved rounds (bench/host.py).

    ``triton``: lora-fused's Triton path with every kernel launch replaced by a no-op, so
    the Python work around the launches is timed alone (on a CPU: through the interpreter's
    kernel objects in a child process with ``TRITON_INTERPRET=1``); ``ops`` custom-op calls
    per call (the goal is per op)."""
    subject: str                 # e.g. "lora_linear-fwd"
    providers: tuple             # baseline first
    goals: tuple = ()
    grad: bool = False           # autograd on (fwd+bwd, training step) or no_grad
    dropout: float = 0.0
    triton: bool = False
    ops: int = 1
    adapters: int = 0
    what: str = ""
    mode: str = "host"
    dtype: str = "fp32"
    M: int = HOST_M
    K: int = HOST_K
    N: int = HOST_N
    r: int = HOST_R
    projections: int = 1
    groups: frozenset = frozenset({"host"})
    full_shape: Optional[tuple] = None

    @property
    def name(self) -> str:
        return "host-" + ("triton-" if self.triton else "") + self.subject + (
            f"-p{self.dropout:g}" if self.dropout else "")

    def __str__(self) -> str:
        return self.name

    multi = False                # not a multi-adapter Case: the host runner builds its own inputs
    timed = True

    @property
    def training(self) -> bool:
        return self.grad

    def config(self) -> dict:
        d = asdict(self)
        d["groups"] = sorted(self.groups)
        d["name"] = self.name
        return d

    def flops_bytes(self) -> tuple[float, float]:
        return 0.0, 0.0  # host time is the subject: no roofline


def host_cases() -> list[HostCase]:
    """The calls of goals H1-H7 at 64 -> 64, r 8, 4 rows, each beside eager LoRA
    (``F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)``) and PEFT where PEFT has it;
    goals H1-H7 (bench/goals.py)."""
    E, F_, P = "eager", "fused", "peft"
    multi = dict(adapters=HOST_ADAPTERS)
    cases = [
        HostCase("lora_linear-fwd", (E, F_), ("H1",), what="lf.lora_linear forward, no grad"),
        HostCase("LoRALinear-fwd", (E, F_, P), ("H2",), what="LoRALinear forward, eval, no grad"),
        HostCase("LoRALinear-fwdbwd", (E, F_, P), ("H3",), grad=True, what="LoRALinear forward+backward"),
        HostCase("LoRALinear-fwdbwd", (E, F_, P), ("H3",), grad=True, dropout=0.1,
                 what="LoRALinear forward+backward, dropout 0.1 (eager: F.dropout first)"),
        HostCase("multi_lora_linear-plan", (E, F_), ("H4",), what="lf.multi_lora_linear, prebuilt plan, "
                 f"{HOST_ADAPTERS} adapters, no grad (eager: one adapter)", **multi),
        HostCase("MultiLoRALinear-adapter_batch", (E, F_, "peft-mixed"), ("H5",),
                 what=f"MultiLoRALinear inside adapter_batch, {HOST_ADAPTERS} adapters, no grad "
                      "(eager: one adapter)", **multi),
    ]
    # H6 at PEFT's default lora_dropout (0) and at the demo's (0.05): dropout costs lora-fused's
    # layer a second mask draw in the backward (it saves the seed, never the mask).
    cases += [
        HostCase("llama-step", (E, F_, P), ("H6",), grad=True, M=HOST_LLAMA_BATCH * HOST_LLAMA_SEQ,
                 K=0, N=0, r=HOST_LLAMA_RANK, dropout=p,
                 what=f"tiny Llama training step (2 layers, all-linear r {HOST_LLAMA_RANK}, "
                      f"batch {HOST_LLAMA_BATCH}x{HOST_LLAMA_SEQ}, dropout {p:g}, SGD)")
        for p in (0.0, 0.05)
    ]
    noop = "fused-noop"
    cases += [
        HostCase("lora_linear-fwd", (E, F_, noop), ("H7",), triton=True, what="lf.lora_linear forward"),
        HostCase("LoRALinear-fwdbwd", (E, F_, noop), ("H7",), triton=True, grad=True, ops=2,
                 what="LoRALinear forward+backward (2 ops)"),
        HostCase("multi_lora_linear-plan", (E, F_, noop), ("H7",), triton=True,
                 what="lf.multi_lora_linear, prebuilt plan", **multi),
        HostCase("MultiLoRALinear-adapter_batch", (E, F_, noop), ("H7",), triton=True,
                 what="MultiLoRALinear inside adapter_batch", **multi),
    ]
    return cases


def registry(scale: Scale = FULL, dtypes: Iterable[str] = ("bf16",), rank: int = HEADLINE_RANK) -> list:
    """Every case, each name once (a headline case that is also in the sweep carries both
    groups and its goal tags). Order: headline first, then the sweep, then the host cases
    (fixed tiny shapes: no scale, no dtype)."""
    by_name: dict[str, Case] = {}
    for dtype in dtypes:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; one of {DTYPE_NAMES}")
        for case in headline_cases(scale, dtype, rank) + sweep_cases(scale, dtype):
            old = by_name.get(case.name)
            if old is None:
                by_name[case.name] = case
            else:
                by_name[case.name] = replace(old, groups=old.groups | case.groups,
                                             goals=tuple(dict.fromkeys(old.goals + case.goals)))
    return list(by_name.values()) + host_cases()


def all_groups(cases: Iterable[Case]) -> list[str]:
    return sorted({g for c in cases for g in c.groups})


def _term_matches(term: str, case: Case) -> bool:
    return all(part in case.groups or fnmatch.fnmatchcase(case.name, part)
               for part in term.split("+") if part)


def select(cases: list[Case], spec: str = "headline") -> list[Case]:
    """Cases chosen by ``spec`` (see the module docstring), in registry order."""
    terms = [t.strip() for t in (spec or "headline").split(",") if t.strip()]
    plus = [t for t in terms if not t.startswith("-")]
    minus = [t[1:] for t in terms if t.startswith("-")]
    if not plus:
        plus = ["headline"]
    known = set(all_groups(cases))
    for term in plus + minus:
        for part in term.split("+"):
            if part and part not in known and not any(fnmatch.fnmatchcase(c.name, part) for c in cases):
                raise ValueError(f"--cases: {part!r} matches no group or case name "
                                 f"(groups: {', '.join(sorted(known))})")
    chosen = [c for c in cases if any(_term_matches(t, c) for t in plus)]
    return [c for c in chosen if not any(_term_matches(t, c) for t in minus)]
