"""Host time per call (goals H1-H7): the ``host`` group of ``python -m bench``.

At 64 -> 64, rank 8, 4 rows the arithmetic of a LoRA layer takes well under a
microsecond, so what a call costs is its Python, dispatch and launch work: the
time a decode step or a small training step on a fast GPU actually waits for.
Each :class:`~bench.cases.HostCase` sets up its providers on the same random
data, checks them against eager (or the float64 multi-adapter reference), then
times them with :func:`time_interleaved`:

* a round times a block of back-to-back calls of every provider in turn, the
  order rotated each round, so machine noise (other processes on shared cores)
  falls on all providers alike; each provider's block holds as many calls as
  fill about 1 ms, so blocks are equally exposed to preemption (a longer block
  is interrupted more often, which would bias the ratio against the slower);
* the per-call time of a round is the block's wall time over its calls; on
  CUDA the block is ended by one ``torch.cuda.synchronize()``;
* a row reports the median over rounds with the 20/80 % quantiles, and its
  ratio to the eager baseline of the same case in the same process (the ratio
  of medians; the median of the per-round ratios is kept beside it as
  ``vs_eager_paired``).

The per-op cases run with ``torch.set_num_threads(1)``.

Triton path (``host-triton-*`` cases, goal H7). A Triton launch cannot be
timed on a CPU, so :func:`noop_launches` replaces the launch of every jitted
kernel of ``lora_fused.kernels`` with a function that counts it and returns:
``kernel[grid](...)`` calls ``kernel.run(...)``, and an instance attribute
``run`` shadows the class's (``JITFunction`` on CUDA, the interpreter's
``InterpretedFunction`` under ``TRITON_INTERPRET=1``; both derive from
``triton.runtime.jit.KernelInterface``). What remains is the host work of the
op around its launches: argument checks, backend choice, plan lookup, output
allocation, grid and launcher code, autograd. The ``fused-noop`` row is that
time; ``launches`` counts the launches per call. On a CPU the Triton path
needs ``TRITON_INTERPRET=1`` before the kernels are defined, so these cases
run in a child process (``python -m bench.host_child``) with it set; on CUDA they
run in-process, beside ``fused`` (real launches, wall time over N calls and
one synchronize), so the launches' own cost is ``fused - fused-noop``.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import nn

import lora_fused as lf

from .cases import (HOST_ADAPTERS, HOST_LLAMA_BATCH, HOST_LLAMA_SEQ, SCALING, HostCase,
                    multi_adapter_ids)
from .measure import quantiles
from .providers.linear import eager_lora, make_peft_layers
from .providers.multi import make_peft_mixed_layer, peft_adapter_names
from .rows import add_ratios, error_reason

#: Target wall time of one provider's block of calls in a round (seconds).
BLOCK_S = 0.001
#: Host providers: what each row of a host case runs.
HOST_DESCRIPTIONS = {
    "eager": "F.linear(x, W, b) + s * F.linear(F.linear(drop(x), A), B) (multi cases: one adapter; "
             "llama: loralib-style modules)",
    "fused": "lora-fused (lf.lora_linear / LoRALinear / multi_lora_linear / MultiLoRALinear / inject_lora)",
    "peft": "peft lora.Linear (llama: get_peft_model)",
    "peft-mixed": "peft lora.Linear with 8 adapters, adapter_names per row",
    "fused-noop": "lora-fused's Triton path with every kernel launch replaced by a no-op (host work alone)",
}
#: Environment of the child process that times the Triton path on a CPU.
TRITON_CHILD_ENV = {"TRITON_INTERPRET": "1", "LORA_FUSED_BACKEND": "triton"}


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------
def time_interleaved(fns: dict[str, Callable[[], object]], *, rounds: int, calls,
                     sync: Optional[Callable[[], None]] = None,
                     around: Optional[dict] = None) -> dict[str, list[float]]:
    """Per-call µs of every round for each provider: round i times ``calls`` calls (an int, or
    one per provider) of each provider in turn, starting with provider i mod n; ``sync`` (CUDA)
    runs before and after
    each block; ``around[provider]()`` (a context manager, e.g. :func:`noop_launches`) is
    entered before the block's clock starts and left after it stops. The garbage collector is
    off while timing (its pauses would land on whichever provider happened to run)."""
    names = list(fns)
    around = around or {}
    n_calls = calls if isinstance(calls, dict) else {name: calls for name in names}
    per_call: dict[str, list[float]] = {n: [] for n in names}
    gc_was_on = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for i in range(rounds):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                fn = fns[name]
                with around[name]() if name in around else contextlib.nullcontext():
                    if sync is not None:
                        sync()
                    t0 = time.perf_counter()
                    for _ in range(n_calls[name]):
                        fn()
                    if sync is not None:
                        sync()
                    t1 = time.perf_counter()
                per_call[name].append((t1 - t0) / n_calls[name] * 1e6)
    finally:
        if gc_was_on:
            gc.enable()
    return per_call


def calls_per_block(fn: Callable[[], object], sync: Optional[Callable[[], None]] = None,
                    block_s: float = BLOCK_S) -> int:
    """How many calls of ``fn`` fill about ``block_s`` seconds (at least 1). Every provider's
    block lasts about as long: on shared cores a longer block is preempted more often, which
    would bias the ratio against the slower provider."""
    times = []
    for _ in range(5):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return max(1, min(1000, round(block_s / max(statistics.median(times), 1e-7))))


# --------------------------------------------------------------------------
# No-op kernel launches (the Triton path's host work alone)
# --------------------------------------------------------------------------
@dataclass
class LaunchCounter:
    launches: int = 0
    kernels: dict = field(default_factory=dict)


def _kernel_objects() -> list:
    """Every jitted kernel object defined in lora_fused.kernels' modules (each once)."""
    from triton.runtime.jit import KernelInterface

    import lora_fused.kernels.lora_linear  # noqa: F401  (the kernels must be defined to be patched)
    import lora_fused.kernels.multi_lora  # noqa: F401
    seen: dict[int, object] = {}
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("lora_fused.kernels"):
            continue
        for obj in vars(mod).values():
            if isinstance(obj, KernelInterface):
                seen[id(obj)] = obj
    return list(seen.values())


