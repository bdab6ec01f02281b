"""Triton's compiled launch path, driven on a machine without a GPU.

The launchers of kernels/*.py call ``JITFunction.run`` (what ``kernel[grid](...)`` calls)
with their arguments in the kernels' parameter order. A binding error there (two
arguments swapped, a stride of the wrong tensor, a grid past CUDA's limits) passes the
interpreter tests, which run each kernel as a Python function, and the ahead-of-time
compiles (tests/gpu_compile.py), which compile from recorded arguments and never launch.

Here Triton's own runtime runs. A fake active driver (``triton.runtime.driver.set_active``)
reports an H100 (``GPUTarget("cuda", 90, 32)`` and its device properties), hands out dummy
module and function handles for the cubins, and its launcher records each launch instead
of calling the CUDA driver. So ``JITFunction.run(..., warmup=False)`` binds the arguments,
specialises them, compiles a real sm_90 cubin with the wheel's ptxas (or reads it from
Triton's cache) and reaches the launcher; no GPU memory is touched. The tensors are CPU
tensors: each has a real ``data_ptr()`` of its own (meta tensors all have 0), and the
launchers below lora_fused's backend choice take tensors of any device. Cases that go
through lora_fused (the plans and slice tables it builds for ``add_lora`` and the engines)
route CPU tensors to Triton with ``cpu_tensors_take_triton``.

Each case calls a launcher (or a lora_fused function above one) and states each launch's
contract: the tensor behind every pointer, every size, stride and scalar, the plan regions
and tables the kernel indexes, the grid. Every launch is checked for
- its arguments against the compiled kernel's PTX entry (number and types),
- the contract (pointers are the intended tensors' ``data_ptr()``, ...),
- a grid within CUDA's limits (x < 2^31, y and z < 65536) that covers the problem;
then the case runs again on new tensors (it must take Triton's in-memory cache: the same
compiled kernel, no compile), and each launch is replayed in the public form
``kernel[grid](**arguments_by_name, **options)`` (it must reach the same compiled kernel
with the same arguments).

The fake driver stays installed for the life of the process: run the cases in a process of
their own (tests/kernels/test_launch_path.py uses ``gpu_compile.call_in_gpu_child``), never in one
that launches on a real GPU.

    python -m tests.launch_path [--filter ID] [--plant KERNEL:ARG:ARG]   # every case, timed
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_compile as gpuc  # noqa: E402

#: kernels/<name>.py files whose ``*_kernel`` JIT functions the cases launch (all but common.py).
KERNEL_MODULES = ("lora_linear", "multi_lora", "lora_delta", "dequant4bit", "dora", "moe_lora")

# ----------------------------------------------------------------- the fake H100
#: What ``utils.get_device_properties`` reports (the fields Triton's NVIDIA driver reads);
#: shared memory is the per-block opt-in limit (tests/gpu_compile.py's TARGETS["sm_90"]).
H100_PROPERTIES = dict(max_shared_mem=gpuc.TARGETS["sm_90"]["shared_limit"], multiprocessor_count=132,
                       max_num_regs=65536, warpSize=32, sm_clock_rate=1_980_000, mem_clock_rate=2_619_000,
                       mem_bus_width=5120)
MAX_THREADS_PER_BLOCK = 1024
#: CUDA's grid limits: x < 2^31, y and z < 2^16.
GRID_LIMITS = (2**31 - 1, 65535, 65535)
#: Pointers Triton appends to a kernel's PTX parameters after its own arguments: the global
#: and the profile scratch buffers (triton/backends/nvidia/driver.py passes them to the launch).
SCRATCH_PARAMS = 2
#: PTX parameter type of each Triton argument type.
PTX_TYPES = {"i1": ".u8", "u1": ".u8", "i8": ".u8", "i32": ".u32", "u32": ".u32", "i64": ".u64", "u64": ".u64",
             "fp32": ".f32"}
_TRITON_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "i64": "int64", "i32": "int32",
                  "u8": "uint8", "i8": "int8"}


@dataclasses.dataclass
class Launch:
    """One launch as it reached the driver's launcher."""
    kernel: str
    grid: tuple[int, int, int]
    args: dict        # every parameter by name, in order, as the launcher received it
    signature: dict   # parameter -> its Triton type in this specialisation ("constexpr" for constants)
    function: int     # the handle load_binary gave the compiled kernel
    jit: Any = None           # the JITFunction (set by the run spy)
    options: dict = dataclasses.field(default_factory=dict)  # run's keywords that are not parameters
    compiled: Any = None      # the CompiledKernel ``run`` returned


#: Launches reach here; ``recording`` takes them.
_LAUNCHES: list[Launch] = []
#: Dummy handles given out by ``load_binary`` (one per compiled kernel loaded).
_LOADS: list[str] = []
#: (kernel name, parameter, parameter) whose arguments the run spy swaps (tests of the harness).
_PLANT: Optional[tuple[str, str, str]] = None


class _RecordingLauncher:
    """The driver's ``launcher_cls``: built once per compiled kernel, called per launch."""

    def __init__(self, src, metadata):
        self.src = src

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
                 enter_hook, exit_hook, *args):
        names = self.src.fn.arg_names
        if len(args) != len(names):
            raise TypeError(f"{self.src.fn.__name__}: the launcher got {len(args)} arguments for "
                            f"{len(names)} parameters")
        _LAUNCHES.append(Launch(self.src.fn.__name__, (grid_x, grid_y, grid_z), dict(zip(names, args)),
                                {name: self.src.signature[name] for name in names}, function))


class _FakeUtils:
    def get_device_properties(self, device):
        return dict(H100_PROPERTIES)

    def load_binary(self, name, kernel, shared, device):
        """(module, function, registers, spills, max threads per block): dummy handles."""
        _LOADS.append(name)
        return len(_LOADS), len(_LOADS), 0, 0, MAX_THREADS_PER_BLOCK

    def unload_module(self, module):
        pass


@functools.cache
def _fake_driver_class():
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class FakeH100Driver(DriverBase):
        """An active CUDA driver for device 0, an H100, whose launches are only recorded."""

        def __init__(self):
            self.utils = _FakeUtils()
            self.launcher_cls = _RecordingLauncher

        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            if device != 0:
                raise ValueError(f"the fake driver has device 0 only, got {device}")

        def get_current_stream(self, device):
            return 0

        def get_device_capability(self, device):
            return 9, 0

        def get_active_torch_device(self):
            import torch
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("the fake driver builds no C launcher")

        def get_benchmarker(self):
            raise NotImplementedError("nothing runs: nothing to time")

    return FakeH100Driver


def _spied_run(jit, run, *args, **kwargs):
    """``jit.run`` with its options and compiled kernel noted on the launch it makes."""
    if _PLANT is not None and _PLANT[0] == jit.fn.__name__:
        args, kwargs = _swapped(jit, args, kwargs, *_PLANT[1:])
    before = len(_LAUNCHES)
    compiled = run(*args, **kwargs)
    if len(_LAUNCHES) == before + 1:
        launch = _LAUNCHES[-1]
        names = set(jit.arg_names)
        launch.jit, launch.compiled = jit, compiled
        launch.options = {k: v for k, v in kwargs.items() if k not in names and k not in ("grid", "warmup")}
    return compiled


def _swapped(jit, args, kwargs, first: str, second: str):
    """The arguments with those of parameters ``first`` and ``second`` exchanged."""
    bound = dict(zip(jit.arg_names, args), **{k: v for k, v in kwargs.items() if k in jit.arg_names})
    bound[first], bound[second] = bound[second], bound[first]
    positional = tuple(bound[name] for name in jit.arg_names[:len(args)])
    return positional, {k: bound.get(k, v) for k, v in kwargs.items()}


@functools.cache
def install() -> None:
    """Make the fake H100 Triton's active driver in this process, and spy on every kernel's ``run``."""
    if not gpuc.triton_imported_for_gpu():
        raise RuntimeError("Triton was imported for the interpreter (TRITON_INTERPRET=1): nothing compiles here")
    from triton.runtime import driver
    driver.set_active(_fake_driver_class()())
    for jit in kernel_functions().values():
        jit.run = functools.partial(_spied_run, jit, jit.run)


def kernel_functions() -> dict:
    """Every ``*_kernel`` JIT function of KERNEL_MODULES (``lora_fused.kernels``), by name."""
    import importlib
    import triton
    out = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"lora_fused.kernels.{module_name}")
        out.update({name: fn for name, fn in vars(module).items()
                    if name.endswith("_kernel") and isinstance(fn, triton.runtime.JITFunction)})
    return out


@contextlib.contextmanager
def recording():
    """The launches made inside the block (the list is filled when the block ends)."""
    install()
    start = len(_LAUNCHES)
    taken: list[Launch] = []
    try:
        yield taken
    finally:
        taken.extend(_LAUNCHES[start:])
        del _LAUNCHES[start:]


@contextlib.contextmanager
def cpu_tensors_take_triton():
    """lora_fused's backend choice sends CPU tensors to the (compiled) Triton kernels: they stand
    in for CUDA tensors. Only cases that call lora_fused above the launchers need it."""
    from lora_fused.dispatch import backend
    select = backend._select
    backend._decisions.clear()
    backend._select = lambda forced, interpret, device_type, dtype: "triton"
    try:
        yield
    finally:
        backend._select = select
        backend._decisions.clear()


