"""Bad input raises ValueError/TypeError naming the argument and the shapes seen."""
import pytest
import torch

import lora_fused as lf
from lora_cases import make_inputs


def call(**overrides):
    inp = make_inputs(4, 19, 33, 3)
    args = dict(x=inp.x, weight=inp.weight, lora_A=inp.lora_A, lora_B=inp.lora_B,
                scaling=0.5, bias=inp.bias, dropout_p=0.0)
    args.update(overrides)
    return lf.lora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"],
                          args["scaling"], args["bias"], dropout_p=args["dropout_p"], training=True)


@pytest.mark.parametrize("overrides,error,words", [
    (dict(x=torch.randn(4, 20)), ValueError, ["x", "(4, 20)", "in_features=19"]),
    (dict(weight=torch.randn(33, 19, 1)), ValueError, ["weight", "(33, 19, 1)"]),
    (dict(lora_A=torch.randn(3, 18)), ValueError, ["lora_A", "(3, 18)"]),
    (dict(lora_B=torch.randn(33, 4)), ValueError, ["lora_B", "(33, 4)", "r=3"]),
    (dict(lora_B=torch.randn(32, 3)), ValueError, ["lora_B", "(32, 3)"]),
    (dict(lora_A=torch.randn(0, 19), lora_B=torch.randn(33, 0)), ValueError, ["lora_A", "(0, 19)"]),
    (dict(bias=torch.randn(32)), ValueError, ["bias", "(32,)"]),
    (dict(x=torch.randn(4, 19, dtype=torch.float16)), TypeError, ["weight", "float32", "float16"]),
    (dict(lora_B=torch.randn(33, 3, dtype=torch.float64)), TypeError, ["lora_B", "float64"]),
    (dict(bias=torch.randn(33, dtype=torch.float16)), TypeError, ["bias", "float16"]),
    (dict(x=torch.randint(0, 3, (4, 19))), TypeError, ["x", "int64"]),
    (dict(lora_A=torch.randn(3, 19, device="meta")), ValueError, ["lora_A", "meta", "cpu"]),
    (dict(dropout_p=1.0), ValueError, ["dropout_p", "1.0"]),
    (dict(dropout_p=-0.1), ValueError, ["dropout_p", "-0.1"]),
    (dict(dropout_p="0.1"), TypeError, ["dropout_p", "str"]),
    (dict(scaling=torch.tensor(0.5)), TypeError, ["scaling", "Tensor"]),
    (dict(scaling=float("nan")), ValueError, ["scaling", "nan"]),
    (dict(x=[[1.0] * 19]), TypeError, ["x", "list"]),
    (dict(x=torch.tensor(1.0)), ValueError, ["x", "()"]),
])
def test_bad_input_is_rejected_with_a_clear_message(overrides, error, words):
    with pytest.raises(error) as info:
        call(**overrides)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("kwargs,error,word", [
    (dict(r=0), ValueError, "r=0"),
    (dict(r=-2), ValueError, "r=-2"),
    (dict(r=2.5), TypeError, "r must be an int"),
    (dict(lora_dropout=1.5), ValueError, "dropout_p"),
])
def test_lora_linear_module_rejects_bad_hyperparameters(kwargs, error, word):
    with pytest.raises(error, match=word):
        lf.LoRALinear(8, 4, **kwargs)


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="LORA_FUSED_BACKEND"):
        call()


def test_forcing_triton_on_float64_is_an_error(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", "triton")
    inp = make_inputs(4, 19, 33, 3, torch.float64)
    with pytest.raises((TypeError, ValueError), match="float64"):
        lf.lora_linear(inp.x, inp.weight, inp.lora_A, inp.lora_B, 0.5, inp.bias)
