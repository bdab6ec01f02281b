"""Measured choice of a strategy and block config per shape bucket, cached on disk.

``choose(op, x, weight, lora_A, dropout_p)`` returns ``(strategy, config)`` for
the kernels (:mod:`lora_fused.kernels.lora_linear`: ``lora_forward(...,
strategy=, config=)``); a config of ``None`` means the regime's default. This is the one
source of which strategy a call runs; the kernels only say which strategies exist where.

In order:

1. a strategy forced by ``lf.use_strategy``;
2. the choice cached for the shape bucket (in memory, loaded once from disk);
3. on CUDA, with ``LORA_FUSED_AUTOTUNE`` not ``0``, outside ``torch.compile``
   tracing and outside CUDA-graph capture: time every candidate (strategies x
   block configs, :func:`candidates`) with :data:`timer` (``triton.testing.do_bench``),
   keep the fastest, persist it;
4. else the heuristic table (:func:`heuristic`). Nothing is timed while tracing
   or capturing: a kernel launch there would be recorded, and a timing is a sync.

``triton_forward`` / ``triton_backward`` (what ``ops`` calls on the Triton path) run
the op with that choice through the kernels' launcher for the call's signature
(shapes, strides, dtype, device, flags), built once and kept: a repeated call costs
one tuple key, one dict lookup, its allocations and its launches (goal H7, bench/goals.py).

The multi-adapter op is not measured: its regime is its segment plan's
(:mod:`lora_fused.dispatch.segments`), chosen by the number of rows, or forced.

Grouped expert LoRA (op name "grouped_lora", :func:`choose_grouped`): the same steps and cache,
one strategy per bucket for forward and backward alike (kernels/moe_lora.py: "grouped_mm" or
"fused"; no config), timed as a forward plus a backward; its bucket is (GPU name, dtype, op, pairs
rounded up to a power of two, E, N, K, padded r, dropout).

Shape bucket: (GPU name, dtype, op, M rounded up to a power of two, N, K, padded
r, dropout on/off). The cache is JSON under ``$LORA_FUSED_CACHE_DIR`` (default
``~/.cache/lora_fused``), one file per (torch, triton) version pair. A write
re-reads the file under an advisory lock, merges, writes a temporary file in the
same directory and renames it over the old one, so concurrent processes (DDP
ranks) never see a half-written file nor lose each other's entries. A corrupt or
foreign file is ignored with one warning (and replaced on the next write).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from . import strategies
from .backend import kernel_common, lora_kernels, moe_kernels, on_tensor_device

AUTOTUNE_ENV = "LORA_FUSED_AUTOTUNE"
CACHE_DIR_ENV = "LORA_FUSED_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/lora_fused")
FORMAT = 1
OPS = ("forward", "backward")

Choice = tuple[Optional[str], Optional[str]]


def _do_bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the current stream (few, short repetitions:
    first sight of a bucket times up to ~12 candidates)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))


#: ``timer(run) -> milliseconds``; ``run.candidate`` is its (strategy, config).
#: Tests replace it with a fake (no GPU needed, deterministic).
timer: Callable[[Callable[[], object]], float] = _do_bench

# ------------------------------------------------------------------ bucket key


@functools.cache
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def bucket(op: str, x: torch.Tensor, weight: torch.Tensor, r: int, dropout: bool) -> tuple:
    """(GPU name, dtype, op, M rounded up to a power of two, N, K, padded r, dropout)."""
    M, K = x.shape[0], x.shape[-1]
    m_bucket = 1 << max(0, M - 1).bit_length()
    return (_device_name(x.device), str(x.dtype).removeprefix("torch."), op, m_bucket,
            weight.shape[0], K, _kernels().padded_rank(r), int(bool(dropout)))


def _key_text(key: tuple) -> str:
    return "|".join(str(part) for part in key)


# ------------------------------------------------------------------ the file


@functools.cache
def cache_path() -> Path:
    """The cache file for this torch and triton under ``$LORA_FUSED_CACHE_DIR`` (read once;
    :func:`reset` reads it again)."""
    root = os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
    return Path(root).expanduser() / _file_name()


@functools.cache
def _versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version}


def _file_name() -> str:
    v = _versions()
    safe = lambda s: "".join(c if c.isalnum() or c in ".-" else "_" for c in s)  # noqa: E731
    return f"choices-torch{safe(v['torch'])}-triton{safe(v['triton'])}.json"


_warned: set[str] = set()


def _warn_once(path: Path, why: str) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        warnings.warn(f"lora_fused: ignoring the strategy cache {path} ({why}); "
                      "it is rewritten on the next measurement", RuntimeWarning, stacklevel=3)


def _valid_entry(value) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("strategy"), str)
            and (value.get("config") is None or isinstance(value.get("config"), str)))


def read_file(path: Path, warn: bool = True) -> dict[str, dict]:
    """The entries of the cache file at ``path``; {} if absent, corrupt or foreign."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        if warn:
            _warn_once(path, f"unreadable: {e}")
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("versions") == _versions()
            and isinstance(data.get("entries"), dict)):
        if warn:
            _warn_once(path, "not a lora_fused cache of this torch and triton version")
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(k, str) and _valid_entry(v)}


