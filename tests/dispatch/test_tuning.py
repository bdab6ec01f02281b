"""lora_fused.dispatch.tuning: the measured choice, its bucket key and its JSON cache.

The timer is injected (``tuning.timer``): a fake that returns a fixed time per
candidate and records what it was asked to time, so the selection logic is
tested without a GPU (``tuning._measurable_device`` is patched to accept CPU
tensors). Restart and concurrency tests run real child processes.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lora_fused as lf
from lora_fused.dispatch import tuning

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A fresh cache directory and nothing loaded from before; measuring allowed on CPU."""
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(tuning.AUTOTUNE_ENV, raising=False)
    monkeypatch.setattr(tuning, "_measurable_device", lambda x: True)
    tuning.reset()
    yield tmp_path
    tuning.reset()


class FakeTimer:
    """ms per (strategy, config); candidates not listed take 1.0 ms. Records every call."""

    def __init__(self, times=None, fail=()):
        self.times, self.fail, self.calls = dict(times or {}), set(fail), []

    def __call__(self, run):
        self.calls.append(run.candidate)
        if run.candidate in self.fail:
            raise RuntimeError("out of resources")
        return self.times.get(run.candidate, 1.0)


def problem(M=37, K=45, N=51, r=5):
    return torch.zeros(M, K), torch.zeros(N, K), torch.zeros(r, K)


def test_fastest_candidate_wins_and_every_candidate_is_timed(monkeypatch):
    x, w, a = problem()
    cands = tuning.candidates("forward", 37, 5, False)
    assert {s for s, _ in cands} == {"fused", "shrink_first", "composite"}
    winner = cands[-2]
    timer = FakeTimer({winner: 0.5, cands[0]: 0.7})
    monkeypatch.setattr(tuning, "timer", timer)
    assert tuning.choose("forward", x, w, a, 0.0) == winner
    assert timer.calls == cands


def test_backward_with_dropout_times_its_own_candidates(monkeypatch):
    x, w, a = problem(M=70)
    cands = tuning.candidates("backward", 70, 5, True)
    assert {s for s, _ in cands} == {"fused", "composite"}
    timer = FakeTimer({cands[-1]: 0.1})
    monkeypatch.setattr(tuning, "timer", timer)
    assert tuning.choose("backward", x, w, a, 0.1) == cands[-1]
    assert timer.calls == cands


def test_the_timed_runs_compute(monkeypatch):
    """The runs handed to the timer really launch the op (a real timer calls them)."""
    x, w, a = problem(M=5, K=19, N=21, r=3)
    results = []
    monkeypatch.setattr(tuning, "timer", lambda run: (results.append(run()), 1.0)[1])
    tuning.choose("forward", x, w, a, 0.25)
    tuning.choose("backward", x, w, a, 0.25)
    assert results and all(isinstance(out, tuple) for out in results)
    y, shrink = results[0]
    assert y.shape == (5, 21) and shrink.shape == (5, 3) and torch.isfinite(y).all()


def test_cached_choice_is_reused_without_timing(monkeypatch, cache_dir):
    x, w, a = problem(M=37)
    timer = FakeTimer()
    monkeypatch.setattr(tuning, "timer", timer)
    first = tuning.choose("forward", x, w, a, 0.0)
    n = len(timer.calls)
    x60 = torch.zeros(60, 45)  # 37 and 60 share the bucket M <= 64
    assert tuning.choose("forward", x60, w, a, 0.0) == first and len(timer.calls) == n
    assert tuning.choose("forward", torch.zeros(65, 45), w, a, 0.0) and len(timer.calls) > n  # next bucket


def test_failing_candidate_is_skipped_with_a_warning(monkeypatch):
    x, w, a = problem()
    cands = tuning.candidates("forward", 37, 5, False)
    monkeypatch.setattr(tuning, "timer", FakeTimer({cands[0]: 0.01}, fail={cands[0]}))
    with pytest.warns(RuntimeWarning, match="failed while timing"):
        assert tuning.choose("forward", x, w, a, 0.0) != cands[0]


def test_nothing_is_timed_while_compiling(monkeypatch):
    x, w, a = problem()
    timer = FakeTimer()
    monkeypatch.setattr(tuning, "timer", timer)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tuning.choose("forward", x, w, a, 0.0) == tuning.heuristic("forward", x)
    assert timer.calls == [] and not tuning.cache_path().exists()


