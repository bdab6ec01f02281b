"""Input checks for the ops, in one place.

Every failure raises ``TypeError`` (wrong kind or dtype) or ``ValueError``
(wrong shape, device or value) naming the argument and the shapes seen, so a
bad call never reaches a kernel.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _require_tensor(name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def require_tensors(**tensors) -> None:
    """TypeError naming the first argument that is neither a tensor nor None."""
    for name, value in tensors.items():
        if value is not None:
            _require_tensor(name, value)


#: Largest |scaling| the kernels can apply: they take it as a float32 scalar.
MAX_SCALING = torch.finfo(torch.float32).max


def check_positive_int(value, name: str) -> int:
    """``value`` as an int >= 1, for every count or size argument (ranks, features, slots).

    TypeError when ``value`` is not an ``int`` (``bool`` is refused too: ``True`` is
    not a rank); ValueError when it is <= 0. Both messages name ``name`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={value}")
    return value


def check_finite_number(value, name: str) -> float:
    """``value`` as a finite Python float: TypeError for a non-number, ValueError for NaN/inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {name}={value}")
    return float(value)


def check_scaling(scaling) -> float:
    """``scaling`` as a float: finite and within float32's range (the kernels apply it in fp32).

    A NaN/inf or |scaling| > 3.4e38 raises ValueError naming ``scaling``, under
    ``torch.compile`` too: there the value is a constant the graph is specialised on or a
    symbolic float, and the range test is the guard that ``lora_linear_args_ok`` sets anyway,
    so a NaN given to a graph traced with finite values fails its guards, is traced again
    and raises here. Under tracing the value is returned as it came (``float()`` of a
    symbolic float would specialise the graph on it).
    """
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float, torch.SymFloat)):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")
    if not -MAX_SCALING <= scaling <= MAX_SCALING:  # NaN fails too
        if not math.isfinite(scaling):
            raise ValueError(f"scaling must be finite, got scaling={scaling}")
        raise ValueError(f"scaling={scaling:g} is outside float32's range (|scaling| <= "
                         f"{MAX_SCALING:.3g}): the kernels apply it as a float32 scalar")
    return scaling if torch.compiler.is_compiling() else float(scaling)


def check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a Python float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_rank(r) -> int:
    """A LoRA rank: ``check_positive_int(r, "r")``."""
    return check_positive_int(r, "r")


def lora_linear_args_ok(x, weight, lora_A, lora_B, scaling, bias, dropout_p) -> bool:
    """True when every check of :func:`check_lora_linear_args` passes, at the cost of one
    expression (about 2 µs): the common call. False sends the call to the full checks, which
    raise with the details (or accept what this does not cover: an int scaling, a SymFloat)."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(lora_A, Tensor)
            and isinstance(lora_B, Tensor) and (bias is None or isinstance(bias, Tensor))
            and type(scaling) is float and -MAX_SCALING <= scaling <= MAX_SCALING  # NaN fails too
            and type(dropout_p) is float and 0.0 <= dropout_p < 1.0):
        return False
    w_shape, a_shape, b_shape, dtype, device = weight.shape, lora_A.shape, lora_B.shape, x.dtype, x.device
    return (len(w_shape) == 2 and len(a_shape) == 2 and x.dim() >= 1 and a_shape[0] > 0
            and x.shape[-1] == w_shape[1] and a_shape[1] == w_shape[1]
            and len(b_shape) == 2 and b_shape[0] == w_shape[0] and b_shape[1] == a_shape[0]
            and dtype in SUPPORTED_DTYPES and weight.dtype == dtype and lora_A.dtype == dtype
            and lora_B.dtype == dtype and weight.device == device and lora_A.device == device
            and lora_B.device == device
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == w_shape[0] and bias.dtype == dtype
                                  and bias.device == device)))


def check_lora_linear_args(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                           scaling, bias: Optional[Tensor], dropout_p) -> tuple[float, float]:
    """Validate the arguments of ``lora_linear``; returns (scaling, dropout_p) as floats."""
    if lora_linear_args_ok(x, weight, lora_A, lora_B, scaling, bias, dropout_p):
        return scaling, dropout_p
    for name, value in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _require_tensor(name, value)
    if bias is not None:
        _require_tensor("bias", bias)
    scaling = check_scaling(scaling)
    dropout_p = check_dropout_p(dropout_p)

    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension [..., in_features], got shape {tuple(x.shape)}")
    for name, value in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if value.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(value.shape)}")
    out_features, in_features = weight.shape
    r = lora_A.shape[0]
    if r == 0:
        raise ValueError(f"lora_A must have rank r >= 1 rows, got shape {tuple(lora_A.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight "
                         f"{tuple(weight.shape)} expects in_features={in_features} (x shape {tuple(x.shape)})")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must be [r, in_features={in_features}], got shape {tuple(lora_A.shape)} "
                         f"(weight shape {tuple(weight.shape)})")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B must be [out_features={out_features}, r={r}], got shape "
                         f"{tuple(lora_B.shape)} (weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)})")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [out_features={out_features}], got shape {tuple(bias.shape)}")

    named = [("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        named.append(("bias", bias))
    _check_dtypes_and_devices(x, named, named)
    return scaling, dropout_p


def _check_dtypes_and_devices(x: Tensor, same_dtype, same_device) -> None:
    """x in a supported dtype; every ``(name, tensor)`` of ``same_dtype`` in x's dtype, of
    ``same_device`` on x's device."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, value in same_dtype:
        if value.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but x has dtype {x.dtype}; "
                            f"all tensors must share one dtype (cast them, e.g. {name}.to(x.dtype))")
    for name, value in same_device:
        if value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}; "
                             "move all tensors to one device")


_RANK_DTYPES = (torch.int32, torch.int64)


def multi_lora_dims(x, weight, lora_A, lora_B, scalings, bias, ranks) -> Optional[tuple]:
    """``(x.shape, n, r_max, out_features, dtype, device)`` when every check of
    :func:`check_multi_lora_args` passes, found in one expression (about 2.5 µs: some 30 tensor
    attribute reads, which the caller then need not read again); None sends the call to the full
    checks, which raise with the details. dtypes are singletons (``is``); an equality chain
    compares each neighbour."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(lora_A, Tensor)
            and isinstance(lora_B, Tensor) and isinstance(scalings, Tensor)
            and (bias is None or isinstance(bias, Tensor)) and (ranks is None or isinstance(ranks, Tensor))):
        return None
    w_shape, a_shape, x_shape = weight.shape, lora_A.shape, x.shape
    if len(w_shape) != 2 or len(a_shape) != 3 or not x_shape:
        return None
    out_features, in_features = w_shape
    n, r_max, a_in = a_shape
    dtype, device = x.dtype, x.device
    if (x_shape[-1] == in_features and a_in == in_features and n >= 1 and r_max >= 1
            and lora_B.shape == (n, out_features, r_max) and scalings.shape == (n,)
            and dtype in SUPPORTED_DTYPES and dtype is weight.dtype is lora_A.dtype is lora_B.dtype
            and scalings.is_floating_point()
            and device == weight.device == lora_A.device == lora_B.device == scalings.device
            and (bias is None or (bias.shape == (out_features,) and bias.dtype is dtype and bias.device == device))
            and (ranks is None or (ranks.dtype in _RANK_DTYPES and ranks.shape == (n,) and ranks.device == device))):
        return x_shape, n, r_max, out_features, dtype, device
    return None


def _multi_lora_args_ok(x, weight, lora_A, lora_B, scalings, bias, ranks) -> bool:
    """Whether every check of :func:`check_multi_lora_args` passes (:func:`multi_lora_dims`)."""
    return multi_lora_dims(x, weight, lora_A, lora_B, scalings, bias, ranks) is not None


def check_multi_lora_args(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                          scalings, bias: Optional[Tensor], ranks) -> None:
    """Validate ``multi_lora_linear``'s tensors (the ids or plan are checked by lora_fused.dispatch.segments)."""
    if not _multi_lora_args_ok(x, weight, lora_A, lora_B, scalings, bias, ranks):
        _check_multi_lora_args_in_full(x, weight, lora_A, lora_B, scalings, bias, ranks)


def _check_multi_lora_args_in_full(x, weight, lora_A, lora_B, scalings, bias, ranks) -> None:
    """Every check of :func:`check_multi_lora_args`, one at a time, each with its own message."""
    for name, value in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B),
                        ("scalings", scalings)):
        _require_tensor(name, value)
    if bias is not None:
        _require_tensor("bias", bias)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension [..., in_features], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight "
                         f"{tuple(weight.shape)} expects in_features={in_features} (x shape {tuple(x.shape)})")
    if lora_A.dim() != 3 or lora_A.shape[2] != in_features or lora_A.shape[0] < 1 or lora_A.shape[1] < 1:
        raise ValueError(f"lora_A must be [n_adapters >= 1, r_max >= 1, in_features={in_features}], "
                         f"got shape {tuple(lora_A.shape)}")
    n, r_max = lora_A.shape[0], lora_A.shape[1]
    if tuple(lora_B.shape) != (n, out_features, r_max):
        raise ValueError(f"lora_B must be [n_adapters={n}, out_features={out_features}, r_max={r_max}] to "
                         f"match lora_A {tuple(lora_A.shape)} and weight {tuple(weight.shape)}, got shape "
                         f"{tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [out_features={out_features}], got shape {tuple(bias.shape)}")
    if not scalings.is_floating_point():
        raise TypeError(f"scalings must be a floating-point tensor [n_adapters={n}], got {scalings.dtype}")
    if tuple(scalings.shape) != (n,):
        raise ValueError(f"scalings must be [n_adapters={n}] (one per adapter of lora_A "
                         f"{tuple(lora_A.shape)}), got shape {tuple(scalings.shape)}")
    if ranks is not None:
        _require_tensor("ranks", ranks)
        if ranks.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ranks must be an int32 or int64 tensor, got {ranks.dtype}")
        if tuple(ranks.shape) != (n,):
            raise ValueError(f"ranks must be [n_adapters={n}], got shape {tuple(ranks.shape)}")
    named = [("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)] + ([("bias", bias)] if bias is not None else [])
    extra = [("scalings", scalings)] + ([("ranks", ranks)] if ranks is not None else [])
    _check_dtypes_and_devices(x, named, named + extra)


def check_rank_values(ranks: Tensor, r_max: int) -> None:
    """ranks in [1, r_max] (a host read: the caller skips it while capturing or tracing)."""
    if ranks.numel() == 0:
        return
    low, high = int(ranks.min()), int(ranks.max())
    if low < 1 or high > r_max:
        raise ValueError(f"ranks must lie in [1, r_max={r_max}] (r_max = lora_A.shape[1]), got values "
                         f"in [{low}, {high}]: {ranks.tolist()[:16]}")


def _shapes(**tensors) -> str:
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items() if t is not None)


def check_grouped_args(x: Tensor, weight: Tensor, lora_A: Optional[Tensor], lora_B: Optional[Tensor],
                       bias: Optional[Tensor]) -> None:
    """The grouped (expert) op: x [*, in], weight [E, out, in], lora_A [E, r, in], lora_B [E, out, r],
    bias [E, out] (lora_A / lora_B / bias may be None), all in x's dtype (the factors may be cast by
    the caller first) and on x's device."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B, "bias": bias}
    require_tensors(**named)
    if weight.dim() != 3:
        raise ValueError(f"weight must be [E, out, in] (one matrix per expert), got {_shapes(weight=weight)}")
    E, out_features, in_features = weight.shape
    problems = []
    if x.dim() < 1 or x.shape[-1] != in_features:
        problems.append(f"x's last dim must be in_features={in_features}")
    if lora_A is not None and (lora_A.dim() != 3 or lora_A.shape[0] != E or lora_A.shape[2] != in_features):
        problems.append(f"lora_A must be [E={E}, r, in={in_features}]")
    if lora_A is not None and lora_A.dim() == 3 and lora_A.shape[1] == 0:
        problems.append("the rank r (lora_A.shape[1]) must be at least 1")
    if lora_B is not None and (lora_B.dim() != 3 or tuple(lora_B.shape) != (E, out_features, lora_A.shape[1])):
        problems.append(f"lora_B must be [E={E}, out={out_features}, r]")
    if bias is not None and tuple(bias.shape) != (E, out_features):
        problems.append(f"bias must be [E={E}, out={out_features}]")
    if problems:
        raise ValueError("grouped_lora_linear: " + "; ".join(problems) + f" (got {_shapes(**named)})")
    others = [(n, t) for n, t in named.items() if t is not None and n != "x"]
    _check_dtypes_and_devices(x, others, others)
