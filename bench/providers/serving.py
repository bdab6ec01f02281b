"""Serving providers and inputs: the LoRA delta alone, ``y += s B_i (A_i x)`` per packed slice,
that an engine adds after its own base GEMM (goals S1-S3, bench/goals.py; ``python -m bench
--cases serving``). Each is checked against float64 (:func:`reference_outputs`: ``y0 + s B_i
(A_i x)`` per slice, the base GEMM ``x Wᵀ`` for ``base``):

  base         torch.matmul(x, Wᵀ): the engine's own base GEMM over the packed projection (S3)
  packed       lf.add_lora(y, x, A [n, S, r, in], B [n, out, r], plan, scalings, slices=...)
  three-calls  lf.add_lora once per slice into y's column views (per-slice A, B copied contiguous)
  vllm         integrations.vllm.add_lora_linear (tuple of [n, 1, r, in] / [n, 1, out_j, r])
  sglang       integrations.sglang.run_qkv_lora (compact [n, S r, in] A, batch info with a
               segment per run of equal ids)
  engine       vLLM's way in: LoRAFusedPunicaWrapper.add_lora_linear after update_metadata (the
               wrapper path, against vllm: the direct call on the same layouts)
  engine-sglang  SGLang's way in: LoRAFusedBackend.run_qkv_lora after prepare_lora_batch (against
               sglang)

Each bound provider adds into its own copy of y0 (the first call, the one checked, gives
y0 + delta; timed calls keep adding). Plans and engine metadata are built at bind time,
outside the timing, as an engine builds them once per batch (``engine``: update_metadata;
``engine-sglang``: prepare_lora_batch; each then plans at its first call, as at a batch's first
layer). ``vllm``, ``sglang`` and the engine rows are timed as eager launches. Inference only.
``python -m bench.serving`` (bench/serving.py) is the stand-alone timer of the same problems.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ..cases import Case
from ..measure import TORCH_DTYPES
from .base import Bound, InputSet, element_size, random_fn

PROVIDERS = ("base", "packed", "three-calls", "vllm", "sglang", "engine", "engine-sglang")
DESCRIPTIONS = {
    "packed": "serving cases: lf.add_lora(y, x, A [n, S, r, in], B [n, out, r], plan, scalings, slices=...): "
              "the delta of every slice in one call (plan built once, as an engine's batch metadata)",
    "three-calls": "serving cases: lf.add_lora once per slice into y's column views (A, B per slice, contiguous)",
    "vllm": "serving cases: integrations.vllm.add_lora_linear (vLLM's tuple-of-4-D stacks, token mapping)",
    "sglang": "serving cases: integrations.sglang.run_qkv_lora (SGLang's qkv layout and batch info)",
    "engine": "serving cases: vLLM's wrapper object, LoRAFusedPunicaWrapper.add_lora_linear after update_metadata",
    "engine-sglang": "serving cases: SGLang's backend object, LoRAFusedBackend.run_qkv_lora after prepare_lora_batch",
}
#: What the serving rows are (printed with the provider list).
CASE_NOTE = ("serving cases (bench/providers/serving.py): the LoRA delta alone over packed q|k|v, added in place "
             "into y (base = the base GEMM x W^T, S3's denominator); vllm, sglang and the engine objects "
             "(engine: vLLM's wrapper, engine-sglang: SGLang's backend) timed as eager launches")


def make_sets(case: Case, device: torch.device, n_sets: int, g: torch.Generator) -> list:
    """Input sets of a serving case: x [T, K], y0 [T, N], W [N, K] (the base GEMM), packed
    A [n, S, r, K], B [n, N, r], the row ids (case.adapter_ids()) and scalings [n] = s."""
    dtype = TORCH_DTYPES[case.dtype]
    n, S = case.adapters, len(case.slices)
    if sum(case.slices) != case.N:
        raise ValueError(f"{case.name}: slices {case.slices} do not sum to N = {case.N}")

    rand = random_fn(g, device, dtype)
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
    es = element_size(case)
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

    if provider not in PROVIDERS:
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
        a_stacked, b_stacked = _vllm_stacks(case, L, offsets)

        def run():
            vllm.add_lora_linear(y, x, a_stacked, b_stacked, case.scaling, sl, L.ids)
            return [y]
    elif provider == "engine":
        run = _bind_vllm_engine(case, L, x, y, offsets)
    else:  # sglang, engine-sglang
        run = _bind_sglang(provider, case, L, x, y, offsets)
    return Bound(run=run, x=x, lora=[], dy=[], leaves=[], params=[L.W, L.A, L.B, L.y0, y],
                 graph=provider in ("base", "packed", "three-calls"))


def _vllm_stacks(case: Case, L, offsets: list) -> tuple:
    """vLLM's layouts: a tuple of [n, 1, r, K] and of [n, 1, w_j, r] (contiguous, one per slice)."""
    S = len(case.slices)
    return (tuple(L.A[:, j].unsqueeze(1).contiguous() for j in range(S)),
            tuple(L.B[:, offsets[j]:offsets[j + 1]].unsqueeze(1).contiguous() for j in range(S)))


