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
