"""lora_fused.integrations: vLLM's and SGLang's layouts and metadata against float64 loops
written from each engine's documented semantics (neither engine is installed here).

vLLM (PunicaWrapperGPU): tuples of [max_loras, 1, max_rank, in] / [max_loras, 1, out_j, max_rank],
-1 = no LoRA, ``scale`` multiplies the delta, zero-padded ranks.
SGLang (triton backend, LoRABatchInfo): segments of tokens by seg_indptr / seg_lens /
weight_indices, optional permutation, per-slot lora_ranks (0 = base) and scalings, compact
stacked A ([n, c·r_max, in], slice j of a rank-r adapter at rows j·r : (j+1)·r).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from lora_cases import DEVICE, TOLERANCE, rel_error
from lora_fused.integrations import clear_caches, sglang, vllm
from lora_fused.kernels.common import LAUNCH_COUNTS

IN = 37


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", request.param)
    clear_caches()
    return request.param


def randn(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def assert_close(out, ref, y0):
    """out against the float64 reference, the delta measured on its own (not hidden by y0)."""
    assert rel_error(out.double() - y0.double(), ref - y0.double()) <= TOLERANCE[out.dtype]


# --------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------

def vllm_stacks(g, slices, n=4, max_rank=8, ranks=(8, 3, 1, 5)):
    """vLLM's stacked buffers: each adapter's rank rows past its rank are zero (as set_lora leaves them)."""
    a_stacked, b_stacked = [], []
    for width in slices:
        a = torch.zeros(n, 1, max_rank, IN, device=DEVICE)
        b = torch.zeros(n, 1, width, max_rank, device=DEVICE)
        for i, r in enumerate(ranks):
            a[i, 0, :r] = randn(g, r, IN, scale=IN ** -0.5)
            b[i, 0, :, :r] = randn(g, width, r, scale=r ** -0.5)
        a_stacked.append(a)
        b_stacked.append(b)
    return tuple(a_stacked), tuple(b_stacked)


def vllm_linear_reference(y, x, a_stacked, b_stacked, scale, output_slices, mapping):
    """PunicaWrapperGPU.add_lora_linear's documented semantics, per token and slice, in float64."""
    out = y.double().clone()
    for t in range(x.shape[0]):
        i = int(mapping[t])
        if i < 0:
            continue
        offset = 0
        for a, b, width in zip(a_stacked, b_stacked, output_slices):
            out[t, offset:offset + width] += scale * (x[t].double() @ a[i, 0].double().T) @ b[i, 0].double().T
            offset += width
    return out


@pytest.mark.parametrize("slices", [(45,), (24, 8, 8), (30, 30)])
@pytest.mark.parametrize("T", [1, 19])
def test_vllm_add_lora_linear(backend, slices, T):
    g = torch.Generator().manual_seed(T + len(slices))
    a_stacked, b_stacked = vllm_stacks(g, slices)
    x, y = randn(g, T, IN), randn(g, T, sum(slices))
    mapping = torch.randint(-1, 4, (T + 5,), generator=g).to(DEVICE)  # preallocated: longer than T
    ref = vllm_linear_reference(y, x, a_stacked, b_stacked, 0.75, slices, mapping)
    y0 = y.clone()
    out = vllm.add_lora_linear(y, x, a_stacked, b_stacked, 0.75, slices, mapping)
    assert out is y
    assert torch.equal(y[mapping[:T] < 0], y0[mapping[:T] < 0])
    assert_close(y, ref, y0)


