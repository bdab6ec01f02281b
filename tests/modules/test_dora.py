"""DoRA: ``dora_linear`` / ``DoRALinear`` against a float64 oracle and against PEFT's DoRA.

The oracle forms W0 + s·B A and its row norms directly (what lora-fused never does) and
lets autograd differentiate PEFT's formula with the norm detached. PEFT is the other
oracle: ``get_peft_model(..., LoraConfig(use_dora=True))`` on a small MLP and a tiny Llama,
the same adapter values copied into lora-fused's layers; outputs and the gradients of x,
lora_A, lora_B and the magnitude in training (dropout 0) and in eval (dropout > 0). With
dropout active in training, the float64 oracle drops with lora-fused's own mask (the
Triton kernels' Philox mask, or the torch path's dora.keep_scaled, from the same seed).
Then: no op makes an out × in tensor (DoRALinear and LoRALinear), merge/unmerge,
checkpoints, argument errors, the Triton kernels alone, and PEFT adapter files both ways.
"""
import copy
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import lora_fused as lf
from lora_cases import TOLERANCE, SizeRecorder, rel_error, tiny_llama
from lora_fused.ops import dora
from lora_fused.modules import dora as dora_layer
from lora_fused.modules.dora import DoRALinear
from lora_fused.ops.dora import dora_weight_norm
from lora_fused.kernels import common
from lora_fused.reference import dropout_keep_mask

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

BACKENDS = ["torch", "triton"]


def interpreted() -> bool:
    """These tests keep their tensors on the CPU: the Triton kernels run on them only under the
    interpreter (conftest sets it without CUDA; on a GPU machine test_gpu_* below cover CUDA)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "triton" and not interpreted():
        pytest.skip("CPU tensors take the Triton kernels only under TRITON_INTERPRET=1")
    monkeypatch.setenv("LORA_FUSED_BACKEND", request.param)
    return request.param


def oracle(x, weight, lora_A, lora_B, magnitude, scaling, bias, keep=None, p=0.0):
    """PEFT's DoRA formula in plain torch (forms W0 + s·B A; the norm detached)."""
    dropped = x if keep is None else x * keep.reshape(x.shape).to(x.dtype) / (1.0 - p)
    norm = (weight + scaling * lora_B @ lora_A).norm(dim=1).detach()
    c = magnitude / norm
    y = x @ weight.T + (c - 1) * (dropped @ weight.T) + c * (scaling * (dropped @ lora_A.T) @ lora_B.T)
    return y if bias is None else y + bias


