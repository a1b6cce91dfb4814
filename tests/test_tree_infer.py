"""The fused inference kernel and the PyTorch path walk against the masked dense reference (treeffn.layers.tree).

Shapes: M tokens, D width, K trees, L = depth + 1 levels, N = 2^L − 1 nodes, W units per node.
The first test call compiles the C++ extension (~30–45 s, cached afterwards); cpp cases skip when it cannot build.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from treeffn.kernels import tree_infer as ti
from treeffn.layers.tree import TreeFFN, num_nodes, tree_paths, tree_reference


@pytest.fixture(scope="module")
def ext():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = ti.extension()
    if mod is None:
        reason = "; ".join(str(w.message) for w in caught) or "TREEFFN_NO_EXT set"
        pytest.skip(f"C++ tree_infer extension unavailable: {reason}")
    return mod


def make_layer(D, K, depth, W, act="gelu", placement="node", bias=True, seed=0):
    torch.manual_seed(seed)
    layer = TreeFFN(D, K, depth, node_width=W, activation=act, placement=placement, bias=bias).eval()
    with torch.no_grad():  # larger biases than the init so they actually move routing decisions
        if bias:
            layer.b_in.mul_(3.0)
    return layer


def params(layer, dtype=torch.float32):
    b = layer.b_in.detach().to(dtype) if layer.b_in is not None else None
    return layer.w_in.detach().to(dtype), b, layer.w_out.detach().to(dtype)


def term_magnitude(x, w_in, b_in, w_out, depth, paths):
    """Magnitude of the terms a tree output sums, per output element: Σ over visited units of (Σ_d |u_d x_d| + |b|)·|v|
    (the "identity" reference on absolute values, same paths), times 1.2 ≥ max |φ'| (gelu 1.13, silu 1.10, tanh,
    relu, identity 1). It bounds Σ|φ(λ)·v| (|φ(z)| ≤ |z|) and, for "output" placement, the terms of each tree's z."""
    b = None if b_in is None else b_in.abs()
    return 1.2 * tree_reference(x.abs(), w_in.abs(), b, w_out.abs(), depth, "identity", "node", paths=paths)


def assert_bf16_rounding(y, y_ref, magnitude):
    """y: a bf16 result accumulated in fp32 and rounded once; y_ref: fp32 on the same bf16 inputs. Allowed: the
    rounding of the output (unit roundoff of bf16's 8-bit significand, 2^-8 relative) plus fp32 summation-order
    differences (up to ~1,000 terms: n·2^-24 ≤ 2^-14 of the terms' magnitude)."""
    err = (y.float() - y_ref).abs()
    bound = 2.0 ** -8 * y_ref.abs() + 2.0 ** -14 * magnitude
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements beyond bf16 rounding; worst excess "
                           f"{float((err - bound).max()):.3g} (error {float(err[bad].max()):.3g})")


def assert_paths_agree(paths, x, w_in, b_in, depth, max_frac=0.0, thr=None):
    """paths == tree_paths except at near-ties (Σ_w λ ≈ the node's threshold, 0 without thr, where summation order
    decides the side)."""
    ref = tree_paths(x, w_in, b_in, depth, thr)
    assert paths.shape == ref.shape and paths.dtype == torch.long
    diff = (paths != ref).any(-1)  # (M, K)
    if not diff.any():
        return
    assert diff.float().mean().item() <= max_frac, f"{int(diff.sum())} of {diff.numel()} tree paths differ"
    xd = x.double()
    for m, k in diff.nonzero().tolist():
        t = int((paths[m, k] != ref[m, k]).nonzero()[0])
        parent = int(paths[m, k, t - 1])
        s = (w_in[k, parent].double() @ xd[m]).sum()
        if b_in is not None:
            s = s + b_in[k, parent].double().sum()
        if thr is not None:
            s = s - float(thr[k, parent])
        assert abs(float(s)) < 1e-3, f"token {m} tree {k}: paths differ at level {t} with routing score {float(s)}"


