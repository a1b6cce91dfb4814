"""Controlled quality study: tree feed-forward layers against dense MLPs and top-k MoE on the default corpus.

Every run uses the ``tiny`` shape (4 layers, d_model 256, context 256, batch 16 × 256 tokens, AdamW lr 2e-3, cosine
schedule), the same seed-determined batches and the same token budget; only the feed-forward block differs:

    dense-1020            dense GELU MLP of equal *training* width (K·N = 1,020 units)
    dense-32              dense GELU MLP of equal *inference* width (K·L = 32 units): the critics' comparison
    moe-top1 / moe-top2   token-choice MoE with 32 active units per token (32 experts × 32, or 64 × 16 top-2)
    tree-node             tree 4x7, φ on each node (UFB-23), per-node routing thresholds, output vectors initialised
                          at the residual-branch scale (the default setting)
    tree-node-faithful    the same without thresholds
    tree-node-ufbinit     thresholds, but UFB-23's output initialisation
    tree-node-ufb         neither: the layer exactly as published (UFB-23 / DS-26)
    tree-output(-faithful) φ after the per-tree accumulation (DS-26's balanced variant), with / without thresholds
    tree-1x7w4            one tree of depth 7 with 4 units per node: 32 active of 1,020, contiguous blocks
    tree-node-children    tree-node routing each token to the child whose unit responds more (``tree.route``)
    tree-node-bestpath    tree-node with the routing loss (``tree.route_loss`` 1; ...01: 0.1): each node trained
                          towards the child whose subtree holds the better path
    tree-node-stgrad      tree-node with the straight-through routing gradient (``tree.route_grad`` 1; ...4: 4)
    tree-node-children-stgrad4  both: routed by children, straight-through gradient at weight 4
    topk-32of1020         GELU MLP of 1,020 units keeping its 32 largest activations per token (trained sparsity)

    .venv/bin/python experiments/quality/run.py                       # the default plan, in priority order
    .venv/bin/python experiments/quality/run.py --runs tree-node,dense-1020 --seeds 0,1,2 --steps 1200
    .venv/bin/python experiments/quality/run.py --report-only          # rewrite docs/quality.md from what exists
    .venv/bin/python experiments/quality/run.py --speed --report-only  # add decoding tokens/s (on an idle machine)
    .venv/bin/python experiments/quality/run.py --choice --report-only # add the choice-of-units statistics

Each run is a ``treeffn train --resume`` subprocess checkpointing every 100 steps into ``--out/<name>-s<seed>-
<steps>``: stop the study at any time and start it again, and it continues where it stopped; finished runs are
reused, and so are their evaluations. A finished, evaluated run is also summarised (metrics, routing statistics,
curves, commit) in ``docs/quality/runs/<run>.json``; those summaries are committed, so a later checkout rebuilds the
report and skips finished runs without their checkpoints. ``--max-minutes`` stops launching new runs after that long. The report lists
the runs that exist (a run still in progress is listed as such) and the commit each ran. Evaluation: the full
validation split (464k tokens), routing statistics of tree layers on 256 validation windows (``treeffn analyze``).
Decoding speed is measured only with ``--speed``, every finished run afresh in interleaved rounds in this process, and
never while a training run is going: a timing taken beside another job is not a figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRESET = "tiny"
SAVE_EVERY = 100

RUNS: dict[str, tuple[str, dict]] = {
    "dense-1020": ("dense GELU MLP, 1,020 units (equal training width)", {"ffn.kind": "dense", "ffn.hidden": 1020}),
    "dense-32": ("dense GELU MLP, 32 units (equal inference width)", {"ffn.kind": "dense", "ffn.hidden": 32}),
    "moe-top1": ("MoE 32 experts × 32 units, top-1", {"ffn.kind": "moe", "moe.experts": 32, "ffn.hidden": 32,
                                                        "moe.top_k": 1}),
    "moe-top2": ("MoE 64 experts × 16 units, top-2", {"ffn.kind": "moe", "moe.experts": 64, "ffn.hidden": 16,
                                                        "moe.top_k": 2}),
    "tree-node": ("tree 4x7, node placement, routing thresholds", {"ffn.kind": "tree"}),
    "tree-node-faithful": ("tree 4x7, node placement, no thresholds",
                           {"ffn.kind": "tree", "tree.balance": "none"}),
    "tree-node-ufbinit": ("tree 4x7, node placement, thresholds, UFB-23 output init",
                          {"ffn.kind": "tree", "tree.init": "ufb"}),
    "tree-node-ufb": ("tree 4x7, node placement, no thresholds, UFB-23 output init (as published)",
                      {"ffn.kind": "tree", "tree.balance": "none", "tree.init": "ufb"}),
    "tree-output": ("tree 4x7, output placement, routing thresholds",
                    {"ffn.kind": "tree", "tree.placement": "output"}),
    "tree-output-faithful": ("tree 4x7, output placement, no thresholds (DS-26 balanced form)",
                             {"ffn.kind": "tree", "tree.placement": "output", "tree.balance": "none"}),
    "tree-1x7w4": ("tree 1x7, 4 units per node, routing thresholds",
                   {"ffn.kind": "tree", "tree.trees": 1, "tree.node_width": 4}),
    "tree-node-children": ("tree 4x7, node placement, thresholds, routed to the child that responds more",
                           {"ffn.kind": "tree", "tree.route": "children"}),
    "tree-node-bestpath": ("tree 4x7, node placement, thresholds, routing loss towards the better subtree (weight 1)",
                           {"ffn.kind": "tree", "tree.route_loss": 1.0}),
    "tree-node-bestpath01": ("tree 4x7, node placement, thresholds, routing loss towards the better subtree "
                             "(weight 0.1)", {"ffn.kind": "tree", "tree.route_loss": 0.1}),
    "tree-node-stgrad": ("tree 4x7, node placement, thresholds, straight-through routing gradient (weight 1)",
                         {"ffn.kind": "tree", "tree.route_grad": 1.0}),
    "tree-node-stgrad4": ("tree 4x7, node placement, thresholds, straight-through routing gradient (weight 4)",
                          {"ffn.kind": "tree", "tree.route_grad": 4.0}),
    "tree-node-children-stgrad4": ("tree 4x7, node placement, thresholds, routed by children, straight-through "
                                   "routing gradient (weight 4)",
                                   {"ffn.kind": "tree", "tree.route": "children", "tree.route_grad": 4.0}),
    "topk-32of1020": ("GELU MLP of 1,020 units, 32 largest activations kept",
                      {"ffn.kind": "topk", "ffn.hidden": 1020, "topk.active": 32}),
}

# (name, seed, steps) in priority order: the one-epoch comparison first, then seeds, then the longer pair.
EPOCH = 1200  # 1,200 × 16 × 256 = 4.9M tokens ≈ one epoch of the default corpus's 4.8M training tokens
DEFAULT_PLAN = (
    [(n, 0, EPOCH) for n in ("tree-node", "dense-1020", "dense-32", "tree-node-faithful", "tree-node-ufbinit",
                             "tree-output", "tree-node-ufb", "tree-output-faithful", "moe-top1", "moe-top2",
                             "tree-1x7w4", "topk-32of1020", "tree-node-children", "tree-node-bestpath",
                             "tree-node-stgrad", "tree-node-stgrad4", "tree-node-children-stgrad4",
                             "tree-node-bestpath01")]
    + [(n, s, EPOCH) for s in (1, 2) for n in ("dense-1020", "tree-node", "dense-32", "tree-node-children",
                                                 "tree-node-stgrad4")]
    + [(n, 0, 3 * EPOCH) for n in ("dense-1020", "tree-node")]
)


def run_dir(out: Path, name: str, seed: int, steps: int) -> Path:
    return out / f"{name}-s{seed}-{steps}"


def code_commit() -> str:
    """The commit of the treeffn code this process imports, with '+dirty' when its code (src/, experiments/,
    pyproject.toml) has uncommitted changes."""
    import treeffn

    src = Path(treeffn.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        # code only: the study's own outputs under docs/ change while it runs
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "--",
                                ":/src", ":/experiments", ":/pyproject.toml"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def steps_done(run: Path) -> int:
    from treeffn import checkpoint as ckpt
    from treeffn.errors import TreeffnError

    try:
        return int(json.loads((ckpt.resolve(run) / "trainer.json").read_text())["step"])
    except (TreeffnError, OSError, KeyError, ValueError):
        return 0


def study_record(run: Path) -> Path:
    """Where a run's study record (name, overrides, commits it trained with) lives: beside the run folder, which
    belongs to ``treeffn train``."""
    return run.parent / f"{run.name}.study.json"


def train_run(name: str, seed: int, steps: int, run: Path, data: Path) -> None:
    """Train (or continue) one run in a subprocess; records the commit it ran in :func:`study_record`."""
    overrides = {**RUNS[name][1], "train.seed": seed, "train.max_steps": steps, "train.save_every": SAVE_EVERY}
    if steps != EPOCH:  # the longer runs keep the one-epoch warm-up
        overrides["train.warmup_steps"] = 60
    run.parent.mkdir(parents=True, exist_ok=True)
    rec_file = study_record(run)
    rec = json.loads(rec_file.read_text()) if rec_file.is_file() else {"commits": []}
    commit = code_commit()
    if not rec["commits"] or rec["commits"][-1]["commit"] != commit:
        rec["commits"].append({"commit": commit, "from_step": steps_done(run)})
    rec.update({"name": name, "seed": seed, "steps": steps, "overrides": overrides})
    rec_file.write_text(json.dumps(rec, indent=2))
    cmd = [sys.executable, "-m", "treeffn.cli", "train", "--preset", PRESET, "--data", str(data), "--out", str(run),
           "--resume", "--quiet"]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={v}"]
    print(f"[{run.name}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"[{run.name}] done in {time.time() - t0:.0f} s", flush=True)


# ---- evaluation (cached per run) -------------------------------------------------------------------------------
def evaluated(run: Path, data: Path) -> dict:
    """Full-validation metrics and (tree layers) routing statistics of a finished run, cached in quality.json."""
    from treeffn import checkpoint as ckpt
    from treeffn.analyze import analyze
    from treeffn.evaluate import evaluate_checkpoint

    cache = run / "quality.json"
    stamp = (ckpt.resolve(run) / "model.safetensors").stat().st_mtime
    if cache.is_file() and cache.stat().st_mtime > stamp:
        return json.loads(cache.read_text())
    print(f"[{run.name}] evaluating on the full validation split", flush=True)
    res = evaluate_checkpoint(run, data, windows=0, batch_size=8, progress=False)
    cfg = ckpt.load_config(ckpt.resolve(run))
    if cfg.ffn.kind == "tree":
        a = analyze(run, data, windows=256, plots=False, progress=False, overwrite=True)
        res["routing"] = {"mean": a["mean"], "worst": {
            "dead_nodes": max(r["dead_nodes"] for r in a["layers"]),
            "leaf_util": min(r["leaf_util"] for r in a["layers"]),
            "path_entropy": min(r["path_entropy"] for r in a["layers"])}}
    cache.write_text(json.dumps(res, indent=2))
    return res


SPEED_ROUNDS = 5


def measure_speeds(runs: list[Path]) -> None:
    """Decoding tokens/s at batch 1 (prompt 32, 64 new tokens) of every run, written to its speed.json with when and
    with which commit. Timings of a tiny model's decoding move by tens of percent within minutes on a shared machine,
    so every model is timed in SPEED_ROUNDS interleaved rounds (a best of 3 each) and the median round is kept: drift
    during the pass falls on every model alike."""
    import torch

    from treeffn import checkpoint as ckpt
    from treeffn.evaluate import decode_speed

    models = {run: ckpt.load_model(run) for run in runs}
    rounds: dict[Path, list[float]] = {run: [] for run in runs}
    for _ in range(SPEED_ROUNDS):
        for run, model in models.items():
            rounds[run].append(decode_speed(model, prompt_len=32, new_tokens=64, repeats=3))
    stamp = {"threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0], "commit": code_commit(),
             "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for run, speeds in rounds.items():
        rec = {"decode_tok_per_s": statistics.median(speeds), "rounds": speeds, **stamp}
        (run / "speed.json").write_text(json.dumps(rec, indent=2))


CHOICE_WINDOWS = 32
CHOICE_KEYS = ("choice_overlap", "choice_capture", "choice_overlap_random", "choice_capture_random", "best_agree")


def measure_choice(run: Path, data: Path) -> dict | None:
    """``treeffn analyze``'s choice-of-units statistics (means over layers) on CHOICE_WINDOWS validation windows,
    cached in choice.json; None for a model without tree layers."""
    from treeffn import checkpoint as ckpt
    from treeffn.analyze import analyze

    if ckpt.load_config(ckpt.resolve(run)).ffn.kind != "tree":
        return None
    cache = run / "choice.json"
    stamp = (ckpt.resolve(run) / "model.safetensors").stat().st_mtime
    if cache.is_file() and cache.stat().st_mtime > stamp:
        rec = json.loads(cache.read_text())
        if all(k in rec for k in CHOICE_KEYS + ("loss_best_paths",)):  # else measured before a statistic was added
            return rec
    print(f"[{run.name}] choice of units on {CHOICE_WINDOWS} validation windows", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        a = analyze(run, data, windows=CHOICE_WINDOWS, out=tmp, plots=False, progress=False, overwrite=True,
                    best_path=True)
    rec = {k: a["mean"][k] for k in CHOICE_KEYS} | {"windows": CHOICE_WINDOWS, "loss_routed": a["best_path_loss"]["loss"],
                                                     "loss_best_paths": a["best_path_loss"]["loss_best_paths"]}
    cache.write_text(json.dumps(rec, indent=2))
    return rec


@functools.cache
def ffn_flops(name: str) -> float:
    """FFN FLOPs per token of a run of the plan, by the current code's accounting (a run's stored figure is that
    of the commit it ran, and the accounting of tree.route=children changed after its first run)."""
    from treeffn.config import get_config
    from treeffn.model import GPT

    return GPT(get_config(PRESET, RUNS[name][1])).flops_per_token()["ffn"]


DIAG = ("align", "centre", "margin", "live_grad", "u_norm", "b_abs")


def training_curves(run: Path) -> dict:
    """From metrics.jsonl: validation loss against tokens, and per-layer routing statistics against steps
    (``diag``: step -> {quantity: per layer, per level lists} of ``layers.tree.routing_diagnostics``)."""
    val, ent, dead, align, tok_s = [], [], [], [], []
    diag: list = []
    last = 0
    tokens_per_step = 16 * 256
    for ln in (run / "metrics.jsonl").read_text().splitlines():
        if not ln.strip():
            continue
        r = json.loads(ln)
        if "val_loss" in r:
            val.append((r["step"] * tokens_per_step, r["val_loss"]))
        layers = sorted(k for k in r if k.startswith("tree/path_entropy/layer"))
        if layers:
            ent.append((r["step"], [r[k] for k in layers]))
            dead.append((r["step"], [r[k.replace("path_entropy", "dead_nodes")] for k in layers]))
            if all(k.replace("path_entropy", "align") in r for k in layers):
                align.append((r["step"], [r[k.replace("path_entropy", "align")] for k in layers]))
            d = {}
            for q in DIAG:
                key = "align" if q == "align" else f"{q}_levels"
                per_layer = [r.get(k.replace("path_entropy", key)) for k in layers]
                if all(v is not None for v in per_layer):
                    d[q] = per_layer
            if d:
                diag.append((r["step"], d))
        if "tok_per_s" in r:
            tok_s.append(r["tok_per_s"])
        last = max(last, r.get("step", 0))
    return {"val": val, "entropy": ent, "dead": dead, "align": align, "diag": diag, "last_step": last,
            "train_tok_per_s": statistics.median(tok_s) if tok_s else float("nan")}


# ---- report ----------------------------------------------------------------------------------------------------
def summary_path(docs: Path, name: str, seed: int, steps: int) -> Path:
    return docs.parent / "quality" / "runs" / f"{name}-s{seed}-{steps}.json"


def collect(out: Path, data: Path, plan: list[tuple[str, int, int]], speed: bool, docs: Path,
            choice: bool = False) -> list[dict]:
    """Rows for the report: live run folders first, else the committed summaries of finished runs."""
    rows = []
    if speed:
        runs = [(run_dir(out, name, seed, steps), steps) for name, seed, steps in plan]
        measure_speeds([run for run, steps in runs if (run / "metrics.jsonl").is_file() and steps_done(run) == steps])
    for name, seed, steps in plan:
        run = run_dir(out, name, seed, steps)
        summary = summary_path(docs, name, seed, steps)
        if not (run / "metrics.jsonl").is_file():
            if summary.is_file():
                rows.append(json.loads(summary.read_text()))
            continue
        done = steps_done(run)
        row = {"name": name, "seed": seed, "steps": steps, "done": done, "run": run,
               "study": json.loads(study_record(run).read_text()) if study_record(run).is_file() else {},
               "curves": training_curves(run)}
        if done == steps:
            row["eval"] = evaluated(run, data)
            if (run / "speed.json").is_file():
                row["speed"] = json.loads((run / "speed.json").read_text())
            elif summary.is_file() and "speed" in json.loads(summary.read_text()):
                row["speed"] = json.loads(summary.read_text())["speed"]
            if choice or (run / "choice.json").is_file():
                if (measured := measure_choice(run, data)) is not None:
                    row["choice"] = measured
            elif summary.is_file() and "choice" in json.loads(summary.read_text()):
                row["choice"] = json.loads(summary.read_text())["choice"]
            summary.parent.mkdir(parents=True, exist_ok=True)
            keep = {k: v for k, v in row.items() if k != "run"}  # no machine paths in the committed summary
            keep["eval"] = {k: v for k, v in row["eval"].items() if k != "checkpoint"}
            summary.write_text(json.dumps(keep, separators=(",", ":")) + "\n")
        rows.append(row)
    return rows


def fmt_mean(vals: list[float], digits: int = 4) -> str:
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f} (n={len(vals)})"


def min_entropy_after(curve: list, step: int = 10) -> float:
    vals = [min(v) for s, v in curve if s > step]
    return min(vals) if vals else float("nan")


def _routing_mean(levels: list[float], diag: dict) -> float:
    """Mean over the routing levels of a per-level diagnostic (older logs also carry a leaf entry: dropped)."""
    n = len(diag["u_norm"][0]) - 1  # u_norm has one entry per level, leaves included
    return sum(levels[:n]) / max(1, min(n, len(levels)))


def plot(rows: list[dict], fig_dir: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig = Figure(figsize=(14, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for r in rows:
        label = f"{r['name']} s{r['seed']}" + ("" if r["steps"] == EPOCH else f" ({r['steps']} steps)")
        c = r["curves"]
        if c["val"]:
            ax1.plot([t / 1e6 for t, _ in c["val"]], [v for _, v in c["val"]], marker=".", label=label)
        if c["entropy"]:
            ax2.plot([s for s, _ in c["entropy"]], [min(v) for _, v in c["entropy"]], label=label)
            ax3.plot([s for s, _ in c["dead"]], [max(v) for _, v in c["dead"]], label=label)
    ax1.set_xlabel("training tokens (M)")
    ax1.set_ylabel("validation loss (nats, 256 windows)")
    ax1.set_title("loss against tokens")
    ax1.legend(fontsize=6)
    ax2.set_title("path entropy, worst layer (training batches)")
    ax2.set_xlabel("step")
    ax2.set_ylim(-0.02, 1.02)
    ax3.set_title("dead nodes, worst layer (training batches)")
    ax3.set_xlabel("step")
    ax3.set_ylim(-0.02, 1.02)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    paths.append(fig_dir / "curves.png")
    fig.savefig(paths[-1])

    trees = [r for r in rows if r["curves"].get("diag")]
    if trees:
        fig = Figure(figsize=(15, 7.5), dpi=110)
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 3).reshape(-1)
        panels = [
            ("align", lambda d: sum(d["align"]) / len(d["align"]),
             "routing-input alignment (mean cosine between tokens), mean of layers"),
            ("centre", lambda d: sum(v[0] for v in d["centre"]) / len(d["centre"]),
             "root: |mean s − c| / std s (≫ 1: all tokens go one way)"),
            ("centre", lambda d: sum(_routing_mean(v, d) for v in d["centre"]) / len(d["centre"]),
             "inner nodes: |mean s − c| / std s, mean of levels"),
            ("live_grad", lambda d: sum(sum(v) / len(v) for v in d["live_grad"]) / len(d["live_grad"]),
             "visited units with φ'(λ) > 0.05"),
            ("u_norm", lambda d: sum(v[0] for v in d["u_norm"]) / len(d["u_norm"]), "root ‖u‖ (solid) and |b| (dotted)"),
            ("margin", lambda d: sum(_routing_mean(v, d) for v in d["margin"]) / len(d["margin"]),
             "routing margin |s − c|, inner levels"),
        ]
        for ax, (q, f, title) in zip(axes, panels):
            for r in trees:
                pts = [(st, f(d)) for st, d in r["curves"]["diag"] if q in d]
                if not pts:
                    continue
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{r['name']} s{r['seed']}")
                if q == "u_norm":
                    b = [(st, sum(v[0] for v in d["b_abs"]) / len(d["b_abs"])) for st, d in r["curves"]["diag"]
                         if "b_abs" in d]
                    ax.plot([p[0] for p in b], [p[1] for p in b], ":", color=line.get_color())
            ax.set_xscale("symlog", linthresh=50)
            ax.set_xlabel("step")
            ax.set_title(title, fontsize=9)
        axes[0].legend(fontsize=6)
        fig.tight_layout()
        paths.append(fig_dir / "diagnosis.png")
        fig.savefig(paths[-1])

    done = [r for r in rows if "eval" in r and r["steps"] == EPOCH]
    if done:
        fig = Figure(figsize=(10, 4.2), dpi=110)
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(1, 2)
        for r in done:
            e = r["eval"]
            ax1.scatter(ffn_flops(r["name"]) / 1e6, e["val_loss"])
            ax1.annotate(f"{r['name']} s{r['seed']}", (ffn_flops(r["name"]) / 1e6, e["val_loss"]), fontsize=7)
            if "speed" in r:
                ax2.scatter(r["speed"]["decode_tok_per_s"], e["val_loss"])
                ax2.annotate(f"{r['name']} s{r['seed']}", (r["speed"]["decode_tok_per_s"], e["val_loss"]), fontsize=7)
        ax1.set_xscale("log")
        ax1.set_xlabel("FFN FLOPs per token (M, analytic)")
        ax1.set_ylabel("validation loss (nats, full split)")
        ax1.set_title("loss against FFN cost")
        ax2.set_xlabel("decoding tokens/s, batch 1 (measured)")
        ax2.set_title("loss against decoding speed" + ("" if any("speed" in r for r in done) else " (not measured)"))
        fig.tight_layout()
        paths.append(fig_dir / "pareto.png")
        fig.savefig(paths[-1])
    return paths


def write_report(rows: list[dict], docs: Path, figs: list[Path], command: str,
                 plan: list[tuple[str, int, int]]) -> None:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["name"], r["steps"]), []).append(r)
    commits = [f"{r['name']} (seed {r['seed']}, {r['steps']} steps): "
               + ", ".join(f"`{c['commit'][:12]}` from step {c['from_step']}" for c in r["study"].get("commits", []))
               for r in rows]
    lines = [
        "# Trees that learn: a controlled quality study",
        "",
        "Tree feed-forward layers against dense MLPs and top-k MoE on the default corpus, `tiny` shape (4 layers, "
        "d_model 256, context 256), same seeds, same batches, same token budget; only the feed-forward block "
        "differs. One epoch is 1,200 steps × 16 × 256 = 4.9M tokens.",
        "",
        f"Produced by `{command}` (runs under `runs/quality`; the table and figures are rebuilt from the runs that "
        "exist, so a partial study is reported as partial).",
        "",
        "Commits the runs trained with: " + ("; ".join(commits) or "–") + ".",
        "",
        "## Results",
        "",
        "Validation loss on the full validation split (464k tokens). Routing statistics of tree layers on 256 "
        "validation windows at the end (worst layer); the entropy column is the lowest path entropy of any layer on "
        "training batches after step 10. Decoding: batch 1, 32-token prompt, 64 new tokens.",
        "",
        "| run | description | steps | active FFN units | FFN FLOPs/token | val loss | bits/byte | dead nodes "
        "(worst) | leaf use (worst) | min path entropy after step 10 | training tok/s | decoding tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, steps), rs in groups.items():
        fin = [r for r in rs if "eval" in r]
        if not fin:
            at = [max(r["done"], r["curves"].get("last_step", 0)) for r in rs]
            lines.append(f"| {name} | {RUNS[name][0]} | {steps} | | | in progress: step "
                         f"{', '.join(str(a) for a in at)} | | | | | | |")
            continue
        e0 = fin[0]["eval"]
        vl = fmt_mean([r["eval"]["val_loss"] for r in fin])
        bpb = fmt_mean([r["eval"]["bits_per_byte"] for r in fin])
        rout = [r["eval"].get("routing") for r in fin]
        dead = fmt_mean([x["worst"]["dead_nodes"] for x in rout if x], 3) if any(rout) else "–"
        leaf = fmt_mean([x["worst"]["leaf_util"] for x in rout if x], 3) if any(rout) else "–"
        ents = [min_entropy_after(r["curves"]["entropy"]) for r in fin if r["curves"]["entropy"]]
        ent = fmt_mean(ents, 3) if ents else "–"
        tok = fmt_mean([r["curves"]["train_tok_per_s"] for r in fin], 0)
        dec = [r["speed"]["decode_tok_per_s"] for r in fin if "speed" in r]
        lines.append(f"| {name} | {RUNS[name][0]} | {steps} | {e0['ffn_units_active']:,.0f} | "
                     f"{ffn_flops(name):,.0f} | {vl} | {bpb} | {dead} | {leaf} | {ent} | {tok} | "
                     f"{fmt_mean(dec, 1) if dec else '–'} |")
    lines += ["", "Training tokens/s is the median of the logged windows and was taken while other work shared the "
              "machine; it is not a speed figure (docs/benchmarks.md has those)."]
    passes = sorted({(r["speed"].get("measured", "before the pass was recorded"), r["speed"].get("commit", "?")[:12])
                     for r in rows if "speed" in r})
    if passes:
        lines.append("Decoding tokens/s: " + "; ".join(f"measured {when} with `{commit}`" for when, commit in passes)
                     + f" (`--speed` times every finished run in one pass of {SPEED_ROUNDS} interleaved rounds and "
                       "keeps the median round, with nothing else running).")
    lines.append("")
    rel = [os.path.relpath(f, docs.parent) for f in figs]
    for f in rel:
        lines += [f"![{Path(f).stem}]({f})", ""]
    lines += reading(rows)
    lines += choice_table(rows)
    lines += FINDINGS.format(**init_scales()).strip("\n").split("\n") + [""]
    lines += scale_findings(rows)
    lines += choice_findings(rows)
    lines += routing_signal_findings(rows)
    lines += open_questions(rows)
    lines += missing_runs(rows, plan)
    docs.write_text("\n".join(lines) + "\n")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def collapse_facts(r: dict) -> str | None:
    """One sentence on a tree run's early routing: the lowest path entropy after step 10 and, at that step, how
    alike the routing inputs were and how far the root's mean score sat from its threshold in units of its spread."""
    ent = [(st, min(v)) for st, v in r["curves"]["entropy"] if st > 10]
    diag = dict((st, d) for st, d in r["curves"].get("diag", []))
    if not ent:
        return None
    st, low = min(ent, key=lambda e: e[1])
    first = next((s for s, v in ent if v < 0.5), None)
    d = diag.get(st, {})
    parts = [f"**{r['name']}** (seed {r['seed']}): lowest path entropy after step 10 is {low:.3f} (worst layer, "
             f"step {st})" + (f"; first below 0.5 at step {first}" if first is not None else "; never below 0.5")]
    if "align" in d:
        parts.append(f"routing-input alignment then {min(d['align']):.2f}–{max(d['align']):.2f} across layers")
    if "centre" in d:
        parts.append(f"root |mean s − c| / std s {min(v[0] for v in d['centre']):.1f}–"
                     f"{max(v[0] for v in d['centre']):.1f}")
    if "u_norm" in d and "b_abs" in d:
        parts.append(f"root ‖u‖ {_mean([v[0] for v in d['u_norm']]):.2f} against |b| "
                     f"{_mean([v[0] for v in d['b_abs']]):.3f}")
    if "live_grad" in d:
        parts.append(f"visited units with φ'(λ) > 0.05: {_mean([_mean(v) for v in d['live_grad']]):.2f}")
    end = r.get("eval", {}).get("routing", {}).get("worst")
    if end:
        parts.append(f"at the end on validation: dead nodes {end['dead_nodes']:.1%}, leaf use {end['leaf_util']:.3f}, "
                     f"path entropy {end['path_entropy']:.3f} (worst layer)")
    return "; ".join(parts) + "."


