"""torch.compile traces LoRALinear models with no graph breaks (ops are custom ops)."""
import pytest
import torch
from torch import nn

import lora_fused as lf
from lora_cases import BAD_SCALINGS, refuses_bad_scaling_under_compile, rel_error


def mlp(dropout=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(lf.LoRALinear(19, 33, r=4, lora_dropout=dropout), nn.GELU(),
                          lf.LoRALinear(33, 7, r=3, lora_dropout=dropout))
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B)
    return model


@pytest.mark.parametrize("training", [False, True])
def test_no_graph_breaks(training):
    model = mlp(dropout=0.1).train(training)
    x = torch.randn(5, 19)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_forward_and_backward_equal_eager():
    model = mlp()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 19, requires_grad=True)
    y_eager = model(x)
    y_eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    y_compiled = compiled(x)
    y_compiled.sum().backward()
    compiled_grads = [p.grad for p in model.parameters() if p.requires_grad] + [x.grad]
    assert rel_error(y_compiled, y_eager) <= 1e-6
    for a, b in zip(compiled_grads, eager_grads):
        assert rel_error(a, b) <= 1e-6


def test_inductor_compiles_the_op():
    model = mlp().eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 19)
    with torch.no_grad():
        assert rel_error(compiled(x), model(x)) <= 1e-5


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake kernel and autograd registration are consistent."""
    x = torch.randn(5, 19, requires_grad=True)
    w = torch.randn(7, 19)
    A = torch.randn(3, 19, requires_grad=True)
    B = torch.randn(7, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.lora_fused.lora_linear_fwd.default,
                          (x, w, None, A, B, 0.5, 0.0, None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiled_function_with_changing_scaling():
    """A second scaling value makes dynamo trace it symbolically: no graph break, right values."""
    torch._dynamo.reset()
    fn = torch.compile(lf.lora_linear, fullgraph=True, backend="aot_eager")
    x, w = torch.randn(5, 19), torch.randn(7, 19)
    A, B = torch.randn(3, 19), torch.randn(7, 3)
    for scaling in (0.5, 2.0, 3.5):
        expected = lf.lora_linear_reference(x.double(), w.double(), A.double(), B.double(), scaling)
        assert rel_error(fn(x, w, A, B, scaling), expected) <= 1e-5


@pytest.mark.parametrize("finite_first,bad", BAD_SCALINGS)
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_lora_linear_refuses_a_non_finite_scaling(backend, finite_first, bad):
    torch.manual_seed(0)
    x, w, A, B = torch.randn(5, 99), torch.randn(48, 99), torch.randn(3, 99), torch.randn(48, 3)
    refuses_bad_scaling_under_compile(lambda s: lf.lora_linear(x, w, A, B, s), backend, finite_first, bad)


@pytest.mark.parametrize("finite_first,bad", BAD_SCALINGS[:2])
def test_compiled_dora_linear_refuses_a_non_finite_scaling(finite_first, bad):
    torch.manual_seed(0)
    x, w, A, B = torch.randn(5, 99), torch.randn(48, 99), torch.randn(3, 99), torch.randn(48, 3)
    magnitude = torch.rand(48) + 0.5
    refuses_bad_scaling_under_compile(lambda s: lf.dora_linear(x, w, A, B, magnitude, s), "aot_eager",
                                      finite_first, bad)