@contextlib.contextmanager
def _locked(path: Path):
    """An advisory lock on ``path``.lock (POSIX; elsewhere the atomic rename alone)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_entries(path: Path, new: dict[str, dict]) -> dict[str, dict]:
    """Merge ``new`` into the file at ``path`` (atomically); returns what the file now holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        entries = {**read_file(path, warn=False), **new}
        data = {"format": FORMAT, "versions": _versions(), "entries": dict(sorted(entries.items()))}
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return entries


# ------------------------------------------------------------------ in memory

#: Choices by cache path, then by bucket key tuple: loaded once per path.
_tables: dict[str, dict[tuple, Choice]] = {}


def _table(path: Path) -> dict[tuple, Choice]:
    table = _tables.get(str(path))
    if table is None:
        table = {}
        for text, value in read_file(path).items():
            table[_parse_key(text)] = (value["strategy"], value.get("config"))
        _tables[str(path)] = table
    return table


def _parse_key(text: str) -> tuple:
    parts = text.split("|")
    return tuple(int(p) if p.lstrip("-").isdigit() and i >= 3 else p for i, p in enumerate(parts))


#: Choices by (op, device, dtype, M bucket, N, K, r, dropout): the per-call lookup, one
#: dict access with no string built. Filled from the bucket table (or the heuristic
#: where measuring can never happen here), so it holds nothing the file contradicts.
_fast: dict[tuple, Choice] = {}


def reset() -> None:
    """Forget what was loaded and the cache directory (tests; a new process starts this way)."""
    _tables.clear()
    _fast.clear()
    _launchers.clear()
    _warned.clear()
    cache_path.cache_clear()


def remember(key: tuple, choice: Choice, ms: Optional[float] = None) -> None:
    """Keep ``choice`` for ``key`` in memory and on disk."""
    path = cache_path()
    _table(path)[key] = choice
    _launchers.clear()  # a launcher holds the choice it was built for
    entry = {"strategy": choice[0], "config": choice[1]}
    if ms is not None and math.isfinite(ms):
        entry["ms"] = round(ms, 5)
    try:
        write_entries(path, {_key_text(key): entry})
    except OSError as e:  # a read-only home must not break training: keep it in memory
        _warn_once(path, f"cannot write: {e}")


def cached(key: tuple) -> Optional[Choice]:
    return _table(cache_path()).get(key)


# ------------------------------------------------------------------ the choice


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1").strip() != "0"


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _measurable_device(x: torch.Tensor) -> bool:
    """Timings mean something on a GPU only (tests replace this to time on CPU)."""
    return x.device.type == "cuda"


def heuristic(op: str, x: torch.Tensor) -> Choice:
    """The choice without a measurement (``op``: "forward" | "backward").

    On CUDA both directions are "composite": its base GEMM is the vendor's (the
    floor the strategies exist for: never slower than the eager three-GEMM code,
    which reads and writes more), and no Triton GEMM here has been timed on a GPU.
    Elsewhere (the interpreter) "fused", so the CPU tests keep running the Triton
    GEMMs (a forward runs it as "shrink_first" where the fused K loop does not exist).
    """
    return ("composite" if x.device.type == "cuda" else "fused", None)


def _forced(op: str) -> Optional[str]:
    choice = strategies.current_strategy()
    forced = getattr(choice, op)
    return None if forced == strategies.AUTO else forced


def candidates(op: str, M: int, r: int, dropout: bool) -> list[tuple[str, str]]:
    """(strategy, config) pairs timed for ``op`` (the kernels' CANDIDATE_CONFIGS)."""
    kernels = _kernels()
    if op == "forward":
        return kernels.forward_candidates(M, r, dropout)
    if op == "backward":
        return kernels.backward_candidates(M, r, dropout)
    raise ValueError(f"op must be one of ('forward', 'backward') to list candidates, got {op!r}")


