"""The benchmark's MoE cases (bench/providers/moe.py; M1-M3, goals M-GPU, M-speed-CPU, M-memory) on CPU.

* The registry: the realistic block on CUDA, scaled on a CPU; the CPU goals' block never scaled;
  FLOP and byte counts written out.
* Every provider (base, fused, eager-loop, peft-moe) against a float64 oracle written out here:
  outputs, and in training the gradients of x and of every LoRA factor; the LoRA term matters.
* ``Runner.run_case`` over the registered (scaled) M1-M3 cases, end to end with the harness's
  own checks; the CPU goals' case timed in interleaved rounds; the goals' evaluation.
* The allocation counter (``measure.AllocationCounter``) on known allocations, and goal
  M-memory's bound at its fixed shape (fused allocates at most half of PEFT's bytes per step).

Speed is not asserted here: the benchmark measures it.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import cases as bc  # noqa: E402
from bench import goals as bg  # noqa: E402
from bench import measure  # noqa: E402
from bench import providers as bp  # noqa: E402
from bench.runner import Runner, Settings  # noqa: E402
from test_bench import _have, _row  # noqa: E402  (pytest puts tests/ on sys.path)

pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")

MOE_GOALS = ["M-GPU", "M-speed-CPU", "M-memory"]
MiB = 2 ** 20


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _tiny(mode="fwdbwd", T=24, **kw) -> bc.Case:
    args = dict(M=T, K=32, N=16, r=4, dtype="fp32", experts=6, top_k=2)
    args.update(kw)
    return bc.Case(mode, **args)


def _runner(**kw) -> Runner:
    return Runner(Settings(device=torch.device("cpu"), quick=True, **kw))


# --------------------------------------------------------------------------
# Registry and counts
# --------------------------------------------------------------------------
def test_moe_cases_registered():
    reg = bc.registry(bc.FULL, ["bf16"])
    moe = bc.select(reg, "moe")
    assert [c.name for c in moe] == ["moe-fwdbwd-M4096-2048x768-e128k8-r16-bf16",
                                     "moe-fwdbwd-M512-512x256-e64k8-r16-bf16",
                                     "moe-fwd-M64-2048x768-e128k8-r16-bf16",
                                     "moe-fwd-M4096-2048x768-e128k8-r16-bf16"]
    assert [c.goals for c in moe] == [("M-GPU",), ("M-speed-CPU", "M-memory"), (), ()]
    assert [bc.select(reg, tag) for tag in ("M1", "M2", "M3")] == [moe[:2], [moe[2]], [moe[3]]]
    assert all("headline" in c.groups and not c.multi and c.top_k == 8 for c in moe)
    assert {bc.select(reg, g)[0].name for g in MOE_GOALS} == {moe[0].name, moe[1].name}
    # on a CPU the realistic block shrinks (experts too); the CPU goals' block stays as it is
    small = bc.select(bc.registry(bc.CPU_SMALL, ["fp32"]), "moe")
    assert [(c.M, c.K, c.N, c.experts, c.dtype) for c in small] == [
        (512, 256, 96, 16, "fp32"), (512, 512, 256, 64, "fp32"), (64, 256, 96, 16, "fp32"),
        (512, 256, 96, 16, "fp32")]
    assert small[1].full_shape is None and small[0].full_shape == (4096, 2048, 768)
    assert [p for p in bp.ALL_PROVIDERS if bp.applies(p, moe[0])] == ["base", "fused", "eager-loop", "peft-moe"]
    assert not bp.applies("eager-loop", bc.Case("fwd", M=4, K=8, N=8, r=2))


def test_moe_flop_and_byte_counts():
    """P = T k pairs, 3HI base MACs and r(3H + 3I) LoRA MACs per pair; bytes as the docstring of
    bench.cases.moe_flops_bytes counts them."""
    T, H, I, E, k, r, es = 5, 8, 4, 3, 2, 2, 2
    P = T * k
    fwd = bc.Case("fwd", M=T, K=H, N=I, r=r, dtype="bf16", experts=E, top_k=k).flops_bytes()
    train = bc.Case("fwdbwd", M=T, K=H, N=I, r=r, dtype="bf16", experts=E, top_k=k).flops_bytes()
    base, lora = 2 * P * 3 * H * I, 2 * P * r * (3 * H + 3 * I)
    assert fwd[0] == base + lora and train[0] == 2 * base + 3 * lora
    weights, factors, pairs = 3 * E * H * I, E * r * (3 * H + 3 * I), P * (2 * I + I + H)
    assert fwd[1] == es * (2 * T * H + weights + factors + pairs)
    assert train[1] == fwd[1] + es * (2 * T * H + weights + 3 * factors + 2 * pairs)


# --------------------------------------------------------------------------
# Providers against float64
# --------------------------------------------------------------------------
def _oracle(case: bc.Case, st, provider: str):
    """float64 block written out pair by pair: y_t = sum_j w_tj (silu(g) * u) W2_e^T + LoRA terms,
    [g | u] = x_t W1_e^T + s (x_t A1_e^T) B1_e^T; returns (y, [x, A1, B1, A2, B2] leaves)."""
    (L1, L2), s = st.layers, case.scaling
    x = st.x.detach().double().requires_grad_()
    A1, B1, A2, B2 = (t.detach().double().requires_grad_() for t in (L1.A, L1.B, L2.A, L2.B))
    lora = provider != "base"
    rows = []
    for t in range(case.M):
        y_t = 0
        for j in range(case.top_k):
            e, w = int(st.top_k_index[t, j]), st.top_k_weights[t, j].double()
            h = L1.W[e].double() @ x[t] + (s * B1[e] @ (A1[e] @ x[t]) if lora else 0)
            a = F.silu(h[:case.N]) * h[case.N:]
            d = L2.W[e].double() @ a + (s * B2[e] @ (A2[e] @ a) if lora else 0)
            y_t = y_t + w * d
        rows.append(y_t)
    return torch.stack(rows), ([x, A1, B1, A2, B2] if lora else [x])


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", ["base", "fused", "eager-loop", "peft-moe"])
def test_moe_providers_match_float64(provider, mode, monkeypatch):
    """Each provider's y (and in training dX, dA1, dB1, dA2, dB2) against the pair-by-pair float64
    oracle; the harness's own reference (bench/providers/moe.py) agrees with it; a LoRA provider's
    output is not the base block's."""
    if provider == "peft-moe":
        pytest.importorskip("peft")
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    case = _tiny(mode)
    runner = _runner()
    sets = runner.inputs(case, n_sets=2)
    st = sets[0]
    ref, leaves = _oracle(case, st, provider)
    assert _rel(bp.reference_outputs(case, st, provider)[0], ref) < 1e-12
    prep = runner.prepare(case, provider, sets)
    b = prep.bounds[0]
    if mode == "fwd":
        with torch.no_grad():
            (y,) = b.run()
        assert _rel(y, ref) < 1e-5
        if provider != "base":
            assert _rel(y, _oracle(case, st, "base")[0]) > 0.05  # the LoRA term is there
        assert runner.check(case, prep, st) < 1e-5
        return
    (y,) = b.run()
    assert _rel(y, ref) < 1e-5
    torch.autograd.backward([y], b.dy)
    ref.backward(st.dy[0].double())
    got = b.grads()
    assert len(got) == len(leaves) == (1 if provider == "base" else 5)
    for g, w in zip(got, leaves):
        assert _rel(g, w.grad) < 1e-5
    for ours, theirs in zip(bp.reference_grads(case, st, provider), leaves):
        assert _rel(ours, theirs.grad) < 1e-12
    for t in prep.grad_to_none:
        t.grad = None
    assert runner.check(case, prep, st) < 1e-5
    prep.close()


