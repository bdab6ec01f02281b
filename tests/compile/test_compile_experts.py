"""torch.compile(fullgraph=True) traces LoRAExperts (the grouped ops are custom ops): no graph
breaks, and the compiled forward and backward equal eager."""
import pytest
import torch

from lora_cases import rel_error
from lora_fused.modules.experts import LoRAExperts

transformers = pytest.importorskip("transformers")
from moe_cases import experts_modules, tiny_moe  # noqa: E402  (needs transformers)


def layer_and_inputs(family="qwen3_moe", dropout=0.0):
    experts = next(iter(experts_modules(tiny_moe(family)).values()))
    layer = LoRAExperts.from_experts(experts, r=3, lora_dropout=dropout)
    with torch.no_grad():
        for f in layer.lora.values():
            f.lora_B.normal_()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 32, generator=g)
    idx = torch.rand(9, experts.down_proj.shape[0], generator=g).topk(2, dim=-1).indices
    weights = torch.rand(9, 2, generator=g)
    return layer, x, idx, weights


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_no_graph_breaks(training, family):
    layer, x, idx, weights = layer_and_inputs(family, dropout=0.1)
    layer.train(training)
    explanation = torch._dynamo.explain(layer)(x, idx, weights)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_compiled_forward_and_backward_equal_eager(family):
    layer, x, idx, weights = layer_and_inputs(family)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for module in (layer, compiled):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = module(xi, idx, weights)
        y.square().sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad])
    for eager, traced in zip(*results):
        assert rel_error(traced, eager) <= 1e-6


def test_inductor_compiles_the_layer():
    layer, x, idx, weights = layer_and_inputs()
    layer.eval()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        assert rel_error(compiled(x, idx, weights), layer(x, idx, weights)) <= 1e-5
