"""The torch backend's all-adapters decode path and its caches (host time: goals H4 and H5, bench/goals.py).

For few rows (T <= GATHER_MAX_ROWS) and few adapter columns (n · r_max <= DENSE_MAX_COLUMNS)
the torch backend multiplies every row by every adapter's A, masks by each row's own
coefficients and multiplies by every B. Its operands (the stacks as one matrix, each
row's coefficients) are cached per stack and per plan; these tests change every input
they depend on, in place and by replacement, and check each result against the float64
per-row reference, forward and every gradient.
"""
from __future__ import annotations

import gc

import pytest
import torch

import lora_fused as lf
from lora_cases import rel_error
from lora_fused.backends import torch_backend

IN, OUT, N_ADAPTERS, R_MAX = 13, 10, 3, 6


@pytest.fixture(autouse=True)
def torch_backend_only(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")


def _data(T, seed=0, r_max=R_MAX, n=N_ADAPTERS, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, IN, generator=g, dtype=dtype)
    w, b = torch.randn(OUT, IN, generator=g, dtype=dtype) * 0.3, torch.randn(OUT, generator=g, dtype=dtype)
    A = torch.randn(n, r_max, IN, generator=g, dtype=dtype) * 0.3
    B = torch.randn(n, OUT, r_max, generator=g, dtype=dtype) * 0.4
    scalings = torch.rand(n, generator=g) + 0.5
    ids = torch.randint(-1, n, (T,), generator=g)
    return x, w, b, A, B, scalings, ids


def _reference(x, w, b, A, B, ids, scalings, ranks=None):
    d = torch.float64
    return lf.multi_lora_linear_reference(x.to(d), w.to(d), A.to(d), B.to(d), ids, scalings.to(d), b.to(d),
                                          ranks=ranks)


def _assert_close(y, ref, tol=1e-5):
    assert rel_error(y, ref) <= tol, f"{rel_error(y, ref):.2e}"


def _takes_dense_path(x, A, B, scalings, ranks, plan) -> bool:
    return torch_backend.dense_operands(x, A, B, scalings, ranks, plan) is not None


def test_shapes_of_the_benchmark_take_the_dense_path():
    x, w, b, A, B, scalings, ids = _data(4)
    assert _takes_dense_path(x, A, B, scalings, None, lf.plan_segments(ids, N_ADAPTERS))


@pytest.mark.parametrize("T", [0, 1, 5, 16])
@pytest.mark.parametrize("r_max, ranks", [(1, None), (R_MAX, None), (R_MAX, (6, 1, 3))])
def test_outputs_and_gradients_match_float64(T, r_max, ranks):
    x, w, b, A, B, scalings, ids = _data(T, seed=T + r_max, r_max=r_max)
    ranks = None if ranks is None else torch.tensor(ranks, dtype=torch.int32)
    plan = lf.plan_segments(ids, N_ADAPTERS)
    assert _takes_dense_path(x, A, B, scalings, ranks, plan)
    grad_y = torch.randn(T, OUT, generator=torch.Generator().manual_seed(3))
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    y = lf.multi_lora_linear(leaves[0], w, leaves[1], leaves[2], plan, scalings, b, ranks=ranks)
    y.backward(grad_y)
    ref_leaves = [t.double().requires_grad_() for t in (x, A, B)]
    ref = lf.multi_lora_linear_reference(ref_leaves[0], w.double(), ref_leaves[1], ref_leaves[2], ids,
                                         scalings.double(), b.double(), ranks=ranks)
    ref.backward(grad_y.double())
    _assert_close(y, ref)
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        assert leaf.grad.shape == leaf.shape
        if ref_leaf.grad is not None and ref_leaf.grad.norm() > 0:
            _assert_close(leaf.grad, ref_leaf.grad)
        else:  # no row of any adapter (all base, or T = 0): exactly zero
            assert (leaf.grad == 0).all()
    with torch.no_grad():  # the direct call, no autograd: the same y bit for bit
        assert torch.equal(lf.multi_lora_linear(x, w, A, B, plan, scalings, b, ranks=ranks), y.detach())


def test_float64_and_non_contiguous_x():
    x, w, b, A, B, scalings, ids = _data(7, seed=4, dtype=torch.float64)
    x_strided = torch.randn(IN, 7, dtype=torch.float64).t()  # non-contiguous rows
    plan = lf.plan_segments(ids, N_ADAPTERS)
    assert _takes_dense_path(x_strided, A, B, scalings, None, plan)
    with torch.no_grad():
        y = lf.multi_lora_linear(x_strided, w, A, B, plan, scalings, b)
    _assert_close(y, _reference(x_strided, w, b, A, B, ids, scalings), tol=1e-12)


#: (T, r_max) of each torch-backend path: dense (n · r_max <= 256), per-row gather (more
#: columns), chunks (T > GATHER_MAX_ROWS); all three keep coefficients on the plan.
PATHS = {"dense": (6, R_MAX), "gather": (6, 100), "chunks": (40, R_MAX)}


@pytest.mark.parametrize("path", list(PATHS))
def test_in_place_writes_to_every_input_are_seen(path):
    """Stacks, scalings, ranks and the plan changed in place between calls on one plan: outputs
    and gradients follow (forward and backward read the coefficients kept on the plan)."""
    T, r_max = PATHS[path]
    x, w, b, A, B, scalings, _ = _data(T, seed=5, r_max=r_max)
    ranks = torch.tensor([6, 2, 4], dtype=torch.int32)
    plan = lf.plan_segments(torch.arange(T) % (N_ADAPTERS + 1) - 1, N_ADAPTERS)
    assert _takes_dense_path(x, A, B, scalings, ranks, plan) == (path == "dense")
    assert torch_backend.uses_gather(T) == (path != "chunks")
    new_ids = torch.arange(T).flip(0) % N_ADAPTERS
    writes = [lambda: A[1].mul_(-2.0), lambda: B[2, :, 0].add_(1.0), lambda: scalings.__setitem__(0, 3.0),
              lambda: ranks.__setitem__(1, 5), lambda: plan.update_(new_ids)]
    grad_y = torch.randn(T, OUT, generator=torch.Generator().manual_seed(6))
    for write in [lambda: None] + writes:
        write()
        with torch.no_grad():
            y_no_grad = lf.multi_lora_linear(x, w, A, B, plan, scalings, b, ranks=ranks)
        leaves = [t.clone().requires_grad_() for t in (x, A, B)]
        y = lf.multi_lora_linear(leaves[0], w, leaves[1], leaves[2], plan, scalings, b, ranks=ranks)
        y.backward(grad_y)
        ref_leaves = [t.double().requires_grad_() for t in (x, A, B)]
        ref = lf.multi_lora_linear_reference(ref_leaves[0], w.double(), ref_leaves[1], ref_leaves[2],
                                             plan.adapter_ids, scalings.double(), b.double(), ranks=ranks)
        ref.backward(grad_y.double())
        _assert_close(y_no_grad, ref)
        assert torch.equal(y.detach(), y_no_grad)
        for leaf, ref_leaf in zip(leaves, ref_leaves):
            _assert_close(leaf.grad, ref_leaf.grad)


def test_replaced_tensors_are_seen():
    """A ``.data`` swap and new tensors that may reuse a freed one's id and memory."""
    x, w, b, A, B, scalings, ids = _data(5, seed=6)
    plan = lf.plan_segments(ids, N_ADAPTERS)
    with torch.no_grad():
        lf.multi_lora_linear(x, w, A, B, plan, scalings, b)
        A.data = A.data * 3.0
        _assert_close(lf.multi_lora_linear(x, w, A, B, plan, scalings, b), _reference(x, w, b, A, B, ids, scalings))
        for seed in range(4):  # each iteration frees the previous stacks first
            A = B = None
            gc.collect()
            _, _, _, A, B, scalings, _ = _data(5, seed=10 + seed)
            y = lf.multi_lora_linear(x, w, A, B, plan, scalings, b)
            _assert_close(y, _reference(x, w, b, A, B, ids, scalings))


def test_one_stack_many_plans_and_many_stacks_one_plan():
    x, w, b, A, B, scalings, _ = _data(8, seed=7)
    A2, B2 = A.flip(0).contiguous(), B.flip(0).contiguous()
    plans = [lf.plan_segments(torch.randint(-1, N_ADAPTERS, (8,), generator=torch.Generator().manual_seed(s)),
                              N_ADAPTERS) for s in range(3)]
    with torch.no_grad():
        for _ in range(2):
            for plan in plans:
                for stack_A, stack_B in ((A, B), (A2, B2)):
                    y = lf.multi_lora_linear(x, w, stack_A, stack_B, plan, scalings, b)
                    _assert_close(y, _reference(x, w, b, stack_A, stack_B, plan.adapter_ids, scalings))


def test_layer_sees_a_new_scaling_and_an_in_place_swap_within_one_batch():
    """MultiLoRALinear in adapter_batch: the routing's plan is reused across forwards, and a
    scaling written into the layer's buffer or an adapter swapped in place (unpinned slot) is seen."""
    x, w, b, A, B, scalings, _ = _data(4, seed=8)
    layer = lf.MultiLoRALinear(IN, OUT, max_adapters=N_ADAPTERS, max_rank=R_MAX)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    for i in range(N_ADAPTERS):
        layer.add_adapter(f"a{i}", A[i], B[i], float(scalings[i]))
    model = torch.nn.Sequential(layer)
    names = ["a0", None, "a1", "a0"]
    ids = torch.tensor([0, -1, 1, 0])
    with torch.no_grad(), lf.adapter_batch(model, names):
        _assert_close(layer(x), _reference(x, w, b, A, B, ids, scalings))
        layer.scalings[1] = 4.0
        scalings[1] = 4.0
        _assert_close(layer(x), _reference(x, w, b, A, B, ids, scalings))
        layer.add_adapter("a2", -A[2], B[2], 1.0)  # slot 2 is not pinned by this batch: in place
        _assert_close(layer(x), _reference(x, w, b, A, B, ids, scalings))
        layer.lora_A[0].mul_(0.5)
        A[0].mul_(0.5)
        _assert_close(layer(x), _reference(x, w, b, A, B, ids, scalings))


def test_same_memory_other_layout_is_seen():
    """Stacks with the data pointer, shape and version of the previous call's but another layout:
    a new view of the same storage (whose Python object may reuse the freed one's id), and a
    ``.data`` swap of the same tensor (which keeps its version counter)."""
    x, w, b, _, B, scalings, ids = _data(5, seed=9)
    plan = lf.plan_segments(ids, N_ADAPTERS)
    store = torch.randn(N_ADAPTERS * R_MAX * IN, generator=torch.Generator().manual_seed(9)) * 0.3
    layouts = [lambda: store.view(N_ADAPTERS, R_MAX, IN), lambda: store.view(IN, R_MAX, N_ADAPTERS).permute(2, 1, 0)]
    with torch.no_grad():
        for make in layouts + layouts:
            A = make()
            _assert_close(lf.multi_lora_linear(x, w, A, B, plan, scalings, b), _reference(x, w, b, A, B, ids, scalings))
            del A
        A = layouts[0]()
        lf.multi_lora_linear(x, w, A, B, plan, scalings, b)
        A.data = layouts[1]()
        _assert_close(lf.multi_lora_linear(x, w, A, B, plan, scalings, b), _reference(x, w, b, A, B, ids, scalings))


def test_cached_operands_are_freed_with_their_stacks():
    """A stack's cached copy leaves the cache when the stack is freed (no growth over calls with
    fresh stacks, e.g. weights rebuilt per call)."""
    x, w, b, A, B, scalings, ids = _data(3, seed=11)
    plan = lf.plan_segments(ids, N_ADAPTERS)
    before = len(torch_backend._DENSE_STACKS)
    with torch.no_grad():
        for k in range(20):
            lf.multi_lora_linear(x, w, A * (1.0 + k), B * 1.0, plan, scalings, b)
    assert len(torch_backend._DENSE_STACKS) <= before + 1
