"""lora_fused.integrations: the cases issue 23 found wrong, against float64 loops written from the
engines' own code (read from their repositories; file and commit cited per test):

1. a plan cache that served the previous batch's plan (a mapping written through numpy, a fresh
   mapping tensor at a freed one's address);
2. vLLM's logits wider (or narrower) than the LoRA vocabulary;
3. SGLang's csgmv metadata, whose segments are chunks of requests (``num_segments``, not ``bs``);
4. a stale ``permutation`` tail past SGLang's segments.
"""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lora_cases import DEVICE, TOLERANCE, rel_error
from lora_fused.integrations import clear_caches, sglang, vllm
from test_integrations import IN, assert_close, randn, sglang_stacks, vllm_linear_reference, vllm_stacks

SLICES = (24, 8, 8)


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", request.param)
    clear_caches()
    return request.param


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_caches()


def _vllm_call_matches_reference(mapping, g, T=4):
    """One add_lora_linear call with ``mapping`` against PunicaWrapperCPU.add_lora_linear's loop."""
    a_stacked, b_stacked = vllm_stacks(g, SLICES)
    x, y = randn(g, T, IN, dtype=torch.float32).to(mapping.device), randn(g, T, sum(SLICES)).to(mapping.device)
    a_stacked = tuple(a.to(mapping.device) for a in a_stacked)
    b_stacked = tuple(b.to(mapping.device) for b in b_stacked)
    ref = vllm_linear_reference(y, x, a_stacked, b_stacked, 1.0, SLICES, mapping)
    y0 = y.clone()
    vllm.add_lora_linear(y, x, a_stacked, b_stacked, 1.0, SLICES, mapping)
    assert_close(y, ref, y0)


# --------------------------------------------------------------------------
# 1. The plan cache never serves another tensor's, or older values', plan.
#    Semantics: vllm/lora/punica_wrapper/punica_cpu.py (vllm-project/vllm @ 67ab819b57fd47b97ee862e81792d649b4fea3ae),
#    add_lora_linear: y[t] += x[t] A[i]ᵀ B[i]ᵀ · scale per slice, i = token_lora_indices[t] (-1: none).
# --------------------------------------------------------------------------

def test_vllm_mapping_written_through_numpy_is_seen():
    """The issue's repro: numpy writes a CPU tensor's memory without bumping its version counter."""
    g = torch.Generator().manual_seed(0)
    buf = np.array([0, 1, 2, -1])
    mapping = torch.from_numpy(buf)
    _vllm_call_matches_reference(mapping, g)
    buf[:] = [2, 2, 2, 2]
    _vllm_call_matches_reference(mapping, g)  # row 3 gets adapter 2 (the stale plan left it unadapted)


def test_vllm_fresh_mapping_at_a_freed_ones_address_is_seen():
    """A new batch's mapping tensor at the previous one's address with the same version count, as an
    allocator hands out freed memory (made so on purpose here: new tensors over one memory block)."""
    g = torch.Generator().manual_seed(1)
    memory = torch.zeros(4, dtype=torch.int64, device=DEVICE).untyped_storage()

    def new_mapping(values):
        """A new tensor over ``memory`` holding ``values`` (written through another tensor: its own
        version counter stays at set_'s one bump)."""
        torch.empty(0, dtype=torch.int64, device=DEVICE).set_(memory, 0, (4,)).copy_(torch.tensor(values))
        return torch.empty(0, dtype=torch.int64, device=DEVICE).set_(memory, 0, (4,))

    first = new_mapping([0, 1, 2, -1])
    _vllm_call_matches_reference(first, g)
    second = new_mapping([3, -1, 3, 1])
    assert (second.data_ptr(), second._version) == (first.data_ptr(), first._version)
    del first
    _vllm_call_matches_reference(second, g)


