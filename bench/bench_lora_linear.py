#!/usr/bin/env python
"""Speed and memory of one LoRA linear layer against the project's goals.

    python bench/bench_lora_linear.py [--quick] [--dtype bf16] [--out DIR]

Cases (bf16, r=16, 4096 -> 4096 on a GPU):

  P1  forward, M=8192:             fused / base (F.linear alone)          <= 1.06
  P2  forward, M <= 16 (decode):   fused / base, CUDA-graph replay        <= 1.10
      (eager-launch times are printed beside it, as info: at M=1 they
      measure Python/launch overhead, not the kernels)
  P3  forward + backward, M=8192, x requires grad, W frozen:
        fused / base (frozen-base linear's fwd+bwd)                       <= 1.12
        PEFT's LoraLayer / fused (or loralib-style eager, when peft is
        missing: the table says which)                                    >= 1.35
      each at lora dropout 0.0 and 0.1 (two goal lines each)
  P4  saved activation bytes, q/k/v projections sharing one input,
      lora dropout 0.1: fused / PEFT-style                                <= 0.35
      (saved_tensors_hooks, each storage counted once, parameters not
      counted; works on CPU too: fp32, 1024 -> 1024, r=16, M=512)

Providers: fused (lf.lora_linear), eager (F.linear(x,W) + s*F.linear(F.linear(drop(x),A),B)),
base (F.linear(x, W)), merged (F.linear(x, W + s*B@A)), peft (peft's lora.Linear, when importable).

Timing on CUDA: triton.testing.do_bench (median and 20/80 % quantiles; it
flushes L2 before each run), warm-up and compilation outside the timed region,
random data (never zeros), several input sets rotated between calls so the
weights are not served from L2. On CPU there is no GPU measurement: the script
runs small shapes on the torch paths to prove the harness and says so.

FLOPs and bytes of a case count the LoRA layer's work once, for every provider
(so TFLOP/s and GB/s are "useful work per second"):
  forward      flops 2MNK + 2MKr + 2MNr               bytes es*(MK + NK + rK + Nr + MN + Mr)
  fwd+bwd      flops 4MNK + 6MKr + 6MNr               bytes forward + es*(MN dY + NK W + MK x + MK dX
                                                             + rK + Nr + rK dA + Nr dB + 2Mr S,dS)
(es = bytes per element, M rows, K = in, N = out, r = rank).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import lora_fused as lf  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Reference ceilings of one H200 measured in this workplace (KINDS.md): dense bf16
#: matrix product on random data and device-to-device copy bandwidth.
H200_TFLOPS = 790.0
H200_TBS = 4.3
GOALS = {
    "P1": ("<=", 1.06, "forward, large M: fused / base"),
    "P2": ("<=", 1.10, "forward, M<=16: fused / base"),
    "P3": ("<=", 1.12, "fwd+bwd, large M: fused / frozen base"),
    "P3b": (">=", 1.35, "fwd+bwd, large M: {peft} / fused"),
    "P4": ("<=", 0.35, "saved bytes q/k/v, dropout 0.1: fused / {peft}"),
}


# --------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------
@dataclass
class Shape:
    M: int
    K: int  # in_features
    N: int  # out_features
    r: int

    def __str__(self) -> str:
        return f"M={self.M} {self.K}->{self.N} r={self.r}"


def forward_flops_bytes(s: Shape, es: int) -> tuple[float, float]:
    M, K, N, r = s.M, s.K, s.N, s.r
    flops = 2 * M * N * K + 2 * M * K * r + 2 * M * N * r
    nbytes = es * (M * K + N * K + r * K + N * r + M * N + M * r)
    return float(flops), float(nbytes)


def train_flops_bytes(s: Shape, es: int) -> tuple[float, float]:
    M, K, N, r = s.M, s.K, s.N, s.r
    f_fwd, b_fwd = forward_flops_bytes(s, es)
    flops = f_fwd + 2 * M * N * K + 4 * M * N * r + 4 * M * K * r
    nbytes = b_fwd + es * (M * N + N * K + 2 * M * K + 2 * (r * K + N * r) + 2 * M * r)
    return float(flops), float(nbytes)


@dataclass
class ParamSet:
    """One rotated input set: x, frozen W, LoRA A/B, merged W, upstream grad."""
    x: torch.Tensor
    W: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    Wm: Optional[torch.Tensor] = None
    dy: Optional[torch.Tensor] = None
    leaves: dict = field(default_factory=dict)  # provider -> (x, A, B) leaves needing grad
    peft: Optional[nn.Module] = None


def make_sets(shape: Shape, dtype, device, n_sets: int, scaling: float, *, seed: int,
              merged=False, grad=False) -> list[ParamSet]:
    """Random data, O(1) terms, never zeros (lora_B included)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    sets = []
    for _ in range(n_sets):
        st = ParamSet(x=rand(shape.M, shape.K), W=rand(shape.N, shape.K, scale=shape.K ** -0.5),
                      A=rand(shape.r, shape.K, scale=shape.K ** -0.5),
                      B=rand(shape.N, shape.r, scale=shape.r ** -0.5))
        if merged:
            st.Wm = (st.W.float() + scaling * (st.B.float() @ st.A.float())).to(dtype)
        if grad:
            st.dy = rand(shape.M, shape.N)
        sets.append(st)
    return sets