def test_nothing_is_timed_while_capturing(monkeypatch):
    x, w, a = problem()
    timer = FakeTimer()
    monkeypatch.setattr(tuning, "timer", timer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tuning.choose("backward", x, w, a, 0.1) == tuning.heuristic("backward", x)
    assert timer.calls == [] and not tuning.cache_path().exists()


def test_cached_choice_is_used_while_compiling(monkeypatch):
    x, w, a = problem()
    cands = tuning.candidates("forward", 37, 5, False)
    monkeypatch.setattr(tuning, "timer", FakeTimer({cands[1]: 0.1}))
    assert tuning.choose("forward", x, w, a, 0.0) == cands[1]
    timer = FakeTimer()
    monkeypatch.setattr(tuning, "timer", timer)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tuning.choose("forward", x, w, a, 0.0) == cands[1] and timer.calls == []


def test_autotune_off_gives_the_heuristic(monkeypatch):
    x, w, a = problem()
    timer = FakeTimer()
    monkeypatch.setattr(tuning, "timer", timer)
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    assert tuning.choose("forward", x, w, a, 0.0) == ("fused", None)  # CPU: the interpreter's Triton GEMMs
    assert timer.calls == []


def test_heuristic_table():
    cuda = SimpleNamespace(device=torch.device("cuda"))
    cpu = SimpleNamespace(device=torch.device("cpu"))
    assert tuning.heuristic("forward", cuda) == ("composite", None)
    assert tuning.heuristic("backward", cuda) == ("composite", None)
    assert tuning.heuristic("forward", cpu) == ("fused", None)
    assert tuning.heuristic("backward", cpu) == ("fused", None)


def test_the_heuristic_names_a_strategy_the_kernels_run_as_their_default():
    """One source of the default: the heuristic names a strategy off CUDA, and the kernels'
    launchers run the same one when called without a strategy (their argument default)."""
    from lora_fused.kernels import lora_linear as kernels
    cpu = SimpleNamespace(device=torch.device("cpu"))
    for M, r, dropout in ((1, 5, False), (70, 5, True), (70, 40, False)):
        strategy = tuning.heuristic("forward", cpu)[0]
        assert kernels.resolve_forward(strategy, M, r, dropout) == kernels.resolve_forward(None, M, r, dropout)
    assert kernels.resolve_backward(tuning.heuristic("backward", cpu)[0]) == kernels.resolve_backward(None)


def test_multi_lora_is_not_an_op_of_the_measured_choice():
    """The multi-adapter regime is the segment plan's (forced by use_strategy(multi_lora=...)):
    choose refuses the op rather than answer for something nothing reads."""
    x, w, a = problem()
    with pytest.raises(ValueError, match=r"op must be one of \('forward', 'backward'\)"):
        tuning.choose("multi_lora", x, w, a[None], 0.0)


def test_forced_strategy_is_not_timed(monkeypatch):
    x, w, a = problem()
    timer = FakeTimer()
    monkeypatch.setattr(tuning, "timer", timer)
    with lf.use_strategy(forward="composite", backward="fused"):
        assert tuning.choose("forward", x, w, a, 0.0) == ("composite", None)
        assert tuning.choose("backward", x, w, a, 0.0) == ("fused", None)
    assert timer.calls == []


def test_bucket_key():
    x, w, a = problem(M=37, K=45, N=51, r=5)
    assert tuning.bucket("forward", x, w, 5, False) == ("cpu", "float32", "forward", 64, 51, 45, 16, 0)
    assert tuning.bucket("backward", torch.zeros(1, 45, dtype=torch.float16), w, 33, True) == (
        "cpu", "float16", "backward", 1, 51, 45, 64, 1)
    assert tuning.bucket("forward", torch.zeros(4097, 45), w, 16, False)[3] == 8192


def test_cache_file_is_versioned_json(monkeypatch):
    x, w, a = problem()
    monkeypatch.setattr(tuning, "timer", FakeTimer())
    choice = tuning.choose("forward", x, w, a, 0.0)
    data = json.loads(tuning.cache_path().read_text())
    assert data["format"] == tuning.FORMAT
    assert data["versions"] == {"torch": torch.__version__, "triton": __import__("triton").__version__}
    assert data["entries"] == {"cpu|float32|forward|64|51|45|16|0": {
        "strategy": choice[0], "config": choice[1], "ms": 1.0}}


def test_cache_survives_a_reload(monkeypatch):
    x, w, a = problem()
    cands = tuning.candidates("forward", 37, 5, False)
    monkeypatch.setattr(tuning, "timer", FakeTimer({cands[2]: 0.1}))
    assert tuning.choose("forward", x, w, a, 0.0) == cands[2]
    tuning.reset()  # what a restarted process has in memory: nothing
    timer = FakeTimer()
    monkeypatch.setattr(tuning, "timer", timer)
    assert tuning.choose("forward", x, w, a, 0.0) == cands[2] and timer.calls == []


def _child(code: str, cache_dir: Path) -> subprocess.Popen:
    env = {**__import__("os").environ, tuning.CACHE_DIR_ENV: str(cache_dir)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cache_survives_a_restart(monkeypatch, cache_dir):
    x, w, a = problem()
    cands = tuning.candidates("backward", 37, 5, False)
    monkeypatch.setattr(tuning, "timer", FakeTimer({cands[-1]: 0.1}))
    assert tuning.choose("backward", x, w, a, 0.0) == cands[-1]
    child = _child("""
        import torch
        from lora_fused.dispatch import tuning
        tuning.timer = None  # a timing would fail: the choice must come from the file
        x, w, a = torch.zeros(37, 45), torch.zeros(51, 45), torch.zeros(5, 45)
        print(tuning.cached(tuning.bucket("backward", x, w, 5, False)))
    """, cache_dir)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.strip() == repr(cands[-1])


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "versions": {"torch": "0.0"},
                                                              "entries": {}}), json.dumps([1, 2])],
                         ids=["corrupt", "foreign-versions", "not-a-cache"])
