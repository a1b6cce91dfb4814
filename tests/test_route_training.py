"""Training signals for the routing: the routing loss (tree.route_loss: best-path targets, the fast loss against its
autograd reference, the layer) and the straight-through routing gradient (tree.route_grad)."""

import itertools

import pytest
import torch

from treeffn.config import get_config
from treeffn.errors import ConfigError
from treeffn.layers.tree import TreeFFN
from treeffn.model import GPT
from treeffn.ops.tree import (best_path_targets, best_path_values, route_loss, route_loss_reference,
                              route_straight_through, route_straight_through_reference, tree_paths, tree_reference)


def _tree(K=2, depth=3, W=2, D=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    N = 2 ** (depth + 1) - 1
    w = torch.randn(K, N, W, D, generator=g, dtype=dtype)
    b = torch.randn(K, N, W, generator=g, dtype=dtype)
    v = torch.randn(K, N, W, D, generator=g, dtype=dtype)
    return w, b, v


@pytest.mark.parametrize("placement", ["node", "output"])
def test_best_path_values_against_enumeration(placement):
    depth, D = 3, 6
    w, b, v = _tree(depth=depth, D=D)
    x = torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = best_path_values(x, w, b, v, depth, "gelu", placement)
    act = torch.nn.functional.gelu if placement == "node" else (lambda z: z)
    for m, k in itertools.product(range(5), range(2)):
        lam = torch.einsum("nwd,d->nw", w[k], x[m]) + b[k]
        c = (act(lam).abs() * v[k].norm(dim=-1)).sum(-1)  # (N,)
        for j in range(2 ** (depth + 1) - 1):  # enumerate every path below j
            t0 = (j + 1).bit_length() - 1
            best = 0.0
            for turns in itertools.product((1, 2), repeat=depth - t0):
                node, total = j, float(c[j])
                for s in turns:
                    node = 2 * node + s
                    total += float(c[node])
                best = max(best, total)
            assert float(got[m, k, j]) == pytest.approx(best, rel=1e-4, abs=1e-6)  # fp32 sums


@pytest.mark.parametrize("bias,thr,W", [(True, True, 1), (True, False, 2), (False, True, 3)])
def test_route_loss_matches_its_autograd_reference(bias, thr, W):
    depth, D = 3, 6
    w, b, v = _tree(K=3, depth=depth, W=W, D=D)
    w.requires_grad_(True)
    b = b.requires_grad_(True) if bias else None
    x = torch.randn(40, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    c = torch.randn(3, 15, dtype=torch.float64) * 0.3 if thr else None
    paths = tree_paths(x, w, b, depth, c)
    target = best_path_targets(x, w, b, v, depth, "gelu", paths)
    assert target.shape == (40, 3, depth) and target.dtype == torch.bool
    params = [p for p in (w, b) if p is not None]
    got = route_loss(w, b, x, paths, c, target)
    want = route_loss_reference(w, b, x, paths, c, target)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    g1 = torch.autograd.grad(got, params)
    g2 = torch.autograd.grad(want, params)
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-8)
    # only the visited routing nodes receive gradient: never the leaves, nor nodes no token reached
    visited = torch.zeros(3, 15, dtype=torch.bool)
    for k in range(3):
        visited[k, paths[:, k, :depth].unique()] = True
    assert (g1[0].abs().sum((2, 3)) > 0).eq(visited).all()


def test_route_loss_descent_makes_decisions_follow_the_targets():
    torch.manual_seed(0)
    layer = TreeFFN(16, trees=2, depth=3, node_width=1).double()
    x = torch.randn(256, 16, dtype=torch.float64)
    with torch.no_grad():
        target = best_path_targets(x, layer.w_in, layer.b_in, layer.w_out, 3, "gelu", layer.paths(x))
    opt = torch.optim.SGD([layer.w_in, layer.b_in], lr=2.0)

    def root_agreement():  # every token is scored by the root, whose targets are held fixed here
        p = layer.paths(x)
        return ((p[:, :, 1] == 2) == target[:, :, 0]).double().mean().item()

    before = root_agreement()
    for _ in range(200):
        loss = route_loss(layer.w_in, layer.b_in, x, layer.paths(x)[:, :, :1], None, target[:, :, :1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = root_agreement()
    assert after > before + 0.15, (before, after)


def test_layer_adds_the_routing_loss_in_training_only():
    torch.manual_seed(0)
    layer = TreeFFN(16, trees=2, depth=3, balance="threshold", route_loss=0.5)
    x = torch.randn(2, 10, 16, requires_grad=True)
    layer.train()
    y, aux = layer(x)
    assert aux["loss"].dim() == 0 and aux["loss"].item() > 0
    # the routing loss trains the nodes' input weights and biases, never the residual stream or the outputs
    gx, gw, gb, gv = torch.autograd.grad(aux["loss"], (x, layer.w_in, layer.b_in, layer.w_out), allow_unused=True)
    assert gx is None and gv is None and gw.abs().sum() > 0 and gb.abs().sum() > 0
    # the layer's output is the one without the loss
    plain = TreeFFN(16, trees=2, depth=3, balance="threshold")
    plain.load_state_dict(layer.state_dict())
    plain.train()
    torch.testing.assert_close(plain(x)[0], y)
    layer.eval()
    with torch.no_grad():
        assert "loss" not in layer(x)[1]
    assert "loss" not in plain.train()(x)[1]


def test_model_config_key_and_errors():
    cfg = get_config("tiny", {"ffn.kind": "tree", "tree.route_loss": "0.1", "model.n_layer": "1",
                              "model.d_model": "32", "model.n_head": "2", "tree.depth": "2"})
    model = GPT(cfg)
    assert model.blocks[0].ffn.route_loss == pytest.approx(0.1)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    out = model(ids, targets=ids)
    assert out.aux_loss.item() > 0 and out.loss.item() == pytest.approx(out.lm_loss.item() + out.aux_loss.item())
    with pytest.raises(ConfigError, match="route_loss"):
        get_config("tiny", {"ffn.kind": "tree", "tree.route_loss": "-1"})
    with pytest.raises(ConfigError, match="route=self"):
        get_config("tiny", {"ffn.kind": "tree", "tree.route_loss": "0.1", "tree.route": "children"})
    assert get_config("tiny", {"ffn.kind": "tree"}).tree.route_loss == 0.0  # off by default


def test_best_paths_follow_the_better_subtree_and_route_the_model_in_analysis():
    from treeffn.analyze import BestPathRouting, best_path_loss
    from treeffn.data import Batches
    from treeffn.ops.tree import best_paths

    depth = 3
    w, b, v = _tree(depth=depth)
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    vals = best_path_values(x, w, b, v, depth, "gelu")
    p = best_paths(x, w, b, v, depth, "gelu")
    assert (p[:, :, 0] == 0).all()
    for t in range(depth):
        left, right = vals.gather(2, 2 * p[:, :, t:t + 1] + 1), vals.gather(2, 2 * p[:, :, t:t + 1] + 2)
        assert torch.equal(p[:, :, t + 1:t + 2], torch.where(right > left, 2 * p[:, :, t:t + 1] + 2,
                                                             2 * p[:, :, t:t + 1] + 1))
    # the walk's value is the root's best-path value
    lam = torch.einsum("knwd,md->mknw", w, x) + b
    c = (torch.nn.functional.gelu(lam).abs() * v.norm(dim=-1)).sum(-1)  # (M, K, N)
    torch.testing.assert_close(c.gather(2, p).sum(-1), vals[:, :, 0], rtol=1e-5, atol=1e-6, check_dtype=False)
    cfg = get_config("debug", {"ffn.kind": "tree"})
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    batches = Batches(torch.randint(0, cfg.model.vocab_size, (4096,)).numpy().astype("uint16"), cfg.model.seq_len,
                      cfg.model.vocab_size)
    with torch.no_grad():
        idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
        plain = model(idx).logits
        with BestPathRouting(model):
            oracle = model(idx).logits
        assert not torch.allclose(plain, oracle)  # another routing
        torch.testing.assert_close(model(idx).logits, plain)  # and the hooks are gone
    res = best_path_loss(model, batches, 4, 2, torch.device("cpu"))
    assert res["tokens"] == 4 * cfg.model.seq_len and res["loss"] != res["loss_best_paths"]


@pytest.mark.parametrize("route", ["self", "children"])
@pytest.mark.parametrize("bias,thr,W", [(True, True, 1), (True, False, 2), (False, True, 3)])
def test_straight_through_gradient_matches_its_autograd_reference(bias, thr, W, route):
    depth, D, M = 3, 8, 40
    w, b, v = _tree(K=3, depth=depth, W=W, D=D, seed=3)
    b = b if bias else None
    params = [p.requires_grad_(True) for p in (w, b, v) if p is not None]
    x = torch.randn(M, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    c = torch.randn(3, 15, dtype=torch.float64) * 0.3 if thr else None
    paths = tree_paths(x, w, b, depth, c, route=route)
    y = tree_reference(x, w, b, v, depth, "gelu", "node", paths)
    g = torch.randn(M, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = route_straight_through(y, w, b, v, x, paths, c, 0.7, "gelu", route)
    want = route_straight_through_reference(y, w, b, v, x, paths, c, 0.7, "gelu", route)
    torch.testing.assert_close(got, y)  # the forward pass is the identity
    torch.testing.assert_close(want, y)
    inputs = params + [x]
    g1 = torch.autograd.grad((got * g).sum(), inputs, retain_graph=True)
    g2 = torch.autograd.grad((want * g).sum(), inputs, retain_graph=True)
    g0 = torch.autograd.grad((y * g).sum(), inputs)
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)  # the fast path computes in fp32
    # it adds to the input weights (and biases) only: outputs and x get the plain gradient
    assert not torch.allclose(g1[0], g0[0])
    torch.testing.assert_close(g1[-1], g0[-1])
    torch.testing.assert_close(g1[len(params) - 1], g0[len(params) - 1])


@pytest.mark.parametrize("route", ["self", "children"])
def test_layer_straight_through_in_training_only_and_config(route):
    torch.manual_seed(0)
    kw = dict(trees=2, depth=3, balance="threshold", route=route)
    layer, plain = TreeFFN(16, route_grad=1.0, **kw), TreeFFN(16, **kw)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 10, 16)
    y1, _ = layer.train()(x)
    y0, _ = plain.train()(x)
    torch.testing.assert_close(y1, y0)
    g1 = torch.autograd.grad(y1.square().sum(), (layer.w_in, layer.w_out))
    g0 = torch.autograd.grad(y0.square().sum(), (plain.w_in, plain.w_out))
    assert not torch.allclose(g1[0], g0[0]) and torch.allclose(g1[1], g0[1])
    assert get_config("tiny", {"ffn.kind": "tree", "tree.route_grad": "1"}).tree.route_grad == 1.0
    both = get_config("tiny", {"ffn.kind": "tree", "tree.route_grad": "1", "tree.route": "children"}).tree
    assert (both.route, both.route_grad) == ("children", 1.0)
    for bad, match in (({"tree.route_grad": "-1"}, "route_grad"), ({"tree.route_grad": "1", "tree.placement": "output"},
                       "placement=node")):
        with pytest.raises(ConfigError, match=match):
            get_config("tiny", {"ffn.kind": "tree", **bad})
