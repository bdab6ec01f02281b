"""``LoRAExperts``: LoRA on a mixture-of-experts block's 3-D expert parameters.

transformers (>= 5) keeps an MoE block's experts in one module decorated with
``use_experts_implementation`` (``transformers/integrations/moe.py``): e.g. ``Qwen3MoeExperts``
holds ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] and is called as
``experts(hidden_states, top_k_index, top_k_weights)``. ``LoRAExperts`` wraps such a module (kept
as ``base_layer``, its parameters reused and frozen) with the same call signature, and adds per
targeted parameter and expert e the factors A_e [r, in] and B_e [out, r] (in / out as the matmul
uses them, whatever the storage order), stacked as ``lora_A`` [E, r, in] / ``lora_B`` [E, out, r]:

    y(token, e) = x W_eᵀ + b_e + s · (drop(x) A_eᵀ) B_eᵀ

through ``ops.grouped`` (pairs sorted by expert once per call, one grouped op per projection),
never forming B_e A_e in forward or backward. The rest of the forward mirrors transformers'
``grouped_mm_experts_forward``: the module's own ``_apply_gate`` (or ``act_fn`` without a gate),
biases, transposed storage, the post-expert norm, the routing weights and the sum over top-k.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .lora_linear import MergedAndDisabledFlags, MergedFlagInStateDict, lora_scaling
from ..ops.grouped import ExpertPlan, grouped_linear_sorted, grouped_lora_sorted, plan_experts
from ..validation import check_dropout_p, check_finite_number, check_rank

#: The attributes ``use_experts_implementation`` sets on an experts module: the layout flags
#: the forward follows (``transformers/integrations/moe.py``).
LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")
DOWN = "down_proj"
PerParameter = Union[int, float, Mapping[str, Union[int, float]]]


def first_projection(experts: nn.Module) -> str:
    """The name of an experts module's first projection: ``gate_up_proj`` (gated) or ``up_proj``."""
    return "gate_up_proj" if experts.has_gate else "up_proj"


def expert_parameter_names(experts: nn.Module) -> tuple[str, str]:
    """The two projections an experts module runs, in order (first, down)."""
    return first_projection(experts), DOWN


def check_experts_module(experts: nn.Module) -> None:
    """TypeError / ValueError unless ``experts`` has the layout ``LoRAExperts`` mirrors: the
    flags of ``use_experts_implementation`` and 3-D projections with matching shapes."""
    name = type(experts).__name__
    if isinstance(experts, LoRAExperts):
        raise TypeError(f"experts is already a LoRAExperts (parameters {list(experts.lora)}): wrapping it again "
                        "would drop its trained factors; use it as it is")
    if not isinstance(experts, nn.Module):
        raise TypeError(f"experts must be an nn.Module, got {name}")
    missing = [f for f in LAYOUT_FLAGS if not hasattr(experts, f)]
    if missing:
        raise TypeError(f"{name} is not a transformers experts module decorated with "
                        f"@use_experts_implementation (it lacks {missing}); LoRAExperts follows that layout "
                        "(3-D gate_up_proj / down_proj and the flags the decorator sets)")
    if getattr(type(experts).forward, "__wrapped__", None) is None:
        # The decorator's forward dispatches on config._experts_implementation (functools.wraps
        # sets __wrapped__); a subclass that overrides it (e.g. transformers' ErgoExperts, which
        # normalises each route per expert) computes more than LoRAExperts' forward would.
        decorated = next((c.__name__ for c in type(experts).__mro__[1:]
                          if getattr(c.__dict__.get("forward"), "__wrapped__", None) is not None), "its base")
        raise TypeError(f"{name} overrides the forward of its @use_experts_implementation class {decorated}; "
                        "LoRAExperts replaces that forward by the grouped experts computation, which would "
                        f"skip what {name}.forward adds: not supported")
    shapes = {}
    for pname in expert_parameter_names(experts):
        param = experts._parameters.get(pname)
        if param is None or param.dim() != 3:
            found = {n: tuple(p.shape) for n, p in experts.named_parameters(recurse=False)}
            raise TypeError(f"{name} has no 3-D parameter {pname!r} (its parameters: {found}); LoRAExperts "
                            "mirrors transformers' grouped_mm experts forward, which runs "
                            f"{' then '.join(expert_parameter_names(experts))}")
        out_f, in_f = matmul_shape(experts, param)
        shapes[pname] = (param.shape[0], out_f, in_f)
        bias = experts._parameters.get(pname + "_bias") if experts.has_bias else None
        if experts.has_bias and (bias is None or tuple(bias.shape) != (param.shape[0], out_f)):
            raise TypeError(f"{name} has has_bias=True but {pname}_bias is "
                            f"{None if bias is None else tuple(bias.shape)}, not [E={param.shape[0]}, out={out_f}]")
    (first, down) = expert_parameter_names(experts)
    if shapes[first][0] != shapes[down][0] or shapes[first][2] != shapes[down][1]:
        raise ValueError(f"{name}: {first} (E, out, in) = {shapes[first]} and {down} = {shapes[down]} do not "
                         "chain (the same E, and the first projection's in equal to down_proj's out)")


