"""Auto-pruning (DS-26) at toy scale: does φ before the sum kill tree paths, and φ after the sum keep trees balanced?

Trains small tree models on the default corpus, identical except for the tree layer's placement of φ ("node":
UFB-23, φ on every node before the sum; "output": φ after the per-tree accumulation), its nonlinearity (GELU and
ReLU, asymmetric; tanh, odd: a token sent left keeps its gradient through the node) and optionally the learning
rate, with the same seed, initial weights and batches. Routing statistics are logged during training; afterwards
each model is analysed on fixed validation windows (``treeffn analyze``) and pruned of the nodes no training token
of 64 windows reached (``treeffn prune --min-visits 1 --split train``), scored on validation before and after.

    .venv/bin/python experiments/autoprune/run.py [--steps 150] [--runs node-gelu,output-gelu,...,node-gelu@1e-3]
                                                  [--out runs/autoprune] [--docs docs/autoprune.md]

Writes the runs to --out, curves and a summary figure to ``<docs dir>/autoprune/``, and the report ``--docs``.
A finished run in --out is reused (and so are its analysis and pruning), so re-running re-plots cheaply.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUNS = "node-gelu,output-gelu,node-tanh,output-tanh,node-relu,output-relu"  # pairs first
PLACEMENTS = ("node", "output")
ACTIVATIONS = ("gelu", "relu", "tanh", "silu", "identity")
COLORS = {"gelu": "tab:blue", "relu": "tab:orange", "tanh": "tab:green", "silu": "tab:olive", "identity": "tab:gray"}
OTHER_LR_COLORS = {"gelu": "tab:purple", "relu": "tab:red", "tanh": "tab:cyan", "silu": "tab:brown",
                   "identity": "black"}
STYLES = {"node": "-", "output": "--"}
LONGER = """
## The collapse, its cause, and the contrast at a longer budget

