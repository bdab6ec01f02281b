"""Strategies (lf.available_strategies, lf.use_strategy) and their kernels.

Every forward strategy ("fused", "shrink_first", "composite") and backward
strategy ("fused", "composite"), at every block config the measured choice may
pick, against a float64 oracle written here from the formulas (the mask from
lf.dropout_keep_mask), on odd shapes with and without dropout and bias. Under
TRITON_INTERPRET=1 (conftest, no CUDA) the kernels themselves run, their outputs
poisoned with NaN; composite's base GEMM is torch's. The multi-adapter regimes
(the multi-adapter op's strategies) have the same oracle in tests/ops/test_multi_lora.py.
"""
from __future__ import annotations

import threading

import pytest
import torch

import lora_fused as lf
from lora_cases import DEVICE, TOLERANCE, assert_matches_reference, make_inputs, rel_error
from lora_fused.dispatch import backend, strategies

kernels = pytest.importorskip("lora_fused.kernels.lora_linear")
multi_kernels = pytest.importorskip("lora_fused.kernels.multi_lora")

DTYPES = [torch.float32, torch.float16]
SEED = 20241
# (M, K = in, N = out, r): decode (M <= 64) and prefill rows, odd sizes, r = 1, a rank
# past FUSED_SHRINK_MAX_RANK (fused runs as shrink_first) and past the expand-add's
# interpreter rank block of 64 (its rank loop runs twice).
SHAPES = [(1, 19, 100, 1), (37, 45, 51, 5), (130, 100, 129, 16), (33, 129, 19, 80)]


def _kernels_run_here(dtype=torch.float32) -> bool:
    return lf.select_backend(torch.device(DEVICE), dtype) == "triton"


@pytest.fixture(autouse=True)
def triton_only():
    if not _kernels_run_here():
        pytest.skip("the Triton kernels do not run here (no CUDA, no TRITON_INTERPRET=1)")


def make_problem(M, K, N, r, dtype, *, bias, p, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)

    return dict(x=rand(M, K), weight=rand(N, K, scale=K ** -0.5), bias=rand(N) if bias else None,
                lora_A=rand(r, K, scale=K ** -0.5), lora_B=rand(N, r, scale=r ** -0.5), scaling=0.75,
                dropout_p=p, seed=torch.tensor([SEED], dtype=torch.int64, device=DEVICE),
                grad_y=rand(M, N))


def oracle(pb):
    """float64: y, S and (dX, dA, dB) from the formulas of kernels/lora_linear.py."""
    d = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in pb.items()}
    M, K = d["x"].shape
    p, s = d["dropout_p"], d["scaling"]
    keep = (lf.dropout_keep_mask(SEED, M, K, p, device=DEVICE).double() if p > 0
            else torch.ones(M, K, dtype=torch.float64, device=DEVICE))
    drop = lambda t: t * keep / (1.0 - p)  # noqa: E731
    S = drop(d["x"]) @ d["lora_A"].T
    y = d["x"] @ d["weight"].T + s * S @ d["lora_B"].T
    if d["bias"] is not None:
        y = y + d["bias"]
    gy = d["grad_y"]
    dS = s * gy @ d["lora_B"]
    return dict(y=y, S=S, dx=gy @ d["weight"] + drop(dS @ d["lora_A"]),
                da=dS.T @ drop(d["x"]), db=s * gy.T @ S)


def run_forward(pb, strategy, config=None):
    return kernels.lora_forward(pb["x"], pb["weight"], pb["bias"], pb["lora_A"], pb["lora_B"], pb["scaling"],
                                pb["dropout_p"], pb["seed"], strategy=strategy, config=config)


def run_backward(pb, shrink, strategy, config=None):
    return kernels.lora_backward(pb["grad_y"], pb["x"], pb["weight"], pb["lora_A"], pb["lora_B"], shrink,
                                 pb["scaling"], pb["dropout_p"], pb["seed"], True, True,
                                 strategy=strategy, config=config)


def check_forward(pb, ref, y, shrink):
    tol = TOLERANCE[pb["x"].dtype]
    assert rel_error(y, ref["y"]) <= tol
    assert rel_error(shrink, ref["S"]) <= tol


def check_backward(pb, ref, dx, da, db):
    tol = TOLERANCE[pb["x"].dtype]
    for name, got in (("dx", dx), ("da", da), ("db", db)):
        assert got.shape == ref[name].shape and got.dtype == pb["x"].dtype, name
        assert rel_error(got, ref[name]) <= tol, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias,p", [(True, 0.0), (False, 0.25), (True, 0.25)])