def test_corrupt_or_foreign_cache_is_ignored_with_one_warning(monkeypatch, content):
    path = tuning.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    x, w, a = problem()
    timer = FakeTimer()
    monkeypatch.setattr(tuning, "timer", timer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = tuning.choose("forward", x, w, a, 0.0)
        tuning.choose("backward", x, w, a, 0.0)
        tuning.choose("forward", torch.zeros(300, 45), w, a, 0.0)
    ours = [c for c in caught if "strategy cache" in str(c.message)]
    assert len(ours) == 1, [str(c.message) for c in caught]
    assert timer.calls  # nothing was taken from the bad file
    data = json.loads(path.read_text())  # the next write replaced it with a valid cache
    assert data["entries"]["cpu|float32|forward|64|51|45|16|0"]["strategy"] == first[0]
    assert len(data["entries"]) == 3


def test_concurrent_writers_leave_a_valid_file_with_every_entry(cache_dir):
    """Two processes write 25 entries each at the same time (read, merge, rename under a
    lock): the file is valid JSON at the end and holds all 50."""
    code = """
        import sys
        from lora_fused.dispatch import tuning
        who = sys.argv[1] if len(sys.argv) > 1 else "{who}"
        for i in range(25):
            tuning.remember(("gpu", "bfloat16", "forward", 2 ** (i % 12), 4096 + i, 4096, 16, 0) if who == "a"
                            else ("gpu", "bfloat16", "backward", 2 ** (i % 12), 4096 + i, 4096, 16, 1),
                            ("composite", "expand_add"), 0.5)
        print("done")
    """
    children = [_child(code.format(who=who), cache_dir) for who in ("a", "b")]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0 and out.strip() == "done", err
    entries = tuning.read_file(tuning.cache_path())
    assert len(entries) == 50
    assert {k.split("|")[2] for k in entries} == {"forward", "backward"}
    assert not list(cache_dir.glob("*.tmp"))  # no temporary file left behind


def test_tune_fills_the_cache_ahead_of_time(monkeypatch):
    """``python -m bench --tune``'s worker: every (layer, tokens, op) is measured once and
    cached; a second pass times nothing."""
    monkeypatch.setattr(tuning, "timer", FakeTimer())
    shapes = (("q", 21, 19), ("down", 19, 33))
    rows = tuning.tune(shapes, tokens=(1, 70), rank=3, dtype=torch.float32, device="cpu")
    assert [(name, M, op) for name, M, *_, op, _, _ in rows] == [
        (name, M, op) for name, _, _ in shapes for M in (1, 70) for op in ("forward", "backward")]
    assert len(tuning.read_file(tuning.cache_path())) == 8
    timer = FakeTimer()
    monkeypatch.setattr(tuning, "timer", timer)
    tuning.reset()
    assert tuning.tune(shapes, tokens=(1, 70), rank=3, dtype=torch.float32, device="cpu") == rows
    assert timer.calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_measurement_on_a_gpu(monkeypatch):
    """On CUDA with triton.testing.do_bench: every candidate runs, the winner is one of them
    and is cached; the op then runs it and matches the reference."""
    monkeypatch.setattr(tuning, "_measurable_device", lambda x: x.device.type == "cuda")
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(384, 256, device="cuda", dtype=torch.bfloat16) / 16
    a = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16) / 16
    b = torch.randn(384, 16, device="cuda", dtype=torch.bfloat16) / 4
    for op in ("forward", "backward"):
        choice = tuning.choose(op, x, w, a, 0.1)
        assert choice in tuning.candidates(op, 300, 16, True)
    assert len(tuning.read_file(tuning.cache_path())) == 2
    y = lf.lora_linear(x, w, a, b, 0.5)
    ref = lf.lora_linear_reference(x.double(), w.double(), a.double(), b.double(), 0.5)
    assert ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2


