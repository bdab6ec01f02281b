"""LoRAExperts: LoRA on transformers' 3-D expert parameters, against float64 oracles.

The oracle for a family is the family's own eager experts forward (a float64 copy of the module,
``config._experts_implementation = "eager"``) run on the effective weights W_e + s·B_e A_e,
through ``torch.func.functional_call``, so it shares no code with LoRAExperts' grouped path.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import lora_fused as lf
from lora_cases import SizeRecorder, keep_mask_of_backend, rel_error
from lora_fused.modules.experts import LoRAExperts, matmul_shape
from lora_fused.ops.grouped import plan_experts
from lora_fused.ops.lora_linear import draw_dropout_seed

transformers = pytest.importorskip("transformers")
from moe_cases import FAMILIES, experts_modules, tiny_moe  # noqa: E402  (needs transformers)

TOL = 1e-5  # fp32 vs float64, relative (the house tolerance)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """The grouped op's two backends; CPU tensors take the Triton kernels only under the interpreter."""
    if request.param == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors take the Triton kernels only under TRITON_INTERPRET=1")
    monkeypatch.setenv("LORA_FUSED_BACKEND", request.param)
    return request.param


def experts_of(family: str, seed: int = 0) -> nn.Module:
    return next(iter(experts_modules(tiny_moe(family, seed)).values()))


def randomized(layer: LoRAExperts, seed: int = 1) -> LoRAExperts:
    """Random nonzero factors (a fresh B is zero: every LoRA term would vanish)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for factors in layer.lora.values():
            factors.lora_A.copy_(torch.randn(factors.lora_A.shape, generator=g) * 0.3)
            factors.lora_B.copy_(torch.randn(factors.lora_B.shape, generator=g) * 0.3)
    return layer


def routing(num_tokens: int, top_k: int, num_experts: int, hidden: int, seed: int = 2):
    """Random hidden states and top-k choices (distinct experts per token, one expert left unused)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    scores = torch.rand(num_tokens, num_experts - 1, generator=g)
    idx = scores.topk(top_k, dim=-1).indices
    weights = torch.rand(num_tokens, top_k, generator=g)
    return x, idx, weights


def effective_weights(layer: LoRAExperts, factors64: dict) -> dict:
    """{parameter: W + s·B_e A_e} in float64 in the parameter's storage order, differentiable in the factors."""
    base = layer.base_layer
    out = {}
    for name, (A, B) in factors64.items():
        delta = layer.lora[name].scaling * torch.einsum("eor,eri->eoi", B, A)
        if base.is_transposed:
            delta = delta.transpose(1, 2)
        out[name] = base._parameters[name].detach().double() + delta
    return out


def oracle(layer: LoRAExperts, x, idx, weights):
    """(y, dx, {param: (dA, dB)}) in float64 from the family's own eager forward, upstream grad = y's sign-free ones·y."""
    base64 = copy.deepcopy(layer.base_layer).double()
    base64.config = copy.deepcopy(base64.config)
    base64.config._experts_implementation = "eager"
    x64 = x.detach().double().requires_grad_(True)
    factors64 = {n: (f.lora_A.detach().double().requires_grad_(True), f.lora_B.detach().double().requires_grad_(True))
                 for n, f in layer.lora.items()}
    y = torch.func.functional_call(base64, effective_weights(layer, factors64), (x64, idx, weights.double()))
    return y, x64, factors64


def run(layer, x, idx, weights, grad_seed=3):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x, idx, weights)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed))
    y.backward(grad_y)
    return y, x.grad, grad_y


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_family_eager_forward_and_grads(family, backend):
    """Output, dX and every dA/dB against the family's own eager forward in float64 (≤ 1e-5 relative)."""
    experts = experts_of(family)
    layer = randomized(LoRAExperts.from_experts(experts, r=3, lora_alpha=6.0))
    E = experts.down_proj.shape[0]
    hidden = matmul_shape(experts, experts._parameters["down_proj"])[0]
    x, idx, weights = routing(11, 2, E, hidden)
    y, dx, grad_y = run(layer, x, idx, weights)
    ref, x64, factors64 = oracle(layer, x, idx, weights)
    ref.backward(grad_y.double())
    assert rel_error(y, ref) <= TOL
    assert rel_error(dx, x64.grad) <= TOL
    for name, f in layer.lora.items():
        assert rel_error(f.lora_A.grad, factors64[name][0].grad) <= TOL, name
        assert rel_error(f.lora_B.grad, factors64[name][1].grad) <= TOL, name
    unused = E - 1  # routing() never picks the last expert: its factors get exact zeros
    for f in layer.lora.values():
        assert torch.count_nonzero(f.lora_A.grad[unused]) == 0 and torch.count_nonzero(f.lora_B.grad[unused]) == 0