def test_vllm_packed_call_is_one_shrink_and_one_expand(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", "triton")
    g = torch.Generator().manual_seed(0)
    a_stacked, b_stacked = vllm_stacks(g, (24, 8, 8))
    x, y = randn(g, 9, IN), randn(g, 9, 40)
    LAUNCH_COUNTS.clear()
    vllm.add_lora_linear(y, x, a_stacked, b_stacked, 1.0, (24, 8, 8), torch.arange(-1, 8, device=DEVICE) % 4)
    assert LAUNCH_COUNTS["lora_delta_shrink_kernel"] == 1 and LAUNCH_COUNTS["lora_delta_expand_kernel"] == 1


def test_vllm_set_lora_and_a_new_mapping_are_seen(backend):
    """The stacked copies and the plan are cached; in-place writes (set_lora, a refilled
    token_lora_indices) must invalidate them."""
    g = torch.Generator().manual_seed(1)
    slices = (24, 8, 8)
    a_stacked, b_stacked = vllm_stacks(g, slices)
    x, y = randn(g, 7, IN), randn(g, 7, 40)
    mapping = torch.tensor([0, 1, 2, 3, -1, 1, 0], device=DEVICE)
    vllm.add_lora_linear(y.clone(), x, a_stacked, b_stacked, 1.0, slices, mapping)
    a_stacked[1][2, 0].copy_(randn(g, 8, IN))      # vLLM's set_lora: written in place
    b_stacked[2][1, 0].copy_(randn(g, 8, 8))
    mapping.copy_(torch.tensor([2, 2, 1, -1, 0, 3, 1], device=DEVICE))
    ref = vllm_linear_reference(y, x, a_stacked, b_stacked, 1.0, slices, mapping)
    y0 = y.clone()
    vllm.add_lora_linear(y, x, a_stacked, b_stacked, 1.0, slices, mapping)
    assert_close(y, ref, y0)


def test_vllm_add_lora_embedding(backend):
    g = torch.Generator().manual_seed(2)
    n, vocab, dim, r = 3, 50, 29, 8
    lora_a_stacked = randn(g, n, vocab, r)  # vLLM's embedding A: [max_loras, vocab, max_rank]
    lora_b_stacked = randn(g, n, 1, dim, r, scale=r ** -0.5)
    tokens = torch.randint(0, vocab, (11,), generator=g).to(DEVICE)
    mapping = torch.tensor([0, -1, 2, 1, 1, -1, 0, 2, 2, 0, 1], device=DEVICE)
    # what VocabParallelEmbeddingWithLoRA gathers: A rows at (token + adapter offset)
    x = lora_a_stacked.reshape(n * vocab, r)[tokens + mapping.clamp(min=0) * vocab]
    y = randn(g, 11, dim)
    ref = y.double().clone()
    for t in range(11):
        if mapping[t] >= 0:
            ref[t] += x[t].double() @ lora_b_stacked[mapping[t], 0].double().T
    y0 = y.clone()
    vllm.add_lora_embedding(y, x, lora_b_stacked, mapping)
    assert torch.equal(y[mapping < 0], y0[mapping < 0])
    assert_close(y, ref, y0)
    # add_inputs=False: rows with a LoRA hold the delta alone
    z = y0.clone()
    vllm.add_lora_embedding(z, x, lora_b_stacked, mapping, add_inputs=False)
    assert torch.equal(z[mapping < 0], y0[mapping < 0])
    lora_rows = mapping >= 0
    assert rel_error(z[lora_rows], (ref - y0.double())[lora_rows]) <= TOLERANCE[torch.float32]


def test_vllm_add_lora_logits(backend):
    g = torch.Generator().manual_seed(3)
    n, vocab, r = 3, 70, 8
    a = randn(g, n, 1, r, IN, scale=IN ** -0.5)
    b = randn(g, n, 1, vocab, r, scale=r ** -0.5)
    x, y = randn(g, 5, IN), randn(g, 5, vocab)
    sampler = torch.tensor([2, -1, 0, 0, 1], device=DEVICE)
    ref = vllm_linear_reference(y, x, (a,), (b,), 0.5, (vocab,), sampler)
    y0 = y.clone()
    vllm.add_lora_logits(y, x, a, b, 0.5, sampler)
    assert_close(y, ref, y0)


def test_vllm_bad_layouts():
    g = torch.Generator().manual_seed(4)
    a_stacked, b_stacked = vllm_stacks(g, (24, 16))
    x, y = randn(g, 3, IN), randn(g, 3, 40)
    ids = torch.zeros(3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"lora_b_stacked\[0\] must be .*out_j=25"):
        vllm.add_lora_linear(y, x, a_stacked, b_stacked, 1.0, (25, 15), ids)
    with pytest.raises(ValueError, match="one entry per slice"):
        vllm.add_lora_linear(y, x, a_stacked, b_stacked, 1.0, (40,), ids)
    with pytest.raises(ValueError, match="token_lora_mapping must be 1-D with at least T=3"):
        vllm.add_lora_linear(y, x, a_stacked, b_stacked, 1.0, (24, 16), ids[:2])
    with pytest.raises(ValueError, match=r"token_lora_mapping.*\[-1, 4\)"):
        vllm.add_lora_linear(y, x, a_stacked, b_stacked, 1.0, (24, 16), ids + 4)
    with pytest.raises(TypeError, match="tuples of tensors"):
        vllm.add_lora_linear(y, x, a_stacked[0], b_stacked, 1.0, (24, 16), ids)


# --------------------------------------------------------------------------
# SGLang
# --------------------------------------------------------------------------

@dataclass
class BatchInfo:
    """SGLang's LoRABatchInfo fields (lora/utils.py)."""
    bs: int
    seg_indptr: torch.Tensor
    weight_indices: torch.Tensor
    lora_ranks: torch.Tensor
    scalings: torch.Tensor
    seg_lens: Optional[torch.Tensor]
    permutation: Optional[torch.Tensor]
    num_segments: int = 0
    max_len: int = 0
    use_cuda_graph: bool = False


def sglang_batch(g, seg_lens=(3, 1, 4, 2), weight_indices=(2, 0, 1, 3), ranks=(0, 3, 8, 5), permuted=False,
                 extra_tokens=0):
    """A batch of segments; slot 0 has rank 0 (SGLang's base-model slot). ``extra_tokens``
    rows lie outside every segment (a padded CUDA-graph batch)."""
    s = sum(seg_lens) + extra_tokens
    indptr = torch.tensor([0, *torch.tensor(seg_lens).cumsum(0).tolist()], dtype=torch.int32)
    perm = torch.randperm(s, generator=g).to(torch.int64) if permuted else None
    info = BatchInfo(bs=len(seg_lens), seg_indptr=indptr.to(DEVICE),
                     weight_indices=torch.tensor(weight_indices, dtype=torch.int32, device=DEVICE),
                     lora_ranks=torch.tensor(ranks, dtype=torch.int32, device=DEVICE),
                     scalings=(torch.rand(len(ranks), generator=g) + 0.5).to(DEVICE),
                     seg_lens=torch.tensor(seg_lens, dtype=torch.int32, device=DEVICE),
                     permutation=None if perm is None else perm.to(DEVICE), num_segments=len(seg_lens),
                     max_len=max(seg_lens))
    return info, s


def token_slots(info, s):
    """[(row, slot)] for every token in a segment, from SGLang's documented meaning."""
    out = []
    for b in range(info.bs):
        start, length = int(info.seg_indptr[b]), int(info.seg_lens[b])
        for p in range(start, start + length):
            row = int(info.permutation[p]) if info.permutation is not None else p
            out.append((row, int(info.weight_indices[b])))
    return out


def sglang_stacks(g, info, c, widths, r_max=8):
    """Compact stacked A [n, c·r_max, in] and B [n, sum(widths), r_max], as SGLang's memory pool fills them."""
    n = info.lora_ranks.shape[0]
    A = torch.zeros(n, c * r_max, IN, device=DEVICE)
    B = torch.zeros(n, sum(widths), r_max, device=DEVICE)
    for i, r in enumerate(info.lora_ranks.tolist()):
        if r:
            A[i, :c * r] = randn(g, c * r, IN, scale=IN ** -0.5)  # cat(A_slice0, A_slice1, ...)
            B[i, :, :r] = randn(g, sum(widths), r, scale=r ** -0.5)
    return A, B


def sglang_reference(base, x, A, B, info, s, widths):
    out = base.double().clone()
    for row, i in token_slots(info, s):
        r = int(info.lora_ranks[i])
        start = 0
        for j, w in enumerate(widths):
            if r:
                shrink = x[row].double() @ A[i, j * r:(j + 1) * r].double().T
                out[row, start:start + w] += float(info.scalings[i]) * shrink @ B[i, start:start + w, :r].double().T
            start += w
    return out


@pytest.mark.parametrize("permuted", [False, True])
def test_sglang_qkv(backend, permuted):
    g = torch.Generator().manual_seed(5)
    info, s = sglang_batch(g, permuted=permuted, extra_tokens=2)
    widths = (24, 8, 8)
    A, B = sglang_stacks(g, info, 3, widths)
    x, base = randn(g, s, IN), randn(g, s, sum(widths))
    ref = sglang_reference(base, x, A, B, info, s, widths)
    base0 = base.clone()
    offsets = torch.tensor([0, 24, 32, 40], dtype=torch.int32, device=DEVICE)
    out = sglang.run_qkv_lora(x, A, B, info, offsets, 24, base_output=base)
    assert out is base
    assert_close(out, ref, base0)
    touched = {row for row, i in token_slots(info, s) if int(info.lora_ranks[i])}
    untouched = [t for t in range(s) if t not in touched]
    assert torch.equal(out[untouched], base0[untouched])  # rank-0 slot and padding rows


def test_sglang_gate_up_without_base_output(backend):
    g = torch.Generator().manual_seed(6)
    info, s = sglang_batch(g, seg_lens=(5, 2), weight_indices=(3, 1))
    A, B = sglang_stacks(g, info, 2, (20, 20))
    x = randn(g, s, IN)
    ref = sglang_reference(torch.zeros(s, 40), x, A, B, info, s, (20, 20))
    out = sglang.run_gate_up_lora(x, A, B, info)
    assert rel_error(out, ref) <= TOLERANCE[torch.float32]


def test_sglang_lora_a_then_lora_b(backend):
    """The two halves separately: run_lora_a_sgemm (compact shrink), run_lora_b_sgemm (expand)."""
    g = torch.Generator().manual_seed(7)
    info, s = sglang_batch(g, permuted=True)
    A, B = sglang_stacks(g, info, 1, (45,))
    x = randn(g, s, IN)
    shrink = sglang.run_lora_a_sgemm(x, A, info)
    ref_shrink = torch.zeros(s, 8, dtype=torch.float64)
    for row, i in token_slots(info, s):
        r = int(info.lora_ranks[i])
        ref_shrink[row, :r] = x[row].double() @ A[i, :r].double().T
    assert rel_error(shrink, ref_shrink) <= TOLERANCE[torch.float32]
    base = randn(g, s, 45)
    ref = sglang_reference(base, x, A, B, info, s, (45,))
    base0 = base.clone()
    sglang.run_lora_b_sgemm(shrink, B, info, base_output=base)
    assert_close(base, ref, base0)


def test_sglang_stacked_lora_a_output_is_compact(backend):
    g = torch.Generator().manual_seed(8)
    info, s = sglang_batch(g)
    A, _ = sglang_stacks(g, info, 3, (8, 8, 8))
    x = randn(g, s, IN)
    shrink = sglang.run_lora_a_sgemm(x, A, info, stack_num=3)
    for row, i in token_slots(info, s):
        r = int(info.lora_ranks[i])
        expect = torch.zeros(24, dtype=torch.float64)
        expect[:3 * r] = x[row].double() @ A[i, :3 * r].double().T
        assert rel_error(shrink[row], expect) <= TOLERANCE[torch.float32] or r == 0 and not shrink[row].any()


def test_sglang_refilled_batch_info(backend):
    """A batch info refilled in place (as under CUDA graphs) is planned again. (SGLang's backend
    object, LoRAFusedBackend, is tested in tests/integrations/test_engine_wrappers.py.)"""
    g = torch.Generator().manual_seed(9)
    info, s = sglang_batch(g)
    A, B = sglang_stacks(g, info, 2, (20, 20))
    x = randn(g, s, IN)
    sglang.run_gate_up_lora(x, A, B, info, base_output=torch.zeros(s, 40, device=DEVICE))
    info.weight_indices.copy_(torch.tensor([1, 3, 2, 0], dtype=torch.int32))
    ref = sglang_reference(torch.zeros(s, 40), x, A, B, info, s, (20, 20))
    out = sglang.run_gate_up_lora(x, A, B, info, base_output=torch.zeros(s, 40, device=DEVICE))
    assert rel_error(out, ref) <= TOLERANCE[torch.float32]


def test_sglang_bad_layouts():
    g = torch.Generator().manual_seed(10)
    info, s = sglang_batch(g)
    A, B = sglang_stacks(g, info, 3, (24, 8, 8))
    x = randn(g, s, IN)
    with pytest.raises(ValueError, match="output_offset must be"):
        sglang.run_qkv_lora(x, A, B, info, [0, 24, 20, 40])
    with pytest.raises(ValueError, match="qkv_lora_a must be"):
        sglang.run_qkv_lora(x, A[:, :16], B, info, [0, 24, 32, 40])
    with pytest.raises(ValueError, match="base_output must be"):
        sglang.run_qkv_lora(x, A, B, info, [0, 24, 32, 40], base_output=torch.zeros(s, 39, device=DEVICE))


def test_inference_mode_tensors(backend):
    """vLLM runs its model under torch.inference_mode: stacks and mappings made there have no
    version counter, so nothing is cached for them (and a refilled mapping is still seen)."""
    g = torch.Generator().manual_seed(11)
    slices = (24, 8, 8)
    with torch.inference_mode():
        a_stacked, b_stacked = vllm_stacks(g, slices)
        x, y = randn(g, 6, IN), randn(g, 6, 40)
        mapping = torch.tensor([0, 1, -1, 3, 2, 1], device=DEVICE)
        vllm.add_lora_linear(y.clone(), x, a_stacked, b_stacked, 1.0, slices, mapping)
        mapping.copy_(torch.tensor([3, -1, 2, 2, 0, 1], device=DEVICE))
        a_stacked[0][3, 0].copy_(randn(g, 8, IN))
        ref = vllm_linear_reference(y, x, a_stacked, b_stacked, 1.0, slices, mapping)
        y0 = y.clone()
        vllm.add_lora_linear(y, x, a_stacked, b_stacked, 1.0, slices, mapping)
        assert_close(y, ref, y0)
        info, s = sglang_batch(g)
        A, B = sglang_stacks(g, info, 3, slices)
        x = randn(g, s, IN)
        out = sglang.run_qkv_lora(x, A, B, info, torch.tensor([0, 24, 32, 40], device=DEVICE))
        assert rel_error(out, sglang_reference(torch.zeros(s, 40), x, A, B, info, s, slices)) <= 1e-5


def test_vllm_add_lora_linear_compiles_without_graph_breaks(backend):
    """vLLM compiles its model: the adapter traces (fullgraph) and y is updated in place."""
    g = torch.Generator().manual_seed(12)
    slices = (24, 8, 8)
    a_stacked, b_stacked = vllm_stacks(g, slices)
    x, y = randn(g, 7, IN), randn(g, 7, 40)
    mapping = torch.tensor([0, 1, 2, 3, -1, 1, 0], device=DEVICE)
    ref = vllm_linear_reference(y, x, a_stacked, b_stacked, 0.5, slices, mapping)

    def layer(y, x, mapping):
        vllm.add_lora_linear(y, x, a_stacked, b_stacked, 0.5, slices, mapping)
        return y

    torch._dynamo.reset()
    y0 = y.clone()
    torch.compile(layer, fullgraph=True, backend="aot_eager")(y, x, mapping)
    assert_close(y, ref, y0)


def test_vllm_packed_slices_are_never_stacked_on_the_triton_path(monkeypatch):
    """The kernels read each slice from vLLM's own tensors (an address table): no concatenated
    copy of the adapter weights is made, so a set_lora write is seen with nothing to refresh."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setenv("LORA_FUSED_BACKEND", "triton")
    g = torch.Generator().manual_seed(13)
    slices = (24, 8, 8)
    a_stacked, b_stacked = vllm_stacks(g, slices)
    x, y = randn(g, 7, IN), randn(g, 7, 40)
    mapping = torch.tensor([0, 1, 2, 3, -1, 1, 0], device=DEVICE)
    smallest_stack = min(sum(a.numel() for a in a_stacked), sum(b.numel() for b in b_stacked))

    class Concatenations(TorchDispatchMode):
        big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.cat, torch.ops.aten.stack) and out.numel() >= smallest_stack:
                self.big.append(str(func))
            return out

    vllm.add_lora_linear(y.clone(), x, a_stacked, b_stacked, 1.0, slices, mapping)  # plan and tables made
    ref = vllm_linear_reference(y, x, a_stacked, b_stacked, 1.0, slices, mapping)
    y0 = y.clone()
    with Concatenations() as mode:
        vllm.add_lora_linear(y, x, a_stacked, b_stacked, 1.0, slices, mapping)
    assert mode.big == []
    assert_close(y, ref, y0)