# ------------------------------------------------------------------ launchers by call signature


def _operands(M=13, K=45, N=51, r=5, seed=0, transposed_x=False):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = rand(K, M).t() if transposed_x else rand(M, K)
    return x, rand(N, K), rand(N), rand(r, K), rand(N, r)


def test_cached_launchers_compute_what_the_uncached_launchers_do(monkeypatch):
    """The launcher kept for a call signature is reused (one entry per signature) and gives,
    bit for bit, what kernels.lora_forward / lora_backward give when built for the call."""
    from lora_fused.kernels import lora_linear as kernels
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    for transposed_x in (False, True):  # a column-major x is another signature (its strides)
        x, w, b, a, bb = _operands(transposed_x=transposed_x)
        gy, s = torch.randn(13, 51), torch.randn(13, 5)
        seed = torch.tensor([7])
        for p, sd in ((0.0, None), (0.25, seed)):
            before = len(tuning._launchers)
            for _ in range(2):
                y, S = tuning.triton_forward(x, w, b, a, bb, 1.5, p, sd)
                grads = tuning.triton_backward(gy, x, w, a, bb, s, 1.5, p, sd, True, True)
            assert len(tuning._launchers) == before + 2  # one forward, one backward signature
            y0, S0 = kernels.lora_forward(x, w, b, a, bb, 1.5, p, sd)
            assert torch.equal(y, y0) and torch.equal(S, S0)
            for g, g0 in zip(grads, kernels.lora_backward(gy, x, w, a, bb, s, 1.5, p, sd, True, True)):
                assert torch.equal(g, g0)
    ref = x.double() @ w.double().t() + b.double() + 1.5 * (x.double() @ a.double().t()) @ bb.double().t()
    y, _ = tuning.triton_forward(x, w, b, a, bb, 1.5, 0.0, None)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_a_forced_strategy_gets_its_own_launcher(monkeypatch):
    from lora_fused.kernels.common import LAUNCH_COUNTS
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    x, w, b, a, bb = _operands()
    y_auto, _ = tuning.triton_forward(x, w, b, a, bb, 1.5, 0.0, None)
    LAUNCH_COUNTS.clear()
    with lf.use_strategy(forward="composite"):
        y, _ = tuning.triton_forward(x, w, b, a, bb, 1.5, 0.0, None)
    assert LAUNCH_COUNTS["lora_expand_add_kernel"] == 1 and LAUNCH_COUNTS["lora_gemm_kernel"] == 0
    assert len(tuning._launchers) == 2
    assert ((y - y_auto).norm() / y_auto.norm()).item() < 1e-5


def test_a_choice_for_this_call_only_is_not_kept(monkeypatch):
    """While compiling, the heuristic stands in for a measurement this time only: its launcher
    is not kept, so a later eager call measures. reset() forgets the launchers."""
    monkeypatch.setattr(tuning, "timer", FakeTimer())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, w, b, a, bb = _operands()
    tuning.triton_forward(x, w, b, a, bb, 1.5, 0.0, None)
    assert tuning._launchers == {}
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    tuning.triton_forward(x, w, b, a, bb, 1.5, 0.0, None)
    assert len(tuning._launchers) == 1
    tuning.reset()
    assert tuning._launchers == {}