AUTOPRUNE_STEPS = (20, 50, 100, 300, 600, 1200)


def autoprune_contrast(rows: list[dict]) -> list[str]:
    """DS-26's auto-pruning contrast at this budget — node against output placement, no routing thresholds — as the
    dead-node fraction over training and at the end; empty until both runs exist."""
    by = {r["name"]: r for r in rows if r["steps"] == EPOCH and r["seed"] == 0 and r["curves"]["dead"]}
    pair = [by.get("tree-node-faithful"), by.get("tree-output-faithful")]
    if None in pair:
        return []

    def at(r: dict, step: int) -> float:
        st, v = min(r["curves"]["dead"], key=lambda e: abs(e[0] - step))
        return _mean(v)

    out = ["", "DS-26's auto-pruning contrast at this budget, node against output placement without routing thresholds "
           "(dead nodes: fraction of a layer's nodes that no token of the logged training batch reached, mean of the "
           "layers, at the logged step nearest each mark; end: on validation, worst layer):", "",
           "| run | " + " | ".join(f"step {s}" for s in AUTOPRUNE_STEPS) + " | end (validation) |",
           "|---|" + "---:|" * (len(AUTOPRUNE_STEPS) + 1)]
    ends = []
    for r in pair:
        end = r.get("eval", {}).get("routing", {}).get("worst", {}).get("dead_nodes")
        ends.append(end)
        out.append(f"| {r['name']} | " + " | ".join(f"{at(r, s):.1%}" for s in AUTOPRUNE_STEPS)
                   + f" | {'–' if end is None else f'{end:.1%}'} |")
    if None not in ends:
        node, output = ends
        grows = at(pair[0], EPOCH) > at(pair[0], 100)
        verdict = ("reproduced" if node - output >= 0.05 and grows else "not reproduced")
        out += ["", f"DS-26 reports node placement losing paths as training goes on while output placement stays "
                f"balanced. Here node placement ends with {node:.1%} dead nodes and output placement with "
                f"{output:.1%}, and node placement's dead fraction {'grows' if grows else 'falls'} from step 100 "
                f"to the end: the contrast is {verdict} at this budget (criterion: node placement at least 5 points "
                "more dead nodes at the end than output placement, and growing after step 100)."]
    return out


