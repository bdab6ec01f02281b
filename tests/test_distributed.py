"""LoRA training under DDP and FSDP2 equals one process on the same global batch.

A tiny ``transformers`` Llama (built from a config, nothing downloaded; 2 layers)
gets ``lf.inject_lora(model, "all-linear", r=3)`` — r=3 so FSDP2 shards
``lora_A`` [3, in] unevenly — and takes 3 AdamW steps. Two CPU processes (gloo;
``torch.multiprocessing``, fork where available; rendezvous through a file in
``tmp_path``, so no port to pick) each get half of every global batch; the
reference is one process on the full batch (mean loss; every rank has as many
tokens, so the mean of the rank means is the global mean), run in the test process.
Every LoRA tensor, the frozen base weights and the per-step losses must agree to
‖Δ‖/‖ref‖ ≤ 1e-5 (fp32), and the LoRA tensors must have moved.

The workers run the Triton kernels through the interpreter (``TRITON_INTERPRET``
is inherited from conftest), so this is the fused forward and backward under
data parallelism, not the torch reference path. FSDP2 (``fully_shard``) is
applied per decoder layer and then to the root, so each shard group holds frozen
base weights next to trainable LoRA tensors (FSDP2 handles mixed requires_grad
per parameter). Every run is bounded: its processes are killed after
``TIMEOUT_S`` and the test fails.

``examples/ddp_train.py`` (``torchrun --nproc_per_node=N examples/ddp_train.py
[--fsdp]``: nccl on GPUs, gloo on CPU) is run here too, on 2 processes with the
environment torchrun sets, to keep the README's command working. Its rendezvous
is a file as well (``--init-method file://...``): a free TCP port picked by the
test was released before the workers bound it, and another test process (``-n 2``)
could take it meanwhile, leaving the workers waiting until the timeout.

Most of the file's time is the interpreter and the first trace of the model in each
process.
"""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import functools
import gc
import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lora_fused as lf
from lora_cases import rel_error

transformers = pytest.importorskip("transformers")

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6 kept FSDP2 under _composable
    try:
        from torch.distributed._composable.fsdp import fully_shard
    except ImportError:
        fully_shard = None

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
STEPS = 3
LAYERS = 2
BATCH, SEQ = 4, 8  # global batch: each of the 2 ranks gets 2 sequences
TIMEOUT_S = 120
TOL = 1e-5
# spawn, not fork: a forked worker inherits the xdist worker's state (threads of earlier
# tests, their locks), and in loaded full-suite runs two forked workers printed their last
# line and then hung for 120 s, even with the os._exit below. spawn re-imports torch and
# transformers (~5 s more per test on 2 cores). Each worker runs with one intra-op thread.
START_METHOD = "spawn"