# (M, K, depth, W, D, placement, activation, bias): every M, K×depth incl. depth 0, W, D, placement, activation and
# bias value appears several times, in varied combinations (a full product would take minutes in the reference).
CASES = [
    (1, 1, 0, 1, 8, "node", "gelu", True),
    (1, 1, 3, 1, 64, "node", "gelu", True),
    (1, 1, 6, 2, 33, "output", "gelu", False),
    (1, 8, 2, 1, 64, "node", "relu", True),
    (1, 16, 3, 4, 64, "output", "tanh", True),
    (2, 1, 5, 1, 33, "node", "silu", True),
    (2, 4, 0, 2, 8, "output", "identity", True),
    (2, 3, 4, 4, 64, "node", "gelu", False),
    (7, 1, 1, 1, 8, "output", "gelu", True),
    (7, 2, 3, 2, 33, "node", "tanh", True),
    (7, 5, 2, 1, 64, "output", "silu", True),
    (64, 1, 4, 1, 64, "node", "gelu", True),
    (64, 4, 3, 4, 33, "output", "relu", False),
    (64, 2, 0, 1, 33, "node", "identity", False),
    (64, 8, 2, 2, 8, "output", "gelu", True),
    (300, 1, 6, 1, 33, "output", "gelu", True),
    (300, 3, 3, 2, 64, "node", "silu", False),
    (300, 16, 1, 1, 8, "node", "tanh", True),
    (4096, 1, 4, 1, 64, "node", "gelu", True),
    (4096, 2, 3, 2, 33, "output", "tanh", True),
    (4096, 4, 0, 4, 8, "node", "relu", True),
]
IDS = [f"M{c[0]}-{c[1]}x{c[2]}-W{c[3]}-D{c[4]}-{c[5]}-{c[6]}-{'b' if c[7] else 'nob'}" for c in CASES]


def _check(impl, case, dtype):
    M, K, depth, W, D, placement, act, bias = case
    layer = make_layer(D, K, depth, W, act, placement, bias, seed=M + 7 * K + depth)
    w_in, b_in, w_out = params(layer, dtype)
    x = torch.randn(M, D, generator=torch.Generator().manual_seed(M)).to(dtype)
    with torch.inference_mode():
        y, paths = ti.tree_infer(x, w_in, b_in, w_out, depth, act, placement, return_paths=True, backend=impl)
        y2, none = ti.tree_infer(x, w_in, b_in, w_out, depth, act, placement, backend=impl)
    assert none is None and torch.equal(y, y2)
    assert y.shape == (M, D) and y.dtype == dtype and paths.shape == (M, K, depth + 1)
    # fp32 reference on exactly the (possibly bf16-rounded) values the kernel saw
    xf, wf, bf, vf = x.float(), w_in.float(), (b_in.float() if b_in is not None else None), w_out.float()
    assert_paths_agree(paths, xf, wf, bf, depth, max_frac=0.0 if dtype == torch.float32 else 0.01)
    y_ref = tree_reference(xf, wf, bf, vf, depth, act, placement, paths=paths)
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    else:
        assert_bf16_rounding(y, y_ref, term_magnitude(xf, wf, bf, vf, depth, paths))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpp_matches_reference_fp32(ext, case):
    _check("cpp", case, torch.float32)


@pytest.mark.parametrize("case", CASES[::2], ids=IDS[::2])
def test_cpp_matches_reference_bf16(ext, case):
    _check("cpp", case, torch.bfloat16)


@pytest.mark.parametrize("case", CASES[1::2], ids=IDS[1::2])
def test_torch_walk_matches_reference_fp32(case):
    _check("torch", case, torch.float32)


@pytest.mark.parametrize("case", CASES[3::4], ids=IDS[3::4])
def test_torch_walk_matches_reference_bf16(case):
    _check("torch", case, torch.bfloat16)


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_inputs_spread_over_all_leaves(impl, request):
    if impl == "cpp":
        request.getfixturevalue("ext")
    depth, K = 4, 2
    layer = make_layer(32, K, depth, 1, seed=3)
    w_in, b_in, w_out = params(layer)
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        y, paths = ti.tree_infer(x, w_in, b_in, w_out, depth, return_paths=True, backend=impl)
    leaves = set(range(2 ** depth - 1, num_nodes(depth)))
    for k in range(K):
        assert set(paths[:, k, -1].tolist()) == leaves, f"tree {k} leaves not all visited"
    assert torch.equal(paths, tree_paths(x, w_in, b_in, depth))
    torch.testing.assert_close(y, tree_reference(x, w_in, b_in, w_out, depth), rtol=1e-4, atol=1e-5)


