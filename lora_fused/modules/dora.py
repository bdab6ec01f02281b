"""``DoRALinear``: a ``LoRALinear`` with DoRA's magnitude (PEFT's ``use_dora=True``).

The op (the math, the norm without B·A, the custom ops and the eager Function) is
:mod:`lora_fused.ops.dora`; this module holds the layer: its parameters, the eval-time norm
cache, merge / unmerge with the norm they used, and the checkpoint state.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.dora import dora_linear, dora_linear_inference, dora_weight_norm
from ..ops.lora_linear import compute_inputs
from ..value_cache import all_match, stamp
from .lora_linear import LoRALinear


class DoRALinear(LoRALinear):
    """A ``LoRALinear`` with DoRA's magnitude: ``lora_magnitude_vector`` [out] (see :func:`dora_linear`).

    The magnitude starts as ‖W0[o] + s·(B A)[o]‖₂ (PEFT's initialisation; ‖W0[o]‖ for a
    fresh adapter, B = 0), so a fresh layer computes the base layer exactly. ``merge()``
    writes (m/norm) ⊙ (W0 + s·B A) into ``weight`` as PEFT does and keeps the norm it used,
    so ``unmerge()`` restores W0 (up to rounding); the norm is saved with ``merged`` so that
    a merged checkpoint unmerges after loading too.

    ``cache_weight_norm = True`` (off by default, as PEFT's ``ENABLE_DORA_CACHING``) keeps the
    norm between inference calls (eval mode, no grad), so decoding does not read W0 twice per
    call. It is recomputed when weight, lora_A or lora_B is replaced or written in place through
    the parameter (their version counters), when scaling or the compute dtype changes, and after
    any call that records gradients; a write through ``.data`` is invisible to it.
    """

    #: Keep the norm between eval-mode, no-grad calls (see the class docstring).
    cache_weight_norm: bool = False

    def _attach_lora_parameters(self) -> None:
        super()._attach_lora_parameters()
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, **factory))
        self.register_buffer("_merged_norm", None, persistent=False)
        if self.weight.device.type != "meta":
            self.reset_magnitude()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> "DoRALinear":
        if isinstance(linear, LoRALinear):
            raise TypeError(f"linear is already a {type(linear).__name__} (r={linear.r}); use it as it is")
        return super().from_linear(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                   use_rslora=use_rslora)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        super().reset_lora_parameters()
        if "lora_magnitude_vector" in self._parameters:
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = ‖W0[o] + s·(B A)[o]‖₂ (PEFT's ``DoraLinearLayer.update_layer``)."""
        self.lora_magnitude_vector.copy_(self.weight_norm())

    def weight_norm(self) -> Tensor:
        """‖W0[o] + s·(B A)[o]‖₂ [out] of the unmerged weight, without forming B A."""
        if self.merged:
            raise ValueError("DoRALinear.weight_norm(): the layer is merged; unmerge() first")
        return dora_weight_norm(self.weight, self.lora_A.to(self.weight.dtype),
                                self.lora_B.to(self.weight.dtype), self.scaling)

    def forward(self, x: Tensor) -> Tensor:
        if self._bypass:
            return F.linear(x, self.weight, self.bias)
        x, weight, bias, lora_A, lora_B = compute_inputs(x, self.weight, self.bias, self.lora_A, self.lora_B)
        if self.cache_weight_norm and not self.training and not torch.is_grad_enabled() \
                and not torch.compiler.is_compiling():
            norm = self._cached_norm(weight, lora_A, lora_B)
            return dora_linear_inference(x, weight, lora_A, lora_B, self.lora_magnitude_vector, self._scaling, bias,
                                         norm)
        self.__dict__.pop("_norm_cache", None)  # a training step may change what the norm depends on
        return dora_linear(x, weight, lora_A, lora_B, self.lora_magnitude_vector, self._scaling, bias,
                           dropout_p=self.lora_dropout, training=self.training)

    def _cached_norm(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> Tensor:
        """The norm of the (cast) weights, kept while the parameters behind them are unchanged."""
        own = (self.weight, self.lora_A, self.lora_B)
        key = (self._scaling, weight.dtype)
        cached = self.__dict__.get("_norm_cache")
        if cached is not None and cached[0] == key and all_match(cached[1], own):
            return cached[2]
        norm = dora_weight_norm(weight, lora_A, lora_B, self._scaling)
        # stamps, not ids: a parameter replaced by another at a freed one's id and address, or a
        # .data swap to new memory at the old address, must not match (lora_fused.value_cache)
        stamps = [stamp(t, contents=False) for t in own]
        if None not in stamps:
            self.__dict__["_norm_cache"] = (key, stamps, norm)
        return norm

    @torch.no_grad()
    def merge(self) -> None:
        """weight ← (m/norm) ⊙ (W0 + s·B A), norm of the unmerged weight (as PEFT); refuses NaN/inf."""
        if self.merged:
            super().merge()  # warns
            return
        if self.disabled:
            super().merge()  # raises
        norm = self.weight_norm().float()
        factor = (self.lora_magnitude_vector.float() / norm)[:, None]
        self._write_weight(factor * (self.weight.float() + self._delta_weight()), "merge")
        self._merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """weight ← weight / (m/norm) − s·B A with the norm merge() used."""
        if not self.merged:
            super().unmerge()  # warns
            return
        if self._merged_norm is None:
            raise ValueError("DoRALinear.unmerge(): the norm used to merge is unknown (a merged checkpoint "
                             "saved without it); reload the unmerged weight instead")
        factor = (self.lora_magnitude_vector.float() / self._merged_norm.float())[:, None]
        self._write_weight(self.weight.float() / factor - self._delta_weight(), "unmerge")
        self._merged_norm = None
        self.merged = False

    def get_extra_state(self) -> Tensor:
        """A tensor, so that ``state_dict`` stays all tensors (safetensors, Trainer checkpoints):
        unmerged, LoRALinear's 0-d bool ``merged``; merged, the norm merge() used (fp32 [out],
        needed to unmerge), or a 0-d True when that norm is unknown."""
        if self.merged and self._merged_norm is not None:
            return self._merged_norm
        return torch.tensor(self.merged)

    def set_extra_state(self, state) -> None:
        merged, norm = _decode_merge_state(state)
        self.merged = merged
        self._merged_norm = None if norm is None else norm.to(self.weight.device, torch.float32)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + self.EXTRA_STATE_KEY
        saved, norm = state_dict.get(key), None
        if saved is not None:  # LoRALinear reads the entry as the 0-d flag
            merged, norm = _decode_merge_state(saved)
            state_dict = dict(state_dict)
            state_dict[key] = torch.tensor(merged)
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if len(error_msgs) > errors:
            return
        if not self.merged:
            self._merged_norm = None
        elif prefix + "weight" in state_dict:  # a merged weight loaded: the norm it was merged with
            self._merged_norm = None if norm is None else norm.to(self.weight.device, torch.float32)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", use_dora=True"


def _decode_merge_state(state) -> tuple[bool, Optional[Tensor]]:
    """``(merged, merge norm or None)`` from a DoRALinear extra-state entry: a 0-d flag, a 1-D
    norm (merged), or the dict ``{"merged", "merged_norm"}`` of checkpoints saved before the entry
    was a tensor."""
    if isinstance(state, dict):
        return bool(state["merged"]), state.get("merged_norm")
    if not isinstance(state, Tensor) or state.dim() > 1:
        raise ValueError(f"a DoRALinear extra state must be a 0-d merged flag or the 1-D merge norm, got "
                         f"{type(state).__name__} {tuple(getattr(state, 'shape', ()))}")
    if state.dim() == 0:
        return bool(state), None
    return True, state


def is_dora_layer(module: nn.Module) -> bool:
    return isinstance(module, DoRALinear)


__all__ = ["DoRALinear"]
