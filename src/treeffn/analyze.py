"""``treeffn analyze``: how a tree model routes its tokens, measured on validation text, with plots.

DS-26's auto-pruning claim is about routing statistics: with φ before the sum (placement ``"node"``) and an
asymmetric φ, paths lose their traffic and die; with φ after the sum (``"output"``) trees stay balanced. This module
measures, per tree layer, on fixed validation windows (the same ones ``treeffn eval`` scores):

* ``leaf_util``       fraction of leaves at least one token reached
* ``dead_nodes``      fraction of nodes no token reached (``alive_fraction`` = 1 − dead_nodes)
* ``path_entropy``    entropy of the leaf distribution in bits / depth: 1 = uniform over leaves, 0 = one leaf
* ``active_fraction`` units a token uses / units the layer stores: (D+1)/(2^(D+1)−1), fixed by the shape
* ``level_util``      per level (root first), fraction of its nodes reached at least once
* ``union_sparsity``  BlockFFN's chunk-level sparsity: for n consecutive tokens of a window, the fraction of the
  layer's units touched by any of them, averaged over chunks. Near (D+1)/N·n when tokens route independently and
  the tree is balanced, lower when neighbouring tokens share paths (what a chunked kernel or a cache can exploit).
* ``choice_overlap``, ``choice_capture``  how good the routing's choice of units is, against the choice a top-k
  layer would make from the same weights (trained tree layers only): every unit's contribution to the token's
  output has magnitude c_i = |φ(λ_i)|·‖v_i‖ ("node" placement; |λ_i|·‖v_i‖ for "output"), and the oracle takes the A
  units of largest c_i, A the units the paths use. ``choice_overlap`` is the mean fraction of the oracle's units on
  the token's paths, ``choice_capture`` the mean of Σ_path c_i / Σ_oracle c_i (both 1 for a perfect choice).
  ``choice_overlap_random`` and ``choice_capture_random``: the same for uniformly random walks (a fixed seed), the
  floor a routing rule should beat (the overlap's expectation is A / the layer's units).
* ``best_agree``      the fraction of a token's routing decisions that go towards the child whose subtree holds the
  better path by the same contributions (``ops.tree.best_path_values``; 0.5 is a coin, 1 an oracle walk).

Visit counts come from the layers' own statistics (``model.set_track_stats(True)``, the numbers training logs);
paths for the union are recomputed from each tree layer's input, captured with a forward pre-hook, by
:func:`treeffn.layers.tree.tree_paths` (the layer's routing rule; the fused kernel may break an exact tie λ = 0
differently, which does not change a count measurably). Statistics of a Mixture-of-Depths routed block cover the
tokens that block processed.

``--best-paths`` adds ``best_path_loss``: the mean loss on the same windows as the model routes, and with every
trained tree layer routing each token along its best path by these contributions (``ops.tree.best_paths``, an oracle
that reads every unit): how much loss the routing rule costs with the units as they are.

Writes ``analysis.json`` (all of the above plus the raw visit counts, which ``treeffn prune --counts`` can reuse),
``levels.png`` (level utilisation heatmap, sorted leaf traffic, union sparsity), and, when DIR is a training run
(or a checkpoint folder inside one), ``training.png``: leaf_util / dead_nodes / path_entropy against the training
step, from ``RUN/metrics.jsonl``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, TreeffnError
from . import checkpoint as ckpt
from .data import Batches, check_vocab, load_meta, load_tokens, resolve_data
from .device import resolve_device
from .layers.tree import TreeFFN, TreeLayer
from .ops.activations import activation_fn
from .ops.tree import best_paths, better_child, subtree_best
from .outputs import check_output_dir, write_json_atomic
from .stats import level_utilisation, tree_summary

DEFAULT_CHUNKS = (8, 32, 128)
DEFAULT_WINDOWS = 64
TRAINING_METRICS = ("leaf_util", "dead_nodes", "path_entropy")
CHOICE_KEYS = ("choice_overlap", "choice_capture", "choice_overlap_random", "choice_capture_random", "best_agree")
_METRIC_KEY = re.compile(r"^tree/(\w+)/layer(\d+)$")


# ---- finding and walking the tree layers ---------------------------------------------------------------------
def tree_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(block index, layer) of every tree feed-forward layer, pruned ones included."""
    return [(i, f) for i, f in enumerate(model.ffn_modules()) if isinstance(f, TreeLayer)]


