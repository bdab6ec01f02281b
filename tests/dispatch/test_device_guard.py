"""Every op launches its Triton kernels on its tensors' CUDA device (``backend.on_tensor_device``).

Triton launches on the current CUDA device, wherever the tensors live, so a model split over two
GPUs needs each op to make its tensors' device current. The situation is staged, so that one GPU
or none (the interpreter on CPU tensors) shows it: the tensors are presented as on cuda:1 while
cuda:0 is current (``backend._cuda_index`` and ``backend._current_cuda_index`` replaced), the
device context is a stand-in that makes its index current, and every kernel's ``run`` (what
``kernel[grid](...)`` calls) records the current device when it launches. Each op family must launch on device 1
only, switch once per op (forward, backward), and leave device 0 current afterwards.
"""
from __future__ import annotations

import contextlib
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lora_fused as lf
from lora_cases import DEVICE
from lora_fused.dispatch import backend
from lora_fused.integrations import sglang, vllm

triton_jit = pytest.importorskip("triton.runtime.jit")

#: The kernel modules, imported so that their kernels exist to be watched.
KERNEL_MODULES = ("lora_linear", "multi_lora", "lora_delta", "dora", "dequant4bit")


class StagedDevices:
    """cuda:0 current, the tensors on cuda:1; what the device context and the launches saw."""

    def __init__(self):
        self.current = 0
        self.entered: list[int] = []  # the index of each device context entered
        self.launched_on: list[int] = []  # the current device at each launch

    @contextlib.contextmanager
    def device(self, index: int):
        self.entered.append(index)
        before, self.current = self.current, index
        try:
            yield
        finally:
            self.current = before

    def run_one_op(self, op) -> int:
        """Run ``op()``: every launch on device 1, device 0 current after; returns the switches."""
        self.entered.clear()
        self.launched_on.clear()
        op()
        assert self.launched_on, "no Triton launch: the staging does not reach the kernels"
        assert set(self.launched_on) == {1}, f"launches on devices {self.launched_on}, expected all on 1"
        assert set(self.entered) == {1} and self.current == 0
        return len(self.entered)


def kernel_objects() -> list:
    for name in KERNEL_MODULES:
        __import__(f"lora_fused.kernels.{name}")
    found = {}
    for mod_name, mod in list(sys.modules.items()):
        if mod is not None and mod_name.startswith("lora_fused.kernels"):
            found.update({id(obj): obj for obj in vars(mod).values()
                          if isinstance(obj, triton_jit.KernelInterface)})
    return list(found.values())


@pytest.fixture
def staged(monkeypatch):
    devices = StagedDevices()
    monkeypatch.setattr(backend, "_cuda_index", lambda t: 1)
    monkeypatch.setattr(backend, "_current_cuda_index", lambda: devices.current)
    monkeypatch.setattr(backend, "_cuda_device", devices.device)
    monkeypatch.setenv("LORA_FUSED_BACKEND", "triton")
    kernels = kernel_objects()

    def watched(run):
        def run_on_current_device(*args, **kwargs):
            devices.launched_on.append(devices.current)
            return run(*args, **kwargs)
        return run_on_current_device

    for kernel in kernels:  # an instance attribute shadows KernelInterface.run (as bench/host.py does)
        kernel.run = watched(kernel.run)
    try:
        yield devices
    finally:
        for kernel in kernels:
            vars(kernel).pop("run", None)


def randn(*shape, requires_grad=False):
    return torch.randn(*shape, device=DEVICE).requires_grad_(requires_grad)


def ints(*values):
    return torch.tensor(values, device=DEVICE)


def test_lora_linear(staged):
    torch.manual_seed(0)
    x, w, a, b = randn(5, 19, requires_grad=True), randn(33, 19), randn(3, 19, requires_grad=True), randn(33, 3)
    assert staged.run_one_op(lambda: lf.lora_linear(x.detach(), w, a.detach(), b, 0.5)) == 1
    assert staged.run_one_op(lambda: lf.lora_linear(x, w, a, b, 0.5).sum().backward()) == 2


def test_lora_linear_layer(staged):
    torch.manual_seed(0)
    layer = lf.LoRALinear(19, 33, r=3, device=DEVICE)
    nn.init.normal_(layer.lora_B)
    x = randn(5, 19)
    assert staged.run_one_op(lambda: layer(x).sum().backward()) == 2


