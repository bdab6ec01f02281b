"""Compile the LoRA kernels ahead of time for GPUs this machine does not have.

The kernels of kernels/lora_linear.py (every CONFIGS entry), kernels/dora.py (dora_cases), of
kernels/multi_lora.py (both MULTI_CONFIGS regimes: every launch of
multi_lora_forward and multi_lora_backward) and of kernels/moe_lora.py (moe_cases: every launch
of each MOE_CONFIGS regime).

``triton.compile`` targets sm_90 / sm_80 from a CPU-only machine, and the NVIDIA
tools inside the Triton wheel report what the interpreter cannot show:
registers, spills, shared memory and tensor-core instructions in the SASS.

Each kernel is compiled with exactly the arguments its launcher passes: the
launcher is called on ``meta`` tensors of a Llama-7B shape with its kernel
swapped for a recorder, and the recorded arguments are specialised the way
Triton's JIT specialises a GPU launch (ints equal to 1 become constexprs;
pointers and multiples of 16 get ``tt.divisibility=16``). A multi-adapter
launcher makes several launches (forward: S shrink, expand; backward: dS
shrink, dB and dA segment grads, dX expand): each is a case of its own.

    python -m tests.gpu_compile [--full] [--filter ID] [--jobs N]   # the table
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"

# Shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# H100/H200: 228 KB per SM - 1 KB reserved = 227 KB; A100: 164 KB - 1 KB = 163 KB.
TARGETS = {
    "sm_90": dict(capability=90, shared_limit=232448, ptxas_arch="sm_90a", mma="HGMMA"),
    "sm_80": dict(capability=80, shared_limit=166912, ptxas_arch="sm_80", mma="HMMA"),
}

# Representative problem: a Llama-7B projection (4096 x 4096); odd row counts.
K_IN = N_OUT = 4096
M_ROWS = {"gemm_prefill": 8191, "gemm_prefill_dropout_dx": 8191, "gemm_decode": 13, "shrink": 8191, "grad_ds_db": 8191, "grad_ds_db_wide_rank": 8191, "grad_a": 8191}
# The measured choice's candidate configs (CANDIDATE_CONFIGS): decode ones at 13 rows.
DECODE_ROWS, PREFILL_ROWS = 13, 8191
SCALING, DROPOUT_P = 2.0, 0.1
# Multi-adapter batches: "multi_" + a MULTI_CONFIGS regime; T rows over N_ADAPTERS adapters.
M_ROWS.update({"multi_decode": 13, "multi_prefill": 8191, "multi_prefill_cublas": 8191})
N_ADAPTERS = 16
# The launches of one multi-adapter launcher call, in launch order, as case `what`s;
# the backward's cases also run the forward first (its S partials feed the dB grad).
MULTI_LAUNCHES = {
    "multi_lora_forward": ("shrink", "expand"),
    "multi_lora_backward": ("ds_shrink", "grad_b", "grad_a", "dx_expand"),
}
MULTI_KERNEL_OF = {"shrink": "multi_lora_shrink_kernel", "ds_shrink": "multi_lora_shrink_kernel",
                   "expand": "multi_lora_expand_kernel", "dx_expand": "multi_lora_expand_kernel",
                   "grad_b": "multi_lora_segment_grad_kernel", "grad_a": "multi_lora_segment_grad_kernel"}


# ----------------------------------------------------------------- environment
@functools.lru_cache(maxsize=None)
def nvidia_tools() -> tuple[dict | None, str]:
    """({'ptxas': {arch: path}, 'cuobjdump': path, 'triton': version} | None, why not)."""
    try:
        import triton
        import triton.backends.nvidia as nv
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:  # depends on the Triton build
        return None, f"Triton without the NVIDIA backend ({type(e).__name__}: {e})"
    bin_dir = Path(nv.__file__).parent / "bin"
    found = {name: shutil.which(name, path=str(bin_dir)) for name in ("ptxas", "ptxas-blackwell", "cuobjdump")}
    if not found["cuobjdump"] or not (found["ptxas"] or found["ptxas-blackwell"]):
        return None, f"NVIDIA binaries missing in {bin_dir}: {found}"
    # Use the ptxas Triton uses for the arch: its PTX .version follows that ptxas
    # (triton 3.9: `ptxas` 12.9 below sm_90, `ptxas-blackwell` 13.x from sm_90 on;
    # 12.9 rejects the sm_90 PTX 9.x). get_ptxas(arch) exists from triton 3.5.
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = {arch: get_ptxas(t["capability"]).path for arch, t in TARGETS.items()}
    except Exception:
        ptxas = {arch: found["ptxas"] or found["ptxas-blackwell"] for arch in TARGETS}
    return {"ptxas": ptxas, "cuobjdump": found["cuobjdump"], "triton": triton.__version__}, ""


@contextlib.contextmanager
def interpreter_off():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def triton_imported_for_gpu() -> bool:
    """False when Triton was imported under TRITON_INTERPRET=1: its own @jit helpers
    (tl.rand, tl.cdiv, ...) are then interpreter objects and nothing compiles here."""
    import triton
    import triton.language.standard as std
    return isinstance(std.cdiv, triton.runtime.JITFunction)


#: The private package the kernel modules are loaded into (see ``load_kernel_module``).
PRIVATE_PACKAGE = "_lora_kernels_gpu_compile"


@functools.lru_cache(maxsize=None)
def load_kernel_module(name: str):
    """A private copy of kernels/<name>.py imported for GPUs (not the interpreter).

    The copies live in a package of their own, PRIVATE_PACKAGE, whose path is
    kernels/, so their relative imports (``from .common import ...``) load
    private copies too; ``lora_fused.kernels`` (maybe interpreted) is untouched.
    Each copy reads its GPU config table whatever TRITON_INTERPRET says.
    """
    import importlib
    import types
    with interpreter_off():
        if PRIVATE_PACKAGE not in sys.modules:
            parent = types.ModuleType(PRIVATE_PACKAGE)
            parent.__path__ = [str(KERNELS_DIR)]
            sys.modules[PRIVATE_PACKAGE] = parent
        mod = importlib.import_module(f"{PRIVATE_PACKAGE}.{name}")
    mod.interpreting = lambda: False  # config tables: the GPU's, not the interpreter's
    return mod


def load_kernels():
    """A private copy of kernels/lora_linear.py (GPU kernels, GPU config table)."""
    return load_kernel_module("lora_linear")


def load_multi_kernels():
    """A private copy of kernels/multi_lora.py (GPU kernels, MULTI_CONFIGS)."""
    return load_kernel_module("multi_lora")


# ----------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One compile: a launcher call, a rank, a dtype, a GPU."""
    what: str        # fwd | fwd_dropout | dx | dx_dropout | shrink | grad_a | grad_ds_db;
                     # multi: a launch of MULTI_LAUNCHES (shrink | expand | ds_shrink | grad_b | ...)
    config: str      # its CONFIGS key, or "multi_" + its MULTI_CONFIGS regime
    rank: int        # multi: r_max of the adapter stack
    bias: bool = False
    dropout: bool = False
    dtype: str = "bf16"
    arch: str = "sm_90"

    @property
    def multi(self) -> bool:
        return self.config.startswith("multi_")

    @property
    def id(self) -> str:
        parts = [self.config] if self.what == self.config else [self.config, self.what]
        parts += [f"r{self.rank}"] + (["bias"] if self.bias else [])
        parts += ["p"] if self.dropout and not self.what.endswith("dropout") else []
        return "-".join(parts + [self.dtype, self.arch])


