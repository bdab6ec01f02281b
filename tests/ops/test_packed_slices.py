"""Packed projections (q|k|v, gate|up) with the base GEMM included:

- ``lf.multi_lora_linear(..., slices=...)``: forward and every gradient against float64;
- ``MultiLoRALinear`` built with ``slices``: per-slice adapters, slots, hot swap, routing;
- ``load_peft_adapter_slot(..., packed=...)``: PEFT adapters trained on separate q_proj /
  k_proj / v_proj served from one packed qkv_proj, row for row against PEFT itself.

The torch path everywhere; the Triton kernels (interpreter on CPU) on one small case each.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_fused as lf
from lora_cases import DEVICE, TOLERANCE, rel_error

IN = 19
SLICES = (12, 5, 7)
OUT = sum(SLICES)


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", request.param)
    return request.param


def rand(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def reference(x, weight, bias, lora_A, lora_B, ids, scalings, ranks, slices):
    """float64 loop over rows and slices (autograd gives the reference gradients)."""
    base = x @ weight.T + (0 if bias is None else bias)
    rows = []
    for t, i in enumerate(ids.tolist()):
        if i < 0:
            rows.append(base[t])
            continue
        parts, start, r = [], 0, ranks[i]
        for j, w in enumerate(slices):
            shrink = x[t] @ lora_A[i, j, :r].T
            parts.append(scalings[i].double() * (shrink @ lora_B[i, start:start + w, :r].T))
            start += w
        rows.append(base[t] + torch.cat(parts))
    return torch.stack(rows)


# --------------------------------------------------------------------------
# (a) multi_lora_linear(..., slices=...)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, T, slices, lead", [
    (torch.float32, 11, SLICES, ()),
    (torch.float32, 1, (OUT,), ()),
    (torch.float64, 14, (3, 21), (2,)),   # x [2, 7, in]: leading dims kept
])
def test_slices_forward_and_all_grads_vs_float64(dtype, T, slices, lead):
    g = torch.Generator().manual_seed(T)
    n, r_max, S, out = 3, 6, len(slices), sum(slices)
    ids = torch.tensor([(t * 5 + 2) % (n + 1) - 1 for t in range(T)], device=DEVICE)  # unsorted, -1 rows
    ranks = torch.tensor([2, 6, 1], device=DEVICE)
    scalings = torch.tensor([0.7, 1.9, -1.3], device=DEVICE)
    leaves = dict(x=rand(g, T, IN, dtype=dtype), weight=rand(g, out, IN, scale=IN ** -0.5, dtype=dtype),
                  bias=rand(g, out, dtype=dtype), lora_A=rand(g, n, S, r_max, IN, scale=IN ** -0.5, dtype=dtype),
                  lora_B=rand(g, n, out, r_max, scale=0.5, dtype=dtype))
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    x = leaves["x"].reshape(*lead, -1, IN) if lead else leaves["x"]
    y = lf.multi_lora_linear(x, leaves["weight"], leaves["lora_A"], leaves["lora_B"], ids, scalings,
                             leaves["bias"], ranks=ranks, slices=slices)
    assert y.shape == (*x.shape[:-1], out) and y.dtype == dtype
    grad = rand(g, *y.shape, dtype=dtype)
    y.backward(grad)
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    ref = reference(*(ref_leaves[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")), ids, scalings,
                    ranks.tolist(), slices)
    ref.backward(grad.double().reshape(ref.shape))
    tol = 1e-12 if dtype == torch.float64 else TOLERANCE[dtype]
    assert rel_error(y.reshape(ref.shape), ref) <= tol
    for k, leaf in leaves.items():
        assert rel_error(leaf.grad, ref_leaves[k].grad) <= tol, k
    pad = torch.arange(r_max, device=DEVICE) >= ranks[:, None]  # rank padding: zero gradient
    assert not leaves["lora_A"].grad.permute(0, 2, 1, 3)[pad].any()
    assert not leaves["lora_B"].grad.permute(0, 2, 1)[pad].any()


def test_slices_under_the_triton_kernels(backend):
    """One small case on both backends (the kernels run in the interpreter on CPU)."""
    g = torch.Generator().manual_seed(3)
    n, r_max, T = 2, 4, 6
    ids = torch.tensor([1, -1, 0, 1, 0, -1], device=DEVICE)
    ranks, scalings = torch.tensor([3, 4], device=DEVICE), torch.tensor([1.5, -0.5], device=DEVICE)
    leaves = dict(x=rand(g, T, IN), weight=rand(g, OUT, IN, scale=IN ** -0.5),
                  lora_A=rand(g, n, 3, r_max, IN, scale=IN ** -0.5), lora_B=rand(g, n, OUT, r_max, scale=0.5))
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    y = lf.multi_lora_linear(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"], ids, scalings,
                             ranks=ranks, slices=SLICES)
    grad = rand(g, T, OUT)
    y.backward(grad)
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    ref = reference(ref_leaves["x"], ref_leaves["weight"], None, ref_leaves["lora_A"], ref_leaves["lora_B"], ids,
                    scalings, ranks.tolist(), SLICES)
    ref.backward(grad.double())
    assert rel_error(y, ref) <= TOLERANCE[torch.float32]
    for k, leaf in leaves.items():
        assert rel_error(leaf.grad, ref_leaves[k].grad) <= TOLERANCE[torch.float32], k
    with torch.no_grad():  # inference: the base GEMM, then add_lora's one shrink over all slices
        y_infer = lf.multi_lora_linear(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"], ids,
                                       scalings, ranks=ranks, slices=SLICES)
    assert rel_error(y_infer, ref) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_path_vs_float64(dtype, monkeypatch):
    """No autograd: base GEMM + add_lora (x read once for all slices), leading dims kept, -1 rows
    and mixed ranks; the ranks are checked as with autograd."""
    g = torch.Generator().manual_seed(21)
    n, r_max, T = 3, 5, 12
    ids = torch.tensor([2, -1, 0, 2, 1, 1, -1, 0, 2, 2, 0, 1], device=DEVICE)
    ranks, scalings = torch.tensor([5, 1, 3], device=DEVICE), torch.tensor([0.3, -2.0, 1.1], device=DEVICE)
    x, W, b = rand(g, 3, 4, IN, dtype=dtype), rand(g, OUT, IN, dtype=dtype), rand(g, OUT, dtype=dtype)
    A, B = rand(g, n, 3, r_max, IN, dtype=dtype), rand(g, n, OUT, r_max, dtype=dtype)
    from lora_fused.ops import delta
    calls, real = [], delta.add_lora

    def spy(*args, **kwargs):
        calls.append(kwargs["slices"])
        return real(*args, **kwargs)
    monkeypatch.setattr(delta, "add_lora", spy)
    with torch.inference_mode():
        y = lf.multi_lora_linear(x, W, A, B, ids, scalings, b, ranks=ranks, slices=SLICES)
    assert y.shape == (3, 4, OUT) and calls == [SLICES]  # one add_lora over all slices
    ref = reference(x.reshape(-1, IN).double(), W.double(), b.double(), A.double(), B.double(), ids, scalings,
                    ranks.tolist(), SLICES)
    tol = 1e-12 if dtype == torch.float64 else TOLERANCE[dtype]
    assert rel_error(y.reshape(-1, OUT), ref) <= tol
    with torch.no_grad(), pytest.raises(ValueError, match=r"ranks must lie in \[1, r_max=5\]"):
        lf.multi_lora_linear(x, W, A, B, ids, scalings, b, ranks=torch.tensor([5, 6, 1], device=DEVICE),
                             slices=SLICES)


def test_one_slice_equals_the_unsliced_op():
    """slices=(out,) with a 3-D lora_A is the plain op (same numbers)."""
    g = torch.Generator().manual_seed(4)
    x, W, A, B = rand(g, 9, IN), rand(g, OUT, IN), rand(g, 2, 5, IN), rand(g, 2, OUT, 5)
    ids, s = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 0], device=DEVICE), torch.tensor([0.5, 2.0], device=DEVICE)
    plain = lf.multi_lora_linear(x, W, A, B, ids, s)
    assert torch.allclose(lf.multi_lora_linear(x, W, A, B, ids, s, slices=(OUT,)), plain, rtol=1e-6, atol=1e-6)


def test_slices_validation_names_slices():
    g = torch.Generator().manual_seed(5)
    x, W, A, B = rand(g, 4, IN), rand(g, OUT, IN), rand(g, 2, 3, 4, IN), rand(g, 2, OUT, 4)
    ids, s = torch.tensor([0, 1, -1, 1], device=DEVICE), torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match=r"slices \(12, 5, 8\) sum to 25 .* out_total=24"):
        lf.multi_lora_linear(x, W, A, B, ids, s, slices=(12, 5, 8))
    with pytest.raises(ValueError, match=r"slices has 2 widths .* lora_A has 3 slices"):
        lf.multi_lora_linear(x, W, A, B, ids, s, slices=(12, 12))
    with pytest.raises(ValueError, match="slices must hold positive ints"):
        lf.multi_lora_linear(x, W, A, B, ids, s, slices=(12, 0, 12))
    with pytest.raises(TypeError, match="slices must be a sequence of ints"):
        lf.multi_lora_linear(x, W, A, B, ids, s, slices=24)
    with pytest.raises(ValueError, match=r"slices=\(12, 5, 7\)"):  # lora_A not one block per slice
        lf.multi_lora_linear(x, W, A[:, :, :, :5], B, ids, s, slices=SLICES)
    # a too-wide lora_B or bias is refused, not read in part by the per-slice calls
    with pytest.raises(ValueError, match=r"lora_B must be \[n_adapters=2, out_features=24, r_max=4\]"):
        lf.multi_lora_linear(x, W, A, rand(g, 2, OUT + 1, 4), ids, s, slices=SLICES)
    with pytest.raises(ValueError, match=r"bias must be \[out_features=24\]"):
        lf.multi_lora_linear(x, W, A, B, ids, s, rand(g, OUT + 2), slices=SLICES)


# --------------------------------------------------------------------------
# (b) MultiLoRALinear with slices
# --------------------------------------------------------------------------

def per_slice_adapter(g, r):
    """(A [S, r, in], B [out, r]) and the same as per-slice lists."""
    a = [rand(g, r, IN, scale=IN ** -0.5) for _ in SLICES]
    b = [rand(g, w, r, scale=0.5) for w in SLICES]
    return (torch.stack(a), torch.cat(b)), (a, b)


def packed_layer(max_adapters=4, max_rank=6, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(IN, OUT).to(DEVICE)
    return linear, lf.MultiLoRALinear.from_linear(linear, max_adapters=max_adapters, max_rank=max_rank,
                                                  slices=SLICES)


def test_packed_layer_layout_and_forward_vs_float64(backend):
    g = torch.Generator().manual_seed(7)
    linear, layer = packed_layer()
    assert layer.weight is linear.weight and layer.slices == SLICES
    assert layer.lora_A.shape == (4, 3, 6, IN) and layer.lora_B.shape == (4, OUT, 6)
    (a0, b0), _ = per_slice_adapter(g, 3)
    _, (a1, b1) = per_slice_adapter(g, 6)
    assert layer.add_adapter("t", a0, b0, 0.5) == 0      # stacked tensors
    assert layer.add_adapter("u", a1, b1, 2.0) == 1      # per-slice lists
    assert torch.equal(layer.lora_A[1, 2], a1[2]) and torch.equal(layer.lora_B[1, 12:17], b1[1])
    assert not layer.lora_A[0, :, 3:].any() and not layer.lora_B[0, :, 3:].any()  # padding zeroed
    x = rand(g, 2, 5, IN)
    ids = torch.tensor([1, 0, -1, 1, 0, 0, 1, -1, 1, 1], device=DEVICE)
    y = layer(x, ids)
    A = torch.stack([torch.nn.functional.pad(a0, (0, 0, 0, 3)), torch.stack(a1)]).double()
    B = torch.stack([torch.nn.functional.pad(b0, (0, 3)), torch.cat(b1)]).double()
    ref = reference(x.reshape(-1, IN).double(), linear.weight.double(), linear.bias.double(), A, B, ids,
                    torch.tensor([0.5, 2.0]), [3, 6], SLICES)
    assert rel_error(y.reshape(-1, OUT), ref) <= TOLERANCE[torch.float32]
    assert torch.equal(layer(x), linear(x))  # no routing: the base layer


def test_packed_layer_equals_three_unpacked_layers_and_gradients():
    """A packed qkv layer gives the q / k / v layers' outputs side by side, and each slice's A / B the
    gradient the separate layer's A / B gets."""
    g = torch.Generator().manual_seed(8)
    linear, packed = packed_layer()
    parts, start = [], 0
    for w in SLICES:
        sub = nn.Linear(IN, w).to(DEVICE)
        with torch.no_grad():
            sub.weight.copy_(linear.weight[start:start + w])
            sub.bias.copy_(linear.bias[start:start + w])
        parts.append(lf.MultiLoRALinear.from_linear(sub, max_adapters=4, max_rank=6))
        start += w
    for name, r, s in (("p", 4, 1.25), ("q", 2, -0.75)):
        _, (a, b) = per_slice_adapter(g, r)
        packed.add_adapter(name, a, b, s)
        for layer, a_j, b_j in zip(parts, a, b):
            layer.add_adapter(name, a_j, b_j, s)
    x = rand(g, 8, IN)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, -1, 1], device=DEVICE)
    y = packed(x, ids)
    ref = torch.cat([layer(x, ids) for layer in parts], dim=1)
    assert rel_error(y, ref) <= TOLERANCE[torch.float32]
    grad = rand(g, *y.shape)
    y.backward(grad)
    ref.backward(grad)
    start = 0
    for j, (layer, w) in enumerate(zip(parts, SLICES)):
        assert rel_error(packed.lora_A.grad[:, j], layer.lora_A.grad) <= TOLERANCE[torch.float32]
        assert rel_error(packed.lora_B.grad[:, start:start + w], layer.lora_B.grad) <= TOLERANCE[torch.float32]
        start += w


