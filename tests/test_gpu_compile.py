"""Every CONFIGS entry (kernels/lora_linear.py) and both MULTI_CONFIGS regimes
(kernels/multi_lora.py) compile for sm_90 (H100/H200) and sm_80 (A100), fit in
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
run in a child process that imports Triton for GPUs. 104 + 72 multi-adapter
cases (3 regimes x 6 launches x bf16/fp16 x sm_90/sm_80, r_max 64: other r_max
compile the same kernels).
The table of registers, shared memory, spills and MMA counts:
``python -m tests.gpu_compile [--filter multi]``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_compile as gpuc  # noqa: E402

TOOLS, WHY_NOT = gpuc.nvidia_tools()
pytestmark = pytest.mark.skipif(TOOLS is None, reason=f"cannot compile for NVIDIA GPUs here: {WHY_NOT}")
KERNELS = gpuc.load_kernels() if TOOLS is not None else None
MULTI = gpuc.load_multi_kernels() if TOOLS is not None else None
CASES = gpuc.all_cases(KERNELS, multi=MULTI) if KERNELS is not None else []

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_compiles_fits_uses_tensor_cores_no_spills(case):
    r = gpuc.compile_case_anywhere(case)
    problems = gpuc.check(case, r)
    assert not problems, (f"{case.id} ({r.kernel} {r.variant}, BR={r.BR}, num_warps={r.num_warps}, "
                          f"num_stages={r.num_stages}, {r.registers} registers): " + "; ".join(problems))


def test_every_config_is_compiled():
    assert {c.config for c in CASES if not c.multi} == set(KERNELS.CONFIGS)
    assert {c.config.removeprefix("multi_") for c in CASES if c.multi} == set(MULTI.MULTI_CONFIGS)
    launches = {w for whats in gpuc.MULTI_LAUNCHES.values() for w in whats}
    for regime in MULTI.MULTI_CONFIGS:
        assert {c.what for c in CASES if c.config == f"multi_{regime}"} == launches, regime