def test_cpp_threading_modes_agree(ext):
    """Serial, token-parallel and tree-parallel schedules give the same result (batch 1 and 3 with many trees)."""
    layer = make_layer(256, 24, 5, 1, placement="output", seed=11)
    w_in, b_in, w_out = params(layer)
    for M in (1, 3, 40):
        x = torch.randn(M, 256, generator=torch.Generator().manual_seed(M))
        with torch.inference_mode():
            y, paths = ti.tree_infer(x, w_in, b_in, w_out, 5, placement="output", return_paths=True, backend="cpp")
        assert torch.equal(paths, tree_paths(x, w_in, b_in, 5))
        ref = tree_reference(x, w_in, b_in, w_out, 5, placement="output")
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("thresholds", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("placement", ["node", "output"])
def test_cpp_result_does_not_depend_on_threads(ext, placement, dtype, thresholds):
    """One thread (the serial path) and two or three (trees split at batch 1 and 3, tokens split at 40 and 514, whose
    ranges end in one-token blocks) give the same bits: every schedule adds a token's terms in one order. 16x5 with
    W=2 at D=180 is above the kernel's parallel threshold (32,768 multiply-adds) at batch 1; D=180 leaves a tail of
    4 columns after the vectors of 8 and output slices of 16 columns that do not divide it."""
    K, depth, W, D = 16, 5, 2, 180
    layer = make_layer(D, K, depth, W, placement=placement, seed=12)
    w_in, b_in, w_out = params(layer, dtype)
    thr = torch.randn(K, num_nodes(depth), generator=torch.Generator().manual_seed(3)) if thresholds else None
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    threads = torch.get_num_threads()
    try:
        for M in (1, 3, 40, 514):
            x = torch.randn(M, D, generator=torch.Generator().manual_seed(M)).to(dtype)
            runs = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                with torch.no_grad():
                    runs.append(ti.tree_infer(x, w_in, b_in, w_out, depth, placement=placement, return_paths=True,
                                              backend="cpp", thr=thr))
            (y1, p1), rest = runs[0], runs[1:]
            for n, (y, p) in zip((2, 3), rest):
                assert torch.equal(p, p1), f"batch {M}: {n} threads route differently from one"
                assert torch.equal(y.view(bits), y1.view(bits)), f"batch {M}: {n} threads differ from one in value"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("act", ["gelu", "tanh", "silu"])
def test_cpp_output_placement_large_responses(ext, act):
    """The kernel's vectorised φ (its own exp/erf) over a wide range of pre-activations, incl. the saturated tails."""
    layer = make_layer(40, 2, 3, 1, act=act, placement="output", seed=6)
    w_in, b_in, w_out = params(layer)
    w_out = w_out * 400.0  # accumulated z spans about ±60
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        y, _ = ti.tree_infer(x, w_in, b_in, w_out, 3, act, "output", backend="cpp")
    ref = tree_reference(x, w_in, b_in, w_out, 3, act, "output")
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_cpp_concurrent_python_threads(ext):
    """Big calls release the GIL; per-thread scratch must keep concurrent callers apart."""
    from concurrent.futures import ThreadPoolExecutor

    layer = make_layer(96, 4, 4, 2, placement="output", seed=8)
    w_in, b_in, w_out = params(layer)
    xs = [torch.randn(300, 96, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with torch.inference_mode():
        expected = [ti.tree_infer(x, w_in, b_in, w_out, 4, placement="output", backend="cpp")[0] for x in xs]

        def call(i):
            with torch.inference_mode():
                return ti.tree_infer(xs[i], w_in, b_in, w_out, 4, placement="output", backend="cpp")[0]

        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(call, range(6)))
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_cpp_noncontiguous_and_mixed_dtypes(ext):
    layer = make_layer(64, 3, 3, 2, seed=2)
    w_in, b_in, w_out = params(layer)
    xt = torch.randn(64, 10).t()  # (10, 64), not contiguous
    with torch.inference_mode():
        y, _ = ti.tree_infer(xt, w_in, b_in, w_out, 3, backend="cpp")
        torch.testing.assert_close(y, tree_reference(xt.contiguous(), w_in, b_in, w_out, 3), rtol=1e-4, atol=1e-5)
        # fp32 tokens with bf16 weights (and the reverse): fp32 accumulation either way
        wb, bb, vb = params(layer, torch.bfloat16)
        y, paths = ti.tree_infer(xt, wb, bb, vb, 3, return_paths=True, backend="cpp")
        assert y.dtype == torch.float32
        ref = tree_reference(xt.contiguous(), wb.float(), bb.float(), vb.float(), 3, paths=paths)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
        y, _ = ti.tree_infer(xt.bfloat16(), w_in, b_in, w_out, 3, backend="cpp")
        assert y.dtype == torch.bfloat16
        # empty batch
        y, paths = ti.tree_infer(torch.zeros(0, 64), w_in, b_in, w_out, 3, return_paths=True, backend="cpp")
        assert y.shape == (0, 64) and paths.shape == (0, 3, 4)


def test_errors(ext):
    layer = make_layer(16, 1, 2, 1)
    w_in, b_in, w_out = params(layer)
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="inference-only"):
        ti.tree_infer(x.requires_grad_(), layer.w_in, layer.b_in, layer.w_out, 2)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="nodes per tree"):
            ti.tree_infer(x, w_in, b_in, w_out, 3, backend="cpp")
        with pytest.raises(ValueError, match="unknown"):
            ti.tree_infer(x, w_in, b_in, w_out, 2, activation="swish")
        with pytest.raises(ValueError, match="backend"):
            ti.tree_infer(x, w_in, b_in, w_out, 2, backend="triton")