def test_packed_hot_swap_keeps_pinned_batch_and_routing():
    """adapter_batch pins the packed slot: a hot swap goes to a free slot, the open batch keeps
    the old weights, a new batch sees the new ones; remove empties the slot."""
    g = torch.Generator().manual_seed(9)
    model = nn.Sequential(nn.Linear(IN, OUT)).to(DEVICE)
    lf.inject_multi_lora(model, ["0"], max_adapters=3, max_rank=4, slices={"0": SLICES})
    layer = model[0]
    assert layer.slices == SLICES and layer.lora_A.shape == (3, 3, 4, IN)
    (a, b), _ = per_slice_adapter(g, 4)
    (a2, b2), _ = per_slice_adapter(g, 2)
    assert lf.add_adapter(model, "v", {"0": (a, b, 1.0)}) == 0
    x = rand(g, 2, 3, IN)
    with torch.no_grad(), lf.adapter_batch(model, ["v", None]):
        old = model(x)
        assert lf.add_adapter(model, "v", {"0": (a2, b2, 1.0)}) == 1  # slot 0 pinned: into slot 1
        assert torch.equal(model(x), old)
    with torch.no_grad(), lf.adapter_batch(model, ["v", None]):
        new = model(x)
    assert torch.equal(new[1], old[1])  # the base sequence
    ref = layer(x[:1].reshape(-1, IN), torch.ones(3, dtype=torch.int64, device=DEVICE)).reshape(1, 3, OUT)
    assert rel_error(new[:1], ref.detach()) <= TOLERANCE[torch.float32] and rel_error(new[0], old[0]) > 1e-3
    lf.remove_adapter(model, "v")
    assert not layer.lora_A[1].any() and layer.adapter_names == []


