"""Serving delta: ``lf.add_lora`` over packed q|k|v, against its byte floor, three single-slice
calls and the base GEMM, plus the vLLM and SGLang layout adapters on the same problem.

    python -m bench.serving [--device cuda|cpu] [--dtype bf16|fp16|fp32] [--smoke] [--threads N]

Issue 14's speed goals (H200, bf16):

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
goals S1-S3 in bench/goals.py) with the providers below (:func:`bind`), each checked
against float64 (:func:`reference_outputs`: ``y0 + s B_i (A_i x)`` per slice, the base
GEMM ``x Wᵀ`` for ``base``):

  base         torch.matmul(x, Wᵀ): the engine's own base GEMM over the packed projection (S3)
  packed       lf.add_lora(y, x, A [n, S, r, in], B [n, out, r], plan, scalings, slices=...)
  three-calls  lf.add_lora once per slice into y's column views (per-slice A, B copied contiguous)
  vllm         integrations.vllm.add_lora_linear (tuple of [n, 1, r, in] / [n, 1, out_j, r])
  sglang       integrations.sglang.run_qkv_lora (compact [n, S r, in] A, batch info with a
               segment per run of equal ids)

Each bound provider adds into its own copy of y0 (the first call, the one checked, gives
y0 + delta; timed calls keep adding). Plans and engine metadata are built at bind time,
outside the timing, as an engine builds them once per batch. ``vllm`` and ``sglang`` are
timed as eager launches (not promised CUDA-graph capturable here).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .cases import Case
from .measure import TORCH_DTYPES, measure_ceilings, time_cpu, time_cuda

#: What the serving rows are (printed with the provider list).
CASE_NOTE = ("serving cases (bench/serving.py): the LoRA delta alone over packed q|k|v, added in place "
             "into y (base = the base GEMM x W^T, S3's denominator); vllm and sglang timed as eager launches")


def make_sets(case: Case, device: torch.device, n_sets: int, g: torch.Generator) -> list:
    """Input sets of a serving case: x [T, K], y0 [T, N], W [N, K] (the base GEMM), packed
    A [n, S, r, K], B [n, N, r], the row ids (case.adapter_ids()) and scalings [n] = s."""
    from .providers import InputSet
    dtype = TORCH_DTYPES[case.dtype]
    n, S = case.adapters, len(case.slices)
    if sum(case.slices) != case.N:
        raise ValueError(f"{case.name}: slices {case.slices} do not sum to N = {case.N}")

    def rand(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    ids = torch.tensor(case.adapter_ids(), dtype=torch.int64, device=device)
    sets = []
    for _ in range(n_sets):
        layer = SimpleNamespace(
            W=rand(case.N, case.K, scale=case.K ** -0.5), A=rand(n, S, case.r, case.K, scale=case.K ** -0.5),
            B=rand(n, case.N, case.r, scale=case.r ** -0.5), y0=rand(case.M, case.N), ids=ids,
            scalings=torch.full((n,), case.scaling, dtype=torch.float32, device=device), b=None)
        sets.append(InputSet(rand(case.M, case.K), [layer]))
    return sets


def set_bytes(case: Case, read_only: bool = False) -> int:
    """Bytes of one input set: x, A, B (+ y0 and W unless read_only)."""
    es = torch.empty((), dtype=TORCH_DTYPES[case.dtype]).element_size()
    n, S = case.adapters, len(case.slices)
    nbytes = es * (case.M * case.K + n * S * case.r * case.K + n * case.N * case.r)
    if not read_only:
        nbytes += es * (case.M * case.N + case.N * case.K)
    return int(nbytes)


def sglang_batch_info(ids: torch.Tensor, n: int, rank: int, scalings: torch.Tensor) -> SimpleNamespace:
    """SGLang's LoRABatchInfo for rows in ``ids`` order: one segment per run of equal ids (a
    request), no permutation; every slot at ``rank``."""
    ids_list = ids.tolist()
    starts = [t for t in range(len(ids_list)) if t == 0 or ids_list[t] != ids_list[t - 1]]
    dev = ids.device
    indptr = torch.tensor(starts + [len(ids_list)], dtype=torch.int32, device=dev)
    return SimpleNamespace(bs=len(starts), seg_indptr=indptr, seg_lens=indptr[1:] - indptr[:-1],
                           weight_indices=torch.tensor([ids_list[t] for t in starts], dtype=torch.int32,
                                                       device=dev),
                           permutation=None, lora_ranks=torch.full((n,), rank, dtype=torch.int32, device=dev),
                           scalings=scalings, max_len=max(b - a for a, b in zip(starts, starts[1:] + [len(ids_list)])))


def bind(provider: str, case: Case, st, *, training: bool):
    """``provider`` over the serving input set ``st``: adds the delta into its own copy of y0
    (base: returns x Wᵀ). Inference only."""
    import lora_fused as lf

    from .providers import SERVING_PROVIDERS, Bound
    if provider not in SERVING_PROVIDERS:
        raise ValueError(f"unknown provider {provider!r} for the serving case {case.name}")
    if training:
        raise ValueError(f"{case.name}: serving cases are inference only (mode fwd)")
    L, x = st.layers[0], st.x
    n, S, sl = case.adapters, len(case.slices), case.slices
    offsets = [0]
    for w in sl:
        offsets.append(offsets[-1] + w)
    y = L.y0.clone()
    plan = lf.plan_segments(L.ids, n)
    if provider == "base":
        def run():
            return [torch.matmul(x, L.W.t())]
    elif provider == "packed":
        def run():
            return [lf.add_lora(y, x, L.A, L.B, plan, L.scalings, slices=sl)]
    elif provider == "three-calls":
        A_j = [L.A[:, j].contiguous() for j in range(S)]
        B_j = [L.B[:, offsets[j]:offsets[j + 1]].contiguous() for j in range(S)]
        y_j = [y[:, offsets[j]:offsets[j + 1]] for j in range(S)]

        def run():
            for j in range(S):
                lf.add_lora(y_j[j], x, A_j[j], B_j[j], plan, L.scalings)
            return [y]
    elif provider == "vllm":
        from lora_fused.integrations import vllm
        a_stacked = tuple(L.A[:, j].unsqueeze(1).contiguous() for j in range(S))
        b_stacked = tuple(L.B[:, offsets[j]:offsets[j + 1]].unsqueeze(1).contiguous() for j in range(S))

        def run():
            vllm.add_lora_linear(y, x, a_stacked, b_stacked, case.scaling, sl, L.ids)
            return [y]
    else:  # sglang
        from lora_fused.integrations import sglang
        qkv_a = L.A.reshape(n, S * case.r, case.K)       # compact: every adapter at rank r
        info = sglang_batch_info(L.ids, n, case.r, L.scalings)
        offset_t = torch.tensor(offsets, dtype=torch.int32, device=x.device)

        def run():
            return [sglang.run_qkv_lora(x, qkv_a, L.B, info, offset_t, max(sl), base_output=y)]
    return Bound(run=run, x=x, lora=[], dy=[], leaves=[], params=[L.W, L.A, L.B, L.y0, y],
                 graph=provider in ("base", "packed", "three-calls"))


def reference_outputs(case: Case, st, provider: str) -> list:
    """float64 ``y0 + s B_i[slice j] (A_i[j] x)`` for every row and slice (base: x Wᵀ)."""
    L = st.layers[0]
    x = st.x.double()
    if provider == "base":
        return [x @ L.W.double().t()]
    y = L.y0.double()
    for i in torch.unique(L.ids).tolist():       # per adapter: no [T, S, r, K] gather
        if i < 0:
            continue
        rows = (L.ids == i).nonzero().squeeze(1)
        xi, start = x[rows], 0
        for j, w in enumerate(case.slices):
            delta = (xi @ L.A[i, j].double().t()) @ L.B[i, start:start + w].double().t()
            y[rows, start:start + w] += L.scalings[i].double() * delta
            start += w
    return [y]


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
    from types import SimpleNamespace
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
