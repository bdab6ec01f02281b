"""LoRA dropout: drawn in-kernel from a seed, reproducible, never stored."""
import pytest
import torch

import lora_fused as lf
from lora_cases import assert_matches_reference, make_inputs, rel_error, run_op


def identity_adapter(M, features, p_seed=0):
    """in = out = r = features, A = B = I, scaling 1: the LoRA branch returns drop(x)."""
    inp = make_inputs(M, features, features, features, seed=p_seed)
    inp.lora_A = torch.eye(features)
    inp.lora_B = torch.eye(features)
    inp.scaling = 1.0
    return inp


def lora_branch(inp, y):
    base = inp.x @ inp.weight.T + inp.bias
    return y.detach() - base


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("M,in_features,out_features,r", [(33, 100, 19, 8), (130, 19, 129, 16),
                                                          (7, 129, 33, 80), (1, 19, 19, 1)])
def test_dropout_matches_reference_with_the_same_mask(M, in_features, out_features, r, dtype):
    """Forward and all gradients equal the float64 reference using the mask of the seed: the
    Philox stream on the Triton path, the torch backend's own draw on the torch path
    (lora_cases.keep_mask_of_backend; comparing the torch backend with Philox was a wrong test)."""
    inp = make_inputs(M, in_features, out_features, r, dtype)
    assert_matches_reference(inp, dropout_p=0.3, training=True)


def test_same_manual_seed_same_output():
    inp = make_inputs(33, 100, 19, 8)
    y1, g1, _ = run_op(inp, dropout_p=0.5, training=True, manual_seed=11)
    y2, g2, _ = run_op(inp, dropout_p=0.5, training=True, manual_seed=11)
    y3, _, _ = run_op(inp, dropout_p=0.5, training=True, manual_seed=12)
    assert torch.equal(y1, y2)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert not torch.equal(y1, y3)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropped_fraction_is_p(p):
    inp = identity_adapter(130, 16)
    torch.manual_seed(3)
    y = lf.lora_linear(inp.x, inp.weight, inp.lora_A, inp.lora_B, 1.0, inp.bias,
                       dropout_p=p, training=True)
    dropped = lora_branch(inp, y)
    kept = dropped.abs() > 1e-3 * inp.x.abs()
    fraction = 1.0 - kept.float().mean().item()
    n = kept.numel()  # 2080 elements: 4 standard deviations of a binomial fraction
    assert abs(fraction - p) <= 4 * (p * (1 - p) / n) ** 0.5
    # kept elements are scaled by 1/(1-p)
    assert rel_error(dropped[kept], inp.x[kept] / (1 - p)) <= 1e-5


def test_backward_uses_the_forward_mask():
    """With A = B = I, dL/dx of the LoRA branch is keep/(1-p) ⊙ dY: the same elements as y's."""
    inp = identity_adapter(33, 16)
    x = inp.x.clone().requires_grad_()
    torch.manual_seed(5)
    y = lf.lora_linear(x, inp.weight, inp.lora_A, inp.lora_B, 1.0, inp.bias,
                       dropout_p=0.4, training=True)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    forward_keep = lora_branch(inp, y).abs() > 1e-3 * inp.x.abs()
    lora_grad = x.grad - grad_y @ inp.weight
    backward_keep = lora_grad.abs() > 1e-4
    assert torch.equal(forward_keep, backward_keep)


def test_eval_mode_has_no_dropout():
    inp = make_inputs(33, 19, 100, 8)
    y_eval, _, _ = run_op(inp, dropout_p=0.5, training=False)
    y_none, _, _ = run_op(inp, dropout_p=0.0, training=True)
    assert torch.equal(y_eval, y_none)


def test_keep_mask_is_the_triton_philox_stream():
    """The reference's mask generator is the kernel's: a kept fraction and determinism check."""
    keep_a = lf.dropout_keep_mask(123, 64, 50, 0.25)
    keep_b = lf.dropout_keep_mask(123, 64, 50, 0.25)
    keep_c = lf.dropout_keep_mask(124, 64, 50, 0.25)
    assert torch.equal(keep_a, keep_b) and not torch.equal(keep_a, keep_c)
    assert abs(keep_a.float().mean().item() - 0.75) < 0.03