def test_packed_adapter_errors():
    g = torch.Generator().manual_seed(10)
    _, layer = packed_layer()
    (a, b), (al, bl) = per_slice_adapter(g, 3)
    with pytest.raises(ValueError, match=r"packed \(slices=\(12, 5, 7\)\).*\[S=3, r, in_features=19\]"):
        layer.add_adapter("x", a[0], b, 1.0)
    with pytest.raises(ValueError, match="one tensor per slice|one 2-D tensor per slice"):
        layer.add_adapter("x", al[:2], bl, 1.0)
    with pytest.raises(ValueError, match=r"the slices' lora_A must be \[r, in\] each, one r"):
        layer.add_adapter("x", [al[0], al[1][:2], al[2]], bl, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \[w_j, r\] with w_j = slices\[j\]"):
        layer.add_adapter("x", al, [bl[1], bl[0], bl[2]], 1.0)
    with pytest.raises(ValueError, match=r"rank 7 but this layer holds ranks 1..max_rank=6"):
        layer.add_adapter("x", torch.zeros(3, 7, IN), torch.zeros(OUT, 7), 1.0)
    with pytest.raises(ValueError, match=r"summing to out_features=24: slices \(12, 5\) sum to 17"):
        lf.MultiLoRALinear.from_linear(nn.Linear(IN, OUT), max_adapters=2, max_rank=2, slices=(12, 5))
    assert layer.adapter_names == []
    with pytest.raises(ValueError, match=r"slices names \['qkv'\], which is the last name of no target"):
        lf.inject_multi_lora(nn.Sequential(nn.Linear(IN, OUT)), ["0"], max_adapters=2, max_rank=2,
                             slices={"qkv": SLICES})


# --------------------------------------------------------------------------
# (c) PEFT q_proj / k_proj / v_proj adapters served from a packed qkv_proj
# --------------------------------------------------------------------------

peft = pytest.importorskip("peft")

HIDDEN, KV = 16, 8


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, KV), nn.Linear(HIDDEN, KV)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


