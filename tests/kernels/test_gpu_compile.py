"""Every CONFIGS entry (kernels/lora_linear.py), both MULTI_CONFIGS regimes
(kernels/multi_lora.py) and both MOE_CONFIGS regimes (kernels/moe_lora.py: every launch of both
strategies, gpu_compile.moe_cases) compile for sm_90 (H100/H200) and sm_80 (A100), fit in
shared memory, use tensor cores and do not spill — checked without a GPU.

The interpreter shows none of this: it runs the kernels on NumPy, so register
spills, the shared-memory limit (~227 KB per block on Hopper, ~163 KB on A100),
tensor-core instructions and tl.dot's minimum block size of 16 never arise. Each case calls a launcher of kernels/lora_linear.py on meta tensors of
a Llama-7B shape, records the kernel launch, compiles it ahead of time with
``triton.compile`` and reads ``ptxas -v`` and the SASS (tests/gpu_compile.py).
A multi-adapter case (``multi_<regime>-<launch>-...``) is one launch of
multi_lora_forward (shrink, expand) or multi_lora_backward (ds_shrink, grad_b,
grad_a, dx_expand) over 16 adapters of the same shape.
Under TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA) the compiles
run in a child process that imports Triton for GPUs. 106 + 68 candidate-config
cases (the measured choice's configs, each launch it is offered for, bf16, at its
largest offered rank: gpu_compile.candidate_cases) + 72 multi-adapter cases
(3 regimes x 6 launches x bf16/fp16 x sm_90/sm_80, r_max 64: other r_max compile
the same kernels).
The table of registers, shared memory, spills and MMA counts:
``python -m tests.gpu_compile [--filter multi]``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
import gpu_compile as gpuc  # noqa: E402

TOOLS, WHY_NOT = gpuc.nvidia_tools()
# Loading the kernel modules for GPUs and listing the cases needs no NVIDIA tools:
# the coverage test below runs everywhere, the compiles only where the tools are.
KERNELS = gpuc.load_kernels()
MULTI = gpuc.load_multi_kernels()
CASES = gpuc.all_cases(KERNELS, multi=MULTI)


@pytest.mark.skipif(TOOLS is None, reason=f"cannot compile for NVIDIA GPUs here: {WHY_NOT}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_compiles_fits_uses_tensor_cores_no_spills(case):
    r = gpuc.compile_case_anywhere(case)
    problems = gpuc.check(case, r)
    assert not problems, (f"{case.id} ({r.kernel} {r.variant}, BR={r.BR}, num_warps={r.num_warps}, "
                          f"num_stages={r.num_stages}, {r.registers} registers): " + "; ".join(problems))


def test_cases_cover_every_config_key_and_both_sides_of_every_threshold():
    """Every key of both config tables is compiled (the interpreter tables have the same
    keys), every multi-adapter launch of every regime, and each rank or row threshold
    beside a table has a compiled case at it and one past it."""
    assert {c.config for c in CASES if not c.multi} == set(KERNELS.CONFIGS) == set(KERNELS.INTERPRETER_CONFIGS)
    multi_regimes = {c.config.removeprefix("multi_") for c in CASES if c.multi}
    assert multi_regimes == set(MULTI.MULTI_CONFIGS) == set(MULTI.INTERPRETER_MULTI_CONFIGS)
    launches = {w for whats in gpuc.MULTI_LAUNCHES.values() for w in whats}
    for regime in MULTI.MULTI_CONFIGS:
        assert {c.what for c in CASES if c.config == f"multi_{regime}"} == launches, regime

    def padded_ranks(**match):
        return {KERNELS.padded_rank(c.rank) for c in CASES
                if all(getattr(c, k) == v for k, v in match.items())}

    fused_max = KERNELS.FUSED_SHRINK_MAX_RANK
    fwd = padded_ranks(what="fwd")
    assert fused_max in fwd and max(fwd) > fused_max, fwd
    wide_max = KERNELS.GRAD_DS_DB_WIDE_TILE_MAX_RANK
    assert wide_max in padded_ranks(what="grad_ds_db", config="grad_ds_db")
    assert min(padded_ranks(what="grad_ds_db", config="grad_ds_db_wide_rank")) == 2 * wide_max
    assert gpuc.M_ROWS["gemm_decode"] <= KERNELS.DECODE_MAX_ROWS < gpuc.M_ROWS["gemm_prefill"]
    assert gpuc.M_ROWS["multi_decode"] <= MULTI.MULTI_DECODE_MAX_ROWS < gpuc.M_ROWS["multi_prefill"]


def test_every_candidate_config_is_compiled_in_every_launch_it_is_offered_for():
    """The measured choice (lora_fused.dispatch.tuning) may run any CANDIDATE_CONFIGS entry at any
    padded rank up to its max_rank: each is compiled at that rank in that launch."""
    whats = {"gemm_fused": {"fwd"}, "gemm": {"fwd_dropout", "dx"}, "gemm_dropout_dx": {"dx_dropout"},
             "expand_add": {"expand", "dx_expand_dropout"}}
    assert {launch for launch, _ in KERNELS.CANDIDATE_CONFIGS} == set(whats)
    for (launch, _), names in KERNELS.CANDIDATE_CONFIGS.items():
        for name in names:
            for what in whats[launch]:
                top = KERNELS.CONFIGS[name].max_rank
                top = min(top, KERNELS.FUSED_SHRINK_MAX_RANK) if what == "fwd" else top
                for arch in gpuc.TARGETS:
                    assert any(c.config == name and c.what == what and c.arch == arch
                               and KERNELS.padded_rank(c.rank) >= top for c in CASES), (name, what, arch)


QLORA_CASES = gpuc.qlora_cases()


@pytest.mark.skipif(TOOLS is None, reason=f"cannot compile for NVIDIA GPUs here: {WHY_NOT}")
@pytest.mark.parametrize("case", QLORA_CASES, ids=lambda c: c.id)
def test_qlora_kernels_compile_without_spills(case):
    """kernels/dequant4bit.py (dequantize, plain and nested; fused decode GEMV + LoRA) as launched:
    with enable_fp_fusion=False, fits in shared memory, no spills, the decode kernel on tensor cores."""
    r = gpuc.compile_case_anywhere(case)
    problems = gpuc.check(case, r)
    assert not problems, f"{case.id} ({r.kernel}, {r.registers} registers): " + "; ".join(problems)


DORA_CASES = gpuc.dora_cases()


@pytest.mark.skipif(TOOLS is None, reason=f"cannot compile for NVIDIA GPUs here: {WHY_NOT}")
@pytest.mark.parametrize("case", DORA_CASES, ids=lambda c: c.id)
def test_dora_kernels_compile_without_spills(case):
    """kernels/dora.py as launched (the norm kernel at every NORM_BLOCKS rank, the elementwise
    epilogues): fits in shared memory, no spills, the norm's W0·Aᵀ on tensor cores."""
    r = gpuc.compile_case_anywhere(case)
    problems = gpuc.check(case, r)
    assert not problems, f"{case.id} ({r.kernel}, {r.registers} registers): " + "; ".join(problems)