def require_tree_layers(model: nn.Module, where: str) -> list[tuple[int, nn.Module]]:
    layers = tree_layers(model)
    if not layers:
        raise TreeffnError(f"{where} has no tree layers (ffn.kind is '{model.cfg.ffn.kind}'); "
                           "analyze and prune work on ffn.kind=tree models")
    return layers


@torch.no_grad()
def layer_paths(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (M, D) -> visited node per token, tree and level (M, K, L), original numbering, −1 after a walk ended."""
    return layer.paths(x)


def layer_nodes(layer: nn.Module) -> int:
    """Nodes the layer actually stores (the denominator of union sparsity)."""
    return layer.total_units() // layer.node_width


def union_touched(paths: torch.Tensor, n_nodes: int, chunk: int) -> tuple[float, int]:
    """paths (B, T, K, L) with −1 for 'no node' -> (sum over chunks of touched nodes, number of chunks).

    Chunks are n consecutive tokens inside one window (never across windows); a chunk's count is the number of
    distinct (tree, node) pairs its tokens visit. ``stats.union_sparsity`` is the same for one sequence without −1.
    """
    B, T, K, L = paths.shape
    n = T // chunk
    if n == 0:
        return 0.0, 0
    p = paths[:, : n * chunk].reshape(B * n, chunk, K, L)
    flat = p + torch.arange(K, device=p.device).view(1, 1, K, 1) * n_nodes
    flat = torch.where(p >= 0, flat, torch.full_like(flat, K * n_nodes)).reshape(B * n, -1)  # −1 -> a spare column
    touched = torch.zeros(B * n, K * n_nodes + 1, dtype=torch.bool, device=p.device)
    touched.scatter_(1, flat, True)
    return float(touched[:, :-1].sum()), B * n


@torch.no_grad()
def random_walks(M: int, K: int, depth: int, generator: torch.Generator) -> torch.Tensor:
    """Uniformly random root-to-leaf walks (M, K, depth + 1) int64."""
    steps = torch.randint(0, 2, (M, K, depth), generator=generator)
    paths = torch.zeros(M, K, depth + 1, dtype=torch.long)
    for t in range(depth):
        paths[:, :, t + 1] = 2 * paths[:, :, t] + 1 + steps[:, :, t]
    return paths


@torch.no_grad()
def choice_quality(layer: TreeFFN, x: torch.Tensor, paths: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Sums over the tokens of x (M, D) of (choice_overlap, choice_capture, best_agree) (module docstring), paths
    (M, K, L) the tokens' walks: a float64 tensor of 3; with ``generator``, of 5: then the first two for random
    walks as well."""
    K, N, W, D = layer.w_in.shape
    M, L = x.shape[0], paths.shape[-1]
    lam = torch.einsum("md,knwd->mknw", x.float(), layer.w_in.float())
    if layer.b_in is not None:
        lam = lam + layer.b_in.float()
    mag = activation_fn(layer.activation)(lam).abs() if layer.placement == "node" else lam.abs()
    c = (mag * layer.w_out.float().norm(dim=-1)).reshape(M, K * N * W).double()
    top = c.topk(K * L * W, dim=1)

    def score(p: torch.Tensor) -> list[torch.Tensor]:
        cols = ((p.to(x.device) + (torch.arange(K, device=x.device) * N).view(1, K, 1)) * W).unsqueeze(-1)
        cols = (cols + torch.arange(W, device=x.device)).reshape(M, K * L * W)
        on_path = torch.zeros_like(c, dtype=torch.bool).scatter_(1, cols, True)
        overlap = on_path.gather(1, top.indices).double().mean(1)
        capture = c.gather(1, cols).sum(1) / top.values.sum(1).clamp_min(1e-30)
        return [overlap.sum(), capture.sum()]

    sums = score(paths)
    if generator is not None:
        sums += score(random_walks(M, K, L - 1, generator))
    if L > 1:  # the same contributions c, summed per node, give each node's best path below it
        best = better_child(subtree_best(c.view(M, K, N, W).sum(-1).float(), L - 1), paths.to(x.device), L - 1)
        went = paths[:, :, 1:].to(x.device) == 2 * paths[:, :, :-1].to(x.device) + 2
        sums.append((went == best).double().mean((1, 2)).sum())
    else:
        sums.append(torch.tensor(float(M), dtype=torch.float64))
    return torch.stack(sums).cpu()


class _PathRecorder:
    """Forward pre-hooks on the tree layers: each call's input becomes paths (B, T, K, L), kept until taken; for
    trained tree layers the sums of :func:`choice_quality` accumulate in ``choice``."""

    def __init__(self, layers: list[tuple[int, nn.Module]]):
        self.paths: dict[int, list[torch.Tensor]] = {i: [] for i, _ in layers}
        self.choice: dict[int, torch.Tensor] = {i: torch.zeros(5, dtype=torch.float64) for i, _ in layers}
        self.generator = torch.Generator().manual_seed(0)
        self.handles = [f.register_forward_pre_hook(self._hook(i)) for i, f in layers]

    def _hook(self, i: int):
        def hook(module, args):
            x = args[0]
            T = x.shape[-2] if x.dim() >= 3 else x.shape[0]  # (B, T, D) from a block; (M, D) read as one window
            x2 = x.reshape(-1, x.shape[-1])
            p = layer_paths(module, x2)
            if isinstance(module, TreeFFN):
                self.choice[i] += choice_quality(module, x2, p, self.generator)
            self.paths[i].append(p.reshape(-1, T, *p.shape[1:]))
        return hook

    def take(self, i: int) -> torch.Tensor:
        out = torch.cat(self.paths[i], 0)
        self.paths[i] = []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def collect_visits(model: nn.Module, batches, starts: torch.Tensor, batch_size: int = 8, device="cpu",
                   chunks: tuple[int, ...] = (), keep_leaves: bool = False, progress: bool = False) -> dict:
    """Run ``model`` on the windows at ``starts`` and accumulate routing statistics of every tree layer.

    Returns ``{"layers": [block indices], "counts": [(K, N) int64], "union": [{chunk: (touched sum, chunks)}],
    "leaves": [(tokens, K) int64 last visited node per token and tree] or None, "tokens": int, "choice": [(overlap,
    capture, random walks' overlap, capture) means, or None for a pruned layer]}``; tokens are in window order, the
    same for every layer, so per-token flags can be combined across layers.
    """
    layers = require_tree_layers(model, "the model")
    was = model.training
    model.eval()
    model.set_track_stats(True)
    rec = _PathRecorder(layers)
    counts = {i: torch.zeros(f.trees, f.num_nodes, dtype=torch.long) for i, f in layers}
    union = {i: {c: [0.0, 0] for c in chunks} for i, _ in layers}
    leaves: dict[int, list[torch.Tensor]] = {i: [] for i, _ in layers}
    tokens = 0
    it = range(0, len(starts), batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="routing", unit="batch", leave=False, dynamic_ncols=True)
    try:
        for b0 in it:
            x, _ = batches.window(starts[b0: b0 + batch_size])
            out = model(x.to(device))
            tokens += x.numel()
            for i, f in layers:
                paths = rec.take(i).cpu()  # (B, T, K, L)
                visits = out.stats[i].get("tree_visits")
                if visits is None:  # a layer without statistics: count the recomputed paths instead
                    k = torch.arange(f.trees).view(1, 1, -1, 1).expand_as(paths)
                    ok = paths >= 0
                    visits = torch.bincount((paths + k * f.num_nodes)[ok], minlength=f.trees * f.num_nodes)
                    visits = visits.view(f.trees, f.num_nodes)
                counts[i] += visits.detach().cpu().long()
                n_nodes = f.num_nodes
                for c in chunks:
                    s, n = union_touched(paths, n_nodes, c)
                    union[i][c][0] += s
                    union[i][c][1] += n
                if keep_leaves:  # the deepest visited node of each walk
                    flat = paths.reshape(-1, f.trees, paths.shape[-1])
                    depth_idx = (flat >= 0).long().sum(-1).clamp_min(1) - 1
                    leaves[i].append(flat.gather(2, depth_idx.unsqueeze(-1)).squeeze(-1))
    finally:
        rec.close()
        model.set_track_stats(False)
        model.train(was)
    idx = [i for i, _ in layers]
    return {
        "layers": idx,
        "counts": [counts[i] for i in idx],
        "union": [union[i] for i in idx],
        "leaves": [torch.cat(leaves[i], 0) for i in idx] if keep_leaves and tokens else None,
        "tokens": tokens,
        "choice": [(rec.choice[i] / tokens).tolist() if tokens and isinstance(f, TreeFFN) else None
                   for i, f in layers],
    }


class BestPathRouting:
    """Within ``with BestPathRouting(model):`` every trained tree layer routes each token along the best path by its
    units' contributions (:func:`treeffn.ops.tree.best_paths`) instead of its own rule: an oracle that reads every
    unit, to measure how much of a model's loss its routing costs with the units as they are (``--best-paths``)."""

    def __init__(self, model: nn.Module):
        self.layers = [f for _, f in require_tree_layers(model, "the model") if isinstance(f, TreeFFN)]
        self.handles: list = []

    @staticmethod
    def _hook(module: TreeFFN, args, output):
        x = args[0]
        x2 = x.reshape(-1, x.shape[-1])
        paths = best_paths(x2, module.w_in, module.b_in, module.w_out, module.depth, module.activation,
                           module.placement)
        y = module.forward_2d(x2, impl="sparse", paths=paths)[0]
        return y.reshape(x.shape), output[1]

    def __enter__(self) -> "BestPathRouting":
        self.handles = [f.register_forward_hook(self._hook) for f in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def best_path_loss(model: nn.Module, batches, windows: int, batch_size: int, device) -> dict:
    """Mean validation loss on ``windows`` windows as the model routes, and with every tree layer on its best paths
    (:class:`BestPathRouting`)."""
    from .evaluate import evaluate_loss

    loss, tokens = evaluate_loss(model, batches, windows, batch_size, device)
    with BestPathRouting(model):
        best, _ = evaluate_loss(model, batches, windows, batch_size, device)
    return {"loss": loss, "loss_best_paths": best, "tokens": tokens}


# ---- statistics of one layer ---------------------------------------------------------------------------------
def layer_report(layer: nn.Module, counts: torch.Tensor, union: dict) -> dict:
    s = tree_summary(counts)
    nodes = layer_nodes(layer)
    return {
        "trees": layer.trees,
        "depth": layer.depth,
        "node_width": layer.node_width,
        "nodes": nodes,
        "leaf_util": s["leaf_util"],
        "dead_nodes": s["dead_nodes"],
        "alive_fraction": 1.0 - s["dead_nodes"],
        "path_entropy": s["path_entropy"],
        "active_fraction": min(1.0, layer.active_units() / max(1, layer.total_units())),
        "level_util": level_utilisation(counts),
        "union_sparsity": {str(c): (v[0] / (v[1] * nodes) if v[1] else None) for c, v in union.items()},
    }


def parse_chunks(text: str | None) -> tuple[int, ...]:
    if text is None or not str(text).strip():
        return DEFAULT_CHUNKS
    try:
        out = tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"--chunk must be comma-separated positive integers, e.g. 8,32,128 (got '{text}')") from None
    if not out or min(out) < 1:
        raise ConfigError(f"--chunk sizes must be positive integers (got '{text}')")
    return tuple(sorted(set(out)))


def open_split(model: nn.Module, data_dir: Path, split: str = "val"):
    """Windows of ``split`` of the prepared data, checked against the model's vocabulary."""
    meta = load_meta(data_dir)
    check_vocab(meta, model.cfg.model.vocab_size, data_dir, hint="pass the data it was trained on with --data")
    return Batches(load_tokens(data_dir, split), model.cfg.model.seq_len, model.cfg.model.vocab_size)


# ---- the whole analysis ----------------------------------------------------------------------------------------
def analyze(path: str | Path, data: str | Path | None = None, windows: int = DEFAULT_WINDOWS,
            chunks: tuple[int, ...] = DEFAULT_CHUNKS, out: str | Path | None = None, device: str = "auto",
            batch_size: int = 8, split: str = "val", plots: bool = True, progress: bool = False,
            overwrite: bool = False, best_path: bool = False) -> dict:
    """Analyse the checkpoint at ``path``; write analysis.json (and PNGs) to ``out`` (default PATH/analysis).

    ``out`` must be missing, empty, or an earlier analysis (replaced only with ``overwrite``): nothing else is ever
    written over."""
    if windows < 0:
        raise ConfigError(f"--windows must be ≥ 0 (0 = the whole split; got {windows})")
    out_dir = Path(out) if out is not None else Path(path) / "analysis"
    check_output_dir(out_dir, "analysis", overwrite=overwrite, inputs=[path])
    dev = resolve_device(device)
    folder = ckpt.resolve(path)
    model = ckpt.load_model(folder, device=dev)
    layers = require_tree_layers(model, str(path))
    data_dir = resolve_data(data, recorded_in=folder)
    batches = open_split(model, data_dir, split)
    starts = batches.eval_starts(windows)
    col = collect_visits(model, batches, starts, batch_size, dev, chunks, progress=progress)
    reports = []
    for (i, f), counts, union, choice in zip(layers, col["counts"], col["union"], col["choice"]):
        r = {"layer": i, **layer_report(f, counts, union), "visits": counts.tolist()}
        if choice is not None:
            r.update(zip(CHOICE_KEYS, choice))
        reports.append(r)
    keys = ("leaf_util", "dead_nodes", "path_entropy", "active_fraction", "alive_fraction")
    if all("choice_overlap" in r for r in reports):
        keys += CHOICE_KEYS
    mean = {k: sum(r[k] for r in reports) / len(reports) for k in keys}
    result = {
        "checkpoint": str(folder),
        "config": model.cfg.describe(),
        "data_dir": str(data_dir),
        "split": split,
        "windows": len(starts),
        "seq_len": model.cfg.model.seq_len,
        "tokens": col["tokens"],
        "chunks": list(chunks),
        "mean": mean,
        "layers": reports,
        "plots": {},
    }
    if best_path:
        result["best_path_loss"] = best_path_loss(model, batches, len(starts), batch_size, dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = find_metrics(Path(path), folder)
    curves = read_training_curves(metrics) if metrics is not None else {}
    if curves:
        result["training"] = {"metrics": str(metrics), "points": max(len(v) for v in curves.values()),
                              "last": {k: v[-1][1] for k, v in curves.items()}}
    if plots:
        result["plots"]["levels"] = str(plot_levels(reports, chunks, out_dir / "levels.png", model.cfg.describe()))
        if curves:
            result["plots"]["training"] = str(plot_training(curves, out_dir / "training.png", model.cfg.describe()))
    write_json_atomic(out_dir / "analysis.json", result)
    result["out"] = str(out_dir)
    return result


# ---- training curves -------------------------------------------------------------------------------------------
def find_metrics(given: Path, folder: Path) -> Path | None:
    """RUN/metrics.jsonl when DIR is a run directory or a checkpoint folder inside one."""
    for p in (given / "metrics.jsonl", folder.parent / "metrics.jsonl"):
        if p.is_file():
            return p
    return None


def read_training_curves(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """``{"leaf_util/layer0": [(step, value), ...], ...}`` from the tree statistics logged during training."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in Path(metrics).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed writer
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        for k, v in rec.items():
            m = _METRIC_KEY.match(k)
            if m and m.group(1) in TRAINING_METRICS and isinstance(v, (int, float)):
                curves.setdefault(f"{m.group(1)}/layer{m.group(2)}", []).append((int(rec["step"]), float(v)))
    return curves


# ---- plots (matplotlib imported here only; Agg canvas, no pyplot global state) --------------------------------
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_levels(reports: list[dict], chunks: tuple[int, ...], path: Path, title: str) -> Path:
    """Level utilisation heatmap (layers × levels), sorted leaf traffic per layer, union sparsity vs chunk."""
    import numpy as np

    fig = _figure(14, 4.2)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    depth = max(r["depth"] for r in reports)
    grid = np.full((len(reports), depth + 1), np.nan)
    for row, r in enumerate(reports):
        grid[row, : len(r["level_util"])] = r["level_util"]
    im = ax1.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for row in range(grid.shape[0]):
        for col in range(grid.shape[1]):
            if np.isfinite(grid[row, col]) and grid.size <= 200:
                ax1.text(col, row, f"{grid[row, col]:.2f}", ha="center", va="center", fontsize=7,
                         color="white" if grid[row, col] < 0.6 else "black")
    ax1.set_xlabel("tree level (0 = root)")
    ax1.set_ylabel("layer")
    ax1.set_yticks(range(len(reports)), [str(r["layer"]) for r in reports])
    ax1.set_title("nodes reached at least once, per level")
    fig.colorbar(im, ax=ax1, fraction=0.046)
    for r in reports:
        v = np.asarray(r["visits"], dtype=float)
        leaves = v[:, 2 ** r["depth"] - 1:].reshape(-1)
        share = np.sort(leaves / max(1.0, leaves.sum()))[::-1]
        ax2.plot(np.arange(1, len(share) + 1) / len(share), np.maximum(share * len(share), 1e-3),
                 label=f"layer {r['layer']}")
    ax2.set_yscale("log")
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax2.set_xlabel("leaves, most visited first (fraction)")
    ax2.set_ylabel("traffic / uniform share")
    ax2.set_title("leaf traffic (dead leaves at 1e-3)")
    ax2.legend(fontsize=7)
    for r in reports:
        xs = [c for c in chunks if r["union_sparsity"].get(str(c)) is not None]
        ax3.plot(xs, [r["union_sparsity"][str(c)] for c in xs], marker="o", label=f"layer {r['layer']}")
    ax3.set_xscale("log", base=2)
    ax3.set_ylim(0, 1)
    ax3.set_xlabel("consecutive tokens n")
    ax3.set_ylabel("fraction of units touched")
    ax3.set_title("chunk-level union sparsity")
    ax3.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_training(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """leaf_util / dead_nodes / path_entropy against the training step, one line per layer."""
    fig = _figure(14, 4)
    axes = fig.subplots(1, len(TRAINING_METRICS))
    for ax, metric in zip(axes, TRAINING_METRICS):
        names = sorted((k for k in curves if k.startswith(metric + "/")), key=lambda k: int(k.rsplit("layer", 1)[1]))
        for k in names:
            steps, vals = zip(*curves[k])
            ax.plot(steps, vals, label=k.split("/")[1])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("training step")
        ax.set_title(metric)
        if names:
            ax.legend(fontsize=7)
    fig.suptitle(f"{title} — routing statistics logged during training", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ---- CLI -------------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("dir", help="run directory or checkpoint folder of a tree model")
    p.add_argument("--data", default=None,
                   help="prepared data directory, or 'default' / 'sample' "
                        "(default: the data recorded in the checkpoint)")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                   help=f"validation windows of seq_len tokens (default {DEFAULT_WINDOWS}; 0 = the whole split)")
    p.add_argument("--chunk", default=",".join(map(str, DEFAULT_CHUNKS)),
                   help="chunk sizes for union sparsity, comma-separated (default 8,32,128)")
    p.add_argument("--out", default=None, help="output folder (default DIR/analysis)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier analysis in --out")
    p.add_argument("--split", choices=["val", "train"], default="val", help="data split (default val)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-plots", action="store_true", help="write analysis.json only")
    p.add_argument("--best-paths", action="store_true",
                   help="also the loss on the same windows with every tree routed along its best paths (an oracle "
                        "that reads every unit: what the routing costs with the units as they are)")
    p.add_argument("--json", action="store_true", help="print analysis.json instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def format_report(res: dict) -> str:
    chunks = res["chunks"]
    lines = [f"{res['checkpoint']}: {res['config']}",
             f"routing of {res['tokens']:,} {res['split']} tokens ({res['windows']} windows of {res['seq_len']})", ""]
    head = f"{'layer':>5} {'leaf_util':>9} {'dead':>6} {'entropy':>7} {'active':>7} {'alive':>6}" + "".join(
        f" {'union@' + str(c):>10}" for c in chunks)
    lines.append(head)
    for r in res["layers"]:
        us = "".join(f" {r['union_sparsity'][str(c)]:>10.3f}" if r["union_sparsity"][str(c)] is not None
                     else f" {'-':>10}" for c in chunks)
        lines.append(f"{r['layer']:>5} {r['leaf_util']:>9.3f} {r['dead_nodes']:>6.3f} {r['path_entropy']:>7.3f} "
                     f"{r['active_fraction']:>7.4f} {r['alive_fraction']:>6.3f}{us}")
    if all("choice_overlap" in r for r in res["layers"]):
        lines += ["", "choice of units against a top-k choice from the same weights (overlap / capture; random walks)"
                      " and decisions towards the better subtree (best_agree; 0.5 is a coin):"]
        lines += [f"  layer {r['layer']}: {r['choice_overlap']:.3f} / {r['choice_capture']:.3f}; "
                  f"{r['choice_overlap_random']:.3f} / {r['choice_capture_random']:.3f}; "
                  f"best_agree {r['best_agree']:.3f}" for r in res["layers"]]
    lines += ["", "level utilisation (root first):"]
    for r in res["layers"]:
        lines.append(f"  layer {r['layer']}: " + " ".join(f"{v:.2f}" for v in r["level_util"]))
    if "best_path_loss" in res:
        b = res["best_path_loss"]
        lines += ["", f"loss on these windows: {b['loss']:.4f} as routed, {b['loss_best_paths']:.4f} with every tree on "
                      f"its best paths ({b['loss_best_paths'] - b['loss']:+.4f}; an oracle that reads every unit)"]
    if "training" in res:
        last = res["training"]["last"]
        lines.append(f"training log {res['training']['metrics']} ({res['training']['points']} points), last: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in sorted(last.items())))
    lines.append(f"wrote {Path(res['out']) / 'analysis.json'}" + "".join(f", {p}" for p in res["plots"].values()))
    return "\n".join(lines)


def run(args) -> int:
    res = analyze(args.dir, data=args.data, windows=args.windows, chunks=parse_chunks(args.chunk), out=args.out,
                  device=args.device, batch_size=args.batch_size, split=args.split, plots=not args.no_plots,
                  progress=not args.quiet, overwrite=args.overwrite, best_path=args.best_paths)
    if args.json:
        print(json.dumps({k: v for k, v in res.items()}, default=str))
    else:
        print(format_report(res))
    return 0
