"""treeffn analyze / treeffn prune: statistics, plots, the pruned layer's exactness and the pruned checkpoint."""

import json

import pytest
import torch

from treeffn import checkpoint as ckpt
from treeffn.analyze import analyze, choice_quality, collect_visits, open_split, random_walks, union_touched
from treeffn.cli import main
from treeffn.config import get_config
from treeffn.kernels.tree_infer import tree_infer_torch
from treeffn.layers.pruned_tree import PrunedTreeFFN
from treeffn.layers.tree import TreeFFN
from treeffn.prune import prune
from treeffn.stats import union_sparsity
from treeffn.train import train

WINDOWS = 8  # 8 windows of 64 tokens of the sample's validation split


@pytest.fixture(scope="module")
def tree_run(tmp_path_factory, sample_data):
    """A debug tree model trained a few steps, logging tree statistics at every step."""
    run = tmp_path_factory.mktemp("analyze") / "run"
    cfg = get_config("debug", {"ffn.kind": "tree", "train.max_steps": 6, "train.eval_every": 6, "train.log_every": 2,
                               "train.stats_every": 1, "train.eval_batches": 1, "train.batch_size": 4})
    train(cfg, run, sample_data, progress=False, tensorboard=False)
    return run


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, sample_data):
    from treeffn.model import build_model

    folder = tmp_path_factory.mktemp("dense") / "ckpt"
    model = build_model("debug", {"ffn.kind": "dense"})
    ckpt.save_checkpoint_dir(folder, model, {"data.json": {"data_dir": str(sample_data)}})
    return folder


