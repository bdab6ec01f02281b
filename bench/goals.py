"""The project's speed and memory goals, evaluated over measured rows.

Each goal (:data:`GOALS`) holds its id, the short label the tables print, the bound and a
one-line description; ``python -m bench.goals --markdown`` prints them as the README's
goals table (tests/test_bench.py checks that the README holds exactly that table).
In a goal, ``fused`` is always the provider of that name: lora-fused as a user calls it,
with its default choices. The single-adapter strategy named "fused" (one GEMM with the
shrink in its K loop) is the provider ``fused_kernel``; the multi-adapter grouped GEMM is the
``prefill`` regime (bench/providers/multi.py).

H1-H7 are the host-time goals, measured by ``--cases host`` (bench/host.py:
medians of interleaved rounds). Host time is their subject, so a CPU measures them
for real (not starred). H7's bound is absolute: what the Triton path's Python costs
around its launches (validation, plan lookup, allocation, grid, launcher) must stay
within 10 µs per op over the launches' own cost; the launches are replaced by no-ops
(bench.host.noop_launches), so the value is that host work alone, per op.

Q1-Q3 are the QLoRA goals (bench/providers/qlora.py). Q2 compares eager launches on both sides (PEFT's
bitsandbytes layer is not timed as a CUDA-graph replay; fused's replay ratio is in the
note). Q3 is read from torch.cuda.max_memory_allocated, so it is n/a on a CPU. Where
peft-qlora is not run, eager-qlora stands in and the note says so.

D1-D4 are the DoRA goals (bench/providers/dora.py). D3 is measured for real on a CPU (not starred) and
is n/a on a GPU run; D4 reads torch.cuda.max_memory_allocated (n/a on a CPU). PEFT DoRA
has no stand-in: without peft, D2-D4 are n/a. S1-S3 are the serving goals (bench/providers/serving.py):
S1 divides by the row's byte floor (``byte_floor_ms``: bytes / the measured copy bandwidth;
each used adapter's A and B read once, x read, y read and written), S2 and S3 compare medians.

M-GPU, M-speed-CPU and M-memory are the MoE goals (bench/providers/moe.py: one Qwen3-MoE experts
block with LoRA on both expert projections). M-GPU compares fused with the block alone (the
grouped_mm floor). M-speed-CPU and M-memory are CPU goals (measured for real without CUDA, n/a
on a GPU run) at a fixed shape: the training step's medians over interleaved rounds, and the
bytes of every new tensor one step makes (measure.AllocationCounter, a TorchDispatchMode);
their note gives the peak of those bytes alive at once and the bytes saved for backward. PEFT's
target_parameters LoRA has no stand-in: without peft they are n/a.

Where PEFT is not run (not importable, or skipped on a CPU quick run), P3b and P4
compare with the loralib-style eager provider instead, and say so. P6 has no
stand-in: PEFT's mixed batch is its subject. PEFT's mixed batch indexes rows
with host-built lists, so it cannot be captured in a CUDA graph: where fused was
timed as a graph replay, P6 divides by fused's eager-launch time (like for
like) and the note gives the graph-replay ratio too. Timing goals measured on a
CPU are marked ``*``: they prove the harness, not the kernels.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Goal:
    id: str
    what: str        # the label printed in the goals table of a run ({cmp}: the comparison provider)
    op: str          # "<=" | ">=" | "<"
    bound: float
    timing: bool = True
    host: bool = False   # host time is the subject: a CPU measures it for real
    cpu: bool = False    # a CPU goal: measured for real without CUDA, n/a on a GPU run
    about: str = ""      # one line for the README's goals table (markdown_table)

    def passes(self, value: float) -> bool:
        if self.op == "<":
            return value < self.bound
        return value <= self.bound if self.op == "<=" else value >= self.bound


GOALS = {g.id: g for g in (
    Goal("P1", "fwd M=8192: fused / base", "<=", 1.06,
         about="forward, M = 8192: fused / base (`F.linear` alone)"),
    Goal("P2", "fwd M<=16: fused / base (worst M)", "<=", 1.10,
         about="forward, M ≤ 16 (decode, CUDA-graph replay): fused / base, worst M"),
    Goal("P3", "fwd+bwd M=8192: fused / frozen base", "<=", 1.12,
         about="forward+backward, M = 8192: fused / frozen base (dropout 0 and 0.1)"),
    Goal("P3b", "fwd+bwd M=8192: {cmp} / fused", ">=", 1.35,
         about="forward+backward, M = 8192: PEFT / fused (dropout 0 and 0.1)"),
    Goal("P4", "saved bytes q/k/v, dropout 0.1: fused / {cmp}", "<=", 0.35, timing=False,
         about="activation bytes saved for backward, q/k/v sharing x, dropout 0.1: fused / PEFT"),
    Goal("P5", "multi decode 64 rows x 64 adapters: (fused - base) / base", "<=", 0.25,
         about="multi-adapter decode, 64 rows each with its own adapter, r 16: (fused − base) / base"),
    Goal("P6", "multi decode 64 rows x 64 adapters: peft-mixed / fused", ">=", 10.0,
         about="multi-adapter decode: PEFT's mixed batch (`adapter_names`) / fused"),
    Goal("P7", "multi prefill 8192 rows, 16 adapters: fused / base", "<=", 1.10,
         about="multi-adapter prefill, 8192 rows over 16 adapters: fused / base"),
    Goal("P7b", "multi decode, ranks {{8,16,64}}: fused / all ranks 64", "<=", 1.0,
         about="multi-adapter decode, ranks {8, 16, 64} in turn: fused / every rank padded to 64"),
    Goal("P7c", "multi decode, most ranks 8: fused / all ranks 64", "<", 1.0,
         about="multi-adapter decode, 7 in 8 adapters at rank 8, 1 in 8 at 64: fused / padded to 64"),
    Goal("F1", "floor: fused (auto) / min(composite, eager)", "<=", 1.0,
         about="every single-adapter headline case: fused (default choice) / faster of composite, eager"),
    Goal("Q1", "qlora fwd+bwd M=8192: {cmp} / fused", ">=", 1.3,
         about="QLoRA (NF4, double quantization) forward+backward, M = 8192: PEFT QLoRA / fused"),
    Goal("Q2", "qlora decode M<=16: {cmp} / fused (worst M, eager launches)", ">=", 2.0,
         about="QLoRA decode forward, M ≤ 16: PEFT QLoRA / fused, worst M (eager launches)"),
    Goal("Q3", "qlora peak memory: fused / {cmp} (worst case)", "<=", 1.0, timing=False,
         about="QLoRA peak memory (CUDA), every QLoRA case: fused / PEFT QLoRA, worst case"),
    Goal("D1", "dora fwd+bwd M=8192: fused / fused-lora", "<=", 1.15,
         about="DoRA forward+backward, 4096², r 16, M = 8192: fused DoRA / fused LoRA"),
    Goal("D2", "dora fwd+bwd M=8192: peft-dora / fused", ">=", 1.6,
         about="DoRA forward+backward, M = 8192: PEFT DoRA / fused DoRA"),
    Goal("D3", "dora train step 1024^2 M=256, CPU: fused / peft-dora", "<=", 0.8, cpu=True,
         about="DoRA training step on a CPU (torch path), 1024², M = 256: fused / PEFT DoRA"),
    Goal("D4", "dora peak memory fwd+bwd: fused / peft-dora", "<=", 1.0, timing=False,
         about="DoRA peak memory (CUDA), forward+backward, M = 8192: fused / PEFT DoRA"),
    Goal("S1", "serving decode qkv, 64 adapters: packed / byte floor", "<=", 1.10,
         about="serving decode, packed q/k/v 4096 → 6144, r 16, 64 adapters, T = 64: `add_lora` / byte floor"),
    Goal("S2", "serving decode qkv: three-calls / packed", ">=", 1.5,
         about="serving decode: three single-slice `add_lora` calls / the packed call"),
    Goal("S3", "serving prefill 16 adapters: packed / base GEMM", "<=", 0.08,
         about="serving prefill, T = 8192 over 16 adapters: packed delta / base GEMM"),
    Goal("M-GPU", "moe fwd+bwd 4096 tokens: fused / base (grouped_mm)", "<=", 1.15,
         about="MoE experts block (Qwen3-30B-A3B-like: E 128, H 2048, I 768, top-8), LoRA r 16 on both "
               "projections, forward+backward, 4096 tokens: fused / the block alone (grouped GEMM)"),
    Goal("M-speed-CPU", "moe train step E64 H512 I256 T512, CPU: peft-moe / fused", ">=", 1.5, cpu=True,
         about="MoE training step on a CPU (torch path), E 64, H 512, I 256, r 16, 512 tokens top-8, fp32: "
               "PEFT `target_parameters` / fused (interleaved rounds)"),
    Goal("M-memory", "moe train step bytes allocated, CPU: fused / peft-moe", "<=", 0.5, timing=False, cpu=True,
         about="the same step: bytes of every new tensor (TorchDispatchMode count), fused / PEFT"),
    Goal("H1", "host: lf.lora_linear fwd, no grad / eager", "<=", 1.10, host=True,
         about="host time, 64 → 64, r 8, 4 rows, 1 thread: `lf.lora_linear` forward, no grad / eager LoRA"),
    Goal("H2", "host: LoRALinear fwd (eval) / eager", "<=", 1.15, host=True,
         about="host: `LoRALinear` forward (eval) / eager"),
    Goal("H3", "host: LoRALinear fwd+bwd / eager", "<=", 1.00, host=True,
         about="host: `LoRALinear` forward+backward / eager (dropout 0 and 0.1)"),
    Goal("H4", "host: multi_lora_linear (plan, 8 adapters) / eager 1 adapter", "<=", 2.0, host=True,
         about="host: `multi_lora_linear` with a plan, 8 adapters / eager with one adapter"),
    Goal("H5", "host: MultiLoRALinear in adapter_batch / eager 1 adapter", "<=", 2.5, host=True,
         about="host: `MultiLoRALinear` inside `adapter_batch` / eager with one adapter"),
    Goal("H6", "host: tiny-Llama train step: fused / {cmp}", "<=", 0.90, host=True,
         about="host: tiny-Llama training step (2 layers, all linears r 16, 4 × 32 tokens): fused / PEFT"),
    Goal("H7", "host: Triton path, launches no-op'd: us per op", "<=", 10.0, host=True,
         about="host work of the Triton path per op, launches no-op'd (µs)"),
)}
GOAL_IDS = tuple(GOALS)


def _ok(rows: list[dict], provider: str) -> Optional[dict]:
    for r in rows:
        if r["provider"] == provider and r.get("status") == "ok":
            return r
    return None


def _find(rows: list[dict], provider: str) -> Optional[dict]:
    for r in rows:
        if r["provider"] == provider:
            return r
    return None


def _why_missing(rows: list[dict], *providers: str) -> str:
    for p in providers:
        r = _find(rows, p)
        if r is None:
            return f"{p} not run"
        if r.get("status") != "ok":
            return f"{p}: {r.get('status')} {r.get('reason', '')}".strip()
    return "not measured"


def _time_ratio(rows, num: str, den: str, minus_one=False) -> tuple[Optional[float], str]:
    a, b = _ok(rows, num), _ok(rows, den)
    if a is None or b is None or a.get("median_ms") is None or b.get("median_ms") is None:
        return None, _why_missing(rows, num, den)
    v = a["median_ms"] / b["median_ms"]
    return (v - 1.0 if minus_one else v), f"{num} {a['median_ms']:.4g} ms / {den} {b['median_ms']:.4g} ms"


def _peft_mixed_ratio(rows: list[dict]) -> tuple[Optional[float], str]:
    """peft-mixed / fused. PEFT's mixed batch cannot be captured in a CUDA graph; where fused
    was (decode on a GPU: median_ms is graph replay, launch_ms the eager launch), divide by
    fused's eager-launch time: like for like."""
    pm, f = _ok(rows, "peft-mixed"), _ok(rows, "fused")
    if pm is None or f is None or pm.get("median_ms") is None or f.get("median_ms") is None:
        return None, _why_missing(rows, "peft-mixed", "fused")
    def graph(r):
        return str(r.get("method", "")).startswith("cuda-graph")
    if graph(f) and not graph(pm) and f.get("launch_ms"):
        v = pm["median_ms"] / f["launch_ms"]
        return v, (f"peft-mixed {pm['median_ms']:.4g} ms / fused {f['launch_ms']:.4g} ms, both eager launch "
                   f"(vs fused's CUDA-graph replay {f['median_ms']:.4g} ms: "
                   f"{pm['median_ms'] / f['median_ms']:.1f}x)")
    return pm["median_ms"] / f["median_ms"], f"peft-mixed {pm['median_ms']:.4g} ms / fused {f['median_ms']:.4g} ms"


