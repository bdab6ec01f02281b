"""The engine objects: vLLM's punica wrapper (``LoRAFusedPunicaWrapper``) and SGLang's LoRA backend
(``LoRAFusedBackend``), driven the way each engine's model runner and layers call them, over several
batches, against float64 loops written from the engines' semantics (helpers of
tests/integrations/test_integrations.py); their signatures against the engines' own; ``register()`` against
stand-ins of each engine's selection hook. Neither engine is installed here: what follows is
written down from their sources (file and commit per fact).

vLLM (vllm-project/vllm):
- vllm/lora/punica_wrapper/punica_base.py @ f2bfe49e84f0c15fbedd1946180b277e1af5577f: the interface
  (:class:`VllmPunicaWrapperBase` below); @ 02b8ec7a2da9f5507ab72d97b140e25ec80e7312 the forms with
  ``lora_bias_stacked`` and ``extra_vocab_size``, and ``_apply_bias`` (bias added unscaled per slice
  from column 0, rows with -1 left alone).
- vllm/lora/punica_wrapper/punica_gpu.py @ 010c9386c45da59ad29905c19c06e58affe0ab1e: the constructor
  reads ``kwargs["max_loras"]``; ``add_shrink``'s kernel zeroes its buffer (lora_shrink_op.py:
  ``output_tensor.zero_()``), so rows without LoRA hold 0; ``add_expand`` always adds.
- vllm/lora/punica_wrapper/punica_cpu.py @ 67ab819b57fd47b97ee862e81792d649b4fea3ae: ``buffer`` a tuple
  of [T, r] fp32 tensors; ``add_expand`` honours ``add_inputs``.
- vllm/lora/punica_wrapper/utils.py @ c18f82401b9adf40b5a46b0c82301c2da91d82e1, ``convert_mapping``:
  slot = ``lora_index_to_id.index(id)`` for id > 0, else -1; embeddings_indices
  [slot·extra, slot·(vocab + extra)] with slot 0 for no LoRA; sampler_indices_padded
  ``arange(S) + where(slot == -1, max_loras - 1, slot) · S``.
- vllm/lora/punica_wrapper/punica_selector.py @ 85f1f913cf8d26e0c6ca0ad09792cb45470069bf: the class is
  ``resolve_obj_by_qualname(current_platform.get_punica_wrapper())(*args, **kwargs)``.
- vllm/plugins/__init__.py @ 01425553bdbed63400efa72ff14a8f4ffe20bada: every ``vllm.general_plugins``
  entry point is loaded and called in each process.
- Call sites: VLLM_CALLS below (model_manager.py, layers/*.py, commits there).

SGLang (sgl-project/sglang):
- python/sglang/srt/lora/backend/base_backend.py @ 00639c4d198ed9596d73d45ca54d2d39b98b0b3e: the
  interface (:class:`SglangBaseLoRABackend`); @ 5af4e125464d031583425f51ecd6a6c3fa1ac72e the older
  ``prepare_lora_batch(..., batch_info=None)`` and ``init_cuda_graph_batch_info(cuda_graph_batch_info,
  max_bs_in_cuda_graph)``.
- python/sglang/srt/lora/backend/chunked_backend.py @ e714b89ba9d6788335fd82954d03eb595a7c61eb: a
  request's tokens are ``forward_batch.extend_seq_lens_cpu[b]`` when ``forward_mode.is_extend()``,
  else one; the B-side kernels scale by ``scalings[slot]``; ``lora_ranks[slot] == 0`` adds nothing.
- python/sglang/srt/lora/backend/lora_registry.py @ 323c608578b283bd6c3fe48596d0d4839531df83:
  ``register_lora_backend(name)`` stores a factory, ``get_backend_from_name(name)`` calls it.
- python/sglang/srt/plugins/__init__.py @ 32c764af5f16beac1afaf71d2d6fcf39a064f304: the
  ``sglang.srt.plugins`` entry points are called in each process.
- Call sites: SGLANG_CALLS below (layers.py and lora_manager.py @ 00639c4d).
"""
from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from lora_cases import DEVICE, TOLERANCE, rel_error
from lora_fused.integrations import clear_caches, sglang, vllm
from test_integrations import (IN, BatchInfo, assert_close, backend, randn, sglang_reference, sglang_stacks,  # noqa: F401
                               token_slots, vllm_linear_reference, vllm_stacks)

Wrapper = vllm.LoRAFusedPunicaWrapper
Backend = sglang.LoRAFusedBackend


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_caches()


# ==========================================================================
# The engines' interfaces, written down from their sources
# ==========================================================================

class VllmPunicaWrapperBase:
    """vllm/lora/punica_wrapper/punica_base.py @ f2bfe49e84f0c15fbedd1946180b277e1af5577f."""
    def __init__(self, max_num_batched_tokens, max_batches, device, **kwargs): ...
    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs): ...
    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs): ...
    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True, **kwargs): ...
    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs): ...
    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                        **kwargs): ...
    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs): ...


class SglangBaseLoRABackend:
    """python/sglang/srt/lora/backend/base_backend.py @ 00639c4d198ed9596d73d45ca54d2d39b98b0b3e."""
    def __init__(self, max_loras_per_batch, device): ...
    def run_lora_a_sgemm(self, x, weights, *args, **kwargs): ...
    def run_lora_b_sgemm(self, x, weights, *args, **kwargs): ...
    def run_qkv_lora(self, x, qkv_lora_a, qkv_lora_b, *args, **kwargs): ...
    def run_gate_up_lora(self, x, gate_up_lora_a, gate_up_lora_b, *args, **kwargs): ...
    def init_cuda_graph_batch_info(self, max_bs_in_cuda_graph, num_tokens_per_req): ...
    def prepare_lora_batch(self, forward_batch, weight_indices, lora_ranks, scalings, use_cuda_graph,
                           use_prefill_cuda_graph=False): ...
    def reset_batch_state(self): ...