def random_problem(M, K, N, r, dtype, *, bias=True, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    x = rand(*lead, M, K)
    weight = rand(N, K, scale=K ** -0.5)
    lora_A = rand(r, K, scale=K ** -0.5)
    lora_B = rand(N, r, scale=0.5)
    magnitude = (torch.rand(N, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = rand(N) if bias else None
    return x, weight, lora_A, lora_B, magnitude, b


def keep_mask_of(backend, seed_tensor, rows, cols, p):
    """lora-fused's own mask for a call that drew ``seed_tensor``."""
    if backend == "triton":
        return dropout_keep_mask(int(seed_tensor), rows, cols, p)
    return dora.keep_scaled(seed_tensor, rows, cols, p, torch.float64, torch.device("cpu")) > 0


# --------------------------------------------------------------------------
# The op against float64
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(5, 33, 17, 3, (), True), (7, 24, 40, 16, (2,), False), (1, 9, 5, 1, (), True)])
def test_op_matches_float64_oracle(backend, shape, dropout_p, dtype):
    M, K, N, r, lead, has_bias = shape
    scaling = 1.7
    tensors = random_problem(M, K, N, r, dtype, bias=has_bias, lead=lead, seed=M + K)
    ours = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    ref = [t.double().requires_grad_() if t is not None else None for t in tensors]
    common.LAUNCH_COUNTS.clear()
    torch.manual_seed(11)
    y = lf.dora_linear(ours[0], ours[1], ours[2], ours[3], ours[4], scaling, ours[5], dropout_p=dropout_p,
                       training=True)
    keep = None
    if dropout_p > 0:
        torch.manual_seed(11)
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)  # what the call drew
        keep = keep_mask_of(backend, seed, ref[0].numel() // K, K, dropout_p)
        assert 0 < keep.sum() < keep.numel()
    y_ref = oracle(*ref[:5], scaling, ref[5], keep, dropout_p)
    grad = torch.randn(y_ref.shape, dtype=torch.float64)
    y.backward(grad.to(dtype))
    y_ref.backward(grad)
    assert (common.LAUNCH_COUNTS["dora_norm_kernel"] > 0) == (backend == "triton")
    tol = TOLERANCE[dtype]
    assert rel_error(y, y_ref) <= tol
    for name, a, b in zip(("x", "weight", "lora_A", "lora_B", "magnitude", "bias"), ours, ref):
        if a is not None:
            assert rel_error(a.grad, b.grad) <= tol, name


def test_no_grad_and_float64(backend):
    if backend == "triton":
        pytest.skip("float64 runs on the torch backend")
    tensors = random_problem(6, 20, 12, 4, torch.float64, seed=3)
    with torch.no_grad():
        y = lf.dora_linear(*tensors[:5], 0.75, tensors[5])
    assert rel_error(y, oracle(*tensors[:5], 0.75, tensors[5])) <= 1e-12


def test_weight_norm_identity_is_exact_in_float64():
    _, weight, lora_A, lora_B, _, _ = random_problem(1, 50, 30, 7, torch.float64, seed=4)
    expected = (weight + 2.5 * lora_B @ lora_A).norm(dim=1)
    assert rel_error(dora_weight_norm(weight, lora_A, lora_B, 2.5), expected) <= 1e-13


@settings(max_examples=30, deadline=None)
@given(out_features=st.integers(1, 40), in_features=st.integers(1, 40), r=st.integers(1, 12),
       scaling=st.floats(-8.0, 8.0, allow_nan=False), seed=st.integers(0, 2**16))
def test_weight_norm_identity_random(out_features, in_features, r, scaling, seed):
    """The norm identity against the formed W0 + s·B A, any shapes and scalings (float64),
    and the op it feeds (no dropout) against the oracle."""
    x, weight, lora_A, lora_B, magnitude, bias = random_problem(3, in_features, out_features, r, torch.float64,
                                                                seed=seed)
    expected = (weight + scaling * lora_B @ lora_A).norm(dim=1)
    assert rel_error(dora_weight_norm(weight, lora_A, lora_B, scaling), expected) <= 1e-12
    y = lf.dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias)
    assert rel_error(y, oracle(x, weight, lora_A, lora_B, magnitude, scaling, bias)) <= 1e-12


def test_row_norm_cache_follows_in_place_writes():
    _, weight, lora_A, lora_B, _, _ = random_problem(1, 16, 8, 2, torch.float64, seed=5)
    before = dora_weight_norm(weight, lora_A, lora_B, 1.0)
    with torch.no_grad():
        weight.mul_(2.0)  # bumps weight._version: the cached ‖W0[o]‖² is stale
    after = dora_weight_norm(weight, lora_A, lora_B, 1.0)
    assert rel_error(after, (weight + lora_B @ lora_A).norm(dim=1)) <= 1e-13
    assert not torch.allclose(before, after)


def test_arguments_are_checked():
    x, weight, lora_A, lora_B, magnitude, bias = random_problem(3, 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match=r"magnitude must be \[out_features=6\], got shape \(5,\)"):
        lf.dora_linear(x, weight, lora_A, lora_B, magnitude[:5], 1.0, bias)
    with pytest.raises(TypeError, match="magnitude must be a floating-point tensor"):
        lf.dora_linear(x, weight, lora_A, lora_B, magnitude.long(), 1.0, bias)
    with pytest.raises(TypeError, match="magnitude must be a Tensor"):
        lf.dora_linear(x, weight, lora_A, lora_B, [1.0] * 6, 1.0, bias)
    with pytest.raises(ValueError, match="lora_B must be"):
        lf.dora_linear(x, weight, lora_A, lora_B.t(), magnitude, 1.0, bias)


