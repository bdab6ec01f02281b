"""Plumbing shared by the kernel families (``lora_linear``, ``multi_lora``, ``lora_delta``,
``dequant4bit``, ``dora``).

Host side: launch counters and output poisoning (tests), dot precision, split-M
sizing from the device's multiprocessor count, the launch call and the bound of the
launcher caches. Device side (``@triton.jit``, inlined into the kernels that call them):
masked tile loads and stores, the grouped tile order, the dropout keep-mask and the K
loop of a GEMM.

Pure Triton and torch: nothing here imports ``lora_fused``. The kernels' private PyTorch
and Triton calls live here, each beside its public fallback (``tests/test_compat.py`` runs
both): ``torch._C``'s TF32 getters (:func:`tf32_matmul_enabled`) and ``JITFunction.run``
(:data:`runner`); the private environment read is ``kernels/host.py``'s.
"""
from __future__ import annotations

import collections
import functools
import inspect
import operator
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .host import env_lookup, env_raw

# --------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------

#: Kernel launches by kernel name; tests read it to prove the Triton path ran.
LAUNCH_COUNTS: collections.Counter = collections.Counter()

#: Tests set this: every output buffer is filled with NaN before a launch, so an
#: element a kernel fails to write cannot pass as a plausible number.
POISON_OUTPUTS = False

#: fp32 scratch a backward may use for split-M partials (dB, dA), in bytes.
PARTIALS_BUDGET_BYTES = 64 << 20

#: A split-M reduction aims for this many programs per multiprocessor: two waves,
#: so a wave's tail is half as costly as with one (unmeasured on GPU).
SPLIT_WAVES = 2

#: Multiprocessors assumed where there is no CUDA device (the interpreter, meta
#: tensors of the AOT compile test): an H100's 132. The interpreter runs programs
#: one at a time, so the number only decides how the rows are split; taking the
#: GPU the configs were tuned on makes CPU runs exercise the same split paths.
FALLBACK_MULTIPROCESSORS = 132