def test_moe_fused_provider_never_forms_an_expert_delta(monkeypatch):
    """The fused provider's training step makes no tensor of one expert's out x in elements or
    more beyond the block's own [T, 2I] / [P, 2I] activations (PEFT's makes [E, out, in])."""
    pytest.importorskip("peft")
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    case = _tiny(T=3, K=64, N=32, experts=4)   # P = 6 pairs: activations far below out x in = 4096
    runner = _runner()
    sets = runner.inputs(case, n_sets=1)
    sizes = {}
    for p in ("fused", "peft-moe"):
        b = runner.prepare(case, p, sets).bounds[0]
        seen = []

        class Largest(measure.AllocationCounter):   # the elements of every new (counted) tensor
            def _count(self, t, inputs):
                before = self.tensors
                super()._count(t, inputs)
                if self.tensors > before:
                    seen.append(t.numel())
        with Largest():
            torch.autograd.backward(b.run(), b.dy)
        sizes[p] = max(seen)
    one_expert = 2 * case.N * case.K   # gate_up's out x in
    assert sizes["fused"] < one_expert <= sizes["peft-moe"]


# --------------------------------------------------------------------------
# The runner, end to end
# --------------------------------------------------------------------------
def test_moe_run_case_registered_cases(monkeypatch):
    """run_case over the registered (scaled) M1-M3: a checked, timed row per provider; training
    rows carry the saved and allocated bytes."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    runner = _runner(cpu_budget_s=0.005)
    small = [c for c in bc.select(bc.registry(bc.CPU_SMALL, ["fp32"]), "moe") if "M-speed-CPU" not in c.goals]
    names = ["base", "fused", "eager-loop"] + (["peft-moe"] if _have("peft") else [])
    for case in small:
        rows = runner.run_case(case, names + ["eager", "packed"])
        assert [r["provider"] for r in rows] == names
        for r in rows:
            assert r["status"] == "ok", (case.name, r["provider"], r.get("reason"))
            assert r["median_ms"] > 0 and r["check_relerr"] < 1e-5 and r["flops"] > 0
            assert r["method"].startswith("perf_counter")
            if case.training:
                assert r["saved_bytes"] > 0 and r["alloc_bytes"] >= r["alloc_peak_bytes"] > 0
            else:
                assert "alloc_bytes" not in r


def test_moe_cpu_goal_case_is_timed_in_interleaved_rounds(monkeypatch):
    """A case that feeds a CPU goal is timed in interleaved rounds on a CPU, every provider in
    every round, with the per-round ratios; other MoE cases, and any on CUDA, are not."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    runner = _runner(goal_rounds=3)
    case = _tiny(goals=("M-speed-CPU", "M-memory"))
    assert runner.interleaved(case) and not runner.interleaved(_tiny())
    on_cuda = _runner()
    on_cuda.s = Settings(device=torch.device("cuda"))
    assert not on_cuda.interleaved(case)
    rows = runner.run_case(case, ["base", "fused", "eager-loop"])
    for r in rows:
        assert r["status"] == "ok" and r["method"] == "interleaved 3 rounds" and r["check_relerr"] < 1e-5
        assert set(r["paired"]) == {"base", "fused", "eager-loop"} - {r["provider"]}
    assert {r["provider"] for r in rows} == {"base", "fused", "eager-loop"}


