"""LoRALinear: a drop-in nn.Linear with a fused LoRA adapter."""
import math

import pytest
import torch
from torch import nn

import lora_fused as lf
from lora_cases import rel_error


def trained_layer(in_features=19, out_features=33, r=4, bias=True, **kwargs):
    """A LoRALinear whose adapter is not a no-op (B random)."""
    torch.manual_seed(0)
    layer = lf.LoRALinear(in_features, out_features, bias=bias, r=r, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    return layer.eval()  # merge() in training mode warns (tested below)


def expected(layer, x):
    d = lambda t: t.detach().double()  # noqa: E731
    bias = d(layer.bias) if layer.bias is not None else None
    return lf.lora_linear_reference(d(x), d(layer.weight), d(layer.lora_A), d(layer.lora_B),
                                    layer.scaling, bias)


def test_is_an_nn_linear_with_the_lora_state_dict_keys():
    layer = lf.LoRALinear(19, 33, r=4)
    assert isinstance(layer, nn.Linear)
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B", "_extra_state"]
    assert layer.lora_A.shape == (4, 19) and layer.lora_B.shape == (33, 4)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_no_bias():
    layer = lf.LoRALinear(19, 33, bias=False, r=2)
    assert layer.bias is None and list(layer.state_dict()) == ["weight", "lora_A", "lora_B", "_extra_state"]
    x = torch.randn(5, 19)
    assert rel_error(layer(x), expected(layer, x)) <= 1e-5


@pytest.mark.parametrize("r,alpha,rslora,scaling", [(8, 16.0, False, 2.0), (4, 8.0, True, 4.0),
                                                    (1, 1.0, False, 1.0)])
def test_scaling(r, alpha, rslora, scaling):
    layer = lf.LoRALinear(8, 8, r=r, lora_alpha=alpha, use_rslora=rslora)
    assert layer.scaling == pytest.approx(scaling)


def test_fresh_adapter_is_a_no_op_with_peft_init():
    layer = lf.LoRALinear(64, 33, r=8)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    bound = 1.0 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in=64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    x = torch.randn(7, 64)
    assert rel_error(layer(x), nn.functional.linear(x.double(), layer.weight.double(),
                                                    layer.bias.double())) <= 1e-5


def test_forward_and_lora_gradients_match_reference():
    layer = trained_layer()
    x = torch.randn(2, 5, 19, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    xd = x.detach().double().requires_grad_()
    A = layer.lora_A.detach().double().requires_grad_()
    B = layer.lora_B.detach().double().requires_grad_()
    ref = lf.lora_linear_reference(xd, layer.weight.double(), A, B, layer.scaling, layer.bias.double())
    ref.backward(grad_y.double())
    assert rel_error(y, ref) <= 1e-5
    assert rel_error(x.grad, xd.grad) <= 1e-5
    assert rel_error(layer.lora_A.grad, A.grad) <= 1e-5
    assert rel_error(layer.lora_B.grad, B.grad) <= 1e-5
    assert layer.weight.grad is None and layer.bias.grad is None


def test_from_linear_keeps_the_base_weights_frozen_and_shared():
    torch.manual_seed(0)
    linear = nn.Linear(19, 33)
    layer = lf.LoRALinear.from_linear(linear, r=4, lora_alpha=8.0, lora_dropout=0.1, use_rslora=True)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.lora_A.device == linear.weight.device and layer.lora_A.dtype == linear.weight.dtype
    assert (layer.r, layer.lora_alpha, layer.lora_dropout, layer.use_rslora) == (4, 8.0, 0.1, True)
    x = torch.randn(6, 19)
    layer.eval()
    assert rel_error(layer(x), linear(x).double()) <= 1e-5  # fresh adapter: same output


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.Linear"):
        lf.LoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_merge_unmerge_round_trip():
    layer = trained_layer()
    x = torch.randn(7, 19)
    weight_before = layer.weight.detach().clone()
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged
    y_merged = layer(x)
    assert rel_error(y_merged, y_unmerged) <= 1e-5
    delta = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    assert rel_error(layer.weight - weight_before, delta) <= 1e-5
    layer.unmerge()
    assert not layer.merged
    assert rel_error(layer.weight, weight_before) <= 1e-6
    assert rel_error(layer(x), y_unmerged) <= 1e-5


def test_eval_does_not_merge():
    layer = trained_layer()
    weight_before = layer.weight.detach().clone()
    layer.eval()
    layer(torch.randn(3, 19))
    assert not layer.merged and torch.equal(layer.weight, weight_before)


def test_merge_refuses_to_write_non_finite_weights():
    layer = trained_layer()
    weight_before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, weight_before)


def test_merge_twice_warns_and_changes_nothing():
    layer = trained_layer()
    layer.merge()
    weight = layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.weight, weight)
    with pytest.warns(UserWarning, match="not merged"):
        lf.LoRALinear(4, 4).unmerge()


