"""lora_fused.value_cache: a derived result is reused only while its tensors are unchanged."""
import numpy as np
import pytest
import torch

from lora_cases import rel_error
from lora_fused import value_cache


def _count_calls():
    calls = []

    def total(a, b=None, *extra):
        calls.append(1)
        return float(a.sum()) + (0.0 if b is None else float(b.sum()))
    return total, calls


def test_reused_until_a_tensor_changes():
    total, calls = _count_calls()
    a, b = torch.ones(3), torch.ones(2)
    assert value_cache.derived(total, (a, b)) == 5.0
    assert value_cache.derived(total, (a, b)) == 5.0 and len(calls) == 1
    a[0] = 4.0  # in place: a new version
    assert value_cache.derived(total, (a, b)) == 8.0 and len(calls) == 2
    b.add_(1.0)
    assert value_cache.derived(total, (a, b)) == 10.0 and len(calls) == 3
    a.data = torch.zeros(5)  # a .data swap (module.to does this): new storage and shape
    assert value_cache.derived(total, (a, b)) == 4.0 and len(calls) == 4


def test_none_and_extra_key_and_new_objects():
    total, calls = _count_calls()
    a = torch.ones(3)
    assert value_cache.derived(total, (a, None)) == 3.0
    assert value_cache.derived(total, (a, None), (1,)) == 3.0 and len(calls) == 2  # another extra key
    c = a.clone()  # equal values, another tensor: computed for it
    assert value_cache.derived(total, (c, None)) == 3.0 and len(calls) == 3


def test_a_freed_tensor_never_matches_a_new_one_at_its_id():
    total, calls = _count_calls()
    for value in range(5):  # new tensors may reuse a freed tensor's id and version 0
        t = torch.full((4,), float(value))
        assert value_cache.derived(total, (t,)) == 4.0 * value
        del t


def test_an_exception_caches_nothing():
    def refuse(a):
        raise ValueError("bad")
    a = torch.ones(2)
    for _ in range(2):
        try:
            value_cache.derived(refuse, (a,))
        except ValueError:
            pass
        else:
            raise AssertionError("expected ValueError")


def test_inference_tensors_are_computed_every_call():
    """torch.inference_mode tensors have no version counter: never cached (an in-place write
    would go unseen), and no error."""
    total, calls = _count_calls()
    with torch.inference_mode():
        a = torch.ones(3)
    assert value_cache.derived(total, (a, None)) == 3.0
    with torch.inference_mode():
        a[0] = 5.0
    assert value_cache.derived(total, (a, None)) == 7.0 and len(calls) == 2


def test_multi_lora_linear_under_inference_mode(monkeypatch):
    """The torch backend's cached coefficient table and rank check take inference tensors."""
    import lora_fused as lf
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x, w = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g)
        A, B = torch.randn(2, 3, 6, generator=g), torch.randn(2, 5, 3, generator=g)
        scalings, ranks, ids = torch.tensor([0.5, 2.0]), torch.tensor([3, 2]), torch.tensor([0, 1, -1, 1])
        y = lf.multi_lora_linear(x, w, A, B, ids, scalings, ranks=ranks)
        scalings[1] = 3.0  # an in-place change is seen
        y2 = lf.multi_lora_linear(x, w, A, B, ids, scalings, ranks=ranks)
    d = torch.float64
    for out, s in ((y, [0.5, 2.0]), (y2, [0.5, 3.0])):
        ref = lf.multi_lora_linear_reference(x.to(d), w.to(d), A.to(d), B.to(d), ids, torch.tensor(s, dtype=d),
                                             ranks=ranks)
        assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Writes the version counter does not see (issue 23): a numpy alias of a CPU tensor, and a
# .data swap to new memory at the freed memory's address.
# --------------------------------------------------------------------------

def _dense_and_chunked_rows():
    from lora_fused.backends import torch_backend
    return [3, torch_backend.GATHER_MAX_ROWS + 5]  # the dense all-adapters path, then the chunked one


def _new_memory_at_the_same_address(t: torch.Tensor, buffer) -> None:
    """``t.data`` becomes a new tensor over ``buffer``'s memory: a new storage at the old address,
    with t's version counter unchanged (a .data swap keeps it), as an allocator reusing freed memory."""
    before = (t.data_ptr(), t._version)
    t.data = torch.from_numpy(buffer)
    assert (t.data_ptr(), t._version) == before


def test_derived_sees_a_numpy_write():
    total, calls = _count_calls()
    a = torch.ones(3)
    assert value_cache.derived(total, (a,)) == 3.0
    a.numpy()[:] = 2.0  # shares a's memory; a._version is unchanged
    assert value_cache.derived(total, (a,)) == 6.0 and len(calls) == 2


