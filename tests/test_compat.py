"""Every private PyTorch / Triton / CPython route lora-fused takes, against its public fallback.

Each private route is taken only where it exists and behaves as documented (lora_fused/_compat.py,
kernels/common.py, kernels/host.py); otherwise the public route runs. Each test here forces the
fallback (monkeypatch) and checks it gives what the private route gives.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lora_fused as lf
from lora_cases import DEVICE
from lora_fused import _compat
from lora_fused.dispatch import backend
from lora_fused.kernels import host
from lora_fused.ops import _scaffold, delta, lora_linear as lora_ops

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------- autograd and autocast (lora_fused/_compat.py)
BACKENDS = ["default", "torch"]
#: Device types torch.is_autocast_enabled accepts (some of which the private query does not read).
AUTOCAST_DEVICES = ["cpu", "cuda", "xpu", "ipu", "xla", "hpu", "privateuseone", "mtia", "mps", "maia"]


@pytest.fixture(params=BACKENDS)
def either_backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    return request.param


def test_autograd_private_lookup_is_none_for_a_missing_api():
    """The lookup behind every entry: a missing attribute anywhere on the path gives None, so the
    entry takes its public fallback."""
    fn = object()
    owner = SimpleNamespace(inner=SimpleNamespace(fn=fn))
    assert _compat._private(owner, "inner", "fn") is fn
    assert _compat._private(owner, "inner", "gone") is None
    assert _compat._private(owner, "gone", "fn") is None


def _lora_call_and_grads(x, w, b, A, B):
    """lf.lora_linear with dropout in training (the eager Function's route on both backends):
    y and the gradients of x, A, B, the dropout seed drawn after torch.manual_seed(5)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    torch.manual_seed(5)
    y = lf.lora_linear(leaves[0], w, leaves[1], leaves[2], 1.5, b, dropout_p=0.25, training=True)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    return (y.detach(), *grads)


def _multi_call_and_grads(x, w, b, A, B, plan, scalings):
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    y = lf.multi_lora_linear(leaves[0], w, leaves[1], leaves[2], plan, scalings, b)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    return (y.detach(), *grads)


def _force_public_apply(monkeypatch, fallback: str) -> None:
    """The eager Function's apply without one private piece (a fresh cache of direct applies)."""
    monkeypatch.setattr(_scaffold, "_direct_apply", {})
    if fallback == "function_apply":  # the C++ apply missing
        monkeypatch.setattr(_scaffold, "direct_apply", _compat.function_apply)
    elif fallback == "keep_tensor":  # unwrap_if_dead missing: the direct apply falls back too
        monkeypatch.setattr(_compat, "unwrap_if_dead", _compat.keep_tensor)
        monkeypatch.setattr(_scaffold, "unwrap_if_dead", _compat.keep_tensor)
    elif fallback == "no_function_base":
        monkeypatch.delattr(torch._C, "_FunctionBase")
    else:  # _are_functorch_transforms_active missing: every call takes Function.apply
        monkeypatch.setattr(_scaffold, "functorch_transforms_active", _compat.transforms_maybe_active)


@pytest.mark.parametrize("fallback", ["function_apply", "keep_tensor", "no_function_base",
                                      "transforms_maybe_active"])
def test_autograd_apply_fallbacks_match_the_direct_apply(either_backend, monkeypatch, fallback):
    """The eager Functions (single and multi-adapter) applied by the public route give the direct
    apply's outputs and gradients bit for bit."""
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(6, 20, generator=g), torch.randn(12, 20, generator=g), torch.randn(12, generator=g)
    A, B = torch.randn(4, 20, generator=g), torch.randn(12, 4, generator=g)
    mA, mB = torch.randn(3, 4, 20, generator=g), torch.randn(3, 12, 4, generator=g)
    plan = lf.plan_segments(torch.tensor([0, 2, -1, 1, 1, 0]), 3)
    scalings = torch.tensor([0.5, 2.0, 1.5])
    private = (_lora_call_and_grads(x, w, b, A, B), _multi_call_and_grads(x, w, b, mA, mB, plan, scalings))
    _force_public_apply(monkeypatch, fallback)
    public = (_lora_call_and_grads(x, w, b, A, B), _multi_call_and_grads(x, w, b, mA, mB, plan, scalings))
    for got, expected in zip(public, private):
        for g_t, e_t in zip(got, expected):
            assert torch.equal(g_t, e_t)
    if fallback != "transforms_maybe_active":  # the apply the fresh cache holds is the public one
        applied = _scaffold._direct_apply[lora_ops.LORA_LINEAR.function]
        assert applied == lora_ops.LORA_LINEAR.function.apply


def test_autograd_direct_apply_falls_back_to_function_apply(monkeypatch):
    function = lora_ops.LORA_LINEAR.function
    assert _compat.direct_apply(function) != function.apply  # the C++ apply, where it exists
    monkeypatch.delattr(torch._C, "_FunctionBase")
    assert _compat.direct_apply(function) == function.apply
    monkeypatch.undo()
    monkeypatch.setattr(_compat, "unwrap_if_dead", _compat.keep_tensor)
    assert _compat.direct_apply(function) == function.apply


def test_autograd_dead_functorch_wrapper_is_handled_on_both_routes(monkeypatch):
    """x left over from a finished torch.func transform: unwrapped by the private route, passed
    to Function.apply by the public one; the same numbers either way."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    leaked = []
    x = torch.randn(3, 8)
    torch.func.grad(lambda t: leaked.append(t) or t.sum())(x)
    dead = leaked[0]
    w, b = torch.randn(6, 8), torch.randn(6)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    expected = _lora_call_and_grads(x, w, b, A, B)
    assert all(torch.equal(g, e) for g, e in zip(_lora_call_and_grads(dead, w, b, A, B), expected))
    _force_public_apply(monkeypatch, "keep_tensor")
    assert all(torch.equal(g, e) for g, e in zip(_lora_call_and_grads(dead, w, b, A, B), expected))


@pytest.mark.parametrize("device", AUTOCAST_DEVICES)
def test_autograd_any_autocast_fallback_matches_the_private_query(device):
    """The public route asks torch.is_autocast_enabled per device type: the same answer as
    torch._C._is_any_autocast_enabled with autocast off, and on for each device type."""
    private = torch._C._is_any_autocast_enabled
    assert _compat.autocast_enabled_on_a_device() == private() is False
    was = torch.is_autocast_enabled(device)
    torch.set_autocast_enabled(device, True)
    try:
        assert _compat.autocast_enabled_on_a_device() == private()
    finally:
        torch.set_autocast_enabled(device, was)
    assert _compat.autocast_enabled_on_a_device() == private() is False


def test_autograd_any_autocast_fallback_in_the_layer_call(monkeypatch):
    """LoRALinear's eager call with the public autocast query: the same outputs and gradients,
    with autocast off (the layer's fast path) and on (the general route, bf16)."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    torch.manual_seed(0)
    layer = lf.LoRALinear(16, 12, r=4)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)

    def run():
        results = []
        for autocast in (False, True):
            layer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = layer(x)
            y.float().sum().backward()
            results += [y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
        return results

    private = run()
    monkeypatch.setattr(lora_ops, "any_autocast_enabled", _compat.autocast_enabled_on_a_device)
    assert all(torch.equal(p, q) for p, q in zip(private, run()))


def _overlap_cases():
    base = torch.randn(4, 6)
    return {
        "contiguous": base,
        "transposed": base.t(),
        "strided slice": base[:, ::2],
        "expanded": torch.randn(4, 1).expand(4, 6),
        "stride 0, size 1": torch.randn(6).as_strided((1, 6), (0, 1)),
        "overlapping strides": torch.randn(20).as_strided((3, 3), (1, 1)),
        "empty": torch.randn(0, 6),
    }


@pytest.mark.parametrize("case", list(_overlap_cases()))
def test_autograd_overlap_fallback_matches_the_private_query(case):
    tensor = _overlap_cases()[case]
    assert _compat.strides_overlap(tensor) == (torch._debug_has_internal_overlap(tensor) == 1)


def test_autograd_overlap_fallback_refuses_the_same_outputs(monkeypatch):
    """add_lora refuses an expanded y (and accepts a plain one) with the public route too."""
    x, A, B = torch.randn(4, 8), torch.randn(2, 3, 8), torch.randn(2, 6, 3)
    ids, scalings = torch.tensor([0, 1, -1, 0]), torch.tensor([1.0, 0.5])
    for use_fallback in (False, True):
        if use_fallback:
            monkeypatch.setattr(_compat, "_debug_overlap", None)
        with pytest.raises(ValueError, match="overlapping memory"):
            delta.add_lora(torch.zeros(4, 1).expand(4, 6), x, A, B, ids, scalings)
        y = torch.zeros(4, 6)
        assert delta.add_lora(y, x, A, B, ids, scalings) is y


# ------------------------------------------------- environment and precision, the kernels' launch
# ----------------------------------------------------------------- os.environ._data (kernels/host.py)
VARIABLE = "LORA_FUSED_TEST_COMPAT_VARIABLE"


def test_the_private_environment_route_is_taken_here():
    """On POSIX CPython the private dict is the route (else this whole family is the fallback's)."""
    if os.name != "posix":
        pytest.skip("os.environ._data is POSIX CPython's")
    assert host._ENVIRON_DATA is os.environ._data


@pytest.mark.parametrize("value", [None, "", "1", "0", "triton", "é ü"])
def test_environment_fallback_reads_what_the_private_route_reads(monkeypatch, value):
    """Set, changed and unset variables read the same by both routes, including after a change
    made through os.environ (monkeypatch.setenv) once the readers exist."""
    readers = {}
    for private in (True, False):
        with monkeypatch.context() as m:
            if not private:
                m.setattr(host, "_ENVIRON_DATA", None)
            get, (key,) = host.env_lookup(VARIABLE)
            readers[private] = (get, key, host.env_raw(value) if value is not None else None,
                                host.env_raw("other"))
    if value is None:
        monkeypatch.delenv(VARIABLE, raising=False)
    else:
        monkeypatch.setenv(VARIABLE, value)
    for get, key, expected, _ in readers.values():
        assert get(key) == expected
    monkeypatch.setenv(VARIABLE, "other")
    for get, key, _, other in readers.values():
        assert get(key) == other
    monkeypatch.delenv(VARIABLE)
    for get, key, _, _ in readers.values():
        assert get(key) is None


class FakeEnviron(dict):
    """An os.environ look-alike whose private ``_data`` can disagree with it."""

    def __init__(self, items, data):
        super().__init__(items)
        self._data = data

    @staticmethod
    def encodekey(name):
        return name.encode()

    @staticmethod
    def encodevalue(value):
        return value.encode()


@pytest.mark.skipif(os.name != "posix", reason="the private route exists on POSIX only")
def test_a_private_environ_dict_that_disagrees_is_not_taken():
    agreeing = FakeEnviron({"A": "1", "B": "x"}, {b"A": b"1", b"B": b"x"})
    assert host._private_environ_data(agreeing) is agreeing._data
    assert host._private_environ_data(FakeEnviron({"A": "1"}, {b"A": b"2"})) is None   # another value
    assert host._private_environ_data(FakeEnviron({"A": "1"}, {"A": "1"})) is None     # keyed otherwise
    assert host._private_environ_data(FakeEnviron({"A": "1"}, [("A", "1")])) is None   # not a dict


@pytest.mark.parametrize("forced", [None, "torch", "triton", " Torch "])
def test_backend_choice_by_the_fallback_is_the_private_routes(monkeypatch, forced):
    """dispatch/backend.py reads LORA_FUSED_BACKEND and TRITON_INTERPRET per call: the same
    decisions (select_backend, use_triton) through os.environ itself."""
    if forced is None:
        monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(backend.BACKEND_ENV, forced)
    x, w = torch.randn(3, 5), torch.randn(4, 5)

    def decisions():
        monkeypatch.setattr(backend, "_decisions", {})
        out = []
        for dtype in (torch.float32, torch.float64):
            try:
                out.append(backend.backend_for("cpu", dtype))
            except (TypeError, ValueError) as e:
                out.append(type(e))
        try:
            out.append(backend.use_triton(x, w))
        except (TypeError, ValueError) as e:
            out.append(type(e))
        return out

    private = decisions()
    with monkeypatch.context() as m:
        m.setattr(host, "_ENVIRON_DATA", None)
        get, keys = host.env_lookup(backend.BACKEND_ENV, backend.INTERPRET_ENV)
        m.setattr(backend, "_env_get", get)
        m.setattr(backend, "_BACKEND_KEY", keys[0])
        m.setattr(backend, "_INTERPRET_KEY", keys[1])
        assert decisions() == private


def test_interpreting_by_the_fallback_is_the_private_routes(monkeypatch):
    common = pytest.importorskip("lora_fused.kernels.common")
    private = common.interpreting()
    with monkeypatch.context() as m:
        m.setattr(host, "_ENVIRON_DATA", None)
        get, (key,) = host.env_lookup("TRITON_INTERPRET")
        m.setattr(common, "_env_get", get)
        m.setattr(common, "_INTERPRET_KEY", key)
        m.setattr(common, "_ON", host.env_raw("1"))
        assert common.interpreting() == private
        for value, expected in (("1", True), ("0", False), ("", False)):
            m.setenv("TRITON_INTERPRET", value)
            assert common.interpreting() is expected
    assert common.interpreting() == private


# ----------------------------------------------------------------- torch._C's TF32 getters (kernels/common.py)
TF32_SCRIPT = textwrap.dedent("""
    import json, torch
    from lora_fused.kernels import common

    def both():
        private = common.tf32_matmul_enabled()
        saved = common._FP32_PRECISION, common._LEGACY_TF32
        common._FP32_PRECISION = common._LEGACY_TF32 = None
        try:
            return private, common.tf32_matmul_enabled()
        finally:
            common._FP32_PRECISION, common._LEGACY_TF32 = saved

    matmul = torch.backends.cuda.matmul
    rows = [("taken", common._FP32_PRECISION is not None, common._LEGACY_TF32 is not None)]
    rows.append(("start",) + both())
    for legacy in (True, False):                      # the legacy flag alone
        matmul.allow_tf32 = legacy
        rows.append((f"allow_tf32={legacy}",) + both())
    for generic in ("tf32", "ieee", "none"):          # the new API, then a mix with the legacy flag
        for op in ("tf32", "ieee", "none"):
            torch.backends.fp32_precision = generic
            matmul.fp32_precision = op
            rows.append((f"generic={generic} matmul={op}",) + both())
    print(json.dumps(rows))
""")


def test_tf32_fallback_answers_as_the_private_getters():
    """tf32_matmul_enabled through the public properties equals the torch._C getters' answer
    for the legacy flag, every (generic, matmul) precision and the legacy/new mix. In a process
    of its own: the precision settings are process-wide and the mix cannot be undone."""
    import json
    pytest.importorskip("triton")
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    out = subprocess.run([sys.executable, "-c", TF32_SCRIPT], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert rows[0] == ["taken", True, True], rows[0]  # the private getters are this torch's route
    answers = {row[0]: row[1:] for row in rows[1:]}
    for setting, (private, public) in answers.items():
        assert private == public, setting
    assert {private for private, _ in answers.values()} == {True, False}
    assert answers["generic=ieee matmul=tf32"] == [True, True]
    assert answers["generic=tf32 matmul=none"] == [True, True]
    assert answers["generic=tf32 matmul=ieee"] == [False, False]


def test_a_private_getter_that_answers_otherwise_is_not_taken(monkeypatch):
    common = pytest.importorskip("lora_fused.kernels.common")
    monkeypatch.setattr(torch._C, "_lora_fused_test_getter", lambda *a: "tf32", raising=False)
    assert common._private_getter("_lora_fused_test_getter", lambda: "tf32", "cuda", "matmul") is not None
    assert common._private_getter("_lora_fused_test_getter", lambda: "ieee", "cuda", "matmul") is None
    assert common._private_getter("_lora_fused_test_absent", lambda: "ieee") is None

    def refuses(*args):
        raise TypeError("a changed signature")
    monkeypatch.setattr(torch._C, "_lora_fused_test_getter", refuses)
    assert common._private_getter("_lora_fused_test_getter", lambda: "ieee", "cuda", "matmul") is None


# ----------------------------------------------------------------- JITFunction.run (kernels/common.py)
def test_run_signature_check():
    """The private ``run`` is taken for Triton's kernel types (compiled and interpreted), and
    refused for a ``run`` of another signature."""
    common = pytest.importorskip("lora_fused.kernels.common")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    assert common._run_takes_launch_keywords(JITFunction)
    assert common._run_takes_launch_keywords(InterpretedFunction)
    assert common.RUN_IS_LAUNCH
    assert common.runner(common.load_tile) == common.load_tile.run

    class Renamed:
        def run(self, *args, grid, **kwargs):  # no warmup keyword
            pass

    class Positional:
        def run(self, grid, warmup, *args, **kwargs):
            pass
    assert not common._run_takes_launch_keywords(Renamed)
    assert not common._run_takes_launch_keywords(Positional)
    assert not common._run_takes_launch_keywords(object)


def _lora_linear_outputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 45, generator=g, dtype=torch.float32).to(DEVICE).requires_grad_()
    w, b = torch.randn(51, 45, generator=g).to(DEVICE) / 7, torch.randn(51, generator=g).to(DEVICE)
    a = (torch.randn(5, 45, generator=g) / 7).to(DEVICE).requires_grad_()
    bb = torch.randn(51, 5, generator=g).to(DEVICE).requires_grad_()
    outs = []
    for fwd, bwd in (("fused", "fused"), ("shrink_first", "composite"), ("composite", "fused")):
        for p in (0.0, 0.25):
            torch.manual_seed(0)
            with lf.use_strategy(forward=fwd, backward=bwd):
                y = lf.lora_linear(x, w, a, bb, 0.75, b, dropout_p=p, training=True)
            grads = torch.autograd.grad(y, (x, a, bb), torch.ones_like(y))
            outs += [y.detach(), *grads]
    return outs


def _multi_lora_outputs():
    g = torch.Generator().manual_seed(4)
    T, K, N, n, r = 10, 37, 45, 3, 8
    x = torch.randn(T, K, generator=g).to(DEVICE).requires_grad_()
    w, b = (torch.randn(N, K, generator=g) / 6).to(DEVICE), torch.randn(N, generator=g).to(DEVICE)
    A = (torch.randn(n, r, K, generator=g) / 6).to(DEVICE).requires_grad_()
    B = torch.randn(n, N, r, generator=g).to(DEVICE).requires_grad_()
    ids = torch.tensor([2, -1, 0, 2, 1, 1, -1, 0, 2, 0]).to(DEVICE)
    scalings = torch.tensor([0.5, 2.0, 1.0]).to(DEVICE)
    outs = []
    for regime in ("decode", "prefill", "prefill_cublas"):
        with lf.use_strategy(multi_lora=regime):
            y = lf.multi_lora_linear(x, w, A, B, ids, scalings, b)
        outs += [y.detach(), *torch.autograd.grad(y, (x, A, B), torch.ones_like(y))]
    return outs


def _moe_lora_outputs():
    from lora_fused.kernels import moe_lora
    g = torch.Generator().manual_seed(5)
    P, K, N, E, r = 11, 37, 45, 3, 4
    x = torch.randn(6, K, generator=g).to(DEVICE)
    rows = torch.tensor([0, 3, 5, 1, 1, 2, 4, 0, 5, 3, 2]).to(DEVICE)
    w, b = (torch.randn(E, N, K, generator=g) / 6).to(DEVICE), torch.randn(E, N, generator=g).to(DEVICE)
    A, B = (torch.randn(E, r, K, generator=g) / 6).to(DEVICE), torch.randn(E, N, r, generator=g).to(DEVICE)
    offsets = torch.tensor([4, 4, 9], dtype=torch.int32).to(DEVICE)
    seed = torch.tensor([7], dtype=torch.int64).to(DEVICE)
    y, S = moe_lora.grouped_lora_forward(x, rows, w, b, A, B, offsets, 2.0, 0.2, seed)
    grads = moe_lora.grouped_lora_backward(torch.ones_like(y), x, rows, w, A, B, S, offsets, 2.0, 0.2, seed,
                                           True, True)
    return [y, S, *grads, moe_lora.grouped_linear_forward(x, rows, w, b, offsets)]


@pytest.mark.parametrize("family,outputs,kernels", [  # the families whose launchers call run
    ("lora_linear", _lora_linear_outputs, {"lora_gemm_kernel", "lora_shrink_kernel", "lora_expand_add_kernel",
                                           "lora_grad_ds_db_kernel", "lora_grad_a_kernel"}),
    ("multi_lora", _multi_lora_outputs, {"multi_lora_shrink_kernel", "multi_lora_expand_kernel",
                                         "multi_lora_segment_grad_kernel"}),
    ("moe_lora", _moe_lora_outputs, {"moe_chunk_table_kernel", "moe_lora_shrink_kernel", "moe_lora_expand_kernel",
                                     "moe_lora_segment_grad_kernel"}),
])
def test_public_launch_gives_what_run_gives(monkeypatch, family, outputs, kernels):
    """The launchers of each family that call ``JITFunction.run``, forced onto the public
    ``kernel[grid](...)`` (``common.public_runner``, the route where ``run`` is not the expected
    method): every kernel of the family runs that way, and the outputs and gradients are bit for
    bit those of the private route."""
    if lf.select_backend(torch.device(DEVICE), torch.float32) != "triton":
        pytest.skip("the Triton kernels do not run here (no CUDA, no TRITON_INTERPRET=1)")
    common = pytest.importorskip("lora_fused.kernels.common")
    module = pytest.importorskip(f"lora_fused.kernels.{family}")
    private = outputs()
    public_launches = []
    public_run = common._public_run

    def counted(kernel, *args, **kwargs):
        public_launches.append(kernel.fn.__name__)
        return public_run(kernel, *args, **kwargs)
    monkeypatch.setattr(module, "runner", common.public_runner)
    monkeypatch.setattr(common, "_public_run", counted)
    public = outputs()
    assert set(public_launches) == kernels
    assert len(public) == len(private)
    for got, expected in zip(public, private):
        assert torch.equal(got, expected)