def test_disabled_runs_the_base_layer():
    layer = trained_layer()
    layer.disabled = True
    x = torch.randn(3, 19)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_dropout_only_in_training():
    layer = trained_layer(lora_dropout=0.5)
    x = torch.randn(33, 19)
    layer.eval()
    assert rel_error(layer(x), expected(layer, x)) <= 1e-5
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), y1)
    assert rel_error(y1, expected(layer, x)) > 1e-3


def test_fp32_adapter_beside_fp16_base_gets_fp32_gradients():
    torch.manual_seed(0)
    linear = nn.Linear(19, 33).half()
    layer = lf.LoRALinear.from_linear(linear, r=4)
    layer.lora_A.data = layer.lora_A.data.float()
    layer.lora_B.data = torch.randn(33, 4)
    x = torch.randn(5, 19, dtype=torch.float16)
    y = layer(x)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32


def test_reset_lora_parameters_restores_a_no_op():
    layer = trained_layer()
    layer.reset_lora_parameters()
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


def test_extra_repr():
    text = repr(lf.LoRALinear(19, 33, r=4, lora_alpha=8.0, lora_dropout=0.1))
    for part in ("in_features=19", "out_features=33", "r=4", "lora_alpha=8.0",
                 "lora_dropout=0.1", "use_rslora=False", "merged=False"):
        assert part in text