def test_vllm_plan_is_shared_by_fresh_views_of_one_buffer_until_it_is_refilled():
    """vLLM passes ``self._token_lora_indices[:n]``, a new view on every layer call: the plan is
    still built once per batch, and a refill of the buffer (copy_) plans again."""
    buffer = torch.tensor([0, 1, -1, 3, 2, 2, 2, 2], device=DEVICE)
    device = torch.device(DEVICE)
    plan = vllm._plan(buffer[:5], 4, 5, device, "token_lora_mapping")
    assert vllm._plan(buffer[:5], 4, 5, device, "token_lora_mapping") is plan
    buffer[:5].copy_(torch.tensor([3, 3, 3, 3, 3], device=DEVICE))
    refilled = vllm._plan(buffer[:5], 4, 5, device, "token_lora_mapping")
    assert refilled is not plan and refilled.adapter_ids.tolist() == [3, 3, 3, 3, 3]


# --------------------------------------------------------------------------
# 2. Logits wider than the LoRA vocabulary.
#    vllm/lora/layers/logits_processor.py (@ 01815c62d7519ab46c23a4413eb95478b73f97d9): lora_b_stacked is
#    [max_loras, 1, vocab_size, max_rank]; add_lora_logits gets the lm head's (padded) logits and the
#    padding is cut off after. vllm/lora/ops/torch_ops/lora_ops.py (@ 9da4dfa1ccd2b0bcffcca182a175efd060e4d2cf),
#    bgmv_expand: common_len = min(outputs.shape[1], output_tensor.shape[1]);
#    output_tensor[:, :common_len] += outputs[:, :common_len].
# --------------------------------------------------------------------------

@pytest.mark.parametrize("padding", [10, -6])
def test_vllm_logits_wider_or_narrower_than_the_lora_vocabulary(backend, padding):
    g = torch.Generator().manual_seed(3)
    n, vocab, r = 3, 70, 8
    a = randn(g, n, 1, r, IN, scale=IN ** -0.5)
    b = randn(g, n, 1, vocab, r, scale=r ** -0.5)
    x, y = randn(g, 5, IN), randn(g, 5, vocab + padding)
    sampler = torch.tensor([2, -1, 0, 0, 1], device=DEVICE)
    ref = y.double().clone()
    common = min(vocab, vocab + padding)
    for s in range(5):
        i = int(sampler[s])
        if i >= 0:
            delta = 0.5 * (x[s].double() @ a[i, 0].double().T) @ b[i, 0].double().T
            ref[s, :common] += delta[:common]
    y0 = y.clone()
    vllm.add_lora_logits(y, x, a, b, 0.5, sampler)
    assert torch.equal(y[:, common:], y0[:, common:])  # the padding columns are left as they are
    assert_close(y, ref, y0)


# --------------------------------------------------------------------------
# SGLang's csgmv backend: python/sglang/srt/lora/backend/chunked_backend.py
# (sgl-project/sglang @ e714b89ba9d6788335fd82954d03eb595a7c61eb), prepare_lora_batch: rows sorted by
# adapter (permutation = stable argsort of each token's slot), each adapter's run cut into chunks of
# at most chunk_size (segments), seg_lens None, num_segments = the chunk count, bs = the requests.
# Its kernels, triton_ops/chunked_sgmv_shrink.py (@ 0612c633796e8c2b72b4dff3cdf2d0f4bcf1e86c) and
# chunked_sgmv_expand.py (@ 00d46e7a6ebc52125c2615a3ab37e3c1f229c042), loop over num_segs segments;
# segment b is positions seg_indptr[b] : seg_indptr[b + 1], position p is row permutation[p], read
# only inside a segment (masked loads); lora_ranks[slot] == 0 is a no-op; the expand scales by
# scalings[slot]. lora/utils.py (@ 01235a1633d19644d861f3542011bf35aeaee114): "Number of segments.
# For triton backend, it is equal to batch size."
# --------------------------------------------------------------------------