#: (method, positional argument count, keyword names, where the engine calls it so).
VLLM_CALLS = [
    ("__init__", 1, ("max_batches", "device", "max_loras"), "punica_gpu.py @ 010c9386 (kwargs['max_loras'])"),
    ("__init__", 1, ("max_batches", "device", "lora_config"), "lora/model_manager.py @ 01533aa8f9c07da9766323fbaf4c8b81bb2aa958"),
    ("update_metadata", 4, (), "lora/model_manager.py @ 01533aa8 _set_adapter_mapping"),
    ("update_metadata", 5, (), "punica_base.py @ 02b8ec7a (extra_vocab_size)"),
    ("add_lora_linear", 6, (), "lora/layers/base_linear.py @ 01235a494f173b84814002c8382137e379371b07 apply"),
    ("add_lora_linear", 7, (), "punica_base.py @ 02b8ec7a (lora_bias_stacked before scale)"),
    ("add_shrink", 4, (), "lora/layers/column_parallel_linear.py @ 0163de2b7c0f18544063d4beeb71d4069110be30 _mcp_apply"),
    ("add_expand", 4, ("offset_start", "add_input"), "column_parallel_linear.py @ 0163de2b _mcp_apply; "
                                                      "row_parallel_linear.py @ 7626577c206473f2205101fdc577a62c484b3e15"),
    ("add_expand", 5, ("offset_start", "add_input"), "punica_base.py @ 02b8ec7a (lora_bias_stacked before output_slices)"),
    ("add_lora_embedding", 3, ("add_input",), "lora/layers/vocal_parallel_embedding.py @ 0726b06c8df7064a7d7e4ed3ed03980229290432"),
    ("add_lora_logits", 5, (), "lora/layers/logits_processor.py @ 01815c62d7519ab46c23a4413eb95478b73f97d9"),
    ("add_lora_logits", 5, ("buffer",), "punica_cpu.py @ 67ab819b"),
]

SGLANG_CALLS = [
    ("__init__", 0, ("max_loras_per_batch", "device", "server_args"), "lora_manager.py @ 00639c4d"),
    ("init_cuda_graph_batch_info", 0, ("max_bs_in_cuda_graph", "num_tokens_per_req"), "lora_manager.py @ 00639c4d"),
    ("init_cuda_graph_batch_info", 0, ("cuda_graph_batch_info", "max_bs_in_cuda_graph"), "base_backend.py @ 5af4e125"),
    ("prepare_lora_batch", 0, ("forward_batch", "weight_indices", "lora_ranks", "scalings", "use_cuda_graph",
                               "use_prefill_cuda_graph"), "lora_manager.py @ 00639c4d"),
    ("prepare_lora_batch", 0, ("forward_batch", "weight_indices", "lora_ranks", "scalings", "batch_info"),
     "base_backend.py @ 5af4e125 (LoRAManager's older call)"),
    ("reset_batch_state", 0, (), "lora_manager.py @ 00639c4d reset_lora_batch"),
    ("run_lora_a_sgemm", 2, (), "layers.py @ 00639c4d ColumnParallelLinearWithLoRA / RowParallelLinearWithLoRA"),
    ("run_lora_a_sgemm", 2, ("pruned_batch_info",), "layers.py @ 00639c4d ParallelLMHeadWithLoRA"),
    ("run_lora_b_sgemm", 0, ("x", "weights", "output_offset", "output_offset_cpu", "base_output"), "layers.py @ 00639c4d"),
    ("run_lora_b_sgemm", 0, ("x", "weights", "output_offset", "output_offset_cpu", "base_output",
                             "pruned_batch_info"), "layers.py @ 00639c4d ParallelLMHeadWithLoRA"),
    ("run_gate_up_lora", 0, ("x", "gate_up_lora_a", "gate_up_lora_b", "output_offset", "output_offset_cpu",
                             "base_output"), "layers.py @ 00639c4d MergedColumnParallelLinearWithLoRA"),
    ("run_qkv_lora", 0, ("x", "qkv_lora_a", "qkv_lora_b", "output_offset", "output_offset_cpu", "max_qkv_out_dim",
                         "base_output", "n_slices"), "layers.py @ 00639c4d MergedColumnParallelLinearWithLoRA"),
    ("run_qkv_lora", 0, ("x", "qkv_lora_a", "qkv_lora_b", "base_output", "output_offset", "output_offset_cpu",
                         "max_qkv_out_dim"), "layers.py @ 00639c4d QKVParallelLinearWithLoRA"),
    ("run_qkv_lora", 6, (), "chunked_backend.py @ e714b89b (positional: output_offset, max_qkv_out_dim, base_output)"),
]


