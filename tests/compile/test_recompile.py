"""A new ``scaling`` does not recompile a compiled LoRALinear model, and is never stale.

Dynamo guards a float module attribute by value (a new value: a new graph, up to the cache
limit of 8). ``LoRALinear`` mirrors ``scaling`` in a 0-d float64 buffer written in place, and
a compiled forward passes that tensor (``ops.lora_linear_scaled_by``); the kernels read it
through a pointer (``kernels.lora_linear.load_scaling``). Eager calls keep the float.
``lora_dropout`` likewise (buffer ``_dropout_tensor``, ``load_dropout_p``): only the switch
between 0 and non-zero p may change the graph.
"""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import lora_fused as lf
from lora_fused.backends import torch_backend
from lora_fused.dispatch.backend import lora_kernels
from lora_fused.ops import lora_linear as ops

SCALINGS = (0.5, -1.25, 3.0 / 7.0, 1e4)


@pytest.fixture(params=["default", "torch"])
def backend(request, monkeypatch):
    """default: the Triton kernels (interpreted on CPU); torch: the torch backend."""
    if request.param == "torch":
        monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    return request.param


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(lf.LoRALinear(19, 33, r=4), nn.GELU(), lf.LoRALinear(33, 7, r=3, bias=False))
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B)
    return model


def _reference(model, x):
    """The model in float64 with each layer's current scaling: W0 x + b + s B A x."""
    def layer(m, h):
        w, a, b = m.weight.double(), m.lora_A.double(), m.lora_B.double()
        y = h @ w.t() + m.scaling * (h @ a.t()) @ b.t()
        return y if m.bias is None else y + m.bias.double()
    return layer(model[2], torch.nn.functional.gelu(layer(model[0], x.double())))


def _grads(model, x, y):
    params = [model[0].lora_A, model[0].lora_B, model[2].lora_A, model[2].lora_B, x]
    return torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum(), params)


@pytest.mark.parametrize("training", [False, True])
def test_new_scaling_values_do_not_recompile(backend, training):
    """Four scalings per layer: one compile, outputs and gradients of each value against float64
    (a value baked into the graph or a kernel argument would fail the second one)."""
    torch._dynamo.reset()
    model = _model().train(training)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 5, 19, requires_grad=True)
    frames = []
    for s0, s1 in zip(SCALINGS, reversed(SCALINGS)):
        model[0].scaling, model[2].scaling = s0, s1
        y = compiled(x)
        frames.append(counter.frame_count)  # backend calls (the first compile may restart once)
        x64 = x.detach().double().requires_grad_()
        ref_model = copy.deepcopy(model).double()
        expected = _reference(ref_model, x64)
        assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()), (s0, s1)
        for got, want in zip(_grads(model, x, y), _grads(ref_model, x64, expected)):
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), (s0, s1)
    assert frames[1:] == frames[:1] * (len(SCALINGS) - 1), frames  # the float route: 2, 4, 5, 6


def test_scaling_mirror_follows_the_float():
    layer = lf.LoRALinear(6, 5, r=2, lora_alpha=3.0)
    mirror = layer._scaling_tensor
    assert mirror.dtype == torch.float64 and mirror.item() == layer.scaling == 1.5
    layer.scaling = 1.0 / 3.0
    assert layer._scaling_tensor is mirror and mirror.item() == 1.0 / 3.0  # in place: same storage
    layer.half()  # casts floating buffers: the mirror stays float64 and exact
    assert layer._scaling_tensor.dtype == torch.float64 and layer._scaling_tensor.item() == 1.0 / 3.0
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "_extra_state"}  # not saved
    with pytest.raises(ValueError, match="scaling"):
        layer.scaling = float("nan")
    assert layer._scaling_tensor.item() == 1.0 / 3.0