def new_output(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """``torch.empty`` on ``like``'s device, in ``dtype`` (default: like's) for a kernel's output
    (NaN-filled when POISON_OUTPUTS). ``new_empty`` with the sizes as arguments, and no dtype
    keyword where like's is the one: ~1 µs less than ``torch.empty(shape, device=, dtype=)``."""
    if not shape:
        out = like.new_empty((), dtype=dtype or like.dtype)
    elif dtype is None or dtype == like.dtype:
        out = like.new_empty(*shape)
    else:
        out = like.new_empty(*shape, dtype=dtype)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def param_names(kernel) -> tuple[str, ...]:
    """The parameter names of a jitted kernel, in order (read once per kernel, at import)."""
    return tuple(inspect.signature(kernel.fn).parameters)


def constexpr_args(params: tuple[str, ...], meta: dict) -> tuple:
    """``meta``'s values in the order of the kernel's trailing parameters (``params``: its
    constexprs), so a launch passes them positionally: Triton binds positional and keyword
    arguments alike, and a launch spends ~1 µs less on the host without 13 keywords."""
    names = params[len(params) - len(meta):]
    if set(names) != set(meta):
        raise ValueError(f"constexprs {sorted(meta)} are not the kernel's trailing parameters {names}")
    return tuple(meta[name] for name in names)


#: Launchers a launcher cache keeps (one per call signature: shapes, strides, dtype, flags)
#: before it starts again: a model has a few dozen signatures, a shape sweep a few thousand.
LAUNCHERS_MAX = 4096


def keep_launcher(cache: dict, key, launcher):
    """``cache[key] = launcher`` (returned), emptying ``cache`` first when it holds LAUNCHERS_MAX."""
    if len(cache) >= LAUNCHERS_MAX:
        cache.clear()
    cache[key] = launcher
    return launcher


def _run_takes_launch_keywords(kernel_type: type) -> bool:
    """Whether ``kernel_type.run`` has the signature the launches call it with:
    ``run(self, *args, grid, warmup, **options)`` (Triton 3.x, JIT and interpreter alike)."""
    try:
        params = inspect.signature(kernel_type.run).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    kinds = {p.kind for p in params.values()}
    return (inspect.Parameter.VAR_POSITIONAL in kinds and inspect.Parameter.VAR_KEYWORD in kinds
            and all(name in params and params[name].kind == inspect.Parameter.KEYWORD_ONLY
                    for name in ("grid", "warmup")))


def _public_run(kernel, *args, grid, warmup, **options):
    """``kernel.run``'s call through the public ``kernel[grid](...)`` (``kernel.warmup`` for a warmup)."""
    if warmup:
        return kernel.warmup(*args, grid=grid, **options)
    return kernel[grid](*args, **options)


def public_runner(kernel) -> Callable:
    """A function with ``kernel.run``'s signature that launches through the public ``kernel[grid](...)``."""
    return functools.partial(_public_run, kernel)


def new_matrix(like: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``new_output((rows, cols), like)`` at the least host cost (sizes as arguments, not a tuple)."""
    out = like.new_empty(rows, cols)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


_env_get, (_INTERPRET_KEY,) = env_lookup("TRITON_INTERPRET")
_ON = env_raw("1")


def interpreting() -> bool:
    """Whether Triton runs the kernels through its CPU interpreter (read per call: a dict lookup)."""
    return _env_get(_INTERPRET_KEY) == _ON


def regime_config(regime: str, compiled: dict, interpreted: dict):
    """A family's block config for ``regime``: from ``interpreted`` under the interpreter (it runs
    one program at a time in numpy: other blocks pay there), else from ``compiled``."""
    table = interpreted if interpreting() else compiled
    if regime not in table:
        raise ValueError(f"regime must be one of {sorted(table)}, got {regime!r}")
    return table[regime]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grids on the host: ``triton.cdiv`` is a constexpr function in Triton 3.x,
    whose host call unwraps its arguments (~3 µs; launchers call it several times a launch)."""
    return -(-a // b)


def padded_rank(r: int) -> int:
    """Rank block for ``tl.dot``: a power of two, at least 16 (``tl.dot`` needs every dimension
    >= 16 on NVIDIA GPUs; the padding is masked to zero)."""
    return max(16, 1 << (r - 1).bit_length())  # next power of two, in plain Python (host call: ~0.1 µs)


def tf32_matmul_enabled() -> bool:
    """Whether torch lets fp32 matmuls use TF32, by the new API or the legacy flag.

    ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" | "ieee" | "none" =
    inherit) exists from torch 2.9; reading the legacy ``allow_tf32`` raises
    once a program has used the new API, so the new one is asked first.
    """
    if _FP32_PRECISION is not None:  # the getters torch.backends' properties call, without their layers
        precisions = (_FP32_PRECISION("cuda", "matmul"), _FP32_PRECISION("generic", "all"))
    else:
        precisions = (getattr(torch.backends.cuda.matmul, "fp32_precision", "none"),
                      getattr(torch.backends, "fp32_precision", "none"))
    for precision in precisions:
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    try:  # the getter behind torch.backends.cuda.matmul.allow_tf32, less its module __getattr__ (~0.8 µs)
        return bool(_LEGACY_TF32() if _LEGACY_TF32 is not None else torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # legacy and new APIs mixed: the new one said "none"
        return False


def _private_getter(name: str, public: Callable[[], object], *args) -> Optional[Callable]:
    """``torch._C.<name>`` where it exists and answers ``args`` as the public property ``public``
    does (checked once, at import); else None, and the public property is read instead."""
    getter = getattr(torch._C, name, None)
    try:
        return getter if getter is not None and getter(*args) == public() else None
    except Exception:  # noqa: BLE001 - a changed signature, or an API mix the getter refuses
        return None


# The getters behind ``torch.backends.cuda.matmul.fp32_precision`` / ``torch.backends.fp32_precision``
# and the legacy ``allow_tf32``, called without the properties' layers (~0.8 µs less a read).
_FP32_PRECISION = (_private_getter("_get_fp32_precision_getter", lambda: torch.backends.cuda.matmul.fp32_precision,
                                   "cuda", "matmul")
                   and _private_getter("_get_fp32_precision_getter", lambda: torch.backends.fp32_precision,
                                       "generic", "all"))
_LEGACY_TF32 = _private_getter("_get_cublas_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's TF32 setting for matmuls (ieee when off); 16-bit dots are exact products."""
    if dtype == torch.float32 and tf32_matmul_enabled():
        return "tf32"
    return "ieee"


@functools.cache
def cuda_multiprocessors(index: int) -> int:
    """Multiprocessor count of CUDA device ``index`` (H100/H200: 132, A100: 108), read once."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Multiprocessors of ``device``; FALLBACK_MULTIPROCESSORS off CUDA."""
    if device.type != "cuda":
        return FALLBACK_MULTIPROCESSORS
    return cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def split_rows(num_rows: int, block_rows: int, other_programs: int, partial_elems: int,
               device: torch.device) -> tuple[int, int]:
    """(n_splits, row tiles per split) of a split-M reduction into fp32 partials.

    Enough splits that ``n_splits * other_programs`` fills SPLIT_WAVES waves of
    the device, no more than the partials budget allows (each split holds
    ``partial_elems`` fp32) nor than there are row tiles; no split is left empty.
    """
    m_tiles = cdiv(num_rows, block_rows)
    target = SPLIT_WAVES * multiprocessor_count(device)
    by_occupancy = max(1, target // max(1, other_programs))
    by_memory = max(1, PARTIALS_BUDGET_BYTES // (4 * partial_elems))
    n_splits = max(1, min(m_tiles, by_memory, by_occupancy))
    tiles = cdiv(m_tiles, n_splits)
    return max(1, cdiv(m_tiles, tiles)), tiles


# --------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------

@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, row_ok, col_ok):
    """The [len(rows), len(cols)] tile ``T[rows, cols]`` of a strided matrix; 0 where masked."""
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def store_tile(ptr, rows, cols, stride_row, stride_col, row_ok, col_ok, value):
    """``T[rows, cols] = value`` (cast to T's dtype) where ``row_ok`` and ``col_ok``."""
    tl.store(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
             value.to(ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def chunk_rows(sorted_rows_ptr, chunk_start_ptr, chunk_len_ptr, chunk, BM: tl.constexpr):
    """(rows, row_ok): the original row indices (int64) of a segment plan's chunk ``chunk``
    (the multi-adapter and delta kernels' row tile), masked to its length."""
    start = tl.load(chunk_start_ptr + chunk)
    length = tl.load(chunk_len_ptr + chunk)
    offs = tl.arange(0, BM)
    row_ok = offs < length
    rows = tl.load(sorted_rows_ptr + start + offs, mask=row_ok, other=0).to(tl.int64)
    return rows, row_ok


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a linear program id to (tile_m, tile_n), GROUP_M row tiles at a time.

    Consecutive programs then share the same few row tiles of X and sweep
    the columns of W, so both stay in L2 (Triton tutorial 03).
    """
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    tile_m = first_m + ((pid % per_group) % group_size)
    tile_n = (pid % per_group) // group_size
    return tile_m, tile_n


@triton.jit
def dropout_keep(seed_ptr, rows, cols, n_cols, p):
    """Keep-mask [len(rows), len(cols)] for element (row, col) of an [*, n_cols] matrix.

    Bit-identical to ``tl.rand(seed, row * n_cols + col) >= p`` (the reference
    reproduces it), but the 64-bit Philox counter ``(lo, hi)`` is built from one
    int64 product per row plus 32-bit arithmetic per element: a full tile of
    int64 offsets kept the dX GEMM's prologue above 255 registers (it spilled).
    """
    seed = tl.load(seed_ptr)
    row_start = rows * n_cols
    start_lo = row_start.to(tl.uint32)[:, None]
    start_hi = (row_start >> 32).to(tl.uint32)[:, None]
    lo = start_lo + cols.to(tl.uint32)[None, :]
    hi = start_hi + (lo < start_lo).to(tl.uint32)  # carry out of the low word
    zero = lo * 0
    bits, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    return tl.uint_to_uniform_float(bits) >= p


@triton.jit
def matmul_k_loop(acc, x_ptr, rows, row_ok, stride_xm, stride_xk,
                  w_ptr, cols, col_ok, stride_wk, stride_wn,
                  k_begin, k_len, K, seed_ptr, dropout_p,
                  DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BK: tl.constexpr):
    """``acc + drop(X)[rows, ks] · W[ks, cols]`` over ``ks = [k_begin, k_begin + k_len) ∩ [0, K)``.

    ``W[k, c]`` is read at ``w_ptr + k * stride_wk + c * stride_wn`` (so an
    [N, K] weight gives Wᵀ). DROPOUT: X's tile is multiplied by the keep-mask of
    an [*, K] matrix (not by 1/(1-p): the caller scales the sum once).
    ``k_len`` is a multiple of BK unless the range ends at K (it must not reach
    into the next split-K range). Inlined: against the three loops it replaced the
    compile test (178 cases) measured the same registers, shared memory and MMA
    counts, except the shrink with dropout at BR=256 on sm_80 (178 -> 180 registers,
    no spill; the TTIR differs only in the order of its constants).
    """
    for k0 in range(0, k_len, BK):
        ks = k_begin + k0 + tl.arange(0, BK).to(tl.int64)
        k_ok = ks < K
        x_tile = load_tile(x_ptr, rows, ks, stride_xm, stride_xk, row_ok, k_ok)
        if DROPOUT:
            x_tile = tl.where(dropout_keep(seed_ptr, rows, ks, K, dropout_p), x_tile, 0.0)
        w_tile = load_tile(w_ptr, ks, cols, stride_wk, stride_wn, k_ok, col_ok)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=PRECISION)
    return acc


#: Whether launches take ``JITFunction.run``: decided once, on the type ``triton.jit`` gives
#: kernels in this process (``JITFunction``, or the interpreter's ``InterpretedFunction``).
RUN_IS_LAUNCH = _run_takes_launch_keywords(type(load_tile))

#: ``runner(kernel)`` is what a launch calls: ``runner(kernel)(*args, grid=, warmup=False,
#: num_warps=, num_stages=)``. ``kernel.run`` (what ``kernel[grid](*args, **options)`` calls, less
#: the lambda it builds per launch; an ``attrgetter``: no Python frame) where ``run`` is the
#: private method of that signature; else (a Triton that renamed or changed it) the same call
#: through the public ``kernel[grid](...)``: slower, never wrong.
runner: Callable = operator.attrgetter("run") if RUN_IS_LAUNCH else public_runner
