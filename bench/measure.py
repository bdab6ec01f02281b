"""Measurement: timing, peak memory, saved-activation bytes, bytes allocated, GPU ceilings.

Timing on CUDA is ``triton.testing.do_bench`` (CUDA events; median with 20/80 %
quantiles; it zeroes a 256 MB buffer before every call, flushing L2), after a
first call outside the timed region (compilation, autotuning, allocator
warm-up). Decode-sized forwards are also timed as CUDA-graph replays of several
back-to-back calls, which removes Python and launch overhead. Callers rotate
several random input sets so that repeated calls do not read weights from L2.
On a CPU, a perf_counter loop gives the same statistics: it proves the harness,
it is not a GPU measurement.

Ceilings (measured first, on the run's own device): a dense matrix product of
random data per dtype (bf16 always on a GPU) and a device-to-device copy
(bytes read + written). A row's ``pct_peak`` is its roofline floor
``max(flops / gemm peak, bytes / copy peak)`` over its measured time.
"""
from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: An H200's dense bf16 GEMM and copy rates (the device the goals are set for), used only where
#: measuring the ceilings fails, so the rows still show a %peak; the run's notes say so.
H200_FALLBACK = {"gemm_tflops": 790.0, "copy_gbs": 4300.0}


@dataclass
class Timing:
    median: float   # ms
    q20: float
    q80: float
    method: str

    def as_dict(self) -> dict:
        return dict(median_ms=self.median, q20_ms=self.q20, q80_ms=self.q80, method=self.method)


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """(median, 20 %, 80 %) of ``times`` (one time: itself three times)."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    qs = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), qs[1], qs[7]


def time_cuda(fn: Callable, *, grad_to_none=None, warmup: int = 25, rep: int = 100) -> Timing:
    """do_bench median and 20/80 % quantiles (ms), one call first outside the timing."""
    import triton.testing
    fn()
    torch.cuda.synchronize()
    med, q20, q80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                            quantiles=[0.5, 0.2, 0.8])
    return Timing(med, q20, q80, "do_bench")


def time_cuda_graph(fn: Callable, *, calls: int, warmup: int = 25, rep: int = 100) -> Timing:
    """Per-call time of ``calls`` back-to-back calls of ``fn`` captured in one CUDA graph
    (``fn`` rotates its input sets, so the graph holds every set). No autograd."""
    import triton.testing
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # compile, autotune, allocator warm-up: outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph), torch.no_grad():
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        med, q20, q80 = triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep,
                                                quantiles=[0.5, 0.2, 0.8])
    finally:
        del graph
    return Timing(med / calls, q20 / calls, q80 / calls, f"cuda-graph x{calls}")


def time_cpu(fn: Callable, *, grad_to_none=None, budget_s: float = 0.08, min_iters: int = 3,
             max_iters: int = 50) -> Timing:
    """perf_counter median and 20/80 % quantiles (ms) after two warm-up calls."""
    for _ in range(2):
        for t in grad_to_none or ():
            t.grad = None
        fn()
    times = []
    stop = time.perf_counter() + budget_s
    while len(times) < min_iters or (time.perf_counter() < stop and len(times) < max_iters):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    med, q20, q80 = quantiles(times)
    return Timing(med, q20, q80, f"perf_counter x{len(times)}")


def peak_memory(fn: Callable, *, cuda: bool, grad_to_none=None) -> Optional[int]:
    """Bytes allocated at the peak of one call of ``fn`` above what was allocated before
    (``torch.cuda.max_memory_allocated`` after a reset); None for a CPU run."""
    if not cuda:
        return None
    for t in grad_to_none or ():
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    for t in grad_to_none or ():
        t.grad = None
    return int(peak)


def storage_ptrs(tensors: Iterable[torch.Tensor]) -> set:
    out = set()
    for t in tensors:
        if t is not None:
            out.add(t.untyped_storage().data_ptr())
    return out


@dataclass
class Saved:
    bytes: int
    storages: int
    kinds: list = field(default_factory=list)
    held_bytes: Optional[int] = None   # CUDA: memory still allocated after the forward, outputs excluded

    def as_dict(self) -> dict:
        return asdict(self)


def saved_bytes(run: Callable[[], list], exclude: set, *, cuda: bool) -> Saved:
    """Bytes autograd saves for backward during ``run()`` (saved_tensors_hooks): each
    storage counted once, at its full size; storages in ``exclude`` (parameters, frozen
    weights) not counted. The outputs are dropped before returning."""
    seen: dict[int, int] = {}
    kinds: dict[int, str] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
        except Exception:  # a tensor without storage (subclass, fake): not memory we can see
            return t
        if n and ptr not in exclude:
            seen[ptr] = max(seen.get(ptr, 0), n)
            kinds[ptr] = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
        return t

    mem0 = None
    if cuda:
        torch.cuda.synchronize()
        mem0 = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = run()
    held = None
    if cuda:
        torch.cuda.synchronize()
        out_bytes = sum(o.untyped_storage().nbytes() for o in outs)
        held = int(torch.cuda.memory_allocated() - mem0 - out_bytes)
    del outs
    return Saved(int(sum(seen.values())), len(seen), sorted(kinds.values()), held)


@dataclass
class Allocated:
    """What one call allocated: every new tensor storage an op returned, summed (``bytes``,
    ``tensors``), and the most of those alive at one time (``peak_bytes``)."""
    bytes: int
    tensors: int
    peak_bytes: int


class AllocationCounter(TorchDispatchMode):
    """Counts the storage of every tensor an op returns that shares no storage with the op's
    inputs: new memory. Views, in-place and ``out=`` results alias an input and count nothing;
    what an op allocates and frees inside itself is not seen. A counted storage leaves the live
    total when it is freed (``weakref.finalize`` on the storage's Python object, which lives as
    long as the storage does), so ``peak`` is the most counted memory alive at once. Backward
    ops are seen too (autograd carries the mode into its engine)."""

    def __init__(self):
        super().__init__()
        self.bytes = self.tensors = self.live = self.peak = 0
        self._finalizers: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t, inputs)
        return out

    def _count(self, t: torch.Tensor, seen: set) -> None:
        try:
            storage = t.untyped_storage()
        except Exception:  # a tensor without storage (sparse, a subclass): not memory we can see
            return
        ptr, n = storage.data_ptr(), storage.nbytes()
        if not n or ptr in seen:
            return
        seen.add(ptr)  # two outputs over one new storage count once
        self.bytes += n
        self.tensors += 1
        self.live += n
        self.peak = max(self.peak, self.live)
        self._finalizers.append(weakref.finalize(storage, self._freed, n))

    def _freed(self, n: int) -> None:
        self.live -= n

    def __exit__(self, *exc):
        for f in self._finalizers:  # storages that outlive the count (outputs, grads) stop reporting
            f.detach()
        self._finalizers.clear()
        return super().__exit__(*exc)

    def result(self) -> Allocated:
        return Allocated(self.bytes, self.tensors, self.peak)


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:
        return -1


def allocated_bytes(fn: Callable[[], object], *, grad_to_none=()) -> Allocated:
    """:class:`Allocated` by one call of ``fn`` (e.g. a training step: forward + backward), the
    ``grad_to_none`` tensors' gradients reset before and after (so the step's own are counted)."""
    for t in grad_to_none:
        t.grad = None
    with AllocationCounter() as counter:
        out = fn()
        del out
    for t in grad_to_none:
        t.grad = None
    return counter.result()


# --------------------------------------------------------------------------
# Ceilings
# --------------------------------------------------------------------------
@dataclass
class Ceilings:
    gemm_tflops: dict          # dtype name -> TFLOP/s of a dense matrix product on random data
    copy_gbs: float            # device-to-device copy, GB/s (bytes read + written)
    method: str
    gpu: bool
    notes: list = field(default_factory=list)

    def floor_ms(self, flops: float, nbytes: float, dtype: str) -> tuple[Optional[float], str]:
        """Roofline floor (ms) and which side bounds it."""
        peak = self.gemm_tflops.get(dtype)
        if not peak or not self.copy_gbs:
            return None, ""
        t_math = flops / (peak * 1e12) * 1e3
        t_mem = nbytes / (self.copy_gbs * 1e9) * 1e3
        return max(t_math, t_mem), ("math" if t_math >= t_mem else "memory")

    def as_dict(self) -> dict:
        return asdict(self)


def measure_ceilings(device: torch.device, dtypes: Iterable[str], *, warmup=25, rep=100) -> Ceilings:
    """The matrix-product rate per dtype (bf16 first on a GPU) and the copy bandwidth."""
    cuda = device.type == "cuda"
    names = list(dict.fromkeys((["bf16"] if cuda else []) + list(dtypes)))
    gemm, notes = {}, []
    g = torch.Generator(device=device).manual_seed(1234)
    for name in names:
        dt = TORCH_DTYPES[name]
        n = (8192 if name != "fp32" else 4096) if cuda else 256
        try:
            a = torch.randn(n, n, device=device, generator=g).to(dt)
            b = torch.randn(n, n, device=device, generator=g).to(dt)

            def mm(a=a, b=b):
                return torch.mm(a, b)
            t = time_cuda(mm, warmup=warmup, rep=rep) if cuda else time_cpu(mm, budget_s=0.05)
            gemm[name] = 2 * n ** 3 / (t.median * 1e-3) / 1e12
            del a, b
        except Exception as exc:  # keep going: the rows then show no %peak for this dtype
            notes.append(f"gemm {name} {n}^3 failed: {type(exc).__name__}: {exc}"[:200])
            if cuda and name in ("bf16", "fp16"):
                gemm[name] = H200_FALLBACK["gemm_tflops"]
                notes.append(f"gemm {name}: using {H200_FALLBACK['gemm_tflops']} TFLOP/s (an H200's)")
    nbytes = (1 << 30) if cuda else (16 << 20)
    copy = None
    try:
        src = torch.randn(nbytes // 4, device=device, generator=g)
        dst = torch.empty_like(src)

        def cp(src=src, dst=dst):
            return dst.copy_(src)
        t = time_cuda(cp, warmup=warmup, rep=rep) if cuda else time_cpu(cp, budget_s=0.05)
        copy = 2 * nbytes / (t.median * 1e-3) / 1e9
        del src, dst
    except Exception as exc:
        notes.append(f"copy failed: {type(exc).__name__}: {exc}"[:200])
        if cuda:
            copy = H200_FALLBACK["copy_gbs"]
            notes.append(f"copy: using {copy} GB/s (an H200's)")
    if cuda:
        torch.cuda.empty_cache()
    method = ("do_bench median: mm n=8192 (fp32: 4096) on random data; 1 GiB copy_" if cuda
              else "CPU perf_counter: mm n=256, 16 MiB copy_ (not a GPU measurement)")
    return Ceilings(gemm, copy or 0.0, method, cuda, notes)
