"""QLoRA: LoRALinear4bit over bitsandbytes 4-bit weights against PEFT's QLoRA layer.

PEFT wraps the same ``bnb.nn.Linear4bit`` objects (deep copies: the same packed bytes and
quant state); both layers get the same random lora_A / lora_B. Checked: the output and the
gradients of x, lora_A and lora_B (relative error), on a small MLP (nf4 + double quant, fp4,
odd in_features, blocksizes 64 and 128) and a tiny Llama quantized by transformers'
``BitsAndBytesConfig`` (which runs on CPU here), in fp32 and fp16 compute dtypes, on the
Triton path (interpreter) and the torch backend. Then: the module holds no out × in
floating tensor, merge refuses, adapters round-trip with PEFT, from_peft_model converts.
"""
import copy

import pytest
import torch
from torch import nn

import lora_fused as lf
from lora_cases import BAD_SCALINGS, refuses_bad_scaling_under_compile, rel_error
from lora_fused.kernels import common
from lora_fused.modules.qlora import LoRALinear4bit
from lora_fused.ops.qlora import qlora_linear, require_bitsandbytes

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

#: PEFT and lora-fused round differently: PEFT runs its LoRA branch in fp32 (its adapters'
#: dtype), lora-fused in the compute dtype (as LoRALinear). In fp16 that is a few units of
#: fp16's eps (9.8e-4) per layer, compounded over 3 layers (8.0e-3 measured on dA of the second
#: layer). The float64 test below checks one layer's math exactly.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def quantize_linears(model: nn.Module, compute_dtype, quant_type="nf4", nested=True, blocksize=64):
    """Replace every nn.Linear of ``model`` by a bnb Linear4bit holding its weight (quantized on CPU)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type=quant_type,
                                      compress_statistics=nested, quant_storage=torch.uint8)
                q.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype), requires_grad=False, quant_type=quant_type,
                                             compress_statistics=nested, blocksize=blocksize)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
                setattr(module, child_name, q.to("cpu"))
    return without_bf16_cpu_kernel(model)


def without_bf16_cpu_kernel(model: nn.Module) -> nn.Module:
    """Keep every bitsandbytes Linear4bit of ``model`` computing in its compute dtype. On a CPU with
    AVX512-BF16 (bitsandbytes' ``support_avx512bf16_for_cpu``), its eval-mode forward of an input
    that needs no grad repacks the weight in place for a kernel that computes in bf16 (a relative
    error near 3e-3, and asserts for out_features not a multiple of 32 or in_features below the
    blocksize). The references here compute in the compute dtype, as bitsandbytes does on a GPU."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def mlp(compute_dtype, **quant):
    """Three 4-bit layers, in_features 99, 44 and 40: none a multiple of 16. PEFT's layer
    dequantizes with bitsandbytes, whose AVX-512 CPU kernel gives other values when in_features
    is a multiple of 16 but not of the blocksize (see test_blocks_run_over_the_flat_weight_...)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(99, 44), nn.ReLU(), nn.Linear(44, 40, bias=False), nn.Tanh(), nn.Linear(40, 8))
    return quantize_linears(model, compute_dtype, **quant)


def randomize_peft_adapters(peft_model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)


def peft_pair(model, targets, r=4, alpha=8):
    """(PEFT QLoRA model, ours converted from an identical copy with the same adapters)."""
    ours_base = copy.deepcopy(model)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    randomize_peft_adapters(pm)
    ours = lf.from_peft_model(copy.deepcopy(pm))
    lf.inject_lora(ours_base, targets, r=r, lora_alpha=alpha)  # the inject path gets the same adapters
    ours_base.load_state_dict(lf.lora_state_dict(ours), strict=False)
    return pm, ours, ours_base


def lora_grads(model):
    return {n.replace(".default", "").replace(".weight", ""): p.grad
            for n, p in model.named_parameters() if "lora_" in n}


def check_parity(pm, ours, x, dtype):
    pm.zero_grad()
    ours.zero_grad()
    x_peft = x.clone().requires_grad_(True)
    x_ours = x.clone().requires_grad_(True)
    y_peft = pm(x_peft)
    y_ours = ours(x_ours)
    assert y_ours.dtype == y_peft.dtype
    assert rel_error(y_ours, y_peft) <= TOL[dtype]
    g = torch.randn_like(y_peft)
    y_peft.backward(g)
    y_ours.backward(g)
    assert rel_error(x_ours.grad, x_peft.grad) <= TOL[dtype]
    theirs = {k.removeprefix("base_model.model."): v for k, v in lora_grads(pm).items()}
    mine = lora_grads(ours)
    assert set(mine) == set(theirs) and mine
    for key in mine:
        assert mine[key].dtype == torch.float32
        assert rel_error(mine[key], theirs[key]) <= TOL[dtype], key


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("quant", [dict(quant_type="nf4", nested=True), dict(quant_type="fp4", nested=False),
                                   dict(quant_type="nf4", nested=False, blocksize=128)])
@pytest.mark.parametrize("rows", [3, 37])  # decode kernel / dequantize + LoRA kernels
def test_mlp_matches_peft_qlora_forward_and_grads(rows, quant, dtype, backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    pm, ours, injected = peft_pair(mlp(dtype, **quant), ["0", "2", "4"])
    assert all(isinstance(ours[i], LoRALinear4bit) for i in (0, 2, 4))
    common.LAUNCH_COUNTS.clear()
    torch.manual_seed(2)
    x = torch.randn(rows, 99, dtype=dtype)
    check_parity(pm, ours, x, dtype)
    check_parity(pm, injected, x, dtype)
    if backend == "triton":
        kernel = "qlora_decode_kernel" if rows <= 16 else "dequant4bit_kernel"
        assert common.LAUNCH_COUNTS[kernel] > 0


def test_forward_and_grads_match_float64_on_the_dequantized_weight():
    layer = LoRALinear4bit.from_linear4bit(mlp(torch.float32)[0], r=5, lora_alpha=3)
    nn.init.normal_(layer.lora_B)
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    for rows in (2, 29):
        torch.manual_seed(rows)
        x = torch.randn(rows, 99, dtype=torch.float64, requires_grad=True)
        y = layer(x.float())
        a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        ref = x @ weight.T + layer.bias.double() + layer.scaling * (x @ a.T) @ b.T
        assert rel_error(y, ref) <= 1e-6
        g = torch.randn_like(ref)
        y.backward(g.float())
        ref.backward(g)
        grad_a = layer.scaling * (g @ b).T @ x.detach()
        grad_b = layer.scaling * g.T @ (x.detach() @ a.T)
        assert rel_error(layer.lora_A.grad, grad_a) <= 1e-6
        assert rel_error(layer.lora_B.grad, grad_b) <= 1e-6
        layer.lora_A.grad = layer.lora_B.grad = None


def dequantized_by_the_format(weight) -> torch.Tensor:
    """deq(W0) [out, in] in fp32 from bitsandbytes' format alone, as its CUDA kernel computes it: the
    i-th element of the flattened weight (high nibble first) is code[nibble] * absmax[i // blocksize]."""
    state = weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    n = state.shape[0] * state.shape[1]
    packed = weight.data.view(-1)
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:n].long()
    code = bnb.functional.get_4bit_type(state.quant_type, device="cpu")
    return (code[nibbles] * absmax.repeat_interleave(state.blocksize)[:n]).view(state.shape)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("out_features", [24, 25])  # the last block whole / partial
def test_blocks_run_over_the_flat_weight_when_in_features_is_not_a_multiple_of_the_blocksize(
        out_features, blocksize, backend, monkeypatch):
    """in_features 48, a multiple of 16 but not of the blocksize, so rows start inside blocks.
    bitsandbytes' AVX-512 CPU dequantize looks block scales up per row and gets other values for
    such a weight (on hosts with AVX-512); both backends read the blocks over the flat weight."""
    if backend == "torch":
        monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    torch.manual_seed(0)
    model = quantize_linears(nn.Sequential(nn.Linear(48, out_features)), torch.float32, blocksize=blocksize)
    layer = LoRALinear4bit.from_linear4bit(model[0], r=3, lora_alpha=5)
    nn.init.normal_(layer.lora_B)
    weight = dequantized_by_the_format(layer.weight)
    assert torch.equal(layer.dequantized_weight(torch.float32), weight)
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    for rows in (5, 29):  # the decode kernel / dequantize + LoRA kernels on the Triton path
        x = torch.randn(rows, 48, dtype=torch.float64)
        ref = x @ weight.double().T + layer.bias.double() + layer.scaling * (x @ a.T) @ b.T
        assert rel_error(layer(x.float()), ref) <= TOL[torch.float32]


@pytest.mark.parametrize("finite_first,bad", BAD_SCALINGS[:2])
def test_compiled_qlora_linear_refuses_a_non_finite_scaling(finite_first, bad, monkeypatch):
    """Under compile the Function is traced (no custom op): its scaling check must hold there too.
    The torch backend (dynamo traces into the Triton interpreter's Python otherwise), at a shape
    where CPU addmm with a transposed operand ignores a NaN alpha: a finite output unchecked."""
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    linear = mlp(torch.float32)[0]
    torch.manual_seed(0)
    x, lora_A, lora_B = torch.randn(5, 99), torch.randn(3, 99), torch.randn(linear.out_features, 3)
    refuses_bad_scaling_under_compile(
        lambda s: qlora_linear(x, linear.weight, linear.weight.quant_state, lora_A, lora_B, s, linear.bias),
        "aot_eager", finite_first, bad)


def saved_tiny_llama(tmp_path_factory, hidden_size: int):
    """The directory of a tiny random Llama (2 layers, MLP width 2 x hidden_size) saved for from_pretrained."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32, attn_implementation="eager")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(f"llama{hidden_size}")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama whose linear layers all have in_features a multiple of 64, the blocksize:
    bitsandbytes' AVX-512 CPU dequantize_4bit (PEFT's path here) looks block scales up per row,
    which is right only for rows of whole blocks (see mlp()), so PEFT is a reference at these widths."""
    return saved_tiny_llama(tmp_path_factory, 64)


def llama4bit(path, dtype):
    """A tiny Llama loaded in 4 bits by transformers (nf4, double quant) on CPU."""
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype,
                                                              device_map="cpu")
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    return without_bf16_cpu_kernel(model)