def test_multi_lora_linear(staged):
    torch.manual_seed(0)
    x, w = randn(7, 19, requires_grad=True), randn(33, 19)
    a, b = randn(3, 4, 19, requires_grad=True), randn(3, 33, 4, requires_grad=True)
    ids, scalings = ints(0, 2, -1, 1, 0, 2, 1), torch.rand(3, device=DEVICE)
    assert staged.run_one_op(lambda: lf.multi_lora_linear(x.detach(), w, a.detach(), b.detach(), ids,
                                                          scalings)) == 1
    assert staged.run_one_op(lambda: lf.multi_lora_linear(x, w, a, b, ids, scalings).sum().backward()) == 2


def test_add_lora_with_slices(staged):
    torch.manual_seed(0)
    y, x = randn(7, 24), randn(7, 19)
    a, b = randn(3, 2, 4, 19), randn(3, 24, 4)
    ids = ints(0, 2, -1, 1, 0, 2, 1)
    scalings = torch.rand(3, device=DEVICE)
    assert staged.run_one_op(lambda: lf.add_lora(y, x, a, b, ids, scalings, slices=(16, 8))) == 1


def test_dora_linear(staged):
    torch.manual_seed(0)
    x, w, a, b = randn(5, 19, requires_grad=True), randn(33, 19), randn(3, 19, requires_grad=True), randn(33, 3)
    magnitude = (torch.rand(33, device=DEVICE) + 0.5).requires_grad_(True)
    assert staged.run_one_op(lambda: lf.dora_linear(x, w, a, b, magnitude, 0.5).sum().backward()) == 2


def test_dora_layer_in_eval_and_its_norm(staged):
    torch.manual_seed(0)
    layer = lf.DoRALinear.from_linear(nn.Linear(19, 33, device=DEVICE), r=3)
    nn.init.normal_(layer.lora_B)
    layer.eval()
    layer.cache_weight_norm = True
    x = randn(5, 19)
    with torch.no_grad():
        assert staged.run_one_op(lambda: layer(x)) == 2  # the norm (then cached), the forward given it
        assert staged.run_one_op(lambda: layer(x)) == 1
    assert staged.run_one_op(layer.weight_norm) == 1


def test_qlora(staged):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = bnb.nn.Linear4bit(99, 48, compute_dtype=torch.float32, quant_type="nf4")
    linear.weight = bnb.nn.Params4bit(torch.randn(48, 99), requires_grad=False, quant_type="nf4")
    layer = lf.LoRALinear4bit.from_linear4bit(linear.to(DEVICE), r=3)  # quantized by the move
    nn.init.normal_(layer.lora_B)
    for rows in (3, 37):  # the decode kernel; dequantize then the LoRA kernels
        x = randn(rows, 99, requires_grad=True)
        assert staged.run_one_op(lambda: layer(x).sum().backward()) == 2
    assert staged.run_one_op(layer.dequantized_weight) == 1


def test_multi_lora_embedding(staged):
    torch.manual_seed(0)
    weight, a, b = randn(11, 8), randn(3, 11, 4), randn(3, 8, 4)
    idx, ids, scalings = ints(1, 5, 10, 0), ints(0, -1, 2, 1), torch.rand(3, device=DEVICE)
    assert staged.run_one_op(lambda: lf.multi_lora_embedding(idx, weight, a, b, ids, scalings)) == 1


def test_vllm_entry_points(staged):
    torch.manual_seed(0)
    mapping = ints(0, 2, -1, 1, 0)
    a_stacked = (randn(3, 1, 4, 19), randn(3, 1, 4, 19))
    b_stacked = (randn(3, 1, 16, 4), randn(3, 1, 8, 4))
    y = randn(5, 24)
    assert staged.run_one_op(lambda: vllm.add_lora_linear(y, randn(5, 19), a_stacked, b_stacked, 0.5, (16, 8),
                                                          mapping)) == 1
    assert staged.run_one_op(lambda: vllm.add_lora_linear(y[:, :16], randn(5, 19), a_stacked[:1], b_stacked[:1],
                                                          0.5, (16,), mapping)) == 1
    assert staged.run_one_op(lambda: vllm.add_lora_embedding(randn(5, 16), randn(5, 4), b_stacked[0], mapping)) == 1
    assert staged.run_one_op(lambda: vllm.add_lora_logits(randn(5, 16), randn(5, 19), a_stacked[0], b_stacked[0],
                                                          0.5, mapping)) == 1


