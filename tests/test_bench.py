"""The benchmark harness (bench/) on CPU: no timing assertions, only that it runs and reports.

* ``python -m bench --quick --out DIR`` (a subprocess, as a person runs it): exit 0, the
  JSON / markdown / PNG files, every goal id P1..P7c in the goals table with a value
  (multi-adapter goals included), the CPU note.
* ``pytest bench/ --benchmark-only`` with one round per benchmark: the pytest-benchmark
  tests run, grouped by case.
* The case registry, selection syntax, goal evaluation and FLOP counts, in process.
* The host group: ``python -m bench --cases host`` with a few rounds runs every
  host case and fills goals H1-H7; the interleaved timer's order, the no-op launch hook
  (every launch counted, none run, restored after) and the host goals' evaluation.
* The multi-adapter providers (base, fused, loop, peft-mixed) on tiny cases: outputs and
  gradients agree with lf.multi_lora_linear_reference (the per-row float64 oracle), each
  provider applies / is n/a where intended (here the Triton kernels run through the
  interpreter, as the rest of tests/ does).

bench/ holds pytest-benchmark tests that the normal run must not collect: pytest.ini's
testpaths is tests/ (checked below); they run only through the smoke test here.
"""
from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import cases as bc  # noqa: E402
from bench import goals as bg  # noqa: E402
from bench import providers as bp  # noqa: E402
from bench import report  # noqa: E402

GOAL_IDS = ["P1", "P2", "P3", "P4", "P5", "P6", "P7", "P7b", "P7c", "Q1", "Q2", "Q3", "D1", "D2", "D3", "D4",
            "S1", "S2", "S3"]
MULTI_GOALS = ["P5", "P6", "P7", "P7b", "P7c"]
HOST_GOALS = ["H1", "H2", "H3", "H4", "H5", "H6", "H7"]