def small_config(mod, what: str, r: int) -> str:
    """The CONFIGS key the launcher of a small kernel picks at rank r."""
    return mod.grad_ds_db_config(r) if what == "grad_ds_db" else what


def all_cases(mod, full: bool = False, multi=None) -> list[Case]:
    """Every CONFIGS entry x the variants its launchers use, for sm_90 and sm_80;
    then every MULTI_CONFIGS regime of ``multi`` (default: ``load_multi_kernels()``).

    GEMM (both regimes): ``fwd`` is what lora_forward launches without dropout
    (fused shrink up to FUSED_SHRINK_MAX_RANK: its largest fused BR and the next,
    shrink_first, BR are compiled), ``fwd_dropout`` the shrink_first GEMM, ``dx`` /
    ``dx_dropout`` lora_backward's dX GEMM (keep-mask on the LoRA term); BR=256
    is the shared-memory extreme of the rank prologue. Shrink and grad kernels:
    BR 16, 64, 256, with and without dropout. All in bf16; in fp16 (same tiles,
    another MMA type) the r=16 GEMMs and the r=64 small kernels, unless ``full``.

    Multi-adapter (decode: 13 rows, prefill and prefill_cublas: 8191 rows; 16
    adapters): every launch of multi_lora_forward and of multi_lora_backward (dX
    and dA/dB) at r_max 64 in bf16 and fp16. r_max only reaches the grid and
    strides (multiples of 16: the same specialisation), so other r_max compile
    the same kernels; ``full`` adds r_max 16 and 256 anyway.
    """
    fused_max = max(16, mod.FUSED_SHRINK_MAX_RANK)
    fwd_ranks = sorted({16, fused_max, min(256, 2 * fused_max)})
    gemm = [("fwd", r, bias) for r in fwd_ranks for bias in (False, True)]
    gemm += [(what, r, False) for what in ("fwd_dropout", "dx", "dx_dropout") for r in (16, 256)]
    small = [(what, r, p) for what in ("shrink", "grad_a") for r in (16, 64, 256) for p in (False, True)]
    small += [("grad_ds_db", r, False) for r in (16, 32, 64, 256)]
    out = []
    for arch in TARGETS:
        for dtype in ("bf16", "fp16"):
            every = dtype == "bf16" or full
            for regime in ("gemm_prefill", "gemm_decode"):
                config = lambda what: mod.gemm_config(M_ROWS[regime], what == "dx_dropout")  # noqa: E731
                out += [Case(what, config(what), r, bias, what.endswith("dropout"), dtype, arch)
                        for what, r, bias in gemm if every or (r == 16 and not bias)]
            out += [Case(what, small_config(mod, what, r), r, dropout=p, dtype=dtype, arch=arch)
                    for what, r, p in small if every or r == 64]
    out += candidate_cases(mod)
    multi = load_multi_kernels() if multi is None else multi
    for arch in TARGETS:
        for dtype in ("bf16", "fp16"):
            for regime in multi.MULTI_CONFIGS:
                out += [Case(what, f"multi_{regime}", r, dtype=dtype, arch=arch)
                        for r in ((16, 64, 256) if full else (64,))
                        for whats in MULTI_LAUNCHES.values() for what in whats]
    return out


def rows_for(config: str) -> int:
    """Rows of a case of ``config``: its own M_ROWS entry, else decode or prefill rows by name."""
    return M_ROWS.get(config, DECODE_ROWS if "decode" in config else PREFILL_ROWS)