# --------------------------------------------------------------------------
# Against PEFT
# --------------------------------------------------------------------------
def peft_dora(model, targets, *, r=4, alpha=8, dropout=0.0, seed=1):
    """PEFT's DoRA on a deep copy of ``model``, adapters and magnitudes random (nonzero B: c ≠ 1)."""
    config = peft.LoraConfig(target_modules=targets, r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True,
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand_like(p) + 0.5)
            elif "lora_" in name:
                p.normal_(0, 0.3)
    return peft_model


def ours_like(model, peft_model, targets, *, r=4, alpha=8, dropout=0.0):
    """lora-fused's DoRA on another copy of ``model`` with PEFT's adapter values."""
    ours = lf.inject_lora(copy.deepcopy(model), targets, r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
                   if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_A}
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, DoRALinear)}
    assert sorted(layers) == sorted(peft_layers) and layers
    with torch.no_grad():
        for name, layer in layers.items():
            p = peft_layers[name]
            layer.lora_A.copy_(p.lora_A["default"].weight)
            layer.lora_B.copy_(p.lora_B["default"].weight)
            layer.lora_magnitude_vector.copy_(p.lora_magnitude_vector["default"].weight)
    return ours, layers, peft_layers


def compare_with_peft(model, targets, inputs, *, training, dropout, tol):
    peft_model = peft_dora(model, targets, dropout=dropout)
    ours, layers, peft_layers = ours_like(model, peft_model, targets, dropout=dropout)
    peft_model.train(training)
    ours.train(training)
    outs = []
    for m in (peft_model, ours):
        out = m(**inputs) if isinstance(inputs, dict) else m(inputs.clone().requires_grad_())
        logits = out.logits if hasattr(out, "logits") else out
        logits.square().mean().backward()
        outs.append(logits)
    assert rel_error(outs[1], outs[0]) <= tol
    for name, layer in layers.items():
        p = peft_layers[name]
        for ours_param, peft_param in ((layer.lora_A, p.lora_A["default"].weight),
                                       (layer.lora_B, p.lora_B["default"].weight),
                                       (layer.lora_magnitude_vector, p.lora_magnitude_vector["default"].weight)):
            assert rel_error(ours_param.grad, peft_param.grad) <= tol, name
    return peft_model, ours


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(37, 48), nn.ReLU(), nn.Linear(48, 40, bias=False), nn.Tanh(), nn.Linear(40, 9))


@pytest.mark.parametrize("training,dropout", [(True, 0.0), (False, 0.3)])
def test_mlp_matches_peft(backend, training, dropout):
    x = torch.randn(2, 13, 37)
    targets = ["0", "2", "4"]
    peft_model = peft_dora(mlp(), targets, dropout=dropout)
    ours, layers, peft_layers = ours_like(mlp(), peft_model, targets, dropout=dropout)
    peft_model.train(training)
    ours.train(training)
    x_peft, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_peft, y_ours = peft_model(x_peft), ours(x_ours)
    y_peft.square().mean().backward()
    y_ours.square().mean().backward()
    tol = TOLERANCE[torch.float32]
    assert rel_error(y_ours, y_peft) <= tol
    assert rel_error(x_ours.grad, x_peft.grad) <= tol
    for name, layer in layers.items():
        p = peft_layers[name]
        assert rel_error(layer.lora_A.grad, p.lora_A["default"].weight.grad) <= tol, name
        assert rel_error(layer.lora_B.grad, p.lora_B["default"].weight.grad) <= tol, name
        assert rel_error(layer.lora_magnitude_vector.grad, p.lora_magnitude_vector["default"].weight.grad) <= tol


@pytest.mark.parametrize("training,dropout", [(True, 0.0), (False, 0.2)])
def test_tiny_llama_matches_peft(backend, training, dropout):
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    compare_with_peft(tiny_llama(), ["q_proj", "v_proj", "down_proj"], {"input_ids": ids}, training=training,
                      dropout=dropout, tol=1e-4)


