"""``python -m bench --tune [--model llama-7b] [--rank 16] [--dtype bf16]``: fill the strategy cache.

Times every candidate strategy and block config (lora_fused.dispatch.tuning) for the
forward and backward of each linear layer of a model, at token counts from
decode to long prefill, with and without LoRA dropout, and keeps the winners in
the JSON cache (``$LORA_FUSED_CACHE_DIR``, default ``~/.cache/lora_fused``), so
training and serving start with measured choices. Buckets already cached are
not timed again. Without CUDA nothing is measured: the table shows the heuristic.
"""
from __future__ import annotations

import time

import torch

from lora_fused.dispatch import tuning

from .measure import TORCH_DTYPES


def run_tune(model: str, rank: int, dtype_name: str, device: torch.device) -> int:
    shapes = tuning.MODEL_SHAPES[model]
    dtype = TORCH_DTYPES[dtype_name]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (nothing is measured)"
    print(f"tune: {model} ({len(shapes)} layer shapes), r={rank}, {dtype_name}, on {where}; "
          f"cache {tuning.cache_path()}", flush=True)
    t0 = time.time()
    for p in (0.0, 0.1):
        tuning.tune(shapes, rank=rank, dtype=dtype, dropout_p=p, device=device,
                    report=lambda line: print("tune:", line, flush=True))
    print(f"tune: done in {time.time() - t0:.0f} s", flush=True)
    return 0