The early collapse above is not DS-26's gradual, φ-driven starvation: it happens with tanh as with GELU and in both
placements, within a few dozen steps. docs/quality.md measures its cause on the `tiny` model at one epoch
(`python experiments/quality/run.py`): the routing inputs of every token point the same way early in training, so
each node's mean score sits many of its standard deviations from zero and every token turns the same way. The
default tree setting now routes on per-node thresholds (`tree.balance=threshold`), which removes the collapse; the
runs above use `--balance none`, the layer as published. The node-vs-output contrast with the thresholds switched
off, at one epoch, is in the rows `tree-node-faithful` and `tree-output-faithful` of docs/quality.md (dead nodes
over training in its curves figure).
"""


def parse_runs(text: str, base_lr: float) -> list[dict]:
    """'node-gelu,output-gelu@1e-3' -> run specs; '@LR' overrides the learning rate of that run."""
    runs = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        spec, _, lr_text = item.partition("@")
        placement, _, act = spec.partition("-")
        if placement not in PLACEMENTS or act not in ACTIVATIONS:
            raise SystemExit(f"bad run '{item}': expected PLACEMENT-ACTIVATION[@LR] with placement in "
                             f"{PLACEMENTS} and activation in {ACTIVATIONS}")
        lr = float(lr_text) if lr_text else base_lr
        name = spec if lr == base_lr else f"{spec}-lr{lr_text}"
        runs.append({"name": name, "placement": placement, "activation": act, "lr": lr})
    return runs


def color(r: dict, base_lr: float) -> str:
    return (COLORS if r["lr"] == base_lr else OTHER_LR_COLORS)[r["activation"]]


def shape_overrides(args, lr: float) -> dict:
    """The small shape: 2 layers of d_model 128, two trees of depth 7 (255 nodes, 8 on a path) per layer."""
    return {
        "ffn.kind": "tree", "tree.balance": args.balance,
        "model.d_model": 128, "model.n_layer": 2, "model.n_head": 4, "model.seq_len": 128,
        "tree.trees": 2, "tree.depth": 7,
        "train.batch_size": 8, "train.max_steps": args.steps, "train.lr": lr,
        "train.warmup_steps": max(1, args.steps // 10),
        "train.eval_every": args.steps, "train.eval_batches": 8,  # one evaluation at the end: 64 windows
        "train.log_every": 10, "train.stats_every": 2,  # each logged point sums the visits of 5 steps (5k tokens)
        "train.seed": args.seed,
    }


def final_val_loss(run: Path) -> float:
    vals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r["val_loss"] for r in vals if "val_loss" in r][-1]


def train_seconds(run: Path, tokens_per_step: int) -> float:
    """Time spent in the training loop, from the throughput logged every 10 steps (also for reused runs)."""
    secs, last = 0.0, 0
    for ln in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(ln) if ln.strip() else {}
        if "tok_per_s" in r and r["tok_per_s"] > 0:
            secs += (r["step"] - last) * tokens_per_step / r["tok_per_s"]
            last = r["step"]
    return secs


@torch.no_grad()
def input_alignment(model, batches, windows: int = 8) -> float:
    """How alike the tree layers' inputs are: ‖mean of the unit-normalised inputs‖², mean over layers.

    ≈ the mean pairwise cosine of the token vectors a layer routes: 0 for spread-out inputs, 1 when every token
    arrives in the same direction — in which case every routing hyperplane sends (nearly) all tokens the same way,
    whatever φ is, and paths die for a reason that has nothing to do with the placement of φ.
    """
    from treeffn.analyze import tree_layers

    seen: dict[int, list[torch.Tensor]] = {}
    def hook(i):
        return lambda module, args: seen.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]))

    hooks = [f.register_forward_pre_hook(hook(i)) for i, f in tree_layers(model)]
    try:
        model.eval()
        x, _ = batches.window(batches.eval_starts(windows))
        model(x)
    finally:
        for h in hooks:
            h.remove()
    vals = []
    for xs in seen.values():
        v = torch.nn.functional.normalize(torch.cat(xs).float(), dim=-1)
        vals.append(float(v.mean(0).pow(2).sum()))
    return sum(vals) / len(vals)


def alignments(run: Path, cfg_overrides: dict, data: Path) -> tuple[float, float]:
    """Input alignment of the model at initialisation (same seed) and after training."""
    from treeffn import checkpoint as ckpt
    from treeffn.analyze import open_split
    from treeffn.config import get_config
    from treeffn.data import load_meta
    from treeffn.model import GPT

    trained = ckpt.load_model(run)
    batches = open_split(trained, data)
    cfg = get_config("tiny", {**cfg_overrides, "model.vocab_size": load_meta(data)["vocab_size"]})
    torch.manual_seed(cfg.train.seed)  # the trainer seeds the same way before building the model
    return input_alignment(GPT(cfg), batches), input_alignment(trained, batches)


def analysed(run: Path, redo: bool) -> tuple[dict, dict]:
    """analyze + prune of a run, reusing earlier results when they are newer than its checkpoint."""
    from treeffn import checkpoint as ckpt
    from treeffn.analyze import analyze
    from treeffn.prune import prune

    stamp = (ckpt.resolve(run) / "model.safetensors").stat().st_mtime
    a_file, p_file = run / "analysis" / "analysis.json", run / "pruned" / "prune.json"
    fresh = a_file.is_file() and p_file.is_file() and min(a_file.stat().st_mtime, p_file.stat().st_mtime) > stamp
    if fresh and not redo:
        res = json.loads(a_file.read_text())
        pr = json.loads(p_file.read_text())
        if "val_loss_after" in pr and pr.get("min_visits") == 1:
            return res, pr
    res = analyze(run, windows=64, out=run / "analysis", progress=False, overwrite=True)
    pr = prune(run, run / "pruned", 1, windows=64, split="train", eval_windows=64, overwrite=True)
    return res, pr


def train_one(name: str, overrides: dict, out: Path, data: Path, steps: int) -> tuple[float, float]:
    """Train (or reuse) one run; returns (val loss, seconds spent training)."""
    from treeffn import checkpoint as ckpt
    from treeffn.config import get_config
    from treeffn.data import load_meta
    from treeffn.errors import TreeffnError
    from treeffn.train import train

    run = out / name
    try:
        folder = ckpt.resolve(run)
        done = json.loads((folder / "trainer.json").read_text())["step"]
    except (TreeffnError, OSError, KeyError, ValueError):
        done = None
    tokens_per_step = overrides["train.batch_size"] * overrides["model.seq_len"]
    if done == steps:
        print(f"[{name}] reusing the finished run in {run}", flush=True)
        return final_val_loss(run), train_seconds(run, tokens_per_step)
    if done is not None:
        raise SystemExit(f"{run} holds a run of {done} steps, not {steps}; choose another --out")
    cfg = get_config("tiny", {**overrides, "model.vocab_size": load_meta(data)["vocab_size"]})
    print(f"[{name}] training {cfg.describe()} for {steps} steps", flush=True)
    train(cfg, run, data, resume=True, progress=False, tensorboard=False)
    return final_val_loss(run), train_seconds(run, tokens_per_step)


def curves_of(run: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Per metric, the mean over layers of the training-time statistics, against the step."""
    from treeffn.analyze import TRAINING_METRICS, read_training_curves

    raw = read_training_curves(run / "metrics.jsonl")
    out = {}
    for m in TRAINING_METRICS:
        per_layer = [v for k, v in raw.items() if k.startswith(m + "/")]
        steps = [s for s, _ in per_layer[0]]
        out[m] = (steps, [sum(v[i][1] for v in per_layer) / len(per_layer) for i in range(len(steps))])
    return out