def val_gap(rows: list[dict], a: str, b: str, steps: int = EPOCH) -> list[tuple[int, float]]:
    """(tokens, mean val loss of a / mean val loss of b − 1) at every evaluation point both runs of ``steps`` steps
    logged, over the seeds both have finished."""
    curves = {}
    for r in rows:
        if r["steps"] == steps and r["name"] in (a, b) and "eval" in r:
            curves.setdefault(r["seed"], {})[r["name"]] = dict((int(t), v) for t, v in r["curves"]["val"])
    seeds = [c for c in curves.values() if a in c and b in c]
    if not seeds:
        return []
    points = sorted(set.intersection(*(set(c[a]) & set(c[b]) for c in seeds)))
    return [(t, _mean([c[a][t] for c in seeds]) / _mean([c[b][t] for c in seeds]) - 1) for t in points]


def longer_pair(rows: list[dict], a: str, b: str, epochs: int = 3) -> list[str]:
    """The longer pair (``epochs`` epochs, seed 0, its own cosine schedule): whether a's gap to b shrinks or grows
    with tokens, against the same pair at one epoch."""
    steps = epochs * EPOCH
    runs = {r["name"]: r for r in rows if r["steps"] == steps and r["seed"] == 0 and r["name"] in (a, b)}
    if not runs:
        return []
    head = f"**{epochs} epochs** ({steps:,} steps, {steps * 16 * 256 / 1e6:.1f}M tokens, seed 0): "
    if not all(n in runs and "eval" in runs[n] for n in (a, b)):
        state = ", ".join(f"{n} " + ("finished" if "eval" in runs[n] else f"at step {runs[n]['done']}") if n in runs
                          else f"{n} not started" for n in (a, b))
        return ["", head + f"in progress ({state})."]
    va, vb = runs[a]["eval"]["val_loss"], runs[b]["eval"]["val_loss"]
    one = {n: [r["eval"]["val_loss"] for r in rows if r["steps"] == EPOCH and r["seed"] == 0 and r["name"] == n
               and "eval" in r] for n in (a, b)}
    line = head + f"{a} {va:.4f} vs {b} {vb:.4f}, {va / vb - 1:+.2%}"
    if one[a] and one[b]:
        line += (f", against {one[a][0] / one[b][0] - 1:+.2%} for the same seed at one epoch "
                 f"({a} {one[a][0]:.4f} → {va:.4f}, {b} {one[b][0]:.4f} → {vb:.4f})")
    gaps = val_gap(rows, a, b, steps)
    out = ["", line + "."]
    if gaps:
        out += ["", f"{a} against {b} over the {epochs} epochs (validation loss at each evaluation): "
                + ", ".join(f"{t / 1e6:.1f}M tokens {g:+.1%}" for t, g in gaps)]
    return out