@contextlib.contextmanager
def noop_launches() -> Iterator[LaunchCounter]:
    """Within the block, ``kernel[grid](...)`` of every lora_fused kernel counts the launch and
    returns at once (an instance attribute ``run`` shadows ``KernelInterface.run``, which both
    ``JITFunction`` and the interpreter's ``InterpretedFunction`` launch through). Outputs are
    left as allocated (garbage): only host time is meant to be measured in here."""
    counter = LaunchCounter()
    kernels = _kernel_objects()
    if not kernels:
        raise RuntimeError("no Triton kernel objects found in lora_fused.kernels")

    def patched(kernel):
        name = getattr(kernel, "__name__", type(kernel).__name__)

        def run(*args, grid=None, warmup=False, **kwargs):
            if not warmup:
                counter.launches += 1
                counter.kernels[name] = counter.kernels.get(name, 0) + 1
        return run

    for k in kernels:
        if "run" in vars(k):
            raise RuntimeError(f"{k!r} already has an instance attribute 'run' (nested noop_launches?)")
        k.run = patched(k)
    try:
        yield counter
    finally:
        for k in kernels:
            vars(k).pop("run", None)


# --------------------------------------------------------------------------
# The problems: inputs and providers of each host case
# --------------------------------------------------------------------------
@dataclass
class Setup:
    """A host case ready to time: ``fns[provider]()`` is one call; ``checks[provider]`` the
    relative error against the reference (None: not checked, e.g. with dropout)."""
    fns: dict
    checks: dict = field(default_factory=dict)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


def _relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@dataclass
class Weights:
    x: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    A: torch.Tensor          # [r, K]
    B: torch.Tensor          # [N, r]
    A_stack: torch.Tensor    # [n, r, K]
    B_stack: torch.Tensor    # [n, N, r]
    scalings: torch.Tensor   # [n]
    ids: torch.Tensor        # [M] adapter per row
    dy: torch.Tensor