#: LoRA gradients of the tiny Llama (2 layers, attention and MLP in the compute dtype): measured
#: 1.9e-6 (fp32) and 4.2e-2 (fp16: PEFT's fp32 LoRA branch against ours in fp16, see TOL).
LLAMA_GRAD_TOL = {torch.float32: 1e-5, torch.float16: 5e-2}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiny_llama_from_bitsandbytes_config_matches_peft(llama_dir, dtype):
    pm, ours, injected = peft_pair(llama4bit(llama_dir, dtype), LLAMA_TARGETS, r=8, alpha=16)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    for model in (ours, injected):
        pm.zero_grad()
        model.zero_grad()
        logits_peft = pm(input_ids=ids).logits
        logits = model(input_ids=ids).logits
        assert rel_error(logits, logits_peft) <= TOL[dtype]
        g = torch.randn_like(logits_peft)
        logits_peft.backward(g)
        logits.backward(g)
        theirs = {k.removeprefix("base_model.model."): v for k, v in lora_grads(pm).items()}
        mine = lora_grads(model)
        assert set(mine) == set(theirs) and len(mine) == 2 * 2 * len(LLAMA_TARGETS)
        for key in mine:
            assert rel_error(mine[key], theirs[key]) <= LLAMA_GRAD_TOL[dtype], key