# ----------------------------------------------------------------- contracts
class _Any:
    def __repr__(self):
        return "ANY"


#: An argument the contract leaves open (a placeholder pointer for an operand the launch does not use).
ANY = _Any()


@dataclasses.dataclass(frozen=True)
class Slot:
    """A buffer the launcher allocates and the case never sees (dS, split partials): the same
    pointer wherever the name recurs in a case, and none of the case's named tensors."""
    name: str


@dataclasses.dataclass(frozen=True)
class Holds:
    """A tensor with these values (a copy lora_fused makes: a cast, a plan it builds)."""
    values: Any


@dataclasses.dataclass(frozen=True)
class OffsetsOf:
    """An int64 table of element offsets: ``base + table[j]`` is ``parts[j]`` (vLLM's slices)."""
    base: Any
    parts: tuple


@dataclasses.dataclass
class Expect:
    """The contract of one launch: ``args`` maps parameters to what each must be (a tensor: that
    tensor's data_ptr and dtype; a value; ANY, Slot, Holds, OffsetsOf); every parameter that is
    not a compile-time constant must be named. ``grid(args)`` is the grid the launch must have,
    or a problem string (``covers`` checks split grids)."""
    kernel: str
    args: dict
    grid: Callable[[dict, tuple], Optional[str]]


def operand(ptr: str, stride_names: tuple[str, ...], tensor, strides=None) -> dict:
    """``ptr`` -> tensor, and its stride parameters -> the strides of ``tensor`` (a view in the
    layout the kernel reads, e.g. ``weight.t()`` for a transposed read), or ``strides`` for a Slot.
    None: an operand the launch does not use (its pointer a placeholder): left open."""
    if tensor is None:
        return {ptr: ANY, **{name: ANY for name in stride_names}}
    values = tuple(tensor.stride()) if strides is None else tuple(strides)
    if len(values) != len(stride_names):
        raise ValueError(f"{ptr}: {len(values)} strides for {stride_names}")
    return {ptr: tensor, **dict(zip(stride_names, values))}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def exact(fn: Callable[[dict], tuple]) -> Callable[[dict, tuple], Optional[str]]:
    """A grid rule: the grid is ``fn(args)`` padded to three dimensions."""
    def rule(args, grid):
        want = tuple(fn(args))
        want += (1,) * (3 - len(want))
        return None if tuple(grid) == want else f"grid {tuple(grid)}, expected {want}"
    return rule


def covers(fixed: dict, split_axis: int, total: int, per_program: Callable[[dict], int]
           ) -> Callable[[dict, tuple], Optional[str]]:
    """A grid rule for a split launch: the axes in ``fixed`` (axis -> fn(args)) have those sizes,
    the other axes but ``split_axis`` size 1; the programs of ``split_axis`` each take
    ``per_program(args)`` of ``total``: all of it, and none of them nothing."""
    def rule(args, grid):
        problems = [f"grid[{axis}] = {grid[axis]}, expected {fixed[axis](args) if axis in fixed else 1}"
                    for axis in range(3) if axis != split_axis and grid[axis] != (fixed[axis](args) if axis in fixed
                                                                                   else 1)]
        splits, each = grid[split_axis], per_program(args)
        if not splits * each >= total > (splits - 1) * each:
            problems.append(f"grid[{split_axis}] = {splits} programs of {each} for {total}")
        return "; ".join(problems) or None
    return rule


def tiles_cover(count: str, block: str, total: int, rule) -> Callable[[dict, tuple], Optional[str]]:
    """``rule``, and the argument ``count`` tiles of the constexpr ``block`` cover ``total`` exactly."""
    def checked(args, grid):
        problems = [p for p in (rule(args, grid),) if p]
        if not args[count] * args[block] >= total > (args[count] - 1) * args[block]:
            problems.append(f"{count} = {args[count]} tiles of {block} = {args[block]} for {total}")
        return "; ".join(problems) or None
    return checked


# --- kernels/lora_linear.py
def gemm_contract(x, w, bias, a, l, r, out, seed, scaling, dropout_p, *, l_strides=None) -> Expect:
    """lora_gemm_kernel: OUT = X Wᵀ + b + s·L Rᵀ; X [M, K], W [N, K], A [R, K] (fused: the K loop
    writes L = X Aᵀ), L [M, R], R [N, R]; all given as the views the kernel reads."""
    M, K = x.shape
    N, R = w.shape[0], r.shape[1]
    args = {**operand("x_ptr", ("stride_xm", "stride_xk"), x), **operand("w_ptr", ("stride_wn", "stride_wk"), w),
            **operand("bias_ptr", ("stride_bias",), bias), **operand("a_ptr", ("stride_ar", "stride_ak"), a),
            **operand("l_ptr", ("stride_lm", "stride_lr"), l, l_strides),
            **operand("r_ptr", ("stride_rn", "stride_rr"), r), **operand("out_ptr", ("stride_om", "stride_on"), out),
            "seed_ptr": ANY if seed is None else seed, "M": M, "N": N, "K": K, "R": R,
            "scaling": scaling, "dropout_p": dropout_p, "HAS_BIAS": bias is not None, "FUSED_SHRINK": a is not None,
            "DROPOUT_ON_LORA_TERM": seed is not None}
    return Expect("lora_gemm_kernel", args, exact(lambda g: (cdiv(M, g["BM"]) * cdiv(N, g["BN"]),)))


def shrink_contract(x, a, s, seed, dropout_p) -> Expect:
    """lora_shrink_kernel: S [M, R] = drop(X) Aᵀ, X [M, K], A [R, K]."""
    M, K = x.shape
    args = {**operand("x_ptr", ("stride_xm", "stride_xk"), x), **operand("a_ptr", ("stride_ar", "stride_ak"), a),
            **operand("s_ptr", ("stride_sm", "stride_sr"), s), "seed_ptr": ANY if seed is None else seed,
            "M": M, "K": K, "R": a.shape[0], "dropout_p": dropout_p if seed is not None else 0.0,
            "HAS_DROPOUT": seed is not None}
    return Expect("lora_shrink_kernel", args, exact(lambda g: (cdiv(M, g["BM"]),)))


def expand_add_contract(out, l, r, seed, scaling, dropout_p, *, l_strides=None) -> Expect:
    """lora_expand_add_kernel: OUT [M, N] += s·L Rᵀ (⊙ keep/(1-p) with a seed), L [M, R], R [N, R]."""
    M, N = out.shape
    args = {**operand("out_ptr", ("stride_om", "stride_on"), out),
            **operand("l_ptr", ("stride_lm", "stride_lr"), l, l_strides),
            **operand("r_ptr", ("stride_rn", "stride_rr"), r), "seed_ptr": ANY if seed is None else seed,
            "M": M, "N": N, "R": r.shape[1], "scaling": scaling, "dropout_p": dropout_p if seed is not None else 0.0,
            "DROPOUT_ON_TERM": seed is not None}
    return Expect("lora_expand_add_kernel", args, exact(lambda g: (cdiv(M, g["BM"]) * cdiv(N, g["BN"]),)))


def grad_ds_db_contract(dy, b, s, ds: Slot, db_part: Slot, scaling) -> Expect:
    """lora_grad_ds_db_kernel: dS [M, R] = s·dY B (a new contiguous buffer), fp32 dB partials
    [splits, N, R] (contiguous) of s·dYᵀ S; dY [M, N], B [N, R], S [M, R]."""
    M, N = dy.shape
    R = b.shape[1]
    args = {**operand("dy_ptr", ("stride_dym", "stride_dyn"), dy), **operand("b_ptr", ("stride_bn", "stride_br"), b),
            **operand("s_ptr", ("stride_sm", "stride_sr"), s), **operand("ds_ptr", ("stride_dsm", "stride_dsr"), ds,
                                                                         (R, 1)),
            **operand("db_part_ptr", ("stride_dbp", "stride_dbn", "stride_dbr"), db_part, (N * R, R, 1)),
            "M": M, "N": N, "R": R, "scaling": scaling, "TILES_PER_PROGRAM": ANY, "COMPUTE_DB": True}
    return Expect("lora_grad_ds_db_kernel", args,
                  covers({}, 0, M, lambda g: g["TILES_PER_PROGRAM"] * g["BM"]))


def grad_a_contract(ds: Slot, x, da_part: Slot, seed, dropout_p, R: int) -> Expect:
    """lora_grad_a_kernel: fp32 dA partials [splits, R, K] (contiguous) of dSᵀ drop(X); dS [M, R]
    (the contiguous buffer grad_ds_db wrote), X [M, K]."""
    M, K = x.shape
    args = {**operand("ds_ptr", ("stride_dsm", "stride_dsr"), ds, (R, 1)),
            **operand("x_ptr", ("stride_xm", "stride_xk"), x),
            **operand("da_part_ptr", ("stride_dap", "stride_dar", "stride_dak"), da_part, (R * K, K, 1)),
            "seed_ptr": ANY if seed is None else seed, "M": M, "K": K, "R": R,
            "dropout_p": dropout_p if seed is not None else 0.0, "TILES_PER_PROGRAM": ANY,
            "HAS_DROPOUT": seed is not None}
    return Expect("lora_grad_a_kernel", args,
                  covers({0: lambda g: cdiv(K, g["BK"])}, 1, M, lambda g: g["TILES_PER_PROGRAM"] * g["BM"]))


