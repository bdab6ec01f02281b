"""``LoRALinear``: a drop-in ``nn.Linear`` with a fused LoRA adapter."""
from __future__ import annotations

import math
import warnings
from typing import Optional
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.compiler import is_compiling  # bound once: two attribute lookups less per eager forward

from ..ops.lora_linear import compute_inputs, lora_linear, lora_linear_layer_call, lora_linear_scaled_by
from ..validation import check_dropout_p, check_finite_number, check_positive_int, check_rank, check_scaling


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (Kalajdzievski, 2023)."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


class MergedFlagInStateDict:
    """Mixin for a LoRA module with ``merged`` / ``disabled`` whose ``weight`` holds the adapter
    when merged: ``merged`` is saved in ``state_dict`` as the extra-state entry ``_extra_state`` (a
    0-d bool tensor: state_dict stays all tensors, as safetensors needs).

    Loading a checkpoint that holds ``weight`` sets ``merged`` to the checkpoint's value, so the
    adapter is applied exactly once in either direction; a checkpoint saved before the entry
    existed loads as unmerged. Loading the LoRA factors without ``weight`` (e.g.
    ``lora_state_dict``, ``strict=False``) into a merged module is refused: its weight holds the
    old adapter.
    """

    #: state_dict key (after the module's prefix) of the saved ``merged`` flag.
    EXTRA_STATE_KEY = "_extra_state"
    #: the names of the module's LoRA factors (loading them alone into a merged module is refused).
    LORA_FACTOR_NAMES = ("lora_A", "lora_B")
    #: the state_dict key (after the prefix) of the base weight the adapter is merged into.
    BASE_WEIGHT_KEY = "weight"

    def get_extra_state(self) -> Tensor:
        return torch.tensor(self.merged)

    def set_extra_state(self, state) -> None:
        self.merged = bool(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + self.EXTRA_STATE_KEY
        merged = self._merged_after_loading(state_dict, prefix, error_msgs)
        if merged is None:
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key in missing_keys:  # an older checkpoint: loads as unmerged
            missing_keys.remove(key)
        self.merged = merged

    def _merged_after_loading(self, state_dict, prefix, error_msgs) -> Optional[bool]:
        """``merged`` once ``state_dict`` is loaded, or None (the reason added to error_msgs)."""
        name = prefix or type(self).__name__
        key = prefix + self.EXTRA_STATE_KEY
        saved = bool(state_dict[key]) if key in state_dict else None
        if prefix + self.BASE_WEIGHT_KEY in state_dict:
            merged = bool(saved)  # no entry: saved before it existed, as unmerged
            if merged and self.disabled:
                error_msgs.append(f"{name}: a merged checkpoint cannot load into a disabled layer (its "
                                  "weight holds the adapter; set disabled = False)")
                return None
            return merged
        if saved is not None and saved != self.merged:
            error_msgs.append(f"{name}: the checkpoint was saved with merged={saved} but holds no weight, "
                              f"and this layer has merged={self.merged}")
            return None
        if saved is None and self.merged and any(prefix + n in state_dict for n in self.LORA_FACTOR_NAMES):
            error_msgs.append(f"{name}: loading {' / '.join(self.LORA_FACTOR_NAMES)} into a merged "
                              f"{type(self).__name__} without its weight: the weight holds the old adapter "
                              "(unmerge() first)")
            return None
        return self.merged


class MergedAndDisabledFlags:
    """``merged`` and ``disabled`` as properties that keep the plain attribute ``_bypass`` (merged
    or disabled) up to date, so a forward reads one attribute instead of two properties. The
    class sets ``_merged = _disabled = _bypass = False`` in its constructor."""

    @property
    def merged(self) -> bool:
        """``True``: the adapter is folded into the base weight (see ``merge()``)."""
        return self._merged

    @merged.setter
    def merged(self, value: bool) -> None:
        self._merged = bool(value)
        self._bypass = self._merged or self._disabled

    @property
    def disabled(self) -> bool:
        """``True``: the forward runs the base layer alone."""
        return self._disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        if value and self.merged:
            raise ValueError(f"{type(self).__name__}: cannot set disabled = True on a merged layer: the adapter "
                             "is folded into its base weight; call unmerge() first")
        self._disabled = bool(value)
        self._bypass = self._merged or self._disabled

    def merge_refusal(self) -> Optional[str]:
        """Why ``merge()`` would refuse this layer, or None (``merge_lora`` asks every layer
        before it merges any)."""
        if self.disabled:
            return (f"{type(self).__name__}.merge(): the layer is disabled; merging would apply the adapter it "
                    "disables (set disabled = False first)")
        return None


class LoRALinear(MergedFlagInStateDict, MergedAndDisabledFlags, nn.Linear):
    """``y = x W0ᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ`` with W0 and b frozen.

    State-dict keys are those of ``nn.Linear`` (``weight``, ``bias``) plus
    ``lora_A`` [r, in] and ``lora_B`` [out, r]. A fresh adapter is a no-op
    (B = 0). ``merge()`` folds ``scaling · B A`` into ``weight`` for inference
    and ``unmerge()`` takes it out again; neither happens implicitly.
    Setting ``disabled = True`` runs the base layer alone (refused while merged:
    the adapter is inside ``weight`` then).

    ``merged`` is saved in ``state_dict`` (the extra-state entry ``_extra_state``), because a
    merged checkpoint's ``weight`` already holds ``scaling · B A`` (see
    :class:`MergedFlagInStateDict`).

    ``scaling`` is mirrored in the non-persistent buffer ``_scaling_tensor`` (0-d float64, on
    the weight's device; not in ``state_dict``), written in place when ``scaling`` is set.
    Under ``torch.compile`` the forward passes that tensor instead of the float, so a new
    scaling neither recompiles the model (dynamo guards a float attribute by value) nor goes
    stale in a CUDA graph (the kernels read it through a pointer). Eager calls pass the float.
    ``lora_dropout`` likewise: the buffer ``_dropout_tensor`` holds p, and the plain bool
    ``_dropout_on`` (p > 0) is all a compiled graph depends on (dropout on or off: a new graph).
    """

    #: name of the buffer that mirrors ``scaling`` for compiled forwards.
    SCALING_BUFFER = "_scaling_tensor"
    #: name of the buffer that mirrors ``lora_dropout`` for compiled forwards.
    DROPOUT_BUFFER = "_dropout_tensor"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 8,
                 lora_alpha: float = 8.0, lora_dropout: float = 0.0, use_rslora: bool = False,
                 device=None, dtype=None) -> None:
        check_positive_int(in_features, "in_features")
        check_positive_int(out_features, "out_features")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r = check_rank(r)
        self.lora_alpha = check_finite_number(lora_alpha, "lora_alpha")
        self.lora_dropout = lora_dropout
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(self.r, self.lora_alpha, self.use_rslora)
        self._merged = self._disabled = self._bypass = False
        self._attach_lora_parameters()

    @property
    def scaling(self) -> float:
        """The adapter's factor ``s`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rslora)."""
        return self._scaling

    @scaling.setter
    def scaling(self, value) -> None:
        # Checked when set, so a compiled forward (which cannot check it) never sees NaN/inf.
        self._scaling = check_scaling(value)
        self._fill_mirror(self.SCALING_BUFFER, self._scaling)

    @property
    def lora_dropout(self) -> float:
        """The dropout probability p of the LoRA branch's input, in [0, 1)."""
        return self._lora_dropout

    @lora_dropout.setter
    def lora_dropout(self, value) -> None:
        # Checked when set: a compiled forward passes the buffer without a look at its value.
        self._lora_dropout = check_dropout_p(value)
        self._dropout_on = self._lora_dropout > 0.0
        self._fill_mirror(self.DROPOUT_BUFFER, self._lora_dropout)

    def _fill_mirror(self, name: str, value: float, device: Optional[torch.device] = None) -> None:
        """Write ``value`` into the mirror ``name`` (if it exists yet), on ``device`` when given."""
        buffers = self.__dict__.get("_buffers")  # absent before nn.Module.__init__ ran
        mirror = buffers.get(name) if buffers is not None else None
        if mirror is None:
            return
        device = device or mirror.device
        if mirror.dtype == torch.float64 and mirror.device == device \
                and (not mirror.is_inference() or torch.is_inference_mode_enabled()):
            with torch.no_grad():  # in place: a compiled graph (or a CUDA graph) holds its address
                mirror.fill_(value)
        else:  # cast by .half(), left on meta by load_state_dict(assign=True), or made under
            # inference_mode (read-only outside it)
            self.register_buffer(name, torch.tensor(value, dtype=torch.float64, device=device), persistent=False)

    def _attach_scaling_buffer(self, device) -> None:
        """(Re)create the float64 mirrors of ``scaling`` and ``lora_dropout`` on ``device`` (see the class docstring)."""
        for name, value in ((self.SCALING_BUFFER, self._scaling), (self.DROPOUT_BUFFER, self._lora_dropout)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float64, device=device), persistent=False)

    def _refresh_derived_state(self) -> None:
        """Rewrite the state derived from Python attributes (the mirrors of ``scaling`` and
        ``lora_dropout``, on the weight's device) from those attributes. Called whenever the tensors
        are moved, materialised, loaded or unpickled: ``to_empty`` leaves the mirrors uninitialised,
        ``.half()`` casts them, ``load_state_dict(assign=True)`` into a meta module leaves them on
        meta, and nothing else would write them again (they are not in ``state_dict``)."""
        weight = self._parameters.get("weight")  # not self.weight: no parametrization evaluated
        device = weight.device if weight is not None else None
        self._fill_mirror(self.SCALING_BUFFER, self._scaling, device)
        self._fill_mirror(self.DROPOUT_BUFFER, self._lora_dropout, device)

    def _apply(self, fn, recurse=True):
        # to_empty / .to() / .half() / .cuda() all come here: the mirrors stay float64 and exact.
        super()._apply(fn, recurse)
        self._refresh_derived_state()
        return self

    def _attach_lora_parameters(self) -> None:
        """Fresh lora_A / lora_B beside the current weight (its device and dtype); base frozen."""
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **factory))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._attach_scaling_buffer(self.weight.device)
        if self.weight.device.type != "meta":
            self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int = 8, lora_alpha: float = 8.0,
                    lora_dropout: float = 0.0, use_rslora: bool = False) -> "LoRALinear":
        """Wrap an existing ``nn.Linear``: its weight and bias are reused (not copied) and frozen."""
        if isinstance(linear, LoRALinear):
            raise TypeError(f"linear is already a LoRALinear (r={linear.r}): wrapping it again would "
                            "drop its trained lora_A / lora_B; use it as it is")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, r=r,
                    lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                    device="meta", dtype=linear.weight.dtype)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._attach_lora_parameters()  # now on the base's device (built on meta: no copy of W0)
        layer.training = linear.training  # a drop-in: injecting into an eval() model keeps eval
        return layer

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A ~ kaiming_uniform(a=sqrt(5)) as nn.Linear/PEFT, B = 0: the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        if self._bypass:  # merged or disabled
            return F.linear(x, self.weight, self.bias)
        # The parameters straight from ``_parameters``: ``self.weight`` goes through
        # Module.__getattr__ (~1 µs for four). A name missing there (moved by a
        # parametrization, say) takes the attribute route.
        params = self._parameters
        try:
            weight, bias, lora_A, lora_B = params["weight"], params["bias"], params["lora_A"], params["lora_B"]
        except KeyError:
            weight, bias, lora_A, lora_B = self.weight, self.bias, self.lora_A, self.lora_B
        if is_compiling():  # s and p as tensors: no guard on their values (class docstring)
            x, weight, bias, lora_A, lora_B = compute_inputs(x, weight, bias, lora_A, lora_B)
            return lora_linear_scaled_by(x, weight, lora_A, lora_B, self._scaling_tensor, bias,
                                         dropout_p=self._dropout_tensor if self._dropout_on else 0.0,
                                         training=self.training)
        y = lora_linear_layer_call(x, weight, bias, lora_A, lora_B, self._scaling,  # in the fewest steps
                                   self._lora_dropout if self.training else 0.0)
        if y is not None:
            return y
        x, weight, bias, lora_A, lora_B = compute_inputs(x, weight, bias, lora_A, lora_B)
        return lora_linear(x, weight, lora_A, lora_B, self._scaling, bias, dropout_p=self._lora_dropout,
                           training=self.training)

    def _delta_weight(self) -> Tensor:
        """scaling · B A in fp32: out × in, formed only to merge or unmerge."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def _write_weight(self, value: Tensor, what: str) -> None:
        """Copy fp32 ``value`` into ``weight`` if it stays finite in the weight's dtype.

        Checked after the cast: W + s·B·A above 65504 is finite in fp32 and inf in fp16.
        """
        cast = value.to(self.weight.dtype)
        if not torch.isfinite(cast).all():
            raise ValueError(f"LoRALinear.{what}(): weight {'+' if what == 'merge' else '-'} scaling * "
                             f"lora_B @ lora_A has NaN/inf entries in {self.weight.dtype}; the weight "
                             "is left unchanged (check the adapter's values and scaling)")
        self.weight.copy_(cast)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` (for inference); refuses to write NaN/inf."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing done", stacklevel=2)
            return
        refusal = self.merge_refusal()
        if refusal is not None:
            raise ValueError(refusal)
        self._write_weight(self.weight.float() + self._delta_weight(), "merge")
        self.merged = True
        if self.training:
            _warn_training_while_merged()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of ``weight`` (exact up to the weight dtype's rounding)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing done", stacklevel=2)
            return
        self._write_weight(self.weight.float() - self._delta_weight(), "unmerge")
        self.merged = False

    def train(self, mode: bool = True) -> "LoRALinear":
        if mode and self.merged:
            _warn_training_while_merged()
        return super().train(mode)

    def __setstate__(self, state: dict) -> None:
        # A module pickled before ``merged`` / ``lora_dropout`` became properties holds them as plain attributes.
        merged = state.pop("merged", None)
        dropout = state.pop("lora_dropout", None)
        super().__setstate__(state)
        if merged is not None:
            self._merged = bool(merged)
        if dropout is not None:
            self.lora_dropout = dropout
        self.__dict__.setdefault("_merged", False)
        self.__dict__.setdefault("_disabled", False)
        self._bypass = self._merged or self._disabled
        if not {self.SCALING_BUFFER, self.DROPOUT_BUFFER} <= self._buffers.keys():  # pickled before a mirror existed
            self._attach_scaling_buffer(self.weight.device)
        self._refresh_derived_state()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._refresh_derived_state()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, "
                f"merged={self.merged}")


def _warn_training_while_merged() -> None:
    # One text from one place: Python's default warning filter shows it once per call site,
    # not once per layer of a model.
    warnings.warn("LoRALinear is merged and in training mode: a merged layer runs the base "
                  "weight alone, so lora_A / lora_B get no gradients; unmerge() (or "
                  "lf.unmerge_lora(model)) before training, or eval() for inference", stacklevel=2)