def test_fallback_without_extension(monkeypatch):
    """With the extension unavailable (TREEFFN_NO_EXT=1 or no compiler), "auto" runs the PyTorch walk."""
    monkeypatch.setattr(ti, "_ext", None)
    monkeypatch.setattr(ti, "_ext_tried", True)
    layer = make_layer(33, 2, 3, 1, seed=4)
    w_in, b_in, w_out = params(layer)
    x = torch.randn(9, 33)
    called = []
    real = ti.tree_infer_torch
    monkeypatch.setattr(ti, "tree_infer_torch", lambda *a, **k: called.append(1) or real(*a, **k))
    with torch.inference_mode():
        y, paths = ti.tree_infer(x, w_in, b_in, w_out, 3, return_paths=True)
        with pytest.raises(RuntimeError, match="could not be built"):
            ti.tree_infer(x, w_in, b_in, w_out, 3, backend="cpp")
    assert called
    assert torch.equal(paths, tree_paths(x, w_in, b_in, 3))
    torch.testing.assert_close(y, tree_reference(x, w_in, b_in, w_out, 3), rtol=1e-4, atol=1e-5)


def test_layer_fused_impl_uses_kernel(ext):
    layer = make_layer(48, 4, 3, 2, placement="output", seed=9)
    layer.impl = "fused"
    layer.track_stats = True
    x = torch.randn(2, 5, 48)
    with torch.inference_mode():
        y, aux = layer(x)
    ref = tree_reference(x.reshape(-1, 48), layer.w_in, layer.b_in, layer.w_out, 3, placement="output")
    torch.testing.assert_close(y.reshape(-1, 48), ref, rtol=1e-4, atol=1e-5)
    assert int(aux["tree_visits"].sum()) == 10 * 4 * 4


# ---- TreeFFN's inference fast path ----------------------------------------------------------------------------------
# (x shape, K, depth, W, placement, bias, thresholds): batch 1 as (1, D) and (1, 1, D), larger batches in 2 and 3 dims
FAST = [
    ((1, 40), 1, 5, 1, "node", True, False),
    ((1, 1, 40), 3, 3, 2, "output", True, True),
    ((1, 33), 2, 4, 1, "output", False, True),
    ((1, 1, 64), 1, 6, 1, "node", False, False),
    ((2, 7, 33), 2, 4, 1, "node", False, True),
    ((5, 64), 4, 2, 2, "output", False, False),
    ((3, 40), 3, 3, 1, "node", True, True),
    ((2, 3, 64), 1, 5, 2, "output", True, False),
]
FAST_IDS = ["x".join(map(str, c[0])) + f"-{c[1]}x{c[2]}-W{c[3]}-{c[4]}-{'b' if c[5] else 'nob'}-"
            f"{'thr' if c[6] else 'sign'}" for c in FAST]