def make_weights(case: HostCase, device: torch.device, seed: int = 0) -> Weights:
    """Random fp32 data scaled so every term of y is O(1) (lora_B nonzero)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    M, K, N, r, n = case.M, case.K, case.N, case.r, HOST_ADAPTERS

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device)

    scalings = torch.tensor([SCALING * (1.0 + 0.25 * (i % 4)) for i in range(n)], device=device)
    ids = torch.tensor(multi_adapter_ids(M, n), dtype=torch.int64, device=device)
    return Weights(x=rand(M, K), W=rand(N, K, scale=K ** -0.5), b=rand(N), A=rand(r, K, scale=K ** -0.5),
                   B=rand(N, r, scale=r ** -0.5), A_stack=rand(n, r, K, scale=K ** -0.5),
                   B_stack=rand(n, N, r, scale=r ** -0.5), scalings=scalings, ids=ids, dy=rand(M, N))


def _eager_fn(w: Weights, case: HostCase) -> tuple[Callable, Optional[list]]:
    """The baseline: eager LoRA, forward (no grad) or forward+backward with fresh leaves."""
    if not case.grad:
        return (lambda: eager_lora(w.x, w.W, w.A, w.B, SCALING, w.b)), None
    x, A, B = (t.clone().requires_grad_() for t in (w.x, w.A, w.B))
    leaves = [x, A, B]

    def step():
        x.grad = A.grad = B.grad = None
        eager_lora(x, w.W, A, B, SCALING, w.b, case.dropout, training=True).backward(w.dy)
    return step, leaves


def _lora_layer(w: Weights, case: HostCase) -> nn.Module:
    layer = lf.LoRALinear(case.K, case.N, r=case.r, lora_alpha=SCALING * case.r,
                          lora_dropout=case.dropout).to(w.x.device)
    with torch.no_grad():
        for p, t in ((layer.weight, w.W), (layer.bias, w.b), (layer.lora_A, w.A), (layer.lora_B, w.B)):
            p.copy_(t)
    return layer.train(case.grad)


def _peft_layer(w: Weights, case: HostCase) -> nn.Module:
    A, B = (t.clone().requires_grad_(case.grad) for t in (w.A, w.B))
    (layer,) = make_peft_layers([(w.W, w.b, A, B)], case.r, SCALING * case.r, case.dropout)
    return layer.train(case.grad)


def _module_fwdbwd(layer: nn.Module, w: Weights) -> tuple[Callable, list]:
    """One forward+backward of ``layer`` on a fresh leaf x, its trainable parameters' grads
    reset first (as the eager baseline resets its leaves)."""
    x = w.x.clone().requires_grad_()
    if isinstance(layer.lora_A, nn.Parameter):  # LoRALinear
        A, B = layer.lora_A, layer.lora_B
    else:                                        # peft lora.Linear
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def step():
        x.grad = A.grad = B.grad = None
        layer(x).backward(w.dy)
    return step, [x, A, B]


def _multi_layer(w: Weights, case: HostCase):
    layer = lf.MultiLoRALinear(case.K, case.N, max_adapters=HOST_ADAPTERS, max_rank=case.r).to(w.x.device)
    with torch.no_grad():
        layer.weight.copy_(w.W)
        layer.bias.copy_(w.b)
    for i in range(HOST_ADAPTERS):
        layer.add_adapter(f"a{i}", w.A_stack[i], w.B_stack[i], float(w.scalings[i]))
    return layer.eval()


def _multi_reference(w: Weights) -> torch.Tensor:
    d = torch.float64
    return lf.multi_lora_linear_reference(w.x.to(d), w.W.to(d), w.A_stack.to(d), w.B_stack.to(d), w.ids,
                                          w.scalings.to(d), w.b.to(d))


def _single_fn(case: HostCase, w: Weights, p: str) -> tuple[Callable, Optional[list]]:
    """Provider ``p``'s call (and, with grad, its leaves x, A, B) for a single-adapter case."""
    if case.subject == "lora_linear-fwd":
        return (lambda: lf.lora_linear(w.x, w.W, w.A, w.B, SCALING, w.b)), None
    layer = _peft_layer(w, case) if p == "peft" else _lora_layer(w, case)
    if case.grad:
        return _module_fwdbwd(layer, w)
    return (lambda: layer(w.x)), None


def _setup_single(case: HostCase, w: Weights, providers: list) -> Setup:
    """lora_linear-fwd, LoRALinear-fwd, LoRALinear-fwdbwd (p 0 / 0.1): checked against eager
    (outputs; with grad and no dropout dX, dA, dB), except fused-noop (its outputs are garbage)."""
    eager, eager_leaves = _eager_fn(w, case)
    s = Setup({"eager": eager})
    for p in providers:
        if p == "eager":
            continue
        fn, leaves = _single_fn(case, w, p)
        s.fns[p] = fn
        if p == "fused-noop" or (case.grad and case.dropout > 0):
            s.checks[p] = None
        elif not case.grad:
            s.checks[p] = _relerr(fn(), eager())
        else:
            eager()
            fn()
            s.checks[p] = max(_relerr(a.grad, e.grad) for a, e in zip(leaves, eager_leaves))
    return s