# --------------------------------------------------------------------------
# the model, the data and one training loop, shared by workers and reference
# --------------------------------------------------------------------------
def tiny_llama():
    """The same model in every process: seeded base, LoRA with random lora_B."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, attn_implementation="eager",
                                      use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    lf.inject_lora(model, "all-linear", r=3, lora_alpha=6.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fresh adapter has lora_B = 0 (a no-op): randomize it
        for module in model.modules():
            if isinstance(module, lf.LoRALinear):
                module.lora_B.copy_(0.1 * torch.randn(module.lora_B.shape, generator=g))
    return model


def global_batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 64, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def train(model, params, batches, reduce_loss=None):
    """STEPS AdamW steps on the LoRA parameters; the losses (rank-averaged if reduce_loss)."""
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-2)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        losses.append(reduce_loss(loss) if reduce_loss else loss)
    return torch.stack(losses)


def full_state(model):
    """The state dict as plain tensors (FSDP2's sharded DTensors gathered: a collective)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


@contextlib.contextmanager
def single_thread():
    """One intra-op thread: on 2 cores shared with other processes, more threads only spin."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------
# the workers
# --------------------------------------------------------------------------
def _worker(rank, mode, init_file, out_dir):
    torch.set_num_threads(1)
    from lora_fused.kernels import common
    common.POISON_OUTPUTS = True  # as conftest does in the test process
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        torch.save(_train_on_rank(rank, mode), os.path.join(out_dir, f"rank{rank}.pt"))
        # As examples/ddp_train.py: the DDP / FSDP2 wrappers holding the group were freed when
        # _train_on_rank returned (their cycles collected here), and no rank leaves before all are done.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train_on_rank(rank, mode):
    """This rank's {"losses", "state"} after training its share of every global batch."""
    model = tiny_llama()
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp2":
        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        raise ValueError(mode)

    def mean_over_ranks(loss):
        loss = loss.clone()
        dist.all_reduce(loss)  # gloo has no ReduceOp.AVG
        return loss / WORLD

    batches = [ids.chunk(WORLD)[rank] for ids in global_batches()]
    losses = train(wrapped, model.parameters(), batches, reduce_loss=mean_over_ranks)
    return {"losses": losses, "state": full_state(model)}


def _exit_when_done(rank, fn, *args):
    """fn(rank, *args), then leave the process at once, skipping exit handlers. In loaded runs
    both (forked) workers printed "saved 8 LoRA tensors" and were still alive 120 s later (a hang,
    not slowness; not reproduced alone): the workers are spawned now, and one that hangs dumps
    every thread's traceback before the parent kills it. An exception still propagates to the parent."""
    faulthandler.dump_traceback_later(TIMEOUT_S - 15, exit=False)  # where a hang is, before the kill
    fn(rank, *args)
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_processes(fn, args, what):
    """fn(rank, *args) on WORLD processes; killed (and the test failed) after TIMEOUT_S."""
    context = mp.start_processes(_exit_when_done, args=(fn, *args), nprocs=WORLD, join=False,
                                 start_method=START_METHOD)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                pytest.fail(f"{what}: {WORLD} workers still running after {TIMEOUT_S} s (killed)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def run_distributed(mode, tmp_path):
    """Train on WORLD processes; each rank's {"losses", "state"}."""
    run_processes(_worker, (mode, str(tmp_path / "rendezvous"), str(tmp_path)), mode)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@functools.lru_cache(maxsize=None)
def single_process_run():
    """The reference: one process, the full global batch, the same steps."""
    with single_thread():
        initial = full_state(tiny_llama())
        model = tiny_llama()
        losses = train(model, model.parameters(), global_batches())
        return initial, losses, full_state(model)


def check_matches_single_process(result):
    initial, ref_losses, ref_state = single_process_run()
    assert rel_error(result["losses"], ref_losses) <= TOL, (result["losses"], ref_losses)
    assert result["state"].keys() == ref_state.keys()
    lora_keys = [k for k in ref_state if k.endswith(("lora_A", "lora_B"))]
    assert len(lora_keys) == 2 * 7 * LAYERS  # A and B of 7 linears in each of 2 layers
    errors = {k: rel_error(result["state"][k], ref_state[k]) for k in ref_state}
    bad = {k: e for k, e in errors.items() if e > TOL}
    assert not bad, f"tensors differing from the single-process run: {bad}"
    for k in ref_state:
        moved = rel_error(ref_state[k], initial[k])
        if k in lora_keys:
            assert moved > 1e-3, f"{k} barely moved ({moved:.1e}): the comparison says nothing"
        else:
            assert moved == 0.0, f"frozen {k} changed"


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------
def test_ddp_matches_single_process(tmp_path):
    single_process_run()  # first: its result is the reference
    results = run_distributed("ddp", tmp_path)
    for key, value in results[0]["state"].items():  # DDP keeps the replicas identical
        assert torch.equal(value, results[1]["state"][key]), f"ranks disagree on {key}"
    check_matches_single_process(results[0])


@pytest.mark.skipif(fully_shard is None, reason="this torch has no FSDP2 (fully_shard)")
def test_fsdp2_matches_single_process(tmp_path):
    single_process_run()
    results = run_distributed("fsdp2", tmp_path)
    check_matches_single_process(results[0])
    check_matches_single_process(results[1])


# --------------------------------------------------------------------------
# examples/ddp_train.py, with the environment torchrun would give it
# --------------------------------------------------------------------------
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"


def _example_worker(rank, argv):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    spec = importlib.util.spec_from_file_location("ddp_train_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(argv)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_example_script_trains_and_saves(mode, tmp_path):
    """What ``torchrun --nproc_per_node=2 examples/ddp_train.py [--fsdp]`` runs (RANK, WORLD_SIZE
    set as torchrun does; gloo on CPU; a file rendezvous instead of MASTER_ADDR/PORT), at a size
    the interpreter runs quickly."""
    if mode == "fsdp2" and fully_shard is None:
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    single_process_run()  # the model code runs in this process too
    out = tmp_path / "adapter.pt"
    argv = ["--steps", "2", "--batch", "1", "--seq", "8", "--r", "4", "--target", "q_proj,v_proj",
            "--save", str(out), "--init-method", f"file://{tmp_path / 'rendezvous'}"]
    argv += ["--fsdp"] if mode == "fsdp2" else []
    run_processes(_example_worker, (argv,), f"example ({mode})")
    state = torch.load(out)
    assert len(state) == 2 * 2 * 2  # lora_A and lora_B of q_proj and v_proj in 2 layers
    for key, value in state.items():
        assert key.endswith(("lora_A", "lora_B")) and torch.isfinite(value).all(), key
        assert value.abs().sum() > 0, f"{key} is all zeros: lora_B never trained"