def test_sglang_entry_points(staged):
    torch.manual_seed(0)
    info = SimpleNamespace(bs=2, seg_indptr=ints(0, 3, 5).int(), seg_lens=ints(3, 2).int(),
                           weight_indices=ints(1, 0).int(), lora_ranks=ints(4, 4).int(),
                           scalings=torch.rand(2, device=DEVICE),
                           permutation=None, num_segments=2, max_len=3, use_cuda_graph=False)
    x = randn(5, 19)
    qkv_a, qkv_b = randn(2, 3 * 4, 19), randn(2, 24, 4)
    offsets = ints(0, 8, 16, 24).int()
    assert staged.run_one_op(lambda: sglang.run_lora_a_sgemm(x, qkv_a, info, stack_num=3)) == 1
    assert staged.run_one_op(lambda: sglang.run_lora_b_sgemm(randn(5, 4), qkv_b, info)) == 1
    assert staged.run_one_op(lambda: sglang.run_qkv_lora(x, qkv_a, qkv_b, info, offsets, 8)) == 1


def test_vllm_punica_wrapper(staged):
    """Every layer call of vLLM's wrapper, after the model runner's update_metadata."""
    torch.manual_seed(0)
    wrapper = vllm.LoRAFusedPunicaWrapper(16, 4, DEVICE, max_loras=3)
    wrapper.update_metadata(SimpleNamespace(index_mapping=(5, 0, 9, 5, 7), prompt_mapping=(5, 9), is_prefill=True),
                            [5, 7, 9], 4, 16)
    a_stacked = (randn(3, 1, 4, 19), randn(3, 1, 4, 19))
    b_stacked = (randn(3, 1, 16, 4), randn(3, 1, 8, 4))
    x, y, buffer = randn(5, 19), randn(5, 24), torch.zeros(2, 5, 4, device=DEVICE)
    assert staged.run_one_op(lambda: wrapper.add_lora_linear(y, x, a_stacked, b_stacked, 0.5, (16, 8))) == 1
    assert staged.run_one_op(lambda: wrapper.add_lora_linear(y[:, :16], x, a_stacked[:1], b_stacked[:1], 0.5,
                                                             (16,))) == 1
    assert staged.run_one_op(lambda: wrapper.add_shrink(buffer, x, a_stacked, 1.0)) == 1
    assert staged.run_one_op(lambda: wrapper.add_expand(y, buffer, b_stacked, (16, 8), offset_start=0,
                                                        add_input=True)) == 1
    assert staged.run_one_op(lambda: wrapper.add_lora_embedding(randn(5, 16), randn(5, 4), b_stacked[0],
                                                                add_input=True)) == 1
    assert staged.run_one_op(lambda: wrapper.add_lora_logits(randn(2, 16), randn(2, 19), a_stacked[0], b_stacked[0],
                                                             1.0)) == 1


def test_sglang_backend(staged):
    """Every layer call of SGLang's backend, after the LoRA manager's prepare_lora_batch."""
    torch.manual_seed(0)
    backend_obj = sglang.LoRAFusedBackend(max_loras_per_batch=2, device=DEVICE, server_args=None)
    mode = SimpleNamespace(is_extend=lambda: True)
    backend_obj.prepare_lora_batch(forward_batch=SimpleNamespace(batch_size=2, forward_mode=mode,
                                                                 extend_seq_lens_cpu=[3, 2]),
                                   weight_indices=[1, 0], lora_ranks=[4, 4], scalings=[0.5, 2.0],
                                   use_cuda_graph=False)
    x = randn(5, 19)
    qkv_a, qkv_b = randn(2, 3 * 4, 19), randn(2, 24, 4)
    offsets = ints(0, 8, 16, 24).int()
    assert staged.run_one_op(lambda: backend_obj.run_lora_a_sgemm(x, qkv_a[:, :4])) == 1
    assert staged.run_one_op(lambda: backend_obj.run_lora_b_sgemm(x=randn(5, 4), weights=qkv_b,
                                                                  output_offset=ints(0, 24).int())) == 1
    assert staged.run_one_op(lambda: backend_obj.run_qkv_lora(x=x, qkv_lora_a=qkv_a, qkv_lora_b=qkv_b,
                                                              output_offset=offsets, max_qkv_out_dim=8)) == 1
    assert staged.run_one_op(lambda: backend_obj.run_gate_up_lora(x=x, gate_up_lora_a=qkv_a[:, :8],
                                                                  gate_up_lora_b=qkv_b[:, :16])) == 1
