"""Random inputs and the float64 oracle check shared by the op tests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lora_fused as lf

#: Where the parity tests put their tensors: CUDA when present, so the kernels run
#: natively on a GPU machine, else CPU (the interpreter, set up by conftest).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: ‖out − ref‖ / ‖ref‖ bounds against the float64 reference (docs/design.md, "Testing without a GPU").
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """‖out − ref‖ / ‖scale‖ (scale defaults to ref)."""
    ref = ref.double()
    scale = ref if scale is None else scale.double()
    return ((out.double() - ref).norm() / scale.norm().clamp_min(1e-30)).item()


@dataclass
class LoRAInputs:
    x: torch.Tensor
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    bias: Optional[torch.Tensor]
    scaling: float

    def tensors(self):
        return [t for t in (self.x, self.weight, self.lora_A, self.lora_B, self.bias) if t is not None]


def make_inputs(M, in_features, out_features, r, dtype=torch.float32, *, bias=True,
                scaling=0.5, lead=(), device=DEVICE, seed=0) -> LoRAInputs:
    """Random inputs scaled so every term of y is O(1) (never zeros, B included)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rand(*lead, M, in_features)
    weight = rand(out_features, in_features, scale=in_features ** -0.5)
    lora_A = rand(r, in_features, scale=in_features ** -0.5)
    lora_B = rand(out_features, r, scale=r ** -0.5)
    b = rand(out_features) if bias else None
    return LoRAInputs(x, weight, lora_A, lora_B, b, scaling)


def run_op(inp: LoRAInputs, *, grad_weight=False, dropout_p=0.0, training=False, manual_seed=1234):
    """Forward + backward of lf.lora_linear; returns (y, grads dict, upstream grad)."""
    leaves = dict(x=inp.x, lora_A=inp.lora_A, lora_B=inp.lora_B)
    if grad_weight:
        leaves["weight"] = inp.weight
        if inp.bias is not None:
            leaves["bias"] = inp.bias
    params = {k: v.detach().clone().requires_grad_(k in leaves) for k, v in
              dict(x=inp.x, weight=inp.weight, lora_A=inp.lora_A, lora_B=inp.lora_B).items()}
    bias = None
    if inp.bias is not None:
        bias = inp.bias.detach().clone().requires_grad_("bias" in leaves)
    torch.manual_seed(manual_seed)
    y = lf.lora_linear(params["x"], params["weight"], params["lora_A"], params["lora_B"],
                       inp.scaling, bias, dropout_p=dropout_p, training=training)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    y.backward(grad_y)
    grads = {k: params[k].grad for k in leaves if k != "bias"}
    if "bias" in leaves:
        grads["bias"] = bias.grad
    return y, grads, grad_y


def drawn_seed(manual_seed: int, device="cpu") -> int:
    """The dropout seed lf.lora_linear draws right after torch.manual_seed(manual_seed)."""
    torch.manual_seed(manual_seed)
    return int(lf.ops.lora_linear.draw_dropout_seed(torch.device(device)).item())


def keep_mask_of_backend(x: torch.Tensor, seed: int, rows: int, dropout_p: float) -> torch.Tensor:
    """The keep mask the op draws for ``x``'s backend: the Triton kernels' Philox stream
    (``lf.dropout_keep_mask``), or the torch backend's own (``torch_backend.keep_mask``, from a generator
    seeded with the seed, in x's dtype: the mask is the op's, not a second draw)."""
    if lf.select_backend(x.device, x.dtype) == "torch":
        from lora_fused.backends.torch_backend import keep_mask
        return keep_mask(torch.tensor([seed]), rows, x.shape[-1], dropout_p, x.dtype, x.device)
    return lf.dropout_keep_mask(seed, rows, x.shape[-1], dropout_p, device=x.device)