def _env() -> dict:
    """The child runs as a person would: no interpreter, no pytest/xdist variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "TRITON_INTERPRET", "LORA_FUSED_BACKEND", "LF_BENCH_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(args: list, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable] + args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------
# The CLI, end to end
# --------------------------------------------------------------------------
def test_cli_quick_writes_reports(tmp_path):
    out = tmp_path / "out"
    args = ["-m", "bench", "--quick", "--out", str(out)]
    if torch.cuda.is_available():
        args.append("--cpu")  # the harness check, not a GPU run
    proc = _run(args)
    text = proc.stdout

    assert "NOT a GPU measurement" in text
    goals_part = text[text.index("\nGOALS"):]
    for gid in GOAL_IDS:
        assert f"\n{gid} " in goals_part, f"goal {gid} missing from the printed table"
    assert goals_part.strip().splitlines()[-1].startswith("goals: ")
    for word in ("median ms", "x base", "x eager"):
        assert word in text

    data = json.loads((out / "bench.json").read_text())
    ids = {g["id"] for g in data["goals"]}
    assert set(GOAL_IDS) <= ids
    by_id = {g["id"]: g for g in data["goals"]}
    for gid in MULTI_GOALS:  # measured on CPU: a value, starred (not a GPU measurement)
        g = by_id[gid]
        if gid == "P6" and not _have("peft"):
            assert g["result"] == "n/a" and "peft-mixed" in g["note"]
            continue
        assert g["value"] is not None and g["result"] in ("PASS*", "FAIL*"), g
        assert not g["gpu_measurement"]
    assert by_id["P4"]["value"] is not None and by_id["P4"]["value"] > 0  # a real measurement on CPU
    meta = data["meta"]
    assert meta["gpu_measurement"] is False and meta["command"].startswith("python -m bench")
    assert "SegmentPlan built once" in meta["provider_descriptions"]["fused"]
    rows = data["rows"]
    modes = {r["mode"] for r in rows if r["status"] == "ok"}
    assert {"fwd", "bwd", "fwdbwd", "saved"} <= modes
    providers = {r["provider"] for r in rows if r["status"] == "ok"}
    assert {"base", "fused", "eager", "merged", "loop"} | ({"peft-mixed"} if _have("peft") else set()) <= providers
    for r in rows:
        for key in ("gpu", "torch", "triton", "config", "flops", "bytes", "status"):
            assert key in r, f"row {r['case']}/{r['provider']} lacks {key}"
        if r["status"] == "n/a":  # only PEFT's mixed batch in training
            assert r["provider"] == "peft-mixed" and r["mode"] != "fwd" and "inference only" in r["reason"]
        elif r["case"].startswith("qlora-") and not _have("bitsandbytes"):
            assert r["status"] == "skipped" and "bitsandbytes" in r["reason"]
        else:
            assert r["status"] == "ok", (r["case"], r["provider"], r.get("reason"))
        if r["status"] == "ok" and r["mode"] != "saved":
            assert r["median_ms"] > 0 and r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
            assert r["check_relerr"] is None or r["check_relerr"] < 1e-4
    multi = [r for r in rows if r["adapters"] and not r["case"].startswith("serving-")]
    assert {r["case"].split("-fp32")[0] for r in multi} == {
        "multi-fwd-M64-512x512-a64-r16", "multi-fwd-M512-512x512-a16-r16",
        "multi-fwd-M64-512x512-a64-rmix8-16-64", "multi-fwd-M64-512x512-a64-rmix8x56-64x8",
        "multi-fwd-M64-512x512-a64-r64", "multi-fwdbwd-M512-512x512-a16-r16"}
    # every multi row that ran was checked against the float64 reference
    assert all(r["check_relerr"] is not None for r in multi if r["status"] == "ok")
    train = [r for r in multi if r["mode"] == "fwdbwd" and r["status"] == "ok"]
    assert {r["provider"] for r in train} == {"base", "fused", "fused-cublas", "loop"}
    assert all(r["saved_bytes"] is not None for r in train)
    fused_fwd = next(r for r in rows if r["provider"] == "fused" and r["mode"] == "fwd" and r["status"] == "ok")
    assert fused_fwd["vs_base"] is not None and fused_fwd["vs_eager"] is not None

    md = (out / "bench.md").read_text()
    assert "## Goals" in md and "## Measurements" in md and meta["command"] in md
    for gid in GOAL_IDS:
        assert f"| {gid} |" in md
    if _have("matplotlib"):
        for name in ("time_vs_M.png", "ratios.png"):
            png = (out / name).read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_pytest_benchmark_smoke(tmp_path):
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "bench.json"
    proc = _run(["-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                 "--benchmark-min-rounds=1", "--benchmark-max-time=0.000001", "--benchmark-warmup=off",
                 f"--benchmark-json={out}", "-k", "fwd-M16 or fwdbwd"])
    assert " passed" in proc.stdout
    data = json.loads(out.read_text())
    benches = data["benchmarks"]
    assert benches, "no benchmark ran"
    groups = {b["group"] for b in benches}
    assert all(g and g.startswith(("fwd-", "fwdbwd-")) for g in groups)
    assert {b["extra_info"]["provider"] for b in benches} >= {"base", "fused", "eager"}
    assert all("torch" in b["extra_info"] and "gpu" in b["extra_info"] for b in benches)


def test_normal_run_does_not_collect_bench():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "pytest.ini"))
    assert cfg["pytest"]["testpaths"].split() == ["tests"]


# --------------------------------------------------------------------------
# Registry, selection, goals, counts (in process, no torch work)
# --------------------------------------------------------------------------
def test_registry_headline_has_every_goal():
    reg = bc.registry(bc.FULL, ["bf16"])
    names = [c.name for c in reg]
    assert len(names) == len(set(names))
    head = bc.select(reg, "headline")
    tagged = {g for c in head for g in c.goals}
    assert set(GOAL_IDS) <= tagged
    p1 = next(c for c in head if "P1" in c.goals)
    assert (p1.mode, p1.M, p1.K, p1.N, p1.r, p1.dtype) == ("fwd", 8192, 4096, 4096, 16, "bf16")
    p4 = next(c for c in head if "P4" in c.goals)
    assert p4.projections == 3 and p4.dropout == 0.1
    p5 = next(c for c in head if "P5" in c.goals)
    assert p5.multi and p5.M == 64 and p5.adapters == 64 and "P6" in p5.goals and p5.r == 16
    assert p5.adapter_ids() == list(range(64))  # 64 rows, each its own adapter
    p7 = next(c for c in head if "P7" in c.goals)
    assert p7.M == 8192 and p7.adapters == 16 and p7.r == 16 and not p7.mixed_ranks
    ids = p7.adapter_ids()
    assert [ids.count(i) for i in range(16)] == [512] * 16 and ids == sorted(ids)
    assert "sweep" in p1.groups  # the headline cases are part of the sweep grid
    # the goals' mixed-rank batch (P7b), the mostly-small one (P7c), and their twin padded to 64
    (mixed,) = [c for c in head if "P7b" in c.goals and c.mixed_ranks]
    (small,) = [c for c in head if "P7c" in c.goals and c.mixed_ranks]
    (padded,) = [c for c in head if {"P7b", "P7c"} <= set(c.goals)]
    for c in (mixed, small, padded):
        assert (c.mode, c.M, c.K, c.N, c.adapters, c.r) == ("fwd", 64, 4096, 4096, 64, 64)
        assert c.adapter_ids() == p5.adapter_ids()
    assert set(mixed.adapter_ranks) == {8, 16, 64} and mixed.name.endswith("-a64-rmix8-16-64-bf16")
    assert sorted(small.adapter_ranks).count(8) == 56 and small.adapter_ranks.count(64) == 8
    assert padded.adapter_ranks == (64,) * 64 and not padded.mixed_ranks
    assert bg._padded_twin(mixed, padded) and bg._padded_twin(small, padded)
    assert not bg._padded_twin(mixed, p5)
    # exactly these multi-adapter headline cases (the training one carries no goal)
    assert [c.name for c in head if c.multi and not c.slices] == [
        "multi-fwd-M64-4096x4096-a64-r16-bf16", "multi-fwd-M8192-4096x4096-a16-r16-bf16",
        "multi-fwd-M64-4096x4096-a64-rmix8-16-64-bf16", "multi-fwd-M64-4096x4096-a64-rmix8x56-64x8-bf16",
        "multi-fwd-M64-4096x4096-a64-r64-bf16", "multi-fwdbwd-M8192-4096x4096-a16-r16-bf16"]
    # information cases last (a time budget cuts them first): backward alone, multi-adapter
    # training, MoE decode (M2) and prefill (M3)
    assert [c for c in head if not c.goals] == head[-4:]


def test_sweep_grid_and_selection():
    reg = bc.registry(bc.FULL, ["bf16", "fp16"])
    sweep = [c for c in bc.select(reg, "sweep") if c.dtype == "bf16"]
    by_mode = {m: sum(1 for c in sweep if c.mode == m and not c.multi) for m in bc.MODES}
    assert by_mode == {"fwd": 60, "bwd": 120, "fwdbwd": 120, "saved": 24}
    multi = [c for c in sweep if c.multi]
    assert {c.adapters for c in multi} == {1, 16, 64} and any(len(set(c.ranks)) > 1 for c in multi)
    assert {c.mode for c in multi} == {"fwd", "fwdbwd"}
    assert {(c.K, c.N) for c in sweep} == set(bc.LLAMA7B_SHAPES)
    decode = bc.select(reg, "sweep+decode")
    assert decode and all(c.M <= 64 for c in decode)
    no_multi = bc.select(reg, "sweep,-multi")
    assert no_multi and not any(c.multi for c in no_multi)
    assert [c.name for c in bc.select(reg, "fwd-M8192-4096x4096-r16-bf16")] == ["fwd-M8192-4096x4096-r16-bf16"]
    # serving cases have adapters (c.multi) but are in the serving group, not in multi
    assert bc.select(reg, "-multi") == [c for c in bc.select(reg, "headline") if not c.multi or c.slices]
    with pytest.raises(ValueError):
        bc.select(reg, "no-such-case")
    small = bc.registry(bc.CPU_SMALL, ["fp32"])
    p1 = next(c for c in small if "P1" in c.goals)
    assert (p1.M, p1.K, p1.N) == (512, 512, 512) and p1.full_shape == (8192, 4096, 4096)


def test_flop_and_byte_counts():
    c = bc.Case("fwd", M=2, K=3, N=5, r=1, dtype="bf16")
    f, b = c.flops_bytes()
    assert f == 2 * 2 * 5 * 3 + 2 * 2 * 3 * 1 + 2 * 2 * 5 * 1
    assert b == 2 * (2 * 3 + 5 * 3 + 1 * 3 + 5 * 1 + 2 * 5 + 2 * 1)
    tr = bc.Case("fwdbwd", M=2, K=3, N=5, r=1, dtype="bf16").flops_bytes()
    bw = bc.Case("bwd", M=2, K=3, N=5, r=1, dtype="bf16").flops_bytes()
    assert tr[0] == 4 * 2 * 5 * 3 + 6 * 2 * 3 * 1 + 6 * 2 * 5 * 1
    assert bw[0] == tr[0] - f and bw[1] == tr[1] - b
    # multi-adapter: rows per adapter as multi_adapter_ids gives them; M=4 rows, 2 adapters of
    # ranks 1 and 3: two rows each
    mc = bc.Case("fwd", M=4, K=3, N=5, r=3, dtype="bf16", adapters=2, ranks=(1, 3))
    assert mc.adapter_ids() == [0, 0, 1, 1]
    f, b = mc.flops_bytes()
    assert f == 2 * 4 * 5 * 3 + 2 * 2 * (3 + 5) * 1 + 2 * 2 * (3 + 5) * 3
    assert b == 2 * (4 * 3 + 5 * 3 + 4 * 5 + (3 + 5) * (1 + 3) + 2 * 1 + 2 * 3) + 4 * 4
    mt = bc.Case("fwdbwd", M=4, K=3, N=5, r=3, dtype="bf16", adapters=2, ranks=(1, 3)).flops_bytes()
    assert mt[0] == f + 2 * 4 * 5 * 3 + 4 * 2 * (3 + 5) * (1 + 3)
    assert mt[1] == b + 2 * (4 * 5 + 5 * 3 + 2 * 4 * 3 + 2 * (3 + 5) * 4 + 2 * (2 * 1 + 2 * 3))
    # unused adapters read nothing; base rows (-1) add no LoRA work
    few = bc.Case("fwd", M=2, K=3, N=5, r=1, dtype="bf16", adapters=4, base_rows=1)
    assert few.adapter_ids() == [0, -1]
    assert few.flops_bytes()[0] == 2 * 2 * 5 * 3 + 2 * 1 * (3 + 5) * 1
    # a single-rank multi case counts as the single-adapter forward when one adapter takes every row
    one = bc.Case("fwd", M=6, K=3, N=5, r=2, dtype="bf16", adapters=1)
    assert one.flops_bytes()[0] == bc.forward_flops_bytes(6, 3, 5, 2, 2)[0]


def test_multi_case_names_and_ids():
    assert bc._rmix_label((8, 16, 64) * 3) == "rmix8-16-64"
    assert bc._rmix_label((8,) * 7 + (64,)) == "rmix8x7-64x1"
    assert bc.multi_adapter_ids(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert bc.multi_adapter_ids(3, 8) == [0, 1, 2]
    assert bc.multi_adapter_ids(8, 2, base_rows=2) == [0, 0, 0, -1, 1, 1, 1, -1]
    c = bc.Case("fwd", M=8, K=4, N=4, r=4, dtype="fp32", adapters=2, ranks=(2, 4), base_rows=2)
    assert c.name == "multi-fwd-M8-4x4-a2-rmix2-4-base2-fp32" and c.mixed_ranks


def _row(case, provider, **kw):
    row = dict(case=case.name, provider=provider, mode=case.mode, status="ok")
    row.update(kw)
    return row


def test_goal_evaluation():
    head = bc.select(bc.registry(bc.FULL, ["bf16"]), "headline")
    get = {g: [c for c in head if g in c.goals] for g in GOAL_IDS}
    rows = [_row(get["P1"][0], "base", median_ms=1.0), _row(get["P1"][0], "fused", median_ms=1.05)]
    for c, fused in zip(get["P2"], (1.2, 1.0)):
        rows += [_row(c, "base", median_ms=1.0), _row(c, "fused", median_ms=fused)]
    for c in get["P3"]:
        rows += [_row(c, "base", median_ms=1.0), _row(c, "fused", median_ms=1.1),
                 _row(c, "eager", median_ms=1.3)]
    p4 = get["P4"][0]
    rows += [_row(p4, "fused", saved_bytes=30), _row(p4, "peft", saved_bytes=100),
             _row(p4, "eager", saved_bytes=100)]
    p5, p7 = get["P5"][0], get["P7"][0]
    # decode on a GPU: fused/base are graph replays (launch_ms: their eager launches); PEFT's
    # mixed batch can only launch eagerly, so P6 takes fused's eager launch: 6.0 / 0.5 = 12
    rows += [_row(p5, "base", median_ms=0.010, method="cuda-graph x10", launch_ms=0.03),
             _row(p5, "fused", median_ms=0.012, method="cuda-graph x10", launch_ms=0.5),
             _row(p5, "loop", median_ms=0.4, method="cuda-graph x10"),
             _row(p5, "peft-mixed", median_ms=6.0, method="do_bench")]
    rows += [_row(p7, "base", median_ms=1.0), _row(p7, "fused", median_ms=1.2), _row(p7, "loop", median_ms=3.0)]
    (mixed,) = [c for c in get["P7b"] if c.mixed_ranks]
    (small,) = [c for c in get["P7c"] if c.mixed_ranks]
    (padded,) = [c for c in get["P7b"] if not c.mixed_ranks]
    rows += [_row(mixed, "fused", median_ms=0.030), _row(small, "fused", median_ms=0.040),
             _row(padded, "fused", median_ms=0.040)]
    lines = bg.evaluate(rows, head, gpu=True)
    res = {}
    for g in lines:
        res.setdefault(g["id"], []).append(g)
    assert set(GOAL_IDS) <= set(res)
    assert res["P1"][0]["result"] == "PASS" and abs(res["P1"][0]["value"] - 1.05) < 1e-12
    assert res["P2"][0]["result"] == "FAIL" and res["P2"][0]["value"] == 1.2  # the worst M
    assert [g["result"] for g in res["P3"]] == ["PASS", "PASS"]
    assert [g["result"] for g in res["P3b"]] == ["FAIL", "FAIL"]  # eager stands in for peft: 1.18
    assert "eager" in res["P3b"][0]["what"] and "eager stands in" in res["P3b"][0]["note"]
    assert res["P4"][0]["result"] == "PASS" and res["P4"][0]["value"] == 0.3 and "peft" in res["P4"][0]["what"]
    assert res["P5"][0]["result"] == "PASS" and abs(res["P5"][0]["value"] - 0.2) < 1e-9
    assert res["P6"][0]["result"] == "PASS" and abs(res["P6"][0]["value"] - 12.0) < 1e-9
    assert "eager launch" in res["P6"][0]["note"] and "500.0x" in res["P6"][0]["note"]  # vs graph replay
    assert res["P7"][0]["result"] == "FAIL" and abs(res["P7"][0]["value"] - 1.2) < 1e-9
    assert res["P7b"][0]["result"] == "PASS" and abs(res["P7b"][0]["value"] - 0.75) < 1e-9
    assert res["P7c"][0]["result"] == "FAIL" and res["P7c"][0]["value"] == 1.0  # "less": strictly
    assert res["P7c"][0]["op"] == "<" and "8/64" in res["P7c"][0]["note"]
    assert res["P7b"][0]["case"] == f"{mixed.name},{padded.name}"
    assert [len(res[g]) for g in MULTI_GOALS] == [1] * 5
    assert bg.failed(lines) == [res["P2"][0]] + res["P3b"] + res["P7"] + res["P7c"]
    # P6 off a GPU (no graph timing): plain medians; a provider that did not run: n/a with why
    cpu_rows = [_row(p5, "fused", median_ms=2.0, method="perf_counter x9"),
                _row(p5, "peft-mixed", median_ms=5.0, method="perf_counter x9")]
    p6 = next(g for g in bg.evaluate(cpu_rows, head, gpu=False) if g["id"] == "P6")
    assert p6["value"] == 2.5 and p6["result"] == "FAIL*"
    p6 = next(g for g in bg.evaluate(cpu_rows[:1], head, gpu=False) if g["id"] == "P6")
    assert p6["result"] == "n/a" and p6["note"] == "peft-mixed not run"
    # the mixed-rank goals need their padded twin
    no_twin = [r for r in rows if r["case"] != padded.name]
    p7b = next(g for g in bg.evaluate(no_twin, head, gpu=True) if g["id"] == "P7b")
    assert p7b["result"] == "n/a" and "not run" in p7b["note"]
    p7b = next(g for g in bg.evaluate(rows, [c for c in head if c is not padded], gpu=True) if g["id"] == "P7b")
    assert p7b["result"] == "n/a" and "padded twin" in p7b["note"]

    cpu = bg.evaluate(rows, head, gpu=False)
    assert next(g for g in cpu if g["id"] == "P1")["result"] == "PASS*"
    assert next(g for g in cpu if g["id"] == "P4")["result"] == "PASS"  # bytes: a real measurement
    assert bg.failed(cpu) == []  # CPU timings never fail a run

    empty = bg.evaluate([], [], gpu=True)
    assert [g["id"] for g in empty] == ["P1", "P2", "P3", "P3b", "P4", "P5", "P6", "P7", "P7b", "P7c", "F1",
                                        "Q1", "Q2", "Q3", "D1", "D2", "D3", "D4", "S1", "S2", "S3", "M-GPU",
                                        "M-speed-CPU", "M-memory"] + HOST_GOALS
    assert all(g["result"] == "n/a" for g in empty)
    text = report.render(report.goal_lines(lines))
    assert all(f"\n{gid} " in text for gid in GOAL_IDS)


def test_readme_goals_table_is_the_generated_one(capsys):
    """README.md's goals table is bench/goals.py's, as ``python -m bench.goals --markdown``
    prints it, between its two marker lines: a goal changed in one place changes both."""
    assert bg.main(["--markdown"]) == 0
    table = capsys.readouterr().out
    assert table == bg.markdown_table()
    assert table.count("\n") == 2 + len(bg.GOALS) and all(g.about for g in bg.GOALS.values())
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    start, end = "<!-- goals:start -->\n", "<!-- goals:end -->"
    assert readme.count(start) == 1 and readme.count(end) == 1, "README.md lacks the goals table's markers"
    assert readme.split(start)[1].split(end)[0] == table, (
        "README.md's goals table differs from bench/goals.py: replace it with python -m bench.goals --markdown")

def test_floor_goal_compares_auto_with_composite_and_eager():
    """F1: on every single-adapter headline timing case, fused (auto) is no slower
    than the composite strategy and than eager; the value is the worse of the two ratios."""
    head = bc.select(bc.registry(bc.FULL, ["bf16"]), "headline")
    f1 = [c for c in head if "F1" in c.goals]
    assert {(c.mode, c.M, c.dropout) for c in f1} == {("fwd", 8192, 0.0), ("fwd", 1, 0.0), ("fwd", 16, 0.0),
                                                      ("fwdbwd", 8192, 0.0), ("fwdbwd", 8192, 0.1)}
    times = {0: (1.0, 1.1, 1.3), 1: (1.0, 0.99, 1.5)}  # fused, composite, eager
    rows = [_row(c, p, median_ms=t) for i, c in enumerate(f1[:2])
            for p, t in zip(("fused", "composite", "eager"), times[i])]
    lines = [g for g in bg.evaluate(rows, head, gpu=True) if g["id"] == "F1"]
    assert len(lines) == len(f1)
    assert lines[0]["result"] == "PASS" and abs(lines[0]["value"] - 1.0 / 1.1) < 1e-12
    assert lines[1]["result"] == "FAIL" and abs(lines[1]["value"] - 1.0 / 0.99) < 1e-12
    assert all(g["result"] == "n/a" and "not run" in g["note"] for g in lines[2:])
    from bench import providers as bp
    assert {"fused_kernel", "shrink_first", "composite"} <= set(bp.SINGLE_PROVIDERS)


def test_cpu_provider_defaults():
    from bench.__main__ import resolve_providers
    run, not_run, _ = resolve_providers("", "auto", torch.device("cpu"))
    assert {"base", "fused", "eager", "merged"} <= set(run)
    assert "peft" in not_run and "compiled" in not_run
    run, not_run, _ = resolve_providers("fused,base", "off", torch.device("cpu"))
    assert run == ["base", "fused"] and not not_run
    run, _, _ = resolve_providers("-merged", "off", torch.device("cpu"))
    assert "merged" not in run and "peft" not in run and "peft-mixed" not in run
    # P6 has no stand-in for PEFT's mixed batch: it runs on a CPU by default (where peft imports)
    run, not_run, _ = resolve_providers("", "auto", torch.device("cpu"))
    assert {"loop", "peft-mixed"} & (set(run) | set(not_run)) == {"loop", "peft-mixed"}
    assert "loop" in run and ("peft-mixed" in run) == _have("peft")


# --------------------------------------------------------------------------
# Multi-adapter providers (tiny cases; Triton through the interpreter on CPU)
# --------------------------------------------------------------------------
def rows_past_decode():
    from lora_fused.kernels.multi_lora import MULTI_DECODE_MAX_ROWS
    return MULTI_DECODE_MAX_ROWS + 1


def _tiny_multi(mode="fwd", **kw):
    """7 rows over 3 adapters of ranks 2/3/4 (r_max 4), one base row, a bias: every path."""
    args = dict(M=7, K=24, N=20, r=4, dtype="fp32", adapters=3, ranks=(2, 3, 4), base_rows=1, bias=True)
    args.update(kw)
    return bc.Case(mode, **args)


def _oracle(case, st, grads=False):
    """lf.multi_lora_linear_reference (the per-row float64 loop) straight, not through providers."""
    import lora_fused as lf
    L = st.layers[0]
    x = st.x.double().requires_grad_(grads)
    A, B = L.A.double().requires_grad_(grads), L.B.double().requires_grad_(grads)
    ranks = torch.tensor(case.adapter_ranks)
    y = lf.multi_lora_linear_reference(x, L.W.double(), A, B, torch.tensor(case.adapter_ids()),
                                       torch.tensor(bp.multi_scalings(case), dtype=torch.float64),
                                       L.b.double() if L.b is not None else None, ranks=ranks)
    if not grads:
        return y.detach()
    y.backward(st.dy[0].double())
    return [x.grad, A.grad, B.grad]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("provider", ["base", "fused", "fused-cublas", "loop", "peft-mixed"])
def test_multi_providers_forward_match_the_oracle(provider):
    if provider == "peft-mixed":
        pytest.importorskip("peft")
    from bench.runner import Runner, Settings
    case = _tiny_multi()
    assert case.adapter_ids() == [0, 0, 0, 1, 1, 2, -1]
    runner = Runner(Settings(device=torch.device("cpu"), quick=True))
    sets = runner.inputs(case, n_sets=2)
    st = sets[0]
    prep = runner.prepare(case, provider, sets)
    with torch.no_grad():
        (y,) = prep.bounds[0].run()
    (ref,) = bp.reference_outputs(case, st, provider)
    if provider == "base":
        assert _rel(y, ref) < 1e-6
        assert _rel(y, torch.nn.functional.linear(st.x, st.layers[0].W, st.layers[0].b)) < 1e-6
    else:
        assert ref.dtype == torch.float64 and _rel(ref, _oracle(case, st)) < 1e-12
        assert _rel(y, ref) < 1e-5
    assert runner.check(case, prep, st) < 1e-5
    assert prep.bounds[0].graph == (provider != "peft-mixed")
    # the rows of each adapter really differ from the base layer (the LoRA term is there)
    base = torch.nn.functional.linear(st.x, st.layers[0].W, st.layers[0].b)
    if provider != "base":
        assert all(_rel(y[t], base[t]) > 0.05 for t in range(6)) and _rel(y[6], base[6]) < 1e-6
    prep.close()


@pytest.mark.parametrize("provider", ["base", "fused", "fused-cublas", "loop"])
def test_multi_providers_gradients_match_the_oracle(provider):
    from bench.runner import Runner, Settings
    case = _tiny_multi("fwdbwd")
    runner = Runner(Settings(device=torch.device("cpu"), quick=True))
    sets = runner.inputs(case, n_sets=2)
    st = sets[0]
    prep = runner.prepare(case, provider, sets)
    b = prep.bounds[0]
    torch.autograd.backward(b.run(), b.dy)
    got = b.grads()
    refs = bp.reference_grads(case, st, provider)
    if provider == "base":
        assert len(got) == 1 and _rel(got[0], refs[0]) < 1e-6
    else:
        oracle = _oracle(case, st, grads=True)
        assert [tuple(g.shape) for g in got] == [(7, 24), (3, 4, 24), (3, 20, 4)]
        for g, r, o in zip(got, refs, oracle):
            assert _rel(r, o) < 1e-12 and _rel(g, r) < 1e-5
        dA, dB = got[1], got[2]
        assert dA[0, 2:].abs().max() == 0 and dB[1, :, 3:].abs().max() == 0  # padding past r_i
    for t in prep.grad_to_none:
        t.grad = None
    assert runner.check(case, prep, st) < 1e-5
    prep.close()


def test_multi_reference_past_the_row_limit_matches_the_oracle():
    """Past ORACLE_MAX_ROWS the check computes adapter by adapter: the per-row oracle's values
    (mixed ranks and base rows included)."""
    big = bc.Case("fwd", M=bp.ORACLE_MAX_ROWS + 1, K=8, N=8, r=3, dtype="fp32", adapters=3, ranks=(1, 3, 2),
                  base_rows=5, bias=True)
    stb = bp.make_input_sets(big, torch.device("cpu"), 1)[0]
    (ref,) = bp.reference_outputs(big, stb, "fused")
    assert _rel(ref, _oracle(big, stb)) < 1e-12


def test_multi_provider_applicability():
    from bench.runner import Runner, Settings
    single = bc.Case("fwd", M=4, K=8, N=8, r=2, dtype="fp32")
    fwd, train = _tiny_multi(), _tiny_multi("fwdbwd")
    for p in bp.ALL_PROVIDERS:
        assert bp.applies(p, fwd) == (p in ("base", "fused", "loop", "peft-mixed")), p  # M=7: decode
        assert bp.applies(p, train) == bp.applies(p, fwd)
        assert bp.applies(p, single) == (p in bp.SINGLE_PROVIDERS)
        assert bp.provider_unavailable(p, fwd) is None and bp.provider_unavailable(p, single) is None
        assert (bp.provider_unavailable(p, train) is None) == (p != "peft-mixed")
    prefill = _tiny_multi(M=rows_past_decode())
    assert bp.applies("fused-cublas", prefill) and not bp.applies("fused-cublas", fwd)
    assert "inference only" in bp.provider_unavailable("peft-mixed", train)
    st = bp.make_input_sets(train, torch.device("cpu"), 1)[0]
    with pytest.raises(ValueError, match="inference only"):
        bp.bind("peft-mixed", train, st, training=True)
    # through the runner: peft-mixed reads n/a with the reason, the others ran and were checked
    runner = Runner(Settings(device=torch.device("cpu"), quick=True, cpu_budget_s=0.01))
    rows = {r["provider"]: r for r in runner.run_case(train, ["base", "fused", "loop", "peft-mixed", "eager"])}
    assert set(rows) == {"base", "fused", "loop", "peft-mixed"}
    assert rows["peft-mixed"]["status"] == "n/a" and "inference only" in rows["peft-mixed"]["reason"]
    for p in ("base", "fused", "loop"):
        assert rows[p]["status"] == "ok" and rows[p]["check_relerr"] < 1e-5 and rows[p]["median_ms"] > 0
        assert rows[p]["saved_bytes"] is not None
    assert rows["fused"]["note"] == "triton"  # the multi kernels ran (interpreter here)
    assert rows["fused"]["vs_base"] is not None


# --------------------------------------------------------------------------
# Host time: the host group, its timer, the no-op launch hook, goals H1-H7
# --------------------------------------------------------------------------
def test_host_cases_registered_outside_headline():
    reg = bc.registry(bc.FULL, ["bf16"])
    host = bc.select(reg, "host")
    assert host == bc.host_cases() and not set(host) & set(bc.select(reg, "headline"))
    assert {g for c in host for g in c.goals} == set(HOST_GOALS)
    for c in host:
        assert c.name.startswith("host-") and c.providers[0] == "eager" and c.dtype == "fp32"
    per_op = [c for c in host if c.subject != "llama-step"]
    assert {(c.M, c.K, c.N, c.r) for c in per_op} == {(4, 64, 64, 8)}  # goals H1-H5's shapes
    assert {c.adapters for c in per_op if "multi" in c.subject.lower()} == {8}
    h3 = [c for c in host if "H3" in c.goals]
    assert sorted(c.dropout for c in h3) == [0.0, 0.1] and all(c.grad for c in h3)
    assert all(c.triton and "fused-noop" in c.providers for c in host if "H7" in c.goals)
    assert "peft" in next(c for c in host if "H6" in c.goals).providers


def test_interleaved_timer_rotates_the_order():
    from bench.host import time_interleaved
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    times = time_interleaved(fns, rounds=4, calls=2)
    assert [len(t) for t in times.values()] == [4, 4, 4] and all(v > 0 for t in times.values() for v in t)
    blocks = calls[::2]
    assert calls[1::2] == blocks  # each block: `calls` back-to-back calls of one provider
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter on CPU")
def test_noop_launches_count_every_launch_and_run_none(monkeypatch):
    import lora_fused as lf
    from bench.host import _kernel_objects, noop_launches
    from lora_fused.kernels import lora_linear as kernels
    monkeypatch.setenv("LORA_FUSED_BACKEND", "triton")
    g = torch.Generator().manual_seed(0)
    x, W, A, B = (torch.randn(*s, generator=g) for s in ((4, 16), (12, 16), (2, 16), (12, 2)))
    ref = lf.lora_linear_reference(x.double(), W.double(), A.double(), B.double(), 2.0)
    before = sum(kernels.LAUNCH_COUNTS.values())
    with noop_launches() as counter:
        y = lf.lora_linear(x, W, A, B, 2.0)
    # the kernels' own launch counter saw exactly the launches the hook swallowed
    assert counter.launches >= 1 and counter.launches == sum(kernels.LAUNCH_COUNTS.values()) - before
    assert torch.isnan(y).all()  # outputs start as NaN under the tests' poison: nothing was written
    assert all("run" not in vars(k) for k in _kernel_objects())  # the launches are restored
    before = sum(kernels.LAUNCH_COUNTS.values())
    y = lf.lora_linear(x, W, A, B, 2.0)
    assert sum(kernels.LAUNCH_COUNTS.values()) > before
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_host_goal_evaluation():
    host = bc.host_cases()

    def c(gid, **kw):
        return next(x for x in host if gid in x.goals and all(getattr(x, k) == v for k, v in kw.items()))
    us = 1e-3  # rows hold ms
    rows = [_row(c("H1"), "eager", median_ms=20 * us), _row(c("H1"), "fused", median_ms=21 * us,
                                                           vs_eager_paired=1.04),
            _row(c("H2"), "eager", median_ms=20 * us), _row(c("H2"), "fused", median_ms=24 * us),
            _row(c("H3", dropout=0.0), "eager", median_ms=200 * us),
            _row(c("H3", dropout=0.0), "fused", median_ms=190 * us),
            _row(c("H3", dropout=0.1), "eager", median_ms=200 * us),
            _row(c("H3", dropout=0.1), "fused", median_ms=210 * us),
            _row(c("H6", dropout=0.0), "eager", median_ms=9.0), _row(c("H6", dropout=0.0), "fused", median_ms=7.0),
            _row(c("H6", dropout=0.0), "peft", median_ms=8.0),
            _row(c("H6", dropout=0.05), "fused", median_ms=9.0), _row(c("H6", dropout=0.05), "peft", median_ms=8.0)]
    h7 = [x for x in host if "H7" in x.goals]
    two_ops = next(x for x in h7 if x.ops == 2)
    rows += [_row(two_ops, "fused-noop", median_ms=16 * us, launches=4),
             _row(two_ops, "fused", median_ms=36 * us, launches=4)]
    lines = [g for g in bg.evaluate(rows, host, gpu=False) if g["id"].startswith("H")]
    res = {}
    for g in lines:
        res.setdefault(g["id"], []).append(g)
    assert list(res) == HOST_GOALS and [len(res[g]) for g in HOST_GOALS] == [1, 1, 2, 1, 1, 2, len(h7)]
    # host time is measured for real on a CPU: no star, and a failure counts
    assert res["H1"][0]["result"] == "PASS" and abs(res["H1"][0]["value"] - 1.05) < 1e-9
    assert "us" in res["H1"][0]["note"] and "1.04" in res["H1"][0]["note"]
    assert res["H2"][0]["result"] == "FAIL" and abs(res["H2"][0]["value"] - 1.2) < 1e-9
    assert [g["result"] for g in res["H3"]] == ["PASS", "FAIL"] and "dropout 0.1" in res["H3"][1]["what"]
    assert res["H4"][0]["result"] == res["H5"][0]["result"] == "n/a"  # no rows: not measured
    assert res["H6"][0]["value"] == 7.0 / 8.0 and res["H6"][0]["result"] == "PASS"  # against PEFT
    assert "peft" in res["H6"][0]["what"] and "dropout 0.05" in res["H6"][1]["what"]
    assert res["H6"][1]["value"] == 9.0 / 8.0 and res["H6"][1]["result"] == "FAIL"
    g7 = next(g for g in res["H7"] if g["case"] == two_ops.name)
    assert g7["value"] == 8.0 and g7["result"] == "PASS"  # 16 us over 2 ops
    assert "4 launches" in g7["note"] and "5.0 us per launch" in g7["note"]  # (36 - 16) / 4
    assert all(g["result"] == "n/a" for g in res["H7"] if g is not g7)
    assert bg.failed(lines) == [res["H2"][0], res["H3"][1], res["H6"][1]]
    none = [g for g in bg.evaluate([], [], gpu=False) if g["id"].startswith("H")]
    assert [g["id"] for g in none] == HOST_GOALS and all("--cases host" in g["note"] for g in none)


def test_cli_host_group(tmp_path):
    """``python -m bench --cases host`` (2 rounds): every host case has its rows, timed and
    checked, the Triton cases through the child process, and the goals H1-H7 a value each."""
    out = tmp_path / "out"
    args = ["-m", "bench", "--cases", "host", "--rounds", "2", "--no-plots", "--out", str(out)]
    if torch.cuda.is_available():
        args.append("--cpu")
    text = _run(args, timeout=600).stdout
    assert "HOST TIME (us per call" in text
    goals_part = text[text.index("\nGOALS"):]
    for gid in HOST_GOALS:
        assert f"\n{gid} " in goals_part
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    peft = _have("peft")
    for case in bc.host_cases():
        got = {r["provider"]: r for r in rows if r["case"] == case.name}
        assert set(got) == set(case.providers), case.name
        for p, r in got.items():
            if p == "fused" and case.triton:
                assert r["status"] == "n/a" and "no launch" in r["reason"]
            elif p.startswith("peft") and not peft:
                assert r["status"] == "skipped"
            else:
                assert r["status"] == "ok", (case.name, p, r.get("reason"))
                assert r["rounds"] == 2 and r["q20_us"] <= r["median_us"] <= r["q80_us"]
                assert r["vs_eager"] is not None and r["vs_eager_paired"] is not None
                if p == "fused-noop":
                    assert r["launches"] >= case.ops  # the Triton path ran, its launches no-op'd
                elif p != "eager" and not (case.grad and case.dropout and case.subject != "llama-step"):
                    assert r["check_relerr"] is not None and r["check_relerr"] < 1e-5, (case.name, p)
    by_id = {}
    for g in data["goals"]:
        by_id.setdefault(g["id"], []).append(g)
    for gid in HOST_GOALS:
        for g in by_id[gid]:
            if gid == "H6" and not peft:
                assert g["result"] == "n/a"
                continue
            assert g["value"] is not None and g["result"] in ("PASS", "FAIL"), g  # never starred
    md = (out / "bench.md").read_text()
    assert "## Host time (us per call)" in md and "## Measurements" not in md


# --------------------------------------------------------------------------
# QLoRA cases (goals Q1-Q3): LoRALinear4bit vs PEFT's QLoRA layer over a bitsandbytes NF4 W0
# --------------------------------------------------------------------------
QLORA_GOALS = ["Q1", "Q2", "Q3"]


def test_qlora_cases_registered():
    reg = bc.registry(bc.FULL, ["bf16"])
    q = bc.select(reg, "qlora")
    assert [c.name for c in q] == ["qlora-fwdbwd-M8192-4096x4096-r16-nf4dq-bf16",
                                   "qlora-fwd-M1-4096x4096-r16-nf4dq-bf16", "qlora-fwd-M16-4096x4096-r16-nf4dq-bf16"]
    assert all("headline" in c.groups and c.quant == "nf4dq" and not c.multi for c in q)
    assert q[0].goals == ("Q1", "Q3") and q[1].goals == q[2].goals == ("Q2", "Q3")
    assert {c.name for c in bc.select(reg, "qlora+decode")} == {q[1].name, q[2].name}
    assert bc.quant_spec("nf4dq") == ("nf4", True, 64) and bc.quant_spec("fp4") == ("fp4", False, 64)
    with pytest.raises(ValueError, match="int4"):
        bc.quant_spec("int4")
    # the 4-bit weight is read as NK/2 code bytes + NK/64 nested absmax bytes instead of 2NK
    plain = bc.Case("fwd", M=1, K=4096, N=4096, r=16)
    nk = 4096 * 4096
    assert q[1].flops_bytes()[0] == plain.flops_bytes()[0]
    assert plain.flops_bytes()[1] - q[1].flops_bytes()[1] == 2 * nk - (nk / 2 + nk / 64)
    train = bc.Case("fwdbwd", M=8192, K=4096, N=4096, r=16)
    assert train.flops_bytes()[1] - q[0].flops_bytes()[1] == 2 * (2 * nk - (nk / 2 + nk / 64))
    small = bc.select(bc.registry(bc.CPU_SMALL, ["fp32"]), "qlora")
    assert [(c.M, c.K, c.N) for c in small] == [(512, 512, 512), (1, 512, 512), (16, 512, 512)]
    # which providers run on a QLoRA case
    assert [p for p in bp.ALL_PROVIDERS if bp.applies(p, q[0])] == ["base", "fused", "eager-qlora", "peft-qlora"]
    assert not bp.applies("eager-qlora", plain) and not bp.applies("peft-qlora", plain)


def _tiny_qlora(mode, M=5, **kw):
    # K a multiple of the blocksize (64): for a K that is a multiple of 16 but not of the blocksize,
    # bitsandbytes' AVX-512 CPU dequantize (the reference here) reads other block scales.
    args = dict(M=M, K=128, N=40, r=4, dtype="fp32", bias=True, quant="nf4dq")
    args.update(kw)
    return bc.Case(mode, **args)


@pytest.mark.parametrize("mode,M", [("fwd", 5), ("fwd", 19), ("fwdbwd", 5), ("fwdbwd", 19)])
@pytest.mark.parametrize("provider", ["base", "fused", "eager-qlora", "peft-qlora"])
def test_qlora_providers_match_float64(provider, mode, M):
    """Every QLoRA provider (fused: LoRALinear4bit's Triton kernels through the interpreter:
    the decode kernel at 5 rows, dequantize + LoRA kernels at 19) against float64 over
    bitsandbytes' dequantized weight, computed here from the packed bytes, not by bench code."""
    bnb = pytest.importorskip("bitsandbytes")
    if provider == "peft-qlora":
        pytest.importorskip("peft")
    from bench.runner import Runner, Settings
    case = _tiny_qlora(mode, M)
    runner = Runner(Settings(device=torch.device("cpu"), quick=True))
    sets = runner.inputs(case, n_sets=2)
    st = sets[0]
    L = st.layers[0]
    state = L.q.weight.quant_state
    assert (state.quant_type, state.nested, state.blocksize) == ("nf4", True, 64)
    W = bnb.functional.dequantize_4bit(L.q.weight.data, state).double()
    assert torch.equal(W, L.W.double()) and L.A.dtype == L.B.dtype == torch.float32
    x = st.x.double().requires_grad_(case.training)
    A, B = L.A.double().requires_grad_(case.training), L.B.double().requires_grad_(case.training)
    base = x @ W.T + L.b.double()
    ref = base if provider == "base" else base + case.scaling * (x @ A.T) @ B.T
    from lora_fused.kernels import common
    common.LAUNCH_COUNTS.clear()
    prep = runner.prepare(case, provider, sets)
    b = prep.bounds[0]
    assert b.graph == (provider == "fused")
    if mode == "fwd":
        with torch.no_grad():
            (y,) = b.run()
        assert _rel(y, ref) < 1e-5
        if provider != "base":
            assert _rel(y, base) > 0.05  # the LoRA term is there
    else:
        (y,) = b.run()
        assert _rel(y, ref) < 1e-5
        torch.autograd.backward([y], b.dy)
        ref.backward(st.dy[0].double())
        got = b.grads()
        want = [x.grad] if provider == "base" else [x.grad, A.grad, B.grad]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert _rel(g, w) < 1e-5
        if provider != "base":
            assert got[1].dtype == got[2].dtype == torch.float32
        for t in prep.grad_to_none:
            t.grad = None
    if provider == "fused":  # lora-fused's own 4-bit kernels ran (the interpreter on a CPU)
        assert common.LAUNCH_COUNTS["qlora_decode_kernel" if M <= 16 else "dequant4bit_kernel"] > 0
    err = runner.check(case, prep, st)
    assert err is not None and err < 1e-5
    prep.close()


