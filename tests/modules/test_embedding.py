"""LoRA on embeddings: LoRAEmbedding (PEFT's lora.Embedding), inject_lora / PEFT adapters both
ways on a tiny Llama with embed_tokens targeted, and the multi-adapter serving embedding.

y = E[idx] + s · A[:, idx]ᵀ Bᵀ, A = lora_embedding_A [r, V], B = lora_embedding_B [dim, r].
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_fused as lf
from lora_cases import DEVICE, TOLERANCE, rel_error, TINY_LLAMA_VOCAB, tiny_llama
from lora_fused.modules.embedding import LoRAEmbedding, MultiLoRAEmbedding
from lora_fused.ops.embedding import multi_lora_embedding

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V, DIM = 53, 29


def embedding_reference(idx, weight, A, B, s):
    """The float64 formula, token by token."""
    flat = idx.reshape(-1).tolist()
    rows = [weight.double()[v] + s * (A.double()[:, v] @ B.double().T) for v in flat]
    return torch.stack(rows).view(*idx.shape, weight.shape[1])


def randomized(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_embedding_A.copy_(torch.randn(layer.lora_embedding_A.shape, generator=g))
        layer.lora_embedding_B.copy_(torch.randn(layer.lora_embedding_B.shape, generator=g) * layer.r ** -0.5)
    return layer


@pytest.mark.parametrize("r,alpha,rslora", [(1, 1.0, False), (5, 16.0, False), (8, 8.0, True)])
def test_lora_embedding_forward_and_grads_vs_float64(r, alpha, rslora):
    base = nn.Embedding(V, DIM, padding_idx=3)
    layer = randomized(LoRAEmbedding.from_embedding(base, r=r, lora_alpha=alpha, use_rslora=rslora))
    assert layer.weight is base.weight and not layer.weight.requires_grad
    idx = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(1))
    idx[0, 0] = 3  # the padding row: its values are E's row plus the LoRA row, as F.embedding gives
    y = layer(idx)
    A64 = layer.lora_embedding_A.detach().double().requires_grad_()
    B64 = layer.lora_embedding_B.detach().double().requires_grad_()
    ref = embedding_reference(idx, layer.weight.detach(), A64, B64, layer.scaling)
    assert rel_error(y, ref) <= TOLERANCE[torch.float32]
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(grad)
    ref.backward(grad.double())
    # padding_idx: F.embedding gives the padding row no gradient (PEFT passes padding_idx too)
    A64.grad[:, 3] = 0
    assert rel_error(layer.lora_embedding_A.grad, A64.grad) <= TOLERANCE[torch.float32]
    assert rel_error(layer.lora_embedding_B.grad, B64.grad) <= TOLERANCE[torch.float32]


def test_fresh_adapter_is_a_no_op_and_merge_round_trips():
    base = nn.Embedding(V, DIM)
    idx = torch.arange(V)
    layer = LoRAEmbedding.from_embedding(base, r=4, lora_alpha=8.0)
    assert torch.equal(layer(idx), base(idx))  # PEFT's init: A = 0
    randomized(layer)
    unmerged = layer(idx)
    w0 = base.weight.detach().clone()
    layer.merge()
    assert rel_error(layer(idx), unmerged) <= TOLERANCE[torch.float32]
    layer.unmerge()
    assert rel_error(layer.weight, w0) <= TOLERANCE[torch.float32]


def test_from_embedding_refuses_other_modules():
    with pytest.raises(TypeError, match="embedding must be an nn.Embedding"):
        LoRAEmbedding.from_embedding(nn.Linear(3, 4))
    with pytest.raises(TypeError, match="already a LoRAEmbedding"):
        LoRAEmbedding.from_embedding(LoRAEmbedding(5, 3, r=2))


# --------------------------------------------------------------------------
# inject_lora and PEFT adapters on a tiny Llama (embed_tokens targeted)
# --------------------------------------------------------------------------

VOCAB = TINY_LLAMA_VOCAB


TOKENS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
TARGETS = ["embed_tokens", "q_proj", "v_proj"]


def peft_model_with_random_adapter(base):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 * min(p.shape) ** -0.5)
    return model.eval()


def logits_and_lora_grads(model, keep):
    """Logits and the gradients of a fixed projection of them, for the LoRA parameters whose
    name contains one of ``keep``, keyed by (module suffix, which)."""
    model.zero_grad()
    logits = model(TOKENS).logits
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        for which in keep:
            if f".{which}" in name and p.grad is not None:
                # PEFT: ...model.layers.0.self_attn.q_proj.lora_A.default.weight; ours: ...q_proj.lora_A
                module = name.split(f".{which}")[0].rsplit("model.", 1)[-1]
                grads[(module, which)] = p.grad
    return logits, grads


def test_inject_lora_targets_a_named_embedding():
    model = lf.inject_lora(tiny_llama(), TARGETS, r=4, lora_alpha=8.0)
    assert isinstance(model.model.embed_tokens, LoRAEmbedding)
    assert model.model.embed_tokens.lora_embedding_A.requires_grad
    assert not model.model.embed_tokens.weight.requires_grad
    assert {"model.embed_tokens.lora_embedding_A", "model.embed_tokens.lora_embedding_B"} <= set(lf.lora_state_dict(model))
    untouched = lf.inject_lora(tiny_llama(), "all-linear")  # all-linear: nn.Linear only, as PEFT
    assert type(untouched.model.embed_tokens) is nn.Embedding
    with pytest.raises(TypeError, match="nn.Embedding; lora-fused's DoRA adapts nn.Linear only"):
        lf.inject_lora(tiny_llama(), ["embed_tokens"], use_dora=True)


def test_peft_adapter_with_embedding_loads_and_matches_peft(tmp_path):
    base = tiny_llama()
    reference = peft_model_with_random_adapter(base)
    reference.save_pretrained(tmp_path)  # PEFT also writes embed_tokens.base_layer.weight
    ours = lf.load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert isinstance(ours.model.embed_tokens, LoRAEmbedding)
    ref_logits, ref_grads = logits_and_lora_grads(reference, ("lora_embedding_A", "lora_embedding_B"))
    logits, grads = logits_and_lora_grads(ours, ("lora_embedding_A", "lora_embedding_B"))
    assert rel_error(logits, ref_logits) <= 1e-4
    assert set(grads) == set(ref_grads) == {("embed_tokens", "lora_embedding_A"),
                                                 ("embed_tokens", "lora_embedding_B")}
    for key in grads:
        assert rel_error(grads[key], ref_grads[key]) <= 1e-4, key
    # and every linear LoRA gradient too
    _, ref_lin = logits_and_lora_grads(reference, ("lora_A", "lora_B"))
    _, lin = logits_and_lora_grads(ours, ("lora_A", "lora_B"))
    assert set(lin) == set(ref_lin) and len(lin) == 8  # q_proj, v_proj x 2 layers x (A, B)
    for key in lin:
        assert rel_error(lin[key], ref_lin[key]) <= 1e-4, key


def test_saved_embedding_adapter_loads_in_peft(tmp_path):
    base = tiny_llama()
    ours = lf.inject_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=16.0)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 * min(p.shape) ** -0.5)
    lf.save_peft_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    emb = loaded.base_model.model.model.embed_tokens
    assert isinstance(emb, peft.tuners.lora.Embedding)
    assert torch.equal(emb.lora_embedding_A["default"], ours.model.embed_tokens.lora_embedding_A)
    with torch.no_grad():
        assert rel_error(ours(TOKENS).logits, loaded(TOKENS).logits) <= 1e-4
    # and back: our reader takes its own file
    again = lf.load_peft_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert rel_error(again(TOKENS).logits, ours(TOKENS).logits) <= 1e-6


def test_embedding_keys_for_a_linear_module_are_refused(tmp_path):
    base = tiny_llama()
    reference = peft_model_with_random_adapter(base)
    reference.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "adapter_model.safetensors")
    state = {k.replace("q_proj.lora_A.weight", "q_proj.lora_embedding_A").replace(
        "q_proj.lora_B.weight", "q_proj.lora_embedding_B"): v for k, v in state.items()}
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.raises(TypeError, match="q_proj' is a Linear but the file holds embedding LoRA"):
        lf.load_peft_adapter(copy.deepcopy(base), tmp_path)


# --------------------------------------------------------------------------
# Multi-adapter embedding (serving)
# --------------------------------------------------------------------------

@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", request.param)
    return request.param


def test_multi_lora_embedding_vs_float64(backend):
    g = torch.Generator().manual_seed(4)
    base = nn.Embedding(V, DIM).to(DEVICE)
    layer = MultiLoRAEmbedding(base, n_slots=3, r_max=8)
    adapters = []
    for slot, r in ((0, 8), (2, 3)):  # slot 1 never set: adds nothing
        A, B = torch.randn(r, V, generator=g), torch.randn(DIM, r, generator=g) * r ** -0.5
        layer.set_adapter(slot, A.to(DEVICE), B.to(DEVICE), 0.5 + slot)
        adapters.append((slot, A, B))
    idx = torch.randint(0, V, (3, 6), generator=g).to(DEVICE)
    ids = torch.tensor([0, -1, 2, 1, 2, 0] * 3, device=DEVICE).view(3, 6)
    y = layer(idx, ids)
    ref = base.weight.detach().double()[idx.reshape(-1)].clone()
    for t, (v, i) in enumerate(zip(idx.reshape(-1).tolist(), ids.reshape(-1).tolist())):
        for slot, A, B in adapters:
            if slot == i:
                ref[t] += (0.5 + slot) * (A.double()[:, v] @ B.double().T)
    assert y.shape == (3, 6, DIM)
    assert rel_error(y.reshape(-1, DIM), ref) <= TOLERANCE[torch.float32]
    base_rows = (ids.reshape(-1) < 0) | (ids.reshape(-1) == 1)
    assert torch.equal(y.reshape(-1, DIM)[base_rows], base.weight.detach()[idx.reshape(-1)[base_rows]])


def test_multi_lora_embedding_matches_lora_embedding(backend):
    """One slot holding a LoRAEmbedding's adapter gives that layer's output."""
    single = randomized(LoRAEmbedding.from_embedding(nn.Embedding(V, DIM), r=5, lora_alpha=10.0))
    single = single.to(DEVICE)
    idx = torch.randint(0, V, (13,), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    y = multi_lora_embedding(idx, single.weight.detach(), single.lora_embedding_A.detach().t()[None],
                             single.lora_embedding_B.detach()[None], torch.zeros(13, dtype=torch.long,
                                                                                 device=DEVICE),
                             torch.tensor([single.scaling], device=DEVICE))
    with torch.no_grad():
        assert rel_error(y, single(idx)) <= TOLERANCE[torch.float32]


def test_from_peft_model_converts_embedding_lora():
    base = tiny_llama()
    reference = peft_model_with_random_adapter(base)
    with torch.no_grad():
        ref_logits = reference(TOKENS).logits
    converted = lf.from_peft_model(peft_model_with_random_adapter(base))
    assert isinstance(converted.model.embed_tokens, LoRAEmbedding)
    assert converted.model.embed_tokens.lora_embedding_A.requires_grad
    with torch.no_grad():
        assert rel_error(converted(TOKENS).logits, ref_logits) <= 1e-5
