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
    (dict(scaling=float("inf")), ValueError, ["scaling", "inf"]),
    (dict(scaling=1e300), ValueError, ["scaling=1e+300", "float32"]),
    (dict(scaling=-1e39), ValueError, ["scaling=-1e+39", "float32"]),
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


@pytest.mark.parametrize("value,error", [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                         (True, TypeError), ("4", TypeError), (None, TypeError)])
def test_every_count_argument_shares_one_positive_int_check(value, error):
    """One rule for ranks, feature counts and slot counts: TypeError unless an int (bool
    refused), ValueError unless >= 1, each naming the argument."""
    from lora_fused.validation import check_positive_int
    assert check_positive_int(5, "r") == 5
    calls = {
        "n_adapters": lambda: lf.plan_segments(torch.zeros(4, dtype=torch.int64), value),
        "max_adapters": lambda: lf.MultiLoRALinear(8, 4, max_adapters=value, max_rank=2),
        "max_rank": lambda: lf.MultiLoRALinear(8, 4, max_adapters=2, max_rank=value),
        "r": lambda: lf.LoRALinear(8, 4, r=value),
    }
    for name, fn in calls.items():
        with pytest.raises(error, match=name):
            fn()


def test_all_meta_multi_lora_gives_a_meta_result():
    """Meta tensors have no values: the host-side value checks are skipped (they called
    .item() on meta) and the result is a meta tensor of the right shape, as F.linear gives."""
    meta = dict(device="meta")
    x, weight = torch.empty(2, 3, 8, **meta), torch.empty(6, 8, **meta)
    lora_A, lora_B = torch.empty(2, 3, 8, **meta), torch.empty(2, 6, 3, **meta)
    ids, scalings = torch.zeros(6, dtype=torch.int64, **meta), torch.ones(2, **meta)
    for ranks in (None, torch.ones(2, dtype=torch.int32, **meta)):
        y = lf.multi_lora_linear(x, weight, lora_A, lora_B, ids, scalings, ranks=ranks)
        assert y.device.type == "meta" and y.shape == (2, 3, 6)