class PackedAttention(nn.Module):
    def __init__(self, unpacked: Attention):
        super().__init__()
        self.qkv_proj = nn.Linear(HIDDEN, HIDDEN + 2 * KV)
        with torch.no_grad():  # the packed weight is the concatenation of the three
            self.qkv_proj.weight.copy_(torch.cat([unpacked.q_proj.weight, unpacked.k_proj.weight,
                                                  unpacked.v_proj.weight]))
            self.qkv_proj.bias.copy_(torch.cat([unpacked.q_proj.bias, unpacked.k_proj.bias, unpacked.v_proj.bias]))

    def forward(self, x):
        return self.qkv_proj(x)


class Tiny(nn.Module):
    def __init__(self, attn_cls, *args):
        super().__init__()
        self.layers = nn.ModuleList([attn_cls(*a) for a in args])
        self.out = nn.Linear(HIDDEN + 2 * KV, HIDDEN)

    def forward(self, x):
        for attn in self.layers:
            x = torch.tanh(self.out(attn(x)))
        return x


ADAPTERS = {
    # ranks differ per module (rank_pattern) with one scaling (alpha_pattern): padded with zeros
    "m0": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
               rank_pattern={"k_proj": 2}, alpha_pattern={"k_proj": 4}),
    # PEFT's common q_proj + v_proj only: k is a zero slice
    "m1": dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"]),
    # packed slices beside an ordinary target (out) with its own rank and scaling
    "m2": dict(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "out"], rank_pattern={"out": 3},
               alpha_pattern={"out": 6}),
}
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory):
    torch.manual_seed(0)
    base = Tiny(Attention, (), ())
    dirs = {}
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
        g = torch.Generator().manual_seed(seed + 11)
        with torch.no_grad():
            for p_name, p in model.named_parameters():
                if "lora_" in p_name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["m0"], adapter_name="m0")
    ref.load_adapter(dirs["m1"], adapter_name="m1")
    ref.load_adapter(dirs["m2"], adapter_name="m2")
    return base, dirs, ref.eval()