def reference(inp: LoRAInputs, grad_y, *, dropout_p=0.0, seed=None, grad_weight=False,
              magnitudes=False):
    """float64 forward + autograd backward of the reference math.

    ``magnitudes``: the same formulas on |inputs| and |dY|, i.e. the sums of
    absolute terms (Σ|a||b|) that bound the rounding error of each output.
    """
    leaves = {"x", "lora_A", "lora_B"} | ({"weight", "bias"} if grad_weight else set())
    prep = (lambda t: t.detach().double().abs()) if magnitudes else (lambda t: t.detach().double())
    d = {k: (prep(getattr(inp, k)).requires_grad_(k in leaves)
             if getattr(inp, k) is not None else None)
         for k in ("x", "weight", "lora_A", "lora_B", "bias")}
    if magnitudes:
        grad_y = grad_y.abs()
    keep = None
    if dropout_p > 0.0:
        M = inp.x.reshape(-1, inp.x.shape[-1]).shape[0]
        keep = keep_mask_of_backend(inp.x, seed, M, dropout_p)
    y = lf.lora_linear_reference(d["x"], d["weight"], d["lora_A"], d["lora_B"], inp.scaling,
                                 d["bias"], keep=keep, dropout_p=dropout_p)
    y.backward(grad_y.double())
    return y, {k: d[k].grad for k in leaves if d[k] is not None}


def assert_matches_reference(inp: LoRAInputs, *, dropout_p=0.0, training=False,
                             grad_weight=False, tol=None, conditioned=False):
    """lf.lora_linear's output and every gradient vs the float64 reference.

    The error is ‖out − ref‖ / ‖ref‖, or with ``conditioned`` ‖out − ref‖ / ‖Σ|terms|‖
    (see ``reference(magnitudes=True)``): for outputs that are a few sums with
    heavy cancellation (e.g. in = out = r = 1, where dB is one scalar) ‖ref‖ is
    no measure of what float16 can represent, while the sum of |terms| is.
    """
    dtype = inp.x.dtype
    tol = tol if tol is not None else TOLERANCE[dtype]
    y, grads, grad_y = run_op(inp, grad_weight=grad_weight, dropout_p=dropout_p, training=training)
    active_p = dropout_p if training else 0.0
    seed = drawn_seed(1234, inp.x.device) if active_p > 0 else None
    y_ref, grads_ref = reference(inp, grad_y, dropout_p=active_p, seed=seed, grad_weight=grad_weight)
    scale = {"y": y_ref, **grads_ref}
    if conditioned:
        y_mag, grads_mag = reference(inp, grad_y, dropout_p=active_p, seed=seed,
                                     grad_weight=grad_weight, magnitudes=True)
        scale = {"y": y_mag, **grads_mag}
    assert y.dtype == dtype and y.shape == y_ref.shape
    errors = {"y": rel_error(y, y_ref, scale["y"])}
    for name, ref in grads_ref.items():
        assert grads[name] is not None, f"no gradient for {name}"
        assert grads[name].shape == ref.shape and grads[name].dtype == dtype, name
        errors[name] = rel_error(grads[name], ref, scale[name])
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return errors


#: Vocabulary of the tiny Llama the model-level parity tests share.
TINY_LLAMA_VOCAB = 64


def tiny_llama(seed: int = 0):
    """A 2-layer Llama from config (eval mode, seeded): the model the PEFT parity tests compare on."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=TINY_LLAMA_VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


#: Scalings a compiled call must refuse as eager calls do, and when: the first call, or after
#: two finite values (automatic dynamic: dynamo may then trace the float symbolically).
BAD_SCALINGS = [([], float("nan")), ([0.5, 2.0], float("nan")), ([], float("-inf")),
                ([0.5, 2.0], float("inf")), ([0.5, 2.0], 1e39)]


def refuses_bad_scaling_under_compile(op, backend, finite_first, bad):
    """``op(scaling)`` compiled: the finite values compute, the bad one raises ValueError naming scaling."""
    torch._dynamo.reset()
    compiled = torch.compile(op, backend=backend)
    for scaling in finite_first:
        assert rel_error(compiled(scaling), op(scaling)) <= 1e-6
    with pytest.raises(ValueError, match="scaling"):
        compiled(bad)


class SizeRecorder(TorchDispatchMode):
    """Records the element count of every new tensor an op returns (views and in-place
    results alias an existing tensor: they allocate nothing and are skipped)."""

    def __init__(self):
        super().__init__()
        self.records = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t, ret in zip(outs, func._schema.returns):
            if isinstance(t, torch.Tensor) and ret.alias_info is None:
                self.records.append((str(func), t.numel()))
        return out