def make_fast_layer(shape, K, depth, W, placement, bias, thresholds, dtype, seed=0):
    D = shape[-1]
    torch.manual_seed(seed)
    layer = TreeFFN(D, K, depth, node_width=W, placement=placement, bias=bias,
                    balance="threshold" if thresholds else "none")
    with torch.no_grad():
        if bias:
            layer.b_in.mul_(3.0)
        if thresholds:  # as trained thresholds would: away from 0, so that they move routes
            layer.route_threshold.normal_(0.0, 1.0)
    return layer.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", FAST, ids=FAST_IDS)
def test_module_fast_path_matches_reference(ext, monkeypatch, case, dtype):
    """layer(x) in eval mode under no_grad: one kernel call (the general path is never entered), the same bits as the
    fused kernel called through tree_infer, and the reference's values (tree_reference on the kernel's paths, which
    are tree_paths' with the layer's thresholds; tree_infer_torch)."""
    shape, K, depth, W, placement, bias, thresholds = case
    layer = make_fast_layer(shape, K, depth, W, placement, bias, thresholds, dtype, seed=len(shape) + K + depth)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(K)).to(dtype)

    def general_path(*args, **kwargs):
        raise AssertionError("the inference fast path fell back to the general path")

    with monkeypatch.context() as m:
        m.setattr(TreeFFN, "forward_2d", general_path)
        with torch.no_grad():
            y, aux = layer(x)
    assert aux == {} and y.shape == x.shape and y.dtype == dtype
    D = shape[-1]
    x2, y2 = x.reshape(-1, D), y.reshape(-1, D)
    thr = layer.route_threshold
    w_in, b_in, w_out = params(layer, dtype)
    with torch.no_grad():
        y_kernel, paths = ti.tree_infer(x2, w_in, b_in, w_out, depth, "gelu", placement, return_paths=True,
                                        backend="cpp", thr=thr)
        y_torch, _ = ti.tree_infer_torch(x2, w_in, b_in, w_out, depth, "gelu", placement, thr=thr)
    assert torch.equal(y2, y_kernel)
    xf, wf, vf = x2.float(), w_in.float(), w_out.float()
    bf = b_in.float() if b_in is not None else None
    tf = thr.float() if thr is not None else None
    assert_paths_agree(paths, xf, wf, bf, depth, max_frac=0.0 if dtype == torch.float32 else 0.01, thr=tf)
    y_ref = tree_reference(xf, wf, bf, vf, depth, "gelu", placement, paths=paths)
    if dtype == torch.float32:
        torch.testing.assert_close(y2, y_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y2, y_torch, rtol=1e-4, atol=1e-5)
    else:
        assert_bf16_rounding(y2, y_ref, term_magnitude(xf, wf, bf, vf, depth, paths))