def candidate_cases(mod) -> list[Case]:
    """The configs only the measured choice picks (CANDIDATE_CONFIGS entries no heuristic
    names), bf16, sm_90 and sm_80, each at its largest offered rank (``max_rank``: the
    shared-memory extreme of the rank prologue) in each launch it is offered for: the
    fused forward (at FUSED_SHRINK_MAX_RANK), the shrink_first forward and the dX GEMM, the
    dX GEMM with dropout; an expand-add config (composite) as the forward's
    add and the dX add with the mask, at BR 16 and at its rank block."""
    heuristic = {"gemm_prefill", "gemm_prefill_dropout_dx", "gemm_decode"}
    def offered(launch):
        return {c for (which, _), cs in mod.CANDIDATE_CONFIGS.items() if which == launch for c in cs}
    fused, gemm, dropout_dx, expand = (offered(w) for w in ("gemm_fused", "gemm", "gemm_dropout_dx", "expand_add"))
    out = []
    for arch in TARGETS:
        for name in sorted((gemm | fused) - heuristic):
            top = mod.CONFIGS[name].max_rank
            whats = [("fwd", min(top, mod.FUSED_SHRINK_MAX_RANK))] if name in fused else []
            whats += [("fwd_dropout", top), ("dx", top)] if name in gemm else []
            whats += [("dx_dropout", top)] if name in dropout_dx else []
            out += [Case(what, name, r, dropout=what.endswith("dropout"), arch=arch) for what, r in whats]
        for name in sorted(expand):
            out += [Case(what, name, r, dropout=what.endswith("dropout"), arch=arch)
                    for what in ("expand", "dx_expand_dropout") for r in (16, mod.CONFIGS[name].max_rank)]
    return out


@dataclasses.dataclass
class Launch:
    kernel: object   # the JITFunction
    args: dict       # parameter name -> value, every parameter
    num_warps: int
    num_stages: int
    options: dict = dataclasses.field(default_factory=dict)  # other compile options (enable_fp_fusion)


#: Launch keywords that are compile options, not kernel parameters.
COMPILE_OPTIONS = ("enable_fp_fusion",)


def _recorder(fn, launches: list):
    """Stands in for the JITFunction ``fn``: ``kernel[grid](...)`` appends a Launch."""
    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, num_warps, num_stages, **kwargs):
                options = {k: kwargs.pop(k) for k in COMPILE_OPTIONS if k in kwargs}
                bound = inspect.signature(fn.fn).bind(*args, **kwargs)
                launches.append(Launch(fn, dict(bound.arguments), num_warps, num_stages, options))
            return launch

        def run(self, *args, grid, warmup, **kwargs):  # what kernel[grid](...) calls; the launchers call it
            return self[grid](*args, **kwargs)
    return Recorder()


def record_multi_launch(mod, case: Case) -> Launch:
    """Call the multi-adapter launcher of ``case`` on meta tensors, recording every
    launch it makes (the forward's, then the backward's); return the one of ``case``."""
    import torch
    from types import SimpleNamespace

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
    regime = case.config.removeprefix("multi_")
    T, K, N, R, n = M_ROWS[case.config], K_IN, N_OUT, case.rank, N_ADAPTERS
    if regime in ("decode", "prefill"):  # the regimes regime_for picks (others are chosen explicitly)
        assert mod.regime_for(T) == regime, f"{case.id}: {T} rows are not the {regime} regime"
    cfg = mod.multi_config(regime)
    t = lambda *shape, dt=dtype: torch.empty(shape, dtype=dt, device="meta")  # noqa: E731
    i32 = torch.int32
    capacity = mod.chunk_capacity(T, n, cfg.block_rows)
    plan = SimpleNamespace(sorted_rows=t(T, dt=i32), seg_start=t(n + 1, dt=i32), seg_len=t(n + 1, dt=i32),
                           chunk_adapter=t(capacity, dt=i32), chunk_start=t(capacity, dt=i32),
                           chunk_len=t(capacity, dt=i32),
                           packed=t(1, dt=i32))  # launchers ask only whether the packed plan is contiguous
    x, weight, lora_A, lora_B = t(T, K), t(N, K), t(n, R, K), t(n, N, R)
    scalings, ranks = t(n, dt=torch.float32), t(n, dt=i32)
    names = sorted(set(MULTI_KERNEL_OF.values()))
    saved = {name: getattr(mod, name) for name in names}
    launches = []
    try:
        for name in names:
            setattr(mod, name, _recorder(saved[name], launches))
        _, s_part = mod.multi_lora_forward(x, weight, None, lora_A, lora_B, scalings, ranks, plan, regime)
        whats = MULTI_LAUNCHES["multi_lora_forward"]
        if case.what not in whats:
            mod.multi_lora_backward(t(T, N), x, weight, lora_A, lora_B, scalings, ranks, s_part, plan, regime,
                                    need_dx=True, need_dlora=True)
            whats += MULTI_LAUNCHES["multi_lora_backward"]
    finally:
        for name in names:
            setattr(mod, name, saved[name])
    got = [launch.kernel.fn.__name__ for launch in launches]
    assert got == [MULTI_KERNEL_OF[w] for w in whats], f"{case.id}: launches {got}, expected {whats}"
    return launches[whats.index(case.what)]