def test_fresh_layer_is_the_base_layer_and_magnitude_as_peft():
    torch.manual_seed(0)
    linear = nn.Linear(20, 12)
    layer = DoRALinear.from_linear(copy.deepcopy(linear), r=4, lora_alpha=8)
    peft_model = peft.get_peft_model(nn.Sequential(copy.deepcopy(linear)),
                                     peft.LoraConfig(target_modules=["0"], r=4, lora_alpha=8, use_dora=True))
    expected = peft_model.base_model.model[0].lora_magnitude_vector["default"].weight
    assert torch.allclose(layer.lora_magnitude_vector, expected, rtol=1e-6, atol=0)
    assert torch.allclose(layer.lora_magnitude_vector, linear.weight.norm(dim=1), rtol=1e-6, atol=0)
    x = torch.randn(4, 20)
    assert rel_error(layer(x), linear(x)) <= 1e-6


# --------------------------------------------------------------------------
# No out × in tensor
# --------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [DoRALinear, lf.LoRALinear])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_no_out_by_in_tensor(backend, cls, dropout):
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(256, 256), r=8, lora_dropout=dropout).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 256, requires_grad=True)
    with SizeRecorder() as recorder:
        layer(x).square().sum().backward()
    big = [(op, n) for op, n in recorder.records if n >= 256 * 256]
    assert not big, big
    assert len(recorder.records) > 5  # the recorder saw the ops
    assert layer.lora_A.grad is not None and x.grad is not None


# --------------------------------------------------------------------------
# merge / unmerge / checkpoints
# --------------------------------------------------------------------------
def trained_layer(seed=0, in_features=20, out_features=12):
    torch.manual_seed(seed)
    layer = DoRALinear.from_linear(nn.Linear(in_features, out_features), r=4, lora_alpha=8).eval()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.lora_magnitude_vector.mul_(torch.rand(out_features) + 0.5)
    return layer


def test_merge_unmerge_and_peft_merge():
    layer = trained_layer()
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 20)
    y = layer(x)
    peft_model = peft.get_peft_model(nn.Sequential(nn.Linear(20, 12)),
                                     peft.LoraConfig(target_modules=["0"], r=4, lora_alpha=8, use_dora=True))
    p = peft_model.base_model.model[0]
    with torch.no_grad():
        p.base_layer.weight.copy_(w0)
        p.base_layer.bias.copy_(layer.bias)
        p.lora_A["default"].weight.copy_(layer.lora_A)
        p.lora_B["default"].weight.copy_(layer.lora_B)
        p.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    merged_peft = peft_model.merge_and_unload()[0].weight
    layer.merge()
    assert layer.merged
    assert rel_error(layer.weight, merged_peft) <= 1e-6
    assert rel_error(layer(x), y) <= 1e-6
    state = copy.deepcopy(layer.state_dict())
    layer.unmerge()
    assert rel_error(layer.weight, w0) <= 1e-6
    assert rel_error(layer(x), y) <= 1e-6
    # A merged checkpoint carries the norm it was merged with: it unmerges after loading.
    other = trained_layer(seed=1)
    other.load_state_dict(state)
    assert other.merged
    other.unmerge()
    assert rel_error(other.weight, w0) <= 1e-6


def test_state_dict_round_trip_unmerged():
    layer = trained_layer()
    other = trained_layer(seed=2)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 20)
    assert torch.equal(other(x), layer(x))
    assert set(lf.lora_state_dict(nn.Sequential(layer))) == {"0.lora_A", "0.lora_B", "0.lora_magnitude_vector"}


def test_inject_marks_magnitude_trainable():
    model = lf.inject_lora(mlp(), ["0", "2"], r=4, use_dora=True)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A", "0.lora_B", "0.lora_magnitude_vector",
                         "2.lora_A", "2.lora_B", "2.lora_magnitude_vector"]


