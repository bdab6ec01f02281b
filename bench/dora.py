"""DoRA training step: lora-fused's DoRALinear against PEFT's DoRA (and lora-fused's LoRA).

    python -m bench.dora [--size 1024] [--rows 256] [--rank 16] [--dropout 0.1] [--rounds 31]
                         [--dtype fp32|bf16|fp16] [--device cpu|cuda] [--threads N]

One ``nn.Linear(size, size)`` wrapped three ways over the same weights: ``peft-dora``
(``get_peft_model(..., LoraConfig(use_dora=True))``), ``dora`` (``lf.inject_lora(...,
use_dora=True)``) and ``lora`` (``lf.inject_lora``: the floor DoRA adds to). A step is
forward + backward (x requires grad) with the same upstream gradient. Rounds are
interleaved (one step of each provider per round, in turn), so a slow stretch of a
shared host hits all three; the medians are printed with the ratios goals D1-D3
read: dora / peft-dora (CPU goal <= 0.8 at 1024², M = 256; GPU goal <= 1 / 1.6) and
dora / lora (GPU goal <= 1.15). Outputs are checked against PEFT's before timing (exit 1 if off).

``python -m bench --cases dora`` runs the same comparison as cases of the sweep (goals D1-D4,
bench/goals.py) with the providers of bench/providers/dora.py.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Largest relative output difference to PEFT accepted before timing (PEFT rounds its norm in
#: the compute dtype, lora-fused in fp32).
MAX_ERROR = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}


def build(size: int, rank: int, dropout: float, dtype, device):
    import peft
    import torch
    from torch import nn

    import lora_fused as lf

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(size, size)).to(device=device, dtype=dtype)
    config = peft.LoraConfig(target_modules=["0"], r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                             use_dora=True, init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).train()
    dora = lf.inject_lora(copy.deepcopy(base), ["0"], r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                          use_dora=True).train()
    lora = lf.inject_lora(copy.deepcopy(base), ["0"], r=rank, lora_alpha=2 * rank, lora_dropout=dropout).train()
    layer, peft_layer = dora[0], peft_model.base_model.model[0]
    with torch.no_grad():  # the same (nonzero) adapter everywhere
        for ours, theirs in ((layer.lora_A, peft_layer.lora_A["default"].weight),
                             (layer.lora_B, peft_layer.lora_B["default"].weight),
                             (layer.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight)):
            ours.copy_(theirs)
        lora[0].lora_A.copy_(layer.lora_A)
        lora[0].lora_B.copy_(layer.lora_B)
    return {"peft-dora": peft_model, "dora": dora, "lora": lora}


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, DTYPES[args.dtype]), torch.device(args.device)
    models = build(args.size, args.rank, args.dropout, dtype, device)
    x = torch.randn(args.rows, args.size, device=device, dtype=dtype)
    dy = torch.randn(args.rows, args.size, device=device, dtype=dtype)

    with torch.no_grad():
        for m in models.values():
            m.eval()
        ref = models["peft-dora"](x).float()
        err = (models["dora"](x).float() - ref).norm() / ref.norm()
        for m in models.values():
            m.train()
    print(f"dora vs peft-dora output (eval): relative error {err:.2e}")
    if not err <= MAX_ERROR[args.dtype]:
        print(f"FAILED: above {MAX_ERROR[args.dtype]:g}; not timing")
        return 1

    def step(model):
        xx = x.clone().requires_grad_()
        model(xx).backward(dy)
        for p in model.parameters():
            p.grad = None

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for model in models.values():
        for _ in range(3):
            step(model)
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            sync()
            start = time.perf_counter()
            step(model)
            sync()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"{args.size}x{args.size}, M={args.rows}, r={args.rank}, p={args.dropout}, {args.dtype} on {device} "
          f"({torch.get_num_threads()} threads), median of {args.rounds} interleaved rounds:")
    for name, ms in med.items():
        print(f"  {name:10s} {ms:9.3f} ms")
    print(f"  dora / peft-dora = {med['dora'] / med['peft-dora']:.3f}   dora / lora = {med['dora'] / med['lora']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