def record_launch(mod, case: Case) -> Launch:
    """Call the launcher of ``case`` on meta tensors; return the launch it makes."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
    M, K, N, R = rows_for(case.config), K_IN, N_OUT, case.rank
    t = lambda *shape, dt=dtype: torch.empty(shape, dtype=dt, device="meta")  # noqa: E731
    x, weight, lora_A, lora_B = t(M, K), t(N, K), t(R, K), t(N, R)
    bias = t(N) if case.bias else None
    p = DROPOUT_P if case.dropout else 0.0
    seed = t(1, dt=torch.int64) if case.dropout else None
    kernel = {"shrink": "lora_shrink_kernel", "grad_ds_db": "lora_grad_ds_db_kernel",
              "grad_a": "lora_grad_a_kernel", "expand": "lora_expand_add_kernel",
              "dx_expand_dropout": "lora_expand_add_kernel"}.get(case.what, "lora_gemm_kernel")
    fn = getattr(mod, kernel)
    launches = []

    class Ignore:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

        def run(self, *args, **kwargs):
            return None

    names = ("lora_gemm_kernel", "lora_shrink_kernel", "lora_grad_ds_db_kernel", "lora_grad_a_kernel",
             "lora_expand_add_kernel")
    saved = {n: getattr(mod, n) for n in names}
    try:
        for n in names:
            setattr(mod, n, _recorder(fn, launches) if n == kernel else Ignore())
        if case.what.startswith("fwd"):  # the heuristic's strategy, at the case's config
            mod.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, p, seed, config=case.config)
        elif case.what.startswith("dx"):
            mod.lora_backward(t(M, N), x, weight, lora_A, lora_B, t(M, R), SCALING, p, seed,
                              need_dx=True, need_dlora=False,
                              strategy="composite" if "expand" in case.what else "fused", config=case.config)
        elif case.what == "expand":
            mod.lora_forward(x, weight, bias, lora_A, lora_B, SCALING, p, seed, strategy="composite",
                             config=case.config)
        elif case.what == "shrink":
            mod.lora_shrink(x, lora_A, seed, p)
        elif case.what == "grad_ds_db":
            mod.lora_grad_ds_db(t(M, N), lora_B, t(M, R), SCALING)
        elif case.what == "grad_a":
            mod.lora_grad_a(t(M, R), x, seed, p)
    finally:
        for n in names:
            setattr(mod, n, saved[n])
    assert len(launches) == 1, f"{case.id}: expected one {kernel} launch, got {len(launches)}"
    return launches[0]


# ----------------------------------------------------------------- QLoRA (kernels/dequant4bit.py)
#: Rows of the decode case (at most dequant4bit.DECODE_MAX_ROWS: one row tile).
QLORA_DECODE_ROWS = 13


def qlora_cases() -> list[Case]:
    """kernels/dequant4bit.py: the dequantize (nested absmax, the QLoRA default, and plain)
    and the fused decode GEMV + LoRA (r 16 and 64, with bias), bf16 and fp16, sm_90 and sm_80.
    Compiled with enable_fp_fusion=False, as launched (bit-exactness with bitsandbytes)."""
    out = []
    for arch in TARGETS:
        for dtype in ("bf16", "fp16"):
            out += [Case(what, "qlora_dequant", 0, dtype=dtype, arch=arch) for what in ("dequant", "nested")]
            out += [Case("decode", "qlora_decode", r, bias=True, dtype=dtype, arch=arch) for r in (16, 64)]
    return out


def record_qlora_launch(case: Case) -> Launch:
    """Call the dequant4bit launcher of ``case`` on meta tensors (4096 x 4096, nf4, blocksize 64;
    nested absmax but for ``what == "dequant"``); return its launch."""
    import torch
    from types import SimpleNamespace

    mod = load_kernel_module("dequant4bit")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
    N, K, nested = N_OUT, K_IN, case.what != "dequant"
    t = lambda *shape, dt=dtype: torch.empty(shape, dtype=dt, device="meta")  # noqa: E731
    blocks = N * K // 64
    f32 = torch.float32
    quant = SimpleNamespace(shape=(N, K), blocksize=64, quant_type="nf4", dtype=dtype, nested=nested,
                            absmax=t(blocks, dt=torch.uint8 if nested else f32),
                            absmax2=t(blocks // 256, dt=f32) if nested else None,
                            code2=t(256, dt=f32) if nested else None, blocksize2=256 if nested else 0,
                            offset=t(1, dt=f32) if nested else None)
    packed = t(N * K // 2, 1, dt=torch.uint8)
    name = "qlora_decode_kernel" if case.what == "decode" else "dequant4bit_kernel"
    saved, launches = getattr(mod, name), []
    try:
        setattr(mod, name, _recorder(saved, launches))
        if case.what != "decode":
            mod.dequantize_4bit(packed, quant, dtype)
        else:
            M, R = QLORA_DECODE_ROWS, case.rank
            mod.qlora_decode(t(M, K), packed, quant, t(N) if case.bias else None, t(M, R), t(N, R), SCALING)
    finally:
        setattr(mod, name, saved)
    assert len(launches) == 1 and launches[0].options == {"enable_fp_fusion": False}, case.id
    return launches[0]


# ----------------------------------------------------------------- DoRA (kernels/dora.py)
#: Each DoRA launcher with the variants it is called with (see lora_fused/ops/dora.py).
DORA_LAUNCHES = {"norm": "dora_norm_kernel", "scale_bias": "dora_scale_cols_kernel",
                 "scale_base": "dora_scale_cols_kernel", "grad_scale": "dora_grad_scale_kernel",
                 "dropout_x": "dora_dropout_mix_kernel", "dropout_dx": "dora_dropout_mix_kernel"}


def dora_cases() -> list[Case]:
    """kernels/dora.py: the norm kernel (every NORM_BLOCKS rank: the W0·Aᵀ K loop) and the
    elementwise epilogues (column scale with bias / with the dropout base term, dY scale + dm
    partials, the dropout mix for x~ and for dX), bf16 and fp16, sm_90 and sm_80."""
    out = []
    for arch in TARGETS:
        for dtype in ("bf16", "fp16"):
            out += [Case("norm", "dora_norm", r, dtype=dtype, arch=arch) for r in (16, 32, 64, 128, 256)]
            out += [Case(what, "dora_elementwise", 0, dtype=dtype, arch=arch)
                    for what in DORA_LAUNCHES if what != "norm"]
    return out


def record_dora_launch(case: Case) -> Launch:
    """Call the kernels/dora.py launcher of ``case`` on meta tensors (4096 x 4096, 8191 rows)."""
    import torch

    mod = load_kernel_module("dora")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
    t = lambda *shape, dt=dtype: torch.empty(shape, dtype=dt, device="meta")  # noqa: E731
    M, N, K, f32 = PREFILL_ROWS, N_OUT, K_IN, torch.float32
    name = DORA_LAUNCHES[case.what]
    saved, launches = getattr(mod, name), []
    try:
        setattr(mod, name, _recorder(saved, launches))
        if case.what == "norm":
            mod.row_norm(t(N, K), t(case.rank, K), t(N, case.rank), SCALING)
        elif case.what.startswith("scale"):
            bias = case.what == "scale_bias"
            mod.scale_cols(t(M, N), t(N, dt=f32), t(N) if bias else None, None if bias else t(M, N))
        elif case.what == "grad_scale":
            mod.grad_scale(t(M, N), t(M, N), t(N, dt=f32))
        else:
            x, seed = t(M, K), t(1, dt=torch.int64)
            base, other = (None, x) if case.what == "dropout_x" else (t(M, K), t(M, K))
            mod.dropout_mix(base, other, seed, DROPOUT_P, x)
    finally:
        setattr(mod, name, saved)
    assert len(launches) == 1, case.id
    return launches[0]


# ----------------------------------------------------------------- serving delta (kernels/lora_delta.py)
#: lora_fused.add_lora's launches: the shrink over the stacked rank axis of the slices and the
#: expand with a slice axis, in the padded layout (add_lora), the compact one (SGLang) and with
#: per-slice tensors read through element-offset tables (add_lora_slices: vLLM's packed layers).
DELTA_LAUNCHES = {"shrink": "lora_delta_shrink_kernel", "expand": "lora_delta_expand_kernel",
                  "shrink_compact": "lora_delta_shrink_kernel", "expand_compact": "lora_delta_expand_kernel",
                  "shrink_table": "lora_delta_shrink_kernel", "expand_table": "lora_delta_expand_kernel"}
#: Packed q|k|v of Llama-3-8B (4096 -> 4096 + 1024 + 1024) over 64 adapters (goal S1's case, bench/serving.py).
DELTA_SLICES, DELTA_ADAPTERS = (4096, 1024, 1024), 64


def delta_cases() -> list[Case]:
    """kernels/lora_delta.py: every launch of each DELTA_CONFIGS regime (decode at 13 rows,
    prefill at 8191) at r_max 16 (stacked axis 48: one rank tile) and 64 (192: several; the
    largest BQ), bf16 and fp16, sm_90 and sm_80."""
    mod = load_kernel_module("lora_delta")
    return [Case(what, f"delta_{regime}", r, dtype=dtype, arch=arch)
            for arch in TARGETS for dtype in ("bf16", "fp16") for regime in mod.DELTA_CONFIGS
            for r in (16, 64) for what in DELTA_LAUNCHES]


def record_delta_launch(case: Case) -> Launch:
    """Call kernels/lora_delta.py's launchers of ``case`` on meta tensors; return its launch."""
    import torch
    from types import SimpleNamespace

    mod, multi = load_kernel_module("lora_delta"), load_multi_kernels()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
    regime = case.config.removeprefix("delta_")
    T = DECODE_ROWS if regime == "decode" else PREFILL_ROWS
    block = multi.multi_config(regime).block_rows  # the plan's chunk size is the multi table's
    n, R, S, N = DELTA_ADAPTERS, case.rank, len(DELTA_SLICES), sum(DELTA_SLICES)
    t = lambda *shape, dt=dtype: torch.empty(shape, dtype=dt, device="meta")  # noqa: E731
    i32 = torch.int32
    capacity = multi.chunk_capacity(T, n, block)
    plan = SimpleNamespace(sorted_rows=t(T, dt=i32), chunk_adapter=t(capacity, dt=i32),
                           chunk_start=t(capacity, dt=i32), chunk_len=t(capacity, dt=i32),
                           regime=regime, block_rows=block)
    compact, table = case.what.endswith("compact"), case.what.endswith("table")
    x, y, ranks, scalings = t(T, K_IN), t(T, N), t(n, dt=i32), t(n, dt=torch.float32)
    a = t(n, 1, S * R, K_IN) if compact else t(n, S, R, K_IN)
    a_strides = a.stride()
    lora_B = t(n, N, R)
    b_table = None
    a_offsets = None
    if table:  # vLLM's slices: [n, r, in] each, B_j [n, w_j, r]; element offsets in int64 tables
        a, a_strides, a_offsets = t(n, R, K_IN), (R * K_IN, 0, K_IN, 1), t(S, dt=torch.int64)
        b_table = (t(S, dt=torch.int64), t(S, dt=torch.int64))
    names = sorted(set(DELTA_LAUNCHES.values()))
    saved, launches = {name: getattr(mod, name) for name in names}, []
    try:
        for name in names:
            setattr(mod, name, _recorder(saved[name], launches))
        part = mod.delta_shrink(x, a, a_strides, S, R, compact, ranks, plan, a_offsets=a_offsets)
        ends = tuple(sum(DELTA_SLICES[:j + 1]) for j in range(S))
        b_strides = (0, R, 1) if table else lora_B.stride()
        mod.delta_expand(y, part, lora_B, b_strides, ends, R, compact, scalings, ranks, plan, b_table=b_table)
    finally:
        for name in names:
            setattr(mod, name, saved[name])
    got = [launch.kernel.fn.__name__ for launch in launches]
    assert got == ["lora_delta_shrink_kernel", "lora_delta_expand_kernel"], f"{case.id}: launches {got}"
    return launches[0 if case.what.startswith("shrink") else 1]


