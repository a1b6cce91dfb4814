"""Routing balance of tree layers (tree.balance="threshold"): per-node thresholds move only the routing decision.

Checks: every implementation routes on s > c identically and agrees with the reference in value and gradient;
the thresholds receive no gradient; batch statistics split aligned inputs evenly where the faithful layer sends
them all one way; the running buffer changes in training only and is what evaluation routes with; checkpoints
written before the option existed still load and route as before.
"""

from __future__ import annotations

import pytest
import torch

from treeffn import checkpoint as ckpt
from treeffn.config import get_config
from treeffn.errors import ConfigError
from treeffn.kernels.tree_infer import extension as infer_ext
from treeffn.kernels.tree_infer import tree_infer
from treeffn.kernels.tree_train import extension as train_ext
from treeffn.kernels.tree_train import tree_train
from treeffn.layers.tree import TreeFFN, batch_thresholds, tree_paths, tree_reference
from treeffn.model import GPT

TRAIN_IMPLS = ["torch"] + (["cpp"] if train_ext() is not None else [])
INFER_IMPLS = ["torch"] + (["cpp"] if infer_ext() is not None else [])


def _weights(K=3, depth=4, W=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = 2 ** (depth + 1) - 1
    w_in = torch.randn(K, N, W, D, generator=g) * 0.3
    b_in = torch.randn(K, N, W, generator=g) * 0.1
    w_out = torch.randn(K, N, W, D, generator=g) * 0.3
    thr = torch.randn(K, N, generator=g) * 1.5
    x = torch.randn(64, D, generator=g) + 1.0
    return x, w_in, b_in, w_out, thr, depth


@pytest.mark.parametrize("placement", ["node", "output"])
@pytest.mark.parametrize("impl", TRAIN_IMPLS)
def test_train_path_with_thresholds_matches_reference(impl, placement):
    x, w_in, b_in, w_out, thr, depth = _weights()
    ref_paths = tree_paths(x, w_in, b_in, depth, thr)
    assert not torch.equal(ref_paths, tree_paths(x, w_in, b_in, depth)), "thresholds should change some routes"
    leaves = [p.requires_grad_() for p in (x.clone(), w_in.clone(), b_in.clone(), w_out.clone())]
    y_ref = tree_reference(*leaves[:3], leaves[3], depth, "gelu", placement, thr=thr)
    y_ref.square().sum().backward()
    grads_ref = [p.grad for p in leaves]
    ours = [p.detach().clone().requires_grad_() for p in leaves]
    y, paths, lam = tree_train(*ours, depth, "gelu", placement, backend=impl, thr=thr, return_lam=True)
    assert torch.equal(paths, ref_paths), f"{impl}: routing with thresholds differs from tree_paths"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    for name, a, b in zip(("x", "w_in", "b_in", "w_out"), (p.grad for p in ours), grads_ref):
        scale = float(b.abs().max())  # fp32 sums of a few hundred terms of this size
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale, msg=f"{impl}: gradient of {name} differs")
    # λ at the visited nodes: the responses the routing compared with the thresholds
    s = lam.sum(-1)
    cut = thr[torch.arange(3).view(1, 3, 1), paths]
    went_right = paths[:, :, 1:] == 2 * paths[:, :, :-1] + 2
    assert torch.equal(went_right, s[:, :, :-1] > cut[:, :, :-1])