# --- kernels/multi_lora.py and kernels/lora_delta.py: a segment plan's regions
def chunk_operands(plan, by_value: bool = False) -> dict:
    """The chunk regions of a SegmentPlan the shrink and expand kernels index (views of its
    packed buffer; ``by_value``: a plan lora_fused builds itself, checked by its values)."""
    regions = ("sorted_rows", "chunk_adapter", "chunk_start", "chunk_len")
    return {f"{name}_ptr": Holds(getattr(plan, name)) if by_value else getattr(plan, name) for name in regions}


def multi_shrink_contract(x, a, part, scale, ranks, plan, r_max: int) -> Expect:
    """multi_lora_shrink_kernel: fp32 split-K partials [splits, T, r_max] (contiguous) of
    scale_i · x A_iᵀ; A given as the [n, r, K] view the kernel reads."""
    T, K = x.shape
    args = {**operand("x_ptr", ("stride_xm", "stride_xk"), x),
            **operand("a_ptr", ("stride_ai", "stride_ar", "stride_ak"), a),
            **operand("part_ptr", ("stride_ps", "stride_pm", "stride_pr"), part, (T * r_max, r_max, 1)),
            "scale_ptr": ANY if scale is None else scale, "rank_ptr": ranks, **chunk_operands(plan),
            "K": K, "K_PER_SPLIT": ANY, "R_MAX": r_max, "HAS_SCALE": scale is not None}
    capacity = plan.chunk_len.shape[0]
    return Expect("multi_lora_shrink_kernel", args,
                  covers({0: lambda g: capacity, 1: lambda g: cdiv(r_max, g["BR"])}, 2, K,
                         lambda g: g["K_PER_SPLIT"]))


def multi_expand_contract(x, w, bias, part, r, scale, ranks, out, plan, r_max: int, splits: int, *,
                          fuse_base: bool) -> Expect:
    """multi_lora_expand_kernel: OUT [T, N] = [x wᵀ + b] + scale_i · L R_iᵀ; w [N, K], the split-K
    partials L [splits, T, r_max] (contiguous), R given as the [n, N, r] view the kernel reads."""
    T, K = x.shape
    N = out.shape[1]
    capacity = plan.chunk_len.shape[0]
    args = {**operand("x_ptr", ("stride_xm", "stride_xk"), x), **operand("w_ptr", ("stride_wn", "stride_wk"), w),
            **operand("bias_ptr", ("stride_bias",), bias),
            **operand("l_ptr", ("stride_ls", "stride_lm", "stride_lr"), part, (T * r_max, r_max, 1)),
            **operand("r_ptr", ("stride_ri", "stride_rn", "stride_rr"), r),
            "scale_ptr": ANY if scale is None else scale, "rank_ptr": ranks,
            **operand("out_ptr", ("stride_om", "stride_on"), out), **chunk_operands(plan),
            "N_CHUNKS": capacity, "N": N, "K": K, "R_MAX": r_max, "FUSE_BASE": fuse_base,
            "HAS_BIAS": bias is not None, "HAS_SCALE": scale is not None, "SPLITS": splits}
    return Expect("multi_lora_expand_kernel", args, exact(lambda g: (capacity * cdiv(N, g["BN"]),)))


def segment_grad_contract(g, part, out: Slot, scale, ranks, plan, r_max: int, splits: int, n: int, *,
                          out_p_last: bool) -> Expect:
    """multi_lora_segment_grad_kernel: fp32 OUT[i] = scale_i · Σ_{t in segment i} L[t]ᵀ G[t], G [T, P],
    L the split-K partials [splits, T, r_max]; OUT [m_splits, n, r, P] (dA) or [m_splits, n, P, r]
    (dB, ``out_p_last`` False), contiguous."""
    T, P = g.shape
    inner = (r_max * P, P, 1) if out_p_last else (P * r_max, 1, r_max)  # (i, r, p) strides of OUT[m]
    args = {**operand("g_ptr", ("stride_gm", "stride_gp"), g),
            **operand("l_ptr", ("stride_ls", "stride_lm", "stride_lr"), part, (T * r_max, r_max, 1)),
            **operand("out_ptr", ("stride_om", "stride_oi", "stride_or", "stride_op"), out, (n * r_max * P, *inner)),
            "scale_ptr": ANY if scale is None else scale, "rank_ptr": ranks, "sorted_rows_ptr": plan.sorted_rows,
            "seg_start_ptr": plan.seg_start, "seg_len_ptr": plan.seg_len, "P": P, "R_MAX": r_max, "M_SPLITS": ANY,
            "HAS_SCALE": scale is not None, "SPLITS": splits}
    return Expect("multi_lora_segment_grad_kernel", args,
                  exact(lambda a: (n, cdiv(P, a["BP"]), cdiv(r_max, a["BR"]) * a["M_SPLITS"])))




def delta_shrink_contract(x, a, a_strides, a_table, part, ranks, plan, n_slices: int, r_max: int, *,
                          compact: bool, plan_by_value: bool) -> Expect:
    """lora_delta_shrink_kernel: fp32 split-K partials [splits, T, S·r_max] (contiguous) of x A_iᵀ over
    the stacked rank axis; ``a_strides``: (adapter, slice, rank, k) of A; ``a_table``: vLLM's offsets."""
    T, K = x.shape
    q = n_slices * r_max
    capacity = plan.chunk_len.shape[0]
    args = {**operand("x_ptr", ("stride_xm", "stride_xk"), x),
            **operand("a_ptr", ("stride_ai", "stride_as", "stride_ar", "stride_ak"), a, a_strides),
            "a_offset_ptr": ANY if a_table is None else a_table, "rank_ptr": ranks,
            **operand("part_ptr", ("stride_ps", "stride_pm", "stride_pq"), part, (T * q, q, 1)),
            **chunk_operands(plan, plan_by_value), "K": K, "K_PER_SPLIT": ANY, "R_MAX": r_max,
            "N_SLICES": n_slices, "COMPACT": compact, "A_TABLE": a_table is not None}
    return Expect("lora_delta_shrink_kernel", args,
                  covers({0: lambda g: capacity, 1: lambda g: cdiv(q, g["BQ"])}, 2, K, lambda g: g["K_PER_SPLIT"]))


def delta_expand_contract(part, b, b_strides, b_tables, scale, ranks, y, plan, widths: tuple[int, ...],
                          r_max: int, splits: int, *, compact: bool, plan_by_value: bool) -> Expect:
    """lora_delta_expand_kernel: Y[:, slice j] += s_i · L_j B_i[slice j]ᵀ, L the fp32 partials
    [splits, T, S·r_max] (contiguous); ``b_strides``: (adapter, out, rank) of B; ``b_tables``:
    vLLM's (offsets, adapter strides) of the slices' own B tensors. One launch (at most 4 slices)."""
    T = y.shape[0]
    q = len(widths) * r_max
    ends = [sum(widths[:j + 1]) for j in range(len(widths))]
    ends += [ends[-1]] * (4 - len(ends))
    capacity = plan.chunk_len.shape[0]
    offsets, adapter_strides = b_tables if b_tables is not None else (ANY, ANY)
    args = {**operand("part_ptr", ("stride_ps", "stride_pm", "stride_pq"), part, (T * q, q, 1)),
            **operand("b_ptr", ("stride_bi", "stride_bn", "stride_br"), b, b_strides),
            "b_offset_ptr": offsets, "b_stride_ptr": adapter_strides, "scale_ptr": scale, "rank_ptr": ranks,
            **operand("y_ptr", ("stride_ym", "stride_yn"), y), **chunk_operands(plan, plan_by_value),
            "N_TILES": ANY, "R_MAX": r_max, "FIRST_SLICE": 0, "COL0": 0,
            **{f"END{j}": end for j, end in enumerate(ends)},
            "COMPACT": compact, "B_TABLE": b_tables is not None, "SPLITS": splits}
    return Expect("lora_delta_expand_kernel", args,
                  tiles_cover("N_TILES", "BN", max(widths), exact(lambda g: (capacity * g["N_TILES"], len(widths)))))


# --- kernels/moe_lora.py: a chunk table of row tiles over the expert segments, built on the device
#: The table and the clamped ends moe_chunk_table_kernel writes, read by the other kernels of a call
#: (their values are the interpreter tests' subject: tests/kernels/test_moe_lora.py).
TABLE, ENDS = Slot("chunk table"), Slot("segment ends")


def moe_table_contract(offsets, P: int, capacity: int) -> Expect:
    """moe_chunk_table_kernel: the chunk table [3, capacity] and ends [E] (int32, new buffers) of offsets [E]."""
    E = offsets.shape[0]
    args = {"offsets_ptr": offsets, "table_ptr": TABLE, "ends_ptr": ENDS, "E": E, "P": P, "CAPACITY": capacity}
    return Expect("moe_chunk_table_kernel", args, exact(lambda g: (E + 2,)))