# ----------------------------------------------------------------- grouped expert LoRA (kernels/moe_lora.py)
#: The launches of one moe_lora launcher call, in launch order, as case ``what``s: the chunk table
#: (every call's first launch), the forward's shrink and expand (strategy "fused": the grouped GEMM
#: with its LoRA epilogue), the same with the vendor GEMM's base ("_epilogue": strategy
#: "grouped_mm"), the backward's dS shrink, dB and dA segment grads and dX (fused or epilogue), and
#: the base alone (grouped_linear_forward).
MOE_LAUNCHES = {
    "forward": ("table", "shrink", "expand"), "forward_vendor": ("table", "shrink", "expand_epilogue"),
    "backward": ("table", "ds_shrink", "grad_b", "grad_a", "dx_expand"),
    "backward_vendor": ("table", "ds_shrink", "grad_b", "grad_a", "dx_epilogue"), "linear": ("table", "linear"),
}
MOE_KERNEL_OF = {"table": "moe_chunk_table_kernel", "shrink": "moe_lora_shrink_kernel",
                 "ds_shrink": "moe_lora_shrink_kernel",
                 "expand": "moe_lora_expand_kernel", "expand_epilogue": "moe_lora_expand_kernel",
                 "dx_expand": "moe_lora_expand_kernel", "dx_epilogue": "moe_lora_expand_kernel",
                 "linear": "moe_lora_expand_kernel", "grad_b": "moe_lora_segment_grad_kernel",
                 "grad_a": "moe_lora_segment_grad_kernel"}