def reading(rows: list[dict]) -> list[str]:
    """The report's reading: every figure in it is computed here from the rows, nothing is typed in."""
    fin = final_losses(rows)
    out = ["## Reading", "", "Routing early in training (training batches, logged every 10 steps):", ""]
    for r in rows:
        if r["steps"] == EPOCH and r["curves"]["entropy"]:
            fact = collapse_facts(r)
            if fact:
                out.append(f"- {fact}")
    out += ["", "Quality at one epoch (full validation split):", ""]

    def cmp(a: str, b: str, what: str) -> None:
        if a in fin and b in fin:
            ma, mb = _mean(fin[a]), _mean(fin[b])
            line = f"- {a} vs {b} ({what}): {ma:.4f} vs {mb:.4f}, {ma / mb - 1:+.2%}"
            sds = [statistics.stdev(v) for v in (fin[a], fin[b]) if len(v) > 1]
            if sds:
                sd = max(max(sds), 1e-9)
                line += (f" (seeds {len(fin[a])} vs {len(fin[b])}); the difference is {abs(ma - mb) / sd:.2f} seed "
                         "standard deviations (the larger of those measured)")
                if len(fin[a]) > 1 and len(fin[b]) > 1:  # Welch's t: the difference over its standard error
                    se = math.sqrt(statistics.variance(fin[a]) / len(fin[a]) + statistics.variance(fin[b]) / len(fin[b]))
                    line += f", Welch's t {abs(ma - mb) / max(se, 1e-12):.1f}"
            else:
                line += " (one seed each)"
            out.append(line)

    cmp("tree-node", "dense-1020", "equal training width")
    cmp("tree-node", "dense-32", "equal inference width")
    cmp("tree-node", "tree-node-faithful", "routing thresholds on vs off")
    cmp("tree-node", "tree-node-ufbinit", "residual-scale vs UFB-23 output initialisation")
    cmp("tree-node", "tree-node-ufb", "the default setting vs the layer as published")
    cmp("tree-output", "tree-output-faithful", "routing thresholds on vs off, output placement")
    cmp("tree-output", "tree-node", "placement")
    cmp("tree-1x7w4", "tree-node", "one tree of 4-unit nodes vs four trees of 1-unit nodes")
    cmp("tree-node-children", "tree-node", "routing by the children's units vs the node's own")
    cmp("tree-node-children", "dense-1020", "equal training width, routed by children")
    cmp("tree-node-children", "dense-32", "equal inference width, routed by children")
    cmp("tree-node-bestpath", "tree-node", "routing loss (weight 1) on vs off")
    cmp("tree-node-bestpath01", "tree-node", "routing loss (weight 0.1) on vs off")
    cmp("tree-node-stgrad", "tree-node", "straight-through routing gradient on vs off")
    cmp("tree-node-stgrad4", "tree-node", "straight-through routing gradient (weight 4) on vs off")
    cmp("tree-node-stgrad4", "dense-1020", "equal training width, straight-through routing gradient")
    cmp("tree-node-stgrad4", "dense-32", "equal inference width, straight-through routing gradient")
    cmp("tree-node-children-stgrad4", "tree-node-children", "straight-through gradient on vs off, routed by children")
    cmp("tree-node-bestpath", "dense-1020", "equal training width, routing loss")
    cmp("tree-node-bestpath", "dense-32", "equal inference width, routing loss")
    for other in ("moe-top1", "moe-top2", "topk-32of1020"):
        cmp("tree-node", other, "32 active units each")
    out += autoprune_contrast(rows)
    gaps = val_gap(rows, "tree-node", "dense-1020")
    if gaps:
        out += ["", "tree-node against dense-1020 over the epoch (validation loss at each evaluation, mean over the seeds "
                "both have): " + ", ".join(f"{t / 1e6:.1f}M tokens {g:+.1%}" for t, g in gaps)]
    out += longer_pair(rows, "tree-node", "dense-1020")
    if "dense-32" in fin and "dense-1020" in fin:
        narrow, wide = _mean(fin["dense-32"]), _mean(fin["dense-1020"])
        out += ["", "Share of the gain from 32 to 1,020 dense units that a model with 32 active units recovers, "
                "(dense-32 − model) / (dense-32 − dense-1020), mean over its seeds:", ""]
        for name in RUNS:
            if name in fin and not name.startswith("dense") and fin[name]:
                out.append(f"- {name}: {(narrow - _mean(fin[name])) / (narrow - wide):+.0%}")
    if len(out) and out[-1] == "":
        out.pop()
    return out + [""]


