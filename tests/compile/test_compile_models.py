"""torch.compile on a real model: a tiny ``transformers`` Llama with injected LoRALinear.

The model is built from a ``LlamaConfig`` (vocab 64, hidden 32, 1 layer, 4 heads,
2 kv heads, eager attention; nothing downloaded) and gets
``lf.inject_lora(model, ["q_proj", "v_proj"])`` or ``"all-linear"`` with random
``lora_B``. Checked:

* ``torch._dynamo.explain`` finds no graph break, one graph, with one
  ``lora_fused::lora_linear_fwd`` node per LoRA layer, in training and inference.
  The Llama without LoRA is explained too: its break count is the baseline
  (0 with transformers 5.24), and the injected model must not add any — if a
  future transformers breaks the graph itself, the message says so.
* ``torch.compile(fullgraph=True)`` (``aot_eager``: dynamo + AOT autograd, fast on
  CPU) trains — forward, loss, backward through the compiled model — with the
  same logits, loss and LoRA gradients as eager, the backward running our
  kernels; inference with a dynamic sequence length (``mark_dynamic``) matches
  eager over several lengths with one compile, and ``dynamic=True`` (which
  makes the module's float ``scaling`` a SymFloat) traces without a break.
* Inductor compiles the injected model for inference (the slowest test here:
  Inductor builds ~10 C++ kernels on CPU).
* On a GPU (``gpu`` marker): the forward captured in a CUDA graph replays equal
  to eager.

On CPU the LoRA ops run the Triton kernels through the interpreter (conftest).
Almost half of the file's time is the Inductor test.
"""
from __future__ import annotations

import functools

import pytest
import torch

import lora_fused as lf
from lora_cases import rel_error
from lora_fused.kernels import lora_linear as kernels

transformers = pytest.importorskip("transformers")

TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}
LORA_LAYERS = {"qv": 2, "all-linear": 7}  # per decoder layer
VOCAB, SEQ = 64, 8