def grouped_experts_forward(base: nn.Module, hidden_states: Tensor, top_k_weights: Tensor, plan: ExpertPlan,
                            project: Callable, *extra) -> Tensor:
    """transformers' ``grouped_mm_experts_forward`` over ``plan``'s (token, expert) pairs sorted by
    expert: ``project(name, x, plan, *extra, rows=)`` gives each projection [P, out] in sorted
    order (x: the tokens for the first, ``rows=True``; the sorted pairs for down_proj); between
    them the module's own gate (or activation), after them its post-expert norm, the routing
    weights and the sum over the k choices."""
    h = project(first_projection(base), hidden_states, plan, *extra, rows=True)
    h = base._apply_gate(h) if base.has_gate else base.act_fn(h)
    y = project(DOWN, h, plan, *extra, rows=False)
    if base.has_post_expert_norm:
        y = base.post_expert_norm(y)
    # Pairs with an expert id outside [0, E) (expert-parallel sentinels) come out of the op as 0.
    y = y[plan.position] * top_k_weights.reshape(-1, 1)  # back to (token, k) order, weighted
    return y.view(hidden_states.shape[0], -1, y.shape[-1]).sum(dim=1).to(hidden_states.dtype)


def projection_operands(base: nn.Module, name: str, x: Tensor) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """(weight [E, out, in], bias [E, out] | None, x in the weight's dtype) of projection ``name``."""
    weight = base._parameters[name]
    if base.is_transposed:  # stored [E, in, out]: the op takes [E, out, in] (a view, any strides)
        weight = weight.transpose(1, 2)
    bias = base._parameters[name + "_bias"] if base.has_bias else None
    if x.dtype != weight.dtype:  # as transformers' grouped_mm path: e.g. fp32 activations, bf16 experts
        x = x.to(weight.dtype)
    return weight, bias, x


def matmul_shape(experts: nn.Module, param: Tensor) -> tuple[int, int]:
    """(out, in) of the matmul with a 3-D expert parameter: [E, out, in], or [E, in, out] transposed."""
    return (param.shape[2], param.shape[1]) if experts.is_transposed else (param.shape[1], param.shape[2])


