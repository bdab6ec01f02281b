"""``MultiLoRAExperts``: a transformers experts module serving many expert adapters at once.

The serving counterpart of ``MultiLoRALinear`` for the 3-D expert parameters of an MoE block
(``gate_up_proj`` [E, 2I, H] or ``up_proj``, and ``down_proj`` [E, H, I]; ``forward(hidden_states,
top_k_index, top_k_weights)`` kept). Per adapted parameter p it holds slot tables
``lora.<p>.lora_A`` [max_adapters, E, max_rank, in] and ``lora.<p>.lora_B`` [max_adapters, E, out,
max_rank] (in / out as the expert's matmul uses them; ``LoRAExperts``' keys, with a slot axis),
and per (parameter, slot, expert) a scaling and a rank: an adapter's slot holds one A [E, r, in]
and B [E, out, r] per parameter. The slot lifetime (add, hot swap while batches pin a slot,
remove, ``timeout=``) and the routing (``adapter_batch``) are ``MultiLoRALinear``'s:
``lora_fused.serving``.

In a batch each token uses its own adapter (or none: the base model) and each (token, k) pair
its expert. The forward is ``LoRAExperts``' (``modules.experts.grouped_experts_forward``): the
pairs sorted by expert once (``ops.grouped.plan_experts``), the base of each projection grouped
over them (``grouped_linear_sorted``); the LoRA term here is the segmented delta op
(``ops.delta.add_lora``) over segments keyed by (adapter, expert): id slot · E + expert per
sorted pair (-1: no adapter), the slot tables viewed as [max_adapters · E, ...] stacks.
Inference only: nothing is recorded for autograd.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .experts import (DOWN, check_experts_module, check_target_parameters, expert_parameter_names,
                      grouped_experts_forward, matmul_shape, projection_operands)
from ..dispatch.segments import SegmentPlan, check_adapter_ids, plan_segments
from ..ops.delta import add_lora
from ..ops.grouped import ExpertPlan, grouped_linear_sorted, plan_experts
from ..serving.routing import ROUTES
from ..serving.slots import AdapterSlots, install, uninstall
from ..validation import check_positive_int, check_scaling

class ExpertSlots(nn.Module):
    """One adapted parameter's slot tables: ``lora_A`` [max_adapters, E, max_rank, in] and ``lora_B``
    [max_adapters, E, out, max_rank] (a module of its own, so the state-dict keys end in
    ``lora_A`` / ``lora_B`` as every lora-fused factor's, and as ``LoRAExperts``' do). Buffers,
    not parameters: the module serves (no optimizer or ``requires_grad`` switch reaches them)."""

    def __init__(self, n_slots: int, num_experts: int, out_features: int, in_features: int, max_rank: int,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("lora_A", torch.zeros(n_slots, num_experts, max_rank, in_features, **factory))
        self.register_buffer("lora_B", torch.zeros(n_slots, num_experts, out_features, max_rank, **factory))


class MultiLoRAExperts(AdapterSlots, nn.Module):
    """``base_layer`` (the experts module, its forward and weights as they were) plus adapter slots.

    Per (token t, chosen expert e) and adapted parameter p: ``x W_eᵀ + b_e + s_i,p ·
    (x A_i,p,eᵀ) B_i,p,eᵀ`` with adapter i the token's. Outside ``adapter_batch`` and without
    ``adapter_ids`` the forward is ``base_layer``'s own (its ``experts_implementation``).
    """

    def __init__(self, experts: nn.Module, *, max_adapters: int, max_rank: int,
                 parameters: Optional[Sequence[str]] = None) -> None:
        check_experts_module(experts)
        parameters = check_target_parameters(experts, expert_parameter_names(experts) if parameters is None
                                             else parameters)
        super().__init__()
        self.max_adapters = check_positive_int(max_adapters, "max_adapters")
        self.max_rank = check_positive_int(max_rank, "max_rank")
        self.base_layer = experts
        self.num_experts = experts._parameters[DOWN].shape[0]
        self.parameter_names = tuple(p for p in expert_parameter_names(experts) if p in parameters)  # call order
        self.init_slot_table()
        # {name: (in, out)} of each adapted parameter, as its matmul uses them
        self.dims = {p: matmul_shape(experts, experts._parameters[p])[::-1] for p in self.parameter_names}
        first = experts._parameters[self.parameter_names[0]]
        factory = {"device": first.device, "dtype": first.dtype}
        n, E = self.max_adapters, self.num_experts
        self.lora = nn.ModuleDict({p: ExpertSlots(n, E, out_f, in_f, self.max_rank, **factory)
                                   for p, (in_f, out_f) in self.dims.items()})
        # Per (parameter, slot, expert): each slot's value repeated over its experts, so that the
        # delta op reads one [max_adapters · E] row per parameter as it is. Empty slots: rank 1,
        # scaling 0, zero weights.
        self.register_buffer("scalings", torch.zeros(len(self.dims), n, E, device=first.device))
        self.register_buffer("ranks", torch.ones(len(self.dims), n, E, dtype=torch.int32, device=first.device))
        for param in experts.parameters():
            param.requires_grad_(False)

    @classmethod
    def from_experts(cls, experts: nn.Module, *, max_adapters: int, max_rank: int,
                     parameters: Optional[Sequence[str]] = None) -> "MultiLoRAExperts":
        """Wrap an experts module (kept as ``base_layer``, not copied); ``parameters``: the 3-D
        parameters adapters may adapt (default: both projections, as ``LoRAExperts``)."""
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
            tables = self.lora[p]
            tables.lora_A[slot].zero_()
            tables.lora_B[slot].zero_()
            adapted = lora_A is not None and p in lora_A
            r = lora_A[p].shape[1] if adapted else 1
            if adapted:
                tables.lora_A[slot, :, :r].copy_(lora_A[p])
                tables.lora_B[slot, :, :, :r].copy_(lora_B[p])
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
        """``LoRAExperts``' grouped forward, each adapted projection's LoRA term added by
        (adapter, expert) segment: id slot · E + expert per sorted pair, -1 for a base token's
        pairs and for sentinels (an expert id outside [0, E): no output, as the grouped op gives)."""
        E = self.num_experts
        plan = plan_experts(top_k_index, E)
        expert = top_k_index.reshape(-1).index_select(0, plan.order)
        slot = slots.index_select(0, plan.rows).to(torch.int64)
        pair_ids = torch.where((expert >= 0) & (expert < E) & (slot >= 0), slot * E + expert, -1)
        lora_plan = plan_segments(pair_ids, self.max_adapters * E, validate=False)
        return grouped_experts_forward(self.base_layer, x, top_k_weights, plan, self._projection, lora_plan)

    def _projection(self, name: str, x: Tensor, plan: ExpertPlan, lora_plan: SegmentPlan, *, rows: bool) -> Tensor:
        """One projection in sorted pair order: the grouped base, plus the adapters' term if adapted."""
        weight, bias, x = projection_operands(self.base_layer, name, x)
        y = grouped_linear_sorted(x, weight, bias, plan, rows=rows)
        tables = self.lora._modules.get(name)
        if tables is not None:
            j = self.parameter_names.index(name)
            n = self.max_adapters * self.num_experts
            A, B = tables.lora_A, tables.lora_B
            # The delta op reads x by row position, not through an index: the first projection's
            # LoRA shrink takes the gathered pair rows (the base above reads x through plan.rows).
            x_pairs = x.index_select(0, plan.rows) if rows else x
            add_lora(y, x_pairs, A.view(n, *A.shape[2:]), B.view(n, *B.shape[2:]), lora_plan,
                     self.scalings[j].view(n), ranks=self.ranks[j].view(n))
        return y

    def extra_repr(self) -> str:
        return (f"parameters={list(self.parameter_names)}, max_adapters={self.max_adapters}, "
                f"max_rank={self.max_rank}, adapters={self.adapter_names}")
