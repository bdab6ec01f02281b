"""lf.lora_linear: output and every gradient against the float64 reference.

Under TRITON_INTERPRET=1 (set by conftest without CUDA) these run the Triton
kernels themselves; outputs are poisoned with NaN before each launch.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import lora_fused as lf
from lora_fused.kernels import lora_linear as kernels
from lora_cases import DEVICE, assert_matches_reference, make_inputs, rel_error, run_op

DTYPES = [torch.float32, torch.float16]

# (M, in, out, r): odd sizes, r=1, ranks that are not powers of two, two above 32
# (r=33 and 80: padded ranks above FUSED_SHRINK_MAX_RANK=32 take the shrink_first
# strategy), M=1 and M > 64 (decode and prefill configs).
SHAPES = [
    (1, 19, 100, 1),
    (7, 100, 129, 3),
    (33, 129, 19, 8),
    (130, 100, 129, 16),
    (7, 19, 19, 33),
    (33, 129, 100, 80),
    (130, 19, 129, 1),
    (1, 129, 129, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,in_features,out_features,r", SHAPES)
def test_matches_reference(M, in_features, out_features, r, dtype):
    inp = make_inputs(M, in_features, out_features, r, dtype, bias=True, seed=M + r)
    assert_matches_reference(inp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_bias(dtype):
    assert_matches_reference(make_inputs(33, 100, 129, 8, dtype, bias=False))


@pytest.mark.parametrize("lead", [(2, 3), (1,), (2, 1, 2)])
def test_leading_batch_dims(lead):
    inp = make_inputs(5, 19, 33, 4, lead=lead)
    errors = assert_matches_reference(inp)
    assert errors["y"] <= 1e-5


def test_non_contiguous_x():
    inp = make_inputs(33, 100, 129, 8)
    base = torch.randn(100, 2 * 33, generator=torch.Generator().manual_seed(3))
    inp.x = base[:, ::2].t()  # [33, 100] with strides (2, 66)
    assert not inp.x.is_contiguous()
    assert_matches_reference(inp)


def test_transposed_weight_view():
    inp = make_inputs(7, 19, 33, 3)
    inp.weight = inp.weight.t().contiguous().t()  # column-major [out, in]
    assert not inp.weight.is_contiguous()
    assert_matches_reference(inp)


def test_base_weight_and_bias_gradients_when_trained():
    assert_matches_reference(make_inputs(33, 19, 100, 8), grad_weight=True)


def test_only_lora_gradients_when_x_is_frozen():
    inp = make_inputs(7, 19, 33, 3)
    A = inp.lora_A.clone().requires_grad_()
    B = inp.lora_B.clone().requires_grad_()
    y = lf.lora_linear(inp.x, inp.weight, A, B, inp.scaling, inp.bias)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    # dB = s · gyᵀ (x Aᵀ), dA = s · (gy B)ᵀ x, in float64
    gy, x = grad_y.double(), inp.x.double()
    ref_A = inp.scaling * (gy @ inp.lora_B.double()).t() @ x
    ref_B = inp.scaling * gy.t() @ (x @ inp.lora_A.double().t())
    assert rel_error(A.grad, ref_A) <= 1e-5 and rel_error(B.grad, ref_B) <= 1e-5


def test_only_input_gradient_when_lora_is_frozen():
    inp = make_inputs(7, 19, 33, 3)
    x = inp.x.clone().requires_grad_()
    y = lf.lora_linear(x, inp.weight, inp.lora_A, inp.lora_B, inp.scaling, inp.bias)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    ref = (grad_y.double() @ inp.weight.double()
           + inp.scaling * (grad_y.double() @ inp.lora_B.double()) @ inp.lora_A.double())
    assert rel_error(x.grad, ref) <= 1e-5


def test_empty_batch():
    inp = make_inputs(0, 19, 33, 3)
    y, grads, _ = run_op(inp)
    assert y.shape == (0, 33)
    assert grads["x"].shape == (0, 19)
    assert torch.equal(grads["lora_A"], torch.zeros_like(inp.lora_A))
    assert torch.equal(grads["lora_B"], torch.zeros_like(inp.lora_B))


def test_scaling_is_applied():
    inp = make_inputs(7, 19, 33, 3, scaling=3.0)
    assert_matches_reference(inp)


def test_triton_kernels_ran_under_interpreter():
    if torch.cuda.is_available() or not lf.dispatch.backend.interpreter_enabled():
        pytest.skip("checks the interpreter path of CPU CI")
    before = kernels.LAUNCH_COUNTS.copy()
    run_op(make_inputs(7, 19, 33, 3))
    launched = kernels.LAUNCH_COUNTS - before
    assert launched["lora_gemm_kernel"] == 2  # forward + dX
    assert launched["lora_grad_ds_db_kernel"] == 1
    assert launched["lora_grad_a_kernel"] == 1


def test_torch_backend_override_runs_no_kernel(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    before = kernels.LAUNCH_COUNTS.copy()
    assert_matches_reference(make_inputs(7, 19, 33, 3))
    assert kernels.LAUNCH_COUNTS == before


def test_float64_uses_the_torch_backend():
    assert lf.select_backend(torch.device("cpu"), torch.float64) == "torch"
    before = kernels.LAUNCH_COUNTS.copy()
    inp = make_inputs(7, 19, 33, 3, torch.float64)
    y = lf.lora_linear(inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.scaling, inp.bias)
    ref = lf.lora_linear_reference(inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.scaling, inp.bias)
    assert rel_error(y, ref) <= 1e-12
    assert kernels.LAUNCH_COUNTS == before


def test_backends_agree(monkeypatch):
    inp = make_inputs(33, 100, 19, 8)
    y_default, grads_default, _ = run_op(inp)
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    y_torch, grads_torch, _ = run_op(inp)
    assert rel_error(y_default, y_torch) <= 1e-5
    for name in grads_torch:
        assert rel_error(grads_default[name], grads_torch[name]) <= 1e-5, name


@pytest.mark.parametrize("r,shrink_launches", [(8, 0), (80, 1)])
def test_forward_strategies_give_the_same_result(r, shrink_launches):
    """The fused strategy (forced: on CUDA the default is the measured choice): padded rank
    <= FUSED_SHRINK_MAX_RANK (32) runs the fused K loop (one GEMM launch); above it the
    shrink_first pair (the shrink kernel, then the GEMM). Both match the reference."""
    inp = make_inputs(130, 19, 33, r)
    if lf.select_backend(inp.x.device, inp.x.dtype) == "triton":
        before = kernels.LAUNCH_COUNTS.copy()
        with torch.no_grad(), lf.use_strategy(forward="fused"):
            lf.lora_linear(inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.scaling, inp.bias)
        launched = dict(kernels.LAUNCH_COUNTS - before)
        assert launched == {"lora_gemm_kernel": 1, **({"lora_shrink_kernel": 1} if shrink_launches else {})}
    assert_matches_reference(inp)


@settings(max_examples=20, deadline=None)
@given(M=st.integers(0, 70), in_features=st.integers(1, 70), out_features=st.integers(1, 70),
       r=st.integers(1, 40), bias=st.booleans(), dropout_p=st.sampled_from([0.0, 0.25]),
       dtype=st.sampled_from(DTYPES))
def test_property_random_shapes(M, in_features, out_features, r, bias, dropout_p, dtype):
    """Any shape: the error is measured against Σ|terms| (see assert_matches_reference),
    since tiny shapes make single-sum outputs whose ‖ref‖ can cancel to near zero."""
    inp = make_inputs(M, in_features, out_features, r, dtype, bias=bias, seed=M * 7 + r)
    if M == 0:
        y, grads, _ = run_op(inp, dropout_p=dropout_p, training=True)
        assert y.shape == (0, out_features) and grads["x"].shape == (0, in_features)
        return
    assert_matches_reference(inp, dropout_p=dropout_p, training=True, conditioned=True)


@pytest.fixture
def restore_tf32_flags():
    matmul = torch.backends.cuda.matmul
    saved = getattr(matmul, "fp32_precision", None)
    yield matmul
    if saved is not None:
        matmul.fp32_precision = saved


def test_fp32_dots_follow_torch_tf32_setting(restore_tf32_flags):
    """fp32 → tf32 only when torch allows it; 16-bit inputs are unaffected."""
    matmul = restore_tf32_flags
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    matmul.fp32_precision = "tf32"
    assert kernels.dot_precision(torch.float32) == "tf32"
    assert kernels.dot_precision(torch.float16) == "ieee"
    matmul.fp32_precision = "ieee"
    assert kernels.dot_precision(torch.float32) == "ieee"
    matmul.fp32_precision = "none"  # inherit: reading the legacy flag now raises in torch; handled
    assert kernels.dot_precision(torch.float32) in ("ieee", "tf32")


def test_input_gradient_only_skips_lora_partials():
    """A and B frozen: the backward launches the dS and dX kernels, never the dA partials."""
    if lf.select_backend(torch.device(DEVICE), torch.float32) != "triton":
        pytest.skip("the Triton backend does not run for these tensors")
    before = kernels.LAUNCH_COUNTS.copy()
    with lf.use_strategy(forward="fused", backward="fused"):  # the Triton GEMMs (CUDA's default may differ)
        test_only_input_gradient_when_lora_is_frozen()
    launched = kernels.LAUNCH_COUNTS - before
    assert launched["lora_gemm_kernel"] == 2  # forward + dX
    assert launched["lora_grad_ds_db_kernel"] == 1
    assert launched["lora_grad_a_kernel"] == 0