def test_kernel_facts_have_one_home():
    """The strategies' names, the padded rank, "dropout on" and the launcher caches' bound are
    the kernels' (kernels/host.py, kernels/common.py, kernels/lora_linear.py); lora_fused uses
    those, with no copy of its own."""
    from lora_fused.dispatch import strategies
    from lora_fused.kernels import common, dora, lora_linear, multi_lora
    assert strategies.FORWARD_STRATEGIES is lora_linear.FORWARD_STRATEGIES
    assert strategies.BACKWARD_STRATEGIES is lora_linear.BACKWARD_STRATEGIES
    assert lora_linear.padded_rank is dora.padded_rank is common.padded_rank
    assert multi_lora.keep_launcher is common.keep_launcher
    for copy in ("padded_rank", "_dropout_on", "LAUNCHERS_MAX", "_keep"):
        assert not hasattr(tuning, copy), copy
    assert not hasattr(lora_linear, "_dropout_on") and not hasattr(multi_lora, "LAUNCHERS_MAX")


def test_launcher_caches_are_bounded(monkeypatch):
    from lora_fused.kernels import common
    monkeypatch.setattr(common, "LAUNCHERS_MAX", 2)
    cache = {}
    for key in range(3):
        assert common.keep_launcher(cache, key, str(key)) == str(key)
    assert cache == {2: "2"}  # full at 2: emptied, then the third kept


# ------------------------------------------------------------ grouped expert LoRA ("grouped_lora")
def grouped_problem(P=37, E=3, K=40, N=24, r=5):
    """x of P sorted pairs, weight [E, N, K], lora_A [E, r, K]: widths the vendor GEMM takes (CPU fp32)."""
    return P, torch.zeros(P, K), torch.zeros(E, N, K), torch.zeros(E, r, K)


def test_grouped_fastest_strategy_wins_and_is_cached(monkeypatch, cache_dir):
    P, x, w, a = grouped_problem()
    assert lf.dispatch.backend.moe_kernels().grouped_candidates(x, w) == ["fused", "grouped_mm"]
    timer = FakeTimer({("grouped_mm", None): 0.5})
    monkeypatch.setattr(tuning, "timer", timer)
    assert tuning.choose_grouped(P, x, w, a, 0.0) == "grouped_mm"
    assert timer.calls == [("fused", None), ("grouped_mm", None)]
    assert tuning.choose_grouped(60, x, w, a, 0.0) == "grouped_mm" and len(timer.calls) == 2  # same bucket
    entries = json.loads(tuning.cache_path().read_text())["entries"]
    assert entries == {"cpu|float32|grouped_lora|64|3|24|40|16|0": {"strategy": "grouped_mm", "config": None,
                                                                     "ms": 0.5}}
    tuning.reset()  # a new process reads the file: nothing timed
    assert tuning.choose_grouped(P, x, w, a, 0.0) == "grouped_mm" and len(timer.calls) == 2


def test_grouped_timed_runs_compute_a_training_step(monkeypatch):
    P, x, w, a = grouped_problem(P=9, E=2)
    results = []
    monkeypatch.setattr(tuning, "timer", lambda run: (results.append(run()), 1.0)[1])
    tuning.choose_grouped(P, x, w, a, 0.25)
    assert len(results) == 2
    for dx, dA, dB in results:
        assert dx.shape == (9, 40) and dA.shape == (2, 5, 40) and dB.shape == (2, 24, 5)
        assert torch.isfinite(dx).all() and torch.isfinite(dA).all() and torch.isfinite(dB).all()


def test_grouped_single_candidate_is_not_timed(monkeypatch):
    """Widths the vendor GEMM refuses (K = 13 fp32: 52-byte rows) leave "fused" alone: nothing to time."""
    P, x, w, a = grouped_problem(K=13)
    timer = FakeTimer()
    monkeypatch.setattr(tuning, "timer", timer)
    assert tuning.choose_grouped(P, x, w, a, 0.0) == "fused" and timer.calls == []


def test_grouped_forced_heuristic_and_tracing(monkeypatch):
    P, x, w, a = grouped_problem()
    timer = FakeTimer({("grouped_mm", None): 0.5})
    monkeypatch.setattr(tuning, "timer", timer)
    with lf.use_strategy(grouped="fused"):
        assert tuning.choose_grouped(P, x, w, a, 0.0) == "fused"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tuning.choose_grouped(P, x, w, a, 0.0) == tuning.grouped_heuristic(x, w) == "fused"  # CPU heuristic
    assert timer.calls == [] and not tuning.cache_path().exists()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    assert tuning.choose_grouped(P, x, w, a, 0.0) == "fused" and timer.calls == []