FINDINGS = """
## What the measurements say

**The collapse.** Without routing thresholds every tree collapses onto (nearly) one path within the first few dozen
steps, whatever the output initialisation. The diagnosis figure and the routing lines above show why: in that phase
the routing inputs of a layer — its normed residual stream — become almost parallel for every token (alignment near
1), so at each node the mean score of the tokens sits many of its standard deviations away from the threshold and
every token turns the same way. The routing weights barely move meanwhile (‖u‖ steady, |b| more than ten times
smaller, so neither weight decay shrinking u nor the bias takes over), and most visited units keep φ'(λ) > 0.05, so
it is not the φ-driven starvation DS-26 describes. Alignment falls again after the warm-up (the first layer first),
and the faithful trees then slowly revive: their dead-node fraction falls over the rest of the epoch (curves
figure) instead of growing as in DS-26's auto-pruning. Per-node thresholds set from the batch
(tree.balance=threshold) split each node's tokens around their mean whatever direction they share: path entropy
stays near 1 and no node dies, in training and, with the running thresholds, on validation.

**Balance and quality.** Balanced routing is not better *quality* at this budget: with the residual-scale
initialisation the one-epoch loss with and without thresholds is about the same (the "routing thresholds on vs off"
line above). A balanced tree uses all its paths — which is what static pruning, kernel speed and any capacity
argument rely on — but at 4.9M tokens the collapsed-then-revived tree reaches the same loss.

**The initialisation.** UFB-23's output rule (uniform ±1/√(K·L·W)) makes each tree layer add to the residual stream
a random vector {ufb:.1f} times the RMS of the dense MLP's initial output (at initialisation, on 4 × 256 random
tokens, mean of the 4 layers; {residual:.2f} times with tree.init=residual, whose output vectors start at the scale of
the model's other residual-branch projections). That difference is the largest single improvement measured here
(the tree-node vs tree-node-ufbinit line above).

"""


