"""The sweep CLI: ``python -m bench`` (from the repo root).

    python -m bench                              # headline cases (one per goal), all providers
    python -m bench --quick                      # fewer repetitions; on a CPU: small shapes, torch paths
    python -m bench --cases sweep --out results  # the full grid (long: ~300 cases per dtype)
    python -m bench --cases 'fwd-M8192-*,P3' --providers fused,base,eager --dtype bf16,fp16
    python -m bench --list --cases sweep+decode  # what a selection holds
    python -m bench --cases host                 # us per call vs eager and PEFT (goals H1-H7)
    python -m bench --cases qlora                # LoRA over bitsandbytes NF4 vs PEFT QLoRA (Q1-Q3)
    python -m bench --cases dora                 # DoRALinear vs PEFT DoRA and LoRA (D1-D4; D3 a CPU goal)
    python -m bench --cases serving              # add_lora over packed q|k|v, vLLM/SGLang layouts (S1-S3)
    python -m bench --cases moe                  # one MoE experts block: fused vs eager loop vs PEFT (M1-M3)

Prints a progress line per case, then a table of medians with ratios against
base and eager, then the goals table (P1..P7c, Q1..Q3, D1..D4, S1..S3, M-*: measured, goal,
PASS/FAIL/n/a) last;
``--out DIR`` also writes bench.json, bench.md, time_vs_M.png and ratios.png.

Without CUDA (or with ``--cpu``) the run is a harness check: the shapes shrink
(in/out / 8, prefill rows 512), the fused provider runs lora-fused's torch path
(``LORA_FUSED_BACKEND=torch``: the Triton interpreter is never timed), peft and
compiled are left out unless named in ``--providers`` (peft-mixed runs: P6 has
no stand-in for PEFT's mixed batch), and the output says it is NOT a GPU
measurement. The host cases (``--cases host``, bench/host.py) are the exception:
host time per call is their subject, so they measure for real on a CPU too
(lora-fused's torch path there, its Triton path with launches no-op'd in a
child process). See bench/__init__.py for the modules.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

from .cases import CPU_SMALL, DTYPE_NAMES, FULL, HEADLINE_RANK, all_groups, registry, select

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Providers that need peft (--peft on/off switches them; not run where peft does not import).
PEFT_PROVIDERS = ("peft", "peft-mixed", "peft-qlora", "peft-dora", "peft-moe")
CPU_DEFAULT_OFF = {
    "peft": "not run on a CPU unless named in --providers (importing peft/transformers takes ~20 s there)",
    "compiled": "not run on a CPU unless named in --providers (an Inductor C++ build per shape, ~7 s each)",
    **{p: "not run on a CPU unless named in --providers (the torch backend runs there: no strategy to force)"
       for p in ("fused_kernel", "shrink_first", "composite")},
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fewer repetitions on a GPU; on a CPU (always small shapes there) a harness check")
    ap.add_argument("--cases", default="headline",
                    help="groups or fnmatch patterns on case names, comma-separated; a+b intersects, "
                         "-x removes (default: headline; see --list)")
    ap.add_argument("--providers", default="",
                    help="comma-separated providers, 'all', or -name to drop one (default: all; on a CPU "
                         "peft and compiled only when named)")
    ap.add_argument("--dtype", default="",
                    help="bf16, fp16, fp32, a comma list, or all (default: bf16 on a GPU, fp32 on a CPU)")
    ap.add_argument("--rank", type=int, default=HEADLINE_RANK, help="rank of the headline cases (16)")
    ap.add_argument("--out", default=None, help="folder for bench.json, bench.md and the PNG plots")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is there")
    ap.add_argument("--peft", choices=["auto", "on", "off"], default="auto",
                    help="force the peft and peft-mixed providers on or off (auto: as --providers says)")
    ap.add_argument("--time-budget", type=float, default=0.0, metavar="S",
                    help="start no new case after S seconds (the rest are listed as not run); 0: none")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check of each provider")
    ap.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    ap.add_argument("--threads", type=int, default=1, help="CPU runs: torch threads (default 1: less noise)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="interleaved rounds per case: host cases (default 101; --quick 15), the MoE CPU "
                         "goals' case on a CPU (default 15; --quick 5)")
    ap.add_argument("--list", action="store_true", help="list the selected cases and providers, then exit")
    ap.add_argument("--tune", action="store_true",
                    help="fill the strategy cache (lora_fused.dispatch.tuning) for --model's layer shapes, then exit")
    ap.add_argument("--model", default="llama-7b", help="--tune: layer shapes of this model (llama-7b, llama-3-8b)")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when a goal measured on a GPU (or P4) fails, or a provider errors")
    return ap.parse_args(argv)


def parse_dtypes(spec: str, cuda: bool) -> list[str]:
    if not spec:
        return ["bf16" if cuda else "fp32"]
    if spec == "all":
        return list(DTYPE_NAMES)
    out = [d.strip() for d in spec.split(",") if d.strip()]
    for d in out:
        if d not in DTYPE_NAMES:
            raise SystemExit(f"--dtype: unknown {d!r} (one of {', '.join(DTYPE_NAMES)}, or all)")
    return out


def resolve_providers(spec: str, peft_mode: str, device) -> tuple[list, dict, str]:
    """(providers to run, {provider: why not run}, peft label)."""
    from .providers import ALL_PROVIDERS, compile_status, peft_status
    terms = [t.strip() for t in (spec or "").split(",") if t.strip()]
    plus = [t for t in terms if not t.startswith("-")]
    minus = {t[1:] for t in terms if t.startswith("-")}
    for t in set(plus) | minus:
        if t != "all" and t not in ALL_PROVIDERS:
            raise SystemExit(f"--providers: unknown {t!r} (one of {', '.join(ALL_PROVIDERS)}, all)")
    if plus and "all" not in plus:
        names = [p for p in ALL_PROVIDERS if p in plus]
        explicit = set(plus)
    else:
        names = list(ALL_PROVIDERS)
        explicit = set(ALL_PROVIDERS) if "all" in plus else set()
    peft_providers = PEFT_PROVIDERS
    if peft_mode == "on":
        for p in peft_providers:
            explicit.add(p)
            if p not in names:
                names.append(p)
    names = [p for p in names if p not in minus and not (peft_mode == "off" and p in peft_providers)]
    not_run: dict[str, str] = {}
    if device.type != "cuda":
        for p, why in CPU_DEFAULT_OFF.items():
            if p in names and p not in explicit:
                not_run[p] = why
    peft_label = ""
    wanted = [p for p in peft_providers if p in names and p not in not_run]
    if wanted:
        why, peft_label = peft_status()
        if why:
            for p in wanted:
                not_run[p] = why
    if "compiled" in names and "compiled" not in not_run:
        why = compile_status(device)
        if why:
            not_run["compiled"] = why
    return [p for p in names if p not in not_run], not_run, peft_label


def resolve_host_providers(spec: str, peft_mode: str) -> list[str]:
    """The providers the host cases may run: all of theirs (PEFT included on a CPU too: H6
    compares with it), less what ``--providers`` leaves out or ``--peft off`` drops. Their
    eager baseline always runs; ``fused`` brings ``fused-noop`` (bench/host.py)."""
    from .host import HOST_DESCRIPTIONS
    terms = [t.strip() for t in (spec or "").split(",") if t.strip()]
    plus = [t for t in terms if not t.startswith("-")]
    minus = {t[1:] for t in terms if t.startswith("-")}
    names = list(HOST_DESCRIPTIONS) if not plus or "all" in plus else [p for p in HOST_DESCRIPTIONS if p in plus]
    if peft_mode == "on":
        names += [p for p in ("peft", "peft-mixed") if p not in names]
    return [p for p in names if p not in minus and not (peft_mode == "off" and p in ("peft", "peft-mixed"))]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10)
        n = len([ln for ln in dirty.stdout.splitlines() if ln.strip()])
        return out.stdout.strip() + (f" (+{n} changed files)" if n else "") if out.returncode == 0 else ""
    except Exception:
        return ""


class Progress:
    """tqdm over the cases where it is installed and stderr is a terminal; log lines always."""

    def __init__(self, total: int):
        self.bar = None
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="bench", unit="case", disable=None, file=sys.stderr,
                            dynamic_ncols=True)
        except Exception:
            pass

    def log(self, msg: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def step(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name[:40], refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def case_notes(cases: list) -> list[str]:
    """What ``base`` and ``fused`` mean in each family of ``cases`` beyond the single-adapter one
    (printed with the providers and written into bench.md), and why a family is skipped."""
    from .providers import dora, moe, qlora, serving
    notes = []
    if any(getattr(c, "quant", "") for c in cases):
        notes.append(qlora.CASE_NOTE + (f"; SKIPPED: {qlora.bnb_status()}" if qlora.bnb_status() else ""))
    if any(getattr(c, "dora", False) for c in cases):
        notes.append(dora.CASE_NOTE)
    if any(getattr(c, "slices", ()) for c in cases):
        notes.append(serving.CASE_NOTE)
    if any(getattr(c, "experts", 0) for c in cases):
        why = moe.transformers_status()
        notes.append(moe.CASE_NOTE + (f"; SKIPPED: {why}" if why else ""))
    return notes


def case_summary(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if r["status"] != "ok":
            parts.append(f"{r['provider']} {r['status']}")
        elif r.get("median_ms") is not None:
            vs = f" ({r['vs_base']:.2f}x base)" if r.get("vs_base") and r["provider"] != "base" else ""
            parts.append(f"{r['provider']} {r['median_ms']:.4g} ms{vs}")
        elif r.get("saved_bytes") is not None:
            parts.append(f"{r['provider']} {r['saved_bytes'] / 2**20:.2f} MiB")
    return ", ".join(parts)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t_start = time.time()

    import torch
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        # The torch paths, never the Triton interpreter (minutes, and not a measurement).
        os.environ["LORA_FUSED_BACKEND"] = "torch"
        torch.set_num_threads(max(1, args.threads))
    dtypes = parse_dtypes(args.dtype, cuda)
    if args.tune:
        from .tune import run_tune
        return run_tune(args.model, args.rank, dtypes[0], device)
    scale = FULL if cuda else CPU_SMALL
    reg = registry(scale, dtypes, rank=args.rank)
    try:
        cases = select(reg, args.cases)
    except ValueError as exc:
        raise SystemExit(str(exc))
    providers, not_run, peft_label = resolve_providers(args.providers, args.peft, device)

    if args.list:
        print(f"{len(cases)} cases ({args.cases}; {scale.label} shapes, {', '.join(dtypes)}):")
        for c in cases:
            print(f"  {c.name:<48} goals={','.join(c.goals) or '-'}  groups={','.join(sorted(c.groups))}")
        print("providers:", ", ".join(providers))
        for p, why in not_run.items():
            print(f"  not run: {p}: {why}")
        print("groups:", ", ".join(all_groups(reg)))
        return 0

    import lora_fused as lf

    from . import goals as goals_mod
    from . import report
    from .measure import measure_ceilings
    from .runner import CPU_GOAL_ROUNDS, Runner, Settings, device_name, versions

    gpu_name = device_name(device)
    quick_gpu = cuda and args.quick
    settings = Settings(device=device, quick=args.quick or not cuda,
                        warmup_ms=10 if quick_gpu else 25, rep_ms=40 if quick_gpu else 100,
                        check=not args.no_check, host_rounds=args.rounds or (15 if args.quick else 101),
                        goal_rounds=args.rounds or (5 if args.quick else CPU_GOAL_ROUNDS))
    print("=" * 100)
    print(f"lora-fused benchmark: {gpu_name}; torch {torch.__version__}, "
          f"triton {versions()['triton']}; dtypes {','.join(dtypes)}; {len(cases)} cases ({args.cases})")
    from .host import HOST_DESCRIPTIONS
    from .providers import DESCRIPTIONS
    host_only = all(c.mode == "host" for c in cases)
    host_requested = resolve_host_providers(args.providers, args.peft)
    notes = case_notes(cases)
    if not host_only:
        print(f"providers: {', '.join(providers)}"
              + (f"  [{peft_label}]" if peft_label and set(PEFT_PROVIDERS) & set(providers) else ""))
        for p in providers:
            print(f"  {p}: {DESCRIPTIONS.get(p, '')}")
        for note in notes:
            print(f"  {note}")
        for p, why in not_run.items():
            print(f"  not run: {p}: {why}")
    if any(c.mode == "host" for c in cases):
        print(f"host providers: {', '.join(host_requested)}")
        for p in host_requested:
            print(f"  {p}: {HOST_DESCRIPTIONS[p]}")
    if any(c.mode == "host" for c in cases):
        print("host cases (bench/host.py): us per call at 64->64, r 8, 4 rows, medians of interleaved rounds; "
              "host time is their subject, so a CPU measures it for real (goals H1-H7 not starred)")
    if not cuda and not host_only:
        print("NOTE: no CUDA device: this is NOT a GPU measurement. Small shapes on the torch paths "
              "(LORA_FUSED_BACKEND=torch) prove the harness; timing goals are marked '*' and mean nothing. "
              "P4 (saved bytes) is a real measurement.")
    ceilings = measure_ceilings(device, dtypes, warmup=settings.warmup_ms, rep=settings.rep_ms)
    gemm = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in ceilings.gemm_tflops.items())
    print(f"ceilings: GEMM {gemm}; copy {ceilings.copy_gbs:.0f} GB/s ({ceilings.method})")
    for n in ceilings.notes:
        print("  ceilings:", n)
    print("=" * 100, flush=True)

    runner = Runner(settings, ceilings=ceilings)
    runner.plan_host(cases)
    rows: list[dict] = []
    cases_not_run: list[str] = []
    progress = Progress(len(cases))
    stop = ""
    try:
        for i, case in enumerate(cases):
            if not stop and args.time_budget and time.time() - t_start > args.time_budget:
                stop = f"time budget ({args.time_budget:g} s) reached"
            if stop:
                cases_not_run.append(case.name)
                progress.step(case.name)
                continue
            t0 = time.time()
            try:
                case_rows = runner.run_case(case, host_requested if case.mode == "host" else providers)
            except KeyboardInterrupt:  # a stage timeout sends SIGINT: report what was measured
                stop = "interrupted (SIGINT)"
                cases_not_run.append(case.name)
                continue
            rows += case_rows
            progress.log(f"[{i + 1}/{len(cases)}] {case.name} ({time.time() - t0:.1f} s): "
                         + case_summary(case_rows))
            progress.step(case.name)
    finally:
        progress.close()
    if cases_not_run:
        print(f"{stop}: {len(cases_not_run)} cases not run: "
              + ", ".join(cases_not_run[:8]) + (" ..." if len(cases_not_run) > 8 else ""))

    goal_list = goals_mod.evaluate(rows, cases, gpu=cuda)
    elapsed = time.time() - t_start
    meta = dict(gpu=gpu_name, device=device.type, gpu_measurement=cuda, **versions(),
                commit=git_commit(), command="python -m bench " + shlex.join(argv),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), quick=settings.quick, dtypes=dtypes,
                shapes=scale.label, cases_spec=args.cases, n_cases=len(cases),
                providers=host_requested if host_only else providers,
                providers_not_run={} if host_only else not_run, peft=peft_label, host_only=host_only,
                provider_descriptions=({p: HOST_DESCRIPTIONS[p] for p in host_requested} if host_only
                                       else {p: DESCRIPTIONS.get(p, "") for p in providers}),
                host_timing=(f"interleaved rounds: {settings.host_rounds}, ~1 ms blocks per provider"
                             if any(c.mode == "host" for c in cases) else ""),
                fused_backend=lf.select_backend(device, torch.bfloat16 if cuda else torch.float32),
                timing=(f"do_bench warmup {settings.warmup_ms} ms, rep {settings.rep_ms} ms" if cuda
                        else f"CPU perf_counter, {settings.cpu_budget_s} s per row, "
                             f"{torch.get_num_threads()} thread(s)"),
                case_notes=notes, ceilings=ceilings.as_dict(), cases_not_run=cases_not_run,
                elapsed_s=round(elapsed, 1))

    print()
    if any(r["mode"] != "host" for r in rows):
        print(report.render(report.table_lines([r for r in rows if r["mode"] != "host"])))
        print()
    if any(r["mode"] == "host" for r in rows):
        print(f"HOST TIME (us per call; {gpu_name}; {report.HOST_NOTE})")
        print(report.render(report.host_table_lines(rows)))
        print()
    for line in ([] if host_only else report.FOOTNOTES + ([] if cuda else [report.CPU_FOOTNOTE])):
        print(line)
    if args.out:
        written = report.write_outputs(args.out, meta, goal_list, rows, plots=not args.no_plots)
        print("wrote " + ", ".join(written))
    print(f"(benchmark took {elapsed:.1f} s)")
    print()
    print(f"GOALS ({gpu_name}, {','.join(dtypes)}, torch {torch.__version__}, triton {versions()['triton']})")
    print(report.render(report.goal_lines(goal_list, width=90)))
    print(f"goals: {report.goal_counts(goal_list)}" + ("" if cuda else "  (* = CPU, not a GPU measurement)"),
          flush=True)
    if args.strict:
        errors = [r for r in rows if r["status"] == "error"]
        if goals_mod.failed(goal_list) or errors:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