def test_module_holds_no_out_by_in_floating_tensor():
    layer = LoRALinear4bit.from_linear4bit(mlp(torch.float32)[0], r=4)
    x = torch.randn(40, 99, requires_grad=True)
    layer(x).sum().backward()
    layer(x[:2])
    size = layer.in_features * layer.out_features
    tensors = list(layer.state_dict(keep_vars=True).values()) + [p.grad for p in layer.parameters() if p.grad is not None]
    tensors += [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    big = [tuple(t.shape) for t in tensors if t.is_floating_point() and t.numel() >= size]
    assert not big
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == size // 2 + size % 2


def test_merge_refuses_and_to_linear_dequantizes():
    layer = LoRALinear4bit.from_linear4bit(mlp(torch.float32)[0], r=4)
    nn.init.normal_(layer.lora_B)
    with pytest.raises(ValueError, match="re-quantize"):
        layer.merge()
    plain = lf.LoRALinear(99, 99, r=4)
    nn.init.normal_(plain.lora_B)
    plain_weight = plain.weight.detach().clone()
    model = nn.Sequential(plain, layer)
    with pytest.raises(ValueError, match="1 of 2 layers cannot merge.*to_linear"):
        lf.merge_lora(model)
    assert not plain.merged and torch.equal(plain.weight, plain_weight)  # nothing merged
    linear = layer.to_linear(merge=True)
    x = torch.randn(7, 99)
    assert type(linear) is nn.Linear and linear.weight.dtype == torch.float32
    assert rel_error(linear(x), layer(x)) <= 1e-6


def test_state_dict_has_linear4bit_keys_and_round_trips():
    base = mlp(torch.float32)
    keys4bit = set(base[0].state_dict())
    layer = LoRALinear4bit.from_linear4bit(base[0], r=4)
    nn.init.normal_(layer.lora_B)
    state = layer.state_dict()
    assert keys4bit | {"lora_A", "lora_B", "_extra_state"} == set(state)
    other = LoRALinear4bit.from_linear4bit(mlp(torch.float32, quant_type="fp4", nested=False)[0], r=4)
    other.load_state_dict(state)
    x = torch.randn(20, 99)
    assert torch.equal(other(x), layer(x))


def test_adapter_saved_by_peft_loads_on_a_4bit_base_and_ours_loads_in_peft(llama_dir, tmp_path):
    dtype = torch.float32
    pm = peft.get_peft_model(llama4bit(llama_dir, dtype), peft.LoraConfig(r=4, lora_alpha=8,
                                                                          target_modules=LLAMA_TARGETS))
    randomize_peft_adapters(pm)
    pm.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
    ours = lf.load_peft_adapter(llama4bit(llama_dir, dtype), tmp_path / "peft")
    assert isinstance(ours.model.layers[1].self_attn.o_proj, LoRALinear4bit)
    with torch.no_grad():
        assert rel_error(ours(input_ids=ids).logits, expected) <= TOL[dtype]
    lf.save_peft_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(llama4bit(llama_dir, dtype), tmp_path / "ours")
    with torch.no_grad():
        assert rel_error(back(input_ids=ids).logits, expected) <= TOL[dtype]


def test_missing_bitsandbytes_says_to_install_the_extra(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"lora-fused\[qlora\]"):
        require_bitsandbytes()


# --------------------------------------------------------------------------
# HF Trainer on a 4-bit model: train, checkpoint, resume, as PEFT's QLoRA does
# --------------------------------------------------------------------------
def train_losses(model, output_dir, *, max_steps=4, resume_from_checkpoint=None):
    """The loss of every step of a Trainer run on fixed random tokens (a checkpoint every 2 steps)."""
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(5))
    args = transformers.TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=4,
                                          max_steps=max_steps, save_steps=2, logging_steps=1, learning_rate=1e-2,
                                          seed=0, use_cpu=True, report_to=[], disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_trainer_trains_checkpoints_and_resumes_a_4bit_model_as_peft_qlora(llama_dir, tmp_path):
    pm, _, ours = peft_pair(llama4bit(llama_dir, torch.float32), LLAMA_TARGETS, r=8, alpha=16)
    resumed = copy.deepcopy(ours)  # trained later from ours' checkpoint, which must replace its adapters:
    randomize_peft_adapters(resumed, seed=9)
    peft_losses = train_losses(pm, tmp_path / "peft")
    losses = train_losses(ours, tmp_path / "ours")
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in losses.items():
        assert abs(loss - peft_losses[step]) <= 1e-5 * abs(peft_losses[step]), step
    checkpoint = tmp_path / "ours" / "checkpoint-2"
    resumed_losses = train_losses(resumed, tmp_path / "resumed", resume_from_checkpoint=str(checkpoint))
    for step in (3, 4):  # trained from the checkpoint's adapters and optimizer (1, 2: its log)
        assert abs(resumed_losses[step] - losses[step]) <= 1e-6 * abs(losses[step]), step