def final_losses(rows: list[dict]) -> dict[str, list[float]]:
    fin: dict[str, list[float]] = {}
    for r in rows:
        if "eval" in r and r["steps"] == EPOCH:
            fin.setdefault(r["name"], []).append(r["eval"]["val_loss"])
    return fin


def longer_gap(rows: list[dict], a: str = "tree-node", b: str = "dense-1020",
               epochs: int = 3) -> tuple[float, float] | None:
    """(a's relative gap to b after ``epochs`` epochs, the same seed's gap after one), seed 0; None until both
    pairs are evaluated."""
    def loss(name: str, steps: int) -> float | None:
        got = [r["eval"]["val_loss"] for r in rows
               if r["name"] == name and r["steps"] == steps and r["seed"] == 0 and "eval" in r]
        return got[0] if got else None

    losses = [loss(n, s) for s in (epochs * EPOCH, EPOCH) for n in (a, b)]
    if None in losses:
        return None
    return losses[0] / losses[1] - 1, losses[2] / losses[3] - 1


GAP_SAME = 0.005  # gaps within half a point of each other: "unchanged"


def gap_trend(later: float, earlier: float) -> str:
    """What more tokens did to a relative gap: "widen it", "narrow it" or "leave it unchanged" (within
    :data:`GAP_SAME`)."""
    if abs(later - earlier) <= GAP_SAME:
        return "leave it unchanged"
    return "widen it" if later > earlier else "narrow it"


def scale_findings(rows: list[dict]) -> list[str]:
    """How much of the dense width 32 active units recover, for trees and MoE, and whether tokens close the gap."""
    fin = final_losses(rows)
    if not all(n in fin for n in ("dense-32", "dense-1020", "tree-node")):
        return []
    narrow, wide, tree = _mean(fin["dense-32"]), _mean(fin["dense-1020"]), _mean(fin["tree-node"])
    share = {n: (narrow - _mean(v)) / (narrow - wide) for n, v in fin.items()}
    gap = tree / wide - 1
    text = ("**Conditional computation at 32 active units.** At this scale the trees sit between the two dense "
            f"baselines: of the loss gained by going from 32 to 1,020 dense units, the default tree recovers "
            f"{share['tree-node']:.0%} (the \"share of the gain\" lines above) and ends {gap:+.2%} from the "
            f"1,020-unit MLP, so the target of coming within 2 % of it is {'met' if gap <= 0.02 else 'not met'}.")
    moes = [(n, d) for n, d in (("moe-top1", "32 experts of 32 units, top-1"), ("moe-top2", "64 experts of 16 units, "
                                "top-2")) if n in share]
    if moes:
        above = [n for n, _ in moes if share[n] >= share["tree-node"]]
        text += (" Token-choice MoE with the same active and total units recovers "
                 + "; ".join(f"{share[n]:.0%} ({n}, {d})" for n, d in moes) + f" against the tree's "
                 f"{share['tree-node']:.0%}: ")
        if not above:
            text += "less than the tree, so the shortfall is not particular to trees."
        elif len(above) == len(moes):
            text += "more than the tree, so a learned router chooses better than the trees' hyperplanes here."
        else:
            text += (f"{', '.join(above)} more than the tree and the other{'s' if len(moes) - len(above) > 1 else ''} "
                     "less, so a learned router can choose better than the trees' hyperplanes here.")
    gaps = val_gap(rows, "tree-node", "dense-1020")
    if len(gaps) > 1:
        first, last = gaps[0][1], gaps[-1][1]
        text += (f" Over the epoch the gap to the wide MLP went from {first:+.1%} to {last:+.1%} (the \"over the "
                 "epoch\" line above)")
        longer = longer_gap(rows)
        if longer:
            three, one = longer
            trend = gap_trend(three, one)
            text += (f", and over three epochs with their own schedule it is {three:+.2%} against {one:+.2%} at one "
                     f"epoch for the same seed: more tokens at this size {trend}")
            inside = val_gap(rows, "tree-node", "dense-1020", 3 * EPOCH)
            if len(inside) > 1:
                text += (f" (within the three-epoch run it went from {inside[0][1]:+.1%} at "
                         f"{inside[0][0] / 1e6:.1f}M tokens to {inside[-1][1]:+.1%})")
            if trend != "narrow it":
                text += "; DS-26's parity is reported at far larger widths and budgets"
        text += "."
    return [text, ""]