def test_module_takes_the_general_path_when_the_fast_one_does_not_apply(ext, monkeypatch):
    """Training mode, autograd, track_stats, an explicit non-fused impl, a dtype the kernel lacks and a missing
    extension all leave the fast path; each still computes the layer."""
    layer = make_fast_layer((4, 40), 2, 3, 1, "node", True, True, torch.float32, seed=5)
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected, _ = layer(x)
    ref = tree_reference(x, layer.w_in, layer.b_in, layer.w_out, 3, thr=layer.route_threshold)
    torch.testing.assert_close(expected, ref, rtol=1e-4, atol=1e-5)
    entered = []
    real = TreeFFN.forward_2d
    monkeypatch.setattr(TreeFFN, "forward_2d", lambda self, *a, **k: entered.append(1) or real(self, *a, **k))

    def general(**settings):
        entered.clear()
        for key, value in settings.items():
            setattr(layer, key, value)
        try:
            with torch.no_grad():
                y, aux = layer(x)
        finally:
            layer.train(False)
            layer.impl, layer.track_stats = "auto", False
        assert entered, f"{settings}: expected the general path"
        return y, aux

    y, _ = general(training=True)  # under no_grad: no batch statistics, the stored thresholds route
    assert torch.equal(y, expected)
    y, aux = general(track_stats=True)  # the training kernel, which returns the responses the statistics need
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    assert int(aux["tree_visits"].sum()) == 4 * 2 * 4
    y, _ = general(impl="reference")
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    entered.clear()
    y, _ = layer(x)  # autograd on: the training path, with gradients
    assert entered and y.requires_grad
    torch.testing.assert_close(y.detach(), expected, rtol=1e-4, atol=1e-5)
    double = make_fast_layer((4, 40), 2, 3, 1, "node", True, True, torch.float64, seed=5)
    entered.clear()
    with torch.no_grad():
        y, _ = double(x.double())  # the kernel has no float64: try_infer declines, the PyTorch walk runs
    assert entered and y.dtype == torch.float64
    torch.testing.assert_close(y.float(), expected, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(ti, "_ext", None)  # no compiler: the PyTorch walk
    monkeypatch.setattr(ti, "_ext_tried", True)
    entered.clear()
    layer = make_fast_layer((4, 40), 2, 3, 1, "node", True, True, torch.float32, seed=5)
    with torch.no_grad():
        y, _ = layer(x)
    assert entered
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_module_fast_path_follows_every_change_to_the_layer(ext, monkeypatch):
    """The fast path's cached arguments never go stale: after hooks (the layer's own and global ones, added and
    removed), a parameter replaced or loaded with assign, weights changed in place, a dtype conversion, a deep copy and
    a pickle round trip, layer(x) equals the reference on the layer's current weights, and hooks run."""
    import copy
    import io

    from torch.nn.modules.module import register_module_forward_hook

    layer = make_fast_layer((3, 40), 2, 3, 1, "node", True, True, torch.float32, seed=11)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))

    def check(module):
        with torch.no_grad():
            y, aux = module(x)
            ref = tree_reference(x, module.w_in, module.b_in, module.w_out, 3, thr=module.route_threshold)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
        return y, aux

    before, _ = check(layer)
    assert layer._infer is not None  # built by the first call
    seen = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append("post"))
    pre = layer.register_forward_pre_hook(lambda m, a: (a[0] * 2.0,))
    with torch.no_grad():
        y, _ = layer(x)
        doubled, _ = layer.forward(x * 2.0)
    assert seen == ["post"] and torch.equal(y, doubled)
    handle.remove(), pre.remove()
    assert torch.equal(check(layer)[0], before) and seen == ["post"]
    glob = register_module_forward_hook(lambda m, a, out: seen.append("global"))
    try:
        check(layer)
    finally:
        glob.remove()
    assert seen == ["post", "global"]
    layer.w_out = nn.Parameter(torch.randn_like(layer.w_out))  # a new parameter object
    changed, _ = check(layer)
    assert not torch.allclose(changed, before)
    state = {k: torch.randn_like(v) if k != "route_batches" else v for k, v in layer.state_dict().items()}
    layer.load_state_dict(state, assign=True)
    check(layer)
    with torch.no_grad():
        layer.w_in.mul_(-1.0)  # in place: the same tensors, new values
    check(layer)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.w_out.zero_()
    assert torch.count_nonzero(check(twin)[0]) == 0 and torch.count_nonzero(check(layer)[0]) > 0
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    check(torch.load(buf, weights_only=False))  # the test's own object, not an untrusted file
    layer.to(torch.bfloat16)
    with torch.no_grad():
        y, _ = layer(x.bfloat16())
        direct, _ = ti.tree_infer(x.bfloat16(), layer.w_in, layer.b_in, layer.w_out, 3, "gelu", "node",
                                  backend="cpp", thr=layer.route_threshold)
    assert y.dtype == torch.bfloat16 and torch.equal(y, direct)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_torch_walk_on_cuda():
    layer = make_layer(64, 4, 5, 2, seed=1)
    w_in, b_in, w_out = params(layer)
    x = torch.randn(100, 64)
    with torch.inference_mode():
        y, paths = ti.tree_infer(x.cuda(), w_in.cuda(), b_in.cuda(), w_out.cuda(), 5, return_paths=True)
    assert y.device.type == "cuda"
    assert_paths_agree(paths.cpu(), x, w_in, b_in, 5, max_frac=0.01)
    torch.testing.assert_close(y.cpu(), tree_reference(x, w_in, b_in, w_out, 5, paths=paths.cpu()),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 300])
