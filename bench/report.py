"""Reporting: the text table, goals table, JSON, markdown and PNG plots.

Files written by :func:`write_outputs` into ``--out DIR``:
  bench.json      meta (device, versions, command, ceilings), goals, every row
  bench.md        the same as markdown tables (commit it as bench/results/<date>-<gpu>.md)
  time_vs_M.png   median time vs M per provider, one panel per shape/rank/mode (matplotlib)
  ratios.png      time / base per provider and case; saved MiB per provider (matplotlib)
Without matplotlib the PNGs are skipped with a note.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

MiB = 2 ** 20
CPU_FOOTNOTE = ("* CPU run (torch paths, small shapes): NOT a GPU measurement; it proves the harness. "
                "Timing goals marked * mean nothing; P4 (saved bytes) and the CPU goals D3, M-speed-CPU and "
                "M-memory are real measurements.")
FOOTNOTES = [
    "x base / x eager: median time over that provider's on the same case (saved rows: saved bytes).",
    "%peak: roofline floor max(flops / GEMM ceiling, bytes / copy ceiling) over the median; "
    "flops/bytes count the LoRA layer's work once for every provider.",
    "check: relative error of the output (training: max over dX, dA, dB; not with dropout) "
    "against fp32 eager on the same data (multi-adapter: a float64 reference; QLoRA: float64 "
    "over bitsandbytes' dequantized W0; DoRA: float64 with the norm detached, dX, dA, dB and dm; "
    "serving: float64 y0 + delta, the base GEMM for base; MoE: the experts block in float64, dX and "
    "every expert factor).",
    "Decode forwards (M <= 64) on a GPU: median of CUDA-graph replay (device time); "
    "'launch' is the eager-launch median (Python and launch overhead included); peft-mixed "
    "cannot be captured: its median is an eager launch; nor are the bitsandbytes QLoRA "
    "providers (base, eager-qlora, peft-qlora on qlora-* cases), nor vllm and sglang on serving-* cases.",
]


def _f(v, spec: str, missing: str = "-") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return missing
    return format(v, spec)


def _note(r: dict) -> str:
    parts = []
    if r.get("status") == "error":
        parts.append("ERROR " + r.get("reason", ""))
    elif r.get("status") in ("n/a", "skipped"):
        parts.append(r.get("reason") or r["status"])
    if r.get("note"):
        parts.append(r["note"])
    if r.get("launch_ms") is not None:
        parts.append(f"launch {r['launch_ms']:.4f} ms")
    if r.get("held_bytes") is not None:
        parts.append(f"held {r['held_bytes'] / MiB:.1f} MiB")
    if r.get("alloc_bytes") is not None:
        parts.append(f"allocated {r['alloc_bytes'] / MiB:.1f} MiB in {r['alloc_tensors']} tensors "
                     f"(peak {r['alloc_peak_bytes'] / MiB:.1f} MiB)")
    return "; ".join(parts)


def table_lines(rows: list[dict]) -> list[list[str]]:
    head = ["case", "provider", "median ms", "q20-q80 ms", "x base", "x eager", "TFLOP/s", "GB/s",
            "%peak", "saved MiB", "peak MiB", "check", "note"]
    lines = [head]
    for r in rows:
        ok = r.get("status") == "ok"
        q = (f"{r['q20_ms']:.4f}-{r['q80_ms']:.4f}" if ok and r.get("q20_ms") is not None else "-")
        lines.append([
            r["case"], r["provider"], _f(r.get("median_ms") if ok else None, ".4f"), q,
            _f(r.get("vs_base"), ".3f"), _f(r.get("vs_eager"), ".3f"),
            _f(r.get("tflops"), ".2f" if (r.get("tflops") or 0) < 10 else ".0f"),
            _f(r.get("gbs"), ".0f"), _f(r.get("pct_peak"), ".0f"),
            _f(r["saved_bytes"] / MiB if r.get("saved_bytes") is not None else None, ".2f"),
            _f(r["peak_mem_bytes"] / MiB if r.get("peak_mem_bytes") is not None else None, ".1f"),
            _f(r.get("check_relerr"), ".1e"), _note(r)])
    return lines


HOST_NOTE = ("medians of interleaved rounds, q20-q80 over rounds; x eager: ratio of medians to the "
             "eager baseline of the same case, (paired): median of per-round ratios; per-op cases 1 thread; "
             "on CUDA wall time over N calls ended by one synchronize")


def host_table_lines(rows: list[dict]) -> list[list[str]]:
    """The host cases' rows in µs per call (bench/host.py)."""
    lines = [["case", "provider", "us/call", "q20-q80 us", "x eager", "(paired)", "launches", "rounds x calls",
              "check", "note"]]
    for r in rows:
        if r.get("mode") != "host":
            continue
        ok = r.get("status") == "ok" and r.get("median_us") is not None
        lines.append([
            r["case"], r["provider"], _f(r.get("median_us") if ok else None, ".1f"),
            f"{r['q20_us']:.1f}-{r['q80_us']:.1f}" if ok else "-",
            _f(r.get("vs_eager"), ".3f"), _f(r.get("vs_eager_paired"), ".3f"),
            str(r["launches"]) if r.get("launches") is not None else "-",
            f"{r['rounds']} x {r['calls']}" if ok else "-",
            _f(r.get("check_relerr"), ".1e"), _note(r)])
    return lines