def test_qlora_run_case_rows_and_missing_bitsandbytes(monkeypatch):
    """run_case: one ok row per provider, checked; without bitsandbytes every row is skipped
    with the reason, nothing raised."""
    pytest.importorskip("bitsandbytes")
    import sys
    from bench.runner import Runner, Settings
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    case = _tiny_qlora("fwdbwd", bias=False)
    runner = Runner(Settings(device=torch.device("cpu"), quick=True, cpu_budget_s=0.005))
    rows = runner.run_case(case, ["base", "fused", "eager-qlora"])
    assert [r["provider"] for r in rows] == ["base", "fused", "eager-qlora"]
    for r in rows:
        assert r["status"] == "ok", r.get("reason")
        assert r["median_ms"] > 0 and r["check_relerr"] < 1e-5 and r["saved_bytes"] is not None
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    rows = runner.run_case(case, ["base", "fused", "eager-qlora", "peft-qlora", "eager"])
    assert [r["provider"] for r in rows] == ["base", "fused", "eager-qlora", "peft-qlora"]
    for r in rows:
        assert r["status"] == "skipped" and "bitsandbytes not importable" in r["reason"]
        assert "lora-fused[qlora]" in r["reason"]


def test_qlora_goal_evaluation():
    head = bc.select(bc.registry(bc.FULL, ["bf16"]), "headline")
    (q1,) = [c for c in head if "Q1" in c.goals]
    q2 = [c for c in head if "Q2" in c.goals]
    MiB = 2 ** 20
    rows = [_row(q1, "base", median_ms=4.0, peak_mem_bytes=200 * MiB),
            _row(q1, "fused", median_ms=5.0, peak_mem_bytes=100 * MiB),
            _row(q1, "eager-qlora", median_ms=6.0, peak_mem_bytes=150 * MiB),
            _row(q1, "peft-qlora", median_ms=7.0, peak_mem_bytes=160 * MiB)]
    # decode on a GPU: fused a graph replay (launch_ms: its eager launch), bitsandbytes eager only
    for c, launch, peft_ms in zip(q2, (0.030, 0.040), (0.090, 0.070)):
        rows += [_row(c, "fused", median_ms=0.010, method="cuda-graph x10", launch_ms=launch,
                      peak_mem_bytes=MiB),
                 _row(c, "peft-qlora", median_ms=peft_ms, method="do_bench", peak_mem_bytes=2 * MiB)]
    lines = bg.evaluate(rows, head, gpu=True)
    res = {g["id"]: g for g in lines if g["id"] in QLORA_GOALS}
    assert abs(res["Q1"]["value"] - 1.4) < 1e-12 and res["Q1"]["result"] == "PASS"
    assert "peft-qlora" in res["Q1"]["what"]
    # worst M on eager launches: min(0.09 / 0.03, 0.07 / 0.04) = 1.75
    assert abs(res["Q2"]["value"] - 1.75) < 1e-12 and res["Q2"]["result"] == "FAIL"
    assert "CUDA-graph replay 7.00x" in res["Q2"]["note"]
    # worst over the three cases: max(100/160, 1/2, 1/2)
    assert abs(res["Q3"]["value"] - 0.625) < 1e-12 and res["Q3"]["result"] == "PASS"
    assert bg.failed(lines) == [res["Q2"]] + [g for g in bg.failed(lines) if g["id"] not in QLORA_GOALS]
    # a CPU run: timings starred, peak memory n/a; PEFT not run: eager-qlora stands in
    cpu_rows = [dict(r, peak_mem_bytes=None, method="perf_counter") for r in rows if r["provider"] != "peft-qlora"]
    cpu = {g["id"]: g for g in bg.evaluate(cpu_rows, head, gpu=False) if g["id"] in QLORA_GOALS}
    assert abs(cpu["Q1"]["value"] - 1.2) < 1e-12 and cpu["Q1"]["result"] == "FAIL*"
    assert "eager-qlora" in cpu["Q1"]["what"] and "stands in" in cpu["Q1"]["note"]
    assert cpu["Q2"]["result"] == "n/a" and "eager-qlora not run" in cpu["Q2"]["note"]
    assert cpu["Q3"]["result"] == "n/a" and "CUDA only" in cpu["Q3"]["note"]
    assert not any(g["id"] in QLORA_GOALS for g in bg.failed(bg.evaluate(cpu_rows, head, gpu=False)))


