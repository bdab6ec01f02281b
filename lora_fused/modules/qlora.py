"""QLoRA: LoRA over a bitsandbytes 4-bit base weight (``LoRALinear4bit``, ``qlora_linear``).

The base weight stays as bitsandbytes packed it (``Params4bit``: uint8 nibbles plus a
``QuantState``); nothing of size out × in is kept. Each call dequantizes it into a
*transient scratch* in the compute dtype, bit-identical to
``bitsandbytes.functional.dequantize_4bit`` (Triton: ``kernels/dequant4bit.py``; torch
backend: bitsandbytes itself), and runs the LoRA op on it:

    forward    W = deq(W0)  (scratch, freed when the forward returns)
               y = x Wᵀ + b + s · drop(x) Aᵀ Bᵀ,  saved: x, S = drop(x) Aᵀ, the dropout seed
    backward   W = deq(W0)  (a second scratch, freed when the backward returns)
               dX = dY W + keep/(1-p) ⊙ (s · dY B) A,  dA, dB as in ``lora_linear``

so the forward and the gradients of x, A and B are exactly ``lora_linear``'s on the
dequantized weight. The scratch is allocated per call (the CUDA caching allocator
hands the same block back; a buffer kept on the module would hold out × in per layer
for the whole run, which QLoRA exists to avoid), and dequantizing again in the
backward is what bitsandbytes' own ``MatMul4Bit`` does.

Decode (at most ``kernels.dequant4bit.DECODE_MAX_ROWS`` rows, no active dropout): one
fused kernel computes y = x deq(W)ᵀ + b + s · S Bᵀ, reading each packed byte once,
after a small kernel for S = x Aᵀ; no scratch at all.

The weight is dequantized as bitsandbytes' ``Linear4bit`` does: to the quant state's
dtype (the dtype the weight had when quantized), then cast to the compute dtype if
that differs. The compute dtype is ``Linear4bit.compute_dtype`` when set, else x's
dtype (autocast's under autocast); the output is cast back to x's dtype, as
``Linear4bit`` does. ``lora_A`` / ``lora_B`` are fp32 parameters (as PEFT's QLoRA
adapters) cast to the compute dtype in the forward; their gradients arrive in fp32.

``merge()`` refuses: folding s·B·A into a 4-bit weight re-quantizes it (a rounding
loss that ``unmerge`` cannot undo; PEFT warns and does it). ``to_linear(merge=True)``
returns a plain ``nn.Linear`` holding deq(W0) + s·B·A in the compute dtype instead.

bitsandbytes is imported lazily (``pip install lora-fused[qlora]``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import torch_backend
from ..dispatch.backend import lora_kernels, on_tensor_device, select_backend
from .lora_linear import LoRALinear
from ..ops.lora_linear import autocast_dtype, draw_dropout_seed
from ..validation import check_lora_linear_args

INSTALL_HINT = "pip install lora-fused[qlora] (or pip install 'bitsandbytes>=0.45')"


def require_bitsandbytes():
    """The bitsandbytes module, or ImportError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"4-bit (QLoRA) base layers need bitsandbytes: {INSTALL_HINT} ({e})") from None
    return bitsandbytes


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (without importing bitsandbytes
    when it is not loaded: then no module can be one)."""
    import sys
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit)


@dataclass(frozen=True)
class Quant4bit:
    """How a packed 4-bit weight of ``shape`` [N, K] decodes: bitsandbytes' ``QuantState``, flat.

    ``absmax`` is fp32 [blocks], or uint8 [blocks] when nested; then ``absmax2``
    [blocks / blocksize2], ``code2`` [256] and ``offset`` are fp32 tensors. ``dtype``:
    the dtype bitsandbytes dequantizes to (the weight's dtype when it was quantized).
    """
    shape: tuple[int, int]
    blocksize: int
    quant_type: str
    dtype: torch.dtype
    absmax: Tensor
    absmax2: Optional[Tensor] = None
    code2: Optional[Tensor] = None
    blocksize2: int = 0
    offset: Optional[Tensor] = None

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @classmethod
    def from_quant_state(cls, state) -> "Quant4bit":
        """From a ``bitsandbytes.functional.QuantState`` of a 2-D weight."""
        if len(state.shape) != 2:
            raise ValueError(f"the quant state describes a {tuple(state.shape)} tensor; a linear "
                             "weight is 2-D [out_features, in_features]")
        common = dict(shape=tuple(state.shape), blocksize=state.blocksize, quant_type=state.quant_type,
                      dtype=state.dtype, absmax=state.absmax)
        if not state.nested:
            return cls(**common)
        return cls(**common, absmax2=state.state2.absmax, code2=state.state2.code,
                   blocksize2=state.state2.blocksize, offset=state.offset)


def _use_triton(x: Tensor) -> bool:
    return select_backend(x.device, x.dtype) == "triton" and x.numel() > 0


def _kernels():
    from lora_fused.kernels import dequant4bit
    return dequant4bit


@on_tensor_device
def dequantize_weight(packed: Tensor, state, dtype: torch.dtype, *, use_triton: bool) -> Tensor:
    """deq(W0) [out, in] in ``dtype``, as bitsandbytes' ``Linear4bit`` computes it (see the module doc).

    A fresh tensor: the caller's transient scratch."""
    if use_triton:
        quant = Quant4bit.from_quant_state(state)
        weight = _kernels().dequantize_4bit(packed, quant, quant.dtype)
    else:
        weight = _bitsandbytes_dequantize(packed, state)
    return weight if weight.dtype == dtype else weight.to(dtype)


def _bitsandbytes_dequantize(packed: Tensor, state) -> Tensor:
    """``bitsandbytes.functional.dequantize_4bit`` of the packed weight, as [out, in].

    Its blocks run over the flattened weight (element i has scale absmax[i // blocksize]), and
    its CUDA kernel, its scalar CPU kernel and its torch fallback read them so. Its AVX-512 CPU
    kernel (taken when in_features is a multiple of 16) looks the scale up per row instead, as
    absmax[row * (in // blocksize) + col // blocksize]: the same only when every row holds whole
    blocks, other scales otherwise (tests/test_qlora.py). Such a weight is dequantized as rows
    of one block each (as one row when the last block is partial), where both lookups agree."""
    bnb_functional = require_bitsandbytes().functional
    rows, cols = state.shape
    if cols % state.blocksize == 0:
        return bnb_functional.dequantize_4bit(packed, state)
    numel = rows * cols
    whole_blocks = copy.copy(state)
    whole_blocks.shape = torch.Size([numel // state.blocksize, state.blocksize] if numel % state.blocksize == 0
                                    else [1, numel])
    return bnb_functional.dequantize_4bit(packed, whole_blocks).reshape(rows, cols)


def _decode_applies(x2d: Tensor, state, dropout_p: float, use_triton: bool) -> bool:
    """The fused decode kernel: Triton, few rows, no dropout, no second rounding to a quant dtype."""
    return (use_triton and dropout_p == 0.0 and x2d.shape[0] <= _kernels().DECODE_MAX_ROWS
            and state.dtype == x2d.dtype and state.shape[0] > 0)


@on_tensor_device
def _qlora_forward(x2d, lora_A, lora_B, bias, packed, state, scaling, dropout_p, seed):
    """(y, S) for 2-D x."""
    triton = _use_triton(x2d)
    if _decode_applies(x2d, state, dropout_p, triton):
        shrink = lora_kernels().lora_shrink(x2d, lora_A, None, 0.0)
        y = _kernels().qlora_decode(x2d, packed, Quant4bit.from_quant_state(state), bias, shrink, lora_B, scaling)
        return y, shrink
    weight = dequantize_weight(packed, state, x2d.dtype, use_triton=triton)
    backend = lora_kernels() if triton else torch_backend
    return backend.lora_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@on_tensor_device
def _qlora_grads(grad_y, x2d, lora_A, lora_B, shrink, packed, state, scaling, dropout_p, seed, need_x, need_lora):
    """(dX, dA, dB) of lora_linear over deq(W0), which is dequantized again for dX only."""
    triton = _use_triton(x2d)
    # dA, dB alone need no W: an empty [out, 0]-strided stand-in is never read.
    weight = (dequantize_weight(packed, state, x2d.dtype, use_triton=triton) if need_x
              else x2d.new_empty(()).expand(state.shape[0], x2d.shape[1]))
    backend = lora_kernels() if triton else torch_backend
    return backend.lora_backward(grad_y, x2d, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed,
                                 need_x, need_lora)


class _QLoRALinear(torch.autograd.Function):
    """lora_linear over deq(W0): the packed weight is dequantized again in the backward."""

    @staticmethod
    def forward(ctx, x2d, lora_A, lora_B, bias, packed, state, scaling, dropout_p, seed):
        y, shrink = _qlora_forward(x2d, lora_A, lora_B, bias, packed, state, scaling, dropout_p, seed)
        ctx.save_for_backward(x2d, lora_A, lora_B, shrink, seed)
        ctx.packed, ctx.state, ctx.scaling, ctx.dropout_p = packed, state, scaling, dropout_p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x2d, lora_A, lora_B, shrink, seed = ctx.saved_tensors
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        grad_x = grad_a = grad_b = grad_bias = None
        if need_x or need_a or need_b:
            grad_x, grad_a, grad_b = _qlora_grads(grad_y, x2d, lora_A, lora_B, shrink, ctx.packed, ctx.state,
                                                  ctx.scaling, ctx.dropout_p, seed, need_x, need_a or need_b)
            grad_a, grad_b = (grad_a if need_a else None), (grad_b if need_b else None)
        if need_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_a, grad_b, grad_bias, None, None, None, None, None


def qlora_linear(x: Tensor, packed: Tensor, quant_state, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 bias: Optional[Tensor] = None, *, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """``lora_linear(x, deq(W0), lora_A, lora_B, scaling, bias)`` for a bitsandbytes 4-bit W0.

    ``packed`` / ``quant_state``: a ``Params4bit`` and its ``quant_state`` (W0 [out, in]).
    x, lora_A, lora_B, bias share the compute dtype; the weight is dequantized into it
    (see the module doc). Differentiable in x, lora_A, lora_B and bias.
    """
    if quant_state is None:
        raise ValueError("the 4-bit weight has no quant_state: it is not quantized yet (bitsandbytes "
                         "quantizes a Linear4bit when it is moved to its device, e.g. .to('cuda'))")
    if packed.device != x.device:
        raise ValueError(f"the 4-bit weight is on {packed.device} but x is on {x.device}; move them to one device")
    # Shapes, dtypes and devices checked against a stride-0 stand-in for W0 (no allocation).
    stand_in = x.new_empty(()).expand(*quant_state.shape)
    scaling, dropout_p = check_lora_linear_args(x, stand_in, lora_A, lora_B, scaling, bias, dropout_p)
    active_p = dropout_p if training else 0.0
    seed = draw_dropout_seed(x.device) if active_p > 0.0 else None
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    inputs = (x2d, lora_A, lora_B, bias, packed, quant_state, scaling, active_p, seed)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2d, lora_A, lora_B, bias)):
        y = _QLoRALinear.apply(*inputs)
    else:
        y = _qlora_forward(*inputs)[0]
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], quant_state.shape[0])