def test_ungated_experts_module():
    """has_gate=False (NemotronH: up_proj, then act_fn): the default targets up_proj and down_proj."""
    from transformers.models.nemotron_h import configuration_nemotron_h, modeling_nemotron_h
    config = configuration_nemotron_h.NemotronHConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=5)
    torch.manual_seed(0)
    experts = modeling_nemotron_h.NemotronHExperts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2)
    layer = randomized(LoRAExperts.from_experts(experts, r=2))
    assert list(layer.lora) == ["up_proj", "down_proj"]
    x, idx, weights = routing(8, 2, 5, 32)
    y, dx, grad_y = run(layer, x, idx, weights)
    ref, x64, factors64 = oracle(layer, x, idx, weights)
    ref.backward(grad_y.double())
    assert rel_error(y, ref) <= TOL and rel_error(dx, x64.grad) <= TOL
    for name, f in layer.lora.items():
        assert rel_error(f.lora_A.grad, factors64[name][0].grad) <= TOL
        assert rel_error(f.lora_B.grad, factors64[name][1].grad) <= TOL


def test_subclass_that_overrides_the_forward_is_refused():
    """A subclass overriding the decorated forward (as transformers' ErgoExperts does) adds work
    LoRAExperts' forward would skip: refused, naming both classes."""
    experts_cls = type(experts_of("qwen3_moe"))

    class NormalisedExperts(experts_cls):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return super().forward(hidden_states, top_k_index, top_k_weights) * 2

    experts = NormalisedExperts(tiny_moe("qwen3_moe").config)
    with pytest.raises(TypeError, match="NormalisedExperts overrides the forward.*Qwen3MoeExperts"):
        LoRAExperts.from_experts(experts)


@pytest.mark.parametrize("parameters", [("gate_up_proj",), ("down_proj",)])
def test_one_parameter_targeted(parameters):
    """The projection that is not targeted runs the base alone (grouped_linear_sorted)."""
    experts = experts_of("qwen3_moe")
    layer = randomized(LoRAExperts.from_experts(experts, r=2, parameters=parameters))
    assert list(layer.lora) == list(parameters)
    x, idx, weights = routing(9, 2, 6, 32)
    y, dx, grad_y = run(layer, x, idx, weights)
    ref, x64, factors64 = oracle(layer, x, idx, weights)
    ref.backward(grad_y.double())
    assert rel_error(y, ref) <= TOL and rel_error(dx, x64.grad) <= TOL
    name = parameters[0]
    assert rel_error(layer.lora[name].lora_B.grad, factors64[name][1].grad) <= TOL


def test_fresh_adapter_is_the_base_model():
    """B = 0 at init (A as PEFT draws it): training starts at the base model's output."""
    experts = experts_of("mixtral")
    layer = LoRAExperts.from_experts(experts, r=4)
    for f in layer.lora.values():
        assert torch.count_nonzero(f.lora_B) == 0
        bound = f.lora_A.shape[-1] ** -0.5  # kaiming_uniform(a=sqrt(5)): U(±1/sqrt(in))
        assert f.lora_A.abs().max() <= bound and f.lora_A.std() > bound / 4
    x, idx, weights = routing(7, 2, 6, 32)
    torch.testing.assert_close(layer(x, idx, weights), experts(x, idx, weights), rtol=1e-5, atol=1e-6)