def _padded_twin(mixed, padded) -> bool:
    """``padded`` is ``mixed`` (same rows, shapes, adapters) with every rank at its largest."""
    same = ("mode", "M", "K", "N", "adapters", "dtype", "bias", "base_rows", "dropout")
    return (all(getattr(mixed, k) == getattr(padded, k) for k in same)
            and set(padded.adapter_ranks) == {max(mixed.adapter_ranks)})


def _cross_case_ratio(rows_a: list[dict], rows_b: list[dict], provider: str, case_a, case_b
                      ) -> tuple[Optional[float], str]:
    """``provider``'s median on case a over its median on case b."""
    a, b = _ok(rows_a, provider), _ok(rows_b, provider)
    if a is None or a.get("median_ms") is None:
        return None, f"{case_a.name}: " + _why_missing(rows_a, provider)
    if b is None or b.get("median_ms") is None:
        return None, f"{case_b.name}: " + _why_missing(rows_b, provider)
    ra = "/".join(str(r) for r in sorted(set(case_a.adapter_ranks)))
    return a["median_ms"] / b["median_ms"], (f"{provider} ranks {ra} {a['median_ms']:.4g} ms / all "
                                             f"{case_b.r} {b['median_ms']:.4g} ms")


def comparison_provider(rows: list[dict]) -> str:
    """PEFT where it ran, else the loralib-style eager stand-in."""
    return "peft" if _ok(rows, "peft") is not None else "eager"