@pytest.mark.parametrize("M,K,N,r", SHAPES)
def test_every_strategy_matches_the_oracle(M, K, N, r, bias, p, dtype):
    pb = make_problem(M, K, N, r, dtype, bias=bias, p=p, seed=M + r)
    ref = oracle(pb)
    for fwd in kernels.FORWARD_STRATEGIES:
        y, shrink = run_forward(pb, fwd)
        check_forward(pb, ref, y, shrink)
        for bwd in kernels.BACKWARD_STRATEGIES:
            check_backward(pb, ref, *run_backward(pb, shrink, bwd))


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("M", [5, 70])
def test_every_candidate_config_matches_the_oracle(M, p):
    """Each (strategy, config) the measured choice may time computes the right numbers
    (under the interpreter each config runs at its interpreter blocks)."""
    pb = make_problem(M, 45, 51, 5, torch.float32, bias=p == 0, p=p, seed=M)
    ref = oracle(pb)
    _, shrink = run_forward(pb, "shrink_first")
    for strategy, config in kernels.forward_candidates(M, 5, dropout=p > 0):
        check_forward(pb, ref, *run_forward(pb, strategy, config))
    for strategy, config in kernels.backward_candidates(M, 5, dropout=p > 0):
        check_backward(pb, ref, *run_backward(pb, shrink, strategy, config))


def test_strategies_read_strided_views():
    """x a transposed view, W0 column-major, A and B transposed views, a strided bias:
    every strategy reads them through their strides (no copy) and matches the oracle."""
    pb = make_problem(37, 45, 51, 5, torch.float32, bias=True, p=0.25, seed=9)
    ref = oracle(pb)
    strided = dict(pb, x=pb["x"].t().contiguous().t(), weight=pb["weight"].t().contiguous().t(),
                   lora_A=pb["lora_A"].t().contiguous().t(), lora_B=pb["lora_B"].t().contiguous().t(),
                   bias=torch.stack([pb["bias"], pb["bias"]], 1)[:, 0])
    assert not any(strided[k].is_contiguous() for k in ("x", "weight", "lora_A", "lora_B", "bias"))
    for fwd in kernels.FORWARD_STRATEGIES:
        y, shrink = run_forward(strided, fwd)
        check_forward(pb, ref, y, shrink)
        for bwd in kernels.BACKWARD_STRATEGIES:
            check_backward(pb, ref, *run_backward(strided, shrink, bwd))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_all_strategies_agree_under_one_seed(p):
    """Same seed, same mask: the strategies differ by rounding only (fp32)."""
    pb = make_problem(37, 45, 51, 5, torch.float32, bias=True, p=p, seed=3)
    outs = {st: run_forward(pb, st) for st in kernels.FORWARD_STRATEGIES}
    y0, s0 = outs["shrink_first"]
    for st, (y, shrink) in outs.items():
        assert rel_error(y, y0) <= 1e-6 and rel_error(shrink, s0) <= 1e-6, st
    grads = {st: run_backward(pb, s0, st) for st in kernels.BACKWARD_STRATEGIES}
    for a, b in zip(grads["fused"], grads["composite"]):
        assert rel_error(b, a) <= 1e-6
    # A different seed draws a different mask: the agreement above is not vacuous.
    if p > 0:
        other = dict(pb, seed=torch.tensor([SEED + 1], dtype=torch.int64, device=DEVICE))
        assert rel_error(run_forward(other, "composite")[0], y0) > 1e-3


def launches(fn):
    before = kernels.LAUNCH_COUNTS.copy()
    fn()
    return dict(kernels.LAUNCH_COUNTS - before)


def test_each_strategy_launches_its_kernels():
    pb = make_problem(37, 45, 51, 5, torch.float32, bias=True, p=0.0)
    shrink = run_forward(pb, None)[1]
    assert launches(lambda: run_forward(pb, "fused")) == {"lora_gemm_kernel": 1}
    assert launches(lambda: run_forward(pb, "shrink_first")) == {"lora_shrink_kernel": 1, "lora_gemm_kernel": 1}
    assert launches(lambda: run_forward(pb, "composite")) == {"lora_shrink_kernel": 1, "lora_expand_add_kernel": 1}
    common = {"lora_grad_ds_db_kernel": 1, "lora_grad_a_kernel": 1}
    assert launches(lambda: run_backward(pb, shrink, "fused")) == {**common, "lora_gemm_kernel": 1}
    assert launches(lambda: run_backward(pb, shrink, "composite")) == {**common, "lora_expand_add_kernel": 1}