def test_moe_goal_evaluation():
    head = bc.select(bc.registry(bc.FULL, ["bf16"]), "headline")
    (m1,) = [c for c in head if "M-GPU" in c.goals]
    (cpu_case,) = [c for c in head if "M-speed-CPU" in c.goals]
    rows = [_row(m1, "base", median_ms=10.0), _row(m1, "fused", median_ms=11.0),
            _row(m1, "peft-moe", median_ms=30.0),
            _row(cpu_case, "fused", median_ms=100.0, alloc_bytes=100 * MiB, alloc_peak_bytes=30 * MiB,
                 saved_bytes=20 * MiB),
            _row(cpu_case, "peft-moe", median_ms=250.0, alloc_bytes=400 * MiB, alloc_peak_bytes=160 * MiB,
                 saved_bytes=120 * MiB, paired={"fused": 2.4})]
    gpu = {g["id"]: g for g in bg.evaluate(rows, head, gpu=True) if g["id"] in MOE_GOALS}
    assert abs(gpu["M-GPU"]["value"] - 1.1) < 1e-12 and gpu["M-GPU"]["result"] == "PASS"
    for gid in ("M-speed-CPU", "M-memory"):  # CPU goals: n/a on a GPU run
        assert gpu[gid]["result"] == "n/a" and f"--cases {gid}" in gpu[gid]["note"]
    cpu = {g["id"]: g for g in bg.evaluate(rows, head, gpu=False) if g["id"] in MOE_GOALS}
    assert cpu["M-GPU"]["result"] == "PASS*" and not cpu["M-GPU"]["gpu_measurement"]
    assert cpu["M-speed-CPU"]["value"] == 2.5 and cpu["M-speed-CPU"]["result"] == "PASS"
    assert cpu["M-speed-CPU"]["gpu_measurement"] and "per-round ratio 2.40" in cpu["M-speed-CPU"]["note"]
    assert cpu["M-memory"]["value"] == 0.25 and cpu["M-memory"]["result"] == "PASS"
    note = cpu["M-memory"]["note"]
    assert "fused 100.0 MiB (peak 30.0, saved for backward 20.0)" in note and "peft-moe 400.0 MiB" in note
    slow = [dict(r, median_ms=200.0) if r["case"] == cpu_case.name and r["provider"] == "fused" else r
            for r in rows]
    assert [g["id"] for g in bg.failed(bg.evaluate(slow, head, gpu=False))] == ["M-speed-CPU"]  # 1.25 < 1.5
    nopeft = {g["id"]: g for g in bg.evaluate([r for r in rows if r["provider"] != "peft-moe"], head, gpu=False)
              if g["id"] in MOE_GOALS}
    assert all(nopeft[g]["result"] == "n/a" and "peft-moe not run" in nopeft[g]["note"]
               for g in ("M-speed-CPU", "M-memory"))
    empty = {g["id"]: g for g in bg.evaluate([], [], gpu=False) if g["id"] in MOE_GOALS}
    assert all(g["result"] == "n/a" and "--cases moe" in g["note"] for g in empty.values())


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------
def test_allocation_counter_counts_new_storages_once():
    """New tensors count their storage's bytes; views, in-place and out= results nothing; the
    peak follows frees; backward ops are counted too."""
    with measure.AllocationCounter() as c:
        a = torch.empty(1000)                     # 4000 B
        view = a[10:]
        a.add_(1)
        b = a + 1                                 # 4000 B
        ones = torch.ones(2, 2)                   # 16 B
        torch.mm(ones, ones, out=torch.empty(2, 2))   # the empty: 16 B; the out= result: nothing
        del b                                     # live: a, ones, the empty's storage freed
        d = a * 2                                 # 4000 B
    assert (c.bytes, c.tensors) == (12032, 5)
    assert c.peak == 8032 and c.result().peak_bytes == 8032   # a, b, ones, empty alive together
    del view, d
    x = torch.randn(100, 50, requires_grad=True)
    w = torch.randn(50, 20)
    got = measure.allocated_bytes(lambda: (x @ w).sum().backward(), grad_to_none=[x])
    # forward: x @ w [100, 20] and its sum; backward: the sum's ones, dX [100, 50]
    assert got.bytes == 4 * (100 * 20 + 1 + 1 + 100 * 50) and got.tensors == 4
    assert x.grad is None