def evaluate(rows: list[dict], cases: list, *, gpu: bool) -> list[dict]:
    """Goal lines (dicts) for every goal id P1..P7, measured or n/a, from ``rows`` of ``cases``."""
    by_case: dict[str, list[dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    dtypes = list(dict.fromkeys(c.dtype for c in cases if c.goals and c.mode != "host"))
    lines: list[dict] = []

    def add(gid, value, note, case_name="", suffix="", cmp="", na_reason=""):
        g = GOALS[gid]
        what = g.what.format(cmp=cmp or "peft") + suffix
        if len(dtypes) > 1 and case_name and not g.host:
            what += f" [{case_name.rsplit('-', 1)[-1]}]"
        if g.cpu and gpu:  # a CPU goal: what a GPU run measures is not its subject
            value, na_reason = None, f"a CPU goal: measured by a run without CUDA (python -m bench --cpu --cases {gid})"
        ok = value is not None and math.isfinite(value)
        passed = g.passes(value) if ok else None
        result = "n/a" if passed is None else ("PASS" if passed else "FAIL")
        starred = g.timing and not gpu and not g.host and not g.cpu
        if passed is not None and starred:
            result += "*"
        lines.append(dict(id=gid, what=what, case=case_name, value=value if ok else None, op=g.op,
                          bound=g.bound, passed=passed, result=result,
                          note=na_reason if (not ok and na_reason) else note,
                          gpu_measurement=not starred))

    for dtype in dtypes or [None]:
        tagged = {gid: [c for c in cases if gid in c.goals and (dtype is None or c.dtype == dtype)]
                  for gid in GOALS}

        def case_rows(c):
            return by_case.get(c.name, [])

        # P1
        for c in tagged["P1"][:1] or [None]:
            if c is None:
                add("P1", None, "", na_reason="not in this run")
                continue
            v, note = _time_ratio(case_rows(c), "fused", "base")
            add("P1", v, note, c.name)
        # P2: the worst decode size
        p2 = tagged["P2"]
        if not p2:
            add("P2", None, "", na_reason="not in this run")
        else:
            vals, notes = [], []
            for c in p2:
                v, note = _time_ratio(case_rows(c), "fused", "base")
                notes.append(f"M={c.M}: " + (f"{v:.3f}" if v is not None else note))
                if v is not None:
                    vals.append(v)
            complete = len(vals) == len(p2)
            add("P2", max(vals) if complete else None, "; ".join(notes), ",".join(c.name for c in p2),
                suffix=", CUDA graph" if gpu else "", na_reason="; ".join(notes))
        # P3 and P3b, one line per dropout
        p3 = tagged["P3"]
        if not p3:
            add("P3", None, "", na_reason="not in this run")
            add("P3b", None, "", na_reason="not in this run")
        for c in p3:
            rr = case_rows(c)
            v, note = _time_ratio(rr, "fused", "base")
            add("P3", v, note, c.name, suffix=f", dropout {c.dropout:g}")
        for c in tagged["P3b"]:
            rr = case_rows(c)
            cmp = comparison_provider(rr)
            v, note = _time_ratio(rr, cmp, "fused")
            if cmp != "peft":
                note += " (peft not run: eager stands in)"
            add("P3b", v, note, c.name, suffix=f", dropout {c.dropout:g}", cmp=cmp)
        # P4
        for c in tagged["P4"][:1] or [None]:
            if c is None:
                add("P4", None, "", na_reason="not in this run")
                continue
            rr = case_rows(c)
            cmp = comparison_provider(rr)
            f, o = _ok(rr, "fused"), _ok(rr, cmp)
            if f is None or o is None or not o.get("saved_bytes"):
                add("P4", None, "", c.name, cmp=cmp, na_reason=_why_missing(rr, "fused", cmp))
            else:
                note = (f"fused {f['saved_bytes'] / 2**20:.2f} MiB / {cmp} {o['saved_bytes'] / 2**20:.2f} MiB"
                        + ("" if cmp == "peft" else " (peft not run: eager stands in)"))
                add("P4", f["saved_bytes"] / o["saved_bytes"], note, c.name, cmp=cmp)
        # P5, P6, P7: multi-adapter forward against the base layer (P5, P7) and PEFT's mixed
        # batch against fused (P6: eager launches on both sides where PEFT's is not a graph replay)
        for gid in ("P5", "P6", "P7"):
            cs = tagged[gid]
            if not cs:
                add(gid, None, "", na_reason="not in this run")
                continue
            c = cs[0]
            if gid == "P6":
                v, note = _peft_mixed_ratio(case_rows(c))
            else:
                v, note = _time_ratio(case_rows(c), "fused", "base", minus_one=gid == "P5")
                alt, alt_note = _time_ratio(case_rows(c), "fused-cublas", "base")
                if gid == "P7" and alt is not None:  # the other prefill strategy, for the config table
                    note = f"{note}; fused-cublas / base {alt:.3f} ({alt_note})"
            add(gid, v, note, c.name, na_reason=note)
        # P7b, P7c: a mixed-rank batch against the same rows and adapters padded to the largest rank
        for gid in ("P7b", "P7c"):
            cs = tagged[gid]
            mixed = [c for c in cs if c.mixed_ranks]
            padded = [p for p in cs if mixed and not p.mixed_ranks and _padded_twin(mixed[0], p)]
            if not mixed or not padded:
                add(gid, None, "", ",".join(c.name for c in cs),
                    na_reason="not in this run" if not cs else
                    f"needs a mixed-rank case and its padded twin, got {', '.join(c.name for c in cs)}")
                continue
            c, p = mixed[0], padded[0]
            v, note = _cross_case_ratio(case_rows(c), case_rows(p), "fused", c, p)
            add(gid, v, note, f"{c.name},{p.name}", na_reason=note)
        # F1: the measured choice is never slower than the composite strategy nor than eager
        if not tagged["F1"]:
            add("F1", None, "", na_reason="not in this run")
        for c in tagged["F1"]:
            ratios = [(den, *_time_ratio(case_rows(c), "fused", den)) for den in ("composite", "eager")]
            v = max(r for _, r, _ in ratios) if all(r is not None for _, r, _ in ratios) else None
            note = "; ".join(f"fused / {den} {r:.3f}" if r is not None else n for den, r, n in ratios)
            add("F1", v, note, c.name, suffix=f" ({c.mode}, M={c.M}, dropout {c.dropout:g})", na_reason=note)
        _evaluate_qlora(add, tagged, case_rows)
        _evaluate_dora(add, tagged, case_rows)
        _evaluate_serving(add, tagged, case_rows)
        _evaluate_moe(add, tagged, case_rows)
    _evaluate_host(add, by_case, [c for c in cases if c.mode == "host"])
    return lines


def qlora_comparison(rows: list[dict]) -> str:
    """PEFT's QLoRA layer where it ran, else the eager QLoRA stand-in."""
    return "peft-qlora" if _ok(rows, "peft-qlora") is not None else "eager-qlora"


def _launch_ratio(rows: list[dict], num: str, den: str) -> tuple[Optional[float], str]:
    """num / den on eager launches: where one side was timed as a CUDA-graph replay and the other
    not, the replayed side's eager-launch time (``launch_ms``) is used, the replay ratio noted."""
    a, b = _ok(rows, num), _ok(rows, den)
    if a is None or b is None or a.get("median_ms") is None or b.get("median_ms") is None:
        return None, _why_missing(rows, num, den)

    def eager_ms(r):
        graph = str(r.get("method", "")).startswith("cuda-graph")
        return r.get("launch_ms") if graph else r["median_ms"]
    ta, tb = eager_ms(a), eager_ms(b)
    if ta is None or tb is None:
        return None, f"{num} or {den}: no eager-launch time"
    note = f"{num} {ta:.4g} ms / {den} {tb:.4g} ms"
    if (ta, tb) != (a["median_ms"], b["median_ms"]):
        note += f" (eager launches; with CUDA-graph replay {a['median_ms'] / b['median_ms']:.2f}x)"
    return ta / tb, note


def _evaluate_qlora(add, tagged: dict, case_rows) -> None:
    """Q1-Q3: PEFT's QLoRA layer (else eager-qlora) against lora-fused's LoRALinear4bit."""
    stand_in = " (peft-qlora not run: eager-qlora stands in)"
    for c in tagged["Q1"][:1] or [None]:
        if c is None:
            add("Q1", None, "", na_reason="not in this run (--cases qlora)")
            continue
        rr = case_rows(c)
        cmp = qlora_comparison(rr)
        v, note = _time_ratio(rr, cmp, "fused")
        add("Q1", v, note + (stand_in if cmp != "peft-qlora" else ""), c.name, cmp=cmp, na_reason=note)
    for gid, worst in (("Q2", min), ("Q3", max)):
        cs = tagged[gid]
        if not cs:
            add(gid, None, "", na_reason="not in this run (--cases qlora)")
            continue
        vals, notes, cmps = [], [], set()
        for c in cs:
            rr = case_rows(c)
            cmp = qlora_comparison(rr)
            cmps.add(cmp)
            if gid == "Q2":
                v, note = _launch_ratio(rr, cmp, "fused")
            else:
                v, note = _peak_ratio(rr, "fused", cmp)
            notes.append(f"{c.mode} M={c.M}: " + (f"{v:.3f}, {note}" if v is not None else note))
            if v is not None:
                vals.append(v)
        cmp = "peft-qlora" if cmps == {"peft-qlora"} else "eager-qlora"
        cuda_only = "peak memory is measured on CUDA only"
        note = (cuda_only if all(n.endswith(cuda_only) for n in notes) else "; ".join(notes)) + (
            stand_in if cmp != "peft-qlora" else "")
        add(gid, worst(vals) if len(vals) == len(cs) else None, note, ",".join(c.name for c in cs), cmp=cmp,
            na_reason=note)


def _evaluate_dora(add, tagged: dict, case_rows) -> None:
    """D1-D4: lf.DoRALinear against lora-fused's LoRA (D1) and PEFT's DoRA (D2-D4)."""
    pairs = {"D1": ("fused", "fused-lora"), "D2": ("peft-dora", "fused"), "D3": ("fused", "peft-dora")}
    for gid in ("D1", "D2", "D3", "D4"):
        c = (tagged[gid] or [None])[0]
        if c is None:
            add(gid, None, "", na_reason="not in this run (--cases dora)")
            continue
        rr = case_rows(c)
        if gid == "D4":
            v, note = _peak_ratio(rr, "fused", "peft-dora")
            es = {"bf16": 2, "fp16": 2}.get(c.dtype, 4)
            if v is not None:
                note += f" (one out x in tensor: {c.N * c.K * es / 2**20:.1f} MiB)"
        else:
            v, note = _time_ratio(rr, *pairs[gid])
        add(gid, v, note, c.name, na_reason=note)


def _evaluate_serving(add, tagged: dict, case_rows) -> None:
    """S1-S3: the packed add_lora call against its byte floor, three single-slice
    calls, and the base GEMM."""
    for gid in ("S1", "S2", "S3"):
        c = (tagged[gid] or [None])[0]
        if c is None:
            add(gid, None, "", na_reason="not in this run (--cases serving)")
            continue
        rr = case_rows(c)
        if gid == "S1":
            r = _ok(rr, "packed")
            if r is None or r.get("median_ms") is None:
                v, note = None, _why_missing(rr, "packed")
            elif not r.get("byte_floor_ms"):
                v, note = None, "no byte floor (copy bandwidth not measured)"
            else:
                v = r["median_ms"] / r["byte_floor_ms"]
                note = (f"packed {r['median_ms']:.4g} ms / byte floor {r['byte_floor_ms']:.4g} ms "
                        f"({r['bytes'] / 2**20:.2f} MiB at the measured copy bandwidth)")
        elif gid == "S2":
            v, note = _time_ratio(rr, "three-calls", "packed")
        else:
            v, note = _time_ratio(rr, "packed", "base")
        add(gid, v, note, c.name, na_reason=note)


def _evaluate_moe(add, tagged: dict, case_rows) -> None:
    """M-GPU (fused / the block alone), M-speed-CPU (PEFT / fused, interleaved medians, the median
    per-round ratio in the note) and M-memory (bytes allocated in one step, fused / PEFT)."""
    for gid, c in _first_cases(add, tagged, ("M-GPU", "M-speed-CPU", "M-memory"), "moe"):
        rr = case_rows(c)
        if gid == "M-GPU":
            v, note = _time_ratio(rr, "fused", "base")
        elif gid == "M-speed-CPU":
            v, note = _time_ratio(rr, "peft-moe", "fused")
            paired = (_ok(rr, "peft-moe") or {}).get("paired", {}).get("fused")
            if v is not None and paired is not None:
                note += f" (per-round ratio {paired:.2f})"
        else:
            v, note = _alloc_ratio(rr, "fused", "peft-moe")
        add(gid, v, note, c.name, na_reason=note)


def _first_cases(add, tagged: dict, gids: tuple, group: str):
    """(goal id, its first case) for each of ``gids`` in this run; an n/a line for the others."""
    for gid in gids:
        if tagged[gid]:
            yield gid, tagged[gid][0]
        else:
            add(gid, None, "", na_reason=f"not in this run (--cases {group})")


def _alloc_ratio(rows: list[dict], num: str, den: str) -> tuple[Optional[float], str]:
    """Bytes allocated in one training step (``alloc_bytes``), num / den; the note gives each
    side's bytes, the peak of them alive at once and the bytes saved for backward."""
    a, b = _ok(rows, num), _ok(rows, den)
    if a is None or b is None or a.get("alloc_bytes") is None or b.get("alloc_bytes") is None:
        return None, _why_missing(rows, num, den)

    def mib(r):
        return (f"{r['alloc_bytes'] / 2**20:.1f} MiB (peak {r['alloc_peak_bytes'] / 2**20:.1f}, "
                f"saved for backward {r.get('saved_bytes', 0) / 2**20:.1f})")
    return a["alloc_bytes"] / b["alloc_bytes"], f"{num} {mib(a)} / {den} {mib(b)}"


def _peak_ratio(rows: list[dict], num: str, den: str) -> tuple[Optional[float], str]:
    """Peak bytes allocated during one call, num / den (CUDA only: None on a CPU)."""
    a, b = _ok(rows, num), _ok(rows, den)
    if a is None or b is None:
        return None, _why_missing(rows, num, den)
    pa, pb = a.get("peak_mem_bytes"), b.get("peak_mem_bytes")
    if pa is None or pb is None:
        return None, "peak memory is measured on CUDA only"
    if not pb:
        return None, f"{den} allocated nothing"
    return pa / pb, f"{num} {pa / 2**20:.2f} MiB / {den} {pb / 2**20:.2f} MiB"


def _evaluate_host(add, by_case: dict, cases: list) -> None:
    """H1-H7 from the host cases' rows (ratios of interleaved medians; H7 in µs per op)."""
    def rows_of(c):
        return by_case.get(c.name, [])

    for gid in ("H1", "H2", "H3", "H4", "H5", "H6"):
        cs = [c for c in cases if gid in c.goals]
        if not cs:
            add(gid, None, "", na_reason="not in this run (--cases host)")
        for c in cs:
            den = "peft" if gid == "H6" else "eager"
            v, note = _time_ratio(rows_of(c), "fused", den)
            if v is not None:
                f, d = _ok(rows_of(c), "fused"), _ok(rows_of(c), den)
                note = f"fused {f['median_ms'] * 1e3:.1f} us / {den} {d['median_ms'] * 1e3:.1f} us"
                if f.get("vs_eager_paired") is not None and den == "eager":
                    note += f" (per-round ratio {f['vs_eager_paired']:.2f})"
            add(gid, v, note, c.name, suffix=f", dropout {c.dropout:g}" if gid in ("H3", "H6") else "", cmp=den,
                na_reason=note if v is None else "")
    h7 = [c for c in cases if "H7" in c.goals]
    if not h7:
        add("H7", None, "", na_reason="not in this run (--cases host)")
    for c in h7:
        noop = _ok(rows_of(c), "fused-noop")
        if noop is None or noop.get("median_ms") is None:
            add("H7", None, "", c.name, na_reason=_why_missing(rows_of(c), "fused-noop"))
            continue
        us = noop["median_ms"] * 1e3
        note = f"{us:.1f} us per call, {noop.get('launches', '?')} launches, {c.ops} op(s)"
        real = _ok(rows_of(c), "fused")
        if real is not None and real.get("median_ms") is not None and noop.get("launches"):
            per_launch = (real["median_ms"] * 1e3 - us) / noop["launches"]
            note += f"; with launches {real['median_ms'] * 1e3:.1f} us ({per_launch:.1f} us per launch)"
        add("H7", us / c.ops, note, c.name, suffix=f": {c.subject}")


SYMBOLS = {"<=": "≤", ">=": "≥", "<": "<"}


def markdown_table() -> str:
    """The goals as a markdown table (goal, what, target): the README's, between its
    ``<!-- goals:start -->`` and ``<!-- goals:end -->`` lines."""
    lines = ["| goal | what | target |", "|---|---|---|"]
    lines += [f"| {g.id} | {g.about} | {SYMBOLS[g.op]} {g.bound:g} |" for g in GOALS.values()]
    return "\n".join(lines) + "\n"


def failed(lines: list[dict], *, gpu_only: bool = True) -> list[dict]:
    """Goal lines that failed (by default only those that are real measurements)."""
    return [g for g in lines if g["passed"] is False and (g["gpu_measurement"] or not gpu_only)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.goals", description="Print the goals.")
    ap.add_argument("--markdown", action="store_true", help="as the README's markdown table (the default)")
    ap.parse_args(argv)
    print(markdown_table(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
