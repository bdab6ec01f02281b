"""One case x provider: random inputs, correctness check, saved bytes, peak memory, timing.

:meth:`Runner.prepare` gives the timed callable (also used by the pytest-benchmark
tests); :meth:`Runner.run_case` measures every applicable provider of a case and
returns one row (a dict) per provider. A failing provider becomes an ``error``
row and the run goes on.
"""
from __future__ import annotations

import gc
import itertools
import math
import platform
import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import lora_fused as lf

from . import measure
from .cases import Case
from .host import HostChild, run_host_case, time_interleaved
from .measure import Ceilings, Timing
from .providers import (InputSet, applies, bind, input_set_bytes, make_input_sets, peft_status,
                        provider_unavailable, reference_grads, reference_outputs)
from .providers.moe import transformers_status
from .providers.qlora import bnb_status
from .rows import add_ratios, error_reason

#: Forward cases up to this many rows are also timed as CUDA-graph replays (decode).
GRAPH_MAX_M = 64
#: CPU timer budget (s) per row of a case that feeds a CPU goal (D3).
CPU_GOAL_BUDGET_S = 1.0
#: Interleaved rounds of an MoE case that feeds a CPU goal (M-speed-CPU), on a CPU (--quick: 5).
CPU_GOAL_ROUNDS = 15


def _feeds_cpu_goal(case) -> bool:
    from .goals import GOALS
    return any(GOALS[g].cpu for g in case.goals if g in GOALS)


def versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "not installed"
    cuda = torch.cuda.is_available()
    return dict(torch=torch.__version__, triton=tv, cuda=torch.version.cuda if cuda else None,
                lora_fused=getattr(lf, "__version__", "?"), python=platform.python_version())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def _launches() -> int:
    try:
        from lora_fused.kernels import lora_linear as kernels
        return sum(kernels.LAUNCH_COUNTS.values())
    except Exception:
        return -1


def _relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@dataclass
class Settings:
    device: torch.device
    quick: bool = False
    warmup_ms: int = 25          # do_bench warm-up / repetition budgets (ms)
    rep_ms: int = 100
    cpu_budget_s: float = 0.08   # CPU timer budget per row
    check: bool = True           # correctness check of every provider against fp32 eager
    host_rounds: int = 101       # host cases: interleaved rounds per case (bench/host.py)
    goal_rounds: int = CPU_GOAL_ROUNDS  # MoE cases of a CPU goal: interleaved rounds on a CPU

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Prepared:
    """A provider ready to time: ``fn()`` is one call on the next input set (no device sync)."""
    case: Case
    provider: str
    fn: Callable[[], object]
    grad_to_none: list
    bounds: list
    keep: list = field(default_factory=list)   # retained forward outputs (backward-alone cases)

    def synced(self) -> Callable[[], None]:
        """``fn`` followed by a device synchronization (what pytest-benchmark times)."""
        fn, cuda = self.fn, self.bounds[0].x.is_cuda

        def call():
            for t in self.grad_to_none:
                t.grad = None
            fn()
            if cuda:
                torch.cuda.synchronize()
        return call

    def close(self) -> None:
        self.keep.clear()
        self.bounds.clear()
        self.grad_to_none.clear()
        self.fn = None


def _rotating(items: list, call: Callable) -> Callable[[], object]:
    it = itertools.cycle(items)

    def fn():
        return call(next(it))
    return fn


