"""Routing by children (tree.route="children"): a token goes to the child whose units respond more.

Checks: the reference routing is that rule (brute force over all nodes); the fused kernel and the PyTorch walk
route the same way and agree with the reference in value, with and without thresholds, at batch 1 and in blocks,
on one thread and several; the training path follows given paths and matches the reference in value and gradient;
the layer's training forward follows the batch-threshold walk; the option is a config key, the default leaves
routing as it was, and pruning and conversion (which route on a node's own units) refuse it.
"""

from __future__ import annotations

import pytest
import torch

from treeffn import cli
from treeffn.config import get_config
from treeffn.errors import ConfigError
from treeffn.kernels.tree_infer import extension as infer_ext
from treeffn.kernels.tree_infer import tree_infer
from treeffn.kernels.tree_train import extension as train_ext
from treeffn.kernels.tree_train import tree_train
from treeffn.layers.pruned_tree import PrunedTreeFFN
from treeffn.layers.tree import TreeFFN, batch_thresholds, tree_paths, tree_reference
from treeffn.model import build_model

TRAIN_IMPLS = ["torch"] + (["cpp"] if train_ext() is not None else [])
INFER_IMPLS = ["torch"] + (["cpp"] if infer_ext() is not None else [])


def _weights(K=3, depth=4, W=2, D=16, M=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = 2 ** (depth + 1) - 1
    w_in = torch.randn(K, N, W, D, generator=g) * 0.3
    b_in = torch.randn(K, N, W, generator=g) * 0.3
    w_out = torch.randn(K, N, W, D, generator=g) * 0.3
    thr = torch.randn(K, N, generator=g) * 0.5
    x = torch.randn(M, D, generator=g)
    return x, w_in, b_in, w_out, thr, depth


def _brute_paths(x, w_in, b_in, depth, thr):
    """Every node's summed response, then the walk: right iff Σ λ(right child) − Σ λ(left child) > thr."""
    s = (torch.einsum("md,knwd->mknw", x.double(), w_in.double()) + b_in.double()).sum(-1)  # (M, K, N)
    M, K = x.shape[0], w_in.shape[0]
    out = torch.zeros(M, K, depth + 1, dtype=torch.long)
    for m in range(M):
        for k in range(K):
            j = 0
            for t in range(depth):
                c = 2 * j + 1
                j = c + int(float(s[m, k, c + 1] - s[m, k, c]) > (float(thr[k, j]) if thr is not None else 0.0))
                out[m, k, t + 1] = j
    return out


@pytest.mark.parametrize("with_thr", [False, True])
def test_reference_routes_to_the_child_that_responds_more(with_thr):
    x, w_in, b_in, _, thr, depth = _weights()
    thr = thr if with_thr else None
    paths = tree_paths(x, w_in, b_in, depth, thr, route="children")
    assert torch.equal(paths, _brute_paths(x, w_in, b_in, depth, thr))
    assert not torch.equal(paths, tree_paths(x, w_in, b_in, depth, thr)), "the two rules should differ somewhere"
    # the batch-threshold walk takes the same paths under the thresholds it returns
    c, _, walked = batch_thresholds(x, w_in, b_in, depth, torch.zeros(w_in.shape[:2]), route="children",
                                    return_paths=True)
    assert torch.equal(walked, tree_paths(x, w_in, b_in, depth, c, route="children"))


@pytest.mark.parametrize("placement", ["node", "output"])
@pytest.mark.parametrize("impl", INFER_IMPLS)
@pytest.mark.parametrize("M,K", [(1, 3), (1, 1), (5, 8), (300, 2)])
def test_inference_routing_by_children_matches_reference(impl, placement, M, K):
    x, w_in, b_in, w_out, thr, depth = _weights(K=K, M=M, seed=M + K)
    ref = tree_paths(x, w_in, b_in, depth, thr, route="children")
    y_ref = tree_reference(x, w_in, b_in, w_out, depth, "gelu", placement, paths=ref)
    with torch.no_grad():
        y, paths = tree_infer(x, w_in, b_in, w_out, depth, "gelu", placement, return_paths=True, backend=impl,
                              thr=thr, route="children")
        y2, _ = tree_infer(x, w_in, b_in, w_out, depth, "gelu", placement, backend=impl, thr=thr,
                           route="children")
    assert torch.equal(paths, ref)
    assert torch.equal(y, y2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(infer_ext() is None, reason="the tree_infer C++ extension could not be built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_routing_by_children_does_not_depend_on_threads(dtype):
    """Serial (batch 1), tree-parallel (batch 2: 16 trees, enough work to wake the team) and token-parallel (40)
    schedules on two threads give the one-thread result bit for bit, and follow the reference's paths."""
    x, w_in, b_in, w_out, thr, depth = _weights(K=16, depth=6, W=1, D=256, M=40, seed=3)
    x, w_in, b_in, w_out = (t.to(dtype) for t in (x, w_in, b_in, w_out))
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append([tree_infer(x[:m], w_in, b_in, w_out, depth, thr=thr, route="children",
                                        backend="cpp", return_paths=True) for m in (1, 2, 40)])
    finally:
        torch.set_num_threads(before)
    for (y1, p1), (y2, p2) in zip(*outs):
        assert torch.equal(y1, y2) and torch.equal(p1, p2)
    y, paths = outs[0][-1]
    ref = tree_paths(x.float(), w_in.float(), b_in.float(), depth, thr, route="children")
    assert (paths != ref).any(-1).float().mean() <= (0.0 if dtype == torch.float32 else 0.02)


@pytest.mark.parametrize("placement", ["node", "output"])
@pytest.mark.parametrize("impl", TRAIN_IMPLS)
def test_train_path_follows_given_paths(impl, placement):
    x, w_in, b_in, w_out, thr, depth = _weights()
    given = tree_paths(x, w_in, b_in, depth, thr, route="children")
    leaves = [p.clone().requires_grad_() for p in (x, w_in, b_in, w_out)]
    y_ref = tree_reference(*leaves, depth, "gelu", placement, paths=given)
    y_ref.square().sum().backward()
    ours = [p.detach().clone().requires_grad_() for p in leaves]
    # thresholds passed as well: given paths take precedence over any routing rule
    y, paths = tree_train(*ours, depth, "gelu", placement, backend=impl, thr=thr, paths=given)
    assert torch.equal(paths, given)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    for name, a, b in zip(("x", "w_in", "b_in", "w_out"), (p.grad for p in ours), (p.grad for p in leaves)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()), msg=f"gradient of {name}")


def test_train_path_rejects_paths_that_are_not_walks():
    x, w_in, b_in, w_out, thr, depth = _weights()
    bad = tree_paths(x, w_in, b_in, depth)
    with pytest.raises(ConfigError, match="given paths"):
        tree_train(x, w_in, b_in, w_out, depth, paths=bad[:, :, :-1])
    if train_ext() is not None:
        bad[0, 0, 2] = 0  # not a child of level 1's node
        with pytest.raises(RuntimeError, match="child at every level"):
            tree_train(x, w_in, b_in, w_out, depth, backend="cpp", paths=bad)


@pytest.mark.parametrize("balance", ["threshold", "none"])
def test_layer_trains_and_infers_with_routing_by_children(balance):
    torch.manual_seed(0)
    layer = TreeFFN(16, trees=3, depth=4, node_width=2, balance=balance, route="children").train()
    x = torch.randn(128, 16) + 0.5
    if balance == "threshold":
        _, _, given = batch_thresholds(x, layer.w_in, layer.b_in, 4, layer.route_threshold, route="children",
                                       return_paths=True)
    else:
        given = tree_paths(x, layer.w_in, layer.b_in, 4, route="children")
    layer.track_stats = True
    y, aux = layer(x.requires_grad_())
    y_ref = tree_reference(x.detach(), layer.w_in.detach(), layer.b_in.detach(), layer.w_out.detach(), 4,
                           paths=given)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-5, atol=1e-5)
    assert set(aux) == {"tree_visits", "tree_diag"} and aux["tree_diag"]["margin"].shape == (4,)
    y.sum().backward()
    assert layer.w_in.grad is not None and float(layer.w_in.grad.abs().sum()) > 0
    layer.track_stats = False
    layer.eval()
    x2 = torch.randn(7, 16)
    with torch.no_grad():  # the module's fast path (one C++ call) routes by children too
        for n in (1, 7):
            y_eval, _ = layer(x2[:n])
            ref = tree_reference(x2[:n], layer.w_in, layer.b_in, layer.w_out, 4, thr=layer.route_threshold,
                                 paths=layer.paths(x2[:n]))
            torch.testing.assert_close(y_eval, ref, rtol=1e-5, atol=1e-5)


def test_route_is_a_config_key_and_self_is_the_default():
    assert get_config("tiny", {"ffn.kind": "tree"}).tree.route == "self"
    cfg = get_config("debug", {"ffn.kind": "tree", "tree.route": "children"})
    model = build_model(cfg)
    assert all(m.route == "children" for m in model.modules() if isinstance(m, TreeFFN))
    with pytest.raises(ConfigError, match="tree.route"):
        get_config("debug", {"ffn.kind": "tree", "tree.route": "sideways"})


def test_prune_and_convert_refuse_routing_by_children(tmp_path):
    from treeffn.checkpoint import save_checkpoint_dir

    layer = TreeFFN(16, trees=2, depth=3, route="children")
    with pytest.raises(ConfigError, match="tree.route=children"):
        PrunedTreeFFN.from_tree(layer, torch.ones(2, 15, dtype=torch.bool))
    src = save_checkpoint_dir(tmp_path / "d", build_model("debug", {"ffn.kind": "swiglu"}))
    out = tmp_path / "o"
    assert cli.main(["convert", str(src), "--set", "tree.route=children", "--out", str(out), "--quiet"]) == 2
    assert not out.exists()


def test_cost_accounting_counts_the_compared_siblings():
    self_route = TreeFFN(16, trees=3, depth=4, node_width=2)
    children = TreeFFN(16, trees=3, depth=4, node_width=2, route="children")
    assert self_route.input_units() == self_route.active_units() == children.active_units() == 3 * 5 * 2
    assert children.input_units() == 3 * (1 + 2 * 4) * 2
    assert self_route.flops_per_token() == 4 * 30 * 16
    assert children.flops_per_token() == 2 * (54 + 30) * 16
    # one token: every visited node's two rows, and with children also the visited nodes' siblings' input rows
    row = 2 * 16 * 4  # a node's W·D input (or output) floats of 4 bytes
    assert self_route.weight_bytes_read(1) == 3 * (5 + 5) * row
    assert children.weight_bytes_read(1) == 3 * (9 + 5) * row


def test_bench_layer_times_routing_by_children(capsys):
    import json

    from treeffn.bench.layer import build_layer, main

    assert build_layer("tree", 32, 2, 3, route="children").route == "children"
    assert main(["--configs", "2x3", "--batches", "1,4", "--repeats", "3", "--budget-s", "0.1", "--d-model", "32",
                 "--skip-fff", "--llc-mb", "1", "--cache", "warm", "--impls", "tree-cpp,tree-torch,dense-train",
                 "--route", "children"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["settings"]["route"] == "children"