def test_cli_qlora_group(tmp_path):
    """``python -m bench --cases qlora --quick``: every QLoRA provider runs and is checked; Q1 and
    Q2 have CPU (starred) values against PEFT, Q3 is n/a (CUDA only)."""
    for mod in ("bitsandbytes", "peft"):
        pytest.importorskip(mod)
    out = tmp_path / "out"
    args = ["-m", "bench", "--cases", "qlora", "--quick", "--out", str(out), "--no-plots"]
    if torch.cuda.is_available():
        args.append("--cpu")
    proc = _run(args)
    goals_part = proc.stdout[proc.stdout.index("\nGOALS"):]
    for gid in QLORA_GOALS:
        assert f"\n{gid} " in goals_part
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    assert {r["case"] for r in rows} == {"qlora-fwdbwd-M512-512x512-r16-nf4dq-fp32",
                                         "qlora-fwd-M1-512x512-r16-nf4dq-fp32", "qlora-fwd-M16-512x512-r16-nf4dq-fp32"}
    assert all(sorted(r["provider"] for r in rows if r["case"] == c) ==
               ["base", "eager-qlora", "fused", "peft-qlora"] for c in {r["case"] for r in rows})
    for r in rows:
        assert r["status"] == "ok", (r["case"], r["provider"], r.get("reason"))
        assert r["check_relerr"] is not None and r["check_relerr"] < 1e-5
    by_id = {g["id"]: g for g in data["goals"]}
    for gid in ("Q1", "Q2"):
        assert by_id[gid]["value"] > 0 and by_id[gid]["result"] in ("PASS*", "FAIL*")
        assert "peft-qlora" in by_id[gid]["what"] and not by_id[gid]["gpu_measurement"]
    assert by_id["Q3"]["result"] == "n/a"


