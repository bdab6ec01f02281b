"""The benchmark harness (bench/) on CPU: no timing assertions, only that it runs and reports.

* ``python -m bench --quick --out DIR`` (a subprocess, as a person runs it): exit 0, the
  JSON / markdown / PNG files, every goal id P1..P7 in the goals table, the CPU note, and
  the multi-adapter goals n/a until ``lf.multi_lora_linear`` exists.
* ``pytest bench/ --benchmark-only`` with one round per benchmark: the pytest-benchmark
  tests run, grouped by case.
* The case registry, selection syntax, goal evaluation and FLOP counts, in process.

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
from bench import report  # noqa: E402

GOAL_IDS = ["P1", "P2", "P3", "P4", "P5", "P6", "P7"]


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
    for gid in ("P5", "P6", "P7"):
        if not hasattr(__import__("lora_fused"), "multi_lora_linear"):
            assert by_id[gid]["result"] == "n/a" and "multi_lora_linear not built yet" in by_id[gid]["note"]
    assert by_id["P4"]["value"] is not None and by_id["P4"]["value"] > 0  # a real measurement on CPU
    meta = data["meta"]
    assert meta["gpu_measurement"] is False and meta["command"].startswith("python -m bench")
    rows = data["rows"]
    modes = {r["mode"] for r in rows if r["status"] == "ok"}
    assert {"fwd", "bwd", "fwdbwd", "saved"} <= modes
    providers = {r["provider"] for r in rows}
    assert {"base", "fused", "eager", "merged", "peft-mixed", "loop"} <= providers
    for r in rows:
        for key in ("gpu", "torch", "triton", "config", "flops", "bytes", "status"):
            assert key in r, f"row {r['case']}/{r['provider']} lacks {key}"
        assert r["status"] in ("ok", "n/a"), (r["case"], r["provider"], r.get("reason"))
        if r["status"] == "ok" and r["mode"] != "saved":
            assert r["median_ms"] > 0 and r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
            assert r["check_relerr"] is None or r["check_relerr"] < 1e-4
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
    assert p5.multi and p5.M == 64 and p5.adapters == 64 and "P6" in p5.goals
    p7 = next(c for c in head if "P7" in c.goals)
    assert p7.M == 8192 and p7.adapters == 16
    assert "sweep" in p1.groups  # the headline cases are part of the sweep grid


def test_sweep_grid_and_selection():
    reg = bc.registry(bc.FULL, ["bf16", "fp16"])
    sweep = [c for c in bc.select(reg, "sweep") if c.dtype == "bf16"]
    by_mode = {m: sum(1 for c in sweep if c.mode == m and not c.multi) for m in bc.MODES}
    assert by_mode == {"fwd": 60, "bwd": 120, "fwdbwd": 120, "saved": 24}
    multi = [c for c in sweep if c.multi]
    assert {c.adapters for c in multi} == {1, 16, 64} and any(len(set(c.ranks)) > 1 for c in multi)
    assert {(c.K, c.N) for c in sweep} == set(bc.LLAMA7B_SHAPES)
    decode = bc.select(reg, "sweep+decode")
    assert decode and all(c.M <= 64 for c in decode)
    no_multi = bc.select(reg, "sweep,-multi")
    assert no_multi and not any(c.multi for c in no_multi)
    assert [c.name for c in bc.select(reg, "fwd-M8192-4096x4096-r16-bf16")] == ["fwd-M8192-4096x4096-r16-bf16"]
    assert bc.select(reg, "-multi") == [c for c in bc.select(reg, "headline") if not c.multi]
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
    for c in get["P5"] + get["P7"]:
        rows += [_row(c, p, status="n/a", reason=bg.MULTI_NA) for p in ("base", "fused", "loop", "peft-mixed")]
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
    for gid in ("P5", "P6", "P7"):
        assert res[gid][0]["result"] == "n/a" and res[gid][0]["note"] == bg.MULTI_NA
    assert bg.failed(lines) == [res["P2"][0]] + res["P3b"]

    cpu = bg.evaluate(rows, head, gpu=False)
    assert next(g for g in cpu if g["id"] == "P1")["result"] == "PASS*"
    assert next(g for g in cpu if g["id"] == "P4")["result"] == "PASS"  # bytes: a real measurement
    assert bg.failed(cpu) == []  # CPU timings never fail a run

    empty = bg.evaluate([], [], gpu=True)
    assert [g["id"] for g in empty] == ["P1", "P2", "P3", "P3b", "P4", "P5", "P6", "P7"]
    assert all(g["result"] == "n/a" for g in empty)
    text = report.render(report.goal_lines(lines))
    assert all(f"\n{gid} " in text for gid in GOAL_IDS)


def test_cpu_provider_defaults():
    from bench.__main__ import resolve_providers
    run, not_run, _ = resolve_providers("", "auto", torch.device("cpu"))
    assert {"base", "fused", "eager", "merged"} <= set(run)
    assert "peft" in not_run and "compiled" in not_run
    run, not_run, _ = resolve_providers("fused,base", "off", torch.device("cpu"))
    assert run == ["base", "fused"] and not not_run
    run, _, _ = resolve_providers("-merged", "off", torch.device("cpu"))
    assert "merged" not in run and "peft" not in run