def test_fused_where_it_does_not_exist_runs_shrink_first():
    """The fused K loop has no dropout and no padded rank above 32: "fused" is shrink_first there."""
    with_dropout = make_problem(37, 45, 51, 5, torch.float32, bias=True, p=0.25)
    wide = make_problem(37, 45, 51, 33, torch.float32, bias=True, p=0.0)
    for pb in (with_dropout, wide):
        assert launches(lambda: check_forward(pb, oracle(pb), *run_forward(pb, "fused"))) == {
            "lora_shrink_kernel": 1, "lora_gemm_kernel": 1}
    assert kernels.resolve_forward("fused", 37, 5, False) == "fused"
    assert kernels.resolve_forward(None, 37, 5, False) == "fused"     # None: the launchers' default, "fused"
    assert kernels.resolve_forward(None, 37, 5, True) == "shrink_first"


def test_unknown_strategy_or_config_is_refused():
    pb = make_problem(5, 19, 33, 3, torch.float32, bias=False, p=0.0)
    with pytest.raises(ValueError, match="forward strategy must be one of"):
        run_forward(pb, "cublas")
    with pytest.raises(ValueError, match="backward strategy must be one of"):
        run_backward(pb, run_forward(pb, None)[1], "shrink_first")
    with pytest.raises(ValueError, match="config must be one of"):
        run_forward(pb, "composite", "gemm_huge")


def test_candidates_fit_their_configs_and_name_every_strategy():
    for M in (1, 64, 65, 8192):
        for r in (1, 16, 32, 64, 128, 256):
            for dropout in (False, True):
                fwd = kernels.forward_candidates(M, r, dropout)
                bwd = kernels.backward_candidates(M, r, dropout)
                assert {s for s, _ in fwd} == {"shrink_first", "composite"} | (
                    {"fused"} if kernels.fused_shrink_applies(r, dropout) else set())
                assert {s for s, _ in bwd} == set(kernels.BACKWARD_STRATEGIES)
                for _, name in fwd + bwd:
                    assert kernels.padded_rank(r) <= kernels.CONFIGS[name].max_rank, (M, r, name)
    names = {c for cands in kernels.CANDIDATE_CONFIGS.values() for c in cands}
    assert names <= set(kernels.CONFIGS) == set(kernels.INTERPRETER_CONFIGS)


# ------------------------------------------------------------ through the op
@pytest.mark.parametrize("fwd,bwd", [(f, b) for f in kernels.FORWARD_STRATEGIES for b in kernels.BACKWARD_STRATEGIES])
def test_lora_linear_runs_the_forced_strategies(fwd, bwd):
    """lf.lora_linear under use_strategy: the forced kernels run (launch counts), and the
    output and every gradient match the float64 reference, with dropout and bias."""
    inp = make_inputs(37, 45, 51, 5, bias=True, seed=11)
    expected = {"fused": {"lora_gemm_kernel"}, "shrink_first": {"lora_shrink_kernel", "lora_gemm_kernel"},
                "composite": {"lora_shrink_kernel", "lora_expand_add_kernel"}}
    for p in (0.0, 0.25):
        with lf.use_strategy(forward=fwd, backward=bwd):
            with torch.no_grad():
                forward = launches(lambda: lf.lora_linear(inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.scaling,
                                                          inp.bias, dropout_p=p, training=True))
            assert set(forward) == expected["shrink_first" if (fwd, p > 0) == ("fused", True) else fwd]
            both = launches(lambda: assert_matches_reference(inp, dropout_p=p, training=True))
        # forward, then dX: the Triton GEMM or the expand-add (composite)
        assert both.get("lora_gemm_kernel", 0) == (fwd != "composite") + (bwd == "fused"), both
        assert both.get("lora_expand_add_kernel", 0) == (fwd == "composite") + (bwd == "composite"), both
        assert both["lora_grad_ds_db_kernel"] == 1, both