class Runner:
    def __init__(self, settings: Settings, *, skipped: Optional[dict] = None,
                 ceilings: Optional[Ceilings] = None):
        self.s = settings
        self.device = settings.device
        self.skipped = dict(skipped or {})     # provider -> reason it does not run
        self.ceilings = ceilings
        self.env = dict(device=self.device.type, gpu=device_name(self.device), **versions())
        self.host_child = None  # CPU runs: the child process that times the Triton host cases

    def plan_host(self, cases: list) -> None:
        """Before a run: the Triton host cases among ``cases`` share one child process on a CPU."""
        names = [c.name for c in cases if getattr(c, "mode", "") == "host" and c.triton]
        self.host_child = HostChild(names, self.s.host_rounds)

    # -- inputs ---------------------------------------------------------------
    def n_sets(self, case: Case) -> int:
        """Enough rotated input sets that what one call reads (x, W, A, B) over all sets is
        >= 4x the L2 (2..8 sets, their memory <= 8 GiB)."""
        if not self.s.cuda:
            return 2
        l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or 60 * 2**20
        n = math.ceil(4 * l2 / max(input_set_bytes(case, read_only=True), 1))
        n = min(n, max(1, (8 << 30) // max(input_set_bytes(case), 1)))
        return max(2, min(8, n))

    def inputs(self, case: Case, n_sets: Optional[int] = None, seed: int = 0) -> list[InputSet]:
        return make_input_sets(case, self.device, n_sets or self.n_sets(case), seed=seed)

    # -- the timed callable ---------------------------------------------------
    def prepare(self, case: Case, provider: str, sets: list[InputSet]) -> Prepared:
        if case.mode == "fwd":
            bounds = [bind(provider, case, st, training=False) for st in sets]

            def call(b):
                with torch.no_grad():
                    return b.run()
            return Prepared(case, provider, _rotating(bounds, call), [], bounds)
        bounds = [bind(provider, case, st, training=True) for st in sets]
        grad_to_none = [t for b in bounds for t in b.leaves]
        if case.mode == "fwdbwd":
            def call(b):
                torch.autograd.backward(b.run(), b.dy)
            return Prepared(case, provider, _rotating(bounds, call), grad_to_none, bounds)
        if case.mode == "bwd":
            keep = [(b.run(), b.dy) for b in bounds]   # forward outside the timing, graph retained

            def call(item):
                torch.autograd.backward(item[0], item[1], retain_graph=True)
            return Prepared(case, provider, _rotating(keep, call), grad_to_none, bounds, keep)
        raise ValueError(f"{case.name}: mode {case.mode!r} is not timed")

    # -- pieces of a row ------------------------------------------------------
    def check(self, case: Case, prep: Prepared, st: InputSet) -> Optional[float]:
        """Max relative error against fp32 eager on input set 0 (multi-adapter: a float64
        reference; training: dX, dA, dB; only without dropout, where the masks cannot agree)."""
        b = prep.bounds[0]
        if case.mode == "fwd":
            with torch.no_grad():
                outs = b.run()
            refs = reference_outputs(case, st, prep.provider)
            return max(_relerr(o, r) for o, r in zip(outs, refs))
        if case.dropout > 0:
            return None
        for t in prep.grad_to_none:
            t.grad = None
        torch.autograd.backward(b.run(), b.dy)
        got = b.grads()
        refs = reference_grads(case, st, prep.provider)
        err = max(_relerr(g, r) for g, r in zip(got, refs))
        for t in prep.grad_to_none:
            t.grad = None
        return err

    def time(self, case: Case, prep: Prepared) -> tuple[Timing, Optional[Timing]]:
        """(timing, eager-launch timing of a graph-timed decode forward or None)."""
        if not self.s.cuda:
            return measure.time_cpu(prep.fn, grad_to_none=prep.grad_to_none, budget_s=self.cpu_budget(case)), None
        w, r = self.s.warmup_ms, self.s.rep_ms
        if case.mode == "fwd" and case.M <= GRAPH_MAX_M and all(b.graph for b in prep.bounds):
            calls = max(8, 2 * len(prep.bounds))
            graph = measure.time_cuda_graph(prep.fn, calls=calls, warmup=w, rep=r)
            launch = measure.time_cuda(prep.fn, warmup=w, rep=r)
            return graph, launch
        return measure.time_cuda(prep.fn, grad_to_none=prep.grad_to_none or None, warmup=w, rep=r), None

    def cpu_budget(self, case: Case) -> float:
        """CPU timer budget per row: :data:`CPU_GOAL_BUDGET_S` where the case feeds a CPU goal
        (a real measurement there: up to 50 calls, not the few of a harness check)."""
        if _feeds_cpu_goal(case):
            return max(self.s.cpu_budget_s, CPU_GOAL_BUDGET_S)
        return self.s.cpu_budget_s

    def interleaved(self, case: Case) -> bool:
        """Whether ``case``'s providers are timed together in interleaved rounds (one call of
        each per round, the order rotating) instead of one after another: an MoE case that
        feeds a CPU goal, on a CPU, where a slow stretch of a shared host must hit every side."""
        return not self.s.cuda and bool(getattr(case, "experts", 0)) and _feeds_cpu_goal(case)

    def time_together(self, case: Case, kept: dict) -> None:
        """Fill the rows of ``kept`` ({provider: (row, prep)}) from interleaved rounds: each row's
        median and quantiles over its per-round times, and its median per-round ratio to every
        other provider (``paired``)."""
        def step(prep):
            def call():
                for t in prep.grad_to_none:
                    t.grad = None
                prep.fn()
            return call
        fns = {p: step(prep) for p, (row, prep) in kept.items()}
        for fn in fns.values():  # warm-up: allocator, caches
            fn()
        per_call = time_interleaved(fns, rounds=self.s.goal_rounds, calls=1)
        for p, (row, prep) in kept.items():
            ms = [us / 1e3 for us in per_call[p]]
            timing = Timing(*measure.quantiles(ms), f"interleaved {len(ms)} rounds")
            self._fill_timing(row, case, timing, None)
            row["paired"] = {q: statistics.median(a / b for a, b in zip(per_call[p], per_call[q]))
                             for q in per_call if q != p}

    def new_row(self, case: Case, provider: str) -> dict:
        flops, nbytes = case.flops_bytes()
        return dict(case=case.name, mode=case.mode, provider=provider, status="ok", reason="",
                    M=case.M, K=case.K, N=case.N, r=case.r, dtype=case.dtype, dropout=case.dropout,
                    projections=case.projections, adapters=case.adapters, goals=list(case.goals),
                    flops=flops, bytes=nbytes, note="", **self.env, config=case.config())

    def _fill_timing(self, row: dict, case: Case, timing: Timing, launch: Optional[Timing]) -> None:
        row.update(timing.as_dict())
        if launch is not None:
            row["launch_ms"] = launch.median
        sec = timing.median * 1e-3
        if sec > 0 and row["flops"]:
            row["tflops"] = row["flops"] / sec / 1e12
            row["gbs"] = row["bytes"] / sec / 1e9
            if self.ceilings is not None:
                if self.ceilings.copy_gbs:  # the bytes alone at the copy bandwidth (goal S1)
                    row["byte_floor_ms"] = row["bytes"] / (self.ceilings.copy_gbs * 1e9) * 1e3
                floor, bound = self.ceilings.floor_ms(row["flops"], row["bytes"], case.dtype)
                if floor:
                    row["floor_ms"] = floor
                    row["pct_peak"] = 100.0 * floor / timing.median
                    row["bound"] = bound

    def _free(self) -> None:
        gc.collect()
        if self.s.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # -- a case ---------------------------------------------------------------
    def providers_for(self, case: Case, requested: list[str]) -> list[str]:
        return [p for p in requested if applies(p, case)]

    def run_case(self, case: Case, requested: list[str]) -> list[dict]:
        if case.mode == "host":
            if self.host_child is None:
                self.plan_host([case])
            return run_host_case(self, case, requested)
        providers = self.providers_for(case, requested)
        if getattr(case, "quant", "") and (why := bnb_status()):
            return [dict(self.new_row(case, p), status="skipped", reason=why) for p in providers]
        if getattr(case, "experts", 0) and (why := transformers_status()):
            return [dict(self.new_row(case, p), status="skipped", reason=why) for p in providers]
        if case.mode == "saved":
            return self._saved_case(case, providers)
        rows = []
        try:
            sets = self.inputs(case)
        except Exception as exc:  # e.g. out of memory: every provider row says so
            self._free()
            return self._input_error_rows(case, providers, exc)
        kept: dict = {}   # interleaved cases: {provider: (row, prep)} timed together after the loop
        for p in providers:
            row = self._start_row(case, p)
            rows.append(row)
            if row["status"] != "ok":
                continue
            prep = None
            try:
                prep = self.prepare(case, p, sets)
                if self.s.check:
                    before = _launches()
                    row["check_relerr"] = self.check(case, prep, sets[0])
                    if p in ("fused", "fused-cublas", "fused_kernel", "shrink_first", "composite", "fused-lora",
                             "packed"):
                        row["note"] = "triton" if _launches() > before else "torch path"
                if case.training:
                    b = prep.bounds[0]
                    sv = measure.saved_bytes(b.run, measure.storage_ptrs(b.params), cuda=self.s.cuda)
                    row.update(saved_bytes=sv.bytes, saved_storages=sv.storages)
                    if getattr(case, "experts", 0):  # goal M-memory: every new tensor of one step
                        al = measure.allocated_bytes(prep.fn, grad_to_none=prep.grad_to_none)
                        row.update(alloc_bytes=al.bytes, alloc_tensors=al.tensors, alloc_peak_bytes=al.peak_bytes)
                row["peak_mem_bytes"] = measure.peak_memory(prep.fn, cuda=self.s.cuda,
                                                        grad_to_none=prep.grad_to_none)
                row["n_sets"] = len(sets)
                if self.interleaved(case):
                    kept[p], prep = (row, prep), None
                    continue
                timing, launch = self.time(case, prep)
                self._fill_timing(row, case, timing, launch)
                if (self.s.cuda and case.mode == "fwd" and case.M <= GRAPH_MAX_M
                        and not all(b.graph for b in prep.bounds)):
                    note = "eager launch: not CUDA-graph capturable"
                    row["note"] = f"{row['note']}; {note}" if row["note"] else note
            except Exception as exc:  # one failing provider must not stop the run
                row.update(status="error", reason=error_reason(exc))
            finally:
                if prep is not None:
                    prep.close()
                del prep
                self._free()
        if kept:
            self._time_kept(case, kept)
        del sets
        self._free()
        add_ratios(rows)
        return rows

    def _time_kept(self, case: Case, kept: dict) -> None:
        try:
            self.time_together(case, kept)
        except Exception as exc:  # every row of the interleaved timing says so
            for row, _ in kept.values():
                row.update(status="error", reason=error_reason(exc))
        finally:
            for _, prep in kept.values():
                prep.close()
            kept.clear()
            self._free()

    def _start_row(self, case: Case, p: str) -> dict:
        """A new row, marked skipped (provider not available in this run) or n/a (not for this case)."""
        row = self.new_row(case, p)
        if p in self.skipped:
            row.update(status="skipped", reason=self.skipped[p])
        elif (why := provider_unavailable(p, case)):
            row.update(status="n/a", reason=why)
        elif p in ("peft-dora", "peft-moe") and (why := peft_status()[0]):  # their one optional dependency
            row.update(status="skipped", reason=why)
        return row

    def _input_error_rows(self, case: Case, providers: list[str], exc: Exception) -> list[dict]:
        """One error row per provider when the case's inputs could not be made."""
        rows = []
        for p in providers:
            row = self.new_row(case, p)
            row.update(status="error", reason="inputs: " + error_reason(exc))
            rows.append(row)
        return rows

    def _saved_case(self, case: Case, providers: list[str]) -> list[dict]:
        """Bytes saved for backward by the forward of ``case.projections`` projections sharing
        one input (training mode, LoRA dropout ``case.dropout``)."""
        rows = []
        try:
            st = self.inputs(case, n_sets=1, seed=4)[0]
        except Exception as exc:
            return self._input_error_rows(case, providers, exc)
        for p in providers:
            row = self._start_row(case, p)
            rows.append(row)
            if row["status"] != "ok":
                continue
            try:
                b = bind(p, case, st, training=True)
                if p == "compiled":  # compile outside the measurement (its warm-up saves nothing)
                    b.run()
                sv = measure.saved_bytes(b.run, measure.storage_ptrs(b.params), cuda=self.s.cuda)
                row.update(saved_bytes=sv.bytes, saved_storages=sv.storages, saved_kinds=sv.kinds,
                           held_bytes=sv.held_bytes)
                row["note"] = f"{sv.storages} storages"
                del b
            except Exception as exc:
                row.update(status="error", reason=error_reason(exc))
            self._free()
        del st
        self._free()
        add_ratios(rows)
        return rows