def _named_parameters(sig: inspect.Signature) -> list:
    return [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@pytest.mark.parametrize("ours, engine", [(Wrapper, VllmPunicaWrapperBase), (Backend, SglangBaseLoRABackend)])
def test_every_engine_method_is_there_and_takes_the_engines_arguments(ours, engine):
    """Each method of the engine's interface exists, takes each of its parameters by name (with the
    engine's default where it has one), and a call passing them by keyword binds."""
    for name, stub in vars(engine).items():
        if not callable(stub):
            continue
        mine = inspect.signature(getattr(ours, name))
        theirs = inspect.signature(stub)
        for p in _named_parameters(theirs):
            assert p.name in mine.parameters, f"{ours.__name__}.{name} lacks {p.name!r}"
            if p.default is not p.empty:
                assert mine.parameters[p.name].default == p.default, (name, p.name)
        mine.bind(**{p.name: object() for p in _named_parameters(theirs)})


@pytest.mark.parametrize("ours, calls", [(Wrapper, VLLM_CALLS), (Backend, SGLANG_CALLS)])
def test_every_engine_call_site_binds(ours, calls):
    for name, positional, keywords, source in calls:
        try:
            inspect.signature(getattr(ours, name)).bind(*[object()] * (positional + 1), **dict.fromkeys(keywords))
        except TypeError as error:
            pytest.fail(f"{ours.__name__}.{name} cannot take the call of {source}: {error}")


def test_vllm_positional_forms_of_the_interface_bind():
    """vLLM's interface lets add_expand take offset_start, add_inputs positionally."""
    sig = inspect.signature(Wrapper.add_expand)
    sig.bind(*[object()] * 7)  # self, y, x, lora_b_stacked, output_slices, offset_start, add_inputs


# ==========================================================================
# vLLM: the model runner's update_metadata, then the layers' calls, batch after batch
# ==========================================================================

LORA_INDEX_TO_ID = [None, 7, 3, 12]  # slot -> LoRA id (slot 0 free), vLLM's LoRAModelManager list
VOCAB = 70
SLICES = (24, 8, 8)

#: LoRAMapping's fields (vLLM's lora/layers/utils.py): a LoRA id per token and per sample (0 = none).
VLLM_BATCHES = [
    SimpleNamespace(index_mapping=(7, 7, 7, 3, 3, 0, 12, 12, 12, 12, 7, 0, 3), prompt_mapping=(7, 3, 0, 12),
                    is_prefill=True),
    SimpleNamespace(index_mapping=(12, 0, 7, 3), prompt_mapping=(12, 0, 7, 3), is_prefill=False),
    SimpleNamespace(index_mapping=(3, 3, 12, 7, 0, 7), prompt_mapping=(3, 3, 12, 7, 0, 7), is_prefill=False),
]


def vllm_slots(lora_ids) -> torch.Tensor:
    """convert_mapping's slots: lora_index_to_id.index(id) for id > 0, else -1."""
    return torch.tensor([LORA_INDEX_TO_ID.index(i) if i > 0 else -1 for i in lora_ids], device=DEVICE)


def new_wrapper(max_tokens=32) -> Wrapper:
    return Wrapper(max_tokens, max_batches=8, device=DEVICE, max_loras=len(LORA_INDEX_TO_ID))


def test_vllm_batches_through_every_layer_kind(backend):
    """update_metadata per batch (4- and 5-argument forms), then a q|k|v layer, an o_proj, the
    logits (padded wider than the vocabulary) and the embedding, each against float64."""
    g = torch.Generator().manual_seed(0)
    wrapper = new_wrapper()
    qkv = vllm_stacks(g, SLICES)
    o_proj = vllm_stacks(g, (45,))
    logits_a = randn(g, 4, 1, 8, IN, scale=IN ** -0.5)
    logits_b = randn(g, 4, 1, VOCAB, 8, scale=8 ** -0.5)
    embedding_b = randn(g, 4, 1, 29, 8, scale=8 ** -0.5)
    for step, mapping in enumerate(VLLM_BATCHES):
        extra = (0,) if step == 1 else ()
        wrapper.update_metadata(mapping, LORA_INDEX_TO_ID, len(LORA_INDEX_TO_ID) + 1, VOCAB, *extra)
        tokens, samples = vllm_slots(mapping.index_mapping), vllm_slots(mapping.prompt_mapping)
        T, S = tokens.shape[0], samples.shape[0]
        for (a, b), slices in ((qkv, SLICES), (o_proj, (45,))):
            x, y = randn(g, T, IN), randn(g, T, sum(slices))
            ref, y0 = vllm_linear_reference(y, x, a, b, 1.0, slices, tokens), y.clone()
            assert wrapper.add_lora_linear(y, x, a, b, 1.0, slices) is y
            assert_close(y, ref, y0)
        h, logits = randn(g, S, IN), randn(g, S, VOCAB + 6)
        ref = vllm_linear_reference(logits[:, :VOCAB], h, (logits_a,), (logits_b,), 1.0, (VOCAB,), samples)
        y0 = logits.clone()
        wrapper.add_lora_logits(logits, h, logits_a, logits_b, 1.0)
        assert torch.equal(logits[:, VOCAB:], y0[:, VOCAB:])
        assert_close(logits[:, :VOCAB], ref, y0[:, :VOCAB])
        x, y = randn(g, T, 8), randn(g, T, 29)
        ref = y.double().clone()
        for t in range(T):
            if tokens[t] >= 0:
                ref[t] += x[t].double() @ embedding_b[tokens[t], 0].double().T
        y0 = y.clone()
        wrapper.add_lora_embedding(y, x, embedding_b, add_input=True)
        assert_close(y, ref, y0)


def test_vllm_update_metadata_fills_vllms_index_buffers():
    """The buffers vLLM's own layers read (its embedding reads _embeddings_indices[1]) hold
    convert_mapping's values, and the properties their lengths."""
    wrapper = new_wrapper()
    mapping = VLLM_BATCHES[0]
    max_loras, vocab, extra = len(LORA_INDEX_TO_ID) + 1, VOCAB, 3
    wrapper.update_metadata(mapping, LORA_INDEX_TO_ID, max_loras, vocab, extra)
    slots = vllm_slots(mapping.index_mapping).tolist()
    samples = vllm_slots(mapping.prompt_mapping).tolist()
    embedding_slot = [s if s >= 0 else 0 for s in slots]
    assert wrapper.token_lora_indices.tolist() == slots
    assert wrapper.sampler_indices.tolist() == samples
    assert wrapper.embeddings_indices.tolist() == [[s * extra for s in embedding_slot],
                                                   [s * (vocab + extra) for s in embedding_slot]]
    S = len(samples)
    assert wrapper.sampler_indices_padded.tolist() == [i + (s if s >= 0 else max_loras - 1) * S
                                                       for i, s in enumerate(samples)]
    assert wrapper.is_prefill and not wrapper.no_lora
    with pytest.raises(ValueError, match="LoRA id 99, which is in no slot"):
        wrapper.update_metadata(SimpleNamespace(index_mapping=(99,), prompt_mapping=(99,), is_prefill=False),
                                LORA_INDEX_TO_ID, max_loras, vocab)


def test_vllm_plan_is_built_once_per_batch_and_shared_by_the_layers(monkeypatch):
    """The first layer call of a batch plans its tokens on the device; the other layers reuse it."""
    import lora_fused.integrations as integrations
    from lora_fused.dispatch.segments import SegmentPlan

    built = []
    monkeypatch.setattr(integrations, "plan_segments",
                        lambda *a, plan_segments=integrations.plan_segments, **k: built.append(1) or plan_segments(*a, **k))
    update = SegmentPlan.update_
    monkeypatch.setattr(SegmentPlan, "update_", lambda self, *a, **k: built.append(1) or update(self, *a, **k))
    g = torch.Generator().manual_seed(1)
    wrapper = new_wrapper()
    a, b = vllm_stacks(g, SLICES)
    for mapping in (VLLM_BATCHES[1], VLLM_BATCHES[1], VLLM_BATCHES[2]):
        wrapper.update_metadata(mapping, LORA_INDEX_TO_ID, 5, VOCAB)
        T = len(mapping.index_mapping)
        built.clear()
        for _ in range(4):  # four layers
            wrapper.add_lora_linear(randn(g, T, 40), randn(g, T, IN), a, b, 1.0, SLICES)
        assert len(built) == 1


def test_vllm_padded_rows_get_no_lora(backend):
    """x padded past the mapping (a CUDA-graph batch size): the padding rows are left alone."""
    g = torch.Generator().manual_seed(2)
    wrapper = new_wrapper()
    a, b = vllm_stacks(g, SLICES)
    wrapper.update_metadata(VLLM_BATCHES[1], LORA_INDEX_TO_ID, 5, VOCAB)
    wrapper.update_metadata(VLLM_BATCHES[2], LORA_INDEX_TO_ID, 5, VOCAB)  # 6 tokens after a batch of 4
    x, y = randn(g, 9, IN), randn(g, 9, 40)
    tokens = torch.cat([vllm_slots(VLLM_BATCHES[2].index_mapping), torch.full((3,), -1, device=DEVICE)])
    ref, y0 = vllm_linear_reference(y, x, a, b, 1.0, SLICES, tokens), y.clone()
    wrapper.add_lora_linear(y, x, a, b, 1.0, SLICES)
    assert torch.equal(y[6:], y0[6:])
    assert_close(y, ref, y0)


def vllm_shrink_reference(x, a_stacked, scale, slots):
    """[S, T, r] float64: scale · x[t] A_j[i, 0]ᵀ, 0 on rows without LoRA (vLLM zeroes the buffer)."""
    out = torch.zeros(len(a_stacked), x.shape[0], a_stacked[0].shape[2], dtype=torch.float64)
    for j, a in enumerate(a_stacked):
        for t, i in enumerate(slots.tolist()):
            if i >= 0:
                out[j, t] = scale * (x[t].double() @ a[i, 0].double().T)
    return out


def test_vllm_fully_sharded_shrink_then_expand(backend):
    """vLLM's fully sharded layers: add_shrink into a [S, T, r] fp32 buffer, (a collective,) then
    add_expand from it, the row-parallel one at offset_start into a wider output."""
    g = torch.Generator().manual_seed(3)
    wrapper = new_wrapper()
    a, b = vllm_stacks(g, SLICES)
    for mapping in VLLM_BATCHES:
        wrapper.update_metadata(mapping, LORA_INDEX_TO_ID, 5, VOCAB)
        tokens = vllm_slots(mapping.index_mapping)
        T = tokens.shape[0]
        x = randn(g, T, IN)
        buffer = torch.full((3, T, 8), float("nan"), device=DEVICE)
        wrapper.add_shrink(buffer, x, a, 0.5)
        assert rel_error(buffer, vllm_shrink_reference(x, a, 0.5, tokens)) <= TOLERANCE[torch.float32]
        y = randn(g, T, 60)
        ref, y0 = vllm_linear_reference(y[:, 20:], x, a, b, 0.5, SLICES, tokens), y.clone()
        wrapper.add_expand(y, buffer, b, SLICES, offset_start=20, add_input=True)
        assert torch.equal(y[:, :20], y0[:, :20])
        assert_close(y[:, 20:], ref, y0[:, 20:])


def test_vllm_expand_positional_form_and_add_inputs_false(backend):
    """add_expand(y, x, b, slices, offset_start, add_inputs) positionally; add_inputs=False: rows
    with a LoRA hold the delta alone in the slices' columns (vLLM's CPU wrapper), others unchanged."""
    g = torch.Generator().manual_seed(4)
    wrapper = new_wrapper()
    a, b = vllm_stacks(g, SLICES)
    wrapper.update_metadata(VLLM_BATCHES[2], LORA_INDEX_TO_ID, 5, VOCAB)
    tokens = vllm_slots(VLLM_BATCHES[2].index_mapping)
    x = randn(g, 6, IN)
    buffer = tuple(torch.zeros(6, 8, device=DEVICE) for _ in SLICES)  # the CPU wrapper's tuple form
    wrapper.add_shrink(buffer, x, a, 1.0)
    y = randn(g, 6, 40)
    y0 = y.clone()
    wrapper.add_expand(y, buffer, b, SLICES, 0, False)
    ref = vllm_linear_reference(torch.zeros(6, 40), x, a, b, 1.0, SLICES, tokens)
    live = tokens >= 0
    assert torch.equal(y[~live], y0[~live])
    assert rel_error(y[live], ref[live]) <= TOLERANCE[torch.float32]


def test_vllm_bias_forms(backend):
    """The forms with lora_bias_stacked (before scale / before output_slices): bias_j[i] added
    unscaled to slice j's columns of rows with a LoRA, as vLLM's _apply_bias; a None entry adds nothing."""
    g = torch.Generator().manual_seed(5)
    wrapper = new_wrapper()
    a, b = vllm_stacks(g, SLICES)
    bias = (randn(g, 4, 1, 24), None, randn(g, 4, 1, 8))
    wrapper.update_metadata(VLLM_BATCHES[0], LORA_INDEX_TO_ID, 5, VOCAB)
    tokens = vllm_slots(VLLM_BATCHES[0].index_mapping)
    T = tokens.shape[0]

    def with_bias(ref):
        for t, i in enumerate(tokens.tolist()):
            if i >= 0:
                ref[t, :24] += bias[0][i, 0].double()
                ref[t, 32:] += bias[2][i, 0].double()
        return ref

    x, y = randn(g, T, IN), randn(g, T, 40)
    ref, y0 = with_bias(vllm_linear_reference(y, x, a, b, 0.5, SLICES, tokens)), y.clone()
    wrapper.add_lora_linear(y, x, a, b, bias, 0.5, SLICES)
    assert_close(y, ref, y0)
    buffer = torch.zeros(3, T, 8, device=DEVICE)
    wrapper.add_shrink(buffer, x, a, 0.5)
    y = randn(g, T, 40)
    ref, y0 = with_bias(vllm_linear_reference(y, x, a, b, 0.5, SLICES, tokens)), y.clone()
    wrapper.add_expand(y, buffer, b, bias, SLICES, offset_start=0, add_input=True)
    assert_close(y, ref, y0)


def test_vllm_scale_as_tensor_and_weights_in_another_dtype(backend):
    """scale a 0-d tensor or one per slot (never read on the host); LoRA weights in float64 with
    float32 activations are cast (vLLM's lora_dtype may differ from the model's)."""
    g = torch.Generator().manual_seed(6)
    wrapper = new_wrapper()
    a, b = vllm_stacks(g, SLICES)
    wrapper.update_metadata(VLLM_BATCHES[0], LORA_INDEX_TO_ID, 5, VOCAB)
    tokens = vllm_slots(VLLM_BATCHES[0].index_mapping)
    T = tokens.shape[0]
    x, y = randn(g, T, IN), randn(g, T, 40)
    ref, y0 = vllm_linear_reference(y, x, a, b, 0.75, SLICES, tokens), y.clone()
    wrapper.add_lora_linear(y, x, tuple(t.double() for t in a), tuple(t.double() for t in b), torch.tensor(0.75),
                            SLICES)
    assert_close(y, ref, y0)
    per_slot = torch.tensor([0.0, 0.5, 2.0, -1.0], device=DEVICE)
    scaled_b = tuple(t * per_slot.view(-1, 1, 1, 1) for t in b)
    y = randn(g, T, 40)
    ref, y0 = vllm_linear_reference(y, x, a, scaled_b, 1.0, SLICES, tokens), y.clone()
    wrapper.add_lora_linear(y, x, a, b, per_slot, SLICES)
    assert_close(y, ref, y0)


def test_vllm_fp32_logits_over_fp16_activations(backend):
    """vLLM's lm head may run in fp32 over fp16 hidden states: the delta lands in the fp32 logits."""
    g = torch.Generator().manual_seed(7)
    wrapper = new_wrapper()
    wrapper.update_metadata(VLLM_BATCHES[2], LORA_INDEX_TO_ID, 5, VOCAB)
    samples = vllm_slots(VLLM_BATCHES[2].prompt_mapping)
    a = randn(g, 4, 1, 8, IN, scale=IN ** -0.5, dtype=torch.float16)
    b = randn(g, 4, 1, VOCAB, 8, scale=8 ** -0.5, dtype=torch.float16)
    h, logits = randn(g, 6, IN, dtype=torch.float16), randn(g, 6, VOCAB)
    ref, y0 = vllm_linear_reference(logits, h, (a,), (b,), 1.0, (VOCAB,), samples), logits.clone()
    wrapper.add_lora_logits(logits, h, a, b, 1.0)
    assert logits.dtype == torch.float32
    assert rel_error(logits.double() - y0.double(), ref - y0.double()) <= TOLERANCE[torch.float16]


def test_vllm_buffer_forms_of_linear_and_logits(backend):
    """``buffer`` (vLLM's CPU form): the shrink lands there, then the expand reads it."""
    g = torch.Generator().manual_seed(8)
    wrapper = new_wrapper()
    a, b = vllm_stacks(g, SLICES)
    wrapper.update_metadata(VLLM_BATCHES[1], LORA_INDEX_TO_ID, 5, VOCAB)
    tokens = vllm_slots(VLLM_BATCHES[1].index_mapping)
    x, y = randn(g, 4, IN), randn(g, 4, 40)
    buffer = tuple(torch.zeros(4, 8, device=DEVICE) for _ in SLICES)
    ref, y0 = vllm_linear_reference(y, x, a, b, 1.0, SLICES, tokens), y.clone()
    wrapper.add_lora_linear(y, x, a, b, 1.0, SLICES, buffer=buffer)
    assert_close(y, ref, y0)
    assert rel_error(torch.stack(buffer), vllm_shrink_reference(x, a, 1.0, tokens)) <= TOLERANCE[torch.float32]
    la, lb = randn(g, 4, 1, 8, IN, scale=IN ** -0.5), randn(g, 4, 1, VOCAB, 8, scale=8 ** -0.5)
    h, logits = randn(g, 4, IN), randn(g, 4, VOCAB)
    ref, y0 = vllm_linear_reference(logits, h, (la,), (lb,), 0.5, (VOCAB,), tokens), logits.clone()
    wrapper.add_lora_logits(logits, h, la, lb, 0.5, buffer=torch.zeros(4, 8, device=DEVICE))
    assert_close(logits, ref, y0)


def test_vllm_wrapper_compiles_and_a_compiled_layer_plans_each_new_batch(backend):
    """vLLM compiles its model: the layer call traces with no graph break, and the plan is built
    inside the graph from the wrapper's buffer, so a new batch needs no recompile to be right."""
    g = torch.Generator().manual_seed(16)
    wrapper = new_wrapper()
    a, b = vllm_stacks(g, SLICES)
    x, y = randn(g, 6, IN), randn(g, 6, 40)

    def layer(y, x):
        wrapper.add_lora_linear(y, x, a, b, 1.0, SLICES)
        return y

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for mapping in (VLLM_BATCHES[2], SimpleNamespace(index_mapping=(0, 12, 12, 3, 7, 7), prompt_mapping=(7,),
                                                     is_prefill=False)):
        wrapper.update_metadata(mapping, LORA_INDEX_TO_ID, 5, VOCAB)
        ref = vllm_linear_reference(y, x, a, b, 1.0, SLICES, vllm_slots(mapping.index_mapping))
        assert_close(compiled(y.clone(), x), ref, y)


def test_vllm_wrapper_refuses_what_it_does_not_know():
    wrapper = new_wrapper()
    wrapper.update_metadata(VLLM_BATCHES[1], LORA_INDEX_TO_ID, 5, VOCAB)
    a, b = vllm_stacks(torch.Generator().manual_seed(9), SLICES)
    with pytest.raises(TypeError, match=r"add_lora_linear\(\).*\['layer_idx'\]"):
        wrapper.add_lora_linear(torch.zeros(4, 40), torch.zeros(4, IN), a, b, 1.0, SLICES, layer_idx=3)
    with pytest.raises(TypeError, match="LoRAFusedPunicaWrapper.*lora_extra"):
        Wrapper(16, 4, DEVICE, lora_extra=1)
    with pytest.raises(NotImplementedError, match="fused-MoE"):
        wrapper.add_lora_fused_moe()
    with pytest.raises(ValueError, match="x has 40 rows but this batch buffer holds 32"):
        wrapper.add_lora_linear(torch.zeros(40, 40), torch.zeros(40, IN), a, b, 1.0, SLICES)


# ==========================================================================
# SGLang: the LoRA manager's prepare_lora_batch, then the layers' run_* calls
# ==========================================================================

SLOT_RANKS = [0, 3, 8, 5]  # slot 0 is SGLang's base-model slot (rank 0)


def forward_batch(request_lens, extend=True):
    """SGLang's ForwardBatch fields the backend reads: batch_size, forward_mode.is_extend(),
    extend_seq_lens_cpu (a decode batch has one token per request)."""
    mode = SimpleNamespace(is_extend=lambda: extend, is_decode=lambda: not extend)
    return SimpleNamespace(batch_size=len(request_lens), forward_mode=mode,
                           extend_seq_lens_cpu=list(request_lens) if extend else None,
                           seq_lens=torch.tensor(request_lens))


def reference_info(slots, lens, scalings):
    """The LoRABatchInfo SGLang's triton backend builds for the batch: a segment per request."""
    indptr = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return BatchInfo(bs=len(slots), seg_indptr=indptr, seg_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                     weight_indices=torch.tensor(slots, dtype=torch.int32, device=DEVICE),
                     lora_ranks=torch.tensor(SLOT_RANKS, dtype=torch.int32, device=DEVICE),
                     scalings=torch.tensor(scalings, device=DEVICE), permutation=None, num_segments=len(slots))


#: (slots per request, tokens per request or None for a decode batch)
SGLANG_BATCHES = [([2, 0, 1], [3, 1, 5]), ([3, 3, 1, 0], None), ([1, 2], [4, 2])]


def new_backend():
    return Backend(max_loras_per_batch=4, device=DEVICE, server_args=SimpleNamespace(max_lora_chunk_size=16))


def prepare(lf_backend, slots, lens, g, **kwargs):
    """The LoRA manager's call; returns the reference LoRABatchInfo and the token count."""
    scalings = (torch.rand(4, generator=g) + 0.5).tolist()
    extend = lens is not None
    lens = lens or [1] * len(slots)
    lf_backend.prepare_lora_batch(forward_batch=forward_batch(lens, extend), weight_indices=slots,
                                  lora_ranks=SLOT_RANKS, scalings=scalings, **kwargs)
    return reference_info(slots, lens, scalings), sum(lens)


def test_sglang_batches_through_every_layer_kind(backend):
    """prepare_lora_batch per batch (extend, decode, extend), then q|k|v, gate|up and a plain
    layer (lora A then B), with SGLang's keywords, each against float64."""
    g = torch.Generator().manual_seed(10)
    lf_backend = new_backend()
    for slots, lens in SGLANG_BATCHES:
        info, s = prepare(lf_backend, slots, lens, g, use_cuda_graph=False, use_prefill_cuda_graph=False)
        assert lf_backend.batch_info is not None and lf_backend.batch_info.num_tokens == s
        qkv_a, qkv_b = sglang_stacks(g, info, 3, SLICES)
        x, base = randn(g, s, IN), randn(g, s, 40)
        offset = torch.tensor([0, 24, 32, 40], dtype=torch.int32, device=DEVICE)
        ref, base0 = sglang_reference(base, x, qkv_a, qkv_b, info, s, SLICES), base.clone()
        out = lf_backend.run_qkv_lora(x=x, qkv_lora_a=qkv_a, qkv_lora_b=qkv_b, base_output=base, output_offset=offset,
                                      output_offset_cpu=offset.cpu(), max_qkv_out_dim=24)
        assert out is base
        assert_close(out, ref, base0)
        gu_a, gu_b = sglang_stacks(g, info, 2, (20, 20))
        base = randn(g, s, 40)
        ref, base0 = sglang_reference(base, x, gu_a, gu_b, info, s, (20, 20)), base.clone()
        lf_backend.run_gate_up_lora(x=x, gate_up_lora_a=gu_a, gate_up_lora_b=gu_b,
                                    output_offset=torch.tensor([0, 20, 40], device=DEVICE), base_output=base)
        assert_close(base, ref, base0)
        a, b = sglang_stacks(g, info, 1, (45,))
        base = randn(g, s, 45)
        ref, base0 = sglang_reference(base, x, a, b, info, s, (45,)), base.clone()
        shrink = lf_backend.run_lora_a_sgemm(x, a)
        bounds = torch.tensor([0, 45], dtype=torch.int32)
        lf_backend.run_lora_b_sgemm(x=shrink, weights=b, output_offset=bounds.to(DEVICE), output_offset_cpu=bounds,
                                    base_output=base)
        assert_close(base, ref, base0)


def test_sglang_cuda_graph_batches_pad_and_keep_their_buffers(backend):
    """init_cuda_graph_batch_info, then CUDA-graph batches (use_cuda_graph=True, and the older
    batch_info= form): x padded to the captured batch size, the padding rows untouched."""
    g = torch.Generator().manual_seed(11)
    lf_backend = new_backend()
    lf_backend.init_cuda_graph_batch_info(max_bs_in_cuda_graph=8, num_tokens_per_req=1)
    buffer = lf_backend._graph_rows.ids
    for slots, form in (([3, 1, 0], {"use_cuda_graph": True}), ([2, 2, 1, 3, 1], {"batch_info": object()}),
                        ([1], {"use_cuda_graph": True})):
        info, s = prepare(lf_backend, slots, None, g, **form)
        qkv_a, qkv_b = sglang_stacks(g, info, 3, SLICES)
        x, base = randn(g, 8, IN), randn(g, 8, 40)  # padded to the captured batch of 8
        ref, base0 = sglang_reference(base, x, qkv_a, qkv_b, info, 8, SLICES), base.clone()
        lf_backend.run_qkv_lora(x, qkv_a, qkv_b, torch.tensor([0, 24, 32, 40], device=DEVICE), 24, base)
        assert torch.equal(base[s:], base0[s:])
        assert_close(base, ref, base0)
    assert lf_backend._graph_rows.ids is buffer  # a captured graph keeps reading the same memory


def test_sglang_merged_layer_of_four_slices_and_tuple_b_forms(backend):
    """n_slices=4 (a merged projection of four partitions, output_offset of five bounds), and the
    tuple forms of B: q|k|v as (q [1, n, q, r], kv [2, n, kv, r]), gate|up as two [n, out, r]."""
    g = torch.Generator().manual_seed(12)
    lf_backend = new_backend()
    info, s = prepare(lf_backend, [2, 3, 1], [2, 3, 1], g, use_cuda_graph=False)
    widths = (12, 8, 8, 6)
    a, b = sglang_stacks(g, info, 4, widths)
    x, base = randn(g, s, IN), randn(g, s, 34)
    ref, base0 = sglang_reference(base, x, a, b, info, s, widths), base.clone()
    lf_backend.run_qkv_lora(x=x, qkv_lora_a=a, qkv_lora_b=b, output_offset=torch.tensor([0, 12, 20, 28, 34]),
                            max_qkv_out_dim=12, base_output=base, n_slices=4)
    assert_close(base, ref, base0)
    qkv_a, qkv_b = sglang_stacks(g, info, 3, SLICES)
    q_b, kv_b = qkv_b[None, :, :24], torch.stack([qkv_b[:, 24:32], qkv_b[:, 32:]])
    out = lf_backend.run_qkv_lora(x, qkv_a, (q_b, kv_b))
    assert_close(out, sglang_reference(torch.zeros(s, 40), x, qkv_a, qkv_b, info, s, SLICES), torch.zeros(s, 40))
    gu_a, gu_b = sglang_stacks(g, info, 2, (20, 20))
    out = lf_backend.run_gate_up_lora(x, gu_a, (gu_b[:, :20], gu_b[:, 20:]))
    assert_close(out, sglang_reference(torch.zeros(s, 40), x, gu_a, gu_b, info, s, (20, 20)), torch.zeros(s, 40))


def test_sglang_pruned_batch_info_of_the_lm_head(backend):
    """ParallelLMHeadWithLoRA passes pruned_batch_info (its rows: one per request when extending)."""
    g = torch.Generator().manual_seed(13)
    lf_backend = new_backend()
    prepare(lf_backend, [2, 1, 3], [3, 1, 5], g, use_cuda_graph=False)
    pruned = reference_info([2, 1, 3], [1, 1, 1], (torch.rand(4, generator=g) + 0.5).tolist())
    a, b = sglang_stacks(g, pruned, 1, (70,))
    h, logits = randn(g, 3, IN), randn(g, 3, 70)
    ref, y0 = sglang_reference(logits, h, a, b, pruned, 3, (70,)), logits.clone()
    shrink = lf_backend.run_lora_a_sgemm(h, a, pruned_batch_info=pruned)
    lf_backend.run_lora_b_sgemm(x=shrink, weights=b, output_offset=torch.tensor([0, 70]), base_output=logits,
                                pruned_batch_info=pruned)
    assert_close(logits, ref, y0)
    with pytest.raises(ValueError, match="fewer than the batch's 9 tokens"):
        lf_backend.run_lora_a_sgemm(h, a)


def test_sglang_backend_refuses_what_it_does_not_know():
    g = torch.Generator().manual_seed(14)
    lf_backend = new_backend()
    a = torch.zeros(4, 24, IN, device=DEVICE)
    with pytest.raises(RuntimeError, match="prepare_lora_batch"):
        lf_backend.run_lora_a_sgemm(torch.zeros(3, IN, device=DEVICE), a)
    info, s = prepare(lf_backend, [1, 2], [2, 1], g, use_cuda_graph=False)
    qkv_a, qkv_b = sglang_stacks(g, info, 3, SLICES)
    x = randn(g, s, IN)
    with pytest.raises(TypeError, match=r"run_qkv_lora\(\).*\['scaling'\]"):
        lf_backend.run_qkv_lora(x, qkv_a, qkv_b, [0, 24, 32, 40], 24, scaling=2.0)
    with pytest.raises(ValueError, match="max_qkv_out_dim=8 is narrower"):
        lf_backend.run_qkv_lora(x, qkv_a, qkv_b, [0, 24, 32, 40], 8)
    with pytest.raises(ValueError, match="output_offset must be"):
        lf_backend.run_qkv_lora(x, qkv_a, qkv_b, [0, 24, 40], 24)
    with pytest.raises(ValueError, match="prefill CUDA graph"):
        prepare(lf_backend, [1], [2], g, use_prefill_cuda_graph=True)
    with pytest.raises(ValueError, match=r"weight_indices must lie in \[0, 4\)"):
        prepare(lf_backend, [4], [2], g)
    with pytest.raises(NotImplementedError, match="embedding LoRA"):
        lf_backend.run_lora_a_embedding(input_ids=None, weights=None, vocab_size=1)
    lf_backend.reset_batch_state()
    assert lf_backend.batch_info is None


# ==========================================================================
# register(): the engines' selection hooks, as stand-ins
# ==========================================================================

def install_modules(monkeypatch, **modules):
    """Fake engine modules in sys.modules (names with '/' for '.'), each a parent's attribute."""
    for dotted, attributes in modules.items():
        name = dotted.replace("/", ".")
        module = types.ModuleType(name)
        vars(module).update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent:
            monkeypatch.setattr(sys.modules[parent], child, module, raising=False)


def fake_vllm(monkeypatch):
    class CudaPlatform:
        """vllm/platforms/cuda.py's answer."""
        @classmethod
        def get_punica_wrapper(cls) -> str:
            return "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"

    platform = CudaPlatform()
    install_modules(monkeypatch, **{"vllm": {}, "vllm/platforms": {"current_platform": platform}})
    return platform


def vllm_get_punica_wrapper(*args, **kwargs):
    """punica_selector.get_punica_wrapper's steps: the platform's qualified name, resolved, called."""
    from vllm.platforms import current_platform
    module, _, name = current_platform.get_punica_wrapper().rpartition(".")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def test_vllm_register_makes_vllms_selector_build_the_wrapper(monkeypatch):
    platform = fake_vllm(monkeypatch)
    assert vllm.register() == "lora_fused.integrations.vllm.LoRAFusedPunicaWrapper"
    assert platform.get_punica_wrapper() == vllm.WRAPPER_QUALNAME
    wrapper = vllm_get_punica_wrapper(64, max_batches=8, device=DEVICE, max_loras=4)  # LoRAModelManager's call
    assert isinstance(wrapper, Wrapper) and wrapper._token_lora_indices.shape == (64,)


def test_vllm_entry_point_acts_only_when_opted_in(monkeypatch):
    platform = fake_vllm(monkeypatch)
    monkeypatch.delenv("LORA_FUSED_VLLM", raising=False)
    vllm.load_plugin()
    assert platform.get_punica_wrapper().endswith("PunicaWrapperGPU")
    monkeypatch.setenv("LORA_FUSED_VLLM", "1")
    vllm.load_plugin()
    assert platform.get_punica_wrapper() == vllm.WRAPPER_QUALNAME


def test_vllm_register_without_vllm_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="needs vLLM"):
        vllm.register()