def csgmv_batch_info(request_slots, request_lens, chunk_size, ranks=(0, 3, 8, 5), extra_rows=0, g=None):
    """A LoRABatchInfo as ChunkedSgmvLoRABackend.prepare_lora_batch builds it (its algorithm, in plain
    torch). ``extra_rows``: padding rows past the tokens (a CUDA-graph batch), permutation sized to them."""
    row_slots = torch.repeat_interleave(torch.tensor(request_slots), torch.tensor(request_lens))
    permutation = torch.argsort(row_slots, stable=True)
    slots_sorted = row_slots[permutation]
    segment_slots, segment_lens = [], []
    for slot, run in zip(*torch.unique_consecutive(slots_sorted, return_counts=True)):
        chunks = (int(run) + chunk_size - 1) // chunk_size
        segment_slots += [int(slot)] * chunks
        segment_lens += [chunk_size] * (chunks - 1) + [int(run) - (chunks - 1) * chunk_size]
    indptr = torch.tensor([0, *torch.tensor(segment_lens).cumsum(0).tolist()], dtype=torch.int32)
    tokens = int(row_slots.shape[0])
    padded = torch.cat([permutation, torch.arange(tokens, tokens + extra_rows)])
    g = g or torch.Generator().manual_seed(0)
    info = SimpleNamespace(
        use_cuda_graph=False, bs=len(request_slots), num_segments=len(segment_slots), max_len=chunk_size,
        seg_indptr=indptr.to(DEVICE), weight_indices=torch.tensor(segment_slots, dtype=torch.int32, device=DEVICE),
        lora_ranks=torch.tensor(ranks, dtype=torch.int32, device=DEVICE),
        scalings=(torch.rand(len(ranks), generator=g) + 0.5).to(DEVICE), seg_lens=None,
        permutation=padded.to(torch.int32).to(DEVICE))
    return info, tokens + extra_rows


def csgmv_row_slots(info):
    """[(row, slot)] the chunked kernels touch: segments b < num_segments, rows permutation[p]."""
    out = []
    for b in range(info.num_segments):
        for p in range(int(info.seg_indptr[b]), int(info.seg_indptr[b + 1])):
            out.append((int(info.permutation[p]), int(info.weight_indices[b])))
    return out


def csgmv_qkv_reference(base, x, A, B, info, widths):
    """chunked_sgmv shrink then expand, per touched row: the shrink's slice j is x A[slot, j·r : (j+1)·r]ᵀ
    (compact slices), added through scalings[slot] · B[slot, slice j's rows, :r]."""
    out = base.double().clone()
    bounds = [0, *itertools.accumulate(widths)]
    for row, slot in csgmv_row_slots(info):
        r = int(info.lora_ranks[slot])
        shrink = (x[row].double() @ A[slot, :len(widths) * r].double().T).view(len(widths), r)
        for j in range(len(widths)):
            cols = slice(bounds[j], bounds[j + 1])
            out[row, cols] += float(info.scalings[slot]) * B[slot, cols, :r].double() @ shrink[j]
    return out


def _check_qkv(info, s, g):
    A, B = sglang_stacks(g, info, 3, SLICES)
    x, base = randn(g, s, IN), randn(g, s, sum(SLICES))
    ref = csgmv_qkv_reference(base, x, A, B, info, SLICES)
    base0 = base.clone()
    offsets = torch.tensor([0, 24, 32, 40], dtype=torch.int32, device=DEVICE)
    out = sglang.run_qkv_lora(x, A, B, info, offsets, 24, base_output=base)
    assert_close(out, ref, base0)
    touched = {row for row, slot in csgmv_row_slots(info) if int(info.lora_ranks[slot])}
    untouched = [t for t in range(s) if t not in touched]
    assert torch.equal(out[untouched], base0[untouched])


def test_sglang_csgmv_request_cut_into_chunks(backend):
    """One 40-token request in 16-token chunks: three segments, bs 1; LoRA on all 40 rows."""
    g = torch.Generator().manual_seed(5)
    info, s = csgmv_batch_info([1], [40], chunk_size=16, g=g)
    assert (info.bs, info.num_segments, info.seg_indptr.tolist()) == (1, 3, [0, 16, 32, 40])
    _check_qkv(info, s, g)


