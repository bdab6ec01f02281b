"""QLoRA's op: LoRA over a bitsandbytes 4-bit base weight (``qlora_linear``).

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
that differs. The layer (:class:`lora_fused.modules.qlora.LoRALinear4bit`) picks the
compute dtype; the eager Function comes from ``ops/_scaffold.define_lora_op``.

bitsandbytes is imported lazily (``pip install lora-fused[qlora]``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..backends import torch_backend
from ..dispatch.backend import dequant_kernels, lora_kernels, on_tensor_device, select_backend
from ._scaffold import define_lora_op
from .lora_linear import draw_dropout_seed
from ..validation import check_lora_linear_args

INSTALL_HINT = "pip install lora-fused[qlora] (or pip install 'bitsandbytes>=0.45')"


def require_bitsandbytes():
    """The bitsandbytes module, or ImportError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"4-bit (QLoRA) base layers need bitsandbytes: {INSTALL_HINT} ({e})") from None
    return bitsandbytes


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


def runs_on_triton(x: Tensor) -> bool:
    """Whether the 4-bit op runs x on the Triton backend (a non-empty x whose backend is Triton)."""
    return select_backend(x.device, x.dtype) == "triton" and x.numel() > 0


@on_tensor_device
def dequantize_weight(packed: Tensor, state, dtype: torch.dtype, *, use_triton: bool) -> Tensor:
    """deq(W0) [out, in] in ``dtype``, as bitsandbytes' ``Linear4bit`` computes it (see the module doc).

    A fresh tensor: the caller's transient scratch."""
    if use_triton:
        quant = Quant4bit.from_quant_state(state)
        weight = dequant_kernels().dequantize_4bit(packed, quant, quant.dtype)
    else:
        weight = _bitsandbytes_dequantize(packed, state)
    return weight if weight.dtype == dtype else weight.to(dtype)


def _bitsandbytes_dequantize(packed: Tensor, state) -> Tensor:
    """``bitsandbytes.functional.dequantize_4bit`` of the packed weight, as [out, in].

    Its blocks run over the flattened weight (element i has scale absmax[i // blocksize]), and
    its CUDA kernel, its scalar CPU kernel and its torch fallback read them so. Its AVX-512 CPU
    kernel (taken when in_features is a multiple of 16) looks the scale up per row instead, as
    absmax[row * (in // blocksize) + col // blocksize]: the same only when every row holds whole
    blocks, other scales otherwise (tests/modules/test_qlora.py). Such a weight is dequantized as rows
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
    return (use_triton and dropout_p == 0.0 and x2d.shape[0] <= dequant_kernels().DECODE_MAX_ROWS
            and state.dtype == x2d.dtype and state.shape[0] > 0)


@on_tensor_device
def _qlora_forward(x2d: Tensor, packed: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, state: object,
                   scaling: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(y, S) for 2-D x; ``packed`` / ``state``: the 4-bit W0 and its quant state."""
    triton = runs_on_triton(x2d)
    if _decode_applies(x2d, state, dropout_p, triton):
        shrink = lora_kernels().lora_shrink(x2d, lora_A, None, 0.0)
        y = dequant_kernels().qlora_decode(x2d, packed, Quant4bit.from_quant_state(state), bias, shrink, lora_B,
                                           scaling)
        return y, shrink
    weight = dequantize_weight(packed, state, x2d.dtype, use_triton=triton)
    backend = lora_kernels() if triton else torch_backend
    return backend.lora_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@on_tensor_device
def _qlora_grads(grad_y: Tensor, x2d: Tensor, lora_A: Tensor, lora_B: Tensor, shrink: Tensor, packed: Tensor,
                 state: object, scaling: float, dropout_p: float, seed: Optional[Tensor], need_x: bool,
                 need_lora: bool):
    """(dX, dA, dB) of lora_linear over deq(W0), which is dequantized again for dX only."""
    triton = runs_on_triton(x2d)
    # dA, dB alone need no W: an empty [out, 0]-strided stand-in is never read.
    weight = (dequantize_weight(packed, state, x2d.dtype, use_triton=triton) if need_x
              else x2d.new_empty(()).expand(state.shape[0], x2d.shape[1]))
    backend = lora_kernels() if triton else torch_backend
    return backend.lora_backward(grad_y, x2d, weight, lora_A, lora_B, shrink, scaling, dropout_p, seed,
                                 need_x, need_lora)


#: lora_linear over deq(W0), the eager Function alone (``_scaffold``): a ``QuantState`` is no
#: custom-op argument. Its inputs put the packed weight in W0's place (never differentiable:
#: uint8), and the Function keeps it on ctx, as bitsandbytes' own ``MatMul4Bit`` does (a module
#: parameter that saved-tensor hooks, e.g. offloading, should not copy).
QLORA_LINEAR = define_lora_op(None, _qlora_forward, _qlora_grads, fake_forward=None, function_name="_QLoRALinear",
                              on_ctx=("packed",))


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
    y = QLORA_LINEAR.run((x2d, packed, bias, lora_A, lora_B, quant_state, scaling, active_p, seed))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], quant_state.shape[0])


