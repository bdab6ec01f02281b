"""Serving one model from many threads and asyncio tasks while adapters are hot-swapped, removed
and re-added: every request's output must equal the float64 reference of the adapter *versions*
it was served, in every layer (a forward that mixed an old and a new version matches neither).

Torch path on CPU with tiny shapes, so >= 1,000 requests run in seconds. Each request opens an
``adapter_batch`` with random names and runs two forwards (like prefill then a decode step)
with a thread switch / ``await`` between them; swaps run alongside in another thread or task.
"""
from __future__ import annotations

import asyncio
import random
import sys
import threading

import pytest
import torch
from torch import nn

import lora_fused as lf
from lora_cases import TOLERANCE, rel_error

DEVICE = "cpu"  # the torch path: fast enough for thousands of requests (the kernels are tested elsewhere)
IN, HIDDEN, OUT = 12, 10, 7
NAMES = ["a", "b", "c", "d"]
CHURN = ("e", "f")  # removed and re-added in turn: often absent, and reusing each other's slot
BATCH, SEQ = 3, 2
REQUESTS = 1000


class Versions:
    """Every version of every adapter ever published, and which is current (under one lock, so a
    request can bound the version it was served between two reads of this table)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.history = {}  # name -> list of weights, one per version
        self.current = {}  # name -> index into history[name], or None when removed

    def publish(self, model, name, weights):
        with self.lock:  # publish and record as one step, so "current" is never ahead of the model
            lf.add_adapter(model, name, weights)
            self.history.setdefault(name, []).append(weights)
            self.current[name] = len(self.history[name]) - 1

    def publish_waiting(self, model, name, weights):
        """publish, for a swap that may wait for open batches to exit (add_adapter's timeout=None):
        holding the lock meanwhile would deadlock with a request snapshotting inside its batch. So
        the version is recorded first and made current once it landed; a request's candidates run
        up to the last recorded version (check_request). For loaded names: one swapper at a time."""
        with self.lock:
            self.history.setdefault(name, []).append(weights)
            version = len(self.history[name]) - 1
        lf.add_adapter(model, name, weights, timeout=None)
        with self.lock:
            self.current[name] = version

    def remove(self, model, name):
        with self.lock:
            lf.remove_adapter(model, name)
            self.current[name] = None

    def snapshot(self):
        """name -> (index of the current version or None, number of versions published so far)."""
        with self.lock:
            return {name: (v, len(self.history.get(name, ()))) for name, v in self.current.items()}


def random_weights(rng: random.Random):
    """Adapter weights for layers "0" and "2": random ranks, deltas as large as the base output."""
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    out = {}
    for key, (fan_in, fan_out) in (("0", (IN, HIDDEN)), ("2", (HIDDEN, OUT))):
        r = rng.randint(1, 4)
        out[key] = (torch.randn(r, fan_in, generator=g) * fan_in ** -0.5,
                    torch.randn(fan_out, r, generator=g) * r ** -0.5, rng.choice([0.5, 1.0, 2.0]))
    return out


def reference(model, weights, x):
    """One sequence [SEQ, IN] through the model with one adapter version (None: base), float64."""
    h = x.double()
    for key in ("0", "1", "2"):
        layer = model.get_submodule(key)
        if key == "1":
            h = torch.tanh(h)
            continue
        y = h @ layer.weight.double().T + layer.bias.double()
        if weights is not None:
            A, B, s = weights[key]
            y = y + s * (h @ A.double().T) @ B.double().T
        h = y
    return h


def build(seed=0, max_adapters=12):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    # 6 names loaded at most; the spare slots hold old versions that open batches still read.
    lf.inject_multi_lora(model, ["0", "2"], max_adapters=max_adapters, max_rank=4)
    versions = Versions()
    rng = random.Random(seed)
    for name in NAMES + [CHURN[0]]:
        versions.publish(model, name, random_weights(rng))
    versions.current[CHURN[1]] = None
    return model, versions


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.served = self.refused = self.swaps = self.swaps_refused = 0
        self.wrong = []

    def add(self, **counts):
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


def check_request(model, versions, names, x, ys, before, after, tally):
    """Row b must match exactly one version of names[b] current at some point between the two
    snapshots taken around adapter_batch entry, and all forwards of the request that same one."""
    for b, name in enumerate(names):
        if name is None:
            candidates = [None]
        else:
            # from the version current at the first snapshot (or, if the name was absent then, the
            # next one published) to the last one published by the second (current then, or removed
            # by then, or recorded by publish_waiting and landing): a name may be added and removed
            # again in between
            (current_before, published_before), (_, published_after) = before[name], after[name]
            lo = published_before if current_before is None else current_before
            hi = published_after - 1
            candidates = versions.history[name][lo:hi + 1]
        ok = False
        for weights in candidates:
            ref = reference(model, weights, x[b])
            if all(rel_error(y[b], ref) <= TOLERANCE[torch.float32] for y in ys):
                ok = True
                break
        if not ok:
            tally.add(wrong=[(names, b, name, before.get(name), after.get(name))])


def request(model, versions, rng, tally):
    """One request: random names; KeyError (refused) when one of them is removed at entry."""
    names = [rng.choice(NAMES + list(CHURN) + [None]) for _ in range(BATCH)]
    x = torch.randn(BATCH, SEQ, IN, generator=torch.Generator().manual_seed(rng.randrange(2 ** 31)))
    before = versions.snapshot()
    try:
        block = lf.adapter_batch(model, names)
        block.__enter__()
    except KeyError:
        tally.add(refused=1)
        return None
    after = versions.snapshot()
    return names, x, before, after, block


def serve_request(model, versions, rng, tally) -> bool:
    """One request in this thread: two forwards with a thread switch between, checked; False when
    it was refused."""
    opened = request(model, versions, rng, tally)
    if opened is None:
        return False
    names, x, before, after, block = opened
    try:
        y1 = model(x)
        threading.Event().wait(0)  # let the swapper run between the two forwards
        y2 = model(x)
    finally:
        block.__exit__(None, None, None)
    check_request(model, versions, names, x, (y1, y2), before, after, tally)
    tally.add(served=1)
    return True


def swap(model, versions, rng, tally):
    """A hot swap of a served name, or a churn step (remove one churn name, add the other)."""
    try:
        if rng.random() < 0.7:
            versions.publish(model, rng.choice(NAMES), random_weights(rng))
        else:
            # remove the churn name that is loaded, then load the other; when an earlier step
            # removed one and found no slot free for the other, neither is loaded: just load one
            gone = next((n for n in CHURN if versions.current[n] is not None), None)
            if gone is not None:
                versions.remove(model, gone)
            versions.publish(model, CHURN[1 - CHURN.index(gone)] if gone else CHURN[0], random_weights(rng))
        tally.add(swaps=1)
    except ValueError as e:  # every spare slot is still read by open batches: try again later
        assert "no slot is free" in str(e) or "slots are in use" in str(e), e
        tally.add(swaps_refused=1)


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")  # also: Triton's interpreter is not thread-safe


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so blocks, forwards and swaps interleave
    yield
    sys.setswitchinterval(old)


def report(tally):
    assert not tally.wrong, f"{len(tally.wrong)} wrong outputs, e.g. {tally.wrong[:3]}"
    assert tally.served >= REQUESTS and tally.refused > 0, vars(tally)
    assert tally.swaps >= 20, vars(tally)


def failing_into(errors, fn):
    """fn, with any exception kept in errors: a thread's exception would only be printed."""
    def run(*args):
        try:
            fn(*args)
        except BaseException as e:
            errors.append(e)
    return run


@torch.no_grad()
def test_threads_serving_with_hot_swaps(fast_switching):
    model, versions = build()
    tally, stop = Tally(), threading.Event()
    workers, per_worker = 4, REQUESTS // 4
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        served = 0
        while served < per_worker:
            served += serve_request(model, versions, rng, tally)

    def swapper():
        rng = random.Random(99)
        while not stop.is_set():
            swap(model, versions, rng, tally)
            stop.wait(0.0005)

    threads = [threading.Thread(target=failing_into(errors, worker), args=(i,)) for i in range(workers)]
    swap_thread = threading.Thread(target=failing_into(errors, swapper))
    swap_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    swap_thread.join()
    assert not errors, errors
    report(tally)


@torch.no_grad()
def test_asyncio_serving_with_hot_swaps():
    model, versions = build(seed=1)
    tally = Tally()
    tasks, per_task = 8, REQUESTS // 8

    async def client(seed):
        rng = random.Random(seed)
        served = 0
        while served < per_task:
            opened = request(model, versions, rng, tally)
            if opened is None:
                await asyncio.sleep(0)
                continue
            names, x, before, after, block = opened
            try:
                await asyncio.sleep(0)  # other clients open blocks, the swapper swaps
                y1 = model(x)
                await asyncio.sleep(0)
                y2 = model(x)
            finally:
                block.__exit__(None, None, None)
            check_request(model, versions, names, x, (y1, y2), before, after, tally)
            tally.add(served=1)
            served += 1

    async def swapper(done):
        rng = random.Random(7)
        while not done.is_set():
            swap(model, versions, rng, tally)
            await asyncio.sleep(0)

    async def main():
        done = asyncio.Event()
        swapping = asyncio.create_task(swapper(done))
        await asyncio.gather(*(client(i) for i in range(tasks)))
        done.set()
        await swapping

    asyncio.run(main())
    report(tally)