def plot(results: list[dict], fig_dir: Path, base_lr: float) -> list[Path]:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig_dir.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(14, 4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, metric in zip(axes, ("leaf_util", "dead_nodes", "path_entropy")):
        for r in results:
            steps, vals = r["curves"][metric]
            ax.plot(steps, vals, STYLES[r["placement"]], color=color(r, base_lr), label=r["name"])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("training step")
        ax.set_title(f"{metric} (training batches, mean of layers)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    curves = fig_dir / "curves.png"
    fig.savefig(curves)

    fig = Figure(figsize=(14, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for r in results:
        lv = np.mean([layer["level_util"] for layer in r["analysis"]["layers"]], axis=0)
        ax1.plot(range(len(lv)), lv, STYLES[r["placement"]], marker="o", color=color(r, base_lr),
                 label=r["name"])
        leaves = np.concatenate([np.asarray(layer["visits"], dtype=float)[:, 2 ** layer["depth"] - 1:].reshape(-1)
                                 for layer in r["analysis"]["layers"]])
        share = np.sort(leaves / leaves.sum())[::-1] * len(leaves)
        ax2.plot(np.arange(1, len(share) + 1) / len(share), np.maximum(share, 1e-3), STYLES[r["placement"]],
                 color=color(r, base_lr), label=r["name"])
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_xlabel("tree level (0 = root)")
    ax1.set_title("nodes reached on validation, per level")
    ax1.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax2.set_xlabel("leaves, most visited first")
    ax2.set_title("leaf traffic / uniform share (dead at 1e-3)")
    names = [r["name"] for r in results]
    x = np.arange(len(results))
    ax3.bar(x - 0.2, [r["val_loss"] for r in results], 0.4, label="trained")
    ax3.bar(x + 0.2, [r["prune"].get("val_loss_after", np.nan) for r in results], 0.4, label="pruned (min-visits 1)")
    lo = min(r["val_loss"] for r in results)
    ax3.set_ylim(lo - 0.3, max(max(r["val_loss"], r["prune"].get("val_loss_after", 0)) for r in results) + 0.1)
    ax3.set_xticks(x, names, rotation=30, fontsize=8)
    ax3.set_title("validation loss (nats)")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    final = fig_dir / "final.png"
    fig.savefig(final)
    return [curves, final]


def write_docs(results: list[dict], docs: Path, figs: list[Path], command: str, args, wall: float) -> None:
    rel = [f.relative_to(docs.parent) if f.is_relative_to(docs.parent) else f for f in figs]
    a0 = results[0]["analysis"]
    lines = [
        "# Auto-pruning at toy scale: φ before vs after the sum",
        "",
        "DS-26 reports that tree layers with φ applied to each node *before* the sum (placement `node`, the UFB-23 "
        "form) lose paths over training — auto-pruning — and that moving φ *after* the sparse accumulation "
        "(placement `output`) keeps trees balanced. This experiment checks both claims on a model small enough for "
        "a shared 2-core CPU, and adds a symmetric nonlinearity (tanh) as the ablation of the mechanism "
        "(φ'(λ) ≈ 0 for λ ≪ 0 makes a left turn a one-way door for GELU and ReLU, not for tanh).",
        "",
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        "Shape: 2 layers, d_model 128, 4 heads, context 128, each MLP replaced by 2 trees of depth 7 (2 × 255 "
        "single-unit nodes, 16 visited per token), vocabulary 8192 (the default corpus), batch 8 × 128 tokens, "
        f"{args.steps} steps (≈{args.steps * 8 * 128 / 1e3:.0f}k tokens), AdamW at peak lr {args.lr} (runs named "
        f"`-lrX` use lr X) with "
        f"{max(1, args.steps // 10)} warm-up steps and cosine decay, seed {args.seed}; all {len(results)} runs start "
        f"from the same weights and see the same batches. Training took "
        f"{sum(r['train_seconds'] for r in results) / 60:.0f} min in all (this invocation {wall / 60:.1f} min; "
        "finished runs are reused) on 2 CPU cores shared with other jobs.",
        "",
        f"Final statistics are measured by `treeffn analyze` on {a0['windows']} fixed validation windows "
        f"({a0['tokens']:,} tokens; 2 trees × 128 leaves per layer, so a balanced tree gives each leaf ~"
        f"{a0['tokens'] // 128} visits), averaged over the 2 layers. `pruned` removes the nodes that no token of "
        "64 training windows reached (`treeffn prune --min-visits 1 --split train`) and scores the result on the "
        "same validation windows.",
        "",
        "| run | lr | leaf_util | dead_nodes | path_entropy | lowest training path_entropy (step) | input alignment "
        "init → end | val loss | nodes kept after pruning | val loss pruned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, p = r["analysis"]["mean"], r["prune"]
        kept = f"{p['nodes_after']}/{p['nodes_before']} ({p['nodes_after'] / p['nodes_before']:.0%})"
        steps, ent = r["curves"]["path_entropy"]
        low = min(range(len(ent)), key=ent.__getitem__)
        lines.append(f"| {r['name']} | {r['lr']:g} | {m['leaf_util']:.3f} | {m['dead_nodes']:.3f} | "
                     f"{m['path_entropy']:.3f} | {ent[low]:.3f} ({steps[low]}) | "
                     f"{r['input_alignment_init']:.2f} → {r['input_alignment']:.2f} | {r['val_loss']:.4f} | {kept} | "
                     f"{p.get('val_loss_after', float('nan')):.4f} |")
    lines += [
        "",
        "leaf_util: fraction of leaves reached; dead_nodes: fraction of nodes never reached; path_entropy: entropy of "
        "the leaf distribution / depth (1 = uniform). Input alignment: ‖mean of the unit-normalised inputs of the "
        "tree layers‖² on 8 validation windows (≈ mean pairwise cosine; 1 = every token arrives in the same "
        "direction, so every hyperplane routes them alike whatever φ is), at initialisation and at the end. "
        "Per-layer values are in each run's `analysis/analysis.json`.",
        "",
        f"![training curves]({rel[0]})",
        "",
        "Training-time statistics (each point sums the visits of 5 training batches, 5,120 tokens), mean of the two "
        "layers; solid = node placement, dashed = output placement.",
        "",
        f"![final statistics]({rel[1]})",
        "",
        "Left: fraction of each level's nodes reached on validation (mean of layers). Middle: leaf traffic relative "
        "to a uniform share, most visited first (dead leaves drawn at 1e-3). Right: validation loss before and after "
        "pruning.",
        "",
        "## Reading",
        "",
    ]
    lines += reading(results)
    lines += [""] + LONGER.strip("\n").split("\n") + [
        "",
        "## Caveats",
        "",
        f"- Toy scale: 2 layers, {args.steps} steps, one seed. DS-26's claims are about 125M-1.3B models trained on "
        "billions of tokens; this only shows the direction of the effect on this setup, not its size there.",
        "- The learning rate is high for the model size on purpose, to speed up the dynamics; the early collapse "
        "may be a large-step effect rather than the slow starvation DS-26 describes (the `-lr` runs, if any, are "
        "the control). A longer run would be needed to see whether output placement recovers balance later.",
        "- What would separate the mechanisms: the fraction of a node's tokens that still send gradient to it "
        "(φ'(λ) > ε) per placement, logged over training; not measured here.",
        "- Statistics are visit counts on finite samples: a node counted dead on 8k tokens may be reached rarely on "
        "more text.",
        "- Parameters after pruning: every layer gets the slots of the largest layer (see "
        "`src/treeffn/layers/pruned_tree.py`), so `params_after` in each run's `pruned/prune.json` can exceed the "
        "kept-node count × 2 × d_model.",
    ]
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text("\n".join(lines) + "\n")


def reading(results: list[dict]) -> list[str]:
    """Sentences generated from the numbers, so the text cannot drift from the table."""
    out = []
    by = {(r["placement"], r["activation"], r["lr"]): r for r in results}
    diffs = []
    for act, lr in dict.fromkeys((r["activation"], r["lr"]) for r in results):
        n, o = by.get(("node", act, lr)), by.get(("output", act, lr))
        if n is None or o is None:
            continue
        dn, do = n["analysis"]["mean"]["dead_nodes"], o["analysis"]["mean"]["dead_nodes"]
        diffs.append(dn - do)
    if diffs:
        lo, hi = 100 * min(diffs), 100 * max(diffs)
        if min(diffs) > 0.05:
            out.append(f"**Node placement ends with more dead nodes than output placement in every pair "
                       f"({lo:+.0f} to {hi:+.0f} percentage points): the direction DS-26 reports.**")
        elif max(diffs) < -0.05:
            out.append(f"**Node placement ends with fewer dead nodes than output placement in every pair "
                       f"({lo:+.0f} to {hi:+.0f} points): the opposite of DS-26.**")
        else:
            out.append(f"**No consistent separation between the placements at this scale:** the dead-node fraction "
                       f"of node minus output placement ranges from {lo:+.0f} to {hi:+.0f} percentage points over the "
                       f"{len(diffs)} pairs; DS-26's contrast is not reproduced here.")
        out.append("")
    lows = []
    for r in results:
        steps, ent = r["curves"]["path_entropy"]
        i = min(range(len(ent)), key=ent.__getitem__)
        lows.append((ent[0], steps[0], ent[i], steps[i], r))
    if lows and max(low for _, _, low, _, _ in lows) < 0.4:
        a0 = [r["input_alignment_init"] for r in results]
        a1 = [r["input_alignment"] for r in results]
        first = min(s for _, s, _, _, _ in lows)
        # the largest leaf utilisation any run reaches again after its own lowest-entropy window
        late_util = max(u for _, _, _, s_low, r in lows for s, u in zip(*r["curves"]["leaf_util"]) if s >= s_low)
        out.append(
            f"Every run collapses early, whatever the placement and φ (tanh included): the training-batch path "
            f"entropy is {min(e for e, *_ in lows):.2f}–{max(e for e, *_ in lows):.2f} at step {first} and reaches "
            f"its lowest, {min(low for _, _, low, _, _ in lows):.2f}–{max(low for _, _, low, _, _ in lows):.2f}, "
            f"by step {min(x[3] for x in lows)}–{max(x[3] for x in lows)}; from that point on no run reaches more "
            f"than {late_util:.0%} of its leaves in any logged window. A cause shared by all runs dominates the "
            f"routing at this scale. The tree layers' inputs become more alike meanwhile "
            f"(input alignment {min(a0):.2f}–{max(a0):.2f} at initialisation, {min(a1):.2f}–{max(a1):.2f} at the "
            f"end), consistent with — not proof of — a shared direction in the inputs moving all tokens to the "
            f"same side of the routing hyperplanes: Adam moves every coordinate of a node's u by about lr per step, "
            f"which shifts u·x coherently for all tokens once their gradients share that direction.")
        out.append("")
    base = results[0]["lr"]
    for r in results:
        if r["lr"] == base:
            continue
        twin = by.get((r["placement"], r["activation"], base))
        if twin is None:
            continue
        low_r = min(r["curves"]["path_entropy"][1])
        low_t = min(twin["curves"]["path_entropy"][1])
        out.append(f"- {r['name']} (lr {r['lr']:g}) vs {twin['name']} (lr {base:g}): lowest training path entropy "
                   f"{low_r:.2f} vs {low_t:.2f}, final dead nodes {r['analysis']['mean']['dead_nodes']:.0%} vs "
                   f"{twin['analysis']['mean']['dead_nodes']:.0%}, val loss {r['val_loss']:.3f} vs "
                   f"{twin['val_loss']:.3f}.")
    removed = [1 - r["prune"]["nodes_after"] / r["prune"]["nodes_before"] for r in results]
    dl = [abs(r["prune"].get("val_loss_after", r["val_loss"]) - r["prune"].get("val_loss_before", r["val_loss"]))
          for r in results]
    out.append(f"- Pruning the nodes no token of 64 training windows reached removes {min(removed):.0%}–"
               f"{max(removed):.0%} of the tree nodes and changes the validation loss by at most {max(dl):.4f} nats: "
               f"the removed paths carry no validation traffic that matters, so the static half of the claim "
               f"(dead paths can be pruned for free) holds here — trivially, after such a collapse.")
    for act, lr in dict.fromkeys((r["activation"], r["lr"]) for r in results):
        n, o = by.get(("node", act, lr)), by.get(("output", act, lr))
        if n is None or o is None:
            continue
        mn, mo = n["analysis"]["mean"], o["analysis"]["mean"]
        out.append(f"- {act}, lr {lr:g}: dead nodes {mn['dead_nodes']:.0%} (node) vs {mo['dead_nodes']:.0%} (output), "
                   f"path entropy {mn['path_entropy']:.2f} vs {mo['path_entropy']:.2f}, val loss "
                   f"{n['val_loss']:.3f} vs {o['val_loss']:.3f}.")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balance", default="none", choices=("none", "threshold"),
                   help="tree.balance of every run (default none: the layer as published, what DS-26 describes)")
    p.add_argument("--out", default=str(ROOT / "runs" / "autoprune"), help="where the runs go (default runs/autoprune)")
    p.add_argument("--data", default=None, help="prepared data directory (default: the default corpus)")
    p.add_argument("--docs", default=str(ROOT / "docs" / "autoprune.md"), help="report to write")
    p.add_argument("--runs", default=DEFAULT_RUNS,
                   help=f"runs as PLACEMENT-ACTIVATION[@LR], comma-separated (default {DEFAULT_RUNS})")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--redo-analysis", action="store_true", help="redo analyze/prune of reused runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from treeffn.data import default_data_dir

    t_start = time.perf_counter()
    data = Path(args.data) if args.data else default_data_dir()
    out = Path(args.out)
    docs = Path(args.docs)
    results = []
    for spec in parse_runs(args.runs, args.lr):
        name, placement, act = spec["name"], spec["placement"], spec["activation"]
        ov = {**shape_overrides(args, spec["lr"]), "tree.placement": placement, "tree.activation": act}
        val_loss, secs = train_one(name, ov, out, data, args.steps)
        run = out / name
        res, pr = analysed(run, args.redo_analysis)
        align0, align1 = alignments(run, ov, data)
        results.append({**spec, "val_loss": val_loss,
                        "train_seconds": secs, "config": res["config"], "analysis": res, "curves": curves_of(run),
                        "prune": pr, "input_alignment_init": align0, "input_alignment": align1})
        m = res["mean"]
        print(f"[{name}] val loss {val_loss:.4f}  leaf_util {m['leaf_util']:.3f}  dead {m['dead_nodes']:.3f}  "
              f"entropy {m['path_entropy']:.3f}  input alignment {align0:.2f} -> {align1:.2f}  "
              f"pruned {pr['nodes_after']}/{pr['nodes_before']} nodes, "
              f"val loss {pr.get('val_loss_after', float('nan')):.4f}  ({secs:.0f}s training)", flush=True)
    if not results:
        raise SystemExit("no run selected")
    figs = plot(results, docs.parent / "autoprune", args.lr)
    command = " ".join([".venv/bin/python experiments/autoprune/run.py", *(argv if argv is not None else sys.argv[1:])])
    write_docs(results, docs, figs, command.strip(), args, time.perf_counter() - t_start)
    summary = [{k: v for k, v in r.items() if k not in ("analysis", "curves")} | {"mean": r["analysis"]["mean"]}
               for r in results]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {docs}, {', '.join(map(str, figs))} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