def test_trains():
    """A few optimizer steps on a LoRA-only regression reduce the loss."""
    torch.manual_seed(0)
    layer = lf.LoRALinear(16, 8, r=4, lora_alpha=8.0)
    target = lf.LoRALinear(16, 8, r=4)
    target.weight.data.copy_(layer.weight.data)
    target.bias.data.copy_(layer.bias.data)
    target.lora_A.data.copy_(layer.lora_A.data)  # the target lies in reach of the adapter
    target.lora_B.data.normal_()
    x = torch.randn(64, 16)
    with torch.no_grad():
        y_target = target(x)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=3e-2)
    losses = []
    for _ in range(40):
        loss = nn.functional.mse_loss(layer(x), y_target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


# --------------------------------------------------------------------------
# module state: merged travels with state_dict; merged and disabled / training
# --------------------------------------------------------------------------
def test_merged_is_saved_in_the_state_dict():
    layer = trained_layer()
    assert not layer.state_dict()["_extra_state"]
    layer.merge()
    assert layer.state_dict()["_extra_state"].item() is True


@pytest.mark.parametrize("source_merged,target_merged", [(True, False), (False, True), (True, True)])
def test_loading_a_checkpoint_applies_the_adapter_exactly_once(source_merged, target_merged):
    """A merged checkpoint's weight already holds s·B·A: the loaded layer takes the
    checkpoint's merged flag, so either direction gives the unmerged output once."""
    source, target = trained_layer(), trained_layer()
    with torch.no_grad():
        target.lora_B.normal_(0, 0.5)  # a different adapter, so a wrong load shows
    x = torch.randn(5, 19)
    want = expected(source, x)
    if source_merged:
        source.merge()
    if target_merged:
        target.merge()
    target.load_state_dict(source.state_dict())
    assert target.merged == source_merged
    assert rel_error(target(x), want) <= 1e-5
    if target.merged:
        target.unmerge()
        assert rel_error(target(x), want) <= 1e-5


def test_a_checkpoint_without_the_merged_entry_loads_as_unmerged():
    """State dicts saved before ``_extra_state`` existed load (strict) as unmerged."""
    source, target = trained_layer(), trained_layer()
    target.merge()
    old = {k: v for k, v in source.state_dict().items() if k != "_extra_state"}
    target.load_state_dict(old)
    assert not target.merged
    x = torch.randn(5, 19)
    assert rel_error(target(x), expected(source, x)) <= 1e-5


def test_loading_only_lora_tensors_into_a_merged_layer_is_refused():
    layer = trained_layer()
    layer.merge()
    weight = layer.weight.detach().clone()
    lora_only = {k: v.clone() for k, v in layer.state_dict().items() if k.startswith("lora_")}
    with pytest.raises(RuntimeError, match="merged LoRALinear without its weight"):
        layer.load_state_dict(lora_only, strict=False)
    assert torch.equal(layer.weight, weight) and layer.merged
    layer.unmerge()
    layer.load_state_dict(lora_only, strict=False)  # unmerged: fine


def test_disabling_a_merged_layer_is_refused():
    layer = trained_layer()
    layer.merge()
    with pytest.raises(ValueError, match="merged.*unmerge"):
        layer.disabled = True
    assert not layer.disabled
    layer.unmerge()
    layer.disabled = True
    with pytest.raises(ValueError, match="disabled"):
        layer.merge()
    assert not layer.merged


def test_fp16_merge_that_overflows_leaves_the_weight_untouched():
    """W + s·B·A is finite in fp32 but above fp16's 65504: the check runs after the cast."""
    layer = lf.LoRALinear(4, 3, r=1, lora_alpha=1.0, dtype=torch.float16)
    with torch.no_grad():
        layer.weight.fill_(60000.0)
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(10000.0)
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/inf.*float16"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, weight)


def test_training_while_merged_warns():
    layer = trained_layer()
    layer.eval()
    layer.merge()  # in eval mode: no warning
    with pytest.warns(UserWarning, match="merged and in training mode"):
        layer.train()
    layer.unmerge()
    with pytest.warns(UserWarning, match="merged and in training mode"):
        layer.merge()  # still in training mode


def test_from_linear_keeps_the_training_mode():
    """Injecting into an eval() model must not leave the new layers in training mode
    (dropout would run, and merging would warn)."""
    assert not lf.LoRALinear.from_linear(nn.Linear(4, 3).eval()).training
    assert lf.LoRALinear.from_linear(nn.Linear(4, 3)).training


def test_from_linear_refuses_a_lora_linear():
    layer = trained_layer()
    with pytest.raises(TypeError, match="already a LoRALinear"):
        lf.LoRALinear.from_linear(layer, r=4)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(lora_alpha=float("nan")), ValueError, ["lora_alpha", "nan"]),
    (dict(lora_alpha=float("inf")), ValueError, ["lora_alpha", "inf"]),
    (dict(lora_alpha="8"), TypeError, ["lora_alpha", "str"]),
    (dict(lora_alpha=1e300), ValueError, ["scaling", "float32"]),
    (dict(in_features=0), ValueError, ["in_features", "0"]),
    (dict(out_features=0), ValueError, ["out_features", "0"]),
    (dict(in_features=2.0), TypeError, ["in_features", "float"]),
])
def test_bad_scalars_are_refused_at_construction(kwargs, error, words):
    args = dict(in_features=8, out_features=4, r=2) | kwargs
    with pytest.raises(error) as info:
        lf.LoRALinear(**args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_setting_a_non_finite_scaling_is_refused():
    layer = trained_layer()
    for bad in (float("nan"), float("inf"), 1e300):
        with pytest.raises(ValueError, match="scaling"):
            layer.scaling = bad
    assert layer.scaling == 2.0  # lora_alpha 8 / r 4