# --------------------------------------------------------------------------
# DoRA cases (goals D1-D4): DoRALinear vs PEFT DoRA and lora-fused's LoRA
# --------------------------------------------------------------------------
DORA_GOALS = ["D1", "D2", "D3", "D4"]
SERVING_GOALS = ["S1", "S2", "S3"]


def test_dora_cases_registered():
    reg = bc.registry(bc.FULL, ["bf16"])
    d = bc.select(reg, "dora")
    assert [c.name for c in d] == ["dora-fwdbwd-M8192-4096x4096-r16-bf16", "dora-fwdbwd-M256-1024x1024-r16-bf16"]
    assert all("headline" in c.groups and c.dora and not c.multi and c.mode == "fwdbwd" for c in d)
    assert d[0].goals == ("D1", "D2", "D4") and d[1].goals == ("D3",)
    # D3's shape is the CPU goal's shape, never scaled; the GPU case shrinks as the others do
    small = bc.select(bc.registry(bc.CPU_SMALL, ["fp32"]), "dora")
    assert [(c.M, c.K, c.N, c.dtype) for c in small] == [(512, 512, 512, "fp32"), (256, 1024, 1024, "fp32")]
    assert small[1].full_shape is None and small[0].full_shape == (8192, 4096, 4096)
    # the norm adds one read of W0 and its 2NKr flops to LoRA's work
    plain = bc.Case("fwdbwd", M=8192, K=4096, N=4096, r=16)
    (f0, b0), (f1, b1) = plain.flops_bytes(), d[0].flops_bytes()
    assert f1 - f0 == 2 * 4096 * 4096 * 16 and b1 - b0 == 2 * 4096 * 4096
    assert [p for p in bp.ALL_PROVIDERS if bp.applies(p, d[0])] == ["base", "fused", "fused-lora", "peft-dora"]
    assert not bp.applies("peft-dora", plain) and not bp.applies("fused-lora", plain)


