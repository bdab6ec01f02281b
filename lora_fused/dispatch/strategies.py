"""Strategies: several ways to compute the same LoRA op, and which one runs.

Every op keeps more than one implementation of the same numbers (docs/design.md,
"Strategies and the measured choice"); all draw the same dropout mask from the same
seed, so they agree to rounding.

Single adapter (``lf.lora_linear``, ``LoRALinear``):

- forward ``"fused"``: one Triton GEMM whose K loop also accumulates S = X·Aᵀ
  (exists without dropout and for padded ranks <= 32; elsewhere it runs as
  ``"shrink_first"``).
- forward ``"shrink_first"``: a Triton shrink (dropout inside) writes S, then a
  Triton GEMM starts its accumulator from s·S·Bᵀ.
- forward ``"composite"``: the Triton shrink, the vendor GEMM (cuBLAS/hipBLAS via
  ``torch.nn.functional.linear``) for X·W0ᵀ + b, then a Triton kernel adds s·S·Bᵀ
  into y in place.
- backward ``"fused"``: the Triton dX GEMM starting from keep/(1-p) ⊙ dS·A.
- backward ``"composite"``: the vendor GEMM dY·W0, then a Triton kernel adds
  keep/(1-p) ⊙ dS·A into dX in place. dS, dB, dA are the same kernels in both.

Multi-adapter (``lf.multi_lora_linear``): the regime of the segment plan,
``"prefill"`` (one grouped GEMM computes base and LoRA), ``"prefill_cublas"``
(vendor GEMM for the base, Triton adds the LoRA term) or ``"decode"`` (split-K
shrink, vendor base GEMM, Triton expand-add).

Grouped expert LoRA (``kernels/moe_lora.py``): ``"grouped_mm"`` (the base by torch's vendor
grouped GEMM, the LoRA term and bias added by a Triton epilogue) or ``"fused"`` (a Triton
grouped GEMM with the LoRA term in its epilogue), forward and dX alike.

``"auto"`` (the default) is the measured choice of :mod:`lora_fused.dispatch.tuning`.
``use_strategy`` forces a choice for the code it wraps, in this thread (or task)
only: it sets a ``contextvars.ContextVar``, so concurrent threads and asyncio
tasks each see their own. Nothing here imports triton: the strategies' names are
``kernels/host.py``'s (the kernels branch on them), which imports no triton either.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, replace
from typing import Iterator, Optional

from .backend import BACKWARD_STRATEGIES, FORWARD_STRATEGIES, GROUPED_STRATEGIES, MULTI_LORA_STRATEGIES

AUTO = "auto"


@dataclass(frozen=True)
class StrategyChoice:
    """What ``use_strategy`` forced, per op; ``"auto"`` = the measured or heuristic choice."""
    forward: str = AUTO
    backward: str = AUTO
    multi_lora: str = AUTO
    grouped: str = AUTO


#: The choice in force in this thread or task. Set it only through :func:`use_strategy`; the
#: per-call paths read it as ``CURRENT.get()`` (one call less than :func:`current_strategy`).
CURRENT: contextvars.ContextVar[StrategyChoice] = contextvars.ContextVar("lora_fused_strategy",
                                                                        default=StrategyChoice())


def available_strategies() -> dict[str, tuple[str, ...]]:
    """Each op's strategies, by the name ``use_strategy`` takes for it:
    ``{"forward": ("fused", "shrink_first", "composite"), "backward": ("fused", "composite"),
    "multi_lora": ("prefill", "prefill_cublas", "decode"), "grouped": ("grouped_mm", "fused")}``."""
    return {"forward": FORWARD_STRATEGIES, "backward": BACKWARD_STRATEGIES, "multi_lora": MULTI_LORA_STRATEGIES,
            "grouped": GROUPED_STRATEGIES}


def current_strategy() -> StrategyChoice:
    """The choice in force here (one ContextVar lookup)."""
    return CURRENT.get()


def _checked(argument: str, value: Optional[str], allowed: tuple[str, ...]) -> Optional[str]:
    if value is None or value == AUTO or value in allowed:
        return value
    raise ValueError(f"use_strategy: {argument} must be one of {(AUTO,) + allowed}, got {value!r}")


@contextlib.contextmanager
def use_strategy(forward: Optional[str] = None, backward: Optional[str] = None, *,
                 multi_lora: Optional[str] = None, grouped: Optional[str] = None) -> Iterator[StrategyChoice]:
    """Force strategies inside the ``with`` block (tests, benchmarks).

    ``"auto"`` restores the default; None keeps what an enclosing block chose.
    An unknown name raises ValueError naming the argument and the allowed values.
    The backward of an op follows the choice in force when the op ran forward.
    """
    changes = {name: value for name, value in (
        ("forward", _checked("forward", forward, FORWARD_STRATEGIES)),
        ("backward", _checked("backward", backward, BACKWARD_STRATEGIES)),
        ("multi_lora", _checked("multi_lora", multi_lora, MULTI_LORA_STRATEGIES)),
        ("grouped", _checked("grouped", grouped, GROUPED_STRATEGIES))) if value is not None}
    choice = replace(CURRENT.get(), **changes)
    token = CURRENT.set(choice)
    try:
        yield choice
    finally:
        CURRENT.reset(token)


def forced_regime() -> Optional[str]:
    """The multi-adapter regime ``use_strategy(multi_lora=...)`` forces here, else None
    (``plan_segments`` then picks by the number of rows)."""
    forced = CURRENT.get().multi_lora
    return None if forced == AUTO else forced