def test_base_parameters_reused_and_frozen():
    experts = experts_of("qwen3_moe")
    before = {n: p for n, p in experts.named_parameters()}
    layer = LoRAExperts.from_experts(experts)
    assert layer.base_layer is experts
    for n, p in layer.base_layer.named_parameters():
        assert p is before[n] and not p.requires_grad
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "lora.gate_up_proj.lora_A", "lora.gate_up_proj.lora_B", "lora.down_proj.lora_A", "lora.down_proj.lora_B"}
    assert layer.num_experts == experts.num_experts  # attributes read through from the base module
    with pytest.raises(AttributeError, match="LoRAExperts.*Qwen3MoeExperts.*'no_such_attribute'"):
        layer.no_such_attribute


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_merge_unmerge_round_trip(family):
    experts = experts_of(family)
    layer = randomized(LoRAExperts.from_experts(experts, r=3))
    originals = {n: p.detach().clone() for n, p in experts.named_parameters()}
    x, idx, weights = routing(8, 2, 6, 32)
    with torch.no_grad():
        y = layer(x, idx, weights)
        layer.merge()
        assert layer.merged
        y_merged = layer(x, idx, weights)  # the base module's own forward on merged weights
        layer.unmerge()
    assert rel_error(y_merged, y) <= TOL
    for n, p in experts.named_parameters():
        torch.testing.assert_close(p, originals[n], rtol=0, atol=1e-6)
    assert not layer.merged


def test_merge_refuses_non_finite_without_changing_anything():
    experts = experts_of("qwen3_moe")
    layer = randomized(LoRAExperts.from_experts(experts, r=2))
    with torch.no_grad():
        layer.lora["down_proj"].lora_B[3, 0, 0] = float("inf")
    originals = {n: p.detach().clone() for n, p in experts.named_parameters()}
    with pytest.raises(ValueError, match=r"down_proj\[3\]"):
        layer.merge()
    assert not layer.merged
    for n, p in experts.named_parameters():
        assert torch.equal(p, originals[n]), n


def test_disabled_runs_the_base_module_and_refuses_merge():
    experts = experts_of("olmoe")
    layer = randomized(LoRAExperts.from_experts(experts))
    x, idx, weights = routing(6, 2, 6, 32)
    layer.disabled = True
    torch.testing.assert_close(layer(x, idx, weights), experts(x, idx, weights), rtol=0, atol=0)
    with pytest.raises(ValueError, match="disabled"):
        layer.merge()
    layer.disabled = False
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        layer.disabled = True


def test_merged_flag_travels_in_state_dict():
    """A merged checkpoint (base holds the adapter) loads as merged; factors alone into a merged module are refused."""
    layer = randomized(LoRAExperts.from_experts(experts_of("qwen3_moe"), r=2))
    layer.merge()
    state = layer.state_dict()
    fresh = LoRAExperts.from_experts(experts_of("qwen3_moe"), r=2)
    fresh.load_state_dict(state)
    assert fresh.merged
    x, idx, weights = routing(5, 2, 6, 32)
    torch.testing.assert_close(fresh(x, idx, weights), layer(x, idx, weights), rtol=0, atol=0)
    factors_only = {k: v for k, v in state.items() if ".lora_" in k}
    with pytest.raises(RuntimeError, match="unmerge"):
        fresh.load_state_dict(factors_only, strict=False)


def test_expert_parallel_sentinels_contribute_nothing():
    """Ids outside [0, E) (transformers' expert-parallel sentinels) add nothing and get no gradient."""
    experts = experts_of("qwen3_moe")
    layer = randomized(LoRAExperts.from_experts(experts, r=2))
    x, idx, weights = routing(6, 2, 6, 32)
    sentinel = idx.clone()
    sentinel[:, 1] = 6  # the second choice of every token is a sentinel
    y, dx, grad_y = run(layer, x, sentinel, weights)
    only_first = run(layer, x, idx[:, :1], weights[:, :1])[0]
    torch.testing.assert_close(y, only_first, rtol=1e-6, atol=1e-6)