def moe_shrink_contract(x, rows, r, out, seed, capacity: int, scale: float, dropout_p: float) -> Expect:
    """moe_lora_shrink_kernel: OUT [P, R] fp32 (contiguous) = scale·drop(X) R_eᵀ, X[j] = x[rows[j]]
    (or x[j]); R given as the [E, R, K] view the kernel reads (A, or Bᵀ for dS)."""
    K, R = x.shape[1], r.shape[1]
    args = {**operand("x_ptr", ("stride_xm", "stride_xk"), x), "rows_ptr": ANY if rows is None else rows,
            **operand("r_ptr", ("stride_re", "stride_rr", "stride_rk"), r),
            **operand("out_ptr", ("stride_om", "stride_or"), out, (R, 1)), "seed_ptr": ANY if seed is None else seed,
            "table_ptr": TABLE, "CAPACITY": capacity, "K": K, "R": R, "scale": scale, "dropout_p": dropout_p,
            "HAS_ROWS": rows is not None, "DROPOUT": seed is not None}
    return Expect("moe_lora_shrink_kernel", args, exact(lambda g: (capacity, cdiv(R, g["BR"]))))


def moe_expand_contract(x, rows, w, bias, l, r, out, seed, capacity: int, scale: float, dropout_p: float, *,
                        fuse_base: bool) -> Expect:
    """moe_lora_expand_kernel: OUT [P, N] = [X W_eᵀ] + b_e + scale·L R_eᵀ (⊙ keep/(1-p) with a seed);
    W the [E, N, K] view read, L [P, R] fp32 (contiguous), R the [E, N, R] view (None: no LoRA term)."""
    N, K = out.shape[1], x.shape[1]
    R = r.shape[2] if r is not None else 0
    args = {**operand("x_ptr", ("stride_xm", "stride_xk"), x), "rows_ptr": ANY if rows is None else rows,
            **operand("w_ptr", ("stride_we", "stride_wn", "stride_wk"), w),
            **operand("bias_ptr", ("stride_be", "stride_bn"), bias),
            **operand("l_ptr", ("stride_lm", "stride_lr"), l, (R, 1) if l is not None else None),
            **operand("r_ptr", ("stride_re", "stride_rn", "stride_rr"), r),
            **operand("out_ptr", ("stride_om", "stride_on"), out), "seed_ptr": ANY if seed is None else seed,
            "table_ptr": TABLE, "CAPACITY": capacity, "N": N, "K": K, "R": R, "scale": scale,
            "dropout_p": dropout_p, "HAS_ROWS": rows is not None, "FUSE_BASE": fuse_base, "HAS_BIAS": bias is not None,
            "HAS_LORA": r is not None, "DROPOUT_ON_LORA_TERM": seed is not None}
    return Expect("moe_lora_expand_kernel", args, exact(lambda g: (capacity * cdiv(N, g["BN"]),)))


def moe_segment_grad_contract(g, rows, l, out: Slot, seed, E: int, R: int, scale: float, dropout_p: float, *,
                              p_last: bool) -> Expect:
    """moe_lora_segment_grad_kernel: fp32 OUT[m, e] = scale·Σ_{j∈e} L[j]ᵀ drop(G[j]); G = g[rows] (or g),
    L [P, R] fp32 (contiguous); OUT [m_splits, E, R, P_COLS] (dA, ``p_last``) or [m_splits, E, P_COLS, R]
    (dB), contiguous."""
    P_COLS = g.shape[1]
    inner = (R * P_COLS, P_COLS, 1) if p_last else (P_COLS * R, 1, R)  # (e, r, p) strides of OUT[m]
    args = {**operand("g_ptr", ("stride_gm", "stride_gp"), g), "rows_ptr": ANY if rows is None else rows,
            **operand("l_ptr", ("stride_lm", "stride_lr"), l, (R, 1)),
            **operand("out_ptr", ("stride_os", "stride_oe", "stride_or", "stride_op"), out, (E * R * P_COLS, *inner)),
            "seed_ptr": ANY if seed is None else seed, "ends_ptr": ENDS, "P_COLS": P_COLS, "R": R,
            "scale": scale, "dropout_p": dropout_p, "M_SPLITS": ANY, "HAS_ROWS": rows is not None,
            "DROPOUT": seed is not None}
    return Expect("moe_lora_segment_grad_kernel", args,
                  exact(lambda a: (E, cdiv(P_COLS, a["BP"]), cdiv(R, a["BR"]) * a["M_SPLITS"])))


# --- kernels/dequant4bit.py
def quant_operands(packed, quant) -> dict:
    """The packed bytes and the quant state's tables (nested: absmax is uint8, with absmax2,
    code2 and offset; plain: the launcher passes absmax for the three)."""
    from lora_fused.kernels.dequant4bit import FP4_CODE, NF4_CODE
    import torch
    code = torch.tensor(NF4_CODE if quant.quant_type == "nf4" else FP4_CODE, dtype=torch.float32)
    nested = quant.nested
    return {"q_ptr": packed, "absmax_ptr": quant.absmax, "code_ptr": Holds(code),
            "absmax2_ptr": quant.absmax2 if nested else ANY, "code2_ptr": quant.code2 if nested else ANY,
            "offset_ptr": quant.offset if nested else ANY, "NESTED": nested, "BLOCKSIZE": quant.blocksize}


def dequant_contract(packed, quant, out) -> Expect:
    """dequant4bit_kernel: W [N, K] (contiguous ``out``) from the packed 4-bit weight."""
    numel = quant.shape[0] * quant.shape[1]
    args = {**quant_operands(packed, quant), "out_ptr": out, "numel": numel}
    return Expect("dequant4bit_kernel", args, exact(lambda g: (cdiv(numel, g["BLOCK"]),)))


def qlora_decode_contract(x, packed, quant, bias, s, b, out, scaling: float) -> Expect:
    """qlora_decode_kernel: OUT [M, N] = x deq(W)ᵀ + bias + s·S Bᵀ; S [M, R], B [N, R]."""
    M, K = x.shape
    N, R = b.shape
    args = {**operand("x_ptr", ("stride_xm", "stride_xk"), x), **quant_operands(packed, quant),
            **operand("bias_ptr", ("stride_bias",), bias), **operand("s_ptr", ("stride_sm", "stride_sr"), s),
            **operand("b_ptr", ("stride_bn", "stride_br"), b), **operand("out_ptr", ("stride_om", "stride_on"), out),
            "M": M, "N": N, "K": K, "R": R, "scaling": scaling, "HAS_BIAS": bias is not None}
    return Expect("qlora_decode_kernel", args, exact(lambda g: (cdiv(N, g["BN"]),)))


# --- kernels/dora.py
def dora_norm_contract(w, a, b, bg, norm, scaling: float) -> Expect:
    """dora_norm_kernel: norm [N] = ‖W0[o] + s·(B A)[o]‖ from W0 [N, K], A [R, K], B [N, R] and
    B (A Aᵀ) [N, R] (a contiguous fp32 buffer the launcher computes)."""
    N, K = w.shape
    R = a.shape[0]
    args = {**operand("w_ptr", ("stride_wn", "stride_wk"), w), **operand("a_ptr", ("stride_ar", "stride_ak"), a),
            **operand("b_ptr", ("stride_bn", "stride_br"), b), **operand("bg_ptr", ("stride_bgn", "stride_bgr"), bg,
                                                                          (R, 1)),
            "norm_ptr": norm, "N": N, "K": K, "R": R, "scaling": scaling}
    return Expect("dora_norm_kernel", args, exact(lambda g: (cdiv(N, g["BN"]),)))


def scale_cols_contract(u, c, bias, base, out) -> Expect:
    """dora_scale_cols_kernel: OUT [M, N] = U ⊙ c[col] (+ bias) (+ base)."""
    M, N = u.shape
    args = {**operand("u_ptr", ("stride_um", "stride_un"), u), **operand("c_ptr", ("stride_c",), c),
            **operand("bias_ptr", ("stride_bias",), bias),
            **operand("base_ptr", ("stride_basem", "stride_basen"), base),
            **operand("out_ptr", ("stride_om", "stride_on"), out), "M": M, "N": N,
            "HAS_BIAS": bias is not None, "HAS_BASE": base is not None}
    return Expect("dora_scale_cols_kernel", args, exact(lambda g: (cdiv(M, g["BM"]), cdiv(N, g["BN"]))))


def grad_scale_contract(dy, u, c, g, part) -> Expect:
    """dora_grad_scale_kernel: G = dY ⊙ c[col], fp32 column-sum partials [splits, N] (contiguous) of dY ⊙ U."""
    M, N = dy.shape
    args = {**operand("dy_ptr", ("stride_dym", "stride_dyn"), dy), **operand("u_ptr", ("stride_um", "stride_un"), u),
            **operand("c_ptr", ("stride_c",), c), **operand("g_ptr", ("stride_gm", "stride_gn"), g),
            **operand("part_ptr", ("stride_pp", "stride_pn"), part, (N, 1)), "M": M, "N": N}
    return Expect("dora_grad_scale_kernel", args,
                  covers({1: lambda a: cdiv(N, a["BN"])}, 0, M, lambda a: a["ROW_TILES"] * a["BM"]))


def dropout_mix_contract(base, other, out, seed, dropout_p: float) -> Expect:
    """dora_dropout_mix_kernel: OUT [M, K] = BASE + keep/(1-p) ⊙ (OTHER - BASE) (None stands for 0)."""
    M, K = out.shape
    args = {**operand("base_ptr", ("stride_bm", "stride_bk"), base),
            **operand("other_ptr", ("stride_om_in", "stride_ok_in"), other),
            **operand("out_ptr", ("stride_om", "stride_ok"), out), "seed_ptr": seed, "M": M, "K": K,
            "dropout_p": dropout_p, "HAS_BASE": base is not None, "HAS_OTHER": other is not None}
    return Expect("dora_dropout_mix_kernel", args, exact(lambda g: (cdiv(M, g["BM"]), cdiv(K, g["BN"]))))