# --------------------------------------------------------------------------
# The Triton kernels alone (interpreter on CPU)
# --------------------------------------------------------------------------
@pytest.fixture
def kernels():
    pytest.importorskip("triton")
    if not interpreted():
        pytest.skip("the kernels run on CPU tensors only under TRITON_INTERPRET=1")
    from lora_fused.kernels import dora
    return dora


@pytest.mark.parametrize("N,K,r", [(45, 70, 5), (3, 130, 20), (64, 64, 16), (20, 50, 100)])
def test_row_norm_kernel(kernels, N, K, r):
    _, weight, lora_A, lora_B, _, _ = random_problem(1, K, N, r, torch.float32, seed=N)
    norm = kernels.row_norm(weight, lora_A, lora_B, -0.7)
    expected = (weight.double() - 0.7 * lora_B.double() @ lora_A.double()).norm(dim=1)
    assert norm.dtype == torch.float32
    assert rel_error(norm, expected) <= 1e-6


def test_row_norm_kernel_clamps_cancellation(kernels):
    lora_A = torch.eye(4, 8)
    lora_B = torch.randn(6, 4)
    weight = -(lora_B @ lora_A)  # W0 + 1·B A = 0 exactly: norm² rounds around 0
    norm = kernels.row_norm(weight, lora_A, lora_B, 1.0)
    assert torch.isfinite(norm).all() and norm.abs().max() <= 1e-3


@pytest.mark.parametrize("has_bias,has_base", [(True, False), (False, True), (False, False)])
def test_scale_cols_kernel(kernels, has_bias, has_base):
    u = torch.randn(50, 70)[:, ::2]  # strided
    c = torch.rand(35) + 0.5
    bias = torch.randn(35) if has_bias else None
    base = torch.randn(35, 50).t() if has_base else None
    out = kernels.scale_cols(u, c, bias, base)
    expected = u.double() * c.double()
    if has_bias:
        expected = expected + bias.double()
    if has_base:
        expected = expected + base.double()
    assert rel_error(out, expected) <= 1e-7


def test_grad_scale_kernel_splits_rows(kernels):
    rows = kernels.ELEMENTWISE_BLOCKS[0] * kernels.GRAD_ROW_TILES * 2 + 7  # three row splits
    dy, u = torch.randn(rows, 33), torch.randn(rows, 33)
    c = torch.rand(33) + 0.5
    scaled, colsum = kernels.grad_scale(dy, u, c)
    assert rel_error(scaled, dy.double() * c.double()) <= 1e-7
    assert rel_error(colsum, (dy.double() * u.double()).sum(0)) <= 1e-6


def test_dropout_mix_kernel_uses_the_lora_mask(kernels):
    base, other = torch.randn(9, 40), torch.randn(9, 40)
    seed = torch.tensor([1234], dtype=torch.int64)
    keep = dropout_keep_mask(1234, 9, 40, 0.4).double()
    out = kernels.dropout_mix(base, other, seed, 0.4, base)
    expected = base.double() + keep / 0.6 * (other.double() - base.double())
    assert rel_error(out, expected) <= 1e-7
    dropped = kernels.dropout_mix(None, other, seed, 0.4, other)
    assert rel_error(dropped, keep / 0.6 * other.double()) <= 1e-7


def test_size_recorder_catches_peft_dora():
    """The recorder can fail: PEFT's DoRA forms B·A and W0 + s·B·A (out × in) every forward."""
    peft_model = peft.get_peft_model(nn.Sequential(nn.Linear(256, 256)),
                                     peft.LoraConfig(target_modules=["0"], r=8, use_dora=True))
    x = torch.randn(8, 256, requires_grad=True)
    with SizeRecorder() as recorder:
        peft_model(x).square().sum().backward()
    assert any(n >= 256 * 256 for _, n in recorder.records)


