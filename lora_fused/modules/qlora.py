"""``LoRALinear4bit``: a ``LoRALinear`` over a bitsandbytes ``Linear4bit`` (QLoRA), and the
choice of LoRA layer per base layer type.

The op (the dequantized scratch, the decode kernel, the Function) is :mod:`lora_fused.ops.qlora`.
The compute dtype is ``Linear4bit.compute_dtype`` when set, else x's dtype (autocast's under
autocast); the output is cast back to x's dtype, as ``Linear4bit`` does. ``lora_A`` /
``lora_B`` are fp32 parameters (as PEFT's QLoRA adapters) cast to the compute dtype in the
forward; their gradients arrive in fp32.

``merge()`` refuses: folding s·B·A into a 4-bit weight re-quantizes it (a rounding
loss that ``unmerge`` cannot undo; PEFT warns and does it). ``to_linear(merge=True)``
returns a plain ``nn.Linear`` holding deq(W0) + s·B·A in the compute dtype instead.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dispatch.backend import select_backend
from ..ops.lora_linear import autocast_dtype
from ..ops.qlora import dequantize_weight, qlora_linear, require_bitsandbytes, runs_on_triton
from .lora_linear import LoRALinear


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (without importing bitsandbytes
    when it is not loaded: then no module can be one)."""
    import sys
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit)


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
    quant state under ``weight.*``, bias) plus ``lora_A`` / ``lora_B``. The math and the
    scratch are in the module doc of :mod:`lora_fused.ops.qlora`, the compute dtype in this module's.
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
            return F.linear(xc, dequantize_weight(self.weight, state, dtype, use_triton=runs_on_triton(xc)),
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
