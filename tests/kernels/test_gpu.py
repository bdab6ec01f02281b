"""GPU-only tests: the Triton kernels on a real GPU, against the float64 reference.

What the interpreter cannot show: bf16, real block sizes and tensor cores at
large shapes, TF32, int64 offsets past 2³¹ elements, CUDA-graph capture and
``torch.compile``. Every test is marked ``gpu`` and skipped without CUDA;
``bench/device_check.sh`` runs them on a lent H200 (whole file: well under two
minutes there, most of it Triton and Inductor compilation).

Errors are ‖out − ref‖ / ‖ref‖ against float64 computed on the GPU: bf16 ≤ 1e-2,
fp16 ≤ 2e-3, fp32 ≤ 1e-5 with TF32 off, ≤ 5e-3 with it on. Data is random
(never zeros; lora_B included), every output is checked for NaN/inf, and each
op call must launch Triton kernels (``LAUNCH_COUNTS``).
"""
from __future__ import annotations

import pytest
import torch

import lora_fused as lf
from lora_fused.kernels import lora_linear as kernels
from lora_cases import TOLERANCE, rel_error
from lora_fused.reference import philox_uniform

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_precision_flags"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEV = "cuda"
TOL = TOLERANCE
TF32_TOL = 5e-3
SEED_HIGH = 2**62


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def launches() -> int:
    return sum(kernels.LAUNCH_COUNTS.values())


def assert_finite(name: str, t: torch.Tensor) -> None:
    assert torch.isfinite(t).all().item(), f"{name} has NaN/inf (an unwritten or overflowed element)"


class Problem:
    """Random x, W, A, B, bias on the GPU, scaled so every term of y is O(1)."""

    def __init__(self, M, K, N, r, dtype, *, bias=True, scaling=0.5, seed=0, lead=()):
        g = torch.Generator(device=DEV).manual_seed(seed)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=DEV, dtype=torch.float32) * scale).to(dtype)

        self.x = rand(*lead, M, K)
        self.W = rand(N, K, scale=K ** -0.5)
        self.A = rand(r, K, scale=K ** -0.5)
        self.B = rand(N, r, scale=r ** -0.5)
        self.bias = rand(N) if bias else None
        self.scaling = scaling
        self.dy = rand(*lead, M, N)


def run_op(pb: Problem, *, x=None, dropout_p=0.0, training=False, manual_seed=None, grad_y=None):
    """lf.lora_linear forward + backward; returns (y, {"x": dX, "lora_A": dA, "lora_B": dB})."""
    x = (pb.x if x is None else x).detach().requires_grad_()
    A = pb.A.detach().clone().requires_grad_()
    B = pb.B.detach().clone().requires_grad_()
    before = launches()
    if manual_seed is not None:
        torch.manual_seed(manual_seed)
    y = lf.lora_linear(x, pb.W, A, B, pb.scaling, pb.bias, dropout_p=dropout_p, training=training)
    y.backward(pb.dy if grad_y is None else grad_y)
    assert launches() > before, "the Triton kernels did not run (torch path taken on CUDA?)"
    return y, {"x": x.grad, "lora_A": A.grad, "lora_B": B.grad}


def drawn_seed(manual_seed: int) -> int:
    """The dropout seed lf.lora_linear draws right after torch.manual_seed(manual_seed)."""
    torch.manual_seed(manual_seed)
    return int(torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=DEV).item())


def reference(pb: Problem, *, x=None, keep=None, dropout_p=0.0, grad_y=None):
    """float64 forward + autograd backward of lf.lora_linear_reference, on the GPU."""
    x = (pb.x if x is None else x).detach().double().requires_grad_()
    A = pb.A.detach().double().requires_grad_()
    B = pb.B.detach().double().requires_grad_()
    bias = pb.bias.double() if pb.bias is not None else None
    y = lf.lora_linear_reference(x, pb.W.double(), A, B, pb.scaling, bias, keep=keep,
                                 dropout_p=dropout_p)
    y.backward((pb.dy if grad_y is None else grad_y).double())
    return y, {"x": x.grad, "lora_A": A.grad, "lora_B": B.grad}