def _quant_state(weight) -> object:
    """``weight.quant_state`` in bitsandbytes' standard layout (undoing its CPU-only repacking)."""
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes' Linear4bit repacks the weight in place for its AVX512 CPU inference
        # kernel; the standard layout is what the dequantize (and PEFT) read.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        state = weight.quant_state
    return state


class LoRALinear4bit(LoRALinear):
    """A ``LoRALinear`` whose frozen base weight is a bitsandbytes 4-bit ``Params4bit``.

    ``weight`` is the ``Linear4bit``'s own ``Params4bit`` (reused, never copied or
    dequantized into state), ``bias`` its bias; ``lora_A`` [r, in] and ``lora_B``
    [out, r] are fp32. ``state_dict`` holds ``Linear4bit``'s keys (the packed weight, its
    quant state under ``weight.*``, bias) plus ``lora_A`` / ``lora_B``. The math, the
    scratch and the compute dtype are in the module doc of :mod:`lora_fused.modules.qlora`.
    Everything that takes a ``LoRALinear`` (``lora_state_dict``, ``save_peft_adapter``)
    takes it; ``merge()`` refuses (use ``to_linear(merge=True)``).
    """

    compute_dtype: Optional[torch.dtype] = None

    @classmethod
    def from_linear4bit(cls, linear: nn.Module, *, r: int = 8, lora_alpha: float = 8.0,
                        lora_dropout: float = 0.0, use_rslora: bool = False) -> "LoRALinear4bit":
        """Wrap a bitsandbytes ``Linear4bit`` (nf4 or fp4, any blocksize, double quant or not)."""
        bnb = require_bitsandbytes()
        if not isinstance(linear, bnb.nn.Linear4bit):
            raise TypeError(f"linear must be a bitsandbytes Linear4bit, got {type(linear).__name__}")
        if getattr(linear.weight, "quant_state", None) is None:
            raise ValueError("the Linear4bit is not quantized yet (bitsandbytes quantizes it when it "
                             "is moved to its device, e.g. .to('cuda') or .to('cpu'))")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, r=r,
                    lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                    device="meta", dtype=torch.float32)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.compute_dtype = linear.compute_dtype
        layer._attach_lora_parameters()
        layer.training = linear.training
        return layer

    @classmethod
    def from_linear(cls, linear, **kwargs) -> "LoRALinear4bit":
        return cls.from_linear4bit(linear, **kwargs)

    def _attach_lora_parameters(self) -> None:
        """fp32 lora_A / lora_B on the base weight's device (as PEFT's QLoRA adapters); base frozen."""
        factory = {"device": self.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **factory))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        if self.weight.device.type != "meta":
            self.reset_lora_parameters()

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        return autocast_dtype(x) or self.compute_dtype or x.dtype

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """deq(W0) [out, in] (a new tensor), in ``dtype`` (default: the quant state's)."""
        state = _quant_state(self.weight)
        dtype = dtype or state.dtype
        triton = select_backend(self.weight.device, dtype) == "triton"
        return dequantize_weight(self.weight, state, dtype, use_triton=triton)

    def forward(self, x: Tensor) -> Tensor:
        dtype = self._compute_dtype(x)
        xc = x.to(dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        state = _quant_state(self.weight)
        if self.disabled:
            return F.linear(xc, dequantize_weight(self.weight, state, dtype, use_triton=_use_triton(xc)),
                            bias).to(x.dtype)
        y = qlora_linear(xc, self.weight, state, self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling,
                         bias, dropout_p=self.lora_dropout, training=self.training)
        return y.to(x.dtype)

    def merge_refusal(self) -> Optional[str]:
        return ("LoRALinear4bit.merge(): the base weight is 4-bit; folding scaling * B A into "
                "it would re-quantize it (a rounding loss unmerge cannot undo). Keep the adapter "
                "unmerged, or take layer.to_linear(merge=True): an nn.Linear holding "
                "dequant(W0) + scaling * B A")

    def merge(self) -> None:
        raise ValueError(self.merge_refusal())

    def unmerge(self) -> None:
        super().unmerge()  # never merged: warns and does nothing

    @torch.no_grad()
    def to_linear(self, merge: bool = True, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` with deq(W0) (+ scaling · B A when ``merge``) in ``dtype``
        (default: the compute dtype, else the quant state's dtype), and this layer's bias."""
        dtype = dtype or self.compute_dtype or _quant_state(self.weight).dtype
        weight = self.dequantized_weight(torch.float32)
        if merge:
            weight += self._delta_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """Linear4bit's layout: the packed weight, bias, then the quant state under ``weight.*``."""
        state = _quant_state(self.weight)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # The quant state comes with the packed bytes it describes (Linear4bit's ``weight.*`` keys).
        quant = {k[len(prefix) + len("weight."):]: v for k, v in state_dict.items()
                 if k.startswith(prefix + "weight.")}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        unexpected_keys[:] = [k for k in unexpected_keys if k[len(prefix):].removeprefix("weight.") not in quant]
        if quant and prefix + "weight" in state_dict:
            bnb = require_bitsandbytes()
            self.weight.quant_state = bnb.functional.QuantState.from_dict(quant, device=self.weight.device)

    def extra_repr(self) -> str:
        state = getattr(self.weight, "quant_state", None)
        quant = (f", quant_type={state.quant_type}, blocksize={state.blocksize}, nested={state.nested}"
                 if state is not None else "")
        return super().extra_repr() + quant


def is_peft_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is PEFT's QLoRA layer (``peft.tuners.lora.bnb.Linear4bit``)."""
    kind = type(module)
    return kind.__module__ == "peft.tuners.lora.bnb" and kind.__name__ == "Linear4bit"


def lora_class(base: nn.Module) -> type[LoRALinear]:
    """The LoRA layer class for a base layer: ``LoRALinear4bit`` over a bitsandbytes
    ``Linear4bit``, else ``LoRALinear`` (both build with ``.from_linear(base, ...)``)."""
    return LoRALinear4bit if is_linear4bit(base) else LoRALinear


def is_lora_base(module: nn.Module) -> bool:
    """A layer lora-fused adapts: an ``nn.Linear`` (exactly) or a bitsandbytes ``Linear4bit``."""
    return type(module) is nn.Linear or is_linear4bit(module)
