"""Data-parallel LoRA fine-tuning with lora-fused: DDP (default) or FSDP2, under torchrun.

    torchrun --nproc_per_node=2 examples/ddp_train.py          # 2 GPUs (nccl), or 2 CPU processes (gloo)
    torchrun --nproc_per_node=2 examples/ddp_train.py --fsdp   # FSDP2: fully_shard per decoder layer
    torchrun --nproc_per_node=8 examples/ddp_train.py --model meta-llama/Llama-3.2-1B --lr 2e-4

Without ``--model`` the base is a small Llama built from a config (random weights,
nothing downloaded). ``lf.inject_lora`` swaps the targeted ``nn.Linear``s for fused
``LoRALinear``s and freezes everything else, so DDP / FSDP2 only reduce the LoRA
gradients. The data is a fixed set of random token sequences split across ranks
with a ``DistributedSampler``: the loss falls as the adapters memorise it (swap in
your own dataset for real training). On CUDA
the forward runs under bf16 autocast with fp32 adapters; on CPU lora-fused uses its
torch reference path (its Triton kernels need a GPU). ``--save`` writes the adapter
(``lf.lora_state_dict``, full tensors, rank 0 only).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lora_fused as lf


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default=None,
                   help="Hugging Face model id or path (default: a small random Llama)")
    p.add_argument("--target", default="all-linear",
                   help="comma-separated module names (e.g. q_proj,v_proj) or all-linear")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--samples", type=int, default=16, help="size of the synthetic dataset")
    p.add_argument("--lr", type=float, default=1e-2, help="for the random model; ~2e-4 for a pretrained one")
    p.add_argument("--save", default=None, help="write the LoRA state dict here (torch.save)")
    p.add_argument("--init-method", default="env://",
                   help="rendezvous URL (default env://, as torchrun sets it up); e.g. file:///tmp/rdzv "
                        "with RANK and WORLD_SIZE set: no TCP port to pick")
    return p.parse_args(argv)


def build_model(name):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    if name is not None:
        # fp32 master weights (LoRA included); on CUDA the forward runs under bf16 autocast
        return AutoModelForCausalLM.from_pretrained(name).float()
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config)


def fully_shard_model(model):
    """FSDP2: one shard group per decoder layer, then the root (frozen and LoRA params mixed is fine)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    for layer in getattr(getattr(model, "model", model), "layers", []):
        fully_shard(layer)
    fully_shard(model)
    return model


def train(args, rank, world, device):
    """args.steps AdamW steps of the LoRA parameters, each rank on its share of the data; the
    trained LoRA state dict (full tensors, on the CPU) on every rank."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)  # identical base model and adapter init on every rank
    model = build_model(args.model).to(device)
    target = args.target if args.target == "all-linear" else args.target.split(",")
    lf.inject_lora(model, target, r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.fsdp:
        train_model = fully_shard_model(model)
    else:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    vocab = model.config.vocab_size
    samples = max(args.samples, args.batch * world)  # at least one full batch per rank
    data = torch.randint(0, vocab, (samples, args.seq), generator=torch.Generator().manual_seed(1))
    sampler = DistributedSampler(TensorDataset(data), num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(TensorDataset(data), batch_size=args.batch, sampler=sampler, drop_last=True)
    if rank == 0:
        print(f"world {world} on {device.type} ({'FSDP2' if args.fsdp else 'DDP'}), "
              f"{n_lora / 1e6:.3f}M LoRA parameters, global batch {args.batch * world}", flush=True)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    step, epoch, start = 0, 0, time.perf_counter()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for (ids,) in loader:
            ids = ids.to(device)
            with autocast:
                loss = train_model(input_ids=ids, labels=ids).loss
            loss.backward()  # DDP all-reduces / FSDP2 reduce-scatters the LoRA gradients only
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0 or step == 1 or step == args.steps:
                mean = loss.detach().float().clone()
                dist.all_reduce(mean)  # SUM (gloo has no AVG)
                if rank == 0:
                    print(f"step {step:4d}  loss {mean.item() / world:.4f}  "
                          f"{time.perf_counter() - start:.1f}s", flush=True)
            if step == args.steps:
                break
        epoch += 1

    # Every rank takes part: with FSDP2 each LoRA tensor is a sharded DTensor.
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
            for k, v in lf.lora_state_dict(model).items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.init_method == "env://":
        dist.init_process_group("nccl" if cuda else "gloo")
    else:  # file:// and tcp:// take the rank and world size as arguments
        dist.init_process_group("nccl" if cuda else "gloo", init_method=args.init_method,
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    state = train(args, rank, world, device)
    if rank == 0 and args.save:
        torch.save(state, args.save)
        print(f"saved {len(state)} LoRA tensors to {args.save}", flush=True)
    # train() has returned, so the DDP / FSDP2 wrappers that hold the process group are gone
    # (collect their reference cycles now: a wrapper freed later, at interpreter exit, would
    # tear gloo down while a peer still talks to it); no rank leaves before every rank is here.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