#: A Qwen3-MoE-30B-A3B gate_up projection: 128 experts, hidden 2048 -> 2 x 768; decode 13 pairs, prefill 8191.
MOE_EXPERTS, MOE_IN, MOE_OUT = 128, 2048, 1536


def moe_cases() -> list[Case]:
    """kernels/moe_lora.py: every launch of each MOE_CONFIGS regime, with dropout and bias (the variants
    with the most live state: the Philox mask in the shrink, dA and dX; top-2 rows through the row
    table), at r 16 and 64 in bf16 and r 64 in fp16 (the base alone: r 16), sm_90 and sm_80. Rank tiles stop at 64
    (shrink_BR, grad_BR) and the expand steps 16 or 32 ranks, so wider ranks compile the same kernels."""
    mod = load_kernel_module("moe_lora")
    whats = sorted({w for ws in MOE_LAUNCHES.values() for w in ws})
    variants = {what: (("bf16", 16), ("bf16", 64), ("fp16", 64)) for what in whats}
    variants["linear"] = (("bf16", 16), ("fp16", 16))  # no LoRA: the rank reaches nothing
    variants["table"] = (("bf16", 16),)  # int32 only: neither dtype nor rank reaches it
    return [Case(what, f"moe_{regime}", r, bias=what != "table", dropout=what not in ("linear", "table"), dtype=dtype,
                 arch=arch)
            for arch in TARGETS for regime in mod.MOE_CONFIGS for what in whats for dtype, r in variants[what]]