def peft_available(mode: str) -> tuple[bool, str]:
    """(use peft, label). mode: on | off | auto (auto = on unless --quick)."""
    if mode == "off":
        return False, "eager (loralib-style; --peft off)"
    try:
        import peft  # noqa: F401
    except Exception as exc:  # ImportError, or a broken transformers underneath
        return False, f"eager (loralib-style; peft not importable: {type(exc).__name__})"
    return True, f"peft {peft.__version__}"


def make_peft_layers(bases: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], r: int,
                     alpha: float, dropout: float, names: Optional[list[str]] = None) -> list[nn.Module]:
    """peft lora.Linear layers around frozen W, with lora weights set to (A, B) in W's dtype.

    Built through ``peft.inject_adapter_in_model`` (stable across peft versions).
    Adapter weights are kept in the base dtype (peft's PeftModel would upcast
    bf16 adapters to fp32 by default; here both sides compute in one dtype).
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = names or [f"p{i}" for i in range(len(bases))]
    holder = nn.Module()
    for name, (W, _, _) in zip(names, bases):
        lin = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(W, requires_grad=False)
        setattr(holder, name, lin)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(names))
    holder = inject_adapter_in_model(cfg, holder)
    layers = []
    for name, (W, A, B) in zip(names, bases):
        layer = getattr(holder, name)
        layer.base_layer.weight = nn.Parameter(W, requires_grad=False)
        layer.lora_A["default"].weight = nn.Parameter(A.detach().clone())
        layer.lora_B["default"].weight = nn.Parameter(B.detach().clone())
        layers.append(layer)
    return layers


# --------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------
def eager_lora(x, W, A, B, s, p=0.0, training=False):
    """loralib-style: F.linear(x,W) + s * F.linear(F.linear(drop(x), A), B)."""
    h = F.dropout(x, p, training) if (p > 0.0 and training) else x
    return F.linear(x, W) + s * F.linear(F.linear(h, A), B)


def forward_call(provider: str, scaling: float) -> Callable[[ParamSet], torch.Tensor]:
    if provider == "base":
        return lambda st: F.linear(st.x, st.W)
    if provider == "merged":
        return lambda st: F.linear(st.x, st.Wm)
    if provider == "fused":
        return lambda st: lf.lora_linear(st.x, st.W, st.A, st.B, scaling)
    if provider == "eager":
        return lambda st: eager_lora(st.x, st.W, st.A, st.B, scaling)
    if provider == "peft":
        return lambda st: st.peft(st.x)
    raise ValueError(provider)


def train_call(provider: str, scaling: float, p: float) -> Callable[[ParamSet], None]:
    """y = f(x); y.backward(dy) with x requiring grad and W frozen."""
    def run(st: ParamSet):
        x, A, B = st.leaves[provider]
        if provider == "base":
            y = F.linear(x, st.W)
        elif provider == "fused":
            y = lf.lora_linear(x, st.W, A, B, scaling, dropout_p=p, training=True)
        elif provider == "eager":
            y = eager_lora(x, st.W, A, B, scaling, p, True)
        elif provider == "peft":
            y = st.peft(x)
        else:
            raise ValueError(provider)
        y.backward(st.dy)
    return run


def rotating(call, sets):
    it = itertools.cycle(sets)

    def fn():
        return call(next(it))
    return fn


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------
@dataclass
class Timing:
    median: float
    q20: float
    q80: float
    method: str


def time_cuda(fn, *, grad_to_none=None, warmup=25, rep=100) -> Timing:
    import triton.testing
    fn()  # compile / autotune / allocator warm-up, outside the timed region
    torch.cuda.synchronize()
    med, q20, q80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                            quantiles=[0.5, 0.2, 0.8])
    return Timing(med, q20, q80, "do_bench")


def time_cuda_graph(fn, *, calls: int, warmup=25, rep=100) -> Timing:
    """Per-call time of ``calls`` back-to-back calls captured in one CUDA graph."""
    import triton.testing
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    med, q20, q80 = triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep,
                                            quantiles=[0.5, 0.2, 0.8])
    del graph
    return Timing(med / calls, q20 / calls, q80 / calls, f"cuda-graph x{calls}")


def time_cpu(fn, *, grad_to_none=None, budget_s=0.08, min_iters=3, max_iters=50) -> Timing:
    for _ in range(2):
        fn()
    times = []
    stop = time.perf_counter() + budget_s
    while len(times) < min_iters or (time.perf_counter() < stop and len(times) < max_iters):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return Timing(statistics.median(times), qs[1], qs[7], f"perf_counter x{len(times)}")


# --------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.cuda = torch.cuda.is_available() and not args.cpu
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.quick = args.quick or not self.cuda
        if args.dtype:
            self.dtype = DTYPES[args.dtype]
        else:
            self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.es = torch.empty((), dtype=self.dtype).element_size()
        if not self.cuda:
            # The CPU run proves the harness on the torch paths (the interpreter would be minutes);
            # one thread: on a shared CPU more threads mostly add contention noise.
            os.environ["LORA_FUSED_BACKEND"] = "torch"
            torch.set_num_threads(1)
        peft_mode = args.peft if args.peft != "auto" else ("off" if self.quick and not self.cuda else "on")
        self.use_peft, self.peft_label = peft_available(peft_mode)
        self.cmp_name = "peft" if self.use_peft else "eager"
        self.rows: list[dict] = []
        self.goals: list[dict] = []
        self.r = args.rank
        self.scaling = 2.0  # lora_alpha = 2r
        if self.cuda:
            self.K = self.N = 4096
            self.m_big = 8192
            self.m_small = [1, 8, 16]
            self.p4 = Shape(8192, 4096, 4096, self.r)
            self.warmup, self.rep = (10, 40) if args.quick else (25, 100)
        else:
            self.K = self.N = 512
            self.m_big = 512
            self.m_small = [1, 16]
            self.p4 = Shape(512, 1024, 1024, self.r)

    # -- helpers ------------------------------------------------------------
    def _time(self, fn, grad_to_none=None, graph_calls=0) -> Timing:
        if not self.cuda:
            return time_cpu(fn, grad_to_none=grad_to_none)
        if graph_calls:
            return time_cuda_graph(fn, calls=graph_calls, warmup=self.warmup, rep=self.rep)
        return time_cuda(fn, grad_to_none=grad_to_none, warmup=self.warmup, rep=self.rep)

    def _goal(self, gid: str, value: Optional[float], note: str = "", label: str = "",
              row: Optional[dict] = None, suffix: str = "") -> None:
        op, bound, desc = GOALS[gid]
        desc = desc.format(peft=self.cmp_name) + suffix
        if value is None or not math.isfinite(value):
            passed = None
        else:
            passed = value <= bound if op == "<=" else value >= bound
        timing_goal = gid != "P4"
        if row is not None:
            res = "n/a" if passed is None else ("PASS" if passed else "FAIL")
            row["result"] = res + ("" if (self.cuda or not timing_goal) else "*")
            row["goal_value"] = value
        self.goals.append(dict(id=gid, description=desc, value=value, op=op, bound=bound,
                               passed=passed, note=note, label=label,
                               gpu_measurement=bool(self.cuda or not timing_goal)))

    def _row(self, case, mode, provider, shape, flops, nbytes, timing: Optional[Timing],
             base_ms: Optional[float], goal="", error="", note="", check=None):
        row = dict(case=case, mode=mode, provider=provider, M=shape.M, K=shape.K, N=shape.N,
                   r=shape.r, dtype=str(self.dtype).replace("torch.", ""), device=self.device.type,
                   flops=flops, bytes=nbytes, goal=goal, error=error, note=note, check_relerr=check)
        if timing is not None:
            row.update(median_ms=timing.median, q20_ms=timing.q20, q80_ms=timing.q80,
                       method=timing.method)
            row["ratio_vs_base"] = timing.median / base_ms if base_ms else None
            if self.cuda:
                row["tflops"] = flops / (timing.median * 1e-3) / 1e12
                row["gbs"] = nbytes / (timing.median * 1e-3) / 1e9
        self.rows.append(row)
        return row

    def _describe(self, case, shape, flops, nbytes):
        floor = ""
        if self.cuda:
            t_math = flops / (H200_TFLOPS * 1e12) * 1e3
            t_mem = nbytes / (H200_TBS * 1e12) * 1e3
            floor = (f"; floor at {H200_TFLOPS:.0f} TFLOP/s & {H200_TBS} TB/s: "
                     f"{max(t_math, t_mem):.4f} ms ({'math' if t_math >= t_mem else 'memory'})")
        print(f"[{case}] {shape}: {flops / 1e9:.3f} GFLOP, {nbytes / 2**20:.1f} MiB{floor}", flush=True)

    @staticmethod
    def _relerr(out, ref) -> float:
        ref = ref.double()
        return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()

    def _launched(self) -> int:
        try:
            from lora_fused.kernels import lora_linear as kernels
            return sum(kernels.LAUNCH_COUNTS.values())
        except Exception:
            return -1

    # -- forward cases (P1, P2) -------------------------------------------
    def forward_case(self, case: str, M: int, gid: str, *, graph: bool):
        shape = Shape(M, self.K, self.N, self.r)
        n_sets = 4 if M <= 64 else 3
        sets = make_sets(shape, self.dtype, self.device, n_sets, self.scaling, seed=M, merged=True)
        providers = ["base", "fused", "eager", "merged"]
        if self.use_peft:
            try:
                layers = make_peft_layers([(s.W, s.A, s.B) for s in sets], self.r,
                                          self.scaling * self.r, 0.0)
                for st, layer in zip(sets, layers):
                    st.peft = layer.eval()
                providers.append("peft")
            except Exception as exc:
                print(f"  peft layer construction failed: {exc!r}", flush=True)
        flops, nbytes = forward_flops_bytes(shape, self.es)
        self._describe(case, shape, flops, nbytes)
        with torch.no_grad():
            ref = eager_lora(sets[0].x.float(), sets[0].W.float(), sets[0].A.float(),
                             sets[0].B.float(), self.scaling)
            ref_base = F.linear(sets[0].x.float(), sets[0].W.float())
        modes = [("fwd", 0)]
        if graph and self.cuda:
            modes = [("fwd graph", 8), ("fwd eager", 0)]
        for mode, calls in modes:
            base_ms = None
            gated = calls > 0 or len(modes) == 1
            for provider in providers:
                call = forward_call(provider, self.scaling)
                before = self._launched()
                with torch.no_grad():
                    check = self._relerr(call(sets[0]), ref_base if provider == "base" else ref)
                triton_ran = self._launched() > before
                fn = rotating(call, sets)

                def no_grad_fn(fn=fn):
                    with torch.no_grad():
                        return fn()
                goal = ""
                if provider == "fused":
                    goal = f"{gid} {GOALS[gid][0]} {GOALS[gid][1]}" if gated else "(info)"
                note = ""
                if provider == "fused" and self.cuda:
                    note = "triton" if triton_ran else "NOT triton (torch path)"
                try:
                    timing = self._time(no_grad_fn, graph_calls=calls)
                    err = ""
                except Exception as exc:  # keep going: one failing provider must not stop the run
                    timing, err = None, f"{type(exc).__name__}: {exc}"[:300]
                row = self._row(case, mode, provider, shape, flops, nbytes, timing, base_ms,
                                goal=goal, error=err, note=note, check=check)
                if provider == "base" and timing is not None:
                    base_ms = timing.median
                if provider == "fused" and gated:
                    self._goal(gid, row.get("ratio_vs_base"), label=f"M={M}", row=row,
                               note=f"{case} {mode}" + (f"; {err}" if err else ""))
        del sets
        self._free()

    # -- forward + backward (P3) ------------------------------------------
    def train_case(self, case: str, p: float, gated: bool = True):
        shape = Shape(self.m_big, self.K, self.N, self.r)
        sets = make_sets(shape, self.dtype, self.device, 2 if self.cuda else 1, self.scaling,
                         seed=11, grad=True)
        providers = ["base", "fused", "eager"]
        if self.use_peft:
            try:
                layers = make_peft_layers([(s.W, s.A, s.B) for s in sets], self.r,
                                          self.scaling * self.r, p)
                for st, layer in zip(sets, layers):
                    st.peft = layer.train()
                providers.append("peft")
            except Exception as exc:
                print(f"  peft layer construction failed: {exc!r}", flush=True)
        grad_to_none = []
        for st in sets:
            for provider in providers:
                if provider == "peft":
                    x = st.x.detach().clone().requires_grad_()
                    A, B = st.peft.lora_A["default"].weight, st.peft.lora_B["default"].weight
                else:
                    x = st.x.detach().clone().requires_grad_()
                    A = st.A.detach().clone().requires_grad_(provider != "base")
                    B = st.B.detach().clone().requires_grad_(provider != "base")
                st.leaves[provider] = (x, A, B)
                grad_to_none += [x, A, B]
        flops, nbytes = train_flops_bytes(shape, self.es)
        self._describe(case + f" (dropout {p})", shape, flops, nbytes)
        timings = {}
        rows = {}
        base_ms = None
        for provider in providers:
            fn = rotating(train_call(provider, self.scaling, p), sets)
            goal = ""
            if provider == "fused":
                goal = f"P3 <= {GOALS['P3'][1]}" if gated else "(info)"
            elif provider == self.cmp_name:
                goal = f"P3b {self.cmp_name}/fused >= {GOALS['P3b'][1]}" if gated else "(info)"
            check = None
            if p == 0.0:
                check = self._train_check(provider, sets[0])
            try:
                timing = self._time(fn, grad_to_none=grad_to_none)
                err = ""
            except Exception as exc:
                timing, err = None, f"{type(exc).__name__}: {exc}"[:300]
            row = self._row(case, f"fwd+bwd p={p}", provider, shape, flops, nbytes, timing, base_ms,
                            goal=goal, error=err, check=check)
            rows[provider] = row
            if timing is not None:
                timings[provider] = timing.median
                if provider == "base":
                    base_ms = timing.median
            if provider != "base" and timing is not None and "fused" in timings:
                row["vs_fused"] = timing.median / timings["fused"]
        if gated:
            fused = timings.get("fused")
            self._goal("P3", fused / base_ms if fused and base_ms else None, note=f"{case} {shape}",
                       row=rows.get("fused"), suffix=f", lora dropout {p}")
            other = timings.get(self.cmp_name)
            self._goal("P3b", other / fused if other and fused else None, row=rows.get(self.cmp_name),
                       note=f"{case} {shape}; comparison: {self.peft_label}", suffix=f", lora dropout {p}")
        for st in sets:
            st.leaves.clear()
        del sets, grad_to_none
        self._free()

    def _train_check(self, provider: str, st: ParamSet) -> Optional[float]:
        """Max relative error of dX, dA, dB against fp32 eager (dX of F.linear for base), on set 0."""
        x, A, B = st.leaves[provider]
        for t in (x, A, B):
            t.grad = None
        train_call(provider, self.scaling, 0.0)(st)
        xr = st.x.detach().to(torch.float32, copy=True).requires_grad_()
        Ar = st.A.detach().to(torch.float32, copy=True).requires_grad_()
        Br = st.B.detach().to(torch.float32, copy=True).requires_grad_()
        if provider == "base":
            F.linear(xr, st.W.float()).backward(st.dy.float())
            errs = [self._relerr(x.grad, xr.grad)]
        else:
            eager_lora(xr, st.W.float(), Ar, Br, self.scaling).backward(st.dy.float())
            errs = [self._relerr(x.grad, xr.grad), self._relerr(A.grad, Ar.grad),
                    self._relerr(B.grad, Br.grad)]
        for t in (x, A, B):
            t.grad = None
        return max(errs)

    # -- saved activations (P4) -------------------------------------------
    def saved_case(self, case: str = "P4 saved q/k/v"):
        shape = self.p4
        p = 0.1
        dtype = self.dtype if self.cuda else torch.float32
        g = torch.Generator(device=self.device).manual_seed(4)

        def rand(*size, scale=1.0):
            return torch.randn(*size, generator=g, device=self.device).mul_(scale).to(dtype)

        x = rand(shape.M, shape.K)
        bases = [(rand(shape.N, shape.K, scale=shape.K ** -0.5), rand(shape.r, shape.K, scale=shape.K ** -0.5),
                  rand(shape.N, shape.r, scale=shape.r ** -0.5)) for _ in range(3)]
        print(f"[{case}] {shape} {str(dtype).replace('torch.', '')}, 3 projections, lora dropout {p}",
              flush=True)

        fused_layers = []
        for W, A, B in bases:
            layer = lf.LoRALinear(shape.K, shape.N, bias=False, r=shape.r, lora_alpha=self.scaling * shape.r,
                                  lora_dropout=p, device="meta", dtype=dtype)
            layer.weight = nn.Parameter(W, requires_grad=False)
            layer.lora_A = nn.Parameter(A.clone())
            layer.lora_B = nn.Parameter(B.clone())
            fused_layers.append(layer.train())

        def run_fused():
            xi = x.detach().requires_grad_()
            return [layer(xi) for layer in fused_layers], xi

        if self.use_peft:
            other_layers = [layer.train() for layer in
                            make_peft_layers(bases, shape.r, self.scaling * shape.r, p, names=["q", "k", "v"])]

            def run_other():
                xi = x.detach().requires_grad_()
                return [layer(xi) for layer in other_layers], xi
        else:
            params = [(W, A.clone().requires_grad_(), B.clone().requires_grad_()) for W, A, B in bases]
            other_layers = []

            def run_other():
                xi = x.detach().requires_grad_()
                return [eager_lora(xi, W, A, B, self.scaling, p, True) for W, A, B in params], xi

        exclude = set()
        for W, A, B in bases:
            exclude |= {t.untyped_storage().data_ptr() for t in (W, A, B)}
        for mod in fused_layers + other_layers:
            exclude |= {t.untyped_storage().data_ptr() for t in mod.parameters()}
        if not self.use_peft:
            exclude |= {t.untyped_storage().data_ptr() for _, A, B in params for t in (A, B)}

        results = {}
        saved_rows = []
        for provider, run in (("fused", run_fused), (self.cmp_name, run_other)):
            seen: dict[int, int] = {}
            kinds: dict[int, str] = {}

            def pack(t):
                st = t.untyped_storage()
                ptr, n = st.data_ptr(), st.nbytes()
                if n and ptr not in exclude:
                    seen[ptr] = max(seen.get(ptr, 0), n)
                    kinds[ptr] = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                return t

            if self.cuda:
                torch.cuda.synchronize()
                mem0 = torch.cuda.memory_allocated()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                outs, xi = run()
            held = None
            if self.cuda:
                torch.cuda.synchronize()
                out_bytes = sum(o.untyped_storage().nbytes() for o in outs)
                held = torch.cuda.memory_allocated() - mem0 - out_bytes
            total = sum(seen.values())
            results[provider] = total
            print(f"  {provider:>6}: {total / 2**20:9.2f} MiB saved in {len(seen)} storages: "
                  + ", ".join(sorted(kinds.values())), flush=True)
            row = self._row(case, "saved", provider, shape, 0.0, float(total), None, None,
                            goal=(f"P4 <= {GOALS['P4'][1]}" if provider == "fused" else ""),
                            note=f"{len(seen)} storages" + (f"; held beyond outputs {held / 2**20:.1f} MiB"
                                                             if held is not None else ""))
            row["saved_bytes"] = total
            saved_rows.append(row)
            del outs, xi
        ratio = results["fused"] / results[self.cmp_name] if results[self.cmp_name] else None
        for row in self.rows[-2:]:
            row["saved_ratio_fused_over_other"] = ratio
        self._goal("P4", ratio, row=saved_rows[0], note=f"{shape} {str(dtype).replace('torch.', '')} on {self.device.type}; "
                                     f"comparison: {self.peft_label}")
        self._free()

    def _free(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # -- run + report --------------------------------------------------------
    def run(self):
        t0 = time.time()
        self.header()
        self.forward_case("P1 fwd", self.m_big, "P1", graph=False)
        for M in self.m_small:
            self.forward_case(f"P2 fwd M={M}", M, "P2", graph=True)
        # Both dropout settings are gated: 0.0 is apples to apples with the frozen base (which
        # has no dropout); 0.1 is PEFT's usual training setting (and P4's).
        self.train_case("P3 fwd+bwd", 0.0)
        self.train_case("P3 fwd+bwd dropout", 0.1)
        self.saved_case()
        self.elapsed = time.time() - t0
        self._merge_p2()
        self.report()

    def _merge_p2(self):
        """One P2 goal: the worst fused/base ratio over the decode sizes."""
        p2 = [g for g in self.goals if g["id"] == "P2"]
        if len(p2) <= 1:
            return
        vals = [g["value"] for g in p2 if g["value"] is not None]
        worst = max(vals) if vals else None
        notes = "; ".join(f"{g['label']}: {g['value']:.3f}" if g["value"] is not None
                          else f"{g['label']}: {g['note']}" for g in p2)
        self.goals = [g for g in self.goals if g["id"] != "P2"]
        op, bound, _ = GOALS["P2"]
        self.goals.insert(1, dict(id="P2", description=p2[0]["description"] + " (worst M)"
                                  + (", CUDA graph" if self.cuda else ""), value=worst,
                                  op=op, bound=bound,
                                  passed=None if worst is None else worst <= bound, note=notes,
                                  gpu_measurement=p2[0]["gpu_measurement"]))

    def header(self):
        try:
            import triton
        except ImportError:
            triton = type("triton", (), {"__version__": "not installed"})
        self.meta = dict(
            device=torch.cuda.get_device_name() if self.cuda else f"CPU ({platform.processor() or platform.machine()})",
            gpu_measurement=self.cuda, quick=self.quick, dtype=str(self.dtype).replace("torch.", ""),
            torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
            lora_fused=getattr(lf, "__version__", "?"),
            backend=lf.select_backend(self.device, self.dtype), comparison=self.peft_label,
            rank=self.r, scaling=self.scaling, date=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
        print("=" * 78)
        print(f"lora-fused benchmark: {self.meta['device']}; torch {torch.__version__}, "
              f"triton {triton.__version__}; dtype {self.meta['dtype']}, r={self.r}, s={self.scaling}")
        print(f"fused backend: {self.meta['backend']}; PEFT-style comparison: {self.peft_label}")
        if not self.cuda:
            print("NOTE: no CUDA device: this is NOT a GPU measurement. Small shapes on the torch "
                  "paths, to prove the harness; timing goals are marked '*' and mean nothing. "
                  "P4 (saved bytes) is a real measurement.")
        print("=" * 78, flush=True)

    def _fmt(self, v, spec, missing="-"):
        return missing if v is None else format(v, spec)

    def table_lines(self) -> list[str]:
        head = ["case", "mode", "provider", "median ms", "q20-q80 ms", "x base", "TFLOP/s", "GB/s",
                "check", "goal", "result", "note"]
        lines = [head]
        for r in self.rows:
            if r["mode"] == "saved":
                ratio = r.get("saved_ratio_fused_over_other")
                lines.append([r["case"], "saved", r["provider"], "-", "-", "-", "-", "-", "-", r["goal"],
                              r.get("result", ""),
                              f"{r['saved_bytes'] / 2**20:.2f} MiB; {r['note']}"
                              + (f"; fused/other {ratio:.3f}" if ratio is not None and r["provider"] == "fused"
                                 else "")])
                continue
            note = r["note"]
            if r.get("vs_fused") is not None and r["provider"] not in ("base", "fused"):
                note = (note + "; " if note else "") + f"{r['vs_fused']:.3f}x fused"
            if r["error"]:
                note = (note + "; " if note else "") + "ERROR " + r["error"]
            lines.append([
                r["case"], r["mode"], r["provider"], self._fmt(r.get("median_ms"), ".4f"),
                (f"{r['q20_ms']:.4f}-{r['q80_ms']:.4f}" if r.get("q20_ms") is not None else "-"),
                self._fmt(r.get("ratio_vs_base"), ".3f"), self._fmt(r.get("tflops"), ".1f"),
                self._fmt(r.get("gbs"), ".0f"), self._fmt(r.get("check_relerr"), ".1e"), r["goal"],
                r.get("result", ""), note])
        return lines

    def goal_lines(self) -> list[str]:
        lines = [["goal", "what", "measured", "bound", "result"]]
        for g in self.goals:
            if g["passed"] is None:
                res = "n/a"
            else:
                res = "PASS" if g["passed"] else "FAIL"
            if not g["gpu_measurement"]:
                res += "*"
            lines.append([g["id"], g["description"], self._fmt(g["value"], ".3f"),
                          f"{g['op']} {g['bound']}", res])
        return lines

    @staticmethod
    def render(lines, md=False) -> str:
        if md:
            out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
            out += ["| " + " | ".join(str(c).replace("|", "/") for c in ln) + " |" for ln in lines[1:]]
            return "\n".join(out)
        widths = [max(len(str(ln[i])) for ln in lines) for i in range(len(lines[0]))]
        fmt = lambda ln: "  ".join(str(c).ljust(w) for c, w in zip(ln, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(lines[0]), fmt(["-" * w for w in widths])] + [fmt(ln) for ln in lines[1:]])

    def report(self):
        footer = []
        if not self.cuda:
            footer.append("* CPU run (torch paths, small shapes): NOT a GPU measurement.")
        footer.append("check: max relative error of the provider's output (or of dX, dA, dB) "
                      "against fp32 eager on the same data.")
        if self.cuda:
            footer.append("P2 gates on CUDA-graph replay (device time); 'fwd eager' rows include "
                          "Python and launch overhead.")
        print()
        print(self.render(self.table_lines()))
        print()
        for line in footer:
            print(line)
        print(f"(benchmark took {self.elapsed:.1f} s)")
        if self.args.out:
            os.makedirs(self.args.out, exist_ok=True)
            with open(os.path.join(self.args.out, "bench_lora_linear.json"), "w") as fh:
                json.dump(dict(meta=self.meta, goals=self.goals, rows=self.rows,
                               elapsed_s=self.elapsed), fh, indent=1)
            with open(os.path.join(self.args.out, "bench_lora_linear.md"), "w") as fh:
                fh.write(f"# lora-fused benchmark: {self.meta['device']}\n\n")
                fh.write(", ".join(f"{k}: {v}" for k, v in self.meta.items()) + "\n\n")
                fh.write("## Goals\n\n" + self.render(self.goal_lines(), md=True) + "\n\n")
                fh.write("## All measurements\n\n" + self.render(self.table_lines(), md=True) + "\n\n")
                fh.write("\n".join(footer) + "\n")
            print(f"wrote {self.args.out}/bench_lora_linear.json and .md")
        print()
        print(f"GOALS ({self.meta['device']}, {self.meta['dtype']}, r={self.r}; "
              f"comparison: {self.peft_label})")
        print(self.render(self.goal_lines()), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer repetitions on a GPU; small shapes on the torch paths on a CPU")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="bf16 on a GPU, fp32 on a CPU by default")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default=None, help="folder for bench_lora_linear.json and .md")
    ap.add_argument("--peft", choices=["auto", "on", "off"], default="auto",
                    help="compare with peft's LoraLayer (auto: on, except a CPU --quick run, where "
                         "importing peft/transformers alone takes longer than the benchmark)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is there")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a goal fails")
    args = ap.parse_args(argv)
    bench = Bench(args)
    bench.run()
    if args.strict and any(g["passed"] is False for g in bench.goals):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