def _bind_vllm_engine(case: Case, L, x: torch.Tensor, y: torch.Tensor, offsets: list):
    """vLLM's model runner gives the batch to update_metadata (LoRA id = slot + 1, 0 = none); each
    layer then calls add_lora_linear with its own stacks."""
    from lora_fused.integrations import vllm
    a_stacked, b_stacked = _vllm_stacks(case, L, offsets)
    n = case.adapters
    wrapper = vllm.LoRAFusedPunicaWrapper(case.M, max_batches=case.M, device=x.device, max_loras=n)
    lora_ids = tuple((L.ids + 1).tolist())
    wrapper.update_metadata(SimpleNamespace(index_mapping=lora_ids, prompt_mapping=lora_ids, is_prefill=case.M > 1),
                            list(range(1, n + 1)), n + 1, 32000)

    def run():
        return [wrapper.add_lora_linear(y, x, a_stacked, b_stacked, case.scaling, case.slices)]
    return run


def _bind_sglang(provider: str, case: Case, L, x: torch.Tensor, y: torch.Tensor, offsets: list):
    """SGLang's qkv layer: compact A (every adapter at rank r), a segment per run of equal ids
    (a request); ``engine-sglang`` gives the batch to LoRAFusedBackend.prepare_lora_batch first."""
    from lora_fused.integrations import sglang
    n, sl = case.adapters, case.slices
    qkv_a = L.A.reshape(n, len(sl) * case.r, case.K)
    info = sglang_batch_info(L.ids, n, case.r, L.scalings)
    offset_cpu = torch.tensor(offsets, dtype=torch.int32)
    offset_t = offset_cpu.to(x.device)
    if provider == "sglang":
        def run():
            return [sglang.run_qkv_lora(x, qkv_a, L.B, info, offset_t, max(sl), base_output=y)]
        return run
    backend = sglang.LoRAFusedBackend(max_loras_per_batch=n, device=x.device)
    lens = (info.seg_indptr[1:] - info.seg_indptr[:-1]).tolist()
    forward_batch = SimpleNamespace(batch_size=len(lens), forward_mode=SimpleNamespace(is_extend=lambda: True),
                                    extend_seq_lens_cpu=lens)
    backend.prepare_lora_batch(forward_batch=forward_batch, weight_indices=info.weight_indices.tolist(),
                               lora_ranks=[case.r] * n, scalings=L.scalings.tolist(), use_cuda_graph=False)

    def run():
        return [backend.run_qkv_lora(x=x, qkv_lora_a=qkv_a, qkv_lora_b=L.B, output_offset=offset_t,
                                     output_offset_cpu=offset_cpu, max_qkv_out_dim=max(sl), base_output=y)]
    return run


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


def reference_grads(case: Case, st, provider: str) -> list:
    """Serving cases are inference only: there are no gradients to check."""
    raise ValueError(f"{case.name}: serving cases are inference only (mode fwd)")