def goal_lines(goals: list[dict], width: Optional[int] = None, case: bool = False) -> list[list[str]]:
    lines = [["goal", "what", "measured", "goal", "result", "note"] + (["case"] if case else [])]
    for g in goals:
        note = g.get("note") or ""
        if width and len(note) > width:
            note = note[:width - 3] + "..."
        lines.append([g["id"], g["what"], _f(g.get("value"), ".3f"), f"{g['op']} {g['bound']:g}",
                      g["result"], note] + ([g.get("case") or "-"] if case else []))
    return lines


def render(lines: list[list[str]], md: bool = False) -> str:
    if md:
        out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
        out += ["| " + " | ".join(str(c).replace("|", "/") for c in ln) + " |" for ln in lines[1:]]
        return "\n".join(out)
    widths = [max(len(str(ln[i])) for ln in lines) for i in range(len(lines[0]))]

    def fmt(ln):
        return "  ".join(str(c).ljust(w) for c, w in zip(ln, widths)).rstrip()
    return "\n".join([fmt(lines[0]), fmt(["-" * w for w in widths])] + [fmt(ln) for ln in lines[1:]])


def goal_counts(goals: list[dict]) -> str:
    counts: dict[str, int] = {}
    for g in goals:
        counts[g["result"]] = counts.get(g["result"], 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def meta_lines(meta: dict) -> list[str]:
    c = meta.get("ceilings") or {}
    gemm = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in (c.get("gemm_tflops") or {}).items())
    lines = [
        f"device: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}, "
        f"lora-fused {meta['lora_fused']}, python {meta['python']}; commit {meta.get('commit') or '?'}",
        f"command: {meta['command']}",
        f"date: {meta['date']}; cases: {meta['n_cases']} ({meta['cases_spec']}); "
        f"providers: {', '.join(meta['providers'])}; fused backend: {meta['fused_backend']}",
        f"ceilings: GEMM {gemm or '-'}; copy {_f(c.get('copy_gbs'), '.0f')} GB/s ({c.get('method', '-')})",
    ]
    for p, desc in (meta.get("provider_descriptions") or {}).items():
        lines.append(f"provider {p}: {desc}")
    lines += meta.get("case_notes") or []
    if meta.get("providers_not_run"):
        lines.append("providers not run: " + "; ".join(f"{k}: {v}" for k, v in meta["providers_not_run"].items()))
    if meta.get("cases_not_run"):
        lines.append(f"cases not run (time budget or interrupt): {len(meta['cases_not_run'])}")
    if meta.get("host_timing"):
        lines.append(f"host cases: {meta['host_timing']}; {HOST_NOTE}")
    if not meta.get("gpu_measurement") and not meta.get("host_only"):
        lines.append(CPU_FOOTNOTE)
    return lines


def write_json(path: str, meta: dict, goals: list[dict], rows: list[dict]) -> None:
    with open(path, "w") as fh:
        json.dump(dict(meta=meta, goals=goals, rows=rows), fh, indent=1, default=str)


def write_markdown(path: str, meta: dict, goals: list[dict], rows: list[dict]) -> None:
    with open(path, "w") as fh:
        fh.write(f"# lora-fused benchmark: {meta['gpu']}, {meta['date']}\n\n")
        fh.write("```\n" + meta["command"] + "\n```\n\n")
        fh.write("\n".join(f"- {ln}" for ln in meta_lines(meta)) + "\n\n")
        fh.write("## Goals\n\n" + render(goal_lines(goals, case=True), md=True) + "\n\n")
        other = [r for r in rows if r.get("mode") != "host"]
        if other:
            fh.write("## Measurements\n\n" + render(table_lines(other), md=True) + "\n\n")
        if len(other) < len(rows):
            fh.write(f"## Host time (us per call)\n\n{HOST_NOTE}.\n\n" + render(host_table_lines(rows), md=True)
                     + "\n\n")
        fh.write("\n".join(f"- {ln}" for ln in FOOTNOTES) + "\n")


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------
PROVIDER_ORDER = ("base", "merged", "fused", "fused_kernel", "shrink_first", "composite", "eager", "compiled",
                  "peft", "loop", "peft-mixed")