def open_questions(rows: list[dict]) -> list[str]:
    """What the study leaves open, from the runs that exist."""
    fin = final_losses(rows)
    met = ("tree-node" in fin and "dense-1020" in fin
           and _mean(fin["tree-node"]) / _mean(fin["dense-1020"]) - 1 <= 0.02)
    text = (f"**What is open.** The 2 % target against dense-1020 is {'met' if met else 'not met'}; the rows of the "
            "plan not yet run are listed below (`python experiments/quality/run.py` runs them, reusing every finished "
            "run). Of the training signals for the routing (above), a target built from response magnitudes makes the "
            "model worse, and the straight-through gradient, which takes its signal from the loss, gives a small gain "
            "at no inference cost that three seeds do not separate from seed noise (the comparisons above). Next:")
    nxt = []
    if "tree-node-children-stgrad4" not in fin:
        nxt.append("its combination with routing by children (tree-node-children-stgrad4, in the plan)")
    longer = longer_gap(rows)
    if longer is None:
        nxt.append("the three-epoch pair, to see whether the gap to the wide MLP shrinks with tokens")
    elif gap_trend(*longer) != "narrow it":
        nxt.append(f"since more tokens {gap_trend(*longer).replace('it', 'the gap')} at this width, wider models (more units per tree, "
                   "the regime DS-26 reports) rather than longer training")
    nxt.append("tree shapes whose tokens share fewer units at the same 32 active (every token of a 4x7 layer uses "
               "the same 4 root units and half of them the same 4 units below)")
    return [text + " " + "; ".join(nxt) + ".", ""]


