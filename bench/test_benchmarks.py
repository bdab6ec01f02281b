"""pytest-benchmark tests: the layer's cases, one benchmark group per case.

    pytest bench/ --benchmark-only                              # the 'pytest' case group
    LF_BENCH_CASES=headline pytest bench/ --benchmark-only      # any --cases selection
    LF_BENCH_PROVIDERS=fused,base pytest bench/ --benchmark-only --benchmark-autosave
    pytest-benchmark compare 0001 0002 --group-by=group         # compare saved runs

Each benchmark is one call of a provider on the next of several rotated random
input sets, the device synchronized inside the timed callable; the first call
(compilation, autotuning) happens before the timing. Environment:
LF_BENCH_CASES (default ``pytest``: P1, P2 at M=16, P3 without dropout, a
backward-alone case and the multi-adapter decode of P5/P6), LF_BENCH_PROVIDERS
(default: every provider on a GPU; base, fused, eager, merged, loop on a CPU),
LF_BENCH_DTYPE (bf16 on a GPU, fp32 on a CPU). Saved-bytes cases are not timed
here (``python -m bench`` reports them); a provider n/a for a case (PEFT's mixed
batch in training) is skipped with its reason.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.cases import CPU_SMALL, FULL, registry, select
from bench.providers import ALL_PROVIDERS, applies, compile_status, peft_status, provider_unavailable
from bench.runner import Runner, Settings, device_name, versions

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = os.environ.get("LF_BENCH_DTYPE") or ("bf16" if CUDA else "fp32")
CASES = [c for c in select(registry(FULL if CUDA else CPU_SMALL, [DTYPE]),
                           os.environ.get("LF_BENCH_CASES", "pytest")) if c.timed]
_default = ALL_PROVIDERS if CUDA else ("base", "fused", "eager", "merged", "loop")
PROVIDERS = [p.strip() for p in os.environ.get("LF_BENCH_PROVIDERS", ",".join(_default)).split(",") if p.strip()]
PARAMS = [pytest.param(c, p, id=f"{c.name}-{p}") for c in CASES for p in PROVIDERS if applies(p, c)]


@pytest.fixture(scope="module")
def runner():
    return Runner(Settings(device=DEVICE, quick=not CUDA, check=False))


_unavailable: dict = {}


def _why_not(provider: str):
    if provider not in _unavailable:
        why = None
        if provider in ("peft", "peft-mixed"):
            why, _ = peft_status()
        elif provider == "compiled":
            why = compile_status(DEVICE)
        _unavailable[provider] = why
    return _unavailable[provider]


@pytest.mark.parametrize("case, provider", PARAMS)
def test_layer(benchmark, runner, case, provider):
    why = provider_unavailable(provider, case) or _why_not(provider)
    if why:
        pytest.skip(why)
    sets = runner.inputs(case)
    prep = runner.prepare(case, provider, sets)
    try:
        fn = prep.synced()
        fn()  # compile / autotune / allocator warm-up outside the timing
        benchmark.group = case.name
        flops, nbytes = case.flops_bytes()
        benchmark.extra_info.update(case=case.name, provider=provider, mode=case.mode, M=case.M, K=case.K,
                                    N=case.N, r=case.r, dtype=case.dtype, dropout=case.dropout,
                                    flops=flops, bytes=nbytes, n_sets=len(sets), gpu=device_name(DEVICE),
                                    gpu_measurement=CUDA, **versions())
        benchmark(fn)
    finally:
        prep.close()
        del sets
        if CUDA:
            torch.cuda.empty_cache()