# --------------------------------------------------------------------------
# PEFT adapter files and live PEFT models
# --------------------------------------------------------------------------
def test_peft_adapter_round_trips(tmp_path):
    x = torch.randn(4, 37)
    peft_model = peft_dora(mlp(), ["0", "2"])
    peft_model.eval()
    expected = peft_model(x)
    peft_model.save_pretrained(tmp_path / "from_peft")
    ours = lf.load_peft_adapter(mlp(), tmp_path / "from_peft").eval()
    assert {n for n, m in ours.named_modules() if isinstance(m, DoRALinear)} == {"0", "2"}
    assert rel_error(ours(x), expected) <= 1e-6
    assert ours[0].lora_magnitude_vector.requires_grad
    # ... and back: PEFT loads what lora-fused saves.
    with torch.no_grad():
        ours[2].lora_magnitude_vector.mul_(1.5)
    lf.save_peft_adapter(ours, tmp_path / "from_ours")
    reloaded = peft.PeftModel.from_pretrained(mlp(), tmp_path / "from_ours").eval()
    assert reloaded.peft_config["default"].use_dora
    assert rel_error(reloaded(x), ours(x)) <= 1e-6
    again = lf.load_peft_adapter(mlp(), tmp_path / "from_ours").eval()
    assert torch.equal(again(x), ours(x))


def test_from_peft_model_converts_dora(backend):
    x = torch.randn(3, 37)
    peft_model = peft_dora(mlp(), ["0", "4"])
    peft_model.eval()
    expected = peft_model(x)
    ours = lf.from_peft_model(peft_model).eval()
    assert isinstance(ours[0], DoRALinear) and isinstance(ours[4], DoRALinear)
    assert rel_error(ours(x), expected) <= TOLERANCE[torch.float32]


def test_adapter_file_checks(tmp_path):
    import json
    from safetensors.torch import load_file, save_file
    peft_dora(mlp(), ["0"]).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    magnitude_key = "base_model.model.0.lora_magnitude_vector"
    assert magnitude_key in weights
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(ValueError, match="a DoRA magnitude, but adapter_config.json has use_dora false"):
        lf.load_peft_adapter(mlp(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in weights.items() if k != magnitude_key}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="has no 'base_model.model.0.lora_magnitude_vector'"):
        lf.load_peft_adapter(mlp(), tmp_path)
    save_file({**weights, magnitude_key: weights[magnitude_key][:-1]}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"must be a floating \[out=48\] vector"):
        lf.load_peft_adapter(mlp(), tmp_path)
    save_file(weights, tmp_path / "adapter_model.safetensors")
    plain = lf.inject_lora(mlp(), ["0"], r=4)
    with pytest.raises(TypeError, match="a DoRA adapter .* loads into an nn.Linear or a DoRALinear"):
        lf.load_peft_adapter(plain, tmp_path)


def test_multi_adapter_slot_refuses_dora(tmp_path):
    peft_dora(mlp(), ["0"]).save_pretrained(tmp_path)
    model = lf.inject_multi_lora(mlp(), ["0"], max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match="DoRA adapter .*multi-adapter slots serve plain LoRA only"):
        lf.load_peft_adapter_slot(model, tmp_path, "a")


def test_save_refuses_mixed_dora_and_lora(tmp_path):
    model = lf.inject_lora(mlp(), ["0"], r=4, use_dora=True)
    model = lf.inject_lora(model, ["2"], r=4)
    with pytest.raises(ValueError, match="mixes DoRALinear and LoRALinear"):
        lf.save_peft_adapter(model, tmp_path)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compiled_matches_eager(backend, dropout):
    """torch.compile (fullgraph, aot_eager: the fake kernels and the registered autograd) runs the
    custom ops lora_fused::dora_linear_fwd / _bwd: the same outputs and gradients as eager."""
    torch.manual_seed(0)
    model = lf.inject_lora(mlp(), ["0", "2"], r=4, lora_dropout=dropout, use_dora=True).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 37)
    results = []
    for m in (model, compiled):
        torch.manual_seed(5)  # the same dropout seed drawn
        xx = x.clone().requires_grad_()
        y = m(xx)
        y.square().sum().backward()
        results.append((y, xx.grad))
    assert rel_error(results[1][0], results[0][0]) <= 1e-6
    assert rel_error(results[1][1], results[0][1]) <= 1e-6
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.requires_grad:
            assert rel_error(q.grad, p.grad) <= 1e-6, name


