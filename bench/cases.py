"""The case registry: every benchmark problem, by name, with its groups and goal tags.

A case is one problem (mode, M rows, in K -> out N, rank r, dtype, dropout, ...);
each provider in :mod:`bench.providers` that applies to it is measured on the
same random inputs. Names are stable and shell-friendly, e.g.::

    fwd-M8192-4096x4096-r16-bf16            forward (inference, no grad)
    bwd-M8192-4096x11008-r64-p0.1-bf16      backward alone (forward outside the timing)
    fwdbwd-M2048-11008x4096-r8-bf16         forward + backward (x requires grad, W frozen)
    saved-qkv-M8192-4096x4096-r16-p0.1-bf16 bytes saved for backward, q/k/v sharing x
    multi-fwd-M64-4096x4096-a64-r16-bf16    multi-adapter forward, 64 adapters
    multi-fwd-M8192-4096x4096-a16-rmix8-128-bf16   ... mixed ranks 8/16/64/128

Groups: ``headline`` (one case per goal, the device script's run; the default),
``sweep`` (the full grid), ``pytest`` (the few cases of bench/test_benchmarks.py),
``decode`` (M <= 64), ``prefill`` (M >= 2048), ``single``, ``multi``, the modes
``fwd``/``bwd``/``fwdbwd``/``saved``, and each goal id ``P1``..``P7``.

Selection (``--cases``): comma-separated terms, united; a term is a group name or
an fnmatch pattern on names (``fwd-M8192-*``); ``a+b`` intersects (``sweep+decode``);
a leading ``-`` removes (``sweep,-multi``). Only removals: taken from ``headline``.

Multi-adapter cases (P5-P7) are registered now so that ``lf.multi_lora_linear``
slots in later: until it exists their rows and goals read
"n/a (multi_lora_linear not built yet)".

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
HEADLINE_RANK = 16
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
        if self.multi:
            parts.append("multi")
        parts.append(self.mode)
        if self.projections == 3:
            parts.append("qkv")
        elif self.projections > 1:
            parts.append(f"x{self.projections}")
        parts += [f"M{self.M}", f"{self.K}x{self.N}"]
        if self.multi:
            parts.append(f"a{self.adapters}")
        if self.ranks and len(set(self.ranks)) > 1:
            parts.append(f"rmix{min(self.ranks)}-{max(self.ranks)}")
        else:
            parts.append(f"r{self.r}")
        if self.dropout:
            parts.append(f"p{self.dropout:g}")
        if self.bias:
            parts.append("bias")
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
        if self.multi:
            return multi_forward_flops_bytes(self.M, self.K, self.N, self.adapter_ranks, es, self.bias)
        f_fwd, b_fwd = forward_flops_bytes(self.M, self.K, self.N, self.r, es, self.bias)
        if self.mode == "fwd":
            return f_fwd, b_fwd
        f_tr, b_tr = train_flops_bytes(self.M, self.K, self.N, self.r, es, self.bias)
        if self.mode == "fwdbwd":
            return f_tr, b_tr
        if self.mode == "bwd":
            return f_tr - f_fwd, b_tr - b_fwd
        return 0.0, 0.0  # saved: not timed


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


def multi_forward_flops_bytes(M, K, N, ranks, es, bias=False) -> tuple[float, float]:
    """Rows spread evenly over the adapters: flops 2MNK + sum_rows 2(K+N) r_a; bytes
    es*(MK + NK + MN + sum over used adapters (K+N) r_a + M ids/int32 ~ 4M)."""
    n = len(ranks)
    used = ranks[:min(n, M)]
    rows_per = M / max(len(used), 1)
    flops = 2 * M * N * K + sum(2 * (K + N) * r * rows_per for r in used)
    nbytes = es * (M * K + N * K + M * N + sum((K + N) * r for r in used) + (N if bias else 0)) + 4 * M
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

    def dim(self, d: int) -> int:
        return dict(self.dims).get(d, d)

    def m(self, m: int) -> int:
        return dict(self.rows).get(m, m)


FULL = Scale()
#: CPU: in/out / 8 (4096 -> 512, 11008 -> 1376), prefill rows 2048 -> 256, 8192 -> 512.
CPU_SMALL = Scale(dims=((4096, 512), (11008, 1376)), rows=((2048, 256), (8192, 512)), label="cpu-small")


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------
def _mk(scale: Scale, dtype: str, mode: str, M: int, K: int, N: int, r: int, *, groups=(), goals=(),
        **kw) -> Case:
    sM, sK, sN = scale.m(M), scale.dim(K), scale.dim(N)
    g = set(groups) | {mode, "multi" if kw.get("adapters") else "single"} | set(goals)
    if M <= 64:
        g.add("decode")
    if M >= 2048:
        g.add("prefill")
    full = (M, K, N) if (sM, sK, sN) != (M, K, N) else None
    return Case(mode=mode, M=sM, K=sK, N=sN, r=r, dtype=dtype, goals=tuple(goals),
                groups=frozenset(g), full_shape=full, **kw)


def headline_cases(scale: Scale, dtype: str, rank: int = HEADLINE_RANK) -> list[Case]:
    """One case per goal (and one backward-alone case as information), H200-sized:
    Llama-7B attention projection 4096 -> 4096, r = 16, bf16."""
    K = N = 4096
    hl = ("headline",)
    cases = [
        _mk(scale, dtype, "fwd", 8192, K, N, rank, groups=hl + ("pytest",), goals=("P1",)),
        _mk(scale, dtype, "fwd", 1, K, N, rank, groups=hl, goals=("P2",)),
        _mk(scale, dtype, "fwd", 16, K, N, rank, groups=hl + ("pytest",), goals=("P2",)),
        _mk(scale, dtype, "fwdbwd", 8192, K, N, rank, groups=hl + ("pytest",), goals=("P3", "P3b")),
        _mk(scale, dtype, "fwdbwd", 8192, K, N, rank, dropout=0.1, groups=hl, goals=("P3", "P3b")),
        _mk(scale, dtype, "saved", 8192, K, N, rank, dropout=0.1, projections=3, groups=hl, goals=("P4",)),
        _mk(scale, dtype, "bwd", 8192, K, N, rank, groups=hl + ("pytest",)),  # information, no goal
        _mk(scale, dtype, "fwd", 64, K, N, rank, adapters=64, groups=hl, goals=("P5", "P6")),
        _mk(scale, dtype, "fwd", 8192, K, N, rank, adapters=16, groups=hl, goals=("P7",)),
    ]
    return cases


def sweep_cases(scale: Scale, dtype: str) -> list[Case]:
    """The full grid: M 1..8192 x Llama-7B shapes x r {8,16,64,128}; dropout {0, 0.1} for
    the training modes; saved bytes of q/k/v triples; multi-adapter 1/16/64 adapters, mixed ranks."""
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
    return out


def registry(scale: Scale = FULL, dtypes: Iterable[str] = ("bf16",), rank: int = HEADLINE_RANK) -> list[Case]:
    """Every case, each name once (a headline case that is also in the sweep carries both
    groups and its goal tags). Order: headline first, then the sweep."""
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
    return list(by_name.values())


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
