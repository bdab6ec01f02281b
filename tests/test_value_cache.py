"""lora_fused.value_cache: a derived result is reused only while its tensors are unchanged."""
import torch

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