@pytest.mark.parametrize("regime", strategies.MULTI_LORA_STRATEGIES)
def test_multi_lora_linear_runs_the_forced_regime(regime):
    """use_strategy(multi_lora=...) picks the regime of the plan lf.multi_lora_linear builds
    from adapter ids; output and gradients match the float64 oracle (10 rows: every
    regime is forced where "decode" would be the default)."""
    g = torch.Generator().manual_seed(5)
    T, K, N, n, r = 10, 37, 45, 3, 8
    x = torch.randn(T, K, generator=g)
    weight, bias = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
    A, B = torch.randn(n, r, K, generator=g) / K ** 0.5, torch.randn(n, N, r, generator=g) / r ** 0.5
    ids = torch.tensor([2, -1, 0, 2, 1, 1, -1, 0, 2, 0])
    scalings = torch.tensor([0.5, 2.0, 1.0])
    with lf.use_strategy(multi_lora=regime):
        assert lf.plan_segments(ids, n).regime == regime
        leaves = [t.clone().to(DEVICE).requires_grad_() for t in (x, A, B)]
        y = lf.multi_lora_linear(leaves[0], weight.to(DEVICE), leaves[1], leaves[2], ids.to(DEVICE),
                                 scalings.to(DEVICE), bias.to(DEVICE))
    assert lf.plan_segments(ids, n).regime == "decode"  # the default again, from T
    grad_y = torch.randn(T, N, generator=g)
    y.backward(grad_y.to(DEVICE))
    ref_leaves = [t.double().requires_grad_() for t in (x, A, B)]
    y_ref = lf.multi_lora_linear_reference(ref_leaves[0], weight.double(), ref_leaves[1], ref_leaves[2], ids,
                                           scalings.double(), bias.double())
    y_ref.backward(grad_y.double())
    assert rel_error(y, y_ref) <= TOLERANCE[torch.float32]
    for got, ref in zip(leaves, ref_leaves):
        assert rel_error(got.grad, ref.grad) <= TOLERANCE[torch.float32]


# ------------------------------------------------------------ the public API
def test_available_strategies_is_the_contract():
    """The contract's keys and names, plus "multi_lora" and "grouped": every name use_strategy takes."""
    assert lf.available_strategies() == {"forward": ("fused", "shrink_first", "composite"),
                                         "backward": ("fused", "composite"),
                                         "multi_lora": ("prefill", "prefill_cublas", "decode"),
                                         "grouped": ("grouped_mm", "fused")}
    assert lf.available_strategies()["forward"] == kernels.FORWARD_STRATEGIES
    assert lf.available_strategies()["backward"] == kernels.BACKWARD_STRATEGIES
    assert set(lf.available_strategies()["multi_lora"]) == set(multi_kernels.MULTI_CONFIGS)
    assert lf.available_strategies()["grouped"] == backend.GROUPED_STRATEGIES


def test_use_strategy_takes_every_available_name():
    for op, names in lf.available_strategies().items():
        for name in names:
            with lf.use_strategy(**{op: name}):
                assert getattr(lf.current_strategy(), op) == name


def test_use_strategy_nests_and_auto_restores():
    assert lf.current_strategy() == strategies.StrategyChoice("auto", "auto", "auto", "auto")
    with lf.use_strategy(forward="composite", backward="composite") as outer:
        assert (outer.forward, outer.backward) == ("composite", "composite")
        with lf.use_strategy(forward="fused"):  # backward: None keeps the enclosing choice
            assert (lf.current_strategy().forward, lf.current_strategy().backward) == ("fused", "composite")
        with lf.use_strategy(backward="auto", multi_lora="decode"):
            assert lf.current_strategy() == strategies.StrategyChoice("composite", "auto", "decode")
        assert lf.current_strategy() == outer
    assert lf.current_strategy() == strategies.StrategyChoice()


def test_use_strategy_restores_after_an_exception():
    with pytest.raises(RuntimeError):
        with lf.use_strategy(forward="composite"):
            raise RuntimeError("boom")
    assert lf.current_strategy().forward == "auto"


@pytest.mark.parametrize("kwargs,argument", [(dict(forward="cublas"), "forward"),
                                             (dict(backward="shrink_first"), "backward"),
                                             (dict(multi_lora="fused"), "multi_lora"),
                                             (dict(grouped="composite"), "grouped")])
def test_use_strategy_refuses_unknown_names(kwargs, argument):
    with pytest.raises(ValueError, match=rf"{argument} must be one of \('auto', "):
        with lf.use_strategy(**kwargs):
            pass
    assert lf.current_strategy() == strategies.StrategyChoice()


def test_use_strategy_is_per_thread():
    """A choice forced in one thread is invisible to another running at the same time."""
    seen, entered, release = {}, threading.Event(), threading.Event()

    def forcing():
        with lf.use_strategy(forward="composite"):
            entered.set()
            release.wait(5)
            seen["forcing"] = lf.current_strategy().forward

    def other():
        entered.wait(5)
        seen["other"] = lf.current_strategy().forward
        release.set()

    threads = [threading.Thread(target=forcing), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"forcing": "composite", "other": "auto"}
