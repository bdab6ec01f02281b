"""What every provider family shares: the input set, a provider bound to one, random data.

A provider family (``linear``, ``multi``, ``qlora``, ``dora``, ``serving``) is one module of
this package holding, for its kind of case, the same six things: ``PROVIDERS`` (its names, in
table order), ``DESCRIPTIONS``, ``make_sets``, ``set_bytes``, ``bind`` and the float64 or fp32
references ``reference_outputs`` / ``reference_grads``. Families import this module (and
``linear`` for the loralib-style eager function); nothing here imports a family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..cases import Case
from ..measure import TORCH_DTYPES

#: Providers that do nothing LoRA: no LoRA leaves, no dropout.
NO_LORA = ("base", "merged")


@dataclass
class Layer:
    """One projection's weights: frozen W (and b), LoRA A/B, and W0 + s·B·A."""
    W: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    b: Optional[torch.Tensor] = None
    Wm: Optional[torch.Tensor] = None


@dataclass
class InputSet:
    x: torch.Tensor
    layers: list
    dy: list = field(default_factory=list)   # upstream gradients, one per projection (training)


@dataclass
class Bound:
    """A provider bound to one input set: ``run()`` computes every projection's output."""
    run: Callable[[], list]
    x: torch.Tensor                       # the input as the provider sees it (a leaf in training)
    lora: list                            # per projection (A, B) as the provider sees them
    dy: list
    leaves: list                          # tensors whose .grad is reset between calls
    params: list                          # storages not to count as saved activations
    modules: list = field(default_factory=list)
    graph: bool = True                    # run() can be captured in a CUDA graph
    grads_fn: Optional[Callable[[], list]] = None   # grads() where the leaves are not [x, A, B, ...]

    def grads(self) -> list:
        """[dX, dA_0, dB_0, ...] after a backward (the base provider: [dX])."""
        if self.grads_fn is not None:
            return self.grads_fn()
        out = [self.x.grad]
        for A, B in self.lora:
            out += [A.grad, B.grad]
        return out


def random_fn(g: torch.Generator, device: torch.device, dtype: torch.dtype) -> Callable:
    """``rand(*size, scale=1.0, dtype=dtype)``: N(0, 1) drawn in fp32 from ``g``, times
    ``scale``, cast to ``dtype`` (every family draws through it, so a seed gives one data set)."""
    def rand(*size, scale=1.0, dtype=dtype):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)
    return rand


def random_projection(rand: Callable, case: Case, lora_dtype: Optional[torch.dtype] = None) -> tuple:
    """(W [N, K], A [r, K], B [N, r], b [N] or None), scaled so every term of y is O(1);
    A and B in ``lora_dtype`` (default: the case's dtype). Never zeros (lora_B included)."""
    lora = {} if lora_dtype is None else {"dtype": lora_dtype}
    W = rand(case.N, case.K, scale=case.K ** -0.5)
    A = rand(case.r, case.K, scale=case.K ** -0.5, **lora)
    B = rand(case.N, case.r, scale=case.r ** -0.5, **lora)
    b = rand(case.N) if case.bias else None
    return W, A, B, b


def input_set(rand: Callable, case: Case, layers: list) -> InputSet:
    """The input set over ``layers``: x [M, K] and, in training, one upstream gradient
    dy [M, N] per projection (drawn after the weights, in that order)."""
    st = InputSet(rand(case.M, case.K), layers)
    if case.training:
        st.dy = [rand(case.M, case.N) for _ in layers]
    return st


def element_size(case: Case) -> int:
    """Bytes per element of the case's dtype."""
    return torch.empty((), dtype=TORCH_DTYPES[case.dtype]).element_size()


def peft_status() -> tuple[Optional[str], str]:
    """(reason PEFT's providers cannot run or None, label with version), checked once per run."""
    try:
        import peft
    except Exception as exc:  # ImportError, or a broken transformers underneath
        return f"peft not importable ({type(exc).__name__}: {exc})"[:200], ""
    return None, f"peft {peft.__version__}"
