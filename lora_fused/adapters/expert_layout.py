"""Expert LoRA factors: PEFT's ``ParamWrapper`` layout and lora-fused's, both ways.

lora-fused keeps, per targeted 3-D expert parameter, A [E, r, in] and B [E, out, r], with
``in`` / ``out`` as the expert's matmul uses them (whatever the parameter's storage order).
PEFT's ``ParamWrapper`` keeps two ``nn.Linear`` weights: ``lora_A.weight`` [E·r, in] (expert e's
rows e·r ... e·r + r − 1) and ``lora_B.weight`` [out, r·E] (expert e's columns e, e + E, ...:
PEFT reshapes it to [out, r, E]), for both storage orders ([E, out, in], and [E, in, out]
with ``is_transposed``), see its ``get_delta_weight``. The conversion is a reshape and a
permutation: no product of the factors is formed.
"""
from __future__ import annotations

from torch import Tensor


def _check_2d(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (PEFT's ParamWrapper layout), got shape {tuple(t.shape)}")


def from_peft_factors(lora_A_weight: Tensor, lora_B_weight: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(A [E, r, in], B [E, out, r]) from PEFT's ``lora_A.weight`` [E·r, in] and ``lora_B.weight``
    [out, r·E]; contiguous copies, so that the caller may train them in place."""
    _check_2d("lora_A.weight", lora_A_weight)
    _check_2d("lora_B.weight", lora_B_weight)
    E = num_experts
    rows, cols = lora_A_weight.shape[0], lora_B_weight.shape[1]
    if E <= 0 or rows % E or rows != cols:
        raise ValueError(f"PEFT expert factors for {E} experts need lora_A.weight [E·r, in] and lora_B.weight "
                         f"[out, r·E] with the same E·r, got lora_A.weight {tuple(lora_A_weight.shape)} and "
                         f"lora_B.weight {tuple(lora_B_weight.shape)}")
    r = rows // E
    A = lora_A_weight.reshape(E, r, lora_A_weight.shape[1]).contiguous()
    B = lora_B_weight.reshape(lora_B_weight.shape[0], r, E).permute(2, 0, 1).contiguous()
    return A, B


def to_peft_factors(lora_A: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor]:
    """PEFT's (``lora_A.weight`` [E·r, in], ``lora_B.weight`` [out, r·E]) from A [E, r, in], B [E, out, r]."""
    if not isinstance(lora_A, Tensor) or not isinstance(lora_B, Tensor):
        raise TypeError("lora_A and lora_B must be torch.Tensors")
    if lora_A.dim() != 3 or lora_B.dim() != 3 or lora_A.shape[:2] != (lora_B.shape[0], lora_B.shape[2]):
        raise ValueError(f"expert factors must be A [E, r, in] and B [E, out, r], got lora_A "
                         f"{tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}")
    E, r, in_features = lora_A.shape
    out_features = lora_B.shape[1]
    return (lora_A.reshape(E * r, in_features).contiguous(),
            lora_B.permute(1, 2, 0).reshape(out_features, r * E).contiguous())
