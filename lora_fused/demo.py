"""The main job: fine-tune, save, reload and serve LoRA adapters on a small Llama.

    python -m lora_fused.demo [--device cpu|cuda] [--steps 120] [--target q_proj,v_proj|all-linear]

1. builds a small Llama from a ``LlamaConfig`` (no downloads) and pretrains it
   briefly on the character-level corpus shipped in ``lora_fused/data`` (it
   stands in for a pretrained checkpoint),
2. injects fused LoRA (``lf.inject_lora``) and fine-tunes only the adapters on a
   shifted task, the corpus in capitals (loss printed falling),
3. saves the adapter in PEFT's format and reloads it into a fresh base model
   (``lf.save_peft_adapter`` / ``lf.load_peft_adapter``), checking the logits,
4. trains two more adapters (words spelled backwards; the corpus itself),
5. serves a mixed batch — one adapter (or none) per prompt, every adapter in a
   slot of ``MultiLoRALinear`` layers — with greedy decoding in one batch, and
   compares it with decoding one request at a time, adapters swapped per group,
6. times one training step of the same model with lora-fused, an unfused eager
   LoRA (loralib style) and PEFT, in the same process.

On CPU lora-fused runs its torch reference path (the Triton kernels need a GPU;
``TRITON_INTERPRET=1`` runs them on CPU for testing, not for speed), so the CPU
timings check the harness; on CUDA the same command runs the kernels at larger
sizes.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lora_fused as lf
from lora_fused.adapters.injection import find_targets

PRETRAIN_LR = 5e-3
ADAPTER_LR = 1e-2  # 3e-3 left the capitals adapter writing lowercase after 100 steps

SIZES = {  # name: (hidden, intermediate, layers, heads, kv_heads, batch, seq)
    "cpu": (128, 256, 2, 4, 2, 16, 64),
    "gpu": (1024, 2816, 4, 16, 4, 32, 256),
}


# --- data ------------------------------------------------------------------

def load_corpus() -> str:
    return resources.files("lora_fused").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def reverse_words(text: str) -> str:
    return "\n".join(" ".join(word[::-1] for word in line.split(" ")) for line in text.splitlines())


class CharTokenizer:
    def __init__(self, texts):
        self.chars = sorted(set("".join(texts)))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def batches(ids: torch.Tensor, batch: int, seq: int, device, seed: int):
    """Endless random windows (inputs, next-character targets) of the encoded text."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        window = torch.stack([ids[s:s + seq + 1] for s in starts.tolist()]).to(device)
        yield window[:, :-1], window[:, 1:]


# --- models ----------------------------------------------------------------

def build_base(vocab: int, size: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, _, seq = SIZES[size]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=4 * seq,
                         attn_implementation="eager")
    torch.manual_seed(0)  # the same "pretrained" base every time it is built
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