def test_moe_memory_goal_bound_at_its_shape(monkeypatch):
    """Goal M-memory at its fixed shape (E 64, H 512, I 256, r 16, 512 tokens top-8, fp32): one
    training step of fused allocates at most half of PEFT's bytes, and saves less for backward."""
    pytest.importorskip("peft")
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    (case,) = [c for c in bc.select(bc.registry(bc.CPU_SMALL, ["fp32"]), "M-memory")]
    assert (case.M, case.K, case.N, case.experts, case.top_k, case.r) == (512, 512, 256, 64, 8, 16)
    runner = _runner()
    sets = runner.inputs(case, n_sets=1)
    got = {}
    for p in ("fused", "peft-moe"):
        prep = runner.prepare(case, p, sets)
        b = prep.bounds[0]
        saved = measure.saved_bytes(b.run, measure.storage_ptrs(b.params), cuda=False)
        got[p] = (measure.allocated_bytes(prep.fn, grad_to_none=prep.grad_to_none), saved.bytes)
        prep.close()
    (fused, fused_saved), (peft, peft_saved) = got["fused"], got["peft-moe"]
    assert fused.bytes <= 0.5 * peft.bytes, (fused, peft)
    assert fused_saved < peft_saved and fused.peak_bytes < peft.peak_bytes