def sorted_oracle_with_mask(layer, x, idx, weights, seeds, p):
    """float64 forward with dropout on each targeted projection's sorted input rows, the mask
    being the mask the op's backend draws from the op's seed (spec: mask over sorted rows)."""
    base = layer.base_layer
    plan = plan_experts(idx, base.down_proj.shape[0])
    expert_of_pair = idx.reshape(-1)[plan.order]
    x64 = x.detach().double().requires_grad_(True)
    factors64 = {n: (f.lora_A.detach().double().requires_grad_(True), f.lora_B.detach().double().requires_grad_(True))
                 for n, f in layer.lora.items()}

    def project(name, h, seed):
        W = base._parameters[name].detach().double()
        W = W.transpose(1, 2) if base.is_transposed else W
        y = torch.einsum("pi,poi->po", h, W[expert_of_pair])
        A, B = factors64[name]
        # the mask of the backend the fp32 layer ran on (Triton's Philox stream, or the torch backend's draw)
        keep = keep_mask_of_backend(torch.empty(1, h.shape[1]), int(seed), h.shape[0], p).double() / (1 - p)
        s = layer.lora[name].scaling
        return y + s * torch.einsum("pr,por->po", torch.einsum("pi,pri->pr", h * keep, A[expert_of_pair]),
                                    B[expert_of_pair])

    h = project("gate_up_proj", x64[plan.rows], seeds[0])
    h = base.act_fn(h.chunk(2, dim=-1)[0]) * h.chunk(2, dim=-1)[1]
    y = project("down_proj", h, seeds[1])
    y = y[plan.position] * weights.double().reshape(-1, 1)
    return y.view(x.shape[0], -1, y.shape[-1]).sum(1), x64, factors64


def test_dropout_against_float64_oracle_with_the_ops_mask(backend):
    experts = experts_of("qwen3_moe")
    p = 0.3
    layer = randomized(LoRAExperts.from_experts(experts, r=3, lora_dropout=p)).train()
    x, idx, weights = routing(10, 2, 6, 32)
    torch.manual_seed(1234)
    seeds = [draw_dropout_seed(torch.device("cpu")), draw_dropout_seed(torch.device("cpu"))]  # one per projection
    torch.manual_seed(1234)
    y, dx, grad_y = run(layer, x, idx, weights)
    ref, x64, factors64 = sorted_oracle_with_mask(layer, x, idx, weights, seeds, p)
    ref.backward(grad_y.double())
    assert rel_error(y, ref) <= TOL and rel_error(dx, x64.grad) <= TOL
    for name, f in layer.lora.items():
        assert rel_error(f.lora_A.grad, factors64[name][0].grad) <= TOL
        assert rel_error(f.lora_B.grad, factors64[name][1].grad) <= TOL
    layer.eval()  # no dropout outside training: the plain oracle
    ref_eval = oracle(layer, x, idx, weights)[0]
    assert rel_error(layer(x, idx, weights), ref_eval) <= TOL
    assert rel_error(y, ref_eval) > 1e-3  # the mask did act in training


def expert_sized_ops(run_step, experts) -> list:
    """The ops of ``run_step()`` whose output has at least one expert's out·in elements (the smaller projection)."""
    threshold = min(p[0].numel() for p in (experts.gate_up_proj, experts.down_proj))
    with SizeRecorder() as recorder:
        run_step()
    return [(op, n) for op, n in recorder.records if n >= threshold]


def moe_block_inputs(E=4, H=256, I=128, T=12, k=2):
    """An experts module whose factor stacks (and their split-M partial gradients) stay below one
    expert's out·in: E·r·splits < min(in, out), so only a formed B_e A_e (or a copy of W) can reach
    the threshold. (With E·r ≥ out, the gradient of the factor stack itself is that large.)"""
    import transformers
    config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    torch.manual_seed(0)
    experts = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.1)
    x, idx, weights = routing(T, k, E, H)
    return experts, x, idx, weights


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_no_expert_sized_tensor(dropout, backend):
    """Forward + backward of a LoRAExperts creates no tensor of one expert's out·in elements."""
    experts, x, idx, weights = moe_block_inputs()
    layer = randomized(LoRAExperts.from_experts(experts, r=2, lora_dropout=dropout)).train()
    x.requires_grad_(True)
    big = expert_sized_ops(lambda: layer(x, idx, weights).square().sum().backward(), experts)
    assert big == [], big


