"""tree_train (sparse training path, both impls) against tree_reference (the masked dense simulation).

Inputs of the routing (x, w_in, b_in) are small multiples of powers of two, so every routing score Σ_w λ_w is
computed exactly in fp32 whatever the summation order: paths must then agree bit for bit between the reference and
both implementations (a tie s = 0 goes left everywhere), and values/gradients are compared with tight tolerances.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from treeffn.errors import ConfigError
from treeffn.kernels.tree_train import extension, tree_train
from treeffn.layers.tree import TreeFFN, tree_paths, tree_reference, visit_counts


def _cpp_available() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return extension() is not None


CPP = pytest.param("cpp", marks=pytest.mark.skipif(not _cpp_available(),
                                                     reason="the tree_train C++ extension could not be built"))
IMPLS = ["torch", CPP]


def make(K, depth, W, D, M, bias=True, dtype=torch.float32, seed=0):
    """Exactly representable routing inputs (see the module docstring); w_out is any float."""
    g = torch.Generator().manual_seed(seed)
    N = 2 ** (depth + 1) - 1
    x = torch.randint(-16, 17, (M, D), generator=g).float() / 16
    w_in = torch.randint(-8, 9, (K, N, W, D), generator=g).float() / 64
    b_in = torch.randint(-8, 9, (K, N, W), generator=g).float() / 64 if bias else None
    w_out = torch.randn(K, N, W, D, generator=g) / (K * (depth + 1) * W) ** 0.5
    ts = [x, w_in, b_in, w_out]
    return [t.to(dtype).requires_grad_() if t is not None else None for t in ts]


def bf16_bound(exact, magnitude):
    """Largest deviation of a bf16 result accumulated in fp32 and rounded once from the fp32 value on the same bf16
    inputs: the rounding of the output (unit roundoff of bf16's 8-bit significand, 2^-8 relative) plus fp32
    summation-order differences (up to ~1,000 terms: n·2^-24 ≤ 2^-14 of the terms' magnitude)."""
    return 2.0 ** -8 * exact.abs() + 2.0 ** -14 * magnitude


def assert_within(got, exact, bound, what):
    err = (got.float() - exact).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements beyond bf16 rounding; worst "
                           f"excess {float((err - bound).max()):.3g}")


def grads(y, inputs, dy):
    live = [t for t in inputs if t is not None]
    gs = iter(torch.autograd.grad(y, live, dy))
    return [next(gs) if t is not None else None for t in inputs]


# K, depth, W, D, M, placement, activation, bias
CASES = [
    (1, 0, 1, 8, 1, "node", "gelu", True),
    (1, 0, 3, 16, 50, "output", "tanh", False),
    (2, 0, 2, 12, 17, "node", "relu", True),
    (1, 1, 1, 8, 5, "node", "tanh", True),
    (3, 1, 2, 24, 64, "output", "gelu", True),
    (1, 2, 1, 32, 100, "node", "gelu", False),
    (4, 2, 3, 16, 33, "output", "relu", True),
    (2, 3, 1, 40, 300, "node", "gelu", True),
    (2, 3, 2, 8, 7, "output", "tanh", True),
    (1, 4, 1, 24, 300, "output", "gelu", True),
    (3, 4, 1, 16, 128, "node", "relu", True),
    (4, 4, 2, 40, 80, "node", "tanh", False),
    (1, 5, 1, 16, 300, "node", "gelu", True),
    (2, 5, 3, 32, 200, "output", "relu", False),
    (4, 5, 1, 8, 256, "node", "tanh", True),
    (3, 5, 2, 40, 1, "output", "gelu", True),
    (1, 3, 1, 32, 64, "node", "silu", True),
    (2, 2, 2, 16, 48, "output", "silu", True),
    (2, 3, 1, 16, 40, "node", "identity", True),
    (1, 4, 2, 8, 60, "output", "identity", False),
    (1, 5, 2, 64, 300, "node", "gelu", True),  # enough work for the C++ kernel to go multi-threaded
    (3, 3, 1, 96, 257, "output", "tanh", True),
]


def _case_id(c):
    K, depth, W, D, M, pl, act, bias = c
    return f"K{K}d{depth}W{W}D{D}M{M}-{pl}-{act}-{'b' if bias else 'nob'}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, impl):
    K, depth, W, D, M, placement, act, bias = case
    inputs = make(K, depth, W, D, M, bias, seed=CASES.index(case))
    x, w_in, b_in, w_out = inputs
    y, paths = tree_train(x, w_in, b_in, w_out, depth, act, placement, backend=impl)
    ref_paths = tree_paths(x, w_in, b_in, depth)
    assert paths.dtype == torch.long and paths.shape == (M, K, depth + 1) and not paths.requires_grad
    assert torch.equal(paths, ref_paths)
    y_ref = tree_reference(x, w_in, b_in, w_out, depth, act, placement)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn(M, D, generator=torch.Generator().manual_seed(1))
    got, want = grads(y, inputs, dy), grads(y_ref, inputs, dy)
    for name, g, r in zip(("x", "w_in", "b_in", "w_out"), got, want):
        if r is None:
            assert g is None
            continue
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
    # Inputs spread over the paths: with enough tokens most leaves of every tree are visited.
    if depth >= 2 and M >= 4 * 2 ** depth:
        leaves = paths[:, :, -1]
        for k in range(K):
            assert leaves[:, k].unique().numel() >= 2 ** depth // 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("placement", ["node", "output"])
def test_unvisited_nodes_get_exact_zero_gradient(impl, placement):
    K, depth, W, D, M = 2, 5, 2, 16, 20  # 20 tokens cannot visit all 32 leaves
    inputs = make(K, depth, W, D, M, seed=3)
    x, w_in, b_in, w_out = inputs
    y, paths = tree_train(x, w_in, b_in, w_out, depth, "gelu", placement, backend=impl)
    y.sum().backward()
    visits = visit_counts(paths, 2 ** (depth + 1) - 1)  # (K, N)
    unvisited = visits == 0
    assert unvisited.any() and (~unvisited).any()
    for p in (w_in, b_in, w_out):
        assert torch.count_nonzero(p.grad[unvisited]) == 0
        assert torch.count_nonzero(p.grad[~unvisited]) > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_routing_receives_no_gradient(impl):
    """A node whose output vector is zero acts on y only through its routing decision: under hard routing with
    stop-gradient its input weights and bias get exactly zero gradient (a soft or straight-through router would not),
    although moving its bias does change y."""
    K, depth, W, D, M = 1, 3, 1, 16, 64
    x, w_in, b_in, w_out = make(K, depth, W, D, M, seed=5)
    with torch.no_grad():
        w_out[:, 0] = 0  # the root routes but contributes nothing
    y, paths = tree_train(x, w_in, b_in, w_out, depth, "gelu", "node", backend=impl)
    assert 0 < (paths[:, 0, 1] == 2).sum() < M  # the root sends tokens both ways
    y.square().sum().backward()
    assert torch.count_nonzero(w_in.grad[:, 0]) == 0 and torch.count_nonzero(b_in.grad[:, 0]) == 0
    assert torch.count_nonzero(w_in.grad[:, 1:]) > 0
    with torch.no_grad():  # the routing does matter for the value: send every token right
        b_shift = b_in.detach().clone()
        b_shift[:, 0] = 1e3
        y2, paths2 = tree_train(x, w_in, b_shift, w_out, depth, "gelu", "node", backend=impl)
    assert (paths2[:, 0, 1] == 2).all() and not torch.allclose(y, y2)


@pytest.mark.parametrize("impl", IMPLS)
def test_grads_equal_fixed_path_reference(impl):
    """Gradients equal those of the reference evaluated on the same, fixed paths (routing is a constant)."""
    K, depth, W, D, M = 3, 4, 1, 24, 90
    g = torch.Generator().manual_seed(11)  # plain Gaussian inputs; the reference is forced onto our paths
    x = torch.randn(M, D, generator=g, requires_grad=True)
    w_in = (torch.randn(K, 31, W, D, generator=g) / D ** 0.5).requires_grad_()
    b_in = (torch.randn(K, 31, W, generator=g) * 0.1).requires_grad_()
    w_out = torch.randn(K, 31, W, D, generator=g).requires_grad_()
    for placement in ("node", "output"):
        y, paths = tree_train(x, w_in, b_in, w_out, depth, "gelu", placement, backend=impl)
        y_ref = tree_reference(x, w_in, b_in, w_out, depth, "gelu", placement, paths=paths)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        dy = torch.randn(M, D, generator=g)
        for a, b in zip(grads(y, [x, w_in, b_in, w_out], dy), grads(y_ref, [x, w_in, b_in, w_out], dy)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("placement", ["node", "output"])
def test_bf16_close_to_fp32_reference(impl, placement):
    K, depth, W, D, M = 2, 4, 2, 32, 150
    inputs = make(K, depth, W, D, M, dtype=torch.bfloat16, seed=7)
    x, w_in, b_in, w_out = inputs
    y, paths = tree_train(x, w_in, b_in, w_out, depth, "gelu", placement, backend=impl)
    assert y.dtype == torch.bfloat16
    f32 = [t.detach().float().requires_grad_() for t in inputs]
    # bf16 routing inputs are exact here and both impls sum in fp32: the paths are the exact ones
    assert torch.equal(paths, tree_paths(f32[0], f32[1], f32[2], depth))
    y_ref = tree_reference(*f32, depth, "gelu", placement, paths=paths)
    # magnitudes of the terms each value sums: the "identity" reference on absolute values (same paths) and its
    # gradients for |dy|, times 1.2 ≥ max |φ'| of gelu (|φ(z)| ≤ |z|); see bf16_bound
    absolute = [t.detach().float().abs().requires_grad_() for t in inputs]
    y_abs = tree_reference(*absolute, depth, "identity", "node", paths=paths)
    assert_within(y, y_ref.detach(), bf16_bound(y_ref.detach(), 1.2 * y_abs.detach()), "y")
    dy = torch.randn(M, D, generator=torch.Generator().manual_seed(2)).bfloat16()
    mags = grads(y_abs, absolute, dy.float().abs())
    for name, g, r, mag in zip("x u b v".split(), grads(y, inputs, dy), grads(y_ref, f32, dy.float()), mags):
        assert g.dtype == torch.bfloat16
        assert_within(g, r, bf16_bound(r, 1.2 * mag), f"d{name}")


@pytest.mark.skipif(not _cpp_available(), reason="the tree_train C++ extension could not be built")
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("K,placement", [(1, "node"), (2, "output"), (5, "node")])
def test_cpp_thread_schedules(threads, K, placement):
    """Both backward schedules (a tree per thread with per-thread dx buffers when K ≥ threads; slices of one tree's
    leaf order with straddling nodes merged afterwards when K < threads), with enough work to go parallel."""
    depth, W, D, M = 4, 2, 64, 257
    inputs = make(K, depth, W, D, M, seed=K)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, paths = tree_train(*inputs, depth, "gelu", placement, backend="cpp")
        dy = torch.randn(M, D, generator=torch.Generator().manual_seed(3))
        got = grads(y, inputs, dy)
    finally:
        torch.set_num_threads(before)
    y_ref = tree_reference(*inputs, depth, "gelu", placement)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, grads(y_ref, inputs, dy)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not _cpp_available(), reason="the tree_train C++ extension could not be built")
@pytest.mark.parametrize("K", [1, 4, 8])
def test_cpp_gradients_bitwise_reproducible(K):
    """Same inputs, same thread count -> bitwise identical outputs and gradients (exact resume depends on it),
    with random (not exactly representable) inputs so the summation order would show."""
    g = torch.Generator().manual_seed(K)
    D, M, depth = 64, 512, 3
    N = 2 ** (depth + 1) - 1
    x = torch.randn(M, D, generator=g)
    params = [torch.randn(K, N, 1, D, generator=g) / 8, torch.randn(K, N, 1, generator=g) / 8,
              torch.randn(K, N, 1, D, generator=g) / 8]
    dy = torch.randn(M, D, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for _ in range(8):
            inputs = [t.clone().requires_grad_(True) for t in [x, *params]]
            y, _ = tree_train(inputs[0], inputs[1], inputs[2], inputs[3], depth, "gelu", "node", backend="cpp")
            runs.append([y.detach()] + list(torch.autograd.grad(y, inputs, dy)))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_gradcheck_torch_fp64():
    K, depth, W, D, M = 2, 2, 2, 5, 6
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(M, D, generator=g, dtype=torch.float64), torch.randn(K, 7, W, D, generator=g, dtype=torch.float64),
            torch.randn(K, 7, W, generator=g, dtype=torch.float64), torch.randn(K, 7, W, D, generator=g, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    for placement in ("node", "output"):
        fn = lambda *a: tree_train(*a[:3], a[3], depth, "gelu", placement, backend="torch")[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@pytest.mark.skipif(not _cpp_available(), reason="the tree_train C++ extension could not be built")
def test_gradcheck_cpp_fp64():
    K, depth, W, D, M = 2, 2, 2, 5, 6
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(M, D, generator=g, dtype=torch.float64), torch.randn(K, 7, W, D, generator=g, dtype=torch.float64),
            torch.randn(K, 7, W, generator=g, dtype=torch.float64), torch.randn(K, 7, W, D, generator=g, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    for placement in ("node", "output"):
        for act in ("gelu", "tanh"):
            fn = lambda *a: tree_train(*a[:3], a[3], depth, act, placement, backend="cpp")[0]  # noqa: E731
            assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_partial_requires_grad_and_empty_batch(impl):
    K, depth, W, D, M = 2, 3, 1, 16, 40
    x, w_in, b_in, w_out = make(K, depth, W, D, M, seed=9)
    x = x.detach()  # first layer: no dx wanted
    w_in.requires_grad_(False)
    y, _ = tree_train(x, w_in, b_in, w_out, depth, "gelu", "node", backend=impl)
    y_ref = tree_reference(x, w_in, b_in, w_out, depth, "gelu", "node")
    dy = torch.randn(M, D)
    a = torch.autograd.grad(y, [b_in, w_out], dy)
    b = torch.autograd.grad(y_ref, [b_in, w_out], dy)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    y0, p0 = tree_train(torch.zeros(0, D, requires_grad=True), w_in, b_in, w_out, depth, backend=impl)
    assert y0.shape == (0, D) and p0.shape == (0, K, depth + 1)
    y0.sum().backward()


def test_auto_impl_layer_and_errors():
    K, depth, W, D, M = 2, 3, 2, 16, 30
    x, w_in, b_in, w_out = make(K, depth, W, D, M, seed=4)
    y, _ = tree_train(x, w_in, b_in, w_out, depth)
    torch.testing.assert_close(y, tree_reference(x, w_in, b_in, w_out, depth), rtol=1e-5, atol=1e-5)
    layer = TreeFFN(D, K, depth, node_width=W, impl="sparse")
    xs = torch.randn(M, D, requires_grad=True)
    ys, _ = layer.forward_2d(xs)
    torch.testing.assert_close(ys, tree_reference(xs, layer.w_in, layer.b_in, layer.w_out, depth),
                               rtol=1e-5, atol=1e-5)
    ys.sum().backward()
    assert layer.w_in.grad is not None and xs.grad is not None
    with pytest.raises(ConfigError):
        tree_train(x, w_in, b_in, w_out, depth + 1)
    with pytest.raises(ConfigError):
        tree_train(x, w_in, b_in, w_out, depth, activation="swish")
    with pytest.raises(ConfigError):
        tree_train(x, w_in, b_in, w_out, depth, placement="leaf")
    with pytest.raises(ConfigError):
        tree_train(x, w_in, b_in, w_out, depth, backend="cuda")


def test_bench_smoke(capsys):
    from treeffn.bench.common import check_record
    from treeffn.bench.train_ffn import main

    assert main(["--d-model", "32", "--configs", "2x3,1x4", "--tokens", "64", "--dtypes", "fp32", "--repeats", "1",
                 "--warmup", "0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    check_record(res, "train-ffn")  # the JSON line schema shared by every benchmark (bench/common.py)
    s = res["settings"]
    assert s["tokens"] == 64 and res["env"]["threads"] >= 1
    assert s["configs"] == ["2x3", "1x4"] and s["d_model"] == [32] and s["dtypes"] == ["fp32"]
    impls = {"dense", "tree-torch", "reference"} | ({"tree-cpp"} if _cpp_available() else set())
    rows = {}
    for r in res["results"]:
        rows.setdefault(r["case"]["config"], {})[r["impl"]] = r
    assert set(rows) == {"2x3", "1x4"}
    for config, by_impl in rows.items():
        assert set(by_impl) == impls, (config, set(by_impl))
        K, depth = map(int, config.split("x"))
        dense = by_impl["dense"]["time_s"]["median"]
        for r in by_impl.values():
            c, m, t = r["case"], r["metrics"], r["time_s"]
            assert (c["K"], c["depth"], c["W"], c["tokens"], c["d_model"]) == (K, depth, 1, 64, 32)
            # units of the layer and of one token's paths; the dense baseline has the layer's total width
            assert m["units_total"] == K * (2 ** (depth + 1) - 1) and m["units_visited"] == K * (depth + 1)
            assert t["n"] >= 1 and t["median"] > 0 and 0 < m["fwd_s"] <= t["max"]
            # each speed-up is the dense time over this one's (both as reported, rounded)
            assert m["speedup_vs_dense"] == pytest.approx(dense / t["median"], rel=0.01, abs=0.002)
        assert by_impl["dense"]["metrics"]["speedup_vs_dense"] == 1.0


_THREAD_LIMIT_SCRIPT = """
import torch
from treeffn.kernels.tree_train import tree_train
from treeffn.layers.tree import tree_reference
torch.set_num_threads(4)  # the kernel plans 4 threads; OMP_THREAD_LIMIT=1 gives it a team of one
g = torch.Generator().manual_seed(0)
K, depth, W, D, M = 6, 4, 1, 64, 600
N = 2 ** (depth + 1) - 1
ins = [torch.randn(M, D, generator=g), torch.randn(K, N, W, D, generator=g) / 8,
       torch.randn(K, N, W, generator=g) / 8, torch.randn(K, N, W, D, generator=g) / 8]
ins = [t.requires_grad_() for t in ins]
dy = torch.randn(M, D, generator=g)
y, _ = tree_train(*ins, depth, "gelu", "node", backend="cpp")
got = torch.autograd.grad(y, ins, dy)
ref_in = [t.detach().clone().requires_grad_() for t in ins]
want = torch.autograd.grad(tree_reference(*ref_in, depth, "gelu", "node"), ref_in, dy)
for a, b in zip(got, want):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
print("ok")
"""


@pytest.mark.skipif(not _cpp_available(), reason="the tree_train C++ extension could not be built")
def test_cpp_backward_under_a_thread_limit():
    """The backward plans its schedule for torch's thread count; a thread limit (or a nested parallel region) can give
    it a smaller OpenMP team, whose per-thread dx buffers must then be the only ones summed."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    res = subprocess.run([sys.executable, "-c", _THREAD_LIMIT_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