# ----------------------------------------------------------------- cases
#: Problem sizes: small (the composite strategies run their base GEMM on the CPU), distinct, and
#: with every stride a value of its own (each tensor a view of a wider buffer, pads of multiples
#: of 16 as a real model's strides are): a swapped pair of sizes or strides shows.
K_IN, N_OUT = 256, 384
ROWS = {"decode": 13, "prefill": 130, "prefill_cublas": 130}
RANK, WIDE_RANK = 8, 40        # padded 16; padded 64: past FUSED_SHRINK_MAX_RANK and the wide dS/dB tile
SCALING, DROPOUT_P = 2.0, 0.1
N_ADAPTERS, R_MAX = 5, 16
SLICES = (192, 64, 96)         # packed q|k|v widths


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    family: str
    kernels: tuple[str, ...]   # the kernels it launches (the coverage test reads this)
    run: Callable[[], list[Expect]] = dataclasses.field(compare=False)
    slow: bool = False


def _kernels(name: str):
    import importlib
    return importlib.import_module(f"lora_fused.kernels.{name}")


class _Tensors:
    """Random tensors of one case call, each a view of its own wider buffer (see K_IN)."""

    def __init__(self, dtype_name: str = "bfloat16"):
        import torch
        self.torch = torch
        self.dtype = getattr(torch, dtype_name)
        self.gen = torch.Generator().manual_seed(20)

    def matrix(self, rows: int, cols: int, pad: int, dtype=None):
        t = self.torch.randn(rows, cols + pad, generator=self.gen).to(dtype or self.dtype)
        return t[:, :cols]

    def stack(self, n: int, rows: int, cols: int, pad: int):
        return self.torch.randn(n, rows, cols + pad, generator=self.gen).to(self.dtype)[:, :, :cols]

    def vector(self, n: int, dtype=None):
        return self.torch.randn(n, generator=self.gen).to(dtype or self.dtype)

    def ids(self, T: int, n: int):
        """Adapter ids of T rows: every adapter and the base (-1) present, in mixed order."""
        ids = self.torch.arange(T) % (n + 1) - 1
        return ids[self.torch.randperm(T, generator=self.gen)]


def _scalars(tensors: _Tensors, dropout: bool, as_tensors: bool):
    """(scaling, dropout_p, seed) as a launcher takes them; ``as_tensors``: 0-d tensors, read
    through pointers (the compiled route passes them so)."""
    torch = tensors.torch
    seed = torch.tensor([1234], dtype=torch.int64) if dropout else None
    if not as_tensors:
        return SCALING, DROPOUT_P if dropout else 0.0, seed
    return torch.tensor(SCALING), torch.tensor(DROPOUT_P) if dropout else 0.0, seed


def _as_arg(value):
    """A scaling or dropout probability as the kernel receives it: a 0-d tensor's pointer, else a float."""
    return value if hasattr(value, "data_ptr") else float(value)


def _single_problem(t: _Tensors, M: int, rank: int):
    """x [M, in], W0 [out, in], A [rank, in], B [out, rank], each with a row stride of its own."""
    return t.matrix(M, K_IN, 16), t.matrix(N_OUT, K_IN, 32), t.matrix(rank, K_IN, 48), t.matrix(N_OUT, rank, 40)


def single_case(what: str, regime: str, strategy: str, config: str, *, dropout: bool, rank: int = RANK,
                as_tensors: bool = False) -> Callable[[], list[Expect]]:
    """lora_linear.lora_forward (``what`` "forward") or lora_backward (dX, dA, dB) with ``strategy``
    at ``config`` (the GEMM's, or the composite's add; backward: the dX launch's)."""
    def run():
        k, t = _kernels("lora_linear"), _Tensors()
        M = ROWS[regime]
        x, w, a, b = _single_problem(t, M, rank)
        s, p, seed = _scalars(t, dropout, as_tensors)
        s_arg, p_arg = _as_arg(s), _as_arg(p)
        if what == "forward":
            bias = t.vector(N_OUT)
            y, shrink = k.lora_forward(x, w, bias, a, b, s, p, seed, strategy=strategy, config=config)
            if strategy == "fused":
                return [gemm_contract(x, w, bias, a, shrink, b, y, None, s_arg, 0.0)]
            first = shrink_contract(x, a, shrink, seed, p_arg)
            if strategy == "shrink_first":
                return [first, gemm_contract(x, w, bias, None, shrink, b, y, None, s_arg, 0.0)]
            return [first, expand_add_contract(y, shrink, b, None, s_arg, 0.0)]
        grad_y, shrink = t.matrix(M, N_OUT, 48), t.matrix(M, rank, 24)
        grad_x, _, _ = k.lora_backward(grad_y, x, w, a, b, shrink, s, p, seed, need_dx=True, need_dlora=True,
                                       strategy=strategy, config=config)
        ds = Slot("dS")
        expects = [grad_ds_db_contract(grad_y, b, shrink, ds, Slot("dB partials"), s_arg),
                   grad_a_contract(ds, x, Slot("dA partials"), seed, p_arg, rank)]
        if strategy == "fused":  # dX = dY (W0ᵀ)ᵀ + keep/(1-p) ⊙ dS (Aᵀ)ᵀ
            return expects + [gemm_contract(grad_y, w.t(), None, None, ds, a.t(), grad_x, seed, 1.0, p_arg,
                                            l_strides=(rank, 1))]
        return expects + [expand_add_contract(grad_x, ds, a.t(), seed, 1.0, p_arg, l_strides=(rank, 1))]
    return run


def _multi_problem(t: _Tensors, regime: str):
    from lora_fused.dispatch.segments import plan_segments
    T, n, r = ROWS[regime], N_ADAPTERS, R_MAX
    torch = t.torch
    x, w, bias = t.matrix(T, K_IN, 16), t.matrix(N_OUT, K_IN, 32), t.vector(N_OUT)
    lora_a, lora_b = t.stack(n, r, K_IN, 16), t.stack(n, N_OUT, r, 16)
    scalings = t.vector(n, torch.float32)
    ranks = torch.tensor([16, 3, 8, 16, 1], dtype=torch.int32)
    plan = plan_segments(t.ids(T, n), n, regime=regime)
    return x, w, bias, lora_a, lora_b, scalings, ranks, plan


def multi_case(regime: str, backward: bool) -> Callable[[], list[Expect]]:
    """multi_lora.multi_lora_forward, or multi_lora_backward (dX, dA, dB), over a segment plan
    lora_fused builds (segments.plan_segments) for ``regime``."""
    def run():
        k, t = _kernels("multi_lora"), _Tensors()
        x, w, bias, lora_a, lora_b, scalings, ranks, plan = _multi_problem(t, regime)
        cfg, r = k.multi_config(regime), R_MAX
        if not backward:
            y, part = k.multi_lora_forward(x, w, bias, lora_a, lora_b, scalings, ranks, plan, regime)
            return [multi_shrink_contract(x, lora_a, part, None, ranks, plan, r),
                    multi_expand_contract(x, w, bias, part, lora_b, scalings, ranks, y, plan, r, part.shape[0],
                                          fuse_base=cfg.fuse_base)]
        T = x.shape[0]
        s_part = t.torch.randn(k.split_k(K_IN, cfg)[0], T, r, generator=t.gen)
        grad_y = t.matrix(T, N_OUT, 48)
        grad_x, _, _ = k.multi_lora_backward(grad_y, x, w, lora_a, lora_b, scalings, ranks, s_part, plan, regime,
                                             need_dx=True, need_dlora=True)
        ds, ds_splits = Slot("dS partials"), k.split_k(N_OUT, cfg)[0]
        return [multi_shrink_contract(grad_y, lora_b.transpose(1, 2), ds, scalings, ranks, plan, r),
                segment_grad_contract(grad_y, s_part, Slot("dB"), scalings, ranks, plan, r, s_part.shape[0],
                                      N_ADAPTERS, out_p_last=False),
                segment_grad_contract(x, ds, Slot("dA"), None, ranks, plan, r, ds_splits, N_ADAPTERS,
                                      out_p_last=True),
                multi_expand_contract(grad_y, w.t(), None, ds, lora_a.transpose(1, 2), None, ranks, grad_x, plan, r,
                                      ds_splits, fuse_base=cfg.fuse_base)]
    return run


def _delta_problem(t: _Tensors, regime: str):
    from lora_fused.dispatch.segments import plan_segments
    T, n = ROWS[regime], N_ADAPTERS
    x, y = t.matrix(T, K_IN, 16), t.matrix(T, sum(SLICES), 32)
    scalings, ranks = t.vector(n, t.torch.float32), t.torch.tensor([16, 3, 8, 16, 1], dtype=t.torch.int32)
    return x, y, scalings, ranks, plan_segments(t.ids(T, n), n, regime=regime)


