"""``MultiLoRAExperts``: a transformers experts module serving many expert adapters at once.

The serving counterpart of ``MultiLoRALinear`` for the 3-D expert parameters of an MoE block
(``gate_up_proj`` [E, 2I, H] or ``up_proj``, and ``down_proj`` [E, H, I]; ``forward(hidden_states,
top_k_index, top_k_weights)`` kept). Per adapted parameter it holds slot tables ``lora_A[p]``
[max_adapters, E, max_rank, in] and ``lora_B[p]`` [max_adapters, E, out, max_rank] (in / out as
the expert's matmul uses them), and per (parameter, slot, expert) a scaling and a rank: an
adapter's slot holds one A [E, r, in] and B [E, out, r] per parameter. The slot lifetime (add,
hot swap while batches pin a slot, remove, ``timeout=``) and the routing (``adapter_batch``) are
``MultiLoRALinear``'s: ``lora_fused.serving``.

In a batch each token uses its own adapter (or none: the base model) and each (token, k) pair
its expert. The pairs are sorted by expert once (``ops.grouped.plan_experts``), the base of
each projection runs grouped over them (``grouped_linear_sorted``), and the LoRA term is the
segmented delta op (``ops.delta.add_lora``) over segments keyed by (adapter, expert): id
slot · E + expert per sorted pair (-1: no adapter), the slot tables viewed as [max_adapters · E,
...] stacks. Inference only: nothing is recorded for autograd.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..dispatch.segments import check_adapter_ids, plan_segments
from ..ops.delta import add_lora
from ..ops.grouped import ExpertPlan, grouped_linear_sorted, plan_experts
from ..serving.routing import ROUTES
from ..serving.slots import AdapterSlots, install, uninstall
from ..validation import check_positive_int, check_scaling

#: The parameters an experts module may have adapted, by the projection they feed.
UP_PROJECTIONS = ("gate_up_proj", "up_proj")
DOWN_PROJECTION = "down_proj"


def expert_parameter_dims(experts: nn.Module, name: str) -> tuple[int, int, int]:
    """``(E, in, out)`` of the 3-D expert parameter ``name`` as its matmul uses it ([E, out, in]
    stored, or [E, in, out] with ``is_transposed``); ValueError if it is no such parameter."""
    param = getattr(experts, name, None)
    if not isinstance(param, Tensor) or param.dim() != 3:
        shape = tuple(param.shape) if isinstance(param, Tensor) else type(param).__name__
        raise ValueError(f"{type(experts).__name__} has no 3-D expert parameter {name!r} (got {shape}); "
                         f"MultiLoRAExperts adapts {UP_PROJECTIONS} / {DOWN_PROJECTION!r} [E, out, in] stacks")
    E, first, second = param.shape
    return (E, first, second) if getattr(experts, "is_transposed", False) else (E, second, first)


def check_experts_module(experts) -> None:
    """An experts module of transformers' layout (``use_experts_implementation``): 3-D
    ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` and ``num_experts``; else TypeError."""
    up = "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"
    params = {n: getattr(experts, n, None) for n in (up, DOWN_PROJECTION)}
    if not isinstance(experts, nn.Module) or not all(isinstance(p, Tensor) and p.dim() == 3
                                                     for p in params.values()) \
            or not isinstance(getattr(experts, "num_experts", None), int):
        raise TypeError(f"MultiLoRAExperts wraps a transformers experts module (3-D {up!r} and "
                        f"{DOWN_PROJECTION!r} parameters, num_experts, forward(hidden_states, top_k_index, "
                        f"top_k_weights)), got {type(experts).__name__}")


class MultiLoRAExperts(AdapterSlots, nn.Module):
    """``base_layer`` (the experts module, its forward and weights as they were) plus adapter slots.

    Per (token t, chosen expert e) and adapted parameter p: ``x W_eᵀ + b_e + s_i,p ·
    (x A_i,p,eᵀ) B_i,p,eᵀ`` with adapter i the token's. Outside ``adapter_batch`` and without
    ``adapter_ids`` the forward is ``base_layer``'s own (its ``experts_implementation``).
    """

    def __init__(self, experts: nn.Module, *, max_adapters: int, max_rank: int,
                 parameters: Sequence[str] = ("gate_up_proj", "down_proj")) -> None:
        super().__init__()
        check_experts_module(experts)
        self.max_adapters = check_positive_int(max_adapters, "max_adapters")
        self.max_rank = check_positive_int(max_rank, "max_rank")
        self.base_layer = experts
        self.num_experts = experts.num_experts
        self.up_name = "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"
        self.parameter_names = self._check_parameters(parameters)
        self.init_slot_table()
        # {name: (in, out)} of each adapted parameter, as its matmul uses them
        self.dims = {p: expert_parameter_dims(experts, p)[1:] for p in self.parameter_names}
        factory = {"device": getattr(experts, self.up_name).device, "dtype": getattr(experts, self.up_name).dtype}
        n, E, r = self.max_adapters, self.num_experts, self.max_rank
        # Inference only: the slot tables are frozen parameters (they travel with the module as
        # MultiLoRALinear's stacks do, and .to() / .half() treat them as weights).
        self.lora_A = nn.ParameterDict({p: nn.Parameter(torch.zeros(n, E, r, i, **factory), requires_grad=False)
                                        for p, (i, _) in self.dims.items()})
        self.lora_B = nn.ParameterDict({p: nn.Parameter(torch.zeros(n, E, o, r, **factory), requires_grad=False)
                                        for p, (_, o) in self.dims.items()})
        # Per (parameter, slot, expert): each slot's value repeated over its experts, so that the
        # delta op reads one [max_adapters · E] row per parameter as it is. Empty slots: rank 1,
        # scaling 0, zero weights.
        self.register_buffer("scalings", torch.zeros(len(self.dims), n, E, device=factory["device"]))
        self.register_buffer("ranks", torch.ones(len(self.dims), n, E, dtype=torch.int32,
                                                 device=factory["device"]))

    def _check_parameters(self, parameters) -> tuple[str, ...]:
        if isinstance(parameters, str) or not isinstance(parameters, Sequence) or not parameters:
            raise TypeError(f"parameters must be a non-empty sequence of parameter names, got {parameters!r}")
        allowed = (self.up_name, DOWN_PROJECTION)
        bad = [p for p in parameters if p not in allowed]
        if bad or len(set(parameters)) != len(parameters):
            raise ValueError(f"parameters {list(parameters)}: {type(self.base_layer).__name__}'s adaptable expert "
                             f"parameters are {list(allowed)}, each at most once")
        for p in parameters:
            expert_parameter_dims(self.base_layer, p)
        return tuple(p for p in allowed if p in parameters)  # the projections' order

    @classmethod
    def from_experts(cls, experts: nn.Module, *, max_adapters: int, max_rank: int,
                     parameters: Sequence[str] = ("gate_up_proj", "down_proj")) -> "MultiLoRAExperts":
        """Wrap an experts module (kept as ``base_layer``, not copied); ``parameters``: the 3-D
        parameters adapters may adapt."""
        return cls(experts, max_adapters=max_adapters, max_rank=max_rank, parameters=parameters)

    # ------------------------------------------------------------------ slots
    def slot_tensors(self, name: str, lora_A, lora_B) -> tuple:
        """The adapter's tables as given ({parameter: tensor} each, checked by check_adapter)."""
        return lora_A, lora_B

    def check_adapter(self, name: str, lora_A, lora_B, scaling) -> tuple[dict, dict]:
        """``({parameter: rank}, {parameter: scaling})`` of an adapter that fits this module.

        ``lora_A`` / ``lora_B``: mappings {parameter name: A [E, r, in]} / {name: B [E, out, r]}
        with the same keys, a subset of ``parameter_names`` (a parameter left out is not adapted);
        ``scaling``: one number, or a mapping with those keys."""
        self.check_adapter_name(name)
        for arg, value in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(value, Mapping):
                raise TypeError(f"adapter {name!r}: {arg} of an experts module must be a mapping {{parameter name: "
                                f"tensor}} (parameters {list(self.parameter_names)}), got {type(value).__name__}")
        if set(lora_A) != set(lora_B) or not lora_A or not set(lora_A) <= set(self.parameter_names):
            raise ValueError(f"adapter {name!r}: lora_A and lora_B must name the same parameters among "
                             f"{list(self.parameter_names)}, got {sorted(lora_A)} and {sorted(lora_B)}")
        scalings = scaling if isinstance(scaling, Mapping) else dict.fromkeys(lora_A, scaling)
        if set(scalings) != set(lora_A):
            raise ValueError(f"adapter {name!r}: scaling must be a number or name the parameters of lora_A "
                             f"{sorted(lora_A)}, got {sorted(scalings)}")
        ranks = {p: self._check_factors(name, p, lora_A[p], lora_B[p]) for p in lora_A}
        return ranks, {p: check_scaling(scalings[p]) for p in lora_A}

    def _check_factors(self, name: str, param: str, A, B) -> int:
        for arg, value in (("lora_A", A), ("lora_B", B)):
            if not isinstance(value, Tensor):
                raise TypeError(f"adapter {name!r}: {arg}[{param!r}] must be a torch.Tensor, got "
                                f"{type(value).__name__}")
        E, (in_features, out_features) = self.num_experts, self.dims[param]
        if A.dim() != 3 or B.dim() != 3 or tuple(A.shape[::2]) != (E, in_features) \
                or tuple(B.shape[:2]) != (E, out_features) or B.shape[2] != A.shape[1]:
            raise ValueError(f"adapter {name!r}: {param!r} needs lora_A [E={E}, r, in={in_features}] and lora_B "
                             f"[E={E}, out={out_features}, r], got {tuple(A.shape)} and {tuple(B.shape)}")
        r = A.shape[1]
        if not 1 <= r <= self.max_rank:
            raise ValueError(f"adapter {name!r} has rank {r} for {param!r} but this module holds ranks "
                             f"1..max_rank={self.max_rank} (shapes {tuple(A.shape)}, {tuple(B.shape)})")
        return r

    def add_adapter(self, name: str, lora_A: Mapping[str, Tensor], lora_B: Mapping[str, Tensor], scaling, *,
                    slot: Optional[int] = None, timeout: Optional[float] = None) -> int:
        """Load an adapter ({parameter: A [E, r, in]}, {parameter: B [E, out, r]}, scaling) into a
        slot; returns the slot. Hot swap, ``slot`` and ``timeout`` as ``MultiLoRALinear.add_adapter``."""
        return install({"": self}, name, {"": (lora_A, lora_B, scaling)}, slot=slot, timeout=timeout)

    def remove_adapter(self, name: str) -> None:
        """As ``MultiLoRALinear.remove_adapter``."""
        uninstall({"": self}, name)

    @torch.no_grad()
    def write_slot(self, slot: int, lora_A: Optional[Mapping[str, Tensor]] = None,
                   lora_B: Optional[Mapping[str, Tensor]] = None, scaling: Mapping[str, float] = None) -> None:
        """Slot ``slot`` := the adapter, or empty (zeros, rank 1, scaling 0) for every parameter it
        does not name. The raw write: serving/slots.py calls it under its lock (use add_adapter)."""
        for j, p in enumerate(self.parameter_names):
            self.lora_A[p][slot].zero_()
            self.lora_B[p][slot].zero_()
            adapted = lora_A is not None and p in lora_A
            r = lora_A[p].shape[1] if adapted else 1
            if adapted:
                self.lora_A[p][slot, :, :r].copy_(lora_A[p])
                self.lora_B[p][slot, :, :, :r].copy_(lora_B[p])
            self.scalings[j, slot] = scaling[p] if adapted else 0.0
            self.ranks[j, slot] = r

    # ---------------------------------------------------------------- forward
    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                adapter_ids: Optional[Tensor] = None) -> Tensor:
        """hidden_states [T, H], top_k_index / top_k_weights [T, k]; ``adapter_ids`` int [T] (slot
        per token, -1 = base), else the caller's open ``adapter_batch``, else ``base_layer``.
        Under ``torch.compile`` the routing lookup is a graph break: it is read when it runs."""
        if adapter_ids is not None:
            slots = self._checked_ids(adapter_ids, hidden_states)
        else:
            routing = ROUTES.get().get(id(self))
            if routing is None:
                return self.base_layer(hidden_states, top_k_index, top_k_weights)
            slots = self._batch_ids(routing, hidden_states)
        self._check_routing(hidden_states, top_k_index, top_k_weights)
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            raise RuntimeError("MultiLoRAExperts serves adapters for inference only (the LoRA term records no "
                               "gradient): run the forward under torch.no_grad() or torch.inference_mode()")
        return self._routed_forward(hidden_states, top_k_index, top_k_weights, slots)

    def _checked_ids(self, adapter_ids, x: Tensor) -> Tensor:
        try:
            ids = check_adapter_ids(adapter_ids, self.max_adapters, x.shape[0])
        except IndexError as e:
            raise ValueError(f"adapter_ids: {e}") from None
        if ids.device != x.device:
            raise ValueError(f"adapter_ids is on {ids.device} but hidden_states is on {x.device}")
        return ids

    def _batch_ids(self, routing, x: Tensor) -> Tensor:
        """Each token's slot: the MoE block flattens its [batch, seq, H] input row-major (as
        transformers' blocks do), so token t belongs to sequence t // seq."""
        batch = routing.sequence_ids.shape[0]
        if x.dim() != 2 or x.shape[0] % batch:
            raise ValueError(f"adapter_batch routes {batch} sequences but MultiLoRAExperts got hidden_states of "
                             f"shape {tuple(x.shape)}: it must be [batch · seq, H], the block's input flattened")
        # the batch's row plan for this shape (cached, shared with the MultiLoRALinear layers)
        return routing.plan_for(x.view(batch, x.shape[0] // batch, x.shape[1])).adapter_ids

    def _check_routing(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> None:
        if x.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape[0] != x.shape[0] \
                or tuple(top_k_weights.shape) != tuple(top_k_index.shape):
            raise ValueError(f"MultiLoRAExperts needs hidden_states [T, H], top_k_index and top_k_weights [T, k], "
                             f"got {tuple(x.shape)}, {tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}")

    @torch.no_grad()
    def _routed_forward(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, slots: Tensor) -> Tensor:
        """transformers' grouped experts forward (``grouped_mm_experts_forward``) with each
        adapted projection's LoRA term added by (adapter, expert) segment."""
        base, E = self.base_layer, self.num_experts
        plan = plan_experts(top_k_index, E)
        expert = top_k_index.reshape(-1).index_select(0, plan.order)
        live = (expert >= 0) & (expert < E)  # sentinels (expert parallelism) get no output
        slot = slots.index_select(0, plan.rows).to(torch.int64)
        pair_ids = torch.where(live & (slot >= 0), slot * E + expert, -1)
        lora_plan = plan_segments(pair_ids, self.max_adapters * E, validate=False)
        h = self._projection(self.up_name, x, plan, lora_plan, rows=True)
        h = base._apply_gate(h) if getattr(base, "has_gate", True) else base.act_fn(h)
        out = self._projection(DOWN_PROJECTION, h, plan, lora_plan, rows=False)
        if getattr(base, "has_post_expert_norm", False):
            out = base.post_expert_norm(out)
        weights = torch.where(live, top_k_weights.reshape(-1).index_select(0, plan.order), 0)
        out = out * weights.unsqueeze(-1).to(out.dtype)
        # back to (token, k) order, summed over k (transformers' deterministic reduction)
        final = out.index_select(0, plan.position).view(x.shape[0], plan.top_k, out.shape[-1]).sum(dim=1)
        return final.to(x.dtype)

    def _projection(self, name: str, x: Tensor, plan: ExpertPlan, lora_plan, *, rows: bool) -> Tensor:
        """One projection in sorted pair order: the grouped base, plus the adapters' term if adapted."""
        base = self.base_layer
        param = getattr(base, name)
        weight = param.transpose(1, 2) if getattr(base, "is_transposed", False) else param
        bias = getattr(base, f"{name}_bias") if getattr(base, "has_bias", False) else None
        y = grouped_linear_sorted(x, weight, bias, plan, rows=rows)
        if name in self.dims:
            j = self.parameter_names.index(name)
            n = self.max_adapters * self.num_experts
            A, B = self.lora_A[name], self.lora_B[name]
            # The delta op reads x by row position, not through an index: the first projection's
            # LoRA shrink takes the gathered pair rows (the base above reads x through plan.rows).
            x_pairs = x.index_select(0, plan.rows) if rows else x
            add_lora(y, x_pairs, A.view(n, *A.shape[2:]), B.view(n, *B.shape[2:]), lora_plan,
                     self.scalings[j].view(n), ranks=self.ranks[j].view(n))
        return y

    def extra_repr(self) -> str:
        return (f"parameters={list(self.parameter_names)}, max_adapters={self.max_adapters}, "
                f"max_rank={self.max_rank}, adapters={self.adapter_names}")