def choice_table(rows: list[dict]) -> list[str]:
    """The choice-of-units statistics of the tree runs that have them (``--choice``), means over layers and seeds."""
    got: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("choice") and r["steps"] == EPOCH:
            got.setdefault(r["name"], []).append(r["choice"])
    if not got:
        return []
    out = ["**Choice of units.** How well each tree's paths pick the units that respond most to a token, from "
           f"`treeffn analyze` on {CHOICE_WINDOWS} validation windows (`--choice`): every unit's contribution has "
           "magnitude |φ(λ)|·‖v‖ (|λ|·‖v‖ for output placement); *overlap* is the fraction of the 32 largest that lie "
           "on the token's paths, *capture* the paths' share of the 32 largest contributions' sum (1 and 1 for the "
           "choice a top-k layer makes from the same weights); uniformly random walks give the floor. *Best agree* is "
           "the fraction of routing decisions that go towards the child whose subtree holds the better path by the "
           "same contributions (0.5 is a coin; what `tree.route_loss` trains towards). The last two columns are the "
           "loss on the same windows as the model routes and with every tree walking its best path by those "
           "contributions (`treeffn analyze --best-paths`, an oracle that reads every unit).", "",
           "| run | overlap | capture | random walks: overlap | random walks: capture | best agree | loss as routed "
           "| loss on best paths |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, cs in got.items():
        out.append(f"| {name} ({len(cs)} seed{'s' if len(cs) > 1 else ''}) | "
                   + " | ".join(f"{_mean([c[k] for c in cs]):.3f}" if all(k in c for c in cs) else "–"
                                for k in CHOICE_KEYS + ("loss_routed", "loss_best_paths")) + " |")
    out.append("")
    if "tree-node" in got:
        m = {k: _mean([c[k] for c in got["tree-node"]]) for k in CHOICE_KEYS[:4]}
        text = (f"The default tree's paths hold {m['choice_overlap']:.0%} of the 32 units a top-k choice would take "
                f"and {m['choice_capture']:.0%} of their contribution, against {m['choice_overlap_random']:.0%} and "
                f"{m['choice_capture_random']:.0%} for random walks through the same trees: the hyperplane at each "
                "node says little about which of the units below it will respond most")
        if "tree-node-children" in got:
            c = {k: _mean([x[k] for x in got["tree-node-children"]]) for k in CHOICE_KEYS[:4]}
            text += (f". Routing by children raises this to {c['choice_overlap']:.0%} and {c['choice_capture']:.0%}, "
                     "still far from a top-k layer's choice")
        out += [text + ".", ""]
    return out


def choice_findings(rows: list[dict]) -> list[str]:
    """The paragraphs on which units a token uses (the top-k MLP, one tree of wide nodes), computed from the runs;
    empty until those runs exist."""
    fin = final_losses(rows)
    if not all(n in fin for n in ("dense-32", "dense-1020", "tree-node")):
        return []
    narrow, wide = _mean(fin["dense-32"]), _mean(fin["dense-1020"])

    def share(name: str) -> str:
        return f"{(narrow - _mean(fin[name])) / (narrow - wide):.0%}"

    out = []
    if "topk-32of1020" in fin:
        tk = _mean(fin["topk-32of1020"])
        others = ", ".join(f"{n} {share(n)}" for n in ("tree-node", "moe-top1", "moe-top2", "tree-1x7w4") if n in fin)
        out += [f"**Which units, not how many.** The GELU MLP of 1,020 units that keeps only its 32 largest "
                f"activations per token (topk-32of1020, trained end to end) reaches {tk:.4f}, "
                f"{tk / wide - 1:+.2%} from the dense-1020 mean, and recovers {share('topk-32of1020')} of the gain "
                "from 32 to 1,020 dense units: at this scale 32 active units per token are enough when they are the "
                "right 32. Its choice reads all 1,020 pre-activations (its FLOPs are the dense layer's), while the "
                "models that choose cheaply — with a few hyperplanes or a router — recover far less "
                f"({others}). The shortfall of conditional computation here is the quality of the choice, not the "
                "number of active units, which points the next experiments at the routing rule: for instance routing "
                "a token to the child whose unit responds more, so that each hard decision compares the units it "
                "chooses between, as top-k does"
                + (" (measured below)." if "tree-node-children" in fin else "."), ""]
    if "tree-node-children" in fin:
        c, t = _mean(fin["tree-node-children"]), _mean(fin["tree-node"])
        sds = [statistics.stdev(v) for v in (fin["tree-node"], fin["tree-node-children"]) if len(v) > 1]
        sd = max(sds) if sds else float("nan")  # the larger of the seed standard deviations measured
        z = abs(c - t) / sd if sd == sd and sd > 0 else float("nan")
        if c < t and z > 3:
            verdict = "a gain beyond seed noise, but a small one"
        elif c < t:
            verdict = "better, but within 3 seed standard deviations"
        else:
            verdict = "no gain"
        tail = ""
        if "topk-32of1020" in fin:
            tail = (f" The top-k MLP's {_mean(fin['topk-32of1020']):.4f} stays far off: a greedy walk that compares "
                    "two candidates per level does not find the units that a choice over all 1,020 pre-activations "
                    "finds.")
        out += [f"**Routing by children.** Routing each token to the child whose unit responds more "
                f"(tree-node-children, `tree.route=children`; {len(fin['tree-node-children'])} seed"
                f"{'s' if len(fin['tree-node-children']) > 1 else ''}) reaches "
                f"{c:.4f} against {t:.4f} for tree-node ({len(fin['tree-node'])} seeds): {c / t - 1:+.2%}, "
                f"{z:.1f} times the larger seed standard deviation ({sd:.4f}), {verdict}; it recovers "
                f"{share('tree-node-children')} "
                f"of the 32 → 1,020 gain against tree-node's {share('tree-node')}, and reads 15 input rows per "
                f"tree and token instead of 8 (1.44x the layer's FLOPs).{tail}", ""]
    if "tree-1x7w4" in fin:
        w4, t = _mean(fin["tree-1x7w4"]), _mean(fin["tree-node"])
        out += [f"**Node width.** One tree of depth 7 with 4-unit nodes (the same 32 active of 1,020 units, read as "
                f"contiguous blocks) reaches {w4:.4f} against {t:.4f} for four trees of single-unit nodes "
                f"({w4 / t - 1:+.2%}): with one path per token its 32 units are fixed by 7 binary decisions instead "
                "of 28, so far fewer distinct unit sets are available to the tokens.", ""]
    return out


def routing_signal_findings(rows: list[dict]) -> list[str]:
    """The paragraph on training the routing (``tree.route_loss``, ``tree.route_grad``), computed from the runs;
    empty until one of those runs exists."""
    fin = final_losses(rows)
    names = [n for n in ("tree-node-bestpath", "tree-node-bestpath01", "tree-node-stgrad", "tree-node-stgrad4",
                         "tree-node-children-stgrad4") if n in fin]
    if "tree-node" not in fin or not names:
        return []
    t = _mean(fin["tree-node"])
    sd_t = statistics.stdev(fin["tree-node"]) if len(fin["tree-node"]) > 1 else float("nan")
    choice: dict[str, list[dict]] = {}
    for r in rows:
        if r["steps"] == EPOCH and r.get("choice"):
            choice.setdefault(r["name"], []).append(r["choice"])

    def stat(name: str, key: str) -> float | None:
        vals = [c[key] for c in choice.get(name, []) if key in c]
        return _mean(vals) if vals else None

    def loss(name: str) -> str:
        m = _mean(fin[name])
        n = len(fin[name])
        return (f"{m:.4f} ({n} seed{'s' if n > 1 else ''}; {m / t - 1:+.2%} against tree-node's {t:.4f}, "
                f"{(m - t) / sd_t:+.1f} of its seed standard deviations)")

    def agree(name: str) -> str:
        keys = ("best_agree", "choice_overlap", "choice_capture")
        got, base = [stat(name, k) for k in keys], [stat("tree-node", k) for k in keys]
        if any(v is None for v in got + base):
            return ""
        return (f"; decisions towards the better subtree {got[0]:.0%} (tree-node {base[0]:.0%}), overlap with the "
                f"top-k choice {got[1]:.3f} (tree-node {base[1]:.3f}), capture {got[2]:.3f} ({base[2]:.3f})")

    out = ["**Training the routing.** With `tree.route=self` a node's hyperplane learns only as its units' feature. "
           "Two training-only signals for where a token should go were measured (inference unchanged):"]
    for name, what in (("tree-node-bestpath", "the routing loss (`tree.route_loss` 1), each visited node pulled "
                        "towards the child whose subtree holds the path of largest contributions Σ|φ(λ)|·‖v‖"),
                       ("tree-node-bestpath01", "the same loss at weight 0.1"),
                       ("tree-node-stgrad", "the straight-through gradient (`tree.route_grad` 1): each hard "
                        "decision gets the LM-loss gradient a soft σ(s − c) decision between the two children's "
                        "outputs would get"),
                       ("tree-node-stgrad4", "the same gradient at weight 4"),
                       ("tree-node-children-stgrad4", "routing by children with that gradient (weight 4)")):
        if name in fin:
            out.append(f"- {name}, {what}: {loss(name)}{agree(name)}.")
    routed, best = stat("tree-node", "loss_routed"), stat("tree-node", "loss_best_paths")
    if ("tree-node-bestpath" in fin and routed is not None and best is not None and best > routed
            and _mean(fin["tree-node-bestpath"]) > t):
        out += ["", f"The routing loss does what it is built for — the decisions follow its target and the paths hold "
                "more of the largest contributions — and the model gets worse: the largest contributions are not the "
                "ones that lower the loss. The oracle says the same without training: routing the trained tree-node "
                f"along its best paths by contribution raises its loss on the choice windows from {routed:.4f} to "
                f"{best:.4f}. A routing target built from response magnitudes is the wrong target; the straight-through "
                "gradient takes its signal from the loss instead."]
    return out + [""]


def init_scales() -> dict[str, float]:
    """RMS of the feed-forward outputs at initialisation relative to the dense MLP's (same seed, 4 × 256 random
    tokens, mean over layers), for the tree with UFB-23's output rule and with the residual-scale rule."""
    import torch

    from treeffn.config import get_config
    from treeffn.model import GPT

    idx = torch.randint(0, 8192, (4, 256), generator=torch.Generator().manual_seed(0))
    rms = {}
    for name, over in (("dense", RUNS["dense-1020"][1]), ("ufb", {"ffn.kind": "tree", "tree.init": "ufb"}),
                       ("residual", {"ffn.kind": "tree"})):
        torch.manual_seed(0)
        model = GPT(get_config(PRESET, over)).eval()
        outs: list[float] = []
        hooks = [f.register_forward_hook(lambda m, a, o: outs.append(float(o[0].pow(2).mean().sqrt())))
                 for f in model.ffn_modules()]
        with torch.no_grad():
            model(idx)
        for h in hooks:
            h.remove()
        rms[name] = sum(outs) / len(outs)
    return {k: rms[k] / rms["dense"] for k in ("ufb", "residual")}


def missing_runs(rows: list[dict], plan: list[tuple[str, int, int]]) -> list[str]:
    have = {(r["name"], r["seed"], r["steps"]) for r in rows if "eval" in r}
    todo = [f"`{n}` seed {s}, {st} steps" for n, s, st in plan if (n, s, st) not in have]
    return (["## Not run yet", "", "- " + "\n- ".join(todo), ""]) if todo else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", help=f"comma-separated run names ({', '.join(RUNS)}); default: the full plan")
    ap.add_argument("--seeds", default="0", help="with --runs: comma-separated seeds (default 0)")
    ap.add_argument("--steps", type=int, default=EPOCH, help=f"with --runs: steps per run (default {EPOCH})")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "quality.md")
    ap.add_argument("--data", type=Path, default=None, help="prepared corpus (default: the default corpus)")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="launch no new run after this long (0 = no limit)")
    ap.add_argument("--report-only", action="store_true", help="train nothing; rebuild the report")
    ap.add_argument("--speed", action="store_true", help="measure decoding speed of finished runs (idle machine)")
    ap.add_argument("--choice", action="store_true", help="measure the choice-of-units statistics of finished tree "
                    "runs (treeffn analyze on a few validation windows; needs their checkpoints)")
    args = ap.parse_args(argv)

    from treeffn.data import default_data_dir, prepare

    data = args.data or default_data_dir()
    if args.data is None:
        prepare(data, progress=False)
    if args.runs:
        names = [n.strip() for n in args.runs.split(",") if n.strip()]
        bad = [n for n in names if n not in RUNS]
        if bad:
            ap.error(f"unknown run(s) {', '.join(bad)}; choose from {', '.join(RUNS)}")
        plan = [(n, int(s), args.steps) for s in args.seeds.split(",") for n in names]
    else:
        plan = list(DEFAULT_PLAN)
    t0 = time.time()
    if not args.report_only:
        for name, seed, steps in plan:
            run = run_dir(args.out, name, seed, steps)
            if steps_done(run) >= steps or (not run.exists() and summary_path(args.docs, name, seed, steps).is_file()):
                continue
            if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
                print(f"--max-minutes reached; {run.name} and later runs not started", flush=True)
                break
            train_run(name, seed, steps, run, data)
    full_plan = plan if args.runs else DEFAULT_PLAN
    rows = collect(args.out, data, full_plan, args.speed, args.docs, args.choice)
    figs = plot(rows, args.docs.parent / "quality")
    command = "python experiments/quality/run.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                     if (argv if argv is not None else sys.argv[1:]) else "")
    write_report(rows, args.docs, figs, command, list(DEFAULT_PLAN))
    print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