def fake_sglang(monkeypatch):
    """sglang/srt/lora/backend/lora_registry.py's registry and server_args' choices, as read."""
    registry: dict = {}

    def register_lora_backend(name):
        def decorator(fn):
            registry[name] = fn
            return fn
        return decorator

    def get_backend_from_name(name):
        if name not in registry:
            raise ValueError(f"Invalid backend: {name}")
        return registry[name]()

    choices = ["triton", "csgmv", "ascend", "torch_native"]
    install_modules(monkeypatch, **{
        "sglang": {}, "sglang/srt": {}, "sglang/srt/lora": {}, "sglang/srt/lora/backend": {},
        "sglang/srt/lora/backend/lora_registry": {"LORA_SUPPORTED_BACKENDS": registry,
                                                  "register_lora_backend": register_lora_backend,
                                                  "get_backend_from_name": get_backend_from_name},
        "sglang/srt/server_args": {"LORA_BACKEND_CHOICES": choices}})
    return get_backend_from_name, choices


def test_sglang_register_adds_the_backend_to_sglangs_choice(monkeypatch):
    get_backend_from_name, choices = fake_sglang(monkeypatch)
    with pytest.raises(ValueError, match="Invalid backend"):
        get_backend_from_name("lora_fused")
    assert sglang.register() == "lora_fused"
    backend_type = get_backend_from_name("lora_fused")
    assert backend_type is Backend and "lora_fused" in choices
    sglang.register()
    assert choices.count("lora_fused") == 1
    lf_backend = backend_type(max_loras_per_batch=4, device=DEVICE, server_args=SimpleNamespace())  # LoRAManager's
    assert lf_backend.batch_info is None and not lf_backend.is_moe_lora