def test_scaling_mirror_of_from_linear_and_pickle():
    base = nn.Linear(6, 5)
    layer = lf.LoRALinear.from_linear(base, r=2, lora_alpha=5.0)
    assert layer._scaling_tensor.device == base.weight.device and layer._scaling_tensor.item() == 2.5
    state = layer.__getstate__()
    state["_buffers"] = dict(state["_buffers"])
    del state["_buffers"][lf.LoRALinear.SCALING_BUFFER]  # a layer pickled before the mirror existed
    old = lf.LoRALinear.__new__(lf.LoRALinear)
    old.__setstate__(state)
    assert old._scaling_tensor.item() == 2.5
    assert pickle.loads(pickle.dumps(layer))._scaling_tensor.item() == 2.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1, 0.25])  # 0.1: not exact in fp32 (rounded as the float route)
def test_pointer_and_float_scaling_are_bit_identical(backend, dtype, dropout_p):
    """Every strategy's forward and backward: s and p as floats and as 0-d float64 tensors agree bit for bit."""
    if backend == "torch" and dtype == torch.float16:
        pytest.skip("the torch backend on CPU: fp32 covers its float64 -> host read")
    torch.manual_seed(1)
    M, K, N, R = 37, 45, 29, 5
    x, w, b = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
    A, B, dy = torch.randn(R, K, dtype=dtype), torch.randn(N, R, dtype=dtype), torch.randn(M, N, dtype=dtype)
    seed = ops.draw_dropout_seed(x.device) if dropout_p else None
    s = 3.0 / 7.0
    s_t = torch.tensor(s, dtype=torch.float64)
    p_t = torch.tensor(dropout_p, dtype=torch.float64) if dropout_p else 0.0  # p as the compiled layer passes it
    if backend == "torch":
        cases = [(torch_backend.lora_forward, torch_backend.lora_backward, {}, {})]
    else:
        k = lora_kernels()
        fwd = ["shrink_first", "composite"] + ([] if dropout_p else ["fused"])
        cases = [(k.lora_forward, k.lora_backward, {"strategy": f}, {"strategy": bwd})
                 for f in fwd for bwd in ("fused", "composite")]
    for forward, backward, fkw, bkw in cases:
        y, shrink = forward(x, w, b, A, B, s, dropout_p, seed, **fkw)
        y_t, shrink_t = forward(x, w, b, A, B, s_t, p_t, seed, **fkw)
        assert torch.equal(y, y_t) and torch.equal(shrink, shrink_t), fkw
        grads = backward(dy, x, w, A, B, shrink, s, dropout_p, seed, True, True, **bkw)
        grads_t = backward(dy, x, w, A, B, shrink, s_t, p_t, seed, True, True, **bkw)
        for g, g_t in zip(grads, grads_t):
            assert torch.equal(g, g_t), bkw