@pytest.mark.parametrize("placement", ["node", "output"])
@pytest.mark.parametrize("impl", INFER_IMPLS)
@pytest.mark.parametrize("M", [1, 64])
def test_inference_with_thresholds_matches_reference(impl, placement, M):
    x, w_in, b_in, w_out, thr, depth = _weights()
    x = x[:M]
    y_ref = tree_reference(x, w_in, b_in, w_out, depth, "gelu", placement, thr=thr)
    with torch.no_grad():
        y, paths = tree_infer(x, w_in, b_in, w_out, depth, "gelu", placement, return_paths=True, backend=impl, thr=thr)
    assert torch.equal(paths, tree_paths(x, w_in, b_in, depth, thr))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def _aligned_inputs(M=512, D=32, seed=1):
    """The early-training regime: every token is one shared direction plus a small token-specific part."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(D, generator=g)
    return shared * 3.0 + 0.05 * torch.randn(M, D, generator=g)


def test_batch_thresholds_split_aligned_inputs_evenly():
    torch.manual_seed(0)
    x = _aligned_inputs()
    faithful = TreeFFN(32, trees=2, depth=5, balance="none").train()
    balanced = TreeFFN(32, trees=2, depth=5, balance="threshold").train()
    balanced.load_state_dict(faithful.state_dict(), strict=False)
    p_none = tree_paths(x, faithful.w_in, faithful.b_in, 5)
    thr, seen = batch_thresholds(x, balanced.w_in, balanced.b_in, 5, balanced.route_threshold)
    p_bal = tree_paths(x, balanced.w_in, balanced.b_in, 5, thr)
    tree_offset = torch.arange(2).view(1, 2) * 63
    leaves_none = torch.unique(p_none[:, :, -1] + tree_offset).numel()  # distinct (tree, leaf) pairs
    leaves_bal = torch.unique(p_bal[:, :, -1] + tree_offset).numel()
    assert leaves_none <= 8, "aligned inputs should collapse the faithful tree onto few paths"
    assert leaves_bal == 2 * 32, f"balanced routing should reach every leaf of both trees, got {leaves_bal}"
    right = (p_bal[:, :, 1] == 2).double().mean()
    assert abs(float(right) - 0.5) < 0.1, "the root should split its tokens around their mean"
    assert bool(seen[:, :31].all()) and not bool(seen[:, 31:].any()), "every inner node, and no leaf, is set"


def test_thresholds_get_no_gradient_and_update_in_training_only():
    torch.manual_seed(0)
    layer = TreeFFN(32, trees=2, depth=4, balance="threshold", balance_rate=0.5)
    assert "route_threshold" in dict(layer.named_buffers())
    assert all(n != "route_threshold" for n, _ in layer.named_parameters())
    x = _aligned_inputs(M=256).requires_grad_()
    layer.train()
    y, _ = layer(x)
    y.sum().backward()
    c1 = layer.route_threshold.clone()
    assert c1[:, :15].abs().min() > 0, "training should move every inner node's running threshold"
    thr, _ = batch_thresholds(x.detach(), layer.w_in, layer.b_in, 4, torch.zeros_like(c1))
    torch.testing.assert_close(c1[:, :15], thr[:, :15], msg="first batch: the running threshold is its mean")
    x2 = _aligned_inputs(M=256, seed=2)
    thr2, _ = batch_thresholds(x2, layer.w_in, layer.b_in, 4, c1)
    layer(x2)
    torch.testing.assert_close(layer.route_threshold[:, :15], c1[:, :15] + 0.5 * (thr2[:, :15] - c1[:, :15]),
                               msg="later batches: c += max(rate, 1/n)·(batch mean − c)")
    assert float(layer.route_batches) == 2
    c1 = layer.route_threshold.clone()
    layer.eval()
    with torch.no_grad():
        y_eval, _ = layer(x.detach())
    assert torch.equal(layer.route_threshold, c1), "evaluation must not change the thresholds"
    y_ref = tree_reference(x.detach(), layer.w_in, layer.b_in, layer.w_out, 4, thr=c1)
    torch.testing.assert_close(y_eval, y_ref, rtol=1e-5, atol=1e-5, msg="evaluation routes with the running buffer")


def test_training_forward_routes_with_the_batch_thresholds():
    torch.manual_seed(0)
    layer = TreeFFN(32, trees=2, depth=4, balance="threshold", impl="reference").train()
    x = _aligned_inputs(M=128)
    thr, _ = batch_thresholds(x, layer.w_in, layer.b_in, 4, layer.route_threshold)
    y, _ = layer(x.requires_grad_())
    y_ref = tree_reference(x.detach(), layer.w_in.detach(), layer.b_in.detach(), layer.w_out.detach(), 4, thr=thr)
    torch.testing.assert_close(y.detach(), y_ref)
    sparse = TreeFFN(32, trees=2, depth=4, balance="threshold", impl="sparse").train()
    sparse.load_state_dict({**layer.state_dict(), "route_threshold": torch.zeros(2, 31),
                            "route_batches": torch.zeros((), dtype=torch.float64)})
    y2, _ = sparse(x)
    torch.testing.assert_close(y2.detach(), y_ref, rtol=1e-5, atol=1e-5)


def test_model_tracks_routing_diagnostics():
    cfg = get_config("debug", {"ffn.kind": "tree"})
    model = GPT(cfg).train()
    model.set_track_stats(True)
    out = model(torch.randint(0, 512, (2, 32)))
    d = out.stats[0]["tree_diag"]
    L = cfg.tree.depth + 1
    assert set(d) == {"align", "margin", "centre", "u_norm", "b_abs", "live_grad", "best_agree"}
    for k in ("u_norm", "b_abs", "live_grad"):
        assert d[k].shape == (L,), k
    for k in ("margin", "centre", "best_agree"):  # routing levels only: leaves do not route
        assert d[k].shape == (L - 1,), k
    assert -1.0 <= float(d["align"]) <= 1.0
    assert 0.0 <= float(d["live_grad"].min()) and float(d["live_grad"].max()) <= 1.0
    assert 0.0 <= float(d["best_agree"].min()) and float(d["best_agree"].max()) <= 1.0


def test_checkpoint_without_thresholds_still_loads(tmp_path):
    cfg = get_config("debug", {"ffn.kind": "tree"})
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    folder = ckpt.save_checkpoint_dir(tmp_path / "old", model)
    state = ckpt.load_tensors(folder / "model.safetensors")
    old = {k: v for k, v in state.items() if not k.endswith(("route_threshold", "route_batches"))}
    assert len(old) < len(state)
    from safetensors.torch import save_file

    save_file(old, str(folder / "model.safetensors"))
    loaded = ckpt.load_model(folder)
    for f in loaded.ffn_modules():
        assert torch.equal(f.route_threshold, torch.zeros_like(f.route_threshold))
        assert float(f.route_batches) == 0, "an old model's running thresholds start afresh"
    faithful = GPT(get_config("debug", {"ffn.kind": "tree", "tree.balance": "none"})).eval()
    faithful.load_state_dict(old, strict=False)  # lm_head is tied to the embedding
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, faithful(idx).logits)


def test_bad_balance_settings_are_config_errors():
    with pytest.raises(ConfigError, match="tree.balance"):
        get_config("debug", {"ffn.kind": "tree", "tree.balance": "median"})
    with pytest.raises(ConfigError, match="tree.balance_rate"):
        get_config("debug", {"ffn.kind": "tree", "tree.balance_rate": 0})


def _min_entropy_after(run, step):
    import json

    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return min(v for r in recs if r.get("step", 0) > step for k, v in r.items() if k.startswith("tree/path_entropy/"))


def test_default_tree_does_not_collapse_where_the_faithful_one_does(tmp_path, sample_data):
    """The early-training collapse, reproduced in seconds: the faithful layer puts (nearly) every token of a layer on
    one path by step ~20; the default setting (routing thresholds) keeps path entropy high throughout."""
    from treeffn.train import train

    entropy = {}
    for balance in ("none", "threshold"):
        cfg = get_config("debug", {"ffn.kind": "tree", "tree.balance": balance, "train.max_steps": 30,
                                   "train.stats_every": 2, "train.log_every": 2, "train.eval_every": 30})
        train(cfg, tmp_path / balance, sample_data, progress=False, tensorboard=False)
        entropy[balance] = _min_entropy_after(tmp_path / balance, 10)
    assert get_config("debug", {"ffn.kind": "tree"}).tree.balance == "threshold", "the default must be balanced"
    assert entropy["none"] < 0.3, f"the faithful layer no longer collapses here ({entropy['none']:.3f}): the " \
                                  "regression check below has lost its contrast"
    assert entropy["threshold"] > 0.8, f"default tree collapsed: path entropy {entropy['threshold']:.3f} after step 10"


def test_thresholds_saved_without_their_batch_count_are_kept(tmp_path):
    cfg = get_config("debug", {"ffn.kind": "tree"})
    model = GPT(cfg)
    for f in model.ffn_modules():
        f.route_threshold.normal_()
    folder = ckpt.save_checkpoint_dir(tmp_path / "ck", model)
    state = ckpt.load_tensors(folder / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if not k.endswith("route_batches")}, str(folder / "model.safetensors"))
    loaded = ckpt.load_model(folder)
    for a, b in zip(loaded.ffn_modules(), model.ffn_modules()):
        assert torch.equal(a.route_threshold, b.route_threshold)
        assert float(a.route_batches) >= 1e6, "settled thresholds must not be reset by the 1/n warm-up"


def test_output_init_matches_the_residual_branches_unless_ufb_is_asked():
    """tree.init=residual (default): output vectors start at GPT-2's residual-branch scale, like the dense MLP's
    projection; tree.init=ufb: UFB-23's uniform ±1/√(K·L·W)."""
    torch.manual_seed(0)
    cfg = get_config("tiny", {"ffn.kind": "tree"})
    model = GPT(cfg).requires_grad_(False)
    want = 0.02 / (2 * cfg.model.n_layer) ** 0.5
    for f in model.ffn_modules():
        assert abs(float(f.w_out.std()) - want) < 0.05 * want
    dense = GPT(get_config("tiny", {"ffn.kind": "dense"})).requires_grad_(False)
    assert abs(float(dense.ffn_modules()[0].fc_out.weight.std()) - want) < 0.05 * want, "the dense MLP's scale"
    ufb = GPT(get_config("tiny", {"ffn.kind": "tree", "tree.init": "ufb"})).requires_grad_(False)
    bound = 1 / (cfg.tree.trees * (cfg.tree.depth + 1)) ** 0.5
    w = ufb.ffn_modules()[0].w_out
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
    with pytest.raises(ConfigError, match="tree.init"):
        get_config("tiny", {"ffn.kind": "tree", "tree.init": "xavier"})


def test_bench_balance_smoke(capsys):
    import json

    from treeffn.bench.common import check_record
    from treeffn.cli import main

    assert main(["bench", "balance", "--d-model", "32", "--configs", "2x3,1x4", "--tokens", "64", "--repeats",
                 "1"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    check_record(rec, "balance")  # the JSON line schema shared by every benchmark (bench/common.py)
    assert [(r["case"]["config"], r["impl"]) for r in rec["results"]] == [
        (c, i) for c in ("2x3", "1x4") for i in ("dense", "tree-none", "tree-threshold")]
    for c in ("2x3", "1x4"):
        t = {r["impl"]: r for r in rec["results"] if r["case"]["config"] == c}
        med = {i: r["time_s"]["median"] for i, r in t.items()}
        assert t["tree-threshold"]["metrics"]["threshold_over_none"] == pytest.approx(
            med["tree-threshold"] / med["tree-none"], rel=0.01)
        assert t["tree-threshold"]["metrics"]["speedup_vs_dense"] == pytest.approx(
            med["dense"] / med["tree-threshold"], rel=0.01)
