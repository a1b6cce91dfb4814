"""The sparsity frontier of SmolLM2-135M-Instruct's MLPs: training-free activation sparsity against tree conversion.

Every row is the same imported model with its 30 SwiGLU MLPs (1,536 units each) made conditional, at 50 %, 25 %,
10 % and 5 % of the MLP's units active per token:

    dense                  the import itself (``treeffn import-gguf``), the scores the others are measured against
    teal / cats / wina-F   ``treeffn sparsify --method M --active F``: training-free thresholds (TEAL, CATS) or
                           top-K (WINA), calibrated per layer on 16,384 tokens of the default corpus
    tree-F                 ``treeffn convert``: each MLP replaced by trees fitted by layer-wise distillation on the same
                           16,384 calibration tokens, at the design of TREE_DESIGNS (K trees of depth d with W units
                           per node: K·(d+1)·W units read per token, about F of 1,536; K·(2^(d+1)−1)·W in all, about
                           one MLP's worth)
    tree-F-ft              (``--ft-steps N`` > 0) the converted model fine-tuned for N steps of 8 × 256 tokens

Evaluation, the same for every row: ``treeffn eval-tasks`` on ARC-Easy, ARC-Challenge, PIQA, HellaSwag and LAMBADA,
zero-shot, ``--limit`` examples each (the first of each test set; never used to calibrate or choose anything);
``treeffn eval`` for the validation loss (64 windows of 256 tokens of the default corpus's validation documents in
SmolLM2's vocabulary). Decoding tokens/s at batch 1 (64-token prompt, 64 new tokens, fp32; ``treeffn eval
--decode-speed``) is measured only with ``--speed``, one model after another, for the rows that lack it: decoding
runs the sparse MLPs' gathered kernel and the trees' fused kernel, and a timing taken beside other work is not a
figure, so run ``--speed`` with nothing else on the machine (models and accuracies can be made under load).

Each step is one ``treeffn`` command whose output is reused when it exists (delete it to redo the step), so the study
stops and resumes at any point; ``--rows`` runs a subset. A row with its evaluations is summarised (scores,
validation loss, decoding speed when measured, the sparsify/convert record, the commits that made it) in
``docs/sparsity-frontier/rows/<row>.json``; those summaries are committed, so a checkout without the models rebuilds
the report. Then it writes ``docs/sparsity-frontier.md`` and its plot from every summarised row, naming the commit
each model and evaluation was made with.

    python experiments/sparsity-frontier/run.py                       # the whole study (hours on 2 cores)
    python experiments/sparsity-frontier/run.py --rows dense,teal-10,tree-10 --limit 50
    python experiments/sparsity-frontier/run.py --speed --report-only  # decoding speeds, on an idle machine
    python experiments/sparsity-frontier/run.py --report-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TREEFFN = [sys.executable, "-m", "treeffn.cli"]
TASKS = ["arc_easy", "arc_challenge", "piqa", "hellaswag", "lambada_openai"]
# lm-eval's usual headline metric per task: length-normalised accuracy where the choices differ in length
METRIC = {"arc_easy": "acc", "arc_challenge": "acc_norm", "piqa": "acc_norm", "hellaswag": "acc_norm",
          "lambada_openai": "acc"}
FRACTIONS = (0.5, 0.25, 0.1, 0.05)
METHODS = ("teal", "cats", "wina")
CALIBRATION_TOKENS = 16384
# left out of a row's committed summary: per-layer detail, machine paths, timings, window lists
SIDE_DROPPED = ("layers", "out", "source", "seconds", "windows")
MLP_UNITS = 1536  # SmolLM2-135M's SwiGLU width
# fraction -> (trees K, depth d, units per node W): K·(d+1)·W read per token, K·(2^(d+1)−1)·W in all
TREE_DESIGNS = {0.5: (8, 2, 32), 0.25: (8, 3, 12), 0.1: (8, 5, 3), 0.05: (4, 6, 3)}


def pct(f: float) -> str:
    return f"{f * 100:g}"


def tree_units(f: float) -> tuple[int, int]:
    k, d, w = TREE_DESIGNS[f]
    return k * (d + 1) * w, k * (2 ** (d + 1) - 1) * w


def plan(fractions, ft_steps: int) -> dict[str, dict]:
    """name -> {kind, fraction, label}: every row of the study, in the order they are made."""
    rows = {"dense": {"kind": "dense", "fraction": 1.0, "label": "dense import"}}
    for f in fractions:
        for m in METHODS:
            rows[f"{m}-{pct(f)}"] = {"kind": m, "fraction": f, "label": f"{m.upper()} {pct(f)} %"}
        k, d, w = TREE_DESIGNS[f]
        active, total = tree_units(f)
        rows[f"tree-{pct(f)}"] = {"kind": "tree", "fraction": f,
                                  "label": f"tree {k}x{d} w{w} ({active} of {total} units), converted"}
        if ft_steps:
            rows[f"tree-{pct(f)}-ft"] = {"kind": "tree-ft", "fraction": f,
                                         "label": f"tree {k}x{d} w{w}, converted + {ft_steps} steps"}
    return rows


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/src",
                                ":/experiments", ":/pyproject.toml"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()  # code only: the study writes docs/ itself
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def sh(args: list[str], log: Path | None = None) -> None:
    print("+ treeffn " + " ".join(args[3:]) if args[:3] == TREEFFN else "+ " + " ".join(args), flush=True)
    t = time.time()
    if log is None:
        subprocess.run(args, check=True, cwd=ROOT)
    else:
        with open(log, "w") as f:
            subprocess.run(args, check=True, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    print(f"  done in {time.time() - t:.0f} s", flush=True)


def exists(folder: Path) -> bool:
    return (folder / "config.json").exists() or (folder / "checkpoint.json").exists()


# chance level of the five-task mean: 4-way ARC-Easy, ARC-Challenge and HellaSwag, 2-way PIQA, LAMBADA's exact
# word 0: (0.25 + 0.25 + 0.25 + 0.5 + 0) / 5
CHANCE = 0.25


def mean_stderr(scores: dict[str, float], limit: int) -> float:
    """Standard error of the mean of per-task accuracies, each a proportion over ``limit`` examples."""
    return math.sqrt(sum(p * (1 - p) / limit for p in scores.values())) / len(scores)


class Study:
    def __init__(self, args):
        from treeffn.cache import default_cache_dir

        self.args = args
        self.runs = Path(args.runs)
        self.dense = Path(args.dense) if args.dense else self.runs / "smollm2"
        self.evals = self.runs / "sparsity-frontier" / "evals"
        self.data = Path(args.data) if args.data else Path(default_cache_dir()) / "data" / "smollm2"
        self.ledger_path = self.runs / "sparsity-frontier" / "commits.json"
        self.ledger = json.loads(self.ledger_path.read_text()) if self.ledger_path.exists() else {}

    def folder(self, name: str) -> Path:
        return self.dense if name == "dense" else self.runs / "sparsity-frontier" / name

    def record(self, key: str) -> None:
        self.ledger[key] = commit()
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        self.ledger_path.write_text(json.dumps(self.ledger, indent=1, sort_keys=True))

    # ---- making the models ------------------------------------------------------------------------------------
    def prepare(self) -> None:
        if not exists(self.dense):
            sh(TREEFFN + ["import-gguf", "--out", str(self.dense)])
        if not (self.data / "meta.json").exists():
            sh(TREEFFN + ["data", "prepare", "--tokenizer", str(self.dense), "--out", str(self.data), "--quiet"])

    def make(self, name: str, row: dict) -> None:
        out = self.folder(name)
        if exists(out):
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        f, kind = row["fraction"], row["kind"]
        if kind in METHODS:
            sh(TREEFFN + ["sparsify", str(self.dense), "--method", kind, "--active", str(f), "--data", self.args.calibration,
                          "--tokens", str(CALIBRATION_TOKENS), "--out", str(out), "--quiet"])
        elif kind == "tree":
            k, d, w = TREE_DESIGNS[f]
            sh(TREEFFN + ["convert", str(self.dense), "--set", f"tree.trees={k}", "--set", f"tree.depth={d}",
                          "--set", f"tree.node_width={w}", "--data", self.args.calibration, "--tokens", str(CALIBRATION_TOKENS),
                          "--out", str(out), "--quiet"])
        elif kind == "tree-ft":
            sh(TREEFFN + ["train", "--init", str(self.folder(f"tree-{pct(f)}")), "--data", str(self.data),
                          "--out", str(out), "--set", "model.seq_len=256", "--set", "train.batch_size=8",
                          "--set", f"train.max_steps={self.args.ft_steps}", "--set", "train.warmup_steps=10",
                          "--set", "train.lr=3e-4", "--set", "train.eval_every=50", "--set", "train.eval_batches=8",
                          "--no-tensorboard", "--quiet"])
        self.record(name)

    # ---- evaluating them -------------------------------------------------------------------------------------
    def tasks_file(self, name: str) -> Path:
        return self.evals / f"{name}_tasks_limit{self.args.limit}.json"

    def eval_file(self, name: str) -> Path:
        return self.evals / f"{name}_eval.json"

    def speed_file(self, name: str) -> Path:
        return self.evals / f"{name}_speed.json"

    def evaluate(self, name: str, row: dict) -> None:
        self.evals.mkdir(parents=True, exist_ok=True)
        path = self.folder(name)
        # a fine-tuned tree trained on 256-token windows: scored at the import's context like the others
        ctx = ["--context", str(self.dense_context())] if row["kind"] == "tree-ft" else []
        out = self.tasks_file(name)
        if not out.exists():
            sh(TREEFFN + ["eval-tasks", str(path), "--tasks", ",".join(TASKS), "--shots", "0",
                          "--limit", str(self.args.limit), "--out", str(out), "--quiet"] + ctx,
               log=out.with_suffix(".log"))
            self.record(out.name)
        out = self.eval_file(name)
        if not out.exists():
            self.eval_json(path, out, ["--windows", "64"])

    def eval_json(self, path: Path, out: Path, extra: list[str]) -> None:
        """``treeffn eval PATH --json`` at the study's context into ``out``, recorded in the ledger."""
        cmd = TREEFFN + ["eval", str(path), "--data", str(self.data), "--context", str(min(256, self.dense_context())),
                         *extra, "--json", "--quiet"]
        print("+ treeffn " + " ".join(cmd[3:]), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"failed ({proc.returncode}): {proc.stderr.strip()}")
        out.write_text(proc.stdout)
        self.record(out.name)

    def measure_speed(self, name: str) -> None:
        """Decoding tokens/s of a made row (``--speed``: on an idle machine), once."""
        out = self.speed_file(name)
        if exists(self.folder(name)) and not out.exists():
            self.evals.mkdir(parents=True, exist_ok=True)
            self.eval_json(self.folder(name), out, ["--windows", "1", "--decode-speed"])

    def dense_context(self) -> int:
        from treeffn.checkpoint import load_config, resolve

        return load_config(resolve(self.dense)).model.seq_len

    # ---- the report ------------------------------------------------------------------------------------------
    def summary_file(self, name: str) -> Path:
        return Path(self.args.doc).parent / "sparsity-frontier" / "rows" / f"{name}.json"

    def results(self, rows: dict[str, dict]) -> dict[str, dict]:
        """Every row with its evaluations: from the evaluation files when they exist (which also rewrites the row's
        committed summary), else from that summary."""
        out = {}
        for name, row in rows.items():
            tf, ef, summary = self.tasks_file(name), self.eval_file(name), self.summary_file(name)
            if not (tf.exists() and ef.exists()):
                if summary.exists():
                    out[name] = {**row, **json.loads(summary.read_text())}
                continue
            res = json.loads(tf.read_text())["results"]
            scores = {t: res[f"treeffn_{t}"][f"{METRIC[t]},none"] for t in TASKS}
            ev = {k: v for k, v in json.loads(ef.read_text()).items() if k != "checkpoint"}  # no machine paths
            sf = self.speed_file(name)  # a speed in the eval file (older runs of the study) is not used
            ev["decode_tok_per_s"] = json.loads(sf.read_text())["decode_tok_per_s"] if sf.exists() else None
            folder = self.folder(name)
            side = {}
            for fname in ("sparsify.json", "convert.json"):
                if (folder / fname).exists():
                    side = json.loads((folder / fname).read_text())
            keys = {name, tf.name, ef.name, self.speed_file(name).name}
            out[name] = {**row, "scores": scores, "mean": sum(scores.values()) / len(scores), "eval": ev,
                         "side": {k: v for k, v in side.items() if k not in SIDE_DROPPED},
                         "active": self.mlp_active(row, side),
                         "commits": {k: v for k, v in self.ledger.items() if k in keys}}
            summary.parent.mkdir(parents=True, exist_ok=True)
            summary.write_text(json.dumps({k: v for k, v in out[name].items() if k not in row}, indent=1,
                                          sort_keys=True) + "\n")
        for r in out.values():  # not measured (None in a summary): NaN, which the table and plot leave out
            if r["eval"].get("decode_tok_per_s") is None:
                r["eval"]["decode_tok_per_s"] = float("nan")
        return out

    @staticmethod
    def mlp_active(row: dict, side: dict) -> float:
        """Fraction of the MLP's 1,536 units a token uses: measured on held-out tokens for the training-free rules,
        exact for trees (K·(d+1)·W / 1,536)."""
        if row["kind"] in METHODS:
            return side.get("heldout_active", row["fraction"])
        if row["kind"] in ("tree", "tree-ft"):
            return tree_units(row["fraction"])[0] / MLP_UNITS
        return 1.0

    def report(self, rows: dict[str, dict]) -> None:
        got = self.results(rows)
        doc = Path(self.args.doc)
        doc.parent.mkdir(parents=True, exist_ok=True)
        base = got.get("dense")
        lines = ["| row | MLP units active | " + " | ".join(f"{t} ({METRIC[t]})" for t in TASKS)
                 + " | mean | vs dense | val loss | decode tok/s | vs dense |",
                 "|---|---:|" + "---:|" * len(TASKS) + "---:|---:|---:|---:|---:|"]
        for name, r in got.items():
            speed = r["eval"]["decode_tok_per_s"]
            rel = f"{r['mean'] / base['mean']:.0%}" if base else "–"
            base_speed = base["eval"]["decode_tok_per_s"] if base else float("nan")
            srel = f"{speed / base_speed:.2f}x" if speed == speed and base_speed == base_speed else "–"
            lines.append(f"| {r['label']} | {r['active']:.1%} | " + " | ".join(f"{r['scores'][t]:.3f}" for t in TASKS)
                         + f" | {r['mean']:.3f} | {rel} | {r['eval']['val_loss']:.3f} | "
                         + (f"{speed:.1f}" if speed == speed else "–") + f" | {srel} |")
        missing = [n for n in rows if n not in got]
        plot = self.plot(got, doc.parent / "sparsity-frontier" / "frontier.png") if got else None
        ledger = {k: v for r in got.values() for k, v in r["commits"].items()}
        commits = ", ".join(f"{k}: `{v}`" for k, v in sorted(ledger.items()))
        text = [
            "# The sparsity frontier: training-free activation sparsity against tree conversion (SmolLM2-135M)\n",
            "SmolLM2-135M-Instruct (30 SwiGLU MLPs of 1,536 units) with its MLPs made conditional at 50 %, 25 %, 10 % "
            "and 5 % of their units active per token: TEAL, CATS and WINA (`treeffn sparsify`, thresholds or top-K "
            "calibrated on 16,384 tokens of the default corpus) and tree layers fitted to each MLP by layer-wise "
            "distillation on the same tokens (`treeffn convert`; designs K trees × depth d × W units per node in the "
            "table's labels). Nothing is tuned on benchmark data.\n",
            f"Written by `python experiments/sparsity-frontier/run.py --limit {self.args.limit}` on "
            f"{time.strftime('%Y-%m-%d')}, torch {_torch_version()}, {platform.machine()}, {os.cpu_count()} CPUs. "
            f"Zero-shot, the first {self.args.limit} examples of each test set (lm-eval `--limit`), so an accuracy "
            f"carries a standard error of about {0.5 / max(1, self.args.limit) ** 0.5:.3f}; `mean` is over the five "
            "tasks (chance is about 0.25 for the mean of these five metrics). `val loss`: `treeffn eval --context "
            "256` on 64 windows of the default corpus's validation documents in SmolLM2's vocabulary. Decoding: "
            "batch 1, 64-token prompt, 64 new tokens, fp32, one model after another on an otherwise idle machine "
            "(`--speed`; – where not measured yet). "
            "MLP units active: held-out fraction of hidden units kept (training-free rules), K·(d+1)·W / 1,536 "
            "(trees).\n",
            f"Commits (models and evaluation files): {commits or 'none yet'}.\n",
            "\n".join(lines) + "\n",
        ]
        if plot:
            text.append(f"![frontier](sparsity-frontier/{plot.name})\n")
        text.append(self.reading(got, self.args.limit))
        if missing:
            text.append("## Not run yet\n\n" + "\n".join(f"- `{n}`" for n in missing) + "\n")
        doc.write_text("\n".join(text))
        print("\n".join(lines))
        print(f"wrote {doc}")

    @staticmethod
    def reading(got: dict[str, dict], limit: int) -> str:
        dense_loss = f"{got['dense']['eval']['val_loss']:.3f}" if "dense" in got else "–"
        out = ["## Against the target\n",
               "The goal for the tree conversion: at or above the best training-free method's mean accuracy at 25 % "
               "and 10 % active.\n"]
        for f in FRACTIONS:
            tree = got.get(f"tree-{pct(f)}")
            rivals = {m: got[f"{m}-{pct(f)}"] for m in METHODS if f"{m}-{pct(f)}" in got}
            if tree is None or not rivals:
                continue
            best = max(rivals, key=lambda m: rivals[m]["mean"])
            diff = tree["mean"] - rivals[best]["mean"]
            verdict = "at or above" if diff >= 0 else "below"
            se = math.hypot(mean_stderr(tree["scores"], limit), mean_stderr(rivals[best]["scores"], limit))
            low = min(rivals, key=lambda m: rivals[m]["eval"]["val_loss"])
            out.append(f"- {pct(f)} %: tree {tree['mean']:.3f} vs best training-free ({best.upper()}) "
                       f"{rivals[best]['mean']:.3f}: {verdict} it by {abs(diff):.3f}, {abs(diff) / se:.1f} standard "
                       f"errors of the difference of two five-task means at {limit} examples per task. Validation "
                       f"loss: tree {tree['eval']['val_loss']:.3f}, lowest training-free ({low.upper()}) "
                       f"{rivals[low]['eval']['val_loss']:.3f}, dense {dense_loss}.")
        near = [n for n, r in got.items() if n != "dense"
                and abs(r["mean"] - CHANCE) <= 2 * mean_stderr(r["scores"], limit)]
        if near:
            out += ["", f"Within two standard errors of chance ({CHANCE:.2f}, the five-task mean of guessing): "
                    + ", ".join(near) + f" — {len(near)} of {len(got) - ('dense' in got)} sparse rows; their "
                    "accuracies do not rank the methods, their validation losses still do."]
        speed = ["", "Decoding at batch 1 (tokens/s, the table's column; dense "
                 + Study.tok_s(got.get("dense")) + "):", ""]
        for f in FRACTIONS:
            names = [n for n in [f"{m}-{pct(f)}" for m in METHODS] + [f"tree-{pct(f)}"] if n in got]
            if any(Study.tok_s(got[n]) != "–" for n in names):
                speed.append(f"- {pct(f)} %: " + ", ".join(f"{n} {Study.tok_s(got[n])}" for n in names))
        if len(speed) > 3:
            out += speed
        if not any(r["kind"] == "tree-ft" for r in got.values()):
            out += ["", "No fine-tuned tree is in this report: `--ft-steps N` adds a `tree-F-ft` row per fraction "
                    "(N steps of full fine-tuning of the converted 135M-parameter model on 8 × 256 tokens of the "
                    "default corpus); none was run for it."]
        return "\n".join(out) + "\n"

    @staticmethod
    def tok_s(row: dict | None) -> str:
        """A row's measured decoding tokens/s, or – when it was not measured."""
        v = row["eval"].get("decode_tok_per_s", float("nan")) if row else float("nan")
        return "–" if v != v else f"{v:.1f}"

    @staticmethod
    def plot(got: dict[str, dict], path: Path) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        kinds = {"teal": "o-", "cats": "s-", "wina": "^-", "tree": "D-", "tree-ft": "v--"}
        for kind, style in kinds.items():
            pts = sorted((r["active"], r["mean"], r["eval"]["val_loss"], r["eval"]["decode_tok_per_s"])
                         for r in got.values() if r["kind"] == kind)
            if not pts:
                continue
            a, acc, loss, _ = zip(*pts)
            axes[0].plot(a, acc, style, label=kind)
            axes[1].plot(a, loss, style, label=kind)
            timed = sorted((sp, ac) for _, ac, _, sp in pts if sp == sp)
            if timed:
                axes[2].plot(*zip(*timed), style, label=kind)
        if "dense" in got:
            d = got["dense"]
            for ax, y in ((axes[0], d["mean"]), (axes[1], d["eval"]["val_loss"])):
                ax.axhline(y, color="k", lw=0.8, ls=":", label="dense")
            if d["eval"]["decode_tok_per_s"] == d["eval"]["decode_tok_per_s"]:
                axes[2].plot([d["eval"]["decode_tok_per_s"]], [d["mean"]], "k*", label="dense")
        for ax in axes[:2]:
            ax.set_xscale("log")
            ax.set_xlabel("fraction of MLP units active per token")
        axes[0].set_ylabel("zero-shot mean accuracy")
        axes[1].set_ylabel("validation loss (nats)")
        axes[2].set_xlabel("decoding tokens/s, batch 1")
        axes[2].set_ylabel("zero-shot mean accuracy")
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:  # the speed panel is empty until --speed has run
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _torch_version() -> str:
    import torch

    return torch.__version__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=str(ROOT / "runs"), help="folder of the models (default runs/)")
    p.add_argument("--dense", default=None, help="the imported dense model (default RUNS/smollm2, imported if absent)")
    p.add_argument("--data", default=None, help="prepared corpus in the model's vocabulary, for the validation loss "
                                                "(default <cache>/data/smollm2, prepared if absent)")
    p.add_argument("--calibration", default="default",
                   help="corpus the sparsity rules calibrate on and the trees are fitted to (treeffn sparsify/convert "
                        "--data; default: the default corpus)")
    p.add_argument("--fractions", default=",".join(pct(f) for f in FRACTIONS),
                   help="active fractions in percent, a subset of 50,25,10,5")
    p.add_argument("--rows", default=None, help="comma-separated row names to make and evaluate (default: all)")
    p.add_argument("--limit", type=int, default=200, help="examples per task (default 200)")
    p.add_argument("--ft-steps", type=int, default=0, help="also fine-tune each converted tree this many steps")
    p.add_argument("--report-only", action="store_true", help="make nothing; rebuild the report from what exists")
    p.add_argument("--speed", action="store_true", help="measure decoding tokens/s of the made rows that lack it "
                   "(with nothing else running on the machine)")
    p.add_argument("--doc", default=str(ROOT / "docs" / "sparsity-frontier.md"))
    args = p.parse_args(argv)
    by_pct = {pct(f): f for f in FRACTIONS}
    try:
        fractions = [by_pct[v.strip()] for v in args.fractions.split(",") if v.strip()]
    except KeyError:
        p.error(f"--fractions must be a subset of {', '.join(by_pct)}")
    rows = plan(fractions, args.ft_steps)
    chosen = list(rows) if not args.rows else [r.strip() for r in args.rows.split(",") if r.strip()]
    chosen = [b for r in chosen for b in ([r.removesuffix("-ft")] if r.endswith("-ft") else []) + [r]]
    chosen = list(dict.fromkeys(chosen))  # a fine-tuned tree needs its converted tree first
    unknown = [r for r in chosen if r not in rows]
    if unknown:
        p.error(f"unknown rows {', '.join(unknown)}; the plan has {', '.join(rows)}")
    study = Study(args)
    if not args.report_only:
        study.prepare()
        for name in chosen:
            study.make(name, rows[name])
            study.evaluate(name, rows[name])
    if args.speed:
        for name in chosen:
            study.measure_speed(name)
    study.report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