class ExpertLoRAFactors(nn.Module):
    """One targeted parameter's factors: ``lora_A`` [E, r, in], ``lora_B`` [E, out, r] and their
    ``r`` / ``lora_alpha`` / ``scaling`` (a module of its own, so the state-dict keys end in
    ``lora_A`` / ``lora_B`` as every lora-fused factor's)."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, *, r: int, lora_alpha: float,
                 use_rslora: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.r = check_rank(r)
        self.lora_alpha = check_finite_number(lora_alpha, "lora_alpha")
        self.scaling = lora_scaling(self.r, self.lora_alpha, use_rslora)
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts, self.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, self.r, **factory))
        if self.lora_A.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A as PEFT's ParamWrapper draws its [E·r, in] lora_A (kaiming_uniform, a = sqrt(5):
        U(±1/sqrt(in)) per element), B = 0: a fresh adapter is a no-op."""
        nn.init.kaiming_uniform_(self.lora_A.view(-1, self.lora_A.shape[-1]), a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta(self, expert: int) -> Tensor:
        """scaling · B_e A_e in fp32, [out, in]: one expert's, formed only to merge or unmerge."""
        return self.scaling * (self.lora_B[expert].float() @ self.lora_A[expert].float())

    def extra_repr(self) -> str:
        E, r, in_f = self.lora_A.shape
        return f"experts={E}, in={in_f}, out={self.lora_B.shape[1]}, r={r}, lora_alpha={self.lora_alpha}"


class LoRAExperts(MergedFlagInStateDict, MergedAndDisabledFlags, nn.Module):
    """LoRA on the 3-D parameters of a transformers experts module (see the module docstring).

    ``base_layer`` is the wrapped module (parameters frozen, reused); ``lora`` maps each targeted
    parameter name to its :class:`ExpertLoRAFactors` (state-dict keys
    ``lora.<parameter>.lora_A`` [E, r, in] / ``.lora_B`` [E, out, r]). ``merge()`` adds
    ``scaling · B_e A_e`` into the base parameter one expert at a time; ``unmerge()`` takes it out.
    ``merged`` and ``disabled`` make the forward the base module's own (its
    ``config._experts_implementation`` choice). ``merged`` is saved in ``state_dict`` as
    LoRALinear's is (:class:`MergedFlagInStateDict`, the base weight key being
    ``base_layer.<first targeted parameter>``). Attributes not found on the wrapper are read
    from ``base_layer`` (``num_experts``, ``act_fn``, ...), so code that inspects the experts
    module keeps working.
    """

    def __init__(self, base_layer: nn.Module, *, r: PerParameter = 8, lora_alpha: PerParameter = 8.0,
                 lora_dropout: float = 0.0, parameters: Optional[Sequence[str]] = None,
                 use_rslora: bool = False) -> None:
        check_experts_module(base_layer)
        parameters = check_target_parameters(base_layer, expert_parameter_names(base_layer) if parameters is None
                                             else parameters)
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = check_dropout_p(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.lora = nn.ModuleDict()
        for pname in parameters:
            param = base_layer._parameters[pname]
            out_f, in_f = matmul_shape(base_layer, param)
            self.lora[pname] = ExpertLoRAFactors(
                param.shape[0], out_f, in_f, r=per_parameter(r, pname, "r"),
                lora_alpha=per_parameter(lora_alpha, pname, "lora_alpha"), use_rslora=self.use_rslora,
                device=param.device, dtype=param.dtype)
        for param in base_layer.parameters():
            param.requires_grad_(False)
        # MergedFlagInStateDict: a checkpoint holding this key holds the (possibly merged) base.
        self.BASE_WEIGHT_KEY = "base_layer." + parameters[0]
        self.LORA_FACTOR_NAMES = tuple(f"lora.{p}.lora_{ab}" for p in parameters for ab in "AB")
        self._merged = self._disabled = self._bypass = False
        self.training = base_layer.training  # a drop-in: wrapping an eval() model keeps eval

    @classmethod
    def from_experts(cls, experts: nn.Module, *, r: PerParameter = 8, lora_alpha: PerParameter = 8.0,
                     lora_dropout: float = 0.0, parameters: Optional[Sequence[str]] = None,
                     use_rslora: bool = False) -> "LoRAExperts":
        """Wrap a transformers experts module; ``parameters`` names the 3-D parameters to adapt
        (default: both projections, ``gate_up_proj`` (``up_proj`` without a gate) and ``down_proj``).
        ``r`` / ``lora_alpha``: one value, or ``{parameter name: value}`` for each targeted one."""
        return cls(experts, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, parameters=parameters,
                   use_rslora=use_rslora)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("__"):
                raise
        try:
            return getattr(base, name)
        except AttributeError:
            raise AttributeError(f"'LoRAExperts' object (and its base_layer, a {type(base).__name__}) has no "
                                 f"attribute {name!r}") from None

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        base = self._modules["base_layer"]
        if self._bypass:  # merged or disabled: the module's own forward and implementation choice
            return base(hidden_states, top_k_index, top_k_weights)
        plan = plan_experts(top_k_index, base._parameters[DOWN].shape[0])
        return grouped_experts_forward(base, hidden_states, top_k_weights, plan, self._project)

    def _project(self, name: str, x: Tensor, plan, *, rows: bool) -> Tensor:
        """One grouped projection through base parameter ``name`` (its LoRA term if targeted)."""
        weight, bias, x = projection_operands(self._modules["base_layer"], name, x)
        factors = self.lora._modules.get(name)
        if factors is None:
            return grouped_linear_sorted(x, weight, bias, plan, rows=rows)
        return grouped_lora_sorted(x, weight, bias, factors.lora_A, factors.lora_B, plan, factors.scaling,
                                   rows=rows, dropout_p=self.lora_dropout, training=self.training)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scaling · B_e A_e`` into each targeted base parameter, one expert at a time; refuses
        (changing nothing) if any result is NaN/inf in the parameter's dtype."""
        if self.merged:
            warnings.warn("LoRAExperts.merge(): already merged; nothing done", stacklevel=2)
            return
        refusal = self.merge_refusal()
        if refusal is not None:
            raise ValueError(refusal)
        self._apply_deltas(+1, "merge")
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of the base parameters (exact up to their dtype's rounding)."""
        if not self.merged:
            warnings.warn("LoRAExperts.unmerge(): not merged; nothing done", stacklevel=2)
            return
        self._apply_deltas(-1, "unmerge")
        self.merged = False

    def _apply_deltas(self, sign: int, what: str) -> None:
        """W_e ± scaling · B_e A_e for every targeted parameter and expert: checked first (a
        finite result in the parameter's dtype for all of them), then written, so a refusal
        leaves every parameter as it was. Only one expert's [out, in] delta exists at a time."""
        base = self._modules["base_layer"]
        for write in (False, True):
            for name, factors in self.lora.items():
                param = base._parameters[name]
                for e in range(param.shape[0]):
                    stored = param[e].T if base.is_transposed else param[e]  # [out, in] view
                    value = (stored.float() + sign * factors.delta(e)).to(param.dtype)
                    if write:
                        stored.copy_(value)
                    elif not torch.isfinite(value).all():
                        raise ValueError(f"LoRAExperts.{what}(): {name}[{e}] {'+' if sign > 0 else '-'} scaling * "
                                         f"lora_B[{e}] @ lora_A[{e}] has NaN/inf entries in {param.dtype}; the "
                                         "parameters are left unchanged (check the adapter's values and scaling)")

    def extra_repr(self) -> str:
        return (f"parameters={list(self.lora)}, lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, "
                f"merged={self.merged}")


def check_target_parameters(experts: nn.Module, parameters: Sequence[str]) -> tuple[str, ...]:
    """``parameters`` as a tuple of the experts module's projection names, each once; errors name
    what was wrong (a 2-D parameter such as a bias, a name the module lacks)."""
    if isinstance(parameters, str):
        parameters = (parameters,)
    parameters = tuple(parameters)
    name = type(experts).__name__
    if not parameters or not all(isinstance(p, str) for p in parameters):
        raise ValueError(f"parameters must name at least one of {name}'s expert projections "
                         f"{list(expert_parameter_names(experts))}, got {parameters!r}")
    if len(set(parameters)) != len(parameters):
        raise ValueError(f"parameters names a parameter twice: {parameters!r}")
    for pname in parameters:
        param = experts._parameters.get(pname)
        if param is not None and param.dim() != 3:
            raise ValueError(f"parameter {pname!r} of {name} has shape {tuple(param.shape)}; LoRAExperts adapts "
                             f"the 3-D expert projections {list(expert_parameter_names(experts))} only")
        if pname not in expert_parameter_names(experts):
            raise ValueError(f"{name} has no expert projection {pname!r}; its projections are "
                             f"{list(expert_parameter_names(experts))}")
    return parameters


def per_parameter(value: PerParameter, name: str, what: str):
    """``value`` itself, or ``value[name]`` when it is a mapping per parameter name."""
    if isinstance(value, Mapping):
        if name not in value:
            raise ValueError(f"{what} is a mapping per parameter but has no entry for {name!r} "
                             f"(keys: {sorted(value)})")
        return value[name]
    return value