def test_saved_tensors_are_x_and_s_only():
    """Autograd keeps x, S [M, r] and the seed (plus the frozen weights), never a mask."""
    inp = make_inputs(33, 100, 129, 8)
    x = inp.x.clone().requires_grad_()
    A = inp.lora_A.clone().requires_grad_()
    B = inp.lora_B.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lf.lora_linear(x, inp.weight, A, B, inp.scaling, inp.bias, dropout_p=0.1, training=True)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(33, 100), (129, 100), (8, 100), (129, 8), (33, 8), (1,)]), shapes
    activation_bytes = sum(t.numel() * t.element_size() for t in saved
                           if t.data_ptr() not in {p.data_ptr() for p in (inp.weight, A, B)})
    assert activation_bytes == (33 * 100 + 33 * 8) * 4 + 8


@pytest.mark.parametrize("seed", [0, 1234, 2**31 - 1, 2**61 + 5])
def test_philox_paths_agree(seed):
    """numpy (CPU) and int64-torch (any device) Philox give identical uniforms."""
    from lora_fused import reference
    offsets = torch.arange(5000, dtype=torch.int64) * 977 + (1 << 33)
    assert torch.equal(reference._philox_numpy(seed, offsets), reference._philox_torch(seed, offsets))


def test_philox_matches_triton_rand():
    """The reference's uniforms are bit-identical to tl.rand(seed, offset) in a kernel."""
    if torch.cuda.is_available():
        device = "cuda"
    elif lf.dispatch.backend.interpreter_enabled():
        device = "cpu"
    else:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(seed_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offsets, tl.rand(tl.load(seed_ptr), offsets + (1 << 33)), mask=offsets < n)

    for seed in (0, 99, 2**40 + 7):
        out = torch.full((1000,), float("nan"), device=device)
        rand_kernel[(8,)](torch.tensor([seed], device=device), out, 1000, BLOCK=128)
        expected = lf.reference.philox_uniform(seed, torch.arange(1000, dtype=torch.int64) + (1 << 33))
        assert torch.equal(out.cpu(), expected)


# (M, in, p, drawn as positions): masks drawn per element (uniforms) and as drop positions
# (torch_backend.keep_mask)
TORCH_MASK_CASES = [(33, 100, 0.3, False), (130, 301, 0.05, True), (131, 513, 0.1, True)]


@pytest.mark.parametrize("M,in_features,p,draws_positions", TORCH_MASK_CASES)
def test_torch_backend_dropout_matches_reference_with_its_mask(monkeypatch, M, in_features, p, draws_positions):
    """The torch backend draws its mask from a generator seeded with the op's seed; forward and
    every gradient equal the float64 reference with that mask, by either draw."""
    from lora_cases import drawn_seed
    from lora_fused.backends.torch_backend import draws_drop_positions, keep_mask
    assert draws_drop_positions(M * in_features, p, torch.device("cpu")) == draws_positions
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    inp = make_inputs(M, in_features, 19, 8, device="cpu")
    y, grads, grad_y = run_op(inp, dropout_p=p, training=True)
    keep = keep_mask(torch.tensor([drawn_seed(1234)]), M, in_features, p, torch.float64, torch.device("cpu"))
    d = {k: getattr(inp, k).double().requires_grad_(k in ("x", "lora_A", "lora_B"))
         for k in ("x", "weight", "lora_A", "lora_B", "bias")}
    y_ref = lf.lora_linear_reference(d["x"], d["weight"], d["lora_A"], d["lora_B"], inp.scaling,
                                     d["bias"], keep=keep, dropout_p=p)
    y_ref.backward(grad_y.double())
    assert rel_error(y, y_ref) <= 1e-5
    for name in ("x", "lora_A", "lora_B"):
        assert rel_error(grads[name], d[name].grad) <= 1e-5, name