def packed_model(base, max_rank=4):
    model = Tiny(PackedAttention, *[(attn,) for attn in base.layers])
    model.out.load_state_dict(base.out.state_dict())
    return lf.inject_multi_lora(model, ["qkv_proj", "out"], max_adapters=4, max_rank=max_rank,
                                slices={"qkv_proj": (HIDDEN, KV, KV)}).to(DEVICE)


NAMES = ["m0", None, "m1", "m2", "m1", "m0", None, "m2"]


def check_against_peft(base, dirs, ref, tol):
    model = packed_model(base)
    assert lf.load_peft_adapter_slot(model, dirs["m0"], "m0", packed=PACKED) == 0
    assert lf.load_peft_adapter_slot(model, dirs["m1"], "m1", packed=PACKED) == 1
    assert lf.load_peft_adapter_slot(model, dirs["m2"], "m2", packed=PACKED) == 2
    x = torch.randn(len(NAMES), 5, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        peft_mixed = ref(x, adapter_names=[n or "__base__" for n in NAMES])
        with lf.adapter_batch(model, NAMES):
            ours = model(x.to(DEVICE)).cpu()
        with ref.disable_adapter():
            base_out = ref(x)
    for b, name in enumerate(NAMES):
        assert rel_error(ours[b], peft_mixed[b]) <= tol, f"sequence {b} ({name})"
    for b in (0, 2, 3):
        assert rel_error(peft_mixed[b], base_out[b]) > 1e-2, "the adapters must change the output"
    return model


def test_peft_qkv_adapters_served_packed_match_peft(peft_setup):
    base, dirs, ref = peft_setup
    model = check_against_peft(base, dirs, ref, 1e-5)
    layer = model.layers[0].qkv_proj
    assert layer.ranks[:3].tolist() == [4, 3, 2] and model.out.ranks[2] == 3 and model.out.adapter_names == ["m2"]
    assert not layer.lora_A[1, 1].any() and not layer.lora_B[1, HIDDEN:HIDDEN + KV].any()  # m1: no k_proj
    assert not layer.lora_A[0, 1, 2:].any()  # m0's k_proj has rank 2: zero padding to 4
    peft_q = ref.base_model.model.layers[0].q_proj
    assert torch.equal(layer.lora_A[0, 0].cpu(), peft_q.lora_A["m0"].weight)


def test_peft_qkv_adapters_packed_under_triton_kernels(peft_setup, monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", "triton")
    base, dirs, ref = peft_setup
    check_against_peft(base, dirs, ref, 1e-5)


def test_packed_loader_errors(peft_setup, tmp_path):
    base, dirs, _ = peft_setup
    model = packed_model(base)
    with pytest.raises(ValueError, match="unexpected keys.*q_proj.*not a module of the model"):
        lf.load_peft_adapter_slot(model, dirs["m0"], "m0")  # without packed=
    with pytest.raises(ValueError, match=r"packed names \['qkv'\], but no MultiLoRALinear"):
        lf.load_peft_adapter_slot(model, dirs["m0"], "m0", packed={"qkv": ("q_proj", "k_proj", "v_proj")})
    with pytest.raises(ValueError, match=r"names 2 modules .* slices=\(16, 8, 8\)"):
        lf.load_peft_adapter_slot(model, dirs["m0"], "m0", packed={"qkv_proj": ("q_proj", "k_proj")})
    with pytest.raises(TypeError, match=r"packed\['qkv_proj'\] must be a non-empty sequence"):
        lf.load_peft_adapter_slot(model, dirs["m0"], "m0", packed={"qkv_proj": "q_proj"})
    # different scalings in one packed layer cannot share a slot
    odd = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[
        "q_proj", "v_proj"], alpha_pattern={"v_proj": 8}))
    odd.save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match="different scalings"):
        lf.load_peft_adapter_slot(model, tmp_path / "odd", "odd", packed=PACKED)
    with pytest.raises(ValueError, match=r"rank 4 but this layer holds ranks 1..max_rank=3"):
        lf.load_peft_adapter_slot(packed_model(base, max_rank=3), dirs["m0"], "m0", packed=PACKED)
    assert model.layers[0].qkv_proj.adapter_names == []  # nothing written by a refused load
    lf.load_peft_adapter_slot(model, dirs["m1"], "m1", packed=PACKED)
    with pytest.raises(ValueError, match="packed layer .* give packed=.* to write adapter 'm1'"):
        lf.save_peft_adapter_slot(model, "m1", tmp_path / "back")


