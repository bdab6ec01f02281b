"""The main job: fine-tune a small LoRA model and compare fused vs unfused LoRA.

    python -m lora_fused.demo [--device cpu|cuda] [--steps 60] [--width 256]

Builds a small residual MLP language-model-like stack from config (no
downloads), wraps every linear in ``LoRALinear`` via ``from_linear``, trains
only the adapters on a synthetic next-token task (loss printed falling),
checks merge() keeps the outputs, then times one layer's forward and
forward+backward: lora-fused vs the unfused eager formula vs the base linear.
On CPU lora-fused runs its torch reference path (the Triton kernels need a
GPU, or TRITON_INTERPRET=1 which is a correctness tool, not a fast path), so
CPU timings prove the harness only; on CUDA they measure the kernels.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import lora_fused as lf


class TinyLM(nn.Module):
    """Embedding → n residual MLP blocks → output head: enough linears to adapt."""

    def __init__(self, vocab: int, width: int, depth: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(width, 2 * width), "down": nn.Linear(2 * width, width)})
            for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block["down"](F.gelu(block["up"](self.norm(h))))
        return self.head(self.norm(h))


def add_lora(model: TinyLM, r: int, alpha: float, dropout: float) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for name in ("up", "down"):
            block[name] = lf.LoRALinear.from_linear(block[name], r=r, lora_alpha=alpha,
                                                    lora_dropout=dropout)


def synthetic_batch(vocab: int, batch: int, seq: int, device, generator):
    """Sequences following t[i+1] = (3·t[i] + 1) mod vocab: learnable, never constant."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    steps = [start]
    for _ in range(seq):
        steps.append((3 * steps[-1] + 1) % vocab)
    seqs = torch.cat(steps, 1).to(device)
    return seqs[:, :-1], seqs[:, 1:]


def train(model, vocab, steps, device, lr=3e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        tokens, targets = synthetic_batch(vocab, 16, 32, device, g)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}")
    return losses


def _median_ms(fn, device, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def compare_providers(M, in_f, out_f, r, dtype, device, repeats):
    """Median ms of one LoRA layer per provider; same inputs for all, in one process."""
    g = torch.Generator().manual_seed(1)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    x = rand(M, in_f).requires_grad_()
    W, b = rand(out_f, in_f, scale=in_f ** -0.5), rand(out_f)
    A = rand(r, in_f, scale=in_f ** -0.5).requires_grad_()
    B = rand(out_f, r, scale=r ** -0.5).requires_grad_()
    s = 2.0
    grad = rand(M, out_f)
    providers = {
        "lora-fused": lambda: lf.lora_linear(x, W, A, B, s, b),
        "eager (unfused)": lambda: F.linear(x, W, b) + s * F.linear(F.linear(x, A), B),
        "base linear": lambda: F.linear(x, W, b),
    }
    rows = []
    for name, fn in providers.items():
        with torch.no_grad():
            fwd = _median_ms(fn, device, repeats)
        fwd_bwd = _median_ms(lambda: fn().backward(grad), device, repeats)
        rows.append((name, fwd, fwd_bwd))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--width", type=int, default=None, help="model width (default: 128 CPU, 1024 GPU)")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    width = args.width or (1024 if device.type == "cuda" else 128)
    backend = lf.select_backend(device, torch.float32)
    print(f"lora-fused {lf.__version__} | torch {torch.__version__} | device {device} | backend {backend}")

    torch.manual_seed(0)
    vocab = 97
    model = TinyLM(vocab, width, depth=2).to(device)
    add_lora(model, r=args.rank, alpha=2.0 * args.rank, dropout=0.05)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"model: width {width}, {total:,} parameters, {trainable:,} trainable (LoRA r={args.rank})")
    print("fine-tuning the adapters:")
    losses = train(model, vocab, args.steps, device)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    model.eval()
    tokens, _ = synthetic_batch(vocab, 4, 16, device, torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(tokens)
        for block in model.blocks:
            block["up"].merge()
            block["down"].merge()
        after = model(tokens)
    print(f"merged adapters: max |logit difference| = {(after - before).abs().max().item():.2e}")

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    M, in_f, out_f = (4096, 4096, 4096) if device.type == "cuda" else (512, 512, 512)
    rows = compare_providers(M, in_f, out_f, 16, dtype, device, repeats=20 if device.type == "cuda" else 5)
    base_fwd, base_fb = rows[-1][1], rows[-1][2]
    print(f"\none LoRA layer, M={M}, {in_f}->{out_f}, r=16, {str(dtype).replace('torch.', '')}"
          + ("" if device.type == "cuda" else " (CPU: torch paths, harness check only)"))
    print(f"{'provider':<18}{'fwd ms':>10}{'x base':>8}{'fwd+bwd ms':>12}{'x base':>8}")
    for name, fwd, fb in rows:
        print(f"{name:<18}{fwd:>10.3f}{fwd / base_fwd:>8.2f}{fb:>12.3f}{fb / base_fb:>8.2f}")


if __name__ == "__main__":
    main()