class EagerLoRALinear(nn.Module):
    """The unfused baseline: base(x) + s · B(A(dropout(x))), as loralib writes it."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))


def with_lora(provider: str, base, target, r, alpha, dropout):
    """A copy of ``base`` with LoRA on ``target`` by ``provider``: fused | eager | peft."""
    model = copy.deepcopy(base)
    if provider == "fused":
        return lf.inject_lora(model, target, r=r, lora_alpha=alpha, lora_dropout=dropout)
    if provider == "eager":
        for name in find_targets(model, target):
            model.set_submodule(name, EagerLoRALinear(model.get_submodule(name), r, alpha, dropout))
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        return model
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules=target))


def lm_loss(model, inputs, targets):
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def train(model, data, steps: int, lr: float, label: str, log_every: int = 0):
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=f"train {label}", leave=False, mininterval=0.5)
    for step in bar:
        loss = lm_loss(model, *next(data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if log_every and (step % log_every == 0 or step == steps - 1):
            tqdm.write(f"  [{label}] step {step:4d}  loss {loss.item():.4f}")
    return losses


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, new_tokens: int, device) -> str:
    ids = tokenizer.encode(prompt).to(device)[None]
    for _ in range(new_tokens):
        next_id = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], 1)
    return tokenizer.decode(ids[0, len(prompt):].tolist())


def build_server(base, target, r: int, adapter_dirs: dict):
    """A copy of ``base`` with ``MultiLoRALinear`` at the targets and each saved PEFT adapter in a slot."""
    server = lf.inject_multi_lora(copy.deepcopy(base), target, max_adapters=len(adapter_dirs), max_rank=r)
    for name, directory in adapter_dirs.items():
        lf.load_peft_adapter_slot(server, directory, name)
    return server.eval()


@torch.no_grad()
def serve_mixed_batch(server, requests, tokenizer, device, new_tokens=40):
    """Greedy completions for ``[(adapter name or None, prompt)]`` in one batch.

    Every forward routes each sequence to its own adapter (``lf.adapter_batch``:
    one segment plan per step, shared by all layers). Prompts share a length
    (this demo does not pad).
    """
    if len({len(p) for _, p in requests}) != 1:
        raise ValueError(f"prompts must share one length, got {[p for _, p in requests]}")
    ids = torch.stack([tokenizer.encode(p) for _, p in requests]).to(device)
    prompt_len = ids.shape[1]
    with lf.adapter_batch(server, [a for a, _ in requests]):
        for _ in range(new_tokens):
            next_id = server(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], 1)
    return [tokenizer.decode(row[prompt_len:].tolist()) for row in ids]


def serve_grouped(model, adapters: dict, requests, tokenizer, device, new_tokens=40):
    """The baseline: one adapter at a time, its weights loaded into the model's
    LoRALinear layers (None: adapters disabled), each group decoded on its own."""
    layers = [m for m in model.modules() if isinstance(m, lf.LoRALinear)]
    outputs = [None] * len(requests)
    model.eval()
    for name in dict.fromkeys(a for a, _ in requests):
        for layer in layers:
            layer.disabled = name is None
        if name is not None:
            model.load_state_dict(adapters[name], strict=False)
        for i, (adapter, prompt) in enumerate(requests):
            if adapter == name:
                outputs[i] = greedy(model, tokenizer, prompt, new_tokens, device)
    for layer in layers:
        layer.disabled = False
    return outputs


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, (time.perf_counter() - start) * 1e3


def make_step(model):
    """``step(inputs, targets)``: one SGD training step of ``model``'s trainable parameters."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(inputs, targets):
        loss = lm_loss(model, inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def interleaved_step_ms(models: dict, data, device, rounds: int) -> dict:
    """Median ms of one training step of each model over ``rounds`` interleaved rounds.

    Each round draws one batch and steps every model on it in turn, the order rotated
    each round, so noise from the rest of the machine falls on all models alike; two
    warm-up rounds (allocators, kernels) are not counted.
    """
    steps = {name: make_step(model) for name, model in models.items()}
    names = list(steps)
    times = {name: [] for name in names}
    for i in range(rounds + 2):
        inputs, targets = next(data)
        k = i % len(names)
        for name in names[k:] + names[:k]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[name](inputs, targets)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


# --- main ------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="model size (default: cpu on CPU, gpu on CUDA)")
    parser.add_argument("--pretrain-steps", type=int, default=150,
                        help="full training steps that stand in for a pretrained base")
    parser.add_argument("--steps", type=int, default=100, help="training steps of each adapter")
    parser.add_argument("--target", default="all-linear",
                        help="comma-separated module names, or all-linear")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default=None, help="where to save adapters (default: a temp dir)")
    parser.add_argument("--timing-steps", type=int, default=15,
                        help="interleaved rounds of the step-time table (one step per provider each)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    size = args.size or ("gpu" if device.type == "cuda" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = "all-linear" if args.target == "all-linear" else args.target.split(",")
    r, alpha, dropout = args.rank, 2.0 * args.rank, 0.05
    *_, batch, seq = SIZES[size]
    out = Path(args.out or tempfile.mkdtemp(prefix="lora_fused_demo_"))
    print(f"lora-fused {lf.__version__} | torch {torch.__version__} | {device} | "
          f"backend {lf.select_backend(device, dtype)} | {str(dtype).replace('torch.', '')}")

    text = load_corpus()
    tasks = {"river": text, "capitals": text.upper(), "mirror": reverse_words(text)}
    tokenizer = CharTokenizer(tasks.values())
    data = {name: batches(tokenizer.encode(t), batch, seq, device, seed=i)
            for i, (name, t) in enumerate(tasks.items())}

    # 1. a base model to adapt
    base = build_base(len(tokenizer.chars), size, device, dtype)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"Llama from config: {n_params / 1e6:.2f}M parameters; pretraining it on the corpus "
          f"({args.pretrain_steps} full steps)")
    base_losses = train(base, data["river"], args.pretrain_steps, PRETRAIN_LR, "base")
    print(f"base model: loss {base_losses[0]:.3f} -> {min(base_losses[-5:]):.3f}")
    base.requires_grad_(False)

    # 2. inject fused LoRA and fine-tune the adapter only
    model = with_lora("fused", base, target, r, alpha, dropout)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"fused LoRA r={r} on {args.target}: {n_lora / 1e3:.1f}K trainable parameters; "
          "fine-tuning adapter 'capitals':")
    losses = train(model, data["capitals"], args.steps, ADAPTER_LR, "capitals",
                   log_every=max(1, args.steps // 5))
    print(f"adapter 'capitals': loss {losses[0]:.3f} -> {min(losses[-5:]):.3f}")

    # 3. PEFT format round trip
    lf.save_peft_adapter(model, out / "capitals")
    reloaded = lf.load_peft_adapter(copy.deepcopy(base), out / "capitals")
    probe = next(data["capitals"])[0][:4]
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        diff = (model(input_ids=probe).logits - reloaded(input_ids=probe).logits).abs().max().item()
    print(f"saved in PEFT format to {out / 'capitals'} and reloaded: "
          f"max |logit difference| = {diff:.2e}")

    # 4. two more adapters
    # Snapshots: a state dict shares storage with the parameters, and serving
    # loads other adapters into this very model.
    def snapshot(m):
        return {k: v.detach().clone() for k, v in lf.lora_state_dict(m).items()}

    adapters = {"capitals": snapshot(model)}
    for name in ("mirror", "river"):
        other = with_lora("fused", base, target, r, alpha, dropout)
        other_losses = train(other, data[name], args.steps, ADAPTER_LR, name)
        print(f"adapter {name!r}: loss {other_losses[0]:.3f} -> {min(other_losses[-5:]):.3f}")
        lf.save_peft_adapter(other, out / name)
        adapters[name] = snapshot(other)

    # 5. one mixed batch, one adapter per request, all adapters loaded into slots
    requests = [(None, "The miller "), ("river", "The miller "), ("capitals", "THE MILLER "),
                ("mirror", "ehT rellim "), ("river", "In the mill")]
    server = build_server(base, target, r, {name: out / name for name in adapters})
    completions, mixed_ms = timed(lambda: serve_mixed_batch(server, requests, tokenizer, device), device)
    print("\nmixed batch, greedy decoding, one batch for all adapters (adapter: prompt -> completion):")
    for (adapter, prompt), completion in zip(requests, completions):
        print(f"  {str(adapter):>9}: {prompt!r} -> {completion!r}")
    grouped, grouped_ms = timed(lambda: serve_grouped(model, adapters, requests, tokenizer, device), device)
    same = sum(a == b for a, b in zip(completions, grouped))
    print(f"  one mixed batch (lf.multi_lora_linear): {mixed_ms:.0f} ms; one request at a time, "
          f"adapters swapped per group: {grouped_ms:.0f} ms; same completions for {same}/{len(requests)}")

    # 6. one training step, three ways
    print(f"\ntraining step of this model (batch {batch} x {seq}, LoRA r={r} on {args.target}), "
          f"median of {args.timing_steps} interleaved rounds:")
    candidates = {}
    for provider in ("fused", "eager", "peft"):
        try:
            candidates[provider] = with_lora(provider, base, target, r, alpha, dropout)
        except ImportError as e:
            print(f"  {provider}: skipped ({e})")
    rows = list(interleaved_step_ms(candidates, data["river"], device, args.timing_steps).items())
    fused_ms = rows[0][1]
    print(f"  {'provider':<8}{'step ms':>10}{'vs fused':>10}")
    for provider, ms in rows:
        print(f"  {provider:<8}{ms:>10.2f}{ms / fused_ms:>9.2f}x")
    if device.type != "cuda":
        print("  (CPU: lora-fused runs its torch path here; GPU timings measure the Triton kernels)")


if __name__ == "__main__":
    main()