def add_lora_case(regime: str, layout: str) -> Callable[[], list[Expect]]:
    """kernels/lora_delta.py through lora_fused: ``layout`` "padded" (lf.add_lora with slices),
    "compact" (SGLang's stacked ranks: delta.apply_delta, as integrations/sglang.py calls it),
    "split" (SGLang's separate shrink and expand: delta.apply_shrink, delta.apply_expand),
    "vllm_tables" (integrations.vllm.add_lora_linear: each slice its own tensors, read through
    lora_fused's int64 offset tables) or "vllm_embedding" (integrations.vllm.add_lora_embedding)."""
    def run():
        import lora_fused as lf
        from lora_fused.ops import delta
        from lora_fused.integrations import vllm
        t = _Tensors()
        torch = t.torch
        x, y, scalings, ranks, plan = _delta_problem(t, regime)
        n, r, S = N_ADAPTERS, R_MAX, len(SLICES)
        splits = _kernels("lora_delta").split_k(K_IN, _kernels("lora_delta").delta_config(regime))[0]
        part = Slot("partials")
        with cpu_tensors_take_triton():
            if layout == "padded":
                a4, b = t.stack(n * S, r, K_IN, 16).reshape(n, S, r, K_IN), t.stack(n, sum(SLICES), r, 16)
                lf.add_lora(y, x, a4, b, plan, scalings, ranks=ranks, slices=SLICES)
                return [delta_shrink_contract(x, a4, None, None, part, ranks, plan, S, r, compact=False,
                                              plan_by_value=False),
                        delta_expand_contract(part, b, None, None, scalings, ranks, y, plan, SLICES, r, splits,
                                              compact=False, plan_by_value=False)]
            a_compact, b = t.stack(n, S * r, K_IN, 16), t.stack(n, sum(SLICES), r, 16)
            a4 = a_compact.unsqueeze(1)
            a_strides = (a4.stride(0), ANY, a4.stride(2), a4.stride(3))  # compact: no slice stride
            if layout == "compact":
                delta.apply_delta(y, x, delta.PackedA(a4, compact=True, n_slices=S), b, plan, scalings, ranks, SLICES)
                return [delta_shrink_contract(x, a4, a_strides, None, part, ranks, plan, S, r, compact=True,
                                              plan_by_value=False),
                        delta_expand_contract(part, b, None, None, scalings, ranks, y, plan, SLICES, r, splits,
                                              compact=True, plan_by_value=False)]
            if layout == "split":
                shrunk = delta.apply_shrink(x, delta.PackedA(a4, compact=True, n_slices=S), plan, ranks)
                delta.apply_expand(y, shrunk, b, plan, scalings, ranks, SLICES, compact=True)
                return [delta_shrink_contract(x, a4, a_strides, None, part, ranks, plan, S, r, compact=True,
                                              plan_by_value=False),
                        delta_expand_contract(Slot("shrink as fp32"), b, None, None, Holds(scalings), Holds(ranks), y,
                                              plan, SLICES, r, 1, compact=True, plan_by_value=False)]
            # vLLM: ids as the engine's mapping, the plan built (and cached) inside
            ids = plan.adapter_ids
            ones = Holds(torch.full((n,), r, dtype=torch.int32))
            if layout == "vllm_embedding":
                dim = SLICES[0]
                shrunk, b_stacked, out = t.matrix(x.shape[0], r, 16), t.stack(n, dim, r, 16).unsqueeze(1), y[:, :dim]
                vllm.add_lora_embedding(out, shrunk, b_stacked, ids)
                return [delta_expand_contract(Slot("x as fp32"), b_stacked[:, 0], None, None,
                                              Holds(torch.ones(n)), ones, out, plan, (dim,), r, 1, compact=False,
                                              plan_by_value=True)]
            a_parts = [t.stack(n, r, K_IN, 16).unsqueeze(1) for _ in SLICES]
            b_parts = [t.stack(n, width, r, 16).unsqueeze(1) for width in SLICES]
            vllm.add_lora_linear(y, x, tuple(a_parts), tuple(b_parts), 0.5, SLICES, ids)
            a0, b0 = a_parts[0][:, 0], b_parts[0][:, 0]
            a_table = OffsetsOf(a0, tuple(p[:, 0] for p in a_parts))
            b_tables = (OffsetsOf(b0, tuple(p[:, 0] for p in b_parts)),
                        Holds(torch.tensor([p.stride(0) for p in b_parts], dtype=torch.int64)))
            return [delta_shrink_contract(x, a0, (a0.stride(0), 0, a0.stride(1), a0.stride(2)), a_table, part, ones,
                                          plan, S, r, compact=False, plan_by_value=True),
                    delta_expand_contract(part, b0, (0, b0.stride(1), b0.stride(2)), b_tables,
                                          Holds(torch.full((n,), 0.5)), ones, y, plan, SLICES, r, splits,
                                          compact=False, plan_by_value=True)]
    return run