def test_load_peft_adapter_into_injected_dora_layers(tmp_path):
    x = torch.randn(4, 37)
    peft_model = peft_dora(mlp(), ["0", "2"]).eval()
    peft_model.save_pretrained(tmp_path)
    model = lf.inject_lora(mlp(), ["0", "2"], r=4, lora_alpha=8, use_dora=True).eval()
    layer = model[0]
    lf.load_peft_adapter(model, tmp_path)
    assert model[0] is layer  # loaded in place
    assert rel_error(model(x), peft_model(x)) <= 1e-6


def test_bench_script_runs(capsys):
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import dora as bench_dora
    assert bench_dora.main(["--size", "32", "--rows", "4", "--rank", "2", "--rounds", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "dora / peft-dora" in out and "relative error" in out


@pytest.mark.parametrize("forward,backward", [("fused", "fused"), ("shrink_first", "fused"),
                                              ("composite", "composite")])
def test_every_lora_strategy(monkeypatch, forward, backward):
    """DoRA's LoRA GEMMs run by the strategy lf.use_strategy forces (Triton): the forced kernels
    launch and the result still matches float64."""
    if not interpreted():
        pytest.skip("CPU tensors take the Triton kernels only under TRITON_INTERPRET=1")
    monkeypatch.setenv("LORA_FUSED_BACKEND", "triton")
    tensors = random_problem(40, 48, 36, 8, torch.float32, seed=9)
    ours = [t.clone().requires_grad_() for t in tensors]
    ref = [t.double().requires_grad_() for t in tensors]
    common.LAUNCH_COUNTS.clear()
    with lf.use_strategy(forward=forward, backward=backward):
        y = lf.dora_linear(ours[0], ours[1], ours[2], ours[3], ours[4], 0.9, ours[5])
        launched_forward = set(common.LAUNCH_COUNTS)
        common.LAUNCH_COUNTS.clear()
        y.square().sum().backward()
        launched_backward = set(common.LAUNCH_COUNTS)
    y_ref = oracle(*ref[:5], 0.9, ref[5])
    y_ref.square().sum().backward()
    expected_forward = {"fused": {"lora_gemm_kernel"}, "shrink_first": {"lora_shrink_kernel", "lora_gemm_kernel"},
                        "composite": {"lora_shrink_kernel", "lora_expand_add_kernel"}}[forward]
    expected_backward = {"fused": "lora_gemm_kernel", "composite": "lora_expand_add_kernel"}[backward]
    assert launched_forward == expected_forward | {"dora_norm_kernel", "dora_scale_cols_kernel"}
    assert {"dora_grad_scale_kernel", expected_backward} <= launched_backward
    assert ({"lora_gemm_kernel", "lora_expand_add_kernel"} & launched_backward) == {expected_backward}
    assert rel_error(y, y_ref) <= TOLERANCE[torch.float32]
    for name, a, b in zip(("x", "weight", "lora_A", "lora_B", "magnitude", "bias"), ours, ref):
        assert rel_error(a.grad, b.grad) <= TOLERANCE[torch.float32], name


# --------------------------------------------------------------------------
# CUDA (skipped without a GPU): the Triton path natively, 16-bit dtypes, no out x in allocation
# --------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_op_matches_float64(gpu_precision_flags, dtype, dropout_p):
    M, K, N, r = 1000, 1024, 768, 16
    tensors = [t.cuda() if t is not None else None for t in random_problem(M, K, N, r, dtype, seed=2)]
    ours = [t.clone().requires_grad_() for t in tensors]
    ref = [t.double().requires_grad_() for t in tensors]
    common.LAUNCH_COUNTS.clear()
    torch.manual_seed(3)
    y = lf.dora_linear(*ours[:5], 1.5, ours[5], dropout_p=dropout_p, training=True)
    keep = None
    if dropout_p:
        torch.manual_seed(3)
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device="cuda")
        keep = dropout_keep_mask(int(seed), M, K, dropout_p, device="cuda")
    y_ref = oracle(*ref[:5], 1.5, ref[5], keep, dropout_p)
    grad = torch.randn(y_ref.shape, dtype=torch.float64, device="cuda")
    y.backward(grad.to(dtype))
    y_ref.backward(grad)
    assert common.LAUNCH_COUNTS["dora_norm_kernel"] == 1
    assert rel_error(y, y_ref) <= TOLERANCE[dtype]
    for name, a, b in zip(("x", "weight", "lora_A", "lora_B", "magnitude", "bias"), ours, ref):
        assert rel_error(a.grad, b.grad) <= TOLERANCE[dtype], name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_no_out_by_in_tensor(gpu_precision_flags):
    layer = DoRALinear.from_linear(nn.Linear(256, 256, device="cuda", dtype=torch.bfloat16), r=8,
                                   lora_dropout=0.1).train()
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with SizeRecorder() as recorder:
        layer(x).float().square().sum().backward()
    assert not [(op, n) for op, n in recorder.records if n >= 256 * 256]


class FixedDropout(nn.Module):
    """Stands in for PEFT's nn.Dropout: multiplies by a given keep/(1-p) factor."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_training_with_dropout_matches_peft_given_our_mask(monkeypatch):
    """Dropout active in training: PEFT's layer, its nn.Dropout replaced by lora-fused's own mask
    (the torch path's, regenerated from the seed the call drew), gives the same output and
    gradients: PEFT's extra drop(x) W0ᵀ term is reproduced exactly."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    x = torch.randn(9, 37)
    base = nn.Sequential(nn.Linear(37, 20))
    peft_model = peft_dora(base, ["0"], dropout=0.3).train()
    ours, layers, peft_layers = ours_like(base, peft_model, ["0"], dropout=0.3)
    ours.train()
    torch.manual_seed(21)
    x_ours = x.clone().requires_grad_()
    y_ours = ours(x_ours)
    torch.manual_seed(21)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    factor = dora.keep_scaled(seed, 9, 37, 0.3, torch.float32, torch.device("cpu"))
    peft_layers["0"].lora_dropout["default"] = FixedDropout(factor)
    x_peft = x.clone().requires_grad_()
    y_peft = peft_model(x_peft)
    y_ours.square().sum().backward()
    y_peft.square().sum().backward()
    tol = TOLERANCE[torch.float32]
    assert rel_error(y_ours, y_peft) <= tol
    assert rel_error(x_ours.grad, x_peft.grad) <= tol
    p = peft_layers["0"]
    assert rel_error(ours[0].lora_A.grad, p.lora_A["default"].weight.grad) <= tol
    assert rel_error(ours[0].lora_B.grad, p.lora_B["default"].weight.grad) <= tol
    assert rel_error(ours[0].lora_magnitude_vector.grad, p.lora_magnitude_vector["default"].weight.grad) <= tol


def test_eval_norm_cache(backend, monkeypatch):
    """cache_weight_norm: one norm computation for many eval calls, the same output as without
    the cache, recomputed after an in-place write (optimizer-style) and after a training call."""
    layer = trained_layer(seed=3)
    x = torch.randn(2, 5, 20)
    with torch.no_grad():
        expected = layer(x)
    calls = []
    real = dora.dora_weight_norm
    for home in (dora, dora_layer):  # the op's forward, and the layer's eval cache
        monkeypatch.setattr(home, "dora_weight_norm", lambda *a: calls.append(1) or real(*a))
    layer.cache_weight_norm = True
    with torch.no_grad():
        assert rel_error(layer(x), expected) <= 1e-7
        assert rel_error(layer(x), expected) <= 1e-7
        assert len(calls) == 1
        layer.lora_B.mul_(1.5)  # an in-place update through the parameter
        fresh = layer(x)
    assert len(calls) == 2
    layer.cache_weight_norm = False
    with torch.no_grad():
        assert rel_error(fresh, layer(x)) <= 1e-7
    layer.cache_weight_norm = True
    layer.train()
    layer(x).sum().backward()  # a training call drops the cache
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert len(calls) == 5  # the uncached eval, the training call, the eval after it