class _Run:
    """A callable running one candidate; ``candidate`` names it (for the timer)."""

    def __init__(self, candidate: tuple[str, Optional[str]], fn: Callable[[], object]):
        self.candidate = candidate
        self._fn = fn

    def __call__(self):
        return self._fn()


def _runs(op: str, x, weight, lora_A, dropout_p: float) -> list[_Run]:
    """One run per candidate, on stand-in operands of the real shapes (x and W0 are the
    caller's, read only; the rest deterministic constants: no RNG state is consumed)."""
    kernels = _kernels()
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    const = lambda *shape: torch.full(shape, 0.01, device=x.device, dtype=x.dtype)  # noqa: E731
    lora_B, seed = const(N, r), torch.zeros(1, dtype=torch.int64, device=x.device)
    if op == "forward":
        def make(strategy, config):
            return lambda: kernels.lora_forward(x, weight, None, lora_A, lora_B, 1.0, dropout_p, seed,
                                                strategy=strategy, config=config)
    else:
        grad_y, shrink = const(M, N), const(M, r)

        def make(strategy, config):
            return lambda: kernels.lora_backward(grad_y, x, weight, lora_A, lora_B, shrink, 1.0, dropout_p,
                                                 seed, True, True, strategy=strategy, config=config)
    return [_Run(c, make(*c)) for c in candidates(op, M, r, kernels.dropout_on(dropout_p))]


def measure(runs: list[_Run]) -> tuple[Optional[tuple], float]:
    """(fastest candidate, its ms) by :data:`timer`; a candidate that fails is skipped
    (e.g. out of resources on this GPU). (None, inf) when every one failed."""
    best, best_ms = None, math.inf
    for run in runs:
        try:
            ms = timer(run)
        except Exception as e:  # noqa: BLE001 - any launch failure disqualifies a candidate
            warnings.warn(f"lora_fused: candidate {run.candidate} failed while timing ({type(e).__name__}: "
                          f"{e}); skipped", RuntimeWarning, stacklevel=2)
            continue
        if ms < best_ms:
            best, best_ms = run.candidate, ms
    return best, best_ms


def choose(op: str, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, dropout_p: float) -> Choice:
    """(strategy, config) for one call of ``op`` ("forward" | "backward").

    x [M, K] 2-D, weight [N, K], lora_A [r, K]. Costs one ContextVar read, a few shape
    reads and one dict lookup when the bucket was seen before.
    """
    return _choose(op, x, weight, lora_A, dropout_p)[0]


def _choose(op, x, weight, lora_A, dropout_p) -> tuple[Choice, bool]:
    """(``choose``'s answer, whether it holds for every later call of this bucket while nothing
    is forced: False for the heuristic given while compiling or capturing, "this time only")."""
    forced = _forced(op)
    if forced is not None:
        return (forced, None), True
    M = x.shape[0]
    dropout = _kernels().dropout_on(dropout_p)
    fast_key = (op, x.device, x.dtype, 1 << max(0, M - 1).bit_length(), weight.shape[0], x.shape[-1],
                lora_A.shape[-2], dropout)
    hit = _fast.get(fast_key)
    if hit is not None:
        return hit, True
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return _cached_or_measured(fast_key, bucket(op, x, weight, lora_A.shape[-2], dropout), x,
                               lambda: heuristic(op, x), lambda: _runs(op, x, weight, lora_A, dropout_p))


def _cached_or_measured(fast_key: tuple, key: tuple, x: torch.Tensor, fallback: Callable[[], Choice],
                        runs: Callable[[], list]) -> tuple[Choice, bool]:
    """The choice for a bucket missing from ``_fast``, as :func:`_choose` answers: the cache
    file's, else ``fallback()`` where nothing is measured (for good in this process; this time
    only while compiling or capturing, or when every candidate failed), else the fastest of
    ``runs()``, remembered. A lone candidate is taken untimed and not written to the file."""
    hit = cached(key)
    if hit is None:
        if not (_measurable_device(x) and autotune_enabled()):
            hit = fallback()  # for good in this process: never measured here
        elif torch.compiler.is_compiling() or capturing():
            return fallback(), False  # this time only: measured on a later eager call
        else:
            candidates = runs()
            best, ms = measure(candidates) if len(candidates) > 1 else (candidates[0].candidate, None)
            if best is None:
                return fallback(), False
            if ms is not None:
                remember(key, best, ms)
            hit = best
    _fast[fast_key] = hit
    return hit, True