def _quant(t: _Tensors, nested: bool):
    from lora_fused.ops.qlora import Quant4bit
    torch = t.torch
    blocks = N_OUT * K_IN // 64
    packed = torch.randint(0, 256, (N_OUT * K_IN // 2, 1), dtype=torch.uint8, generator=t.gen)
    if not nested:
        return packed, Quant4bit((N_OUT, K_IN), 64, "nf4", t.dtype, t.vector(blocks, torch.float32))
    absmax = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=t.gen)
    return packed, Quant4bit((N_OUT, K_IN), 64, "nf4", t.dtype, absmax, absmax2=t.vector(cdiv(blocks, 256),
                             torch.float32), code2=t.vector(256, torch.float32), blocksize2=256,
                             offset=t.torch.tensor(0.25))


def qlora_case(what: str) -> Callable[[], list[Expect]]:
    """kernels/dequant4bit.py: "dequant" / "dequant_nested" (dequantize_4bit), "decode" (qlora_decode,
    nested absmax, with bias)."""
    def run():
        k, t = _kernels("dequant4bit"), _Tensors()
        packed, quant = _quant(t, nested=what != "dequant")
        q = packed.view(t.torch.uint8).reshape(-1)
        if what != "decode":
            return [dequant_contract(q, quant, k.dequantize_4bit(packed, quant, t.dtype))]
        M = ROWS["decode"]
        x, bias, s, b = t.matrix(M, K_IN, 16), t.vector(N_OUT), t.matrix(M, RANK, 24), t.matrix(N_OUT, RANK, 40)
        out = k.qlora_decode(x, packed, quant, bias, s, b, SCALING)
        return [qlora_decode_contract(x, q, quant, bias, s, b, out, SCALING)]
    return run


def dora_case(what: str, rank: int = RANK) -> Callable[[], list[Expect]]:
    """kernels/dora.py: "norm" (row_norm at ``rank``), "scale_bias" / "scale_base" (scale_cols),
    "grad_scale", "dropout_x" / "dropout_dx" (dropout_mix for x~ and for dX)."""
    def run():
        k, t = _kernels("dora"), _Tensors()
        torch = t.torch
        M = ROWS["prefill"]
        if what == "norm":
            w, a, b = t.matrix(N_OUT, K_IN, 32), t.matrix(rank, K_IN, 48), t.matrix(N_OUT, rank, 40)
            return [dora_norm_contract(w, a, b, Slot("B A Aᵀ"), k.row_norm(w, a, b, SCALING), SCALING)]
        u, c = t.matrix(M, N_OUT, 16), t.vector(N_OUT, torch.float32)
        if what.startswith("scale"):
            bias, base = (t.vector(N_OUT), None) if what == "scale_bias" else (None, t.matrix(M, N_OUT, 48))
            return [scale_cols_contract(u, c, bias, base, k.scale_cols(u, c, bias, base))]
        if what == "grad_scale":
            dy = t.matrix(M, N_OUT, 32)
            g, _ = k.grad_scale(dy, u, c)
            return [grad_scale_contract(dy, u, c, g, Slot("column sums"))]
        x, seed = t.matrix(M, K_IN, 16), torch.tensor([99], dtype=torch.int64)
        base, other = (None, x) if what == "dropout_x" else (t.matrix(M, K_IN, 32), t.matrix(M, K_IN, 48))
        out = k.dropout_mix(base, other, seed, DROPOUT_P, x)
        return [dropout_mix_contract(base, other, out, seed, DROPOUT_P)]
    return run


#: Experts of the grouped cases; pairs per expert (expert 2 has none), the rest of a regime's rows
#: are sentinel pairs past offsets[-1].
MOE_EXPERTS, MOE_SEGMENTS = 5, {"decode": (3, 4, 0, 1, 2), "prefill": (40, 17, 0, 33, 31)}


def moe_case(regime: str, what: str, strategy: str) -> Callable[[], list[Expect]]:
    """moe_lora.grouped_lora_forward (``what`` "forward"), grouped_lora_backward (dX, dA, dB) with
    dropout, or grouped_linear_forward ("linear"), top-2 rows read through the row table, with
    ``strategy`` ("grouped_mm": the vendor GEMM runs on the CPU tensors, the expand is its epilogue)."""
    def run():
        k, t = _kernels("moe_lora"), _Tensors()
        torch = t.torch
        P, E, R = ROWS[regime], MOE_EXPERTS, RANK
        T = P // 2 + 1
        x, rows = t.matrix(T, K_IN, 16), torch.randint(0, T, (P,), generator=t.gen)
        w, bias = t.stack(E, N_OUT, K_IN, 16), t.matrix(E, N_OUT, 32)
        lora_a, lora_b = t.stack(E, R, K_IN, 16), t.stack(E, N_OUT, R, 16)
        offsets = torch.tensor(MOE_SEGMENTS[regime]).cumsum(0).to(torch.int32)
        capacity = cdiv(P, k.moe_config(k.moe_regime(P)).block_rows) + E + 1
        table = moe_table_contract(offsets, P, capacity)
        fuse_base = strategy == "fused"
        if what == "linear":
            y = k.grouped_linear_forward(x, rows, w, bias, offsets, strategy=strategy)
            return [table, moe_expand_contract(x, rows, w, bias, None, None, y, None, capacity, 1.0, 0.0,
                                               fuse_base=fuse_base)]
        seed = torch.tensor([1234], dtype=torch.int64)
        if what == "forward":
            y, s = k.grouped_lora_forward(x, rows, w, bias, lora_a, lora_b, offsets, SCALING, DROPOUT_P, seed,
                                          strategy=strategy)
            return [table, moe_shrink_contract(x, rows, lora_a, s, seed, capacity, 1.0, DROPOUT_P),
                    moe_expand_contract(x, rows, w, bias, s, lora_b, y, None, capacity, SCALING, 0.0,
                                        fuse_base=fuse_base)]
        grad_y, s = t.matrix(P, N_OUT, 48), torch.randn(P, R, generator=t.gen)
        grad_x, _, _ = k.grouped_lora_backward(grad_y, x, rows, w, lora_a, lora_b, s, offsets, SCALING, DROPOUT_P,
                                               seed, True, True, strategy=strategy)
        ds = Slot("dS")
        return [table, moe_shrink_contract(grad_y, None, lora_b.transpose(1, 2), ds, None, capacity, SCALING, 0.0),
                moe_segment_grad_contract(grad_y, None, s, Slot("dB"), None, E, R, SCALING, 0.0, p_last=False),
                moe_segment_grad_contract(x, rows, ds, Slot("dA"), seed, E, R, 1.0, DROPOUT_P, p_last=True),
                moe_expand_contract(grad_y, None, w.transpose(1, 2), None, ds, lora_a.transpose(1, 2), grad_x, seed,
                                    capacity, 1.0, DROPOUT_P, fuse_base=fuse_base)]
    return run


_GEMM, _SHRINK, _EXPAND = "lora_gemm_kernel", "lora_shrink_kernel", "lora_expand_add_kernel"
_FORWARD_KERNELS = {"fused": (_GEMM,), "shrink_first": (_SHRINK, _GEMM), "composite": (_SHRINK, _EXPAND)}
_BACKWARD_KERNELS = {"fused": ("lora_grad_ds_db_kernel", "lora_grad_a_kernel", _GEMM),
                     "composite": ("lora_grad_ds_db_kernel", "lora_grad_a_kernel", _EXPAND)}
_MULTI = ("multi_lora_shrink_kernel", "multi_lora_expand_kernel")
_MULTI_BACKWARD = ("multi_lora_shrink_kernel", "multi_lora_segment_grad_kernel", "multi_lora_expand_kernel")
_DELTA = ("lora_delta_shrink_kernel", "lora_delta_expand_kernel")
_MOE = {"forward": ("moe_chunk_table_kernel", "moe_lora_shrink_kernel", "moe_lora_expand_kernel"),
        "linear": ("moe_chunk_table_kernel", "moe_lora_expand_kernel"),
        "backward": ("moe_chunk_table_kernel", "moe_lora_shrink_kernel", "moe_lora_segment_grad_kernel",
                     "moe_lora_expand_kernel")}


def _single_cases(k) -> list[Case]:
    """Every (strategy, config) the measured choice may run (forward_candidates, backward_candidates:
    every CANDIDATE_CONFIGS entry), decode and prefill, dropout off and on, rank RANK; the heuristic's
    choice at WIDE_RANK (shrink_first forward, the wide-rank dS/dB tile); s and p as 0-d tensors.
    Of the candidates, each strategy's first (the heuristic's config) runs by default; the others
    are ``slow``: the same launcher code with other block sizes, each a compile of its own."""
    kernels = {"forward": _FORWARD_KERNELS, "backward": _BACKWARD_KERNELS}
    candidates = {"forward": k.forward_candidates, "backward": k.backward_candidates}

    def case(what, regime, strategy, config, dropout, tag="", slow=False, **kwargs):
        name = f"{what}-{regime}-{tag or ('dropout' if dropout else 'plain')}-{strategy}-{config}"
        return Case(name + ("-tensor_scalars" if kwargs.get("as_tensors") else ""), f"single_{what}",
                    kernels[what][strategy], single_case(what, regime, strategy, config, dropout=dropout, **kwargs),
                    slow)

    out = []
    for regime in ("decode", "prefill"):
        for dropout in (False, True):
            for what in ("forward", "backward"):
                first = {}
                for strategy, config in candidates[what](ROWS[regime], RANK, dropout):
                    first.setdefault(strategy, config)
                    out.append(case(what, regime, strategy, config, dropout, slow=config != first[strategy]))
    M = ROWS["prefill"]
    for what in ("forward", "backward"):
        out.append(case(what, "prefill", *candidates[what](M, WIDE_RANK, False)[0], False, f"rank{WIDE_RANK}",
                        rank=WIDE_RANK))
    # s and p as 0-d tensors (the compiled route's SCALING_PTR / P_PTR variants)
    for what, strategy, config, dropout in (("forward", "fused", k.gemm_config(M), False),
                                            ("forward", "shrink_first", k.gemm_config(M), True),
                                            ("backward", "fused", k.gemm_config(M, True), True)):
        out.append(case(what, "prefill", strategy, config, dropout, as_tensors=True))
    return out


@functools.cache
def cases() -> dict[str, Case]:
    """Every case by id: each kernel family of KERNEL_MODULES, each launcher, each config table entry."""
    out = _single_cases(_kernels("lora_linear"))
    for regime in _kernels("multi_lora").MULTI_CONFIGS:
        out.append(Case(f"multi-{regime}-forward", "multi", _MULTI, multi_case(regime, backward=False)))
        out.append(Case(f"multi-{regime}-backward", "multi", _MULTI_BACKWARD, multi_case(regime, backward=True)))
    for regime in _kernels("lora_delta").DELTA_CONFIGS:
        for layout in ("padded", "compact", "split", "vllm_tables", "vllm_embedding"):
            if layout.startswith("vllm") and regime == "prefill_cublas":
                continue  # vLLM's plans take the regime of their row count
            kernels = _DELTA[1:] if layout == "vllm_embedding" else _DELTA
            out.append(Case(f"add_lora-{regime}-{layout}", "add_lora", kernels, add_lora_case(regime, layout)))
    moe = _kernels("moe_lora")
    out += [Case(f"moe-{regime}-{what}-{strategy}", "moe", _MOE[what], moe_case(regime, what, strategy))
            for regime in moe.MOE_CONFIGS for what in _MOE for strategy in moe.GROUPED_STRATEGIES]
    out += [Case(f"qlora-{what}", "qlora", ("qlora_decode_kernel",) if what == "decode" else ("dequant4bit_kernel",),
                 qlora_case(what)) for what in ("dequant", "dequant_nested", "decode")]
    dora = _kernels("dora")
    # the norm kernel at a rank of each NORM_BLOCKS entry (keyed by padded rank)
    out += [Case(f"dora-norm-rank{r}", "dora", ("dora_norm_kernel",), dora_case("norm", r))
            for r in (RANK if block == 16 else block // 2 + 1 for block in sorted(dora.NORM_BLOCKS))]
    out += [Case(f"dora-{what}", "dora", (kernel,), dora_case(what)) for what, kernel in (
        ("scale_bias", "dora_scale_cols_kernel"), ("scale_base", "dora_scale_cols_kernel"),
        ("grad_scale", "dora_grad_scale_kernel"), ("dropout_x", "dora_dropout_mix_kernel"),
        ("dropout_dx", "dora_dropout_mix_kernel"))]
    return {case.id: case for case in out}


# ----------------------------------------------------------------- checks
def _describe(value, names: dict) -> str:
    if hasattr(value, "data_ptr"):
        owner = names.get(value.data_ptr())
        where = f"the tensor of {owner}" if owner else f"a tensor at {value.data_ptr():#x}"
        return f"{where} ({str(value.dtype).removeprefix('torch.')} {tuple(value.shape)})"
    return repr(value)


def _type_problem(ty: str, value) -> Optional[str]:
    """What is wrong with ``value`` as an argument of Triton type ``ty``."""
    if ty.startswith("*"):
        want = _TRITON_DTYPES.get(ty[1:], ty[1:])
        if not hasattr(value, "data_ptr") or str(value.dtype) != f"torch.{want}":
            return f"a {ty} pointer parameter got {type(value).__name__} {getattr(value, 'dtype', '')}"
    elif ty in ("i32", "i64", "u32", "u64"):
        bits = int(ty[1:])
        if isinstance(value, bool) or not isinstance(value, int) or not -2**(bits - 1) <= value < 2**bits:
            return f"an {ty} parameter got {value!r}"
    elif ty == "fp32":
        if not isinstance(value, float):
            return f"an fp32 parameter got {value!r}"
    elif ty in ("i1", "u1"):
        if not isinstance(value, bool):
            return f"an {ty} parameter got {value!r}"
    else:
        return f"a parameter of type {ty} (not among the types the contracts know)"
    return None


def _mismatch(want, got, slots: dict, names: dict) -> Optional[str]:
    """How ``got`` breaks the contract value ``want`` (None: it keeps it)."""
    import torch
    if want is ANY:
        return None
    if isinstance(want, Slot):
        pointer = got.data_ptr()
        if pointer in names:
            return f"{want.name} is {_describe(got, names)}"
        if slots.setdefault(want.name, pointer) != pointer:
            return f"{want.name} at {pointer:#x}, but {slots[want.name]:#x} elsewhere in the case"
        return None
    if isinstance(want, Holds):
        values = torch.as_tensor(want.values)
        if not isinstance(got, torch.Tensor) or got.shape != values.shape or not torch.equal(got, values.to(got.dtype)):
            return f"got {_describe(got, names)} holding {got.tolist() if got.numel() <= 16 else '...'}, " \
                   f"expected one holding {values.tolist() if values.numel() <= 16 else 'other values'}"
        return None
    if isinstance(want, OffsetsOf):
        size = want.base.element_size()
        reached = [want.base.data_ptr() + int(o) * size for o in got.tolist()]
        expected = [part.data_ptr() for part in want.parts]
        return None if reached == expected else f"offsets {got.tolist()} from {want.base.data_ptr():#x} reach " \
                                                f"{[hex(p) for p in reached]}, expected {[hex(p) for p in expected]}"
    if isinstance(want, torch.Tensor):
        if not hasattr(got, "data_ptr") or got.data_ptr() != want.data_ptr() or got.dtype != want.dtype:
            return f"got {_describe(got, names)}, expected {_describe(want, names)}"
        return None
    if type(got) is not type(want) or got != want:
        return f"got {got!r}, expected {want!r}"
    return None


def ptx_parameter_types(ptx: str, kernel: str) -> list[str]:
    """The PTX types (".u64", ".u32", ".f32", ...) of the ``.entry`` parameters of ``kernel``."""
    entry = re.search(rf"\.entry\s+{kernel}\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise ValueError(f"no .entry {kernel} in the PTX")
    return re.findall(r"\.param\s+(\.\w+)", entry.group(1))


def check_launch(launch: Launch, expect: Expect, slots: dict, names: dict) -> list[str]:
    """What is wrong with one launch (empty when nothing): its grid, its arguments against the
    compiled kernel's PTX entry and against the contract ``expect``."""
    problems = []
    if len(launch.grid) != 3 or not all(isinstance(g, int) and 1 <= g <= limit
                                        for g, limit in zip(launch.grid, GRID_LIMITS)):
        problems.append(f"grid {launch.grid} is outside CUDA's limits 1..{GRID_LIMITS}")
    else:
        problems += [p for p in (expect.grid(launch.args, launch.grid),) if p]
    problems += [f"the contract names {name}, which {launch.kernel} does not have"
                 for name in expect.args if name not in launch.args]
    passed = [(name, ty) for name, ty in launch.signature.items() if ty != "constexpr"]
    for name, value in launch.args.items():
        ty = launch.signature[name]
        if ty != "constexpr":
            problems += [f"{name}: {p}" for p in (_type_problem(ty, value),) if p]
            if name not in expect.args:
                problems.append(f"{name} = {_describe(value, names)} is not in the contract")
                continue
        if name in expect.args:
            problems += [f"{name}: {p}" for p in (_mismatch(expect.args[name], value, slots, names),) if p]
    ptx = ptx_parameter_types(launch.compiled.asm["ptx"], launch.kernel)
    if len(ptx) != len(passed) + SCRATCH_PARAMS:
        problems.append(f"{len(passed)} arguments reach the kernel, its PTX entry has {len(ptx)} parameters "
                        f"({SCRATCH_PARAMS} of them Triton's scratch pointers)")
    else:
        for (name, ty), got in zip(passed, ptx):
            want = ".u64" if ty.startswith("*") else PTX_TYPES.get(ty)
            if got != want:
                problems.append(f"{name}: a {ty} argument for a PTX {got} parameter")
        if any(t != ".u64" for t in ptx[len(passed):]):
            problems.append(f"Triton's scratch parameters are {ptx[len(passed):]}, not pointers")
    return problems


def check_case(launches: list[Launch], expects: list[Expect]) -> list[str]:
    got, want = [launch.kernel for launch in launches], [expect.kernel for expect in expects]
    if got != want:
        return [f"launched {got}, the contract has {want}"]
    names = {}  # each named tensor's pointer -> its parameter, by the first launch that names it
    for expect in reversed(expects):
        names.update(_pointer_names(expect))
    slots: dict = {}
    return [f"{launch.kernel} (launch {i}): {problem}" for i, (launch, expect) in enumerate(zip(launches, expects))
            for problem in check_launch(launch, expect, slots, {**names, **_pointer_names(expect)})]


def _pointer_names(expect: Expect) -> dict:
    """Pointer -> the (first) parameter whose contract is that tensor, in one launch."""
    return {value.data_ptr(): name for name, value in reversed(list(expect.args.items()))
            if hasattr(value, "data_ptr")}


def _same_arguments(a: Launch, b: Launch) -> list[str]:
    return [name for name in a.args if not (a.args[name] is b.args[name] or (
        not hasattr(a.args[name], "data_ptr") and a.args[name] == b.args[name]))]


def check_cached(first: list[Launch], second: list[Launch], loads_before: int) -> list[str]:
    """The second call took Triton's in-memory cache: each launch the same compiled kernel, nothing loaded."""
    problems = [f"the second call loaded {_LOADS[loads_before:]}: compiled again"] if len(_LOADS) > loads_before else []
    problems += [f"{b.kernel} (launch {i}): the second call reached another compiled kernel"
                 for i, (a, b) in enumerate(zip(first, second)) if a.compiled is not b.compiled]
    return problems


def check_public_form(launches: list[Launch]) -> list[str]:
    """Each launch replayed as ``kernel[grid](**arguments_by_name, **options)`` reaches the same
    compiled kernel with the same arguments and grid, compiling nothing."""
    problems = []
    for i, launch in enumerate(launches):
        loads = len(_LOADS)
        with recording() as replay:
            launch.jit[launch.grid](**launch.args, **launch.options)
        where = f"{launch.kernel} (launch {i}) as kernel[grid](**by_name)"
        if len(replay) != 1:
            problems.append(f"{where}: {len(replay)} launches")
            continue
        again = replay[0]
        if again.compiled is not launch.compiled or len(_LOADS) > loads:
            problems.append(f"{where}: reached another compiled kernel")
        if again.grid != launch.grid:
            problems.append(f"{where}: grid {again.grid}, the launcher's {launch.grid}")
        problems += [f"{where}: {name} differs" for name in _same_arguments(launch, again)]
    return problems


# ----------------------------------------------------------------- running a case
@dataclasses.dataclass
class Report:
    case: str
    problems: list[str]
    kernels: list[str]        # as launched
    loads: int                # compiled kernels loaded by the first call (new to this process)
    first_seconds: float      # the first call: bind, specialise, compile (or Triton's disk cache)
    cached_seconds: float     # the second call, from Triton's in-memory cache


def run_case(case_id: str, plant: Optional[tuple[str, str, str]] = None) -> Report:
    """Run case ``case_id`` twice and replay its launches in the public form; ``plant`` =
    (kernel, parameter, parameter): swap those arguments of every launch of that kernel (a
    binding bug on purpose: the tests of this harness)."""
    global _PLANT
    install()
    case = cases()[case_id]
    _PLANT = plant
    try:
        loads = len(_LOADS)
        t0 = time.perf_counter()
        with recording() as first:
            expects = case.run()
        t1 = time.perf_counter()
        problems = check_case(first, expects)
        loaded = len(_LOADS)
        t2 = time.perf_counter()
        with recording() as second:
            expects = case.run()
        t3 = time.perf_counter()
        problems += [f"second call: {p}" for p in check_case(second, expects)]
        problems += check_cached(first, second, loaded)
        problems += check_public_form(first)
        if {launch.kernel for launch in first} != set(case.kernels):
            problems.append(f"launched {[launch.kernel for launch in first]}; the case declares {case.kernels}")
    finally:
        _PLANT = None
    return Report(case_id, problems, [launch.kernel for launch in first], loaded - loads, t1 - t0, t3 - t2)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--filter", default="", help="only case ids containing this")
    ap.add_argument("--plant", default="", help="KERNEL:ARG:ARG, arguments to swap (the harness must fail)")
    args = ap.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"  # before Triton is imported
    tools, why = gpuc.nvidia_tools()
    if tools is None:
        print(f"cannot compile for NVIDIA GPUs: {why}", file=sys.stderr)
        return 2
    plant = tuple(args.plant.split(":")) if args.plant else None
    ids = [case_id for case_id in cases() if args.filter in case_id]
    print(f"triton {tools['triton']}, {len(ids)} cases")
    bad, start = 0, time.perf_counter()
    for case_id in ids:
        report = run_case(case_id, plant)
        bad += bool(report.problems)
        print(f"{case_id:72s} {report.loads:2d} compiled {report.first_seconds:6.2f} s, cached "
              f"{1e3 * report.cached_seconds:6.2f} ms  {'FAILED' if report.problems else 'ok'}", flush=True)
        for problem in report.problems:
            print(f"    {problem}")
    print(f"\n{bad} of {len(ids)} cases with problems; {time.perf_counter() - start:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
