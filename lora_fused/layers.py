"""``LoRALinear``: a drop-in ``nn.Linear`` with a fused LoRA adapter."""
from __future__ import annotations

import math
import warnings
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import lora_linear
from .validation import check_dropout_p, check_rank


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (Kalajdzievski, 2023)."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


class LoRALinear(nn.Linear):
    """``y = x W0ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with W0 and b frozen.

    State-dict keys are those of ``nn.Linear`` (``weight``, ``bias``) plus
    ``lora_A`` [r, in] and ``lora_B`` [out, r]. A fresh adapter is a no-op
    (B = 0). ``merge()`` folds ``scaling · B A`` into ``weight`` for inference
    and ``unmerge()`` takes it out again; neither happens implicitly.
    Setting ``disabled = True`` runs the base layer alone.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 8,
                 lora_alpha: float = 8.0, lora_dropout: float = 0.0, use_rslora: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r = check_rank(r)
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = check_dropout_p(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(self.r, self.lora_alpha, self.use_rslora)
        self.merged = False
        self.disabled = False
        self._attach_lora_parameters()

    def _attach_lora_parameters(self) -> None:
        """Fresh lora_A / lora_B beside the current weight (its device and dtype); base frozen."""
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **factory))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        if self.weight.device.type != "meta":
            self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int = 8, lora_alpha: float = 8.0,
                    lora_dropout: float = 0.0, use_rslora: bool = False) -> "LoRALinear":
        """Wrap an existing ``nn.Linear``: its weight and bias are reused (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, r=r,
                    lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                    device="meta", dtype=linear.weight.dtype)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._attach_lora_parameters()  # now on the base's device (built on meta: no copy of W0)
        return layer

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A ~ kaiming_uniform(a=sqrt(5)) as nn.Linear/PEFT, B = 0: the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            return F.linear(x, self.weight, self.bias)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):
            # As autocast does for F.linear: compute in its dtype (it casts W0 too).
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        else:
            # Like nn.Linear, a base-weight dtype mismatch is the caller's error
            # (lora_linear raises naming both dtypes): W0 is never copied per call.
            dtype = x.dtype
        # LoRA weights may be kept in fp32 beside a bf16 base (as PEFT does); the cast
        # is tiny and differentiable, so their gradients still arrive in fp32.
        return lora_linear(x, weight, self.lora_A.to(dtype), self.lora_B.to(dtype),
                           self.scaling, bias, dropout_p=self.lora_dropout, training=self.training)

    def _delta_weight(self) -> Tensor:
        """scaling · B A in fp32: out × in, formed only to merge or unmerge."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (for inference); refuses to write NaN/inf."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing done", stacklevel=2)
            return
        merged = self.weight.float() + self._delta_weight()
        if not torch.isfinite(merged).all():
            raise ValueError("LoRALinear.merge(): weight + scaling * lora_B @ lora_A has NaN/inf "
                             "entries; the weight is left unchanged (check the adapter's values)")
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of ``weight`` (exact up to the weight dtype's rounding)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing done", stacklevel=2)
            return
        self.weight.copy_((self.weight.float() - self._delta_weight()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, "
                f"merged={self.merged}")