def compare(y, grads, y_ref, grads_ref, tol, dtype=None) -> dict:
    errors = {"y": rel_error(y, y_ref)}
    assert_finite("y", y)
    if dtype is not None:
        assert y.dtype == dtype
    assert y.shape == y_ref.shape
    for name, ref in grads_ref.items():
        g = grads[name]
        assert g is not None, f"no gradient for {name}"
        assert g.shape == ref.shape, (name, g.shape, ref.shape)
        assert_finite(name, g)
        errors[name] = rel_error(g, ref)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return errors


def check(pb: Problem, tol=None, **kw) -> dict:
    y, grads = run_op(pb)
    y_ref, grads_ref = reference(pb)
    return compare(y, grads, y_ref, grads_ref, tol if tol is not None else TOL[pb.x.dtype], pb.x.dtype)


# --------------------------------------------------------------------------
# large shapes, every rank regime (BR=16 padded, fused shrink up to 32, shrink_first above)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("r", [1, 16, 64, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_large_matches_reference(dtype, r):
    pb = Problem(4096, 4096, 4096, r, dtype, bias=(r % 2 == 0), scaling=2.0, seed=r)
    check(pb)


@pytest.mark.parametrize("M,K,N,r", [(3001, 4001, 2050, 33), (1537, 2050, 4001, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_odd_large_shapes(M, K, N, r, dtype):
    """Partial tiles in every dimension, rows not 16-byte aligned (K odd)."""
    check(Problem(M, K, N, r, dtype, bias=True, seed=M))


def test_fp32_follows_tf32_flag():
    pb = Problem(2048, 2048, 2048, 16, torch.float32, bias=True, seed=3)
    torch.backends.cuda.matmul.allow_tf32 = False
    ieee = check(pb, tol=TOL[torch.float32])
    y_ieee, _ = run_op(pb)
    torch.backends.cuda.matmul.allow_tf32 = True
    tf32 = check(pb, tol=TF32_TOL)
    y_tf32, _ = run_op(pb)
    # The kernel must follow the flag: tf32 (10-bit mantissa) is visibly less exact.
    assert tf32["y"] > max(3e-5, 4 * ieee["y"]), (
        f"allow_tf32=True gave error {tf32['y']:.2e} vs {ieee['y']:.2e} with it off: "
        "the kernel does not seem to use tf32")
    assert not torch.equal(y_ieee, y_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    y_again, _ = run_op(pb)
    assert torch.equal(y_again, y_ieee), "the flag's effect did not go away when it was turned off"


# --------------------------------------------------------------------------
# dropout: the kernels' mask is lf.dropout_keep_mask(seed, M, in, p), bit for bit
# --------------------------------------------------------------------------
@pytest.mark.parametrize("M,K,N,r,dtype", [
    (2048, 2048, 2048, 16, torch.bfloat16),
    (1000, 1030, 2050, 100, torch.float16),   # shrink_first path, odd sizes
    (3, 4096, 4096, 16, torch.bfloat16),      # decode config
    (512, 1024, 768, 8, torch.float32),
], ids=["bf16", "fp16-r100-odd", "bf16-decode", "fp32"])
def test_dropout_exact_mask(M, K, N, r, dtype):
    p, s = 0.1, 77
    pb = Problem(M, K, N, r, dtype, bias=True, scaling=2.0, seed=M + r)
    seed = drawn_seed(s)
    keep = lf.dropout_keep_mask(seed, M, K, p, device=DEV)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    y, grads = run_op(pb, dropout_p=p, training=True, manual_seed=s)
    y_ref, grads_ref = reference(pb, keep=keep, dropout_p=p)
    compare(y, grads, y_ref, grads_ref, TOL[dtype], dtype)
    # Deterministic: the same seed gives the same bits (no atomics, no races).
    y2, grads2 = run_op(pb, dropout_p=p, training=True, manual_seed=s)
    assert torch.equal(y, y2)
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name
    # Dropout really applied (the p=0 output is different) and off in eval.
    y0, _ = run_op(pb)
    assert rel_error(y, y0) > 1e-3
    y_eval, _ = run_op(pb, dropout_p=p, training=False, manual_seed=s)
    assert torch.equal(y_eval, y0)


# --------------------------------------------------------------------------
# int64 offsets: M·in and M·out past 2³¹ elements (4 GiB tensors in bf16)
# --------------------------------------------------------------------------
def test_int64_offsets():
    M, K, N, r = 2**20 + 7, 2048, 2048, 16
    assert M * K > 2**31 and M * N > 2**31
    dtype, s, p, ms = torch.bfloat16, 0.5, 0.1, 9
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~30 GiB of GPU memory")
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(M, K, generator=g, device=DEV, dtype=dtype)
    W = (torch.randn(N, K, generator=g, device=DEV) * K ** -0.5).to(dtype)
    A = (torch.randn(r, K, generator=g, device=DEV) * K ** -0.5).to(dtype)
    B = (torch.randn(N, r, generator=g, device=DEV) * r ** -0.5).to(dtype)
    bound = 2**31 // K  # first row whose element offsets reach 2³¹
    rows = torch.tensor([0, 1, bound - 1, bound, bound + 1, M - 2, M - 1], device=DEV)
    rows = torch.cat([rows, torch.randint(0, M, (9,), generator=g, device=DEV)])
    cols = torch.arange(K, device=DEV)
    Wd, Ad, Bd = W.double(), A.double(), B.double()
    p32 = torch.tensor(p, dtype=torch.float32)

    def ref_rows(keep):
        xr = x[rows].double()
        xd = xr if keep is None else xr * keep / (1 - p)
        return xr @ Wd.T + s * (xd @ Ad.T) @ Bd.T

    # (a) forward without dropout: the fused one-kernel path.
    with torch.no_grad():
        y = lf.lora_linear(x, W, A, B, s)
        assert_finite("y", y)
        assert rel_error(y[rows], ref_rows(None)) <= TOL[dtype]
    del y

    # (b) forward + backward with dropout: shrink_first, dS/dB, dA, dX kernels, mask offsets > 2³¹.
    seed = drawn_seed(ms)
    xg = x.detach().requires_grad_()
    Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()
    torch.manual_seed(ms)
    y = lf.lora_linear(xg, W, Ag, Bg, s, dropout_p=p, training=True)
    dy = torch.randn(M, N, generator=g, device=DEV, dtype=dtype)
    with torch.no_grad():
        keep = philox_uniform(seed, rows[:, None] * K + cols[None, :]) >= p32
        assert_finite("y", y)
        assert rel_error(y[rows], ref_rows(keep)) <= TOL[dtype]
    y.backward(dy)
    del y
    dX, dA, dB = xg.grad, Ag.grad, Bg.grad
    del xg
    with torch.no_grad():  # references: no autograd graphs over 4 GiB tensors
        for name, t in (("dX", dX), ("dA", dA), ("dB", dB)):
            assert_finite(name, t)
        dyr = dy[rows].double()
        dX_ref = dyr @ Wd + keep * ((s * dyr @ Bd) @ Ad) / (1 - p)
        assert rel_error(dX[rows], dX_ref) <= TOL[dtype]
        del dX
        # dA, dB over all rows, in float32 chunks (the mask regenerated per chunk).
        dA_ref = torch.zeros(r, K, device=DEV)
        dB_ref = torch.zeros(N, r, device=DEV)
        Af, Bf = A.float(), B.float()
        chunk = 2**16
        for start in range(0, M, chunk):
            n = min(chunk, M - start)
            offs = torch.arange(start * K, (start + n) * K, device=DEV, dtype=torch.int64).view(n, K)
            xd = x[start:start + n].float() * (philox_uniform(seed, offs) >= p32) / (1 - p)
            del offs
            dys = dy[start:start + n].float()
            dA_ref += (s * dys @ Bf).T @ xd
            dB_ref += s * dys.T @ (xd @ Af.T)
            del xd, dys
        assert rel_error(dA, dA_ref) <= TOL[dtype], rel_error(dA, dA_ref)
        assert rel_error(dB, dB_ref) <= TOL[dtype], rel_error(dB, dB_ref)


# --------------------------------------------------------------------------
# layouts: non-contiguous x, transposed weight, stride-0 upstream gradient
# --------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["col-slice", "transposed", "batch-transposed", "row-slice"])
def test_non_contiguous_x(layout):
    M, K, N, r = 1000, 1024, 768, 16
    pb = Problem(M, K, N, r, torch.bfloat16, bias=True, seed=5)
    g = torch.Generator(device=DEV).manual_seed(6)
    if layout == "col-slice":
        x = torch.randn(M, 2 * K, generator=g, device=DEV, dtype=torch.bfloat16)[:, ::2]
    elif layout == "transposed":
        x = torch.randn(K, M, generator=g, device=DEV, dtype=torch.bfloat16).t()
    elif layout == "row-slice":
        x = torch.randn(M, K + 64, generator=g, device=DEV, dtype=torch.bfloat16)[:, 32:32 + K]
    else:
        x = torch.randn(M // 4, 4, K, generator=g, device=DEV, dtype=torch.bfloat16).transpose(0, 1)
        pb.dy = pb.dy.reshape(4, M // 4, N)
    assert not x.is_contiguous()
    y, grads = run_op(pb, x=x)
    y_ref, grads_ref = reference(pb, x=x)
    compare(y, grads, y_ref, grads_ref, TOL[torch.bfloat16], torch.bfloat16)


def test_transposed_weight_and_stride0_grad():
    pb = Problem(513, 1024, 768, 16, torch.bfloat16, bias=True, seed=8)
    pb.W = pb.W.t().contiguous().t()
    assert not pb.W.is_contiguous()
    # y.sum().backward(): the upstream gradient is an expanded ones tensor (strides 0, 0).
    x = pb.x.detach().requires_grad_()
    A = pb.A.detach().clone().requires_grad_()
    B = pb.B.detach().clone().requires_grad_()
    y = lf.lora_linear(x, pb.W, A, B, pb.scaling, pb.bias)
    y.sum().backward()
    ones = torch.ones_like(y)
    y_ref, grads_ref = reference(pb, grad_y=ones)
    compare(y, {"x": x.grad, "lora_A": A.grad, "lora_B": B.grad}, y_ref, grads_ref,
            TOL[torch.bfloat16], torch.bfloat16)


# --------------------------------------------------------------------------
# decode: M = 1..16 (and the decode/prefill switch at 64)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 13, 16, 64, 65])
def test_decode_rows(M):
    check(Problem(M, 4096, 4096, 16, torch.bfloat16, bias=True, seed=100 + M))


@pytest.mark.parametrize("lead", [(2, 1), (1, 1), (3, 5)])
def test_decode_leading_dims(lead):
    pb = Problem(lead[-1], 4096, 2048, 16, torch.bfloat16, bias=True, seed=7, lead=lead[:-1])
    y, grads = run_op(pb)
    assert y.shape == (*lead, 2048)
    y_ref, grads_ref = reference(pb)
    compare(y, grads, y_ref, grads_ref, TOL[torch.bfloat16], torch.bfloat16)


# --------------------------------------------------------------------------
# modules: autocast with fp32 adapters, CUDA graphs, torch.compile
# --------------------------------------------------------------------------
def make_layer(K, N, r=16, *, dtype=torch.bfloat16, bias=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = lf.LoRALinear(K, N, bias=bias, r=r, lora_alpha=2.0 * r, lora_dropout=dropout,
                          device=DEV, dtype=dtype)
    with torch.no_grad():  # a fresh adapter has lora_B = 0: randomize it
        layer.lora_B.normal_(0.0, r ** -0.5)
        if bias:
            layer.bias.normal_()
    return layer


def layer_reference(layer, x):
    return lf.lora_linear_reference(x.double(), layer.weight.double(), layer.lora_A.double(),
                                    layer.lora_B.double(), layer.scaling,
                                    None if layer.bias is None else layer.bias.double())


def test_autocast_fp32_adapters():
    layer = make_layer(1024, 1024, dtype=torch.float32, seed=1)
    x = torch.randn(256, 1024, device=DEV, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_error(y, layer_reference(layer, x)) <= TOL[torch.bfloat16]
    y.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    assert_finite("dA", layer.lora_A.grad)
    assert layer.weight.grad is None


@pytest.mark.parametrize("M", [8, 512])
def test_cuda_graph_forward_equals_eager(M):
    layer = make_layer(1024, 2048, seed=2).eval()
    static_x = torch.randn(M, 1024, device=DEV, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # compile the kernels outside the capture
            layer(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = layer(static_x)
    for i in range(3):
        new_x = torch.randn(M, 1024, device=DEV, dtype=torch.bfloat16)
        static_x.copy_(new_x)
        graph.replay()
        with torch.no_grad():
            eager = layer(new_x)
        torch.cuda.synchronize()
        assert_finite("replayed y", static_y)
        assert torch.equal(static_y, eager), f"replay {i}: {rel_error(static_y, eager):.2e}"
        assert rel_error(static_y, layer_reference(layer, new_x)) <= TOL[torch.bfloat16]


def test_cuda_graph_dropout_no_host_sync():
    """Training-mode dropout captures (no .item() on the Triton path) and draws a new mask per replay."""
    layer = make_layer(1024, 1024, dropout=0.1, seed=3).train()
    static_x = torch.randn(64, 1024, device=DEV, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = layer(static_x)
    graph.replay()
    y1 = static_y.clone()
    graph.replay()
    y2 = static_y.clone()
    with torch.no_grad():
        y_eval = layer.eval()(static_x)
    assert_finite("y1", y1)
    assert_finite("y2", y2)
    assert not torch.equal(y1, y2), "the same dropout mask on two replays"
    assert rel_error(y1, y_eval) > 1e-3


def test_cuda_graph_training_step():
    """make_graphed_callables: forward and backward replayed equal eager."""
    layer = make_layer(1024, 1024, seed=4).train()
    eager = make_layer(1024, 1024, seed=4).train()
    sample = torch.randn(256, 1024, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(layer, (sample,))
    for i in range(2):
        x = torch.randn(256, 1024, device=DEV, dtype=torch.bfloat16)
        dy = torch.randn(256, 1024, device=DEV, dtype=torch.bfloat16)
        outs = []
        for mod in (graphed, eager):
            for p in (layer.lora_A, layer.lora_B, eager.lora_A, eager.lora_B):
                p.grad = None
            xi = x.clone().requires_grad_()
            y = mod(xi)
            y.backward(dy)
            params = layer if mod is graphed else eager
            outs.append((y.detach().clone(), xi.grad.clone(), params.lora_A.grad.clone(),
                         params.lora_B.grad.clone()))
        for name, a, b in zip(("y", "dX", "dA", "dB"), *outs):
            assert_finite(name, a)
            assert rel_error(a, b) <= 1e-6, f"step {i} {name}: {rel_error(a, b):.2e}"


class _MLP(torch.nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.up = make_layer(256, 512, r=8, dropout=dropout, seed=5)
        self.down = make_layer(512, 256, r=8, dropout=dropout, seed=6)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _mlp_step(model, x, dy):
    for p in model.parameters():
        p.grad = None
    xi = x.clone().requires_grad_()
    y = model(xi)
    y.backward(dy)
    return [y.detach(), xi.grad] + [p.grad for p in (model.up.lora_A, model.up.lora_B,
                                                       model.down.lora_A, model.down.lora_B)]


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _MLP()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 32, 256, device=DEV, dtype=torch.bfloat16)
    dy = torch.randn(4, 32, 256, device=DEV, dtype=torch.bfloat16)
    eager = _mlp_step(model, x, dy)
    before = launches()
    got = _mlp_step(compiled, x, dy)
    assert launches() > before, "the compiled graph did not call the Triton kernels"
    names = ["y", "dX", "up.dA", "up.dB", "down.dA", "down.dB"]
    for name, a, b in zip(names, got, eager):
        assert a is not None, name
        assert_finite(name, a)
        assert rel_error(a, b) <= TOL[torch.bfloat16], f"{name}: {rel_error(a, b):.2e}"


def test_torch_compile_fullgraph_dropout_traces():
    """With dropout the seed is drawn inside the graph: fullgraph tracing, finite, mask applied."""
    torch._dynamo.reset()
    model = _MLP(dropout=0.1).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(64, 256, device=DEV, dtype=torch.bfloat16)
    dy = torch.randn(64, 256, device=DEV, dtype=torch.bfloat16)
    got = _mlp_step(compiled, x, dy)
    for t in got:
        assert t is not None
        assert_finite("compiled dropout output/grad", t)
    with torch.no_grad():
        y_eval = model.eval()(x)
    assert rel_error(got[0], y_eval) > 1e-3
    torch._dynamo.reset()
