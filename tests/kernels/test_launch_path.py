"""Every kernel family through Triton's compiled launch path, without a GPU (tests/launch_path.py).

The launchers of kernels/*.py call ``JITFunction.run`` themselves; the interpreter runs the
kernels as Python and the ahead-of-time compiles (tests/kernels/test_gpu_compile.py) never launch,
so a binding error (two arguments swapped, a stride of the wrong tensor, a bad grid) would
first show on a GPU. Each case here runs a launcher under a fake H100 driver: Triton binds,
specialises and compiles a real sm_90 cubin, and the launch reaching the driver is checked
against the kernel's PTX entry and the case's contract, then again from Triton's cache and
in the public ``kernel[grid](**by_name)`` form. The cases run in a child process that imports
Triton for GPUs (a TRITON_INTERPRET=1 run imported it for the interpreter here).

``python -m tests.launch_path`` prints every case with its compile and cached times.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
import gpu_compile as gpuc  # noqa: E402
import launch_path as lp  # noqa: E402

TOOLS, WHY_NOT = gpuc.nvidia_tools()
needs_nvidia_tools = pytest.mark.skipif(TOOLS is None, reason=f"cannot compile for NVIDIA GPUs here: {WHY_NOT}")
CASES = lp.cases()


def run(case_id: str, plant=None) -> lp.Report:
    return gpuc.call_in_gpu_child(lp.run_case, case_id, plant)


@needs_nvidia_tools
@pytest.mark.parametrize("case_id", [pytest.param(c.id, marks=[pytest.mark.slow] if c.slow else [])
                                     for c in CASES.values()])
def test_launch_reaches_the_driver_as_its_contract_says(case_id):
    report = run(case_id)
    assert not report.problems, f"{case_id}:\n  " + "\n  ".join(report.problems)


def test_cases_cover_every_kernel_and_every_config():
    """Every ``*_kernel`` of every kernels/*.py family is launched by a case of the default run, and
    every config a table offers is: each (strategy, config) the measured choice may time, each
    multi-adapter and delta regime, each DoRA norm block."""
    families = {p.stem for p in gpuc.KERNELS_DIR.glob("*.py")} - {"__init__", "common", "host"}  # host: no kernel
    assert set(lp.KERNEL_MODULES) == families
    kernels = {name for module in lp.KERNEL_MODULES for name, value in vars(gpuc.load_kernel_module(module)).items()
               if name.endswith("_kernel") and hasattr(value, "run")}
    default = [c for c in CASES.values() if not c.slow]
    assert {k for c in default for k in c.kernels} == kernels

    single = gpuc.load_kernels()
    ids = set(CASES)
    for regime in ("decode", "prefill"):
        M = lp.ROWS[regime]
        assert single.regime(M) == regime
        for dropout, tag in ((False, "plain"), (True, "dropout")):
            for what, candidates in (("forward", single.forward_candidates), ("backward", single.backward_candidates)):
                offered = candidates(M, lp.RANK, dropout)
                assert {strategy for strategy, _ in offered} >= ({"fused", "composite"} if what == "backward" else
                                                                 {"shrink_first", "composite"})
                for strategy, config in offered:
                    assert f"{what}-{regime}-{tag}-{strategy}-{config}" in ids
    every_candidate = {c for names in single.CANDIDATE_CONFIGS.values() for c in names}
    assert every_candidate <= {case_id.split("-")[4] for case_id in ids if case_id.startswith(("forward", "backward"))}
    assert any(case_id.startswith("backward") and single.grad_ds_db_config(lp.WIDE_RANK) == "grad_ds_db_wide_rank"
               for case_id in ids if f"rank{lp.WIDE_RANK}" in case_id)
    for regime in gpuc.load_multi_kernels().MULTI_CONFIGS:
        assert {f"multi-{regime}-forward", f"multi-{regime}-backward"} <= ids
    for regime in gpuc.load_kernel_module("lora_delta").DELTA_CONFIGS:
        assert f"add_lora-{regime}-padded" in ids
    moe = gpuc.load_kernel_module("moe_lora")
    for regime in moe.MOE_CONFIGS:
        for what in ("forward", "backward", "linear"):
            assert {f"moe-{regime}-{what}-{strategy}" for strategy in moe.GROUPED_STRATEGIES} <= ids
    dora = gpuc.load_kernel_module("dora")
    norm_ranks = {int(case_id.removeprefix("dora-norm-rank")) for case_id in ids if case_id.startswith("dora-norm")}
    assert {dora.padded_rank(r) for r in norm_ranks} == set(dora.NORM_BLOCKS)


@needs_nvidia_tools
@pytest.mark.parametrize("case_id, kernel, first, second", [
    ("forward-prefill-plain-fused-gemm_prefill", "lora_gemm_kernel", "x_ptr", "w_ptr"),
    ("forward-prefill-plain-fused-gemm_prefill", "lora_gemm_kernel", "stride_xm", "stride_wn"),
    ("multi-decode-backward", "multi_lora_segment_grad_kernel", "seg_start_ptr", "seg_len_ptr"),
    ("moe-prefill-backward-fused", "moe_lora_segment_grad_kernel", "stride_or", "stride_op"),
])
def test_a_swapped_pair_of_arguments_is_caught(case_id, kernel, first, second):
    """The harness itself: a launch with two arguments of one type exchanged (the binding bug it is
    for) fails, naming them."""
    assert not run(case_id).problems
    problems = run(case_id, (kernel, first, second)).problems
    assert any(p.startswith(f"{kernel} (launch") and f"{first}:" in p for p in problems), problems
    assert any(f"{second}:" in p for p in problems), problems