def test_sglang_csgmv_mixed_batch(backend):
    """Requests of several adapters (one of rank 0, SGLang's base slot), sorted and chunked."""
    g = torch.Generator().manual_seed(6)
    info, s = csgmv_batch_info([2, 0, 1, 2, 3], [7, 5, 20, 3, 1], chunk_size=4, g=g)
    assert info.num_segments > info.bs
    _check_qkv(info, s, g)


def test_sglang_lora_a_over_csgmv_segments(backend):
    """run_lora_a_sgemm with the same metadata: each touched row holds x A[slot, :r]ᵀ."""
    g = torch.Generator().manual_seed(7)
    info, s = csgmv_batch_info([3, 1], [19, 6], chunk_size=8, g=g)
    A, _ = sglang_stacks(g, info, 1, (45,))
    x = randn(g, s, IN)
    shrink = sglang.run_lora_a_sgemm(x, A, info)
    ref = torch.zeros(s, 8, dtype=torch.float64)
    for row, slot in csgmv_row_slots(info):
        r = int(info.lora_ranks[slot])
        ref[row, :r] = x[row].double() @ A[slot, :r].double().T
    assert rel_error(shrink, ref) <= TOLERANCE[torch.float32]


def test_sglang_stale_permutation_tail_is_never_read(backend):
    """A CUDA-graph batch: 5 tokens in 8 padded rows; the permutation buffer's tail still holds a
    larger previous batch's entries, naming live rows 0, 1, 2. SGLang reads it only inside the
    segments, so those rows keep their adapters and the padding rows are untouched."""
    g = torch.Generator().manual_seed(8)
    info, s = csgmv_batch_info([1, 2, 3], [2, 1, 2], chunk_size=16, extra_rows=3, g=g)
    info.use_cuda_graph = True
    info.permutation[5:] = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)  # the previous batch's
    _check_qkv(info, s, g)


def test_sglang_permutation_shorter_than_the_tokens_is_refused():
    g = torch.Generator().manual_seed(9)
    info, s = csgmv_batch_info([1], [6], chunk_size=4, g=g)
    A, B = sglang_stacks(g, info, 3, SLICES)
    info.permutation = info.permutation[:4]
    with pytest.raises(ValueError, match=r"batch_info.permutation must be 1-D with at least 6 entries"):
        sglang.run_qkv_lora(randn(g, s, IN), A, B, info, [0, 24, 32, 40])


def test_sglang_metadata_written_through_numpy_is_seen():
    """CPU metadata refilled through numpy (no version bump) is planned again."""
    g = torch.Generator().manual_seed(10)
    info, s = csgmv_batch_info([1, 2], [3, 2], chunk_size=16, g=g)
    info = SimpleNamespace(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in vars(info).items()})
    slots = info.weight_indices.numpy()  # shares the tensor's memory
    A, B = sglang_stacks(g, info, 3, SLICES)
    A, B = A.cpu(), B.cpu()
    x = randn(g, s, IN).cpu()
    offsets = [0, 24, 32, 40]
    sglang.run_qkv_lora(x, A, B, info, offsets)
    slots[:] = [3, 1]
    ref = csgmv_qkv_reference(torch.zeros(s, 40), x, A, B, info, SLICES)
    assert rel_error(sglang.run_qkv_lora(x, A, B, info, offsets), ref) <= TOLERANCE[torch.float32]


def test_sglang_output_offset_written_through_numpy_is_seen():
    """The slice widths read from a CPU output_offset are read again after numpy rewrites it."""
    g = torch.Generator().manual_seed(11)
    info, s = csgmv_batch_info([1, 3], [4, 2], chunk_size=16, g=g)
    A, B = sglang_stacks(g, info, 3, SLICES)
    x = randn(g, s, IN)
    bounds = np.array([0, 24, 32, 40], dtype=np.int32)
    offsets = torch.from_numpy(bounds)
    sglang.run_qkv_lora(x, A, B, info, offsets)
    bounds[:] = [0, 16, 32, 40]
    ref = csgmv_qkv_reference(torch.zeros(s, 40), x, A, B, info, (16, 16, 8))
    assert rel_error(sglang.run_qkv_lora(x, A, B, info, offsets), ref) <= TOLERANCE[torch.float32]