def record_moe_launch(case: Case) -> Launch:
    """Call the kernels/moe_lora.py launcher of ``case`` on meta tensors; return its launch. The
    vendor GEMM (strategy "grouped_mm") is a stand-in returning a meta tensor of its output's shape."""
    import torch

    mod = load_kernel_module("moe_lora")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
    regime = case.config.removeprefix("moe_")
    P = DECODE_ROWS if regime == "decode" else PREFILL_ROWS
    assert mod.moe_regime(P) == regime, f"{case.id}: {P} pairs are not the {regime} regime"
    E, K, N, R = MOE_EXPERTS, MOE_IN, MOE_OUT, case.rank
    t = lambda *shape, dt=dtype: torch.empty(shape, dtype=dt, device="meta")  # noqa: E731
    x, rows, weight, bias = t(P // 2 + 1, K), t(P, dt=torch.int64), t(E, N, K), t(E, N)
    lora_a, lora_b, offsets, seed = t(E, R, K), t(E, N, R), t(E, dt=torch.int32), t(1, dt=torch.int64)
    call = next(name for name, ws in MOE_LAUNCHES.items() if case.what in ws)
    vendor = call.endswith("vendor")
    strategy = "grouped_mm" if vendor else "fused"
    names = sorted(set(MOE_KERNEL_OF.values()))
    saved = {name: getattr(mod, name) for name in (*names, "grouped_mm_accepts", "VENDOR_GROUPED_MM")}
    launches = []
    try:
        for name in names:
            setattr(mod, name, _recorder(saved[name], launches))
        mod.grouped_mm_accepts = lambda *args: vendor
        mod.VENDOR_GROUPED_MM = lambda a, b, offs: torch.empty(a.shape[0], b.shape[-1], dtype=a.dtype, device="meta")
        mod._launchers.clear()  # launchers hold the strategy they resolved
        p = DROPOUT_P if case.dropout else 0.0
        if call == "linear":
            mod.grouped_linear_forward(x, rows, weight, bias, offsets)
        elif call.startswith("forward"):
            mod.grouped_lora_forward(x, rows, weight, bias, lora_a, lora_b, offsets, SCALING, p, seed, strategy)
        else:
            mod.grouped_lora_backward(t(P, N), x, rows, weight, lora_a, lora_b, t(P, R, dt=torch.float32), offsets,
                                      SCALING, p, seed, True, True, strategy)
    finally:
        for name, value in saved.items():
            setattr(mod, name, value)
        mod._launchers.clear()
    got = [launch.kernel.fn.__name__ for launch in launches]
    assert got == [MOE_KERNEL_OF[w] for w in MOE_LAUNCHES[call]], f"{case.id}: launches {got}"
    return launches[MOE_LAUNCHES[call].index(case.what)]


# ----------------------------------------------------------------- compile
_TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
                 "int64": "i64", "int32": "i32", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _specialize(value) -> tuple[str, bool]:
    """(signature type, divisible by 16) as Triton's JIT specialises a launch argument.
    Pointers count as 16-byte aligned (CUDA allocations are 256-byte aligned)."""
    if hasattr(value, "data_ptr"):
        return "*" + _TRITON_DTYPE[str(value.dtype).removeprefix("torch.")], True
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot specialise a {type(value).__name__}")


def compile_launch(launch: Launch, arch: str):
    """``triton.compile`` a recorded launch for ``arch``; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(launch.kernel.params):
        value = launch.args[param.name]
        ty, divisible = ("constexpr", False) if param.is_constexpr else _specialize(value)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[param.name] = value
        elif divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:  # triton >= 3.3
        src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    else:  # triton < 3.3 named it `constants` (and took attrs in another form)
        src = ASTSource(fn=launch.kernel, signature=signature, constants=constexprs)
    with interpreter_off():
        return triton.compile(src, target=GPUTarget("cuda", TARGETS[arch]["capability"], 32),
                              options={"num_warps": launch.num_warps, "num_stages": launch.num_stages,
                                       **launch.options})


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout + res.stderr


@dataclasses.dataclass
class Result:
    kernel: str
    variant: str         # fused | sfirst | dx | shrink | grad_a | grad_ds_db; multi: the launch
    BR: int
    num_warps: int
    num_stages: int
    registers: int       # of Triton's cubin (cuobjdump --dump-resource-usage)
    shared: int          # bytes: Triton's dynamic shared (metadata.shared) + the cubin's static
    spill_stores: int    # bytes, from ptxas -v on the PTX
    spill_loads: int
    stack: int           # bytes of stack frame, ptxas -v
    ldl_stl: int         # local-memory instructions in the SASS of Triton's cubin
    hgmma: int
    hmma: int
    seconds: float       # triton.compile

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads or self.ldl_stl)


def compile_case(case: Case) -> Result:
    """Record, compile and inspect one case (in a process that imported Triton for GPUs)."""
    tools, why = nvidia_tools()
    if tools is None:
        raise RuntimeError(why)
    launch = (record_qlora_launch(case) if case.config.startswith("qlora_")
              else record_moe_launch(case) if case.config.startswith("moe_")
              else record_dora_launch(case) if case.config.startswith("dora_")
              else record_delta_launch(case) if case.config.startswith("delta_")
              else record_multi_launch(load_multi_kernels(), case) if case.multi
              else record_launch(load_kernels(), case))
    t0 = time.perf_counter()
    kernel = compile_launch(launch, case.arch)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(kernel.asm["ptx"])
        cubin.write_bytes(kernel.asm["cubin"])
        log = _run([tools["ptxas"][case.arch], "-v", f"--gpu-name={TARGETS[case.arch]['ptxas_arch']}",
                    str(ptx), "-o", str(Path(tmp, "ptxas.cubin"))])
        sass = _run([tools["cuobjdump"], "--dump-sass", str(cubin)])
        usage = _run([tools["cuobjdump"], "--dump-resource-usage", str(cubin)])
    regs, static = re.search(r"REG:(\d+)", usage), re.search(r"SHARED:(\d+)", usage)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (regs and static and frame):
        raise RuntimeError(f"unexpected tool output:\n{log}\n{usage}")
    opcodes = re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
    count = lambda name: opcodes.count(name)  # noqa: E731
    args = launch.args
    variant = ("fused" if args["FUSED_SHRINK"] else "dx" if case.what.startswith("dx") else "sfirst"
               ) if "FUSED_SHRINK" in args else case.what
    return Result(kernel=launch.kernel.fn.__name__, variant=variant, BR=args.get("BR", 0),
                  num_warps=launch.num_warps, num_stages=launch.num_stages,
                  registers=int(regs[1]), shared=kernel.metadata.shared + int(static[1]),
                  spill_stores=int(frame[2]), spill_loads=int(frame[3]), stack=int(frame[1]),
                  ldl_stl=count("LDL") + count("STL"), hgmma=count("HGMMA"), hmma=count("HMMA"),
                  seconds=seconds)


def _child_init():
    os.environ["TRITON_INTERPRET"] = "0"


_CHILD = None


def call_in_gpu_child(fn, *args):
    """``fn(*args)`` in a child process (spawned once, then reused) that imports Triton for
    GPUs whatever TRITON_INTERPRET says here; ``fn`` and its arguments must pickle."""
    global _CHILD
    if _CHILD is None:
        import atexit
        import concurrent.futures
        import multiprocessing
        _CHILD = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_init)
        atexit.register(_CHILD.shutdown)  # before interpreter teardown: else its thread's cleanup may raise
    return _CHILD.submit(fn, *args).result()


def compile_case_anywhere(case: Case) -> Result:
    """``compile_case`` here, or in a child process that imports Triton for GPUs
    when this one imported it for the interpreter (a TRITON_INTERPRET=1 test run)."""
    if triton_imported_for_gpu():
        return compile_case(case)
    return call_in_gpu_child(compile_case, case)


def check(case: Case, r: Result) -> list[str]:
    """What is wrong with a compiled case on its GPU (empty when nothing)."""
    target = TARGETS[case.arch]
    problems = []
    if r.shared > target["shared_limit"]:
        problems.append(f"shared memory {r.shared} B > {target['shared_limit']} B")
    if r.spills:
        problems.append(f"spills (ptxas -v: {r.spill_stores} B stored, {r.spill_loads} B loaded, "
                        f"{r.stack} B stack; SASS: {r.ldl_stl} LDL/STL)")
    # The main GEMM must use the arch's own MMA (on sm_90 wgmma = HGMMA, which
    # needs BM >= 64 per warpgroup). Smaller dots (a BR x BM dot of the grad
    # kernels) may use mma.sync = HMMA on sm_90: tensor cores all the same.
    # So may every multi-adapter kernel: its decode tiles have BM = 16.
    if case.config.startswith("gemm"):
        if not (r.hgmma if case.arch == "sm_90" else r.hmma):
            problems.append(f"no {target['mma']} in the SASS (HGMMA {r.hgmma}, HMMA {r.hmma})")
    elif case.config in ("qlora_dequant", "dora_elementwise") or (case.config.startswith("moe_")
                                                                  and case.what == "table"):
        pass  # elementwise, or the grouped chunk table's index arithmetic: no product for tensor cores
    elif not (r.hgmma or r.hmma):
        problems.append("no tensor-core instruction (HGMMA/HMMA) in the SASS")
    return problems


# ----------------------------------------------------------------- CLI
def main(argv=None) -> int:
    import argparse
    import concurrent.futures
    import multiprocessing

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="fp16 as many cases as bf16")
    ap.add_argument("--filter", default="", help="only case ids containing this")
    ap.add_argument("--jobs", type=int, default=1, help="compile in N processes")
    args = ap.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"  # before Triton is imported
    tools, why = nvidia_tools()
    if tools is None:
        print(f"cannot compile for NVIDIA GPUs: {why}", file=sys.stderr)
        return 2
    mod, multi = load_kernels(), load_multi_kernels()
    cases = [c for c in all_cases(mod, args.full, multi) + qlora_cases() + dora_cases() + delta_cases() + moe_cases()
             if args.filter in c.id]
    print(f"triton {tools['triton']}, {len(cases)} cases; FUSED_SHRINK_MAX_RANK = "
          f"{mod.FUSED_SHRINK_MAX_RANK}; CONFIGS:")
    for name, cfg in mod.CONFIGS.items():
        print(f"  {name:13s} {cfg}")
    print(f"MULTI_CONFIGS ({N_ADAPTERS} adapters; rows: " + ", ".join(
        f"{regime} {M_ROWS['multi_' + regime]}" for regime in multi.MULTI_CONFIGS) + "):")
    for name, cfg in multi.MULTI_CONFIGS.items():
        print(f"  {name:13s} {cfg}")
    head = (f"{'case':42s} {'variant':10s} {'BR':>3s} {'w':>2s} {'st':>2s} {'regs':>4s} {'smem B':>7s} "
            f"{'spillS':>6s} {'spillL':>6s} {'LDL/STL':>7s} {'HGMMA':>5s} {'HMMA':>4s} {'s':>4s}  problems")
    print("\n" + head + "\n" + "-" * len(head))
    bad = 0
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_child_init))
            futures = [pool.submit(compile_case, c) for c in cases]
        else:
            futures = [None] * len(cases)
        for case, fut in zip(cases, futures):
            try:
                r = fut.result() if fut else compile_case(case)
            except Exception as e:  # keep going: the table is the point
                bad += 1
                print(f"{case.id:42s} FAILED: {str(e).strip().splitlines()[-1][:120]}", flush=True)
                continue
            problems = check(case, r)
            bad += bool(problems)
            print(f"{case.id:42s} {r.variant:10s} {r.BR:3d} {r.num_warps:2d} {r.num_stages:2d} "
                  f"{r.registers:4d} {r.shared:7d} {r.spill_stores:6d} {r.spill_loads:6d} {r.ldl_stl:7d} "
                  f"{r.hgmma:5d} {r.hmma:4d} {r.seconds:4.1f}  {'; '.join(problems)}", flush=True)
    print(f"\n{bad} of {len(cases)} cases with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