def tiny_llama(targets=None, *, training=False, device="cpu"):
    """The same seeded model every call; LoRA (r=4, random lora_B) when ``targets`` is given."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, attn_implementation="eager",
                                      use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    if targets is not None:
        lf.inject_lora(model, TARGETS[targets], r=4, lora_alpha=8.0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a fresh adapter has lora_B = 0 (a no-op): randomize it
            for module in model.modules():
                if isinstance(module, lf.LoRALinear):
                    module.lora_B.copy_(0.2 * torch.randn(module.lora_B.shape, generator=g))
    return model.to(device).train(training)


def token_ids(batch=2, seq=SEQ, seed=2, device="cpu"):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def launches() -> int:
    return sum(kernels.LAUNCH_COUNTS.values())


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------
# graph breaks
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def explain(targets, training):
    """(graph_count, graph_break_count, break reasons, LoRA op nodes) of one forward."""
    torch._dynamo.reset()
    model = tiny_llama(targets, training=training)
    ids = token_ids()
    with torch.set_grad_enabled(training):
        kwargs = {"labels": ids} if training else {}
        e = torch._dynamo.explain(model)(input_ids=ids, **kwargs)
    ops = sum(1 for gm in e.graphs for node in gm.graph.nodes
              if "lora_fused.lora_linear_fwd" in str(node.target))
    return e.graph_count, e.graph_break_count, [str(r.reason) for r in e.break_reasons], ops


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("targets", list(TARGETS))
def test_explain_no_graph_breaks(targets, training):
    base_graphs, base_breaks, base_reasons, base_ops = explain(None, training)
    graphs, breaks, reasons, ops = explain(targets, training)
    assert base_ops == 0
    assert ops == LORA_LAYERS[targets], "each LoRALinear should be one lora_linear_fwd node"
    assert breaks == base_breaks and graphs == base_graphs, (
        f"LoRA adds graph breaks: {breaks} vs {base_breaks} without it; {reasons}")
    assert base_breaks == 0 and base_graphs == 1, (
        f"transformers' Llama itself graph-breaks (not lora-fused, which adds none): {base_reasons}")


# --------------------------------------------------------------------------
# compiled == eager
# --------------------------------------------------------------------------
def test_compiled_training_matches_eager():
    """fullgraph aot_eager: forward, loss, backward through the compiled model; "all-linear"."""
    torch._dynamo.reset()
    model = tiny_llama("all-linear", training=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step, seed in enumerate((2, 3)):  # the second call reuses the compiled graphs
        ids = token_ids(seed=seed)
        eager = model(input_ids=ids, labels=ids)
        eager.loss.backward()
        eager_grads = lora_grads(model)
        model.zero_grad(set_to_none=True)

        out = compiled(input_ids=ids, labels=ids)
        before = launches()
        out.loss.backward()
        if lf.select_backend(ids.device, torch.float32) == "triton":  # the torch path launches no kernel
            assert launches() > before, "the compiled backward did not run the LoRA kernels"
        grads = lora_grads(model)
        model.zero_grad(set_to_none=True)

        assert rel_error(out.logits, eager.logits) <= 1e-6
        assert rel_error(out.loss, eager.loss) <= 1e-6
        assert grads.keys() == eager_grads.keys() and len(grads) == 2 * LORA_LAYERS["all-linear"]
        for name, grad in grads.items():
            assert rel_error(grad, eager_grads[name]) <= 1e-6, f"step {step}: {name}"
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_compiled_inference_dynamic_seq_len_matches_eager():
    """fullgraph aot_eager, sequence length marked dynamic: one compile serves several lengths."""
    torch._dynamo.reset()
    model = tiny_llama("qv")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for seq in (8, 5, 3):
            ids = token_ids(seq=seq, seed=seq)
            torch._dynamo.mark_dynamic(ids, 1)
            out = compiled(input_ids=ids).logits
            assert out.shape == (2, seq, VOCAB)
            assert rel_error(out, model(input_ids=ids).logits) <= 1e-6, f"seq {seq}"


def test_compile_dynamic_true():
    """dynamic=True makes LoRALinear.scaling a SymFloat: validation must not break the graph."""
    torch._dynamo.reset()
    model = tiny_llama("qv")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    ids = token_ids()
    with torch.no_grad():
        assert rel_error(compiled(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-6


def test_inductor_inference_matches_eager():
    """Inductor lowers the custom op inside the real graph. compile_threads=1: for this one small
    graph a pool of compile workers (each importing torch) costs more than it saves."""
    torch._dynamo.reset()
    model = tiny_llama("qv")
    compiled = torch.compile(model, fullgraph=True)
    ids = token_ids()
    with torch.no_grad(), torch._inductor.config.patch(compile_threads=1):
        out = compiled(input_ids=ids).logits
    with torch.no_grad():
        assert rel_error(out, model(input_ids=ids).logits) <= 1e-5


# --------------------------------------------------------------------------
# GPU: CUDA graphs
# --------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("targets", list(TARGETS))
def test_cuda_graph_replay_equals_eager(targets):
    """The injected model's forward, captured once with static inputs, replays equal to eager.

    An explicit all-ones attention_mask keeps transformers off the host sync it does to
    detect packed sequences when no mask is given (it skips that during capture only in
    recent versions); no other op of the forward syncs (checked on CPU with a dispatch mode).
    """
    model = tiny_llama(targets, device="cuda")
    static_ids = token_ids(device="cuda")
    static_mask = torch.ones_like(static_ids)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # compile the Triton kernels and warm the allocator outside the capture
            model(input_ids=static_ids, attention_mask=static_mask)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    before = launches()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_logits = model(input_ids=static_ids, attention_mask=static_mask).logits
    assert launches() > before, "the capture holds no LoRA kernel"
    for seed in (10, 11, 12):
        ids = token_ids(seed=seed, device="cuda")
        static_ids.copy_(ids)
        graph.replay()
        with torch.no_grad():
            eager = model(input_ids=ids, attention_mask=static_mask).logits
        torch.cuda.synchronize()
        assert torch.isfinite(static_logits).all()
        assert rel_error(static_logits, eager) <= 1e-6, f"seed {seed}"
