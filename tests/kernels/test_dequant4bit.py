"""kernels/dequant4bit.py: the 4-bit dequantize is bit-identical to bitsandbytes, and the fused
decode kernel (dequantize-GEMV + LoRA) matches float64 math on the dequantized weight.

bitsandbytes' own paths disagree on one bit: for FP4 code 8 its CUDA kernel and its scalar
CPU kernel give -0.0; its AVX-512 CPU kernel (in_features a multiple of 16, on hosts with
AVX-512) and its torch fallback (odd in_features; blocksize >= 2048 on AVX-512 hosts) give
+0.0. Which one runs depends on the host, so the comparison with bitsandbytes is bit for bit
after ``+ 0.0`` (which maps -0.0 to +0.0 and nothing else), and the sign of that zero is
checked against the CUDA kernel's rule alone (sign times magnitude: -0.0).
"""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes import functional as BF  # noqa: E402

from lora_fused.kernels import common, dequant4bit as dq  # noqa: E402
from lora_fused.ops.qlora import Quant4bit  # noqa: E402

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t):
    return t.contiguous().view(BITS[t.dtype])


def quantized(shape, quant_type, nested, blocksize, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(*shape) * 2.5
    w.view(-1)[:: 7] *= 9  # outliers: blocks with very different absmax
    return BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_tables_are_bitsandbytes(quant_type):
    ours = dq.code_table(quant_type, torch.device("cpu"))
    theirs = BF.get_4bit_type(quant_type, device="cpu")
    assert torch.equal(bits(ours + 0.0), bits(theirs + 0.0))  # + 0.0: its -0 is an int (+0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", [((7, 98), 64), ((5, 99), 64), ((3, 40), 32),
                                             ((9, 130), 128), ((6, 77), 256), ((4, 300), 4096),
                                             ((33, 64), 64)])
def test_dequantize_is_bit_identical_to_bitsandbytes(shape, blocksize, quant_type, nested, dtype):
    packed, state = quantized(shape, quant_type, nested, blocksize)
    state.dtype = dtype
    expected = BF.dequantize_4bit(packed, state)
    got = dq.dequantize_4bit(packed, Quant4bit.from_quant_state(state), dtype)
    assert got.shape == expected.shape and got.dtype == dtype
    assert torch.equal(bits(got + 0.0), bits(expected + 0.0))  # the sign of zero: the next test
    assert common.LAUNCH_COUNTS["dequant4bit_kernel"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp4_codes_are_sign_times_magnitude_as_in_bitsandbytes_cuda_kernel(dtype):
    """Every FP4 code, in both nibbles: bit 3 is the sign, the magnitude is bitsandbytes' table
    at the low 3 bits, so code 8 gives -0.0 (its CUDA kernel's dDequantizeFP4Tree)."""
    nibbles = torch.arange(256, dtype=torch.uint8)
    packed = nibbles.view(-1, 1)  # byte b: high nibble b >> 4, low nibble b & 15
    torch.manual_seed(0)
    absmax = torch.rand(8) + 0.5  # blocks of 64 over the 8 x 64 weight
    quant = Quant4bit(shape=(8, 64), blocksize=64, quant_type="fp4", dtype=dtype, absmax=absmax)
    codes = torch.stack([nibbles >> 4, nibbles & 15], dim=1).view(-1).long()
    magnitude = BF.get_4bit_type("fp4", device="cpu").abs()[codes & 7]
    sign = 1.0 - 2.0 * (codes >> 3).float()
    expected = (sign * magnitude * absmax.repeat_interleave(64)).view(8, 64).to(dtype)
    got = dq.dequantize_4bit(packed, quant, dtype)
    assert torch.equal(bits(got), bits(expected))
    assert torch.signbit(got.view(-1)[codes == 8]).all()


def test_nested_absmax_rounds_product_and_offset_apart():
    """absmax = code2[q] * absmax2 + offset with two roundings (bitsandbytes), where an FMA (one
    rounding) gives other bits on this data: the kernel, bit-exact, did not fuse them (on a GPU
    this is what enable_fp_fusion=False guarantees; the interpreter never fuses)."""
    packed, state = quantized((64, 256), "nf4", True, 64, seed=3)
    absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code2 = state.state2.code[state.absmax.long()]
    scale2 = state.state2.absmax.repeat_interleave(state.state2.blocksize)[: absmax.numel()]
    one_rounding = (code2.double() * scale2.double() + state.offset.double()).float()
    assert torch.equal(code2 * scale2 + state.offset, absmax)
    assert not torch.equal(one_rounding, absmax)
    state.dtype = torch.float32
    got = dq.dequantize_4bit(packed, Quant4bit.from_quant_state(state), torch.float32)
    assert torch.equal(bits(got), bits(BF.dequantize_4bit(packed, state)))


def test_bad_blocksize_and_short_absmax_are_refused():
    packed, state = quantized((4, 64), "nf4", False, 64)
    quant = Quant4bit.from_quant_state(state)
    with pytest.raises(ValueError, match="blocksize"):
        dq.dequantize_4bit(packed, Quant4bit(**{**quant.__dict__, "blocksize": 48}), torch.float32)
    with pytest.raises(ValueError, match="absmax has 2 entries"):
        dq.dequantize_4bit(packed, Quant4bit(**{**quant.__dict__, "absmax": quant.absmax[:2]}), torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        dq.dequantize_4bit(packed, quant, torch.float64)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("nested,quant_type", [(True, "nf4"), (False, "fp4")])
@pytest.mark.parametrize("M,N,K,R,bias", [(1, 24, 40, 4, True), (5, 37, 99, 3, False), (16, 16, 64, 16, True)])
def test_decode_kernel_matches_float64_on_the_dequantized_weight(M, N, K, R, bias, nested, quant_type,
                                                                 dtype, tol):
    packed, state = quantized((N, K), quant_type, nested, 64, seed=M)
    state.dtype = dtype
    weight = BF.dequantize_4bit(packed, state).double()  # the scratch's values
    torch.manual_seed(1)
    x = torch.randn(M, K).to(dtype)
    shrink = torch.randn(M, R).to(dtype)
    lora_B = torch.randn(N, R).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    y = dq.qlora_decode(x, packed, Quant4bit.from_quant_state(state), b, shrink, lora_B, 0.75)
    ref = x.double() @ weight.T + 0.75 * shrink.double() @ lora_B.double().T
    if bias:
        ref += b.double()
    assert y.dtype == dtype and y.shape == (M, N)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err <= tol, err


def test_decode_kernel_refuses_more_rows_than_one_tile():
    packed, state = quantized((8, 64), "nf4", False, 64)
    x = torch.randn(dq.DECODE_MAX_ROWS + 1, 64)
    with pytest.raises(ValueError, match="qlora_decode takes x"):
        dq.qlora_decode(x, packed, Quant4bit.from_quant_state(state), None, torch.zeros(x.shape[0], 4),
                        torch.zeros(8, 4), 1.0)