def test_peft_param_wrapper_makes_an_expert_sized_tensor():
    """The same recorder catches PEFT's ParamWrapper forming B A (the test can fail)."""
    peft = pytest.importorskip("peft")
    experts, x, idx, weights = moe_block_inputs()
    holder = nn.Module()
    holder.experts = experts
    model = peft.get_peft_model(holder, peft.LoraConfig(r=2, target_modules=[],
                                                       target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)
    x.requires_grad_(True)
    big = expert_sized_ops(lambda: model.base_model.model.experts(x, idx, weights).square().sum().backward(), experts)
    assert big, "PEFT formed no expert-sized tensor"


def test_bad_input_errors():
    experts = experts_of("qwen3_moe")
    with pytest.raises(ValueError, match="r must be a positive int"):
        LoRAExperts.from_experts(experts, r=0)
    with pytest.raises(ValueError, match="no expert projection 'up_proj'"):
        LoRAExperts.from_experts(experts, parameters=("up_proj",))
    with pytest.raises(ValueError, match="at least one"):
        LoRAExperts.from_experts(experts, parameters=())
    with pytest.raises(ValueError, match="twice"):
        LoRAExperts.from_experts(experts, parameters=("down_proj", "down_proj"))
    with pytest.raises(ValueError, match=r"shape \(6, 96\).*3-D"):
        LoRAExperts.from_experts(experts_of("gpt_oss"), parameters=("gate_up_proj_bias",))
    with pytest.raises(TypeError, match="use_experts_implementation"):
        LoRAExperts.from_experts(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="already a LoRAExperts"):
        LoRAExperts.from_experts(LoRAExperts.from_experts(experts))
    with pytest.raises(ValueError, match="lora_dropout|dropout"):
        LoRAExperts.from_experts(experts_of("qwen3_moe"), lora_dropout=1.0)


def test_inject_lora_target_parameters_peft_matching():
    model = tiny_moe("qwen3_moe")
    lf.inject_lora(model, None, r=2, target_parameters=["mlp.experts.gate_up_proj", "down_proj"],
                   rank_pattern={"layers.1.mlp.experts.down_proj": 5}, alpha_pattern={"gate_up_proj": 4})
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRAExperts)}
    assert sorted(layers) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    second = layers["model.layers.1.mlp.experts"]
    assert second.lora["down_proj"].r == 5 and second.lora["gate_up_proj"].r == 2
    assert second.lora["gate_up_proj"].lora_alpha == 4 and second.lora["down_proj"].lora_alpha == 8
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lf.lora_state_dict(model)) and len(trainable) == 8
    assert all(".lora." in k for k in trainable)
    lf.merge_lora(model)
    assert all(m.merged for m in layers.values())
    lf.unmerge_lora(model)
    assert not any(m.merged for m in layers.values())


def test_inject_lora_target_parameters_errors():
    with pytest.raises(ValueError, match="matched no parameter"):
        lf.inject_lora(tiny_moe("qwen3_moe"), [], target_parameters=["mlp.experts.w1"])
    with pytest.raises(ValueError, match=r"shape \(6, 32\).*3-D"):
        lf.inject_lora(tiny_moe("qwen3_moe"), None, target_parameters=["mlp.gate.weight"])
    with pytest.raises(ValueError, match="nothing to adapt"):
        lf.inject_lora(tiny_moe("qwen3_moe"), None)
    with pytest.raises(TypeError, match="list of parameter names"):
        lf.inject_lora(tiny_moe("qwen3_moe"), None, target_parameters="down_proj")
    model = tiny_moe("qwen3_moe")
    lf.inject_lora(model, None, target_parameters=["down_proj"])
    with pytest.raises(ValueError, match="already have expert LoRA"):
        lf.inject_lora(model, None, target_parameters=["down_proj"])
    with pytest.raises(ValueError, match="r must be a positive int"):
        lf.inject_lora(tiny_moe("qwen3_moe"), None, target_parameters=["down_proj"], r=0)


def test_gradient_checkpointing_with_dropout_gives_the_same_gradients():
    """Checkpointed decoder layers run their forward again in backward: the expert dropout seed is
    drawn again from the RNG state the checkpoint restores, so the masks and every gradient equal
    those of the run without checkpointing."""
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointing in (False, True):
        model = tiny_moe("qwen3_moe", 0)
        lf.inject_lora(model, None, r=3, lora_alpha=6, lora_dropout=0.3,
                       target_parameters=["gate_up_proj", "down_proj"])
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.2)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for name, grad in grads[0].items():
        assert torch.count_nonzero(grad) > 0 and torch.equal(grad, grads[1][name]), name