def test_read_rows_reads_the_given_nodes(ext, M, dtype):
    """The memory floor of `bench layer` reads exactly the input and output rows of the nodes it is given: its sum
    is theirs, on one thread (a few nodes) and on several (hundreds), whatever the prefetch distance."""
    K, depth, W, D = 3, 6, 2, 24
    w_in = torch.randn(K, 2 ** (depth + 1) - 1, W, D).to(dtype)
    w_out = torch.randn_like(w_in)
    g = torch.Generator().manual_seed(M)
    nodes = torch.randint(0, w_in.shape[0] * w_in.shape[1], (M,), generator=g).unique()
    rows = lambda w: w.float().reshape(K * w.shape[1], W * D)[nodes]  # noqa: E731
    want = (rows(w_in).sum() + rows(w_out).sum()).item()
    for ahead in (0, 1, 16, 10_000):
        assert ext.read_rows(w_in, w_out, nodes, ahead) == pytest.approx(want, rel=1e-4, abs=1e-3)
    with pytest.raises(RuntimeError, match="out of range"):
        ext.read_rows(w_in, w_out, torch.tensor([K * w_in.shape[1]]))
    with pytest.raises(RuntimeError, match="int64"):
        ext.read_rows(w_in, w_out, nodes.int())


def test_bench_layer_floor_reads_the_nodes_the_kernel_visits(ext):
    from treeffn.bench.layer import build_layer, visited_nodes

    tree = build_layer("tree", 32, 2, 4)
    x = torch.randn(5, 32)
    K, N = tree.w_in.shape[:2]
    paths = tree_paths(x, *params(tree)[:2], 4)  # (M, K, L) from the PyTorch reference
    want = sorted({k * N + j for m in range(5) for k in range(K) for j in paths[m, k].tolist()})
    assert visited_nodes(tree, x).tolist() == want


def test_bench_layer_smoke(capsys):
    from treeffn.bench.common import check_record
    from treeffn.bench.layer import main

    rc = main(["--configs", "1x3,2x2", "--batches", "1,5", "--repeats", "3", "--budget-s", "0.2", "--d-model", "32",
               "--skip-fff", "--llc-mb", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    data = json.loads(out.strip().splitlines()[-1])
    check_record(data, "layer")  # the JSON line schema shared by every benchmark (bench/common.py)
    s = data["settings"]
    assert s["d_model"] == 32 and s["dtype"] == "fp32" and s["moe"]["experts"] == 16 and s["moe"]["top_k"] == 1
    assert s["cache"] == ["warm", "cold"] and s["paths"] == ["module", "kernel"] and s["grad_mode"] == "no_grad"
    assert s["llc_bytes"] == 2**20 and s["eviction_bytes"] == 2 * 2**20
    # the tree through TreeFFN (whose inference runs the C++ kernel when it builds) and through each kernel;
    # the baselines through their modules
    tree_module = "tree-cpp" if ti.extension() else "tree-torch"
    expected = {(tree_module, "module"), ("tree-torch", "kernel"), ("dense-train", "module"),
                ("dense-infer", "module"), ("moe-top1", "module")} | ({("tree-cpp", "kernel"), ("read-floor", "kernel")}
                                                                     if ti.extension() else set())
    rows = {}
    for r in data["results"]:
        c = r["case"]
        assert list(c) == ["config", "K", "depth", "batch", "cache", "path"]
        rows.setdefault((c["config"], c["batch"], c["cache"]), {})[r["impl"], c["path"]] = r
    assert sorted(rows) == [(c, b, cache) for c in ("1x3", "2x2") for b in (1, 5) for cache in ("cold", "warm")]
    for (config, batch, cache), by_impl in rows.items():
        assert set(by_impl) == expected, (config, batch, cache, set(by_impl))
        K, depth = map(int, config.split("x"))
        dense = by_impl["dense-train", "module"]["time_s"]["median"]  # the baseline in the same cache state
        for r in by_impl.values():
            assert (r["case"]["K"], r["case"]["depth"]) == (K, depth)
            m, t = r["metrics"], r["time_s"]
            # the ideal speed-up is total over visited units; each ratio is the dense-train time over this one's
            assert m["ideal"] == pytest.approx((2 ** (depth + 1) - 1) / (depth + 1), abs=0.01)
            assert 0 < t["min"] <= t["median"] and t["n"] >= 3  # never fewer than 3 timed calls
            assert m["ratio_vs_dense_train"] == pytest.approx(dense / t["median"], rel=0.01, abs=0.01)
            # a 1 MiB cache: a tiny layer is rotated through the most copies; warm runs use one
            assert m["copies"] == (64 if cache == "cold" else 1)
        assert by_impl["dense-train", "module"]["metrics"]["ratio_vs_dense_train"] == 1.0