def test_sglang_entry_point_acts_only_when_opted_in(monkeypatch):
    get_backend_from_name, choices = fake_sglang(monkeypatch)
    monkeypatch.delenv("LORA_FUSED_SGLANG", raising=False)
    sglang.load_plugin()
    assert "lora_fused" not in choices
    monkeypatch.setenv("LORA_FUSED_SGLANG", "1")
    sglang.load_plugin()
    assert get_backend_from_name("lora_fused") is Backend


def test_sglang_register_without_sglang_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(ImportError, match="needs SGLang"):
        sglang.register()


def test_setup_declares_both_entry_points():
    """setup.py's entry_points, the groups vLLM and SGLang load plugins from."""
    tree = ast.parse((pathlib.Path(__file__).resolve().parents[2] / "setup.py").read_text())
    (call,) = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"]
    (entry_points,) = [ast.literal_eval(k.value) for k in call.keywords if k.arg == "entry_points"]
    assert entry_points == {"vllm.general_plugins": ["lora_fused = lora_fused.integrations.vllm:load_plugin"],
                            "sglang.srt.plugins": ["lora_fused = lora_fused.integrations.sglang:load_plugin"]}


# ==========================================================================
# On a GPU: no host sync per layer call, and CUDA graphs replay new batches
# ==========================================================================

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vllm_layer_calls_never_sync_and_a_graph_replays_new_batches(gpu_precision_flags):
    g = torch.Generator().manual_seed(15)
    wrapper = Wrapper(64, 8, "cuda", max_loras=4)
    a, b = (tuple(t.cuda() for t in s) for s in vllm_stacks(g, SLICES))
    x, y = torch.randn(8, IN, device="cuda"), torch.zeros(8, 40, device="cuda")
    wrapper.update_metadata(VLLM_BATCHES[1], LORA_INDEX_TO_ID, 5, VOCAB)
    wrapper.add_lora_linear(y, x, a, b, 1.0, SLICES)  # warm: kernels compiled, tables made
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            wrapper.add_lora_linear(y, x, a, b, 1.0, SLICES)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    wrapper.update_metadata(VLLM_BATCHES[1], LORA_INDEX_TO_ID, 5, VOCAB)
    with torch.cuda.graph(graph):
        y.zero_()
        wrapper.add_lora_linear(y, x, a, b, 1.0, SLICES)
    for mapping in (VLLM_BATCHES[2], VLLM_BATCHES[1]):
        wrapper.update_metadata(mapping, LORA_INDEX_TO_ID, 5, VOCAB)
        graph.replay()
        tokens = torch.cat([vllm_slots(mapping.index_mapping).cuda(),
                            torch.full((8 - len(mapping.index_mapping),), -1, device="cuda")])
        ref = vllm_linear_reference(torch.zeros(8, 40), x.cpu(), [t.cpu() for t in a], [t.cpu() for t in b], 1.0,
                                    SLICES, tokens.cpu())
        assert rel_error(y.cpu(), ref) <= TOLERANCE[torch.float32]