# ------------------------------------------------------------------ grouped expert LoRA
GROUPED_OP = "grouped_lora"


def grouped_heuristic(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The grouped strategy without a measurement: on CUDA the vendor grouped GEMM where it takes
    the problem (the base GEMM the strategies exist to match), else and elsewhere "fused"."""
    if x.device.type == "cuda" and "grouped_mm" in moe_kernels().grouped_candidates(x, weight):
        return "grouped_mm"
    return "fused"


def _grouped_runs(num_pairs: int, x, weight, lora_A, dropout_p: float) -> list[_Run]:
    """One forward + backward per candidate on stand-in operands of the call's sizes: pairs in
    sorted order, spread evenly over the experts (deterministic constants, no RNG consumed)."""
    moe = moe_kernels()
    E, N, K = weight.shape
    r = lora_A.shape[1]
    const = lambda *shape: torch.full(shape, 0.01, device=x.device, dtype=x.dtype)  # noqa: E731
    x_sorted, lora_B, grad_y = const(num_pairs, K), const(E, N, r), const(num_pairs, N)
    offsets = ((torch.arange(1, E + 1, device=x.device) * num_pairs) // E).to(torch.int32)
    seed = torch.zeros(1, dtype=torch.int64, device=x.device)

    def make(strategy):
        def step():
            _, s = moe.grouped_lora_forward(x_sorted, None, weight, None, lora_A, lora_B, offsets, 1.0, dropout_p,
                                            seed, strategy=strategy)
            return moe.grouped_lora_backward(grad_y, x_sorted, None, weight, lora_A, lora_B, s, offsets, 1.0,
                                             dropout_p, seed, True, True, strategy=strategy)
        return step
    return [_Run((strategy, None), make(strategy)) for strategy in moe.grouped_candidates(x, weight)]


def choose_grouped(num_pairs: int, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                   dropout_p: float) -> str:
    """The strategy ("grouped_mm" | "fused") for a grouped LoRA call of ``num_pairs`` sorted pairs:
    forced by ``lf.use_strategy(grouped=...)``, else cached for the bucket, else measured (CUDA,
    autotune on, not tracing or capturing), else :func:`grouped_heuristic`. weight [E, N, K],
    lora_A [E, r, K]. A seen bucket costs a ContextVar read and one dict lookup."""
    forced = strategies.CURRENT.get().grouped
    if forced != strategies.AUTO:
        return forced
    dropout = dropout_p > 0.0
    E, N, K = weight.shape
    fast_key = (GROUPED_OP, x.device, x.dtype, 1 << max(0, num_pairs - 1).bit_length(), E, N, K, lora_A.shape[1],
                dropout)
    hit = _fast.get(fast_key)
    if hit is not None:
        return hit[0]
    key = (_device_name(x.device), str(x.dtype).removeprefix("torch."), GROUPED_OP, fast_key[3], E, N, K,
           _kernels().padded_rank(lora_A.shape[1]), int(dropout))
    (strategy, _), _ = _cached_or_measured(fast_key, key, x, lambda: (grouped_heuristic(x, weight), None),
                                           lambda: _grouped_runs(num_pairs, x, weight, lora_A, dropout_p))
    return strategy


# ------------------------------------------------------------------ launchers by call signature

#: The kernels' launchers (``forward_launcher`` / ``backward_launcher``) by call signature:
#: the op, its forced strategy, the interpreter switch, the dot precision (TF32 setting), dtype,
#: device, the flags (p a tensor, dropout on: the kernels' ``dropout_on`` written out, a call
#: less; seed, s a tensor, bias) and the shapes and strides of the operands (one flat tuple:
#: ~2 µs to build and look up). Shapes the op's validation ties to others are left out (lora_B
#: [N, r] by weight [N, K] and lora_A [r, K]; bias [N]). A launcher holds its choice, so only
#: choices that hold for good are cached (not the heuristic of a compiling or capturing call),
#: and the table is cleared with the choices (``reset``, ``remember``). Bounded by the kernels'
#: ``LAUNCHERS_MAX`` (``kernels/common.py``: ``keep_launcher``).
_launchers: dict = {}


@on_tensor_device
def triton_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """``(y, S)`` of the Triton forward (``kernels.lora_forward`` with :func:`choose`'s strategy
    and config); a repeated call signature costs one dict lookup besides allocation and launches."""
    kernels = _kernels()
    p_tensor = isinstance(dropout_p, torch.Tensor)
    key = ("forward", strategies.CURRENT.get().forward, kernels.interpreting(), kernels.dot_precision(x.dtype),
           x.dtype, x.device, p_tensor, p_tensor or dropout_p > 0.0, seed is None, isinstance(scaling, torch.Tensor),
           x.shape, x.stride(), weight.shape, weight.stride(), lora_A.shape, lora_A.stride(), lora_B.stride(),
           None if bias is None else bias.stride())
    run = _launchers.get(key)
    if run is None:
        (strategy, config), for_good = _choose("forward", x, weight, lora_A, dropout_p)
        run = kernels.forward_launcher(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, strategy, config)
        if for_good:
            kernel_common().keep_launcher(_launchers, key, run)
    return run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@on_tensor_device
def triton_backward(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed, need_dx, need_dlora):
    """``(dX, dA, dB)`` of the Triton backward (``kernels.lora_backward``), as :func:`triton_forward`."""
    kernels = _kernels()
    p_tensor = isinstance(dropout_p, torch.Tensor)
    key = ("backward", strategies.CURRENT.get().backward, kernels.interpreting(), kernels.dot_precision(x.dtype),
           x.dtype, x.device, p_tensor, p_tensor or dropout_p > 0.0, seed is None, isinstance(scaling, torch.Tensor),
           need_dx, need_dlora, grad_y.shape, grad_y.stride(), x.stride(), weight.shape, weight.stride(),
           lora_A.shape, lora_A.stride(), lora_B.stride(), shrink.stride(), lora_A.dtype, lora_B.dtype)
    run = _launchers.get(key)
    if run is None:
        (strategy, config), for_good = _choose("backward", x, weight, lora_A, dropout_p)
        run = kernels.backward_launcher(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed,
                                        need_dx, need_dlora, strategy, config)
        if for_good:
            kernel_common().keep_launcher(_launchers, key, run)
    return run(grad_y, x, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed)


_kernel_module = None


def _kernels():
    """``lora_fused.kernels.lora_linear`` (imported on the first Triton call: it imports triton)."""
    global _kernel_module
    if _kernel_module is None:
        _kernel_module = lora_kernels()
    return _kernel_module


# ------------------------------------------------------------------ ahead of time

#: Linear layers of a model as (name, out N, in K): what ``python -m bench --tune`` fills.
MODEL_SHAPES: dict[str, tuple[tuple[str, int, int], ...]] = {
    "llama-7b": (("q|k|v|o_proj", 4096, 4096), ("gate|up_proj", 11008, 4096), ("down_proj", 4096, 11008)),
    "llama-3-8b": (("q|o_proj", 4096, 4096), ("k|v_proj", 1024, 4096), ("gate|up_proj", 14336, 4096),
                   ("down_proj", 4096, 14336)),
}
#: Token counts tuned by default: one M per bucket from decode (1) to long prefill.
DEFAULT_TOKENS = (1, 16, 64, 256, 1024, 4096, 8192)


def tune(shapes, *, tokens=DEFAULT_TOKENS, rank: int = 16, dtype=torch.bfloat16, dropout_p: float = 0.0,
         device="cuda", report: Optional[Callable[[str], None]] = None) -> list[tuple]:
    """Measure (and cache) forward and backward choices for every (layer, tokens) ahead of
    time; returns rows (name, M, N, K, op, strategy, config). Already cached buckets are not
    re-timed. Off CUDA nothing is measured: the rows show the heuristic."""
    rows = []
    for name, N, K in shapes:
        weight = torch.full((N, K), 0.01, device=device, dtype=dtype)
        lora_A = torch.full((rank, K), 0.01, device=device, dtype=dtype)
        for M in tokens:
            x = torch.full((M, K), 0.01, device=device, dtype=dtype)
            for op in ("forward", "backward"):
                strategy, config = choose(op, x, weight, lora_A, dropout_p)
                rows.append((name, M, N, K, op, strategy or "default", config or "default"))
                if report is not None:
                    report(f"{name:14s} M={M:<6d} N={N:<6d} K={K:<6d} r={rank:<4d} p={dropout_p:<4g} "
                           f"{op:8s} -> {strategy or 'default'} / {config or 'default'}")
            del x
    return rows