def test_scaled_by_op_passes_opcheck():
    x = torch.randn(5, 19, requires_grad=True)
    w = torch.randn(7, 19)
    A = torch.randn(3, 19, requires_grad=True)
    B = torch.randn(7, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.lora_fused.lora_linear_fwd_t.default,
                          (x, w, None, A, B, torch.tensor(0.5, dtype=torch.float64), None, None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.lora_fused.lora_linear_fwd_t.default,
                          (x, w, None, A, B, torch.tensor(0.5, dtype=torch.float64),
                           torch.tensor(0.25, dtype=torch.float64), ops.draw_dropout_seed(x.device)),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_scaled_by_refuses_a_float_or_a_tensor_elsewhere():
    x, w, A, B = torch.randn(5, 19), torch.randn(7, 19), torch.randn(3, 19), torch.randn(7, 3)
    with pytest.raises(TypeError, match="scaling"):
        ops.lora_linear_scaled_by(x, w, A, B, 0.5)
    with pytest.raises(ValueError, match="scaling"):
        ops.lora_linear_scaled_by(x, w, A, B, torch.tensor([0.5], dtype=torch.float64))


DROPOUTS = (0.1, 0.25, 0.4)


def test_new_dropout_values_do_not_recompile(backend):
    """Training with dropout: after the first call each layer gets p = 0.1, 0.25, 0.4 in turn;
    one compile, and outputs and gradients bit for bit those of the eager model with the same
    seed (the eager route passes p as a float: same mask, same 1/(1-p); a p baked into the
    graph or a kernel argument would give the first value's mask and factor)."""
    torch._dynamo.reset()
    model = _model().train()
    model[0].lora_dropout, model[2].lora_dropout = 0.3, 0.3
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 5, 19, requires_grad=True)
    compiled(x)
    frames = counter.frame_count  # the first compile may restart once
    for p0, p1 in zip(DROPOUTS, reversed(DROPOUTS)):
        model[0].lora_dropout, model[2].lora_dropout = p0, p1
        assert model[0]._dropout_tensor.item() == p0 and model[2]._dropout_tensor.item() == p1
        torch.manual_seed(7)
        y = compiled(x)
        torch.manual_seed(7)
        y_eager = model(x)
        assert counter.frame_count == frames, (p0, p1)
        assert torch.equal(y, y_eager), (p0, p1)
        for got, want in zip(_grads(model, x, y), _grads(model, x, y_eager)):
            assert torch.equal(got, want), (p0, p1)
        torch.manual_seed(7)
        assert not torch.equal(y, _model_with_dropout(model, 0.3, 0.3)(x)), "p must change the output"


def _model_with_dropout(model, p0, p1):
    other = copy.deepcopy(model)
    other[0].lora_dropout, other[2].lora_dropout = p0, p1
    return other


def test_dropout_mirror_follows_the_float_and_old_pickles_load():
    layer = lf.LoRALinear(6, 5, r=2, lora_dropout=0.1)
    mirror = layer._dropout_tensor
    assert mirror.dtype == torch.float64 and mirror.item() == layer.lora_dropout == 0.1 and layer._dropout_on
    layer.lora_dropout = 0.0
    assert layer._dropout_tensor is mirror and mirror.item() == 0.0 and not layer._dropout_on
    with pytest.raises(ValueError, match="dropout_p"):
        layer.lora_dropout = 1.0
    with pytest.raises(TypeError, match="dropout_p"):
        layer.lora_dropout = torch.tensor(0.5)
    layer.lora_dropout = 0.25
    layer.half()
    assert layer._dropout_tensor.dtype == torch.float64 and layer._dropout_tensor.item() == 0.25
    assert "_dropout_tensor" not in layer.state_dict()
    state = layer.__getstate__()
    state["_buffers"] = {k: v for k, v in state["_buffers"].items()
                         if k not in (lf.LoRALinear.SCALING_BUFFER, lf.LoRALinear.DROPOUT_BUFFER)}
    state = {k: v for k, v in state.items() if k not in ("_lora_dropout", "_dropout_on")}
    state["lora_dropout"] = 0.4  # pickled when lora_dropout was a plain attribute
    old = lf.LoRALinear.__new__(lf.LoRALinear)
    old.__setstate__(state)
    assert old.lora_dropout == 0.4 and old._dropout_on and old._dropout_tensor.item() == 0.4
    assert old._scaling_tensor.item() == old.scaling
    again = pickle.loads(pickle.dumps(layer))
    assert again.lora_dropout == 0.25 and again._dropout_tensor.item() == 0.25


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_see_a_new_scaling(gpu_precision_flags):
    """mode="reduce-overhead" records CUDA graphs: each replay must use the scaling set last
    (a float read at capture would be baked into the kernels' arguments)."""
    torch._dynamo.reset()
    model = _model().cuda().eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(2, 5, 19, device="cuda")
    with torch.no_grad():
        for s0, s1 in zip(SCALINGS, reversed(SCALINGS)):
            model[0].scaling, model[2].scaling = s0, s1
            for _ in range(3):  # warm-up, record, then replays
                y = compiled(x).clone()  # a cudagraph output is overwritten by the next replay
                expected = _reference(model, x)
                assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()), (s0, s1)
