"""Serving delta: ``lf.add_lora`` over packed q|k|v, against its byte floor, three single-slice
calls and the base GEMM, plus the vLLM and SGLang layout adapters on the same problem.

    python -m bench.serving [--device cuda|cpu] [--dtype bf16|fp16|fp32] [--smoke] [--threads N]

The speed goals (bench/goals.py; set for an H200, bf16):

- S1 decode: q|k|v 4096 -> 4096 + 1024 + 1024, r = 16, 64 adapters, T = 64 (a row per
  adapter): ``add_lora`` <= 1.10 x its byte floor = (adapter bytes read + x read + y read
  and written) / the device's measured copy bandwidth.
- S2 the packed call >= 1.5 x faster than three single-slice ``add_lora`` calls.
- S3 prefill: T = 8192 over 16 adapters: the delta <= 8 % of the base GEMM (x Wᵀ, cuBLAS).

Rows ``vllm`` and ``sglang`` time ``integrations.vllm.add_lora_linear`` and
``integrations.sglang.run_qkv_lora`` on the same adapters in each engine's layout (their
plans cached as an engine's per-batch metadata allows). Timing: ``bench.measure``
(``do_bench`` medians on CUDA, L2 flushed before each call; perf_counter on a CPU, which
proves the harness, not a GPU figure). Outputs are checked against a float64 reference
first. ``--smoke``: small shapes (the CPU test run).

``python -m bench --cases serving`` runs the same problems as cases of the sweep (``Case.slices``;
goals S1-S3 in bench/goals.py) with the providers of bench/providers/serving.py.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .measure import TORCH_DTYPES, measure_ceilings, time_cpu, time_cuda


@dataclass(frozen=True)
class Problem:
    name: str
    T: int
    adapters: int
    rank: int
    in_features: int
    slices: tuple


GOALS = (Problem("decode", 64, 64, 16, 4096, (4096, 1024, 1024)),
         Problem("prefill", 8192, 16, 16, 4096, (4096, 1024, 1024)))
SMOKE = (Problem("decode", 16, 8, 8, 256, (256, 64, 64)),
         Problem("prefill", 256, 4, 8, 256, (256, 64, 64)))


def build(p: Problem, dtype, device, seed=0):
    """Adapters, inputs and per-row ids: a row per adapter (decode) or contiguous blocks (prefill)."""
    import lora_fused as lf
    g = torch.Generator(device="cpu").manual_seed(seed)
    S, out = len(p.slices), sum(p.slices)
    t = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype)  # noqa: E731
    A = t(p.adapters, S, p.rank, p.in_features, scale=p.in_features ** -0.5)
    B = t(p.adapters, out, p.rank, scale=p.rank ** -0.5)
    x, y = t(p.T, p.in_features), t(p.T, out)
    W = t(out, p.in_features, scale=p.in_features ** -0.5)
    ids = (torch.arange(p.T) * p.adapters // p.T).to(device)
    scalings = torch.full((p.adapters,), 2.0, device=device)
    return dict(A=A, B=B, x=x, y=y, W=W, ids=ids, scalings=scalings, plan=lf.plan_segments(ids, p.adapters))


def providers(p: Problem, d: dict):
    """{name: zero-argument call}: each adds the same delta into its own output."""
    import lora_fused as lf
    from lora_fused.integrations import sglang, vllm
    S, offsets = len(p.slices), [0]
    for w in p.slices:
        offsets.append(offsets[-1] + w)
    cols = [slice(offsets[j], offsets[j + 1]) for j in range(S)]
    A_j = [d["A"][:, j].contiguous() for j in range(S)]
    B_j = [d["B"][:, c].contiguous() for c in cols]
    y_j = [d["y"][:, c] for c in cols]
    a_stacked = tuple(a.unsqueeze(1) for a in A_j)                      # vLLM: [n, 1, r, in] per slice
    b_stacked = tuple(b.unsqueeze(1) for b in B_j)                      # [n, 1, out_j, r]
    qkv_a = d["A"].reshape(p.adapters, S * p.rank, p.in_features)        # SGLang: compact (all ranks equal)
    info = SimpleNamespace(bs=p.T, seg_indptr=torch.arange(p.T + 1, device=d["x"].device, dtype=torch.int32),
                           seg_lens=torch.ones(p.T, dtype=torch.int32, device=d["x"].device),
                           weight_indices=d["ids"].to(torch.int32), permutation=None,
                           lora_ranks=torch.full((p.adapters,), p.rank, dtype=torch.int32, device=d["x"].device),
                           scalings=d["scalings"])
    offset_t = torch.tensor(offsets, dtype=torch.int32, device=d["x"].device)
    mapping = d["ids"]
    return {
        "packed": lambda: lf.add_lora(d["y"], d["x"], d["A"], d["B"], d["plan"], d["scalings"], slices=p.slices),
        "three-calls": lambda: [lf.add_lora(y_j[j], d["x"], A_j[j], B_j[j], d["plan"], d["scalings"])
                                for j in range(S)],
        "vllm": lambda: vllm.add_lora_linear(d["y"], d["x"], a_stacked, b_stacked, 2.0, p.slices, mapping),
        "sglang": lambda: sglang.run_qkv_lora(d["x"], qkv_a, d["B"], info, offset_t, max(p.slices),
                                              base_output=d["y"]),
        "base-gemm": lambda: torch.matmul(d["x"], d["W"].t()),
    }


def reference_delta(p: Problem, d: dict) -> torch.Tensor:
    x, A, B = d["x"].double(), d["A"].double(), d["B"].double()
    shrink = torch.einsum("tk,tsrk->tsr", x, A[d["ids"]])                # [T, S, r]
    out, start = [], 0
    for j, w in enumerate(p.slices):
        out.append(torch.einsum("tr,tor->to", shrink[:, j], B[d["ids"], start:start + w]))
        start += w
    return 2.0 * torch.cat(out, 1)


def check(p: Problem, d: dict, calls: dict) -> None:
    """Every provider adds the reference delta (fresh y each)."""
    ref = reference_delta(p, d)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[d["x"].dtype]
    for name in ("packed", "three-calls", "vllm", "sglang"):
        y0 = d["y"].clone()
        calls[name]()
        err = ((d["y"].double() - y0.double() - ref).norm() / ref.norm()).item()
        d["y"].copy_(y0)
        if not err <= tol:
            raise AssertionError(f"{p.name} {name}: relative error {err:.2e} > {tol}")


def byte_floor_bytes(p: Problem, d: dict) -> int:
    elt = d["x"].element_size()
    used = int(torch.unique(d["ids"]).numel())
    S, out = len(p.slices), sum(p.slices)
    return elt * (used * (S * p.rank * p.in_features + out * p.rank) + p.T * p.in_features + 2 * p.T * out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(TORCH_DTYPES))
    ap.add_argument("--smoke", action="store_true", help="small shapes (CPU)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (a shared host: 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = TORCH_DTYPES[args.dtype]
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # the CPU run exercises the torch backend: fp32 there
    cuda = device.type == "cuda"
    timer = time_cuda if cuda else (lambda fn: time_cpu(fn, budget_s=0.2))
    ceilings = measure_ceilings(device, [args.dtype if cuda else "fp32"])
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'CPU: harness check only'}), "
          f"{dtype}, copy {ceilings.copy_gbs:.0f} GB/s")
    with torch.no_grad():
        for p in (SMOKE if args.smoke else GOALS):
            d = build(p, dtype, device)
            calls = providers(p, d)
            check(p, d, calls)
            ms = {name: timer(fn).median for name, fn in calls.items()}
            floor = byte_floor_bytes(p, d) / (ceilings.copy_gbs * 1e9) * 1e3
            print(f"\n{p.name}: T={p.T}, {p.adapters} adapters, r={p.rank}, {p.in_features} -> "
                  f"{'+'.join(map(str, p.slices))}")
            for name, t in ms.items():
                print(f"  {name:12s} {t * 1e3:9.1f} us")
            print(f"  S1 packed / byte floor ({floor * 1e3:.1f} us): {ms['packed'] / floor:.2f}x (goal <= 1.10)")
            print(f"  S2 three calls / packed: {ms['three-calls'] / ms['packed']:.2f}x (goal >= 1.5)")
            print(f"  S3 packed / base GEMM: {100 * ms['packed'] / ms['base-gemm']:.1f}% (prefill goal <= 8%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
