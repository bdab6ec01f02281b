"""Eager calls take a plain autograd Function (or the forward alone); torch.compile takes the
custom ops. Both routes run the same forward and backward: bit-identical results, dropout included."""
from __future__ import annotations

import pytest
import torch

import lora_fused as lf
from lora_fused.ops import lora_linear as ops, multi_lora as multi_ops

BACKENDS = ["default", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    return request.param


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads_of(y, leaves, grad_y):
    return torch.autograd.grad(y, leaves, grad_y)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_single_routes_are_bit_identical(backend, dropout_p):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(9, 21, generator=g), torch.randn(17, 21, generator=g), torch.randn(17, generator=g)
    A, B = torch.randn(5, 21, generator=g), torch.randn(17, 5, generator=g)
    seed = torch.tensor([123456789], dtype=torch.int64) if dropout_p else None
    grad_y = torch.randn(9, 17, generator=g)
    results = []
    for route in ("function", "custom_op"):
        leaves = _leaves(x, A, B)
        inputs = (leaves[0], w, b, leaves[1], leaves[2], 1.7, dropout_p, seed)
        y = (ops.LORA_LINEAR.function.apply(*inputs) if route == "function"
             else torch.ops.lora_fused.lora_linear_fwd(*inputs)[0])
        results.append((y, *_grads_of(y, leaves, grad_y)))
    for eager, op in zip(*results):
        assert torch.equal(eager, op)
    with torch.no_grad():  # the direct call (no autograd at all)
        assert torch.equal(ops.LORA_LINEAR.forward(x, w, b, A, B, 1.7, dropout_p, seed)[0], results[0][0])


def test_multi_routes_are_bit_identical(backend):
    g = torch.Generator().manual_seed(1)
    n, r, T = 3, 6, 11
    x, w, b = torch.randn(T, 13, generator=g), torch.randn(10, 13, generator=g), torch.randn(10, generator=g)
    A, B = torch.randn(n, r, 13, generator=g), torch.randn(n, 10, r, generator=g)
    scalings, ranks = torch.tensor([0.5, 2.0, 1.5]), torch.tensor([6, 2, 4], dtype=torch.int32)
    plan = lf.plan_segments(torch.tensor([0, 2, -1, 1, 1, 0, 2, 2, -1, 0, 1]), n)
    grad_y = torch.randn(T, 10, generator=g)
    results = []
    for route in ("function", "custom_op"):
        leaves = _leaves(x, A, B)
        args = (leaves[0], w, b, leaves[1], leaves[2], scalings, ranks)
        y = (multi_ops.MULTI_LORA.function.apply(*args, plan) if route == "function"
             else torch.ops.lora_fused.multi_lora_fwd(*args, plan.packed, plan.regime)[0])
        results.append((y, *_grads_of(y, leaves, grad_y)))
    for eager, op in zip(*results):
        assert torch.equal(eager, op)
    with torch.no_grad():  # the direct call (the launcher or the torch backend, no Function), ids or plan
        for route in (plan, plan.adapter_ids):
            assert torch.equal(lf.multi_lora_linear(x, w, A, B, route, scalings, b, ranks=ranks), results[0][0])


def test_multi_function_refuses_a_plan_rewritten_before_backward(backend):
    """The eager multi-adapter Function saves the plan's packed buffer: a plan updated in place
    (SegmentPlan.update_) between forward and backward is refused, not read with the new ids."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(5, 12, generator=g), torch.randn(7, 12, generator=g)
    A = torch.randn(2, 3, 12, generator=g, requires_grad=True)
    B = torch.randn(2, 7, 3, generator=g)
    plan = lf.plan_segments(torch.tensor([0, 1, 1, -1, 0]), 2)
    y = lf.multi_lora_linear(x, w, A, B, plan, torch.tensor([1.0, 0.5]))
    plan.update_(torch.tensor([1, 0, 0, 1, -1]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_no_grad_call_skips_autograd():
    layer = lf.LoRALinear(8, 6, r=2)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = layer(x)
    assert y.grad_fn is None
    assert layer(x).grad_fn is not None


def _grad_fn_name(y):
    return type(y.grad_fn).__name__


def test_eager_routes_with_grad(monkeypatch):
    """Torch backend, no dropout, contiguous operands: the forward's own ops record autograd
    (no Python Function); dropout, a column-major operand, M = r = 1 or the Triton path
    take the Function."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    layer = lf.LoRALinear(8, 6, r=2, lora_dropout=0.25)
    x = torch.randn(3, 8)
    assert "EagerLoRALinear" in _grad_fn_name(layer(x))  # training: dropout
    layer.eval()
    assert _grad_fn_name(layer(x)) == "AddmmBackward0"
    assert "EagerLoRALinear" in _grad_fn_name(layer(torch.randn(8, 3).t()))
    w, A, B = torch.randn(6, 8), torch.randn(1, 8, requires_grad=True), torch.randn(6, 1, requires_grad=True)
    assert "EagerLoRALinear" in _grad_fn_name(lf.lora_linear(torch.randn(1, 8), w, A, B, 2.0))
    assert _grad_fn_name(lf.lora_linear(torch.randn(2, 8), w, A, B, 2.0)) == "AddmmBackward0"


# (M, in, out, r): M = r = 1 (S is [1, 1]), one-element operands, odd sizes, a larger case.
NATIVE_SHAPES = [(1, 1, 1, 1), (1, 19, 100, 1), (2, 1, 3, 1), (1, 5, 1, 1), (7, 100, 129, 3), (33, 129, 19, 8),
                 (130, 19, 129, 1), (1, 129, 129, 16), (300, 257, 33, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,K,N,r", NATIVE_SHAPES)
def test_eager_call_matches_custom_op_bit_for_bit(monkeypatch, M, K, N, r, dtype):
    """lf.lora_linear eagerly (whatever route it takes) against the custom ops compile uses:
    y and every gradient (x, A, B, and W0, b when they are trained) identical."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    g = torch.Generator().manual_seed(M * 1000 + K)
    x, w, A, B, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((M, K), (N, K), (r, K), (N, r), (N,)))
    grad_y = torch.randn(M, N, generator=g).to(dtype)
    for bias in (b, None):
        results = []
        for route in ("eager", "custom_op"):
            leaves = _leaves(x, w, A, B) + ([] if bias is None else _leaves(bias))
            xl, wl, al, bl = leaves[:4]
            bias_l = None if bias is None else leaves[4]
            y = (lf.lora_linear(xl, wl, al, bl, 1.7, bias_l) if route == "eager"
                 else torch.ops.lora_fused.lora_linear_fwd(xl, wl, bias_l, al, bl, 1.7, 0.0, None)[0])
            results.append((y, *_grads_of(y, leaves, grad_y)))
        for eager, op in zip(*results):
            assert torch.equal(eager, op)


def test_compiled_dropout_model_matches_eager_bit_for_bit():
    """aot_eager draws the seed from the same generator as eager: the same mask, the same numbers."""
    torch.manual_seed(0)
    layer = lf.LoRALinear(16, 12, r=4, lora_dropout=0.25)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    outs = []
    for model in (layer, compiled):
        layer.zero_grad()
        torch.manual_seed(42)
        y = model(x)
        y.square().sum().backward()
        outs.append((y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for eager, comp in zip(*outs):
        assert torch.equal(eager, comp)


def _layer_with_random_adapter(K=21, N=17, r=5, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(K * N + r)
    layer = lf.LoRALinear(K, N, r=r, lora_alpha=2.0 * r, bias=bias, dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(dtype))
    return layer


def _layer_and_lora_linear(layer, x, grad_y, grad, dropout_p):
    """[(y, and with grad dX, dA, dB) of the layer's call, the same of lf.lora_linear], each
    after torch.manual_seed(11) (the dropout seed's draw)."""
    results = []
    for route in ("layer", "function"):
        xl = x.clone().requires_grad_(grad)
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        with torch.set_grad_enabled(grad):
            y = layer(xl) if route == "layer" else lf.lora_linear(
                xl, layer.weight, layer.lora_A, layer.lora_B, layer.scaling, layer.bias, dropout_p=dropout_p,
                training=layer.training)
        assert y.shape == (*x.shape[:-1], 17)
        if grad:
            y.backward(grad_y)
            results.append((y.detach(), xl.grad, layer.lora_A.grad, layer.lora_B.grad))
        else:
            results.append((y,))
    return results


@pytest.mark.parametrize("shape", [(9, 21), (2, 5, 21), (3, 1, 4, 21), (0, 21), (2, 0, 21)], ids=str)
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_layer_call_matches_lora_linear_bit_for_bit(backend, shape, grad, bias, dropout_p):
    """LoRALinear's eager call (ops.lora_linear_layer_call) gives lf.lora_linear's output and
    gradients bit for bit, for 2-D, 3-D, 4-D and empty x, on both backends; with dropout in
    training it draws the same seed and runs the same Function."""
    layer = _layer_with_random_adapter(bias=bias)
    layer.lora_dropout = dropout_p
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    grad_y = torch.randn(*shape[:-1], 17, generator=torch.Generator().manual_seed(4))
    results = _layer_and_lora_linear(layer, x, grad_y, grad, dropout_p)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    if not grad and x.numel() and dropout_p == 0.0:
        ref = lf.lora_linear_reference(x.double(), layer.weight.double(), layer.lora_A.double(),
                                       layer.lora_B.double(), layer.scaling,
                                       None if layer.bias is None else layer.bias.double())
        assert (results[0][0].double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    if dropout_p and x.numel():
        layer.eval()  # no dropout in eval: the plain call
        assert torch.equal(layer(x), lf.lora_linear(x, layer.weight, layer.lora_A, layer.lora_B,
                                                    layer.scaling, layer.bias))


def test_layer_fast_path_takes_native_autograd_and_the_function_where_it_must(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    layer = _layer_with_random_adapter()
    x = torch.randn(9, 21, requires_grad=True)
    assert _grad_fn_name(layer(x)) == "AddmmBackward0"          # native autograd, out of place
    assert "EagerLoRALinear" in _grad_fn_name(layer(torch.randn(21, 9).t().requires_grad_()))
    with torch.no_grad():
        assert layer(x).grad_fn is None


@pytest.mark.parametrize("bad_x, error, words", [
    (torch.randn(4, 20), ValueError, r"x has 20 features.*\(17, 21\)"),
    (torch.randn(4, 21, dtype=torch.float64), TypeError, "float64"),
    (torch.randn(()), ValueError, "x must have at least 1 dimension"),
    ([[1.0] * 21], TypeError, "x must be a torch.Tensor"),
])
def test_layer_fast_path_reports_bad_input_by_name(backend, bad_x, error, words):
    """The torch backend's fast path lets the torch ops check x, and a failure comes back as
    the clear error; the Triton route checks before any launch."""
    layer = _layer_with_random_adapter()
    with pytest.raises(error, match=words):
        layer(bad_x)


def test_layer_fast_path_leaves_mixed_dtypes_and_autocast_to_the_general_route(monkeypatch):
    """fp32 LoRA weights beside a bf16 base are cast (general route); under autocast every
    operand takes autocast's dtype; a 1-D x is one row."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    layer = _layer_with_random_adapter(dtype=torch.bfloat16)
    layer.lora_A.data = layer.lora_A.data.float()
    layer.lora_B.data = layer.lora_B.data.float()
    x = torch.randn(3, 21, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = lf.lora_linear(x, layer.weight, layer.lora_A.bfloat16(), layer.lora_B.bfloat16(),
                              layer.scaling, layer.bias)
    assert torch.equal(y, expected)
    layer32 = _layer_with_random_adapter()
    x32 = torch.randn(3, 21)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer32(x32).dtype == torch.bfloat16
    assert torch.equal(layer32(x32[0]), layer32(x32[:1])[0])