def _setup_multi(case: HostCase, w: Weights, providers: list) -> Setup:
    """multi_lora_linear-plan and MultiLoRALinear-adapter_batch (no grad)."""
    eager, _ = _eager_fn(w, case)
    s = Setup({"eager": eager})
    ref = _multi_reference(w)
    for p in providers:
        if p == "eager":
            continue
        if p == "peft-mixed":
            layer = make_peft_mixed_layer(w.W, w.b, w.A_stack, w.B_stack, [case.r] * HOST_ADAPTERS,
                                          [float(v) for v in w.scalings])
            names = peft_adapter_names(w.ids.tolist())
            fn = (lambda layer=layer, names=names: layer(w.x, adapter_names=names))
        elif case.subject == "multi_lora_linear-plan":
            plan = lf.plan_segments(w.ids, HOST_ADAPTERS)  # built once per batch, outside the timing
            fn = (lambda plan=plan: lf.multi_lora_linear(w.x, w.W, w.A_stack, w.B_stack, plan, w.scalings, w.b))
        else:
            layer = _multi_layer(w, case)
            holder = nn.Sequential(layer)
            s.stack.enter_context(lf.adapter_batch(holder, [f"a{int(i)}" for i in w.ids]))
            fn = (lambda layer=layer: layer(w.x))
        s.checks[p] = None if p == "fused-noop" else _relerr(fn(), ref)
        s.fns[p] = fn
    return s


def _setup_llama(case: HostCase, providers: list, device: torch.device) -> Setup:
    """One SGD training step of the demo's tiny Llama with LoRA by each provider (the demo's
    own builders, so the step table and this row time the same thing) on one fixed batch."""
    from lora_fused import demo
    vocab = 96
    base = demo.build_base(vocab, "cpu", device, torch.float32)
    base.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    window = torch.randint(0, vocab, (HOST_LLAMA_BATCH, HOST_LLAMA_SEQ + 1), generator=g).to(device)
    inputs, targets = window[:, :-1], window[:, 1:]
    s = Setup({})
    losses = {}
    for p in providers:
        model = demo.with_lora(p, base, "all-linear", case.r, 2.0 * case.r, case.dropout)
        step = demo.make_step(model)
        losses[p] = demo.lm_loss(model.eval(), inputs, targets).item()  # B = 0: all equal the base's
        model.train()
        s.fns[p] = (lambda step=step: step(inputs, targets))
    for p in providers:
        s.checks[p] = abs(losses[p] - losses["eager"]) / abs(losses["eager"])
    return s


def setup_case(case: HostCase, device: torch.device, providers: list) -> Setup:
    if case.subject == "llama-step":
        return _setup_llama(case, providers, device)
    w = make_weights(case, device)
    if case.adapters:
        return _setup_multi(case, w, providers)
    return _setup_single(case, w, providers)


# --------------------------------------------------------------------------
# A host case -> rows
# --------------------------------------------------------------------------
def host_providers(case: HostCase, requested: list, cuda: bool) -> tuple[list, dict]:
    """(providers to time, {provider: why not}) for ``case``: its own providers that
    ``requested`` keeps (eager, the baseline, always runs); ``fused`` of a Triton case only on
    CUDA (a CPU has no launch: only the no-op row)."""
    run, why = [], {}
    for p in case.providers:
        if p == "fused" and case.triton and not cuda:
            why[p] = "n/a on a CPU: Triton has no launch here (fused-noop times the host work)"
        elif p == "eager" or p in requested or (p == "fused-noop" and "fused" in requested):
            run.append(p)
        else:
            why[p] = "not requested (--providers / --peft)"
    return run, why


def _peft_missing() -> Optional[str]:
    try:
        import peft  # noqa: F401
    except Exception as exc:
        return f"peft not importable ({type(exc).__name__})"
    return None


def measure_case(case: HostCase, device: torch.device, providers: list, rounds: int) -> tuple[dict, dict, dict]:
    """({provider: per-round µs}, checks, {provider: launches per call}) for one host case,
    timed in this process (per-op cases with one torch thread)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    threads = torch.get_num_threads()
    if case.subject != "llama-step":
        torch.set_num_threads(1)
    try:
        with torch.set_grad_enabled(case.grad):
            s = setup_case(case, device, providers)
            with s.stack:
                launches, around = {}, {}
                if "fused-noop" in s.fns:
                    launches["fused-noop"] = _count_launches(s.fns["fused-noop"])
                    around["fused-noop"] = noop_launches
                for p, fn in s.fns.items():  # warm-up: caches, plans, allocator
                    with around[p]() if p in around else contextlib.nullcontext():
                        for _ in range(3):
                            fn()
                calls = {}
                for p, fn in s.fns.items():
                    with around[p]() if p in around else contextlib.nullcontext():
                        calls[p] = calls_per_block(fn, sync)
                per_call = time_interleaved(s.fns, rounds=rounds, calls=calls, sync=sync, around=around)
    finally:
        torch.set_num_threads(threads)
    return per_call, s.checks, {"launches": launches, "calls": calls}


def _count_launches(fn: Callable[[], object]) -> int:
    """Kernel launches in one call of ``fn`` (after a first call), launches no-op'd."""
    with noop_launches() as counter:
        fn()
        before = counter.launches
        fn()
    n = counter.launches - before
    if n == 0:
        raise RuntimeError("the Triton path was not taken (no kernel launch): lora-fused chose its torch "
                           "backend (on a CPU the Triton path needs TRITON_INTERPRET=1)")
    return n


