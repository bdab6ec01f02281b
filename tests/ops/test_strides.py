"""Every tensor argument of lf.lora_linear and lf.multi_lora_linear as a non-contiguous view.

Each argument in turn (the upstream gradient too) is given as
- ``transposed``: the same values stored column-major (last two dims swapped in memory),
- ``step``: every other element of a buffer twice as wide, the gaps filled with NaN
  (a kernel that ignores the stride reads a NaN),
- ``expanded``: a stride-0 broadcast (bias and scalings of one value, x of one row),
where the shape allows. Output and every gradient are compared against float64
math written here, computed from contiguous copies. Under TRITON_INTERPRET=1
(conftest, no CUDA) the Triton kernels run; outputs are poisoned with NaN.
"""
from __future__ import annotations

import pytest
import torch

import lora_fused as lf
from lora_cases import DEVICE, TOLERANCE, rel_error

TOL = TOLERANCE[torch.float32]


def transposed(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values with its last two dims swapped in memory."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def step(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values at stride 2 along the last dim; the elements between are NaN (or -7 for ints)."""
    fill = float("nan") if t.is_floating_point() else -7
    buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), fill, dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    return buf[..., ::2]


def expanded(t: torch.Tensor) -> torch.Tensor:
    """A stride-0 view of ``t``'s first element (vectors) or first row (matrices) over t's shape."""
    one = t[:1].clone()
    return one.expand(t.shape)


LAYOUTS = {"transposed": transposed, "step": step, "expanded": expanded}


def as_view(t: dict, arg: str, layout: str) -> dict:
    """``t`` with ``t[arg]`` replaced by its ``layout`` view (same shape and values, not contiguous)."""
    view = LAYOUTS[layout](t[arg])
    assert view.shape == t[arg].shape and not view.is_contiguous(), (arg, layout, view.stride())
    return {**t, arg: view}


def leaves_of(t: dict, names) -> dict:
    """Leaf tensors that require grad, with the strides of ``t``'s (detach keeps them)."""
    leaves = {k: t[k].detach().requires_grad_() for k in names}
    assert all(leaves[k].stride() == t[k].stride() for k in names)
    return leaves


# --------------------------------------------------------------------- lora_linear
def lora_inputs(M, K, N, r, seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE)  # noqa: E731
    return dict(x=rand(M, K), weight=rand(N, K, scale=K ** -0.5), lora_A=rand(r, K, scale=K ** -0.5),
                lora_B=rand(N, r, scale=r ** -0.5), bias=rand(N), grad_y=rand(M, N))


def lora_reference(t, scaling):
    """float64 y = x Wᵀ + b + s (x Aᵀ) Bᵀ and its gradients by autograd."""
    leaves = {k: v.detach().double().contiguous().requires_grad_() for k, v in t.items() if k != "grad_y"}
    y = (leaves["x"] @ leaves["weight"].T + leaves["bias"]
         + scaling * (leaves["x"] @ leaves["lora_A"].T) @ leaves["lora_B"].T)
    y.backward(t["grad_y"].double())
    return y.detach(), {k: v.grad for k, v in leaves.items()}


LORA_ARGS = ("x", "weight", "lora_A", "lora_B", "bias", "grad_y")
LORA_CASES = [(arg, layout) for arg in LORA_ARGS for layout in LAYOUTS
              if not (layout == "transposed" and arg == "bias")]
# (M, in, out, r): decode with the fused shrink; prefill shrink_first (r > FUSED_SHRINK_MAX_RANK).
LORA_SHAPES = [(7, 37, 45, 5), (70, 37, 45, 40)]


@pytest.mark.parametrize("M,K,N,r", LORA_SHAPES)
@pytest.mark.parametrize("arg,layout", LORA_CASES)
def test_lora_linear_reads_every_argument_through_its_strides(arg, layout, M, K, N, r):
    scaling = 0.75
    t = as_view(lora_inputs(M, K, N, r, seed=M + r), arg, layout)
    ref_y, ref_grads = lora_reference(t, scaling)
    leaves = leaves_of(t, ("x", "weight", "lora_A", "lora_B", "bias"))
    y = lf.lora_linear(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"], scaling,
                       leaves["bias"])
    y.backward(t["grad_y"])
    assert rel_error(y, ref_y) <= TOL, "y"
    for name, ref in ref_grads.items():
        assert rel_error(leaves[name].grad, ref) <= TOL, name