def _tiny_dora(M=5, **kw):
    args = dict(M=M, K=96, N=40, r=4, dtype="fp32", bias=True, dora=True)
    args.update(kw)
    return bc.Case("fwdbwd", **args)


def _dora64(st, case, provider):
    """float64 DoRA written out here: norm = ||W0 + s B A|| per row (detached), y = (m / norm) *
    (x W0^T + s (x A^T) B^T) + b; returns (y, [leaves])."""
    L = st.layers[0]
    x, A, B, m = (t.detach().double().requires_grad_() for t in (st.x, L.A, L.B, L.m))
    W, b, s = L.W.double(), L.b.double(), case.scaling
    if provider == "base":
        return x @ W.T + b, [x]
    lora = s * (x @ A.T) @ B.T
    if provider == "fused-lora":
        return x @ W.T + b + lora, [x, A, B]
    norm = (W + s * B.detach() @ A.detach()).norm(dim=1)
    return (m / norm) * (x @ W.T + lora) + b, [x, A, B, m]


@pytest.mark.parametrize("M", [5, 19])
@pytest.mark.parametrize("provider", ["base", "fused", "fused-lora", "peft-dora"])
def test_dora_providers_match_float64(provider, M):
    """Every DoRA provider, forward and dX, dA, dB, dm, against float64 (lf.DoRALinear's Triton
    kernels through the interpreter on CPU tensors); the magnitude is not the norm, so a
    provider ignoring m fails."""
    if provider == "peft-dora":
        pytest.importorskip("peft")
    from bench.runner import Runner, Settings
    case = _tiny_dora(M)
    runner = Runner(Settings(device=torch.device("cpu"), quick=True))
    sets = runner.inputs(case, n_sets=2)
    st = sets[0]
    L = st.layers[0]
    norm = (L.W.double() + case.scaling * L.B.double() @ L.A.double()).norm(dim=1)
    assert (L.m.double() / norm - 1).abs().max() > 0.02  # m is not the norm
    ref, leaves = _dora64(st, case, provider)
    prep = runner.prepare(case, provider, sets)
    b = prep.bounds[0]
    (y,) = b.run()
    assert _rel(y, ref) < 1e-5
    if provider in ("fused", "peft-dora"):
        assert _rel(y, _dora64(st, case, "fused-lora")[0]) > 0.01  # the magnitude matters
    torch.autograd.backward([y], b.dy)
    ref.backward(st.dy[0].double())
    got = b.grads()
    assert len(got) == len(leaves)
    for g, w in zip(got, leaves):
        assert _rel(g, w.grad) < 1e-5
    for t in prep.grad_to_none:
        t.grad = None
    err = runner.check(case, prep, st)
    assert err is not None and err < 1e-5
    prep.close()


