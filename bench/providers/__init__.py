"""The implementations compared, each a callable over the same random inputs.

One module per family of cases, each with the same interface (bench/providers/base.py):

  linear   single-adapter cases: base, fused, fused_kernel, shrink_first, composite, eager,
           merged, compiled, peft
  multi    multi-adapter cases (``adapters > 0``): base, fused, fused-cublas, loop, peft-mixed
  qlora    QLoRA cases (``quant``: a bitsandbytes 4-bit W0): base, fused, eager-qlora, peft-qlora
  dora     DoRA cases (``dora``): base, fused, fused-lora, peft-dora
  serving  serving cases (``slices``: the delta alone): base, packed, three-calls, vllm, sglang
  moe      MoE cases (``experts``: one experts block): base, fused, eager-loop, peft-moe

In every family, ``base`` is the floor the family is compared against and ``fused`` is
lora-fused's own implementation with its default choices; see each module for the rest.
This module only picks the family of a case and forwards to it.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from ..cases import Case
from . import dora, linear, moe, multi, qlora, serving
from .base import Bound, InputSet, peft_status
from .linear import compile_status
from .multi import ORACLE_MAX_ROWS, multi_scalings

SINGLE_PROVIDERS = linear.PROVIDERS
MULTI_PROVIDERS = multi.PROVIDERS
QLORA_PROVIDERS = qlora.PROVIDERS
DORA_PROVIDERS = dora.PROVIDERS
SERVING_PROVIDERS = serving.PROVIDERS
MOE_PROVIDERS = moe.PROVIDERS
ALL_PROVIDERS = tuple(dict.fromkeys(SINGLE_PROVIDERS + MULTI_PROVIDERS + QLORA_PROVIDERS + DORA_PROVIDERS
                                    + SERVING_PROVIDERS + MOE_PROVIDERS))
DESCRIPTIONS = {**linear.DESCRIPTIONS, **multi.DESCRIPTIONS, **qlora.DESCRIPTIONS, **dora.DESCRIPTIONS,
                **serving.DESCRIPTIONS, **moe.DESCRIPTIONS}

__all__ = [
    "ALL_PROVIDERS", "DESCRIPTIONS", "DORA_PROVIDERS", "MOE_PROVIDERS", "MULTI_PROVIDERS", "ORACLE_MAX_ROWS",
    "QLORA_PROVIDERS", "SERVING_PROVIDERS", "SINGLE_PROVIDERS", "Bound", "InputSet", "applies", "bind", "compile_status", "family",
    "input_set_bytes", "make_input_sets", "multi_scalings", "peft_status", "provider_unavailable",
    "reference_grads", "reference_outputs",
]


def family(case: Case) -> ModuleType:
    """The provider module of ``case``: moe, dora, serving, qlora, multi or linear, in that order."""
    if getattr(case, "experts", 0):
        return moe
    if getattr(case, "dora", False):
        return dora
    if getattr(case, "slices", ()):
        return serving
    if getattr(case, "quant", ""):
        return qlora
    if case.multi:
        return multi
    return linear


def applies(provider: str, case: Case) -> bool:
    """Whether ``provider`` has a row for ``case``."""
    fam = family(case)
    if fam in (linear, multi):
        return fam.applies(provider, case)
    return provider in fam.PROVIDERS


def provider_unavailable(provider: str, case: Case) -> Optional[str]:
    """Why ``provider`` has an n/a row for ``case`` (None when it runs): PEFT's mixed batch
    in a training mode."""
    return multi.provider_unavailable(provider, case) if family(case) is multi else None


def make_input_sets(case: Case, device: torch.device, n_sets: int, *, seed: int = 0) -> list[InputSet]:
    """Random inputs scaled so every term of y is O(1); never zeros (lora_B included)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return family(case).make_sets(case, device, n_sets, g)


def input_set_bytes(case: Case, read_only: bool = False) -> int:
    """Bytes of one input set (``read_only``: only what every LoRA call reads: x, W, A, B)."""
    return family(case).set_bytes(case, read_only)


def bind(provider: str, case: Case, st: InputSet, *, training: bool) -> Bound:
    """``provider`` over input set ``st``. In training, x (and the LoRA weights of LoRA
    providers) become fresh leaves that require grad; W and b stay frozen."""
    return family(case).bind(provider, case, st, training=training)


def reference_outputs(case: Case, st: InputSet, provider: str) -> list:
    """What ``provider`` must output on set ``st`` (fp32 eager, or float64; see each family)."""
    return family(case).reference_outputs(case, st, provider)


def reference_grads(case: Case, st: InputSet, provider: str) -> list:
    """[dX, dA, dB, ...] that ``provider`` must give on set ``st``, dropout 0 (see each family)."""
    return family(case).reference_grads(case, st, provider)