@pytest.mark.parametrize("p,draws_positions", [(0.05, True), (0.1, True), (0.3, False), (0.9, False)])
def test_torch_backend_mask_keeps_with_probability_one_minus_p(p, draws_positions):
    """keep_mask, by either draw: 0/1, P(keep) = 1 - p (within 5 binomial standard deviations
    over 200,000 draws), independent of the row (each row's mean within its own bound) and of
    the neighbour (pairs of adjacent elements both dropped: p², within 5 standard deviations),
    reproduced by the seed, the same for every dtype, different for another seed."""
    from lora_fused.backends.torch_backend import draws_drop_positions, keep_mask
    rows, cols = 200, 1000
    n = rows * cols
    assert draws_drop_positions(n, p, torch.device("cpu")) == draws_positions
    seed = torch.tensor([987654321])
    keep = keep_mask(seed, rows, cols, p, torch.float32, torch.device("cpu"))
    assert keep.shape == (rows, cols) and set(keep.unique().tolist()) <= {0.0, 1.0}
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(keep.sum().item() - n * (1 - p)) <= 5 * sd
    row_sd = (cols * p * (1 - p)) ** 0.5
    assert (keep.sum(1) - cols * (1 - p)).abs().max().item() <= 6 * row_sd
    dropped = 1.0 - keep.flatten().double()
    pairs = n - 1  # adjacent pairs overlap: their count's variance is N p²(1 + 2p - 3p²), at most twice N p²(1 - p²)
    both = (dropped[1:] * dropped[:-1]).sum().item()
    assert abs(both - pairs * p * p) <= 5 * (2 * pairs * p * p * (1 - p * p)) ** 0.5, (both, pairs * p * p)
    assert torch.equal(keep, keep_mask(seed, rows, cols, p, torch.float32, torch.device("cpu")))
    assert torch.equal(keep.double(), keep_mask(seed, rows, cols, p, torch.float64, torch.device("cpu")))
    assert not torch.equal(keep, keep_mask(seed + 1, rows, cols, p, torch.float32, torch.device("cpu")))


def test_torch_backend_drop_positions_do_not_depend_on_the_batch_of_gaps(monkeypatch):
    """The drop positions come from batches of geometric gaps; a batch too small for the mask
    draws more (the loop a real call almost never needs): the same mask as one large batch,
    the last elements included."""
    from lora_fused.backends import torch_backend
    rows, cols, p = 300, 400, 0.05
    assert torch_backend.draws_drop_positions(rows * cols, p, torch.device("cpu"))
    seed = torch.tensor([4242])
    one_batch = torch_backend.keep_mask(seed, rows, cols, p, torch.float32, torch.device("cpu"))
    monkeypatch.setattr(torch_backend, "_GAP_BATCH_SDS", -60.0)  # ~p·n/4 gaps a batch: 4+ batches
    batches = torch_backend.keep_mask(seed, rows, cols, p, torch.float32, torch.device("cpu"))
    assert torch.equal(one_batch, batches)
    assert (batches[-1] == 0).any(), "no drop in the last row: the loop stopped early"


def test_torch_backend_drop_positions_reach_both_ends():
    """The first and the last element are dropped with probability p too (an off-by-one in the
    positions would never drop one of them): over 400 seeds, each within 5 standard deviations."""
    from lora_fused.backends import torch_backend
    rows, cols, p, seeds = 200, 400, 0.1, 400
    assert torch_backend.draws_drop_positions(rows * cols, p, torch.device("cpu"))
    ends = torch.stack([torch_backend.keep_mask(torch.tensor([s]), rows, cols, p, torch.float32,
                                                torch.device("cpu")).flatten()[[0, -1]] for s in range(seeds)])
    dropped = (1.0 - ends).sum(0)
    sd = (seeds * p * (1 - p)) ** 0.5
    assert ((dropped - seeds * p).abs() <= 5 * sd).all(), dropped