def test_dora_run_case_rows_and_missing_peft(monkeypatch):
    """run_case: an ok, checked row per provider; without peft the peft-dora row is skipped
    with the reason."""
    import sys
    from bench.runner import Runner, Settings
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    case = _tiny_dora(bias=False)
    runner = Runner(Settings(device=torch.device("cpu"), quick=True, cpu_budget_s=0.005))
    names = ["base", "fused", "fused-lora"] + (["peft-dora"] if _have("peft") else [])
    rows = runner.run_case(case, names + ["eager", "packed"])
    assert [r["provider"] for r in rows] == names
    for r in rows:
        assert r["status"] == "ok", r.get("reason")
        assert r["median_ms"] > 0 and r["check_relerr"] < 1e-5 and r["saved_bytes"] is not None
    # the CPU goal's case is timed for real (a longer budget), the others as a harness check
    head = bc.select(bc.registry(bc.CPU_SMALL, ["fp32"]), "dora")
    assert [runner.cpu_budget(c) for c in head] == [0.005, 1.0] and runner.cpu_budget(case) == 0.005
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    rows = runner.run_case(case, ["fused", "peft-dora"])
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "skipped" and "peft not importable" in rows[1]["reason"]


def test_dora_goal_evaluation():
    head = bc.select(bc.registry(bc.FULL, ["bf16"]), "headline")
    (big,) = [c for c in head if "D1" in c.goals]
    (cpu_case,) = [c for c in head if "D3" in c.goals]
    MiB = 2 ** 20
    rows = [_row(big, "base", median_ms=4.0, peak_mem_bytes=100 * MiB),
            _row(big, "fused", median_ms=5.0, peak_mem_bytes=200 * MiB),
            _row(big, "fused-lora", median_ms=4.5, peak_mem_bytes=190 * MiB),
            _row(big, "peft-dora", median_ms=9.0, peak_mem_bytes=400 * MiB),
            _row(cpu_case, "fused", median_ms=3.0), _row(cpu_case, "peft-dora", median_ms=5.0)]
    res = {g["id"]: g for g in bg.evaluate(rows, head, gpu=True) if g["id"] in DORA_GOALS}
    assert abs(res["D1"]["value"] - 5.0 / 4.5) < 1e-12 and res["D1"]["result"] == "PASS"
    assert abs(res["D2"]["value"] - 1.8) < 1e-12 and res["D2"]["result"] == "PASS"
    assert abs(res["D4"]["value"] - 0.5) < 1e-12 and res["D4"]["result"] == "PASS"
    assert "32.0 MiB" in res["D4"]["note"]  # one 4096 x 4096 bf16 tensor, for scale
    # a CPU goal: n/a on a GPU run, measured (not starred) on a CPU
    assert res["D3"]["result"] == "n/a" and "CPU goal" in res["D3"]["note"]
    cpu = {g["id"]: g for g in bg.evaluate([dict(r, peak_mem_bytes=None) for r in rows], head, gpu=False)
           if g["id"] in DORA_GOALS}
    assert abs(cpu["D3"]["value"] - 0.6) < 1e-12 and cpu["D3"]["result"] == "PASS"
    assert cpu["D3"]["gpu_measurement"] and cpu["D1"]["result"] == "PASS*" and not cpu["D1"]["gpu_measurement"]
    assert cpu["D4"]["result"] == "n/a" and "CUDA only" in cpu["D4"]["note"]
    slow = [dict(r, median_ms=4.5) if r["case"] == cpu_case.name and r["provider"] == "fused" else r for r in rows]
    failed = bg.failed(bg.evaluate(slow, head, gpu=False))
    assert [g["id"] for g in failed if g["id"] in DORA_GOALS] == ["D3"]  # 0.9 > 0.8: a real CPU failure
    # without PEFT: no stand-in
    nopeft = {g["id"]: g for g in bg.evaluate([r for r in rows if r["provider"] != "peft-dora"], head, gpu=True)
              if g["id"] in DORA_GOALS}
    assert nopeft["D1"]["result"] == "PASS"
    assert all(nopeft[g]["result"] == "n/a" and "peft-dora not run" in nopeft[g]["note"] for g in ("D2", "D4"))


