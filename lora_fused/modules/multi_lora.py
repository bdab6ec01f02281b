"""``MultiLoRALinear``: an ``nn.Linear`` serving (and training) many adapters at once.

It holds named adapter *slots*: stacks ``lora_A`` [max_adapters, max_rank, in] and ``lora_B``
[max_adapters, out, max_rank], per-slot ``scalings`` and ``ranks``. A packed projection (one
``qkv_proj`` for q|k|v, built with ``slices=(w_q, w_k, w_v)``) keeps one A per slice, ``lora_A``
[max_adapters, S, max_rank, in], and one ``lora_B`` [max_adapters, out, max_rank] whose rows
o_j .. o_j+w_j are slice j's B. Adding, replacing (hot swap) or removing an adapter writes into
those buffers in place: nothing is re-allocated, so a ``torch.compile``d model does not
recompile and a captured CUDA graph sees it.

Below the layer, ``lora_fused.serving``: ``routing`` (which slot each row reads, per caller)
and ``slots`` (slot lifetime: install, hot swap, pinning). Above it, the model-level API in
``lora_fused.adapters.multi_lora`` (``inject_multi_lora``, ``add_adapter``, ``adapter_batch``)
and ``lora_fused.adapters.peft_slots`` (PEFT adapters in and out of slots). The concurrency
contract: docs/serving.md.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.compiler import is_compiling  # bound once: an attribute lookup less per eager forward

from ..dispatch.segments import SegmentPlan
from ..ops.delta import check_slices
from ..ops.multi_lora import checked_multi_lora, packed_multi_lora_linear
from .._compat import any_autocast_enabled
from ..ops.lora_linear import autocast_dtype, cast_all
from ..serving.routing import ROUTES, traced_plan
from ..serving.slots import AdapterSlots, install, uninstall
from ..validation import check_positive_int, check_scaling


class MultiLoRALinear(AdapterSlots, nn.Linear):
    """``y[t] = x[t] W0ᵀ + b + s_i · (x[t] A_iᵀ) B_iᵀ`` with adapter i chosen per row.

    With ``slices`` (S output widths summing to out_features: a packed projection such as
    q|k|v) each adapter has one A per slice and slice j of y adds
    ``s_i · (x[t] A_{i,j}ᵀ) B_i[o_j:o_j+w_j]ᵀ`` (``lf.multi_lora_linear(..., slices=...)``).

    The base weight and bias are frozen; ``lora_A`` / ``lora_B`` are parameters
    (one batch can train several adapters: each slot gets the gradient of its
    own rows only). Outside ``adapter_batch`` and without ``adapter_ids`` the
    layer is the base ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, max_adapters: int,
                 max_rank: int, slices: Optional[Sequence[int]] = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.max_adapters = check_positive_int(max_adapters, "max_adapters")
        self.max_rank = check_positive_int(max_rank, "max_rank")
        # None: one slice (lora_A [max_adapters, max_rank, in]); else the packed widths.
        self.slices: Optional[tuple[int, ...]] = None
        if slices is not None:
            try:
                self.slices = check_slices(slices, out_features, len(slices) if isinstance(slices, Sequence) else 1)
            except ValueError as e:  # the layer's words: its out_features, not lora_B / y
                raise ValueError(f"slices {slices!r} must be positive output widths summing to out_features="
                                 f"{out_features}: {e}") from None
        self.init_slot_table()
        self._attach_slots()

    def _attach_slots(self) -> None:
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        packed = () if self.slices is None else (len(self.slices),)
        self.lora_A = nn.Parameter(torch.zeros(self.max_adapters, *packed, self.max_rank, self.in_features,
                                               **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.max_adapters, self.out_features, self.max_rank, **factory))
        # Empty slots: rank 1, scaling 0, zero weights (no row should route there; if one does, it adds 0).
        self.register_buffer("scalings", torch.zeros(self.max_adapters, device=self.weight.device))
        self.register_buffer("ranks", torch.ones(self.max_adapters, dtype=torch.int32, device=self.weight.device))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, max_adapters: int, max_rank: int,
                    slices: Optional[Sequence[int]] = None) -> "MultiLoRALinear":
        """Wrap an existing ``nn.Linear``: its weight and bias are reused (not copied) and frozen.
        ``slices``: the output widths of a packed projection (e.g. ``(q, k, v)`` of a ``qkv_proj``),
        summing to ``linear.out_features``; each adapter then has one A per slice."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    max_adapters=max_adapters, max_rank=max_rank, slices=slices, device="meta",
                    dtype=linear.weight.dtype)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._attach_slots()  # on the base's device, without a copy of W0
        return layer

    # ------------------------------------------------------------------ slots
    def slot_tensors(self, name: str, lora_A, lora_B) -> tuple:
        """A packed layer's per-slice A / B given as sequences, stacked to the slot layout:
        S tensors [r, in] -> lora_A [S, r, in]; S tensors [w_j, r] -> lora_B [out, r] (rows of slice
        j at o_j). Tensors, and any adapter of an unpacked layer, are returned as they are."""
        if self.slices is None:
            return lora_A, lora_B
        parts = []
        for arg, value, join in (("lora_A", lora_A, torch.stack), ("lora_B", lora_B, torch.cat)):
            if isinstance(value, (list, tuple)):
                if len(value) != len(self.slices) or not all(isinstance(v, Tensor) and v.dim() == 2 for v in value):
                    raise ValueError(f"adapter {name!r}: {arg} given as a sequence must hold one 2-D tensor per "
                                     f"slice (slices={self.slices}), got {len(value)} items")
                shapes = [tuple(v.shape) for v in value]
                # one rank for all slices: A's shapes all equal, B's widths the slices and one rank
                if arg == "lora_A":
                    bad = len(set(shapes)) != 1
                else:
                    bad = [w for w, _ in shapes] != list(self.slices) or len({r for _, r in shapes}) != 1
                if bad:
                    want = "[r, in] each, one r" if arg == "lora_A" else "[w_j, r] with w_j = slices[j], one r"
                    raise ValueError(f"adapter {name!r}: the slices' {arg} must be {want}, got shapes {shapes} "
                                     f"(slices={self.slices})")
                value = join(list(value))
            parts.append(value)
        return tuple(parts)

    def check_adapter(self, name: str, lora_A: Tensor, lora_B: Tensor, scaling) -> tuple[int, float]:
        """``(rank, scaling)`` of an adapter that fits this layer; ValueError/TypeError otherwise."""
        self.check_adapter_name(name)
        for arg, value in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(value, Tensor):
                raise TypeError(f"adapter {name!r}: {arg} must be a torch.Tensor, got {type(value).__name__}")
        scaling = check_scaling(scaling)
        if self.slices is not None:
            S = len(self.slices)
            if lora_A.dim() != 3 or lora_A.shape[0] != S or lora_A.shape[2] != self.in_features \
                    or lora_B.dim() != 2 or lora_B.shape[0] != self.out_features or lora_B.shape[1] != lora_A.shape[1]:
                raise ValueError(f"adapter {name!r}: this layer is packed (slices={self.slices}), so lora_A must be "
                                 f"[S={S}, r, in_features={self.in_features}] (or S tensors [r, in]) and lora_B "
                                 f"[out_features={self.out_features}, r] (or S tensors [w_j, r], w_j = slices[j]), "
                                 f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
        elif lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != self.in_features \
                or lora_B.shape[0] != self.out_features or lora_B.shape[1] != lora_A.shape[0]:
            raise ValueError(f"adapter {name!r}: lora_A must be [r, in_features={self.in_features}] and "
                             f"lora_B [out_features={self.out_features}, r], got {tuple(lora_A.shape)} and "
                             f"{tuple(lora_B.shape)}")
        r = lora_A.shape[-2]
        if not 1 <= r <= self.max_rank:
            raise ValueError(f"adapter {name!r} has rank {r} but this layer holds ranks 1..max_rank="
                             f"{self.max_rank} (shapes {tuple(lora_A.shape)}, {tuple(lora_B.shape)})")
        return r, scaling

    def add_adapter(self, name: str, lora_A: Tensor, lora_B: Tensor, scaling: float, *,
                    slot: Optional[int] = None, timeout: Optional[float] = None) -> int:
        """Load an adapter (A [r, in], B [out, r], r <= max_rank) into a slot; returns the slot.

        A packed layer (``slices`` set) takes lora_A [S, r, in] (slice j's A at [j]) or a
        sequence of S tensors [r, in], and lora_B [out, r] (slice j's B in rows o_j .. o_j+w_j)
        or a sequence of S tensors [w_j, r]: one rank r and one scaling for all slices (a
        slice the adapter does not adapt is given zeros).

        A name already loaded is replaced (hot swap): in place, or, while an open
        ``adapter_batch`` pins it, into a free slot (the open batches keep the old
        weights until they exit). Otherwise ``slot`` (default: the first free one)
        must be free. The slot's padding past rank r is zeroed; other slots are untouched.
        With no slot usable while open batches pin one, waits as :func:`add_adapter` (``timeout``).
        """
        return install({"": self}, name, {"": (lora_A, lora_B, scaling)}, slot=slot, timeout=timeout)

    def remove_adapter(self, name: str) -> None:
        """Forget the adapter's name and empty its slot (zeros, rank 1, scaling 0); while an open
        ``adapter_batch`` pins the slot, it is emptied when reused, after that batch exits."""
        uninstall({"": self}, name)

    @torch.no_grad()
    def write_slot(self, slot: int, lora_A: Optional[Tensor] = None, lora_B: Optional[Tensor] = None,
                   scaling: float = 0.0) -> None:
        """Slot ``slot`` := the adapter (A, B, scaling), or empty (zeros, rank 1, scaling 0). The raw
        write, unchecked and unpublished: serving/slots.py calls it under its lock (use add_adapter)."""
        r = 1 if lora_A is None else lora_A.shape[-2]
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if lora_A is not None:
            self.lora_A[slot, ..., :r, :].copy_(lora_A)
            self.lora_B[slot, :, :r].copy_(lora_B)
        self.scalings[slot] = scaling
        self.ranks[slot] = r

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, adapter_ids: Union[Tensor, SegmentPlan, None] = None) -> Tensor:
        """x [..., in]; ``adapter_ids`` (slot per row, -1 = base) or a plan, else the
        routing of the caller's open ``adapter_batch``, else the base layer."""
        route = adapter_ids
        if route is None:
            if is_compiling():
                if self.batch_routed:  # the routing is read when the graph runs, not when it is traced
                    route = traced_plan(x, id(self), self.max_adapters)
            else:
                routing = ROUTES.get().get(id(self))
                if routing is not None:
                    route = routing.plan_for(x)
            if route is None:
                return F.linear(x, self.weight, self.bias)
        # Straight from the dicts (Module.__getattr__ costs ~0.5 µs a name); a name moved
        # elsewhere (a parametrization, say) takes the attribute route.
        params, buffers = self._parameters, self._buffers
        try:
            weight, bias, lora_A, lora_B = params["weight"], params["bias"], params["lora_A"], params["lora_B"]
            scalings, ranks = buffers["scalings"], buffers["ranks"]
        except KeyError:
            weight, bias, lora_A, lora_B = self.weight, self.bias, self.lora_A, self.lora_B
            scalings, ranks = self.scalings, self.ranks
        if any_autocast_enabled():  # one call; then autocast's dtype for x's device, as F.linear would
            dtype = autocast_dtype(x)
            if dtype is not None:
                x, weight, bias, lora_A, lora_B = cast_all(dtype, x, weight, bias, lora_A, lora_B)
        if self.slices is not None:  # one A per slice: the packed op (checks its arguments per call)
            return packed_multi_lora_linear(x, weight, lora_A, lora_B, route, scalings, bias, ranks=ranks,
                                            slices=self.slices)
        # The slots' ranks were checked by add_adapter: no host read of them per call.
        return checked_multi_lora(x, weight, lora_A, lora_B, route, scalings, bias, ranks, False)

    def extra_repr(self) -> str:
        packed = "" if self.slices is None else f", slices={self.slices}"
        return (f"{super().extra_repr()}, max_adapters={self.max_adapters}, max_rank={self.max_rank}{packed}, "
                f"adapters={self.adapter_names}")