def test_dora_cases_cover_every_norm_rank_block():
    ranks = {c.rank for c in DORA_CASES if c.config == "dora_norm"}
    assert ranks == set(gpuc.load_kernel_module("dora").NORM_BLOCKS)


DELTA_CASES = gpuc.delta_cases()


@pytest.mark.skipif(TOOLS is None, reason=f"cannot compile for NVIDIA GPUs here: {WHY_NOT}")
@pytest.mark.parametrize("case", DELTA_CASES, ids=lambda c: c.id)
def test_delta_kernels_compile_without_spills(case):
    """kernels/lora_delta.py as lf.add_lora launches it (packed q|k|v over 64 adapters, padded and
    compact layouts and address tables, every DELTA_CONFIGS regime): fits in shared memory, no spills,
    tensor cores."""
    r = gpuc.compile_case_anywhere(case)
    problems = gpuc.check(case, r)
    assert not problems, f"{case.id} ({r.kernel}, {r.registers} registers): " + "; ".join(problems)


def test_delta_cases_cover_every_regime_and_launch():
    regimes = {c.config.removeprefix("delta_") for c in DELTA_CASES}
    delta = gpuc.load_kernel_module("lora_delta")
    assert regimes == set(delta.DELTA_CONFIGS) == set(delta.INTERPRETER_DELTA_CONFIGS)
    assert {c.what for c in DELTA_CASES} == set(gpuc.DELTA_LAUNCHES)


MOE_CASES = gpuc.moe_cases()


@pytest.mark.skipif(TOOLS is None, reason=f"cannot compile for NVIDIA GPUs here: {WHY_NOT}")
@pytest.mark.parametrize("case", MOE_CASES, ids=lambda c: c.id)
def test_moe_kernels_compile_without_spills(case):
    """kernels/moe_lora.py as its launchers launch it (a Qwen3-MoE gate_up projection, 128 experts, top-2
    rows through the row table, dropout and bias; both strategies, every MOE_CONFIGS regime): fits in
    shared memory, no spills, tensor cores."""
    r = gpuc.compile_case_anywhere(case)
    problems = gpuc.check(case, r)
    assert not problems, f"{case.id} ({r.kernel}, {r.registers} registers): " + "; ".join(problems)


def test_moe_cases_cover_every_regime_and_launch():
    moe = gpuc.load_kernel_module("moe_lora")
    regimes = {c.config.removeprefix("moe_") for c in MOE_CASES}
    assert regimes == set(moe.MOE_CONFIGS) == set(moe.INTERPRETER_MOE_CONFIGS)
    launches = {w for whats in gpuc.MOE_LAUNCHES.values() for w in whats}
    for regime in moe.MOE_CONFIGS:
        assert {c.what for c in MOE_CASES if c.config == f"moe_{regime}"} == launches, regime
    # The regimes' rows sit on both sides of the threshold; the rank tiles are compiled at their cap.
    assert gpuc.DECODE_ROWS <= moe.MOE_DECODE_MAX_PAIRS < gpuc.PREFILL_ROWS
    assert max(c.rank for c in MOE_CASES) >= max(max(c.shrink_BR, c.grad_BR) for c in moe.MOE_CONFIGS.values())