# --------------------------------------------------------------------------
# Serving cases (goals S1-S3): lf.add_lora over packed slices, engine layouts
# --------------------------------------------------------------------------
def test_serving_cases_registered():
    reg = bc.registry(bc.FULL, ["bf16"])
    sv = bc.select(reg, "serving")
    assert [c.name for c in sv] == ["serving-fwd-M64-4096x6144-a64-r16-slices4096_1024_1024-bf16",
                                    "serving-fwd-M8192-4096x6144-a16-r16-slices4096_1024_1024-bf16"]
    assert sv[0].goals == ("S1", "S2") and sv[1].goals == ("S3",)
    assert sv[0].adapter_ids() == list(range(64)) and sorted(set(sv[1].adapter_ids())) == list(range(16))
    assert all("serving" in c.groups and "multi" not in c.groups and "headline" in c.groups for c in sv)
    assert not set(bc.select(reg, "multi")) & set(sv)
    small = bc.select(bc.registry(bc.CPU_SMALL, ["fp32"]), "serving")
    assert [(c.M, c.K, c.N, c.slices) for c in small] == [(64, 512, 768, (512, 128, 128)),
                                                           (512, 512, 768, (512, 128, 128))]
    assert small[0].full_shape == (64, 4096, 6144)
    # the byte floor: every adapter's A [3, 16, 4096] and B [6144, 16] once, x read, y read + written
    f, nbytes = sv[0].flops_bytes()
    assert nbytes == 2 * (64 * (3 * 16 * 4096 + 6144 * 16) + 64 * 4096 + 2 * 64 * 6144)
    assert f == 2 * 64 * 4096 * 16 * 3 + 2 * 64 * 6144 * 16
    assert [p for p in bp.ALL_PROVIDERS if bp.applies(p, sv[0])] == ["base", "packed", "three-calls", "vllm",
                                                                        "sglang", "engine", "engine-sglang"]
    assert not bp.applies("fused", sv[0]) and not bp.applies("packed", bc.Case("fwd", M=4, K=8, N=8, r=2))


def _tiny_serving(M=7, adapters=5, slices=(32, 8, 16)):
    return bc.Case("fwd", M=M, K=48, N=sum(slices), r=4, dtype="fp32", adapters=adapters, slices=slices)


@pytest.mark.parametrize("M,adapters", [(7, 5), (1, 3), (24, 4)])
@pytest.mark.parametrize("provider", ["base", "packed", "three-calls", "vllm", "sglang", "engine", "engine-sglang"])
def test_serving_providers_match_float64(provider, M, adapters):
    """Every serving provider against a float64 loop written here (row t: y0 + s B_i[slice j]
    A_i[j] x per slice, i its adapter); unequal slice widths; the Triton delta kernels through
    the interpreter. The delta lands in the provider's own y, in place."""
    from bench.runner import Runner, Settings
    case = _tiny_serving(M, adapters)
    runner = Runner(Settings(device=torch.device("cpu"), quick=True))
    sets = runner.inputs(case, n_sets=2)
    st = sets[0]
    L = st.layers[0]
    x = st.x.double()
    if provider == "base":
        ref = x @ L.W.double().T
    else:
        ref = L.y0.double().clone()
        for t, i in enumerate(case.adapter_ids()):
            start = 0
            for j, w in enumerate(case.slices):
                shrink = L.A[i, j].double() @ x[t]
                ref[t, start:start + w] += case.scaling * (L.B[i, start:start + w].double() @ shrink)
                start += w
    y0 = L.y0.clone()
    prep = runner.prepare(case, provider, sets)
    b = prep.bounds[0]
    assert b.graph == (provider in ("base", "packed", "three-calls"))
    (y,) = b.run()
    assert _rel(y, ref) < 1e-6
    assert torch.equal(L.y0, y0)  # the set's y0 is never written: each provider adds into its copy
    if provider != "base":
        assert _rel(y, y0) > 0.05
        (y2,) = b.run()  # in place: the same tensor, the delta added again
        assert y2 is y and _rel(y2 - y0.double(), 2 * (ref - y0.double())) < 1e-6
    err = runner.check(case, runner.prepare(case, provider, sets), st)
    assert err is not None and err < 1e-6
    prep.close()


def test_serving_run_case_rows(monkeypatch):
    from bench.runner import Runner, Settings
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    case = _tiny_serving()
    runner = Runner(Settings(device=torch.device("cpu"), quick=True, cpu_budget_s=0.005))
    rows = runner.run_case(case, list(bp.ALL_PROVIDERS))
    assert [r["provider"] for r in rows] == ["base", "packed", "three-calls", "vllm", "sglang", "engine",
                                             "engine-sglang"]
    for r in rows:
        assert r["status"] == "ok", r.get("reason")
        assert r["median_ms"] > 0 and r["check_relerr"] < 1e-6


def test_serving_goal_evaluation():
    head = bc.select(bc.registry(bc.FULL, ["bf16"]), "headline")
    (dec,) = [c for c in head if "S1" in c.goals]
    (pre,) = [c for c in head if "S3" in c.goals]
    rows = [_row(dec, "packed", median_ms=0.011, byte_floor_ms=0.010, bytes=dec.flops_bytes()[1]),
            _row(dec, "three-calls", median_ms=0.020), _row(dec, "vllm", median_ms=0.05),
            _row(pre, "base", median_ms=1.0), _row(pre, "packed", median_ms=0.09)]
    res = {g["id"]: g for g in bg.evaluate(rows, head, gpu=True) if g["id"] in SERVING_GOALS}
    assert abs(res["S1"]["value"] - 1.1) < 1e-9 and res["S1"]["result"] == "PASS"
    assert "byte floor" in res["S1"]["note"]
    assert abs(res["S2"]["value"] - 20 / 11) < 1e-12 and res["S2"]["result"] == "PASS"
    assert abs(res["S3"]["value"] - 0.09) < 1e-12 and res["S3"]["result"] == "FAIL"
    no_floor = [dict(r, byte_floor_ms=None) for r in rows]
    cpu = {g["id"]: g for g in bg.evaluate(no_floor, head, gpu=False) if g["id"] in SERVING_GOALS}
    assert cpu["S1"]["result"] == "n/a" and "byte floor" in cpu["S1"]["note"]
    assert cpu["S2"]["result"] == "PASS*" and cpu["S3"]["result"] == "FAIL*"


def test_cli_dora_and_serving_groups(tmp_path):
    """``python -m bench --cases dora,serving --quick``: every provider runs and is checked
    against float64; D3 is a real CPU measurement (not starred), the others starred, D4 n/a."""
    pytest.importorskip("peft")
    out = tmp_path / "out"
    args = ["-m", "bench", "--cases", "dora,serving", "--quick", "--out", str(out), "--no-plots"]
    if torch.cuda.is_available():
        args.append("--cpu")
    proc = _run(args)
    goals_part = proc.stdout[proc.stdout.index("\nGOALS"):]
    for gid in DORA_GOALS + SERVING_GOALS:
        assert f"\n{gid} " in goals_part
    assert "DoRA cases (bench/providers/dora.py)" in proc.stdout
    assert "serving cases (bench/providers/serving.py)" in proc.stdout
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    want = {"dora-fwdbwd-M512-512x512-r16-fp32": ["base", "fused", "fused-lora", "peft-dora"],
            "dora-fwdbwd-M256-1024x1024-r16-fp32": ["base", "fused", "fused-lora", "peft-dora"],
            "serving-fwd-M64-512x768-a64-r16-slices512_128_128-fp32": ["base", "packed", "three-calls", "vllm",
                                                                        "sglang", "engine", "engine-sglang"],
            "serving-fwd-M512-512x768-a16-r16-slices512_128_128-fp32": ["base", "packed", "three-calls", "vllm",
                                                                         "sglang", "engine", "engine-sglang"]}
    assert {c: [r["provider"] for r in rows if r["case"] == c] for c in want} == want
    for r in rows:
        assert r["status"] == "ok", (r["case"], r["provider"], r.get("reason"))
        assert r["check_relerr"] is not None and r["check_relerr"] < 1e-5
    by_id = {g["id"]: g for g in data["goals"]}
    assert by_id["D3"]["value"] > 0 and by_id["D3"]["result"] in ("PASS", "FAIL") and by_id["D3"]["gpu_measurement"]
    for gid in ("D1", "D2", "S1", "S2", "S3"):
        assert by_id[gid]["value"] > 0 and by_id[gid]["result"] in ("PASS*", "FAIL*"), by_id[gid]
    assert by_id["D4"]["result"] == "n/a"
