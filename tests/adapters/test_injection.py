"""inject_lora and friends: PEFT's target-module rules on plain PyTorch models."""
import pytest
import torch
from torch import nn

import lora_fused as lf
from lora_cases import rel_error


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * torch.sigmoid(self.k_proj(x)) + self.v_proj(x))


class Toy(nn.Module):
    def __init__(self, d=12, vocab=17):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Attention(d) for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, tokens):
        h = self.embed(tokens)
        for layer in self.layers:
            h = h + layer(h)
        return self.lm_head(self.norm(h))


def lora_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, lf.LoRALinear))


def test_list_matches_full_names_and_dot_suffixes():
    model = lf.inject_lora(Toy(), ["q_proj", "layers.1.v_proj"], r=4)
    assert lora_names(model) == ["layers.0.q_proj", "layers.1.q_proj", "layers.1.v_proj"]


def test_suffix_must_follow_a_dot():
    with pytest.raises(ValueError, match="matched no module"):
        lf.inject_lora(Toy(), ["proj"])


def test_string_is_a_full_regex_match():
    model = lf.inject_lora(Toy(), r"layers\.0\.(k|o)_proj", r=2)
    assert lora_names(model) == ["layers.0.k_proj", "layers.0.o_proj"]
    with pytest.raises(ValueError, match="matched no module"):
        lf.inject_lora(Toy(), r"q_proj")  # fullmatch: a bare suffix is not enough


def test_all_linear_skips_the_output_layer():
    model = lf.inject_lora(Toy(), "all-linear", r=2)
    assert len(lora_names(model)) == 8 and "lm_head" not in lora_names(model)
    assert type(model.lm_head) is nn.Linear


def test_freezes_everything_but_lora_and_keeps_weights():
    model = Toy()
    q_weight = model.layers[0].q_proj.weight
    tokens = torch.randint(0, 17, (2, 5))
    before = model(tokens)
    lf.inject_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8.0, lora_dropout=0.1)
    assert model.layers[0].q_proj.weight is q_weight
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"layers.{i}.{p}.{ab}" for i in (0, 1) for p in ("q_proj", "v_proj")
                               for ab in ("lora_A", "lora_B"))
    model.eval()
    assert rel_error(model(tokens), before) <= 1e-5  # fresh adapters are no-ops
    layer = model.layers[1].v_proj
    assert (layer.r, layer.lora_alpha, layer.lora_dropout) == (4, 8.0, 0.1)


def test_rank_and_alpha_patterns():
    model = lf.inject_lora(Toy(), ["q_proj", "v_proj"], r=4, lora_alpha=8.0,
                           rank_pattern={r"layers\.1\.q_proj": 2}, alpha_pattern={"v_proj": 3.0})
    assert model.layers[1].q_proj.r == 2 and model.layers[0].q_proj.r == 4
    assert model.layers[0].v_proj.lora_alpha == 3.0 and model.layers[0].q_proj.lora_alpha == 8.0


def test_non_linear_targets_and_double_injection_are_refused():
    with pytest.raises(TypeError, match="nn.Linear only"):
        lf.inject_lora(Toy(), ["norm"])
    model = lf.inject_lora(Toy(), ["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA"):
        lf.inject_lora(model, ["q_proj"])
    with pytest.raises(TypeError, match="target_modules"):
        lf.inject_lora(Toy(), [3])


def test_lora_state_dict_merge_and_unmerge():
    model = lf.inject_lora(Toy(), ["q_proj", "o_proj"], r=3)
    sd = lf.lora_state_dict(model)
    assert sorted(sd) == sorted(f"layers.{i}.{p}.{ab}" for i in (0, 1) for p in ("q_proj", "o_proj")
                                for ab in ("lora_A", "lora_B"))
    for name, param in model.named_parameters():
        if name.endswith("lora_B"):
            nn.init.normal_(param)
    tokens = torch.randint(0, 17, (2, 5))
    model.eval()
    unmerged = model(tokens)
    lf.merge_lora(model)
    assert all(m.merged for m in model.modules() if isinstance(m, lf.LoRALinear))
    assert rel_error(model(tokens), unmerged) <= 1e-5
    lf.unmerge_lora(model)
    assert rel_error(model(tokens), unmerged) <= 1e-5


def test_merge_lora_is_all_or_nothing():
    """A refusing layer (disabled) stops merge_lora before any weight changes; a merge that
    overflows the weight's dtype unmerges the layers merged before it."""
    layers = nn.Sequential(*(lf.LoRALinear(6, 6, r=2) for _ in range(3)))
    for layer in layers:
        nn.init.normal_(layer.lora_B)
    before = [layer.weight.detach().clone() for layer in layers]
    layers[1].disabled = True
    with pytest.raises(ValueError, match=r"1 of 3 layers cannot merge.*1: .*disabled"):
        lf.merge_lora(layers)
    assert not any(layer.merged for layer in layers)
    assert all(torch.equal(layer.weight, w) for layer, w in zip(layers, before))
    layers[1].disabled = False
    half = nn.Sequential(*(lf.LoRALinear(6, 6, r=2, dtype=torch.float16) for _ in range(3)))
    for layer in half:
        nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        half[2].lora_B.fill_(6e4)  # W + s·B A overflows float16
    with pytest.raises(ValueError, match="NaN/inf"):
        lf.merge_lora(half)
    assert not any(layer.merged for layer in half)


def test_trains_only_lora():
    model = lf.inject_lora(Toy(), "all-linear", r=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tokens = torch.randint(0, 17, (4, 6))
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_all_linear_is_matched_in_any_case_as_in_peft():
    """PEFT compares ``target_modules.lower()`` with "all-linear"; the loader and inject_lora
    share that one rule."""
    assert lora_names(lf.inject_lora(Toy(), "All-Linear", r=2)) == lora_names(lf.inject_lora(Toy(), "all-linear", r=2))
    model = Toy()
    assert lf.adapters.peft_config.peft_target_names(model, {"target_modules": "ALL-LINEAR"}) == \
        lf.adapters.injection.select_modules(model, "all-linear")


def test_all_linear_on_a_bare_linear_is_refused():
    """A model that is itself its only nn.Linear has no submodule to replace (PEFT, too, adapts
    modules inside a model): ValueError, never a child named "" registered on the linear."""
    linear = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="target_modules=.all-linear. selects the model itself"):
        lf.inject_lora(linear, "all-linear")
    assert dict(linear.named_children()) == {}


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_must_be_a_dict(field):
    with pytest.raises(TypeError, match=f"{field} must be a dict"):
        lf.inject_lora(Toy(), ["q_proj"], **{field: ["q_proj", 2]})
    with pytest.raises(ValueError, match=f"{field} key .* not a valid regex"):
        lf.inject_lora(Toy(), ["q_proj"], **{field: {"(": 2}})