def _row_from(runner, case: HostCase, p: str, times: Optional[list], extra: dict) -> dict:
    row = runner.new_row(case, p)
    if times is None:
        return row
    med, q20, q80 = quantiles(times)
    row.update(median_ms=med / 1e3, q20_ms=q20 / 1e3, q80_ms=q80 / 1e3, median_us=med, q20_us=q20, q80_us=q80,
               method=f"interleaved {len(times)} rounds x {extra['calls'][p]} calls", rounds=len(times),
               calls=extra["calls"][p], threads=1 if case.subject != "llama-step" else torch.get_num_threads())
    return row


def run_host_case(runner, case: HostCase, requested: list) -> list[dict]:
    """Rows for one host case (see the module docstring); on a CPU a Triton case is measured by
    the child process that :meth:`HostChild.rows` runs once for all selected Triton cases."""
    cuda = runner.s.cuda
    providers, not_run = host_providers(case, requested, cuda)
    for p in ("peft", "peft-mixed"):
        if p in providers and (why := _peft_missing()):
            providers.remove(p)
            not_run[p] = why
    if case.triton and not cuda and not in_triton_child():
        return runner.host_child.rows(runner, case, providers, not_run)
    rows = []
    try:
        per_call, checks, extra = measure_case(case, runner.device, providers, runner.s.host_rounds)
    except Exception as exc:
        for p in providers:
            row = runner.new_row(case, p)
            row.update(status="error", reason=error_reason(exc))
            rows.append(row)
        per_call, checks, extra = {}, {}, {}
    for p in case.providers:
        if p in not_run:
            row = runner.new_row(case, p)
            row.update(status="n/a" if p == "fused" else "skipped", reason=not_run[p])
            rows.append(row)
        elif p in per_call:
            row = _row_from(runner, case, p, per_call[p], extra)
            row["check_relerr"] = checks.get(p)
            if p in extra.get("launches", {}):
                row["launches"] = extra["launches"][p]
                row["note"] = f"{row['launches']} launches per call (no-op'd)"
            rows.append(row)
    add_ratios(rows)
    _paired_ratios(rows, per_call)
    return rows


def _paired_ratios(rows: list[dict], per_call: dict) -> None:
    """vs_eager_paired: the median over rounds of (provider's µs / eager's µs in that round)."""
    base = per_call.get("eager")
    for r in rows:
        times = per_call.get(r["provider"])
        if base and times and r.get("status") == "ok":
            r["vs_eager_paired"] = statistics.median(t / b for t, b in zip(times, base))


def in_triton_child() -> bool:
    return all(os.environ.get(k) == v for k, v in TRITON_CHILD_ENV.items())


class HostChild:
    """Runs the selected Triton host cases of a CPU run in one child process
    (``TRITON_INTERPRET=1`` must be set before the kernels are defined), once."""

    def __init__(self, case_names: list, rounds: int):
        self.case_names = list(case_names)
        self.rounds = rounds
        self._rows: Optional[dict] = None
        self._error = ""

    def _run(self, requested: list) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, **TRITON_CHILD_ENV)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "bench.host_child", "--rounds", str(self.rounds),
               "--cases", ",".join(self.case_names), "--providers", ",".join(requested)]
        self._rows = {}
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                self._error = f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
                return
            for row in json.loads(proc.stdout.strip().splitlines()[-1]):
                self._rows.setdefault(row["case"], []).append(row)
        except Exception as exc:
            self._error = f"child failed: {type(exc).__name__}: {exc}"[:300]

    def rows(self, runner, case: HostCase, providers: list, not_run: dict) -> list[dict]:
        if self._rows is None:
            self._run(sorted(set(providers) | {"eager", "fused"}))
        if case.name in self._rows:
            return self._rows[case.name]
        rows = []
        for p in case.providers:
            row = runner.new_row(case, p)
            row.update(status="error", reason=self._error or "not measured by the child process")
            rows.append(row)
        return rows