COLORS = {"base": "tab:gray", "merged": "tab:purple", "fused": "tab:blue", "eager": "tab:orange",
          "fused_kernel": "tab:cyan", "shrink_first": "tab:olive", "composite": "navy",
          "compiled": "tab:green", "peft": "tab:red", "loop": "tab:brown", "peft-mixed": "tab:pink"}


def _figure(w, h):
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    return Figure(figsize=(w, h), dpi=100)


def plot_time_vs_m(path: str, rows: list[dict], title: str) -> bool:
    """One panel per (mode, shape, rank, dropout, dtype): median time vs M, a line per provider."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("median_ms") and r.get("mode") != "host":
            key = (r["mode"], r["K"], r["N"], r["r"], r["dropout"], r["dtype"], r["adapters"])
            groups.setdefault(key, []).append(r)
    if not groups:
        return False
    # panels with several M first (a lone M is a point: the ratio bars show it better)
    multi_m = [k for k in groups if len({r["M"] for r in groups[k]}) > 1]
    keys = sorted(multi_m or groups, key=lambda k: (-len({r["M"] for r in groups[k]}), k))[:9]
    n = len(keys)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig = _figure(5 * cols, 3.8 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        mode, K, N, r, p, dt, ad = key
        by_p: dict[str, list] = {}
        for row in groups[key]:
            by_p.setdefault(row["provider"], []).append((row["M"], row["median_ms"]))
        for prov in sorted(by_p, key=lambda x: PROVIDER_ORDER.index(x) if x in PROVIDER_ORDER else 99):
            pts = sorted(by_p[prov])
            ax.plot([m for m, _ in pts], [t for _, t in pts], marker="o", label=prov, color=COLORS.get(prov))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("median ms")
        ax.set_title(f"{mode} {K}x{N} r{r}" + (f" p{p:g}" if p else "") + f" {dt}"
                     + (f" a{ad}" if ad else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_ratios(path: str, rows: list[dict], title: str) -> bool:
    """Bars: time / base per provider for each timed case (up to 24); saved MiB per provider."""
    timed: dict[str, list[dict]] = {}
    saved: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status") != "ok" or r.get("mode") == "host":
            continue
        if r["mode"] == "saved" and r.get("saved_bytes") is not None:
            saved.setdefault(r["case"], []).append(r)
        elif r.get("vs_base") is not None and r["provider"] != "base":
            timed.setdefault(r["case"], []).append(r)
    if not timed and not saved:
        return False
    panels = [p for p in (("timed", timed), ("saved", saved)) if p[1]]
    case_counts = [min(len(d), 24) for _, d in panels]
    fig = _figure(max(8, 0.9 * max(case_counts) + 3), 4.5 * len(panels))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (kind, data) in zip(axes, panels):
        cases = list(data)[:24]
        provs = [p for p in PROVIDER_ORDER if any(r["provider"] == p for c in cases for r in data[c])]
        width = 0.8 / max(len(provs), 1)
        for i, prov in enumerate(provs):
            xs, ys = [], []
            for j, c in enumerate(cases):
                for r in data[c]:
                    if r["provider"] == prov:
                        xs.append(j + (i - (len(provs) - 1) / 2) * width)
                        ys.append(r["vs_base"] if kind == "timed" else r["saved_bytes"] / MiB)
            ax.bar(xs, ys, width=width, label=prov, color=COLORS.get(prov))
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        if kind == "timed":
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel("median time / base")
            ax.set_title("time relative to base (F.linear alone); lower is better", fontsize=10)
        else:
            ax.set_ylabel("MiB saved for backward")
            ax.set_title("activation memory saved for backward", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_outputs(out_dir: str, meta: dict, goals: list[dict], rows: list[dict], *,
                  plots: bool = True) -> list[str]:
    """bench.json, bench.md and (matplotlib permitting) time_vs_M.png, ratios.png; returns the
    paths written and prints a note for plots skipped."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    p = os.path.join(out_dir, "bench.json")
    write_json(p, meta, goals, rows)
    written.append(p)
    p = os.path.join(out_dir, "bench.md")
    write_markdown(p, meta, goals, rows)
    written.append(p)
    if plots:
        try:
            import matplotlib  # noqa: F401
        except Exception as exc:
            print(f"plots skipped: matplotlib not importable ({type(exc).__name__})")
            return written
        title = f"lora-fused: {meta['gpu']}" + ("" if meta.get("gpu_measurement") else " (CPU harness run)")
        for name, fn in (("time_vs_M.png", plot_time_vs_m), ("ratios.png", plot_ratios)):
            p = os.path.join(out_dir, name)
            try:
                if fn(p, rows, title):
                    written.append(p)
                else:
                    print(f"{name}: nothing to plot")
            except Exception as exc:  # a plot must not lose the measurements
                print(f"{name} failed: {type(exc).__name__}: {exc}")
    return written
