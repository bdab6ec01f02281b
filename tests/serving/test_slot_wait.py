"""A hot swap with every spare slot pinned by open batches waits for a slot (add_adapter's
``timeout=``) instead of raising, and never waits for batches only its own thread can exit.

The model, its adapter versions and the old-or-new check come from test_serving_concurrency.py:
``build(max_adapters=6)`` loads 5 names into slots 0..4, so slot 5 is the one spare slot.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time

import pytest
import torch

import lora_fused as lf
from lora_cases import TOLERANCE, rel_error
from test_serving_concurrency import (IN, NAMES, SEQ, Tally, build, failing_into, fast_switching,  # noqa: F401
                                      random_weights, reference, serve_request, torch_backend)

MAX_ADAPTERS = 6  # for build(): its 5 names and one spare slot


class CountingCondition(threading.Condition):
    """The slot condition, counting the waits of add_adapter (a test sees that a swap waited)."""

    def __init__(self, lock):
        super().__init__(lock)
        self.waits = 0

    def wait(self, timeout=None):
        self.waits += 1
        return super().wait(timeout)


@pytest.fixture
def slot_waits(monkeypatch):
    condition = CountingCondition(lf.serving.slots.SLOT_LOCK)
    monkeypatch.setattr(lf.serving.slots, "SLOT_RELEASED", condition)
    return condition


def wait_until(predicate, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def run_bounded(fn, seconds=20.0):
    """fn() in a daemon thread: its exception is raised here, and a hang fails the test instead of
    hanging it (a daemon thread left waiting does not keep the interpreter alive)."""
    errors = []
    thread = threading.Thread(target=failing_into(errors, fn), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a deadlock"
    if errors:
        raise errors[0]


def add_bounded(*args, **kwargs):
    """lf.add_adapter from another thread, bounded by run_bounded."""
    slot = []
    run_bounded(lambda: slot.append(lf.add_adapter(*args, **kwargs)))
    return slot[0]


class BatchInThread:
    """An adapter_batch opened, held and exited by a thread of its own (a request in flight). It
    runs one forward of ``x`` just before it exits: ``y`` is what the batch was served then."""

    def __init__(self, model, names, x):
        self.opened, self.exit, self.errors = threading.Event(), threading.Event(), []
        self.routing = self.y = None
        self.thread = threading.Thread(target=failing_into(self.errors, self._serve), args=(model, names, x),
                                       daemon=True)

    def _serve(self, model, names, x):
        with torch.no_grad(), lf.adapter_batch(model, names) as self.routing:
            self.opened.set()
            self.exit.wait()
            self.y = model(x)

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.opened.is_set() or self.errors, "the batch to open")
        assert not self.errors, self.errors
        return self

    def release(self):
        self.exit.set()
        self.thread.join(10)
        assert not self.thread.is_alive() and not self.errors, self.errors

    def __exit__(self, *exc):
        self.release()


def assert_serves(y, model, weights, x):
    assert rel_error(y[0], reference(model, weights, x[0])) <= TOLERANCE[torch.float32]


@contextlib.contextmanager
def every_spare_slot_pinned(model, versions, x):
    """Adapter "a" served by two open batches of other threads: the first pins version 0 (slot 0),
    the second version 1, swapped in between into the spare slot 5. No slot is free."""
    with BatchInThread(model, ["a"], x) as first:
        versions.publish(model, "a", random_weights(random.Random(1)))
        with BatchInThread(model, ["a"], x) as second:
            assert model[0].free_slots() == [] and lf.adapters.multi_lora.model_slot_of(model, "a") == 5
            yield first, second


def in_thread(fn):
    """fn() in a daemon thread of its own, started; ``result`` holds what it returned (or raised)."""
    result = []

    def run():
        try:
            result.append(fn())
        except BaseException as e:
            result.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def swap_in_thread(model, name, weights, **kwargs):
    return in_thread(lambda: lf.add_adapter(model, name, weights, **kwargs))


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_a_swap_waits_for_a_batch_to_exit_then_lands(slot_waits, timeout):
    model, versions = build(max_adapters=MAX_ADAPTERS)
    x = torch.randn(1, SEQ, IN)
    v2 = random_weights(random.Random(2))
    with every_spare_slot_pinned(model, versions, x) as (first, second):
        swapper, result = swap_in_thread(model, "a", v2, timeout=timeout)
        wait_until(lambda: slot_waits.waits > 0 or result, "the swap to wait")
        assert not result, result  # it waits while both batches are open
        first.release()  # frees slot 0 (version 0, which no name routes to any more)
        swapper.join(10)
        assert not swapper.is_alive() and result == [0], result
        second.release()
    assert_serves(first.y, model, versions.history["a"][0], x)
    assert_serves(second.y, model, versions.history["a"][1], x)  # the swap did not touch its slot
    with torch.no_grad(), lf.adapter_batch(model, ["a"]):
        assert_serves(model(x), model, v2, x)


@pytest.mark.parametrize("timeout", [0, 0.3])
def test_no_slot_in_time_raises_with_the_number_of_open_batches(slot_waits, timeout):
    """timeout=0 raises at once (the error of old, now with the open batches); a positive timeout
    raises the same error after that long."""
    model, versions = build(max_adapters=MAX_ADAPTERS)
    x = torch.randn(1, SEQ, IN)
    waited = "" if timeout == 0 else rf" \(waited timeout={timeout} s"
    with every_spare_slot_pinned(model, versions, x):
        for name, error in (("a", r"no slot is free for its new version \(max_adapters=6; "),
                            ("new", r"all 6 adapter slots are in use or held by open batches \(.*; ")):
            start = time.monotonic()
            held = r"2 open adapter_batch blocks pin slots \[0, 5\]\).*"
            with pytest.raises(ValueError, match=error + held + waited):
                add_bounded(model, name, random_weights(random.Random(2)), timeout=timeout)
            assert timeout <= time.monotonic() - start < timeout + 2.0
    assert (slot_waits.waits > 0) == (timeout > 0)


def test_a_batch_routed_to_other_adapters_wakes_a_waiting_swap(slot_waits):
    """routing.update_ (the next batch of a CUDA-graph server) drops the pin on slot 0: the swap
    waiting for it lands while that batch stays open."""
    model, versions = build(max_adapters=MAX_ADAPTERS)
    x = torch.randn(1, SEQ, IN)
    with every_spare_slot_pinned(model, versions, x) as (first, _):
        swapper, result = swap_in_thread(model, "a", random_weights(random.Random(2)))
        wait_until(lambda: slot_waits.waits > 0 or result, "the swap to wait")
        first.routing.update_(["b"])  # from this thread: the same lock and notification as its own
        swapper.join(10)
        assert not swapper.is_alive() and result == [0], result


def test_load_peft_adapter_slot_waits_as_add_adapter(tmp_path, slot_waits):
    model, versions = build(max_adapters=MAX_ADAPTERS)
    x = torch.randn(1, SEQ, IN)
    lf.save_peft_adapter_slot(model, "b", tmp_path)
    with every_spare_slot_pinned(model, versions, x) as (first, _):
        with pytest.raises(ValueError, match=r"2 open adapter_batch blocks pin slots \[0, 5\].*waited "
                                             r"timeout=0.05 s"):
            run_bounded(lambda: lf.load_peft_adapter_slot(model, tmp_path, "a", timeout=0.05))
        waits = slot_waits.waits
        loader, result = in_thread(lambda: lf.load_peft_adapter_slot(model, tmp_path, "a"))
        wait_until(lambda: slot_waits.waits > waits or result, "the load to wait")
        first.release()
        loader.join(10)
        assert not loader.is_alive() and result == [0], result


def test_a_remove_wakes_a_waiting_add(slot_waits):
    """A new name waits for the retired slot 0; removing an adapter no batch serves frees its slot
    at once, and the waiting add takes it while both batches are still open."""
    model, versions = build(max_adapters=MAX_ADAPTERS)
    x = torch.randn(1, SEQ, IN)
    with every_spare_slot_pinned(model, versions, x):
        adder, result = swap_in_thread(model, "new", random_weights(random.Random(2)))
        wait_until(lambda: slot_waits.waits > 0 or result, "the add to wait")
        lf.remove_adapter(model, "c")  # slot 2
        adder.join(10)
        assert not adder.is_alive() and result == [2], result


def test_a_swap_raises_instead_of_waiting_for_its_own_threads_batches(slot_waits):
    """This thread's open batches pin every slot the swap could use: only this thread could exit
    them, so timeout=None would hang. It raises at once, naming them."""
    model, versions = build(max_adapters=MAX_ADAPTERS)

    def swap_inside_own_batches():
        with lf.adapter_batch(model, ["a"]):
            versions.publish(model, "a", random_weights(random.Random(1)))  # into the spare slot 5
            with lf.adapter_batch(model, ["a", "b"]):
                with pytest.raises(ValueError, match=r"no slot is free.*2 open adapter_batch blocks pin slots "
                                                     r"\[0, 1, 5\].*this thread opened the batches that pin "
                                                     r"slots \[0, 5\], and it would wait for itself"):
                    lf.add_adapter(model, "a", random_weights(random.Random(2)), timeout=None)
    run_bounded(swap_inside_own_batches)
    assert slot_waits.waits == 0


def test_a_swap_in_a_batch_waits_for_the_batches_of_other_threads(slot_waits):
    """This thread pins the new version (slot 5), another thread the retired one (slot 0): that
    one can exit, so the swap waits for it and lands in slot 0."""
    model, versions = build(max_adapters=MAX_ADAPTERS)
    x = torch.randn(1, SEQ, IN)
    with BatchInThread(model, ["a"], x) as other:
        versions.publish(model, "a", random_weights(random.Random(1)))

        def release_once_the_swap_waits():
            wait_until(lambda: slot_waits.waits > 0, "the swap to wait")
            other.release()

        def swap_inside_a_batch():
            with lf.adapter_batch(model, ["a"]):
                releaser = threading.Thread(target=release_once_the_swap_waits, daemon=True)
                releaser.start()
                assert lf.add_adapter(model, "a", random_weights(random.Random(2))) == 0
                releaser.join(10)
                assert not releaser.is_alive()
        run_bounded(swap_inside_a_batch)


def test_asyncio_swaps_wait_in_a_worker_thread():
    """On the event loop's thread a swap cannot wait for the tasks' batches (it would block the
    loop that exits them): it raises. From asyncio.to_thread it waits and lands when they exit."""
    model, versions = build(max_adapters=MAX_ADAPTERS)
    x = torch.randn(1, SEQ, IN)

    async def serve(names, opened, done):
        with lf.adapter_batch(model, names):
            opened.set()
            await done.wait()
            with torch.no_grad():  # not across the await: grad mode belongs to the thread, not the task
                return model(x)

    async def main():
        done = asyncio.Event()
        first_open, second_open = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(serve(["a"], first_open, done))
        await first_open.wait()
        versions.publish(model, "a", random_weights(random.Random(1)))
        second = asyncio.create_task(serve(["a"], second_open, done))
        await second_open.wait()
        v2 = random_weights(random.Random(2))
        with pytest.raises(ValueError, match="this thread opened the batches"):
            lf.add_adapter(model, "a", v2)
        # a bounded wait: the executor's threads are joined at exit, so one waiting forever would hang it
        swap = asyncio.create_task(asyncio.to_thread(lf.add_adapter, model, "a", v2, timeout=10))
        await asyncio.sleep(0.05)
        assert not swap.done()
        done.set()
        ys = await asyncio.gather(first, second)
        return ys, await asyncio.wait_for(swap, 10), v2

    outcome = []
    run_bounded(lambda: outcome.append(asyncio.run(main())))
    (y0, y1), slot, v2 = outcome[0]
    assert slot in (0, 5)
    assert_serves(y0, model, versions.history["a"][0], x)
    assert_serves(y1, model, versions.history["a"][1], x)
    with torch.no_grad(), lf.adapter_batch(model, ["a"]):
        assert_serves(model(x), model, v2, x)


@pytest.mark.parametrize("timeout, error", [(-1, ValueError), (float("nan"), ValueError), ("1", TypeError),
                                            (True, TypeError)])
def test_bad_timeouts_are_refused(timeout, error):
    model, _ = build(max_adapters=MAX_ADAPTERS)
    with pytest.raises(error, match="^timeout must be"):
        lf.add_adapter(model, "a", random_weights(random.Random(2)), timeout=timeout)


def test_readers_and_a_swapper_that_waits(fast_switching, slot_waits):
    """Readers serve requests continuously (adapter_batch, two forwards each) while a swapper
    hot-swaps served names with timeout=None and one spare slot: every swap lands, every request
    sees one version per adapter in every layer, and everything finishes in bounded time."""
    model, versions = build(max_adapters=MAX_ADAPTERS)
    tally, stop, errors = Tally(), threading.Event(), []
    swaps, requests = 40, 300  # at least

    @torch.no_grad()  # grad mode belongs to the thread
    def reader(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            serve_request(model, versions, rng, tally)

    def swapper():
        rng = random.Random(99)
        while tally.swaps < swaps or tally.served < requests:
            versions.publish_waiting(model, rng.choice(NAMES), random_weights(rng))
            tally.add(swaps=1)

    readers = [threading.Thread(target=failing_into(errors, reader), args=(i,), daemon=True) for i in range(3)]
    swap_thread = threading.Thread(target=failing_into(errors, swapper), daemon=True)
    for t in readers:
        t.start()
    swap_thread.start()
    swap_thread.join(60)
    deadlocked = swap_thread.is_alive()
    stop.set()
    for t in readers:
        t.join(10)
    assert not deadlocked and not any(t.is_alive() for t in readers), "a swap or a reader is stuck"
    assert not errors, errors
    assert not tally.wrong, f"{len(tally.wrong)} wrong outputs, e.g. {tally.wrong[:3]}"
    assert tally.swaps >= swaps and tally.served >= requests, vars(tally)
    assert slot_waits.waits >= 10, slot_waits.waits  # swaps found every spare slot pinned and waited