def test_lora_linear_views_with_dropout_match_contiguous_copies():
    """With dropout the keep-mask is indexed by logical position, not by memory: the
    same seed gives the same y and gradients for views as for contiguous copies."""
    t = lora_inputs(70, 37, 45, 8, seed=3)
    views = {"x": step(t["x"]), "weight": transposed(t["weight"]), "lora_A": step(t["lora_A"]),
             "lora_B": transposed(t["lora_B"]), "bias": step(t["bias"]), "grad_y": transposed(t["grad_y"])}

    def run(ts):
        leaves = leaves_of(ts, ("x", "weight", "lora_A", "lora_B", "bias"))
        torch.manual_seed(11)
        y = lf.lora_linear(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"], 0.5,
                           leaves["bias"], dropout_p=0.25, training=True)
        y.backward(ts["grad_y"])
        return y, {k: v.grad for k, v in leaves.items()}

    y_ref, g_ref = run(t)
    y, g = run(views)
    assert rel_error(y, y_ref) <= TOL
    for name in g_ref:
        assert rel_error(g[name], g_ref[name]) <= TOL, name


# --------------------------------------------------------------------- multi_lora_linear
def multi_inputs(T, K, N, n, r_max, seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE)  # noqa: E731
    ids = torch.randint(-1, n, (T,), generator=g).to(DEVICE)
    return dict(x=rand(T, K), weight=rand(N, K, scale=K ** -0.5), lora_A=rand(n, r_max, K, scale=K ** -0.5),
                lora_B=rand(n, N, r_max, scale=r_max ** -0.5), bias=rand(N), grad_y=rand(T, N),
                scalings=(torch.rand(n, generator=g) + 0.5).to(DEVICE), adapter_ids=ids,
                ranks=torch.tensor([r_max, 3, 1][:n], dtype=torch.int64, device=DEVICE))


def multi_reference(t):
    """float64, one row at a time: y[t] = x[t] Wᵀ + b + s_i B_i[:, :r_i] A_i[:r_i] x[t]; autograd grads."""
    leaves = {k: t[k].detach().double().contiguous().requires_grad_()
              for k in ("x", "weight", "lora_A", "lora_B", "bias")}
    x, A, B = leaves["x"], leaves["lora_A"], leaves["lora_B"]
    rows = []
    for row, i in enumerate(t["adapter_ids"].tolist()):
        y_t = x[row] @ leaves["weight"].T + leaves["bias"]
        if i >= 0:
            r = int(t["ranks"][i])
            y_t = y_t + float(t["scalings"][i]) * (B[i, :, :r] @ (A[i, :r] @ x[row]))
        rows.append(y_t)
    y = torch.stack(rows)
    y.backward(t["grad_y"].double())
    return y.detach(), {k: v.grad for k, v in leaves.items()}


MULTI_ARGS = ("x", "weight", "lora_A", "lora_B", "bias", "grad_y", "scalings", "ranks", "adapter_ids")
MULTI_CASES = [(arg, layout) for arg in MULTI_ARGS for layout in LAYOUTS
               if not (layout == "transposed" and arg in ("bias", "scalings", "ranks", "adapter_ids"))
               and not (layout == "expanded" and arg in ("ranks", "adapter_ids"))]
# T rows: decode (cuBLAS base, LoRA added in) and prefill (one grouped GEMM).
MULTI_ROWS = [9, 70]


@pytest.mark.parametrize("T", MULTI_ROWS)
@pytest.mark.parametrize("arg,layout", MULTI_CASES)
def test_multi_lora_linear_reads_every_argument_through_its_strides(arg, layout, T):
    t = as_view(multi_inputs(T, 37, 45, n=3, r_max=8, seed=T), arg, layout)
    ref_y, ref_grads = multi_reference(t)
    leaves = leaves_of(t, ("x", "weight", "lora_A", "lora_B", "bias"))
    y = lf.multi_lora_linear(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"],
                             t["adapter_ids"], t["scalings"], leaves["bias"], ranks=t["ranks"])
    y.backward(t["grad_y"])
    assert rel_error(y, ref_y) <= TOL, "y"
    for name, ref in ref_grads.items():
        assert rel_error(leaves[name].grad, ref) <= TOL, name