@pytest.mark.parametrize("T", _dense_and_chunked_rows())
def test_multi_lora_scalings_written_through_numpy_are_seen(monkeypatch, T):
    """The torch backend's cached coefficients (the dense path's stack operands, the chunked path's
    coefficient table) follow scalings that numpy rewrote."""
    import lora_fused as lf
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(T, 6, generator=g), torch.randn(5, 6, generator=g)
    A, B = torch.randn(3, 4, 6, generator=g), torch.randn(3, 5, 4, generator=g)
    ids, ranks = torch.randint(-1, 3, (T,), generator=g), torch.tensor([4, 2, 3])
    buffer = np.array([0.5, 2.0, 1.5], dtype=np.float32)
    scalings = torch.from_numpy(buffer)
    with torch.no_grad():
        lf.multi_lora_linear(x, w, A, B, ids, scalings, ranks=ranks)
        buffer[:] = [3.0, -1.0, 0.25]
        y = lf.multi_lora_linear(x, w, A, B, ids, scalings, ranks=ranks)
    d = torch.float64
    ref = lf.multi_lora_linear_reference(x.to(d), w.to(d), A.to(d), B.to(d), ids, scalings.to(d), ranks=ranks)
    assert rel_error(y, ref) <= 1e-5


def test_dense_stack_sees_new_memory_at_the_old_address(monkeypatch):
    """The dense path keeps a copy of lora_B: a .data swap to new memory that lands at the old
    address (version counter unchanged) must not serve the old copy."""
    import lora_fused as lf
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 6, generator=g), torch.randn(5, 6, generator=g)
    A = torch.randn(3, 4, 6, generator=g)
    B = torch.nn.Parameter(torch.randn(3, 5, 4, generator=g))
    ids, scalings = torch.tensor([0, 2, 1]), torch.tensor([0.5, 2.0, 1.5])
    buffer = B.detach().numpy().copy()
    B.data = torch.from_numpy(buffer)
    with torch.no_grad():
        lf.multi_lora_linear(x, w, A, B, ids, scalings)
        buffer *= -3.0
        _new_memory_at_the_same_address(B, buffer)
        y = lf.multi_lora_linear(x, w, A, B, ids, scalings)
    d = torch.float64
    ref = lf.multi_lora_linear_reference(x.to(d), w.to(d), A.to(d), B.detach().to(d), ids, scalings.to(d))
    assert rel_error(y, ref) <= 1e-5


def _dora_reference(x, weight, lora_A, lora_B, magnitude, scaling, bias):
    """PEFT's DoRA (no dropout) in float64: (m / ‖W0 + s·B A‖) ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ) + b."""
    x, weight, lora_A, lora_B, magnitude, bias = (t.detach().double() for t in (x, weight, lora_A, lora_B,
                                                                                 magnitude, bias))
    norm = (weight + scaling * lora_B @ lora_A).norm(dim=1)
    return magnitude / norm * (x @ weight.T + scaling * (x @ lora_A.T) @ lora_B.T) + bias


def test_dora_row_norm_cache_sees_new_memory_at_the_old_address(monkeypatch):
    from lora_fused.ops.dora import dora_weight_norm
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    g = torch.Generator().manual_seed(3)
    weight, lora_A, lora_B = torch.randn(6, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    buffer = weight.numpy().copy()
    weight.data = torch.from_numpy(buffer)
    dora_weight_norm(weight, lora_A, lora_B, 0.5)
    buffer *= 2.0
    _new_memory_at_the_same_address(weight, buffer)
    expected = (weight.double() + 0.5 * lora_B.double() @ lora_A.double()).norm(dim=1)
    assert rel_error(dora_weight_norm(weight, lora_A, lora_B, 0.5), expected) <= 1e-6


def test_dora_eval_norm_cache_sees_new_memory_at_the_old_address(monkeypatch):
    """DoRALinear(cache_weight_norm=True) keeps the norm between eval calls; a .data swap of
    lora_B to new memory at the old address (the parameter's id and version unchanged) is seen."""
    import lora_fused as lf
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    torch.manual_seed(4)
    layer = lf.DoRALinear.from_linear(torch.nn.Linear(8, 6), r=2, lora_alpha=4).eval()
    layer.cache_weight_norm = True
    buffer = np.random.default_rng(4).standard_normal((6, 2)).astype(np.float32)
    layer.lora_B.data = torch.from_numpy(buffer)
    x = torch.randn(3, 8)
    with torch.no_grad():
        layer(x)
        buffer *= -2.0
        _new_memory_at_the_same_address(layer.lora_B, buffer)
        y = layer(x)
    ref = _dora_reference(x, layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                          layer.scaling, layer.bias)
    assert rel_error(y, ref) <= 1e-5