def test_packed_slot_saved_as_separate_modules_loads_in_peft_and_back(peft_setup, tmp_path):
    """save_peft_adapter_slot(packed=...) writes q_proj / k_proj / v_proj (an unadapted slice left
    out): PEFT on the unpacked model reproduces the adapter, and it loads back packed unchanged."""
    base, dirs, ref = peft_setup
    model = packed_model(base)
    x = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(4))
    for name in ("m0", "m1", "m2"):
        lf.load_peft_adapter_slot(model, dirs[name], name, packed=PACKED)
        lf.save_peft_adapter_slot(model, name, tmp_path / name, packed=PACKED)
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).eval()
        with torch.no_grad():
            ref.set_adapter(name)
            assert rel_error(back(x), ref(x)) <= 1e-6, name
        config = peft.LoraConfig.from_pretrained(tmp_path / name)
        assert ("layers.0.k_proj" in config.target_modules) == (name == "m0")  # m1, m2: no k slice written
        again = packed_model(base)
        lf.load_peft_adapter_slot(again, tmp_path / name, name, packed=PACKED)
        for (key, mine), theirs in zip(model.state_dict().items(), again.state_dict().values()):
            if key.endswith(("lora_A", "lora_B", "ranks", "scalings")):
                slot = lf.adapters.multi_lora.model_slot_of(model, name)
                assert torch.equal(mine[slot], theirs[0]), (name, key)


def test_packed_layer_compiles_fullgraph_and_sees_hot_swaps(monkeypatch):
    """torch.compile(fullgraph=True) of a packed layer in adapter_batch: eager's numbers with and
    without grad, and an adapter written after compiling is served by the compiled model."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    g = torch.Generator().manual_seed(31)
    model = nn.Sequential(nn.Linear(IN, OUT)).to(DEVICE)
    lf.inject_multi_lora(model, ["0"], max_adapters=3, max_rank=4, slices={"0": SLICES})
    (a, b), _ = per_slice_adapter(g, 4)
    lf.add_adapter(model, "a", {"0": (a, b, 0.5)})
    x = rand(g, 2, 5, IN)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), lf.adapter_batch(model, ["a", None]):
            assert rel_error(compiled(x), model(x).detach()) <= TOLERANCE[torch.float32]
    (a2, b2), _ = per_slice_adapter(g, 2)
    lf.add_adapter(model, "a", {"0": (a2, b2, 1.5)})  # in place: nothing pinned
    with torch.no_grad(), lf.adapter_batch(model, ["a", None]):
        assert rel_error(compiled(x), model(x)) <= TOLERANCE[torch.float32]