def _one_line_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_analyze_cli_writes_json_and_plots(tree_run, tmp_path, capsys):
    out = tmp_path / "an"
    assert main(["analyze", str(tree_run), "--windows", str(WINDOWS), "--chunk", "8,32,128", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "leaf_util" in printed and "level utilisation" in printed
    res = json.loads((out / "analysis.json").read_text())
    for key in ("checkpoint", "tokens", "windows", "chunks", "mean", "layers", "plots", "training"):
        assert key in res, key
    assert res["tokens"] == WINDOWS * 64 and len(res["layers"]) == 2
    for r in res["layers"]:
        for k in ("leaf_util", "dead_nodes", "path_entropy", "active_fraction", "alive_fraction"):
            assert 0.0 <= r[k] <= 1.0, (k, r[k])
        assert len(r["level_util"]) == 6 and r["level_util"][0] == 1.0  # the root sees every token
        assert all(0.0 <= v <= 1.0 for v in r["level_util"])
        assert 0.0 < r["union_sparsity"]["8"] <= r["union_sparsity"]["32"] <= 1.0
        assert r["union_sparsity"]["128"] is None  # longer than a 64-token window
        visits = torch.tensor(r["visits"])
        assert visits.shape == (4, 63) and (visits[:, 0] == res["tokens"]).all()
        assert r["active_fraction"] == pytest.approx(6 / 63)
        for k in ("choice_overlap", "choice_capture", "choice_overlap_random", "choice_capture_random", "best_agree"):
            assert 0.0 < r[k] <= 1.0, (k, r[k])
    assert "choice of units" in printed
    assert (out / "levels.png").stat().st_size > 1000 and (out / "training.png").stat().st_size > 1000


@pytest.mark.parametrize("placement", ["node", "output"])
def test_choice_quality_against_a_brute_force_top_k(placement):
    torch.manual_seed(0)
    layer = TreeFFN(8, trees=2, depth=2, node_width=2, placement=placement)
    layer.requires_grad_(False)
    x = torch.randn(20, 8)
    paths = layer.paths(x)
    got = choice_quality(layer, x, paths)
    act = torch.nn.functional.gelu if placement == "node" else (lambda z: z)
    overlap = capture = agree = 0.0
    for m in range(20):
        c = {}
        for k in range(2):
            for j in range(7):
                for w in range(2):
                    lam = float(layer.w_in[k, j, w] @ x[m] + layer.b_in[k, j, w])
                    c[(k, j, w)] = abs(float(act(torch.tensor(lam)))) * float(layer.w_out[k, j, w].norm())
        used = {(k, int(paths[m, k, t]), w) for k in range(2) for t in range(3) for w in range(2)}
        best = sorted(c, key=c.get, reverse=True)[:12]
        overlap += len(used & set(best)) / 12
        capture += sum(c[u] for u in used) / sum(c[b] for b in best)

        def value(k, j):  # the best path's contribution below node j, by enumeration
            own = sum(c[(k, j, w)] for w in range(2))
            return own if j >= 3 else own + max(value(k, 2 * j + 1), value(k, 2 * j + 2))

        for k in range(2):
            for t in range(2):
                j = int(paths[m, k, t])
                agree += ((int(paths[m, k, t + 1]) == 2 * j + 2) == (value(k, 2 * j + 2) > value(k, 2 * j + 1))) / 4
    torch.testing.assert_close(got, torch.tensor([overlap, capture, agree], dtype=torch.float64), rtol=1e-5,
                               atol=1e-6)
    # depth 0: every unit is on the path, the choice is perfect
    dense = TreeFFN(8, trees=3, depth=0, node_width=2, placement=placement)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(choice_quality(dense, x, dense.paths(x), g), torch.full((5,), 20.0, dtype=torch.float64))
    # random walks: the second pair is the first pair computed on those walks
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    walks = random_walks(20, 2, 2, g1)
    assert ((walks[:, :, 1:] - 2 * walks[:, :, :-1]) >= 1).all() and ((walks[:, :, 1:] - 2 * walks[:, :, :-1]) <= 2).all()
    torch.testing.assert_close(choice_quality(layer, x, paths, g2)[2:4], choice_quality(layer, x, walks)[:2])


def test_union_touched_agrees_with_stats():
    paths = torch.randint(0, 15, (3, 64, 2, 4))  # (windows, T, K, L) of a depth-3 tree: values are node ids
    for chunk in (4, 16):
        s, n = union_touched(paths, 15, chunk)
        per_window = [union_sparsity(paths[b], 15, chunk) for b in range(3)]
        assert s / (n * 2 * 15) == pytest.approx(sum(per_window) / 3)


@pytest.mark.parametrize("placement", ["node", "output"])
@pytest.mark.parametrize("rule", ["sibling", "stop"])
def test_pruned_layer_is_exact_on_surviving_paths(placement, rule):
    torch.manual_seed(0)
    tree = TreeFFN(32, 3, 4, node_width=2, activation="gelu", placement=placement)
    x = torch.randn(400, 32)
    keep = torch.ones(3, 31, dtype=torch.bool)
    keep[0, 5] = keep[1, 4] = keep[2, 30] = False  # two subtrees and one leaf
    with torch.no_grad():
        y0, p0 = tree_infer_torch(x, tree.w_in, tree.b_in, tree.w_out, 4, "gelu", placement, return_paths=True)
        pruned = PrunedTreeFFN.from_tree(tree, keep, dead_route=rule)
        y1, slots = pruned.walk(x)
    dead = ~keep.clone()
    for j in range(1, 31):  # descendants of removed nodes are removed
        dead[:, j] |= dead[:, (j - 1) // 2]
    touched = dead[torch.arange(3).view(1, 3, 1), p0].any(-1).any(-1)  # (M,)
    assert 0 < touched.sum() < len(x)
    assert torch.equal(y1[~touched], y0[~touched]), "surviving paths must give the original output bit for bit"
    assert torch.equal(pruned.original_paths(slots)[~touched], p0[~touched])
    assert not torch.allclose(y1[touched], y0[touched])
    assert pruned.kept_nodes() == int((~dead).sum())
    if rule == "stop":  # a walk that met a removed node ended there
        assert (pruned.original_paths(slots)[touched] == -1).any()
    else:  # the surviving sibling takes over: walks keep their length unless no child survives
        assert (slots[touched] >= 0).all()


def test_prune_writes_a_smaller_loadable_checkpoint(tree_run, tmp_path, sample_data, capsys):
    model = ckpt.load_model(tree_run)
    batches = open_split(model, sample_data)
    counts = collect_visits(model, batches, batches.eval_starts(WINDOWS))["counts"]
    # remove at least the least visited leaf that some token reached
    min_visits = int(min(c[:, 31:][c[:, 31:] > 0].min() for c in counts)) + 1
    out = tmp_path / "pruned"
    assert main(["prune", str(tree_run), "--min-visits", str(min_visits), "--out", str(out),
                 "--windows", str(WINDOWS), "--split", "val", "--quiet"]) == 0  # the counts computed above
    assert "val loss" in capsys.readouterr().out
    rep = json.loads((out / "prune.json").read_text())
    assert rep["params_after"] < rep["params_before"] and rep["nodes_after"] < rep["nodes_before"]
    assert 0.0 < rep["tokens_touched_removed"] < 1.0
    assert rep["val_loss_before"] > 0 and rep["val_loss_after"] > 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "data.json", "prune.json"):
        assert (out / f).is_file(), f
    assert not list(tmp_path.glob(".tmp-*"))
    small = ckpt.load_model(out)
    assert small.cfg.ffn.kind == "tree_pruned" and small.num_params() == rep["params_after"]

    # layer 0 sees the same input in both models: surviving tokens must get the original output exactly
    seen = {}
    small.ffn_modules()[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].reshape(-1, 64)))
    x, _ = batches.window(batches.eval_starts(2))
    with torch.no_grad():
        small(x)
        big = model.ffn_modules()[0]
        y0, p0 = tree_infer_torch(seen["x"], big.w_in, big.b_in, big.w_out, big.depth, big.activation,
                                  big.placement, return_paths=True, thr=big.route_threshold)
        y1, _ = small.ffn_modules()[0].walk(seen["x"])
    removed = counts[0] < min_visits
    for j in range(1, 63):
        removed[:, j] |= removed[:, (j - 1) // 2]
    touched = removed[torch.arange(4).view(1, 4, 1), p0].any(-1).any(-1)
    assert (~touched).any()
    assert torch.equal(y1[~touched], y0[~touched])

    # the pruned model analyses like a tree model (removed nodes count as dead) and can be fine-tuned
    res = analyze(out, data=sample_data, windows=2, out=tmp_path / "an2", plots=False)
    for got, removed in zip(res["layers"], rep["layers"]):
        assert got["dead_nodes"] >= removed["removed_fraction"]
    small.train()
    small(x, targets=x).loss.backward()
    assert small.ffn_modules()[1].w_in.grad.abs().sum() > 0


def test_prune_counts_on_train_and_scores_on_val(tree_run, tmp_path, sample_data, capsys):
    """By default visits are counted on training windows and the loss change is scored on validation windows, so
    the decision is not taken on the data that judges it; the report says which split did what."""
    out = tmp_path / "pruned"
    assert main(["prune", str(tree_run), "--min-visits", "1", "--out", str(out), "--windows", str(WINDOWS),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "visits counted on: train split" in printed and "scored on the validation split" in printed
    assert "in-sample" not in printed
    rep = json.loads((out / "prune.json").read_text())
    assert rep["counts_split"] == "train" and rep["eval_split"] == "val"
    model = ckpt.load_model(tree_run)
    train_b = open_split(model, sample_data, "train")
    counts = collect_visits(model, train_b, train_b.eval_starts(WINDOWS))["counts"]  # the training windows' counts
    assert [int((c >= 1).sum()) for c in counts] == [r["kept"] for r in rep["layers"]]
    assert rep["eval_tokens"] == WINDOWS * 64 and rep["tokens_counted"] == WINDOWS * 64
    # explicitly counting on validation is allowed and flagged as in-sample
    out2 = tmp_path / "pruned-val"
    assert main(["prune", str(tree_run), "--min-visits", "1", "--out", str(out2), "--windows", str(WINDOWS),
                 "--split", "val", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "visits counted on: val split" in printed and "in-sample" in printed


def test_min_visits_zero_keeps_everything(tree_run, tmp_path):
    out = tmp_path / "same"
    rep = prune(tree_run, out, 0, windows=WINDOWS)
    assert rep["params_after"] == rep["params_before"] and rep["nodes_after"] == rep["nodes_before"]
    assert rep["tokens_touched_removed"] == 0.0
    assert rep["val_loss_after"] == pytest.approx(rep["val_loss_before"], abs=1e-5)
    a, b = ckpt.load_model(tree_run), ckpt.load_model(out)
    x = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(b(x).logits, a(x).logits, atol=1e-5, rtol=1e-5)


def test_one_line_errors(tree_run, dense_ckpt, tmp_path, capsys):
    _one_line_error(capsys, ["analyze", str(dense_ckpt), "--quiet"], "has no tree layers")
    _one_line_error(capsys, ["prune", str(dense_ckpt), "--min-visits", "1", "--out", str(tmp_path / "x")],
                    "has no tree layers")
    for bad in ("-1", "three", "1.5"):
        _one_line_error(capsys, ["prune", str(tree_run), "--min-visits", bad, "--out", str(tmp_path / "x")],
                        "--min-visits")
    _one_line_error(capsys, ["prune", str(tree_run), "--min-visits", "1", "--out", str(tree_run)], "--out")
    _one_line_error(capsys, ["analyze", str(tree_run), "--chunk", "8,x"], "--chunk")
    assert not (tmp_path / "x").exists()
