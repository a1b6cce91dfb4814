"""isoFLOP comparison: baseline vs Mixture-of-Depths vs MoD × tree feed-forward, on the default corpus.

Raposo et al., "Mixture-of-Depths", arXiv 2404.02258 (2024), §4.1: at a fixed training-FLOPs budget, a MoD model
is cheaper per step, so it takes more steps; the question is which reaches the lower validation loss.

Training FLOPs per step = 3 · F · B · T  (forward + backward ≈ 3 forwards), with F = ``GPT.flops_per_token(T)``
(analytic: routed blocks count their capacity, tree layers their visited units; attention and output head
included). For every budget and variant, steps = round(budget / FLOPs per step); the run trains with
:func:`treeffn.train.train` and reports the final validation loss (next-token, nats; language-model loss only, the
auxiliary routing losses are excluded). The table goes to ``docs/mod-isoflop.md``.

    python experiments/mod-isoflop/run.py                       # defaults: tiny preset, budgets 1e15, 2e15
    python experiments/mod-isoflop/run.py --budgets 1e12 --set train.batch_size=4 --set model.seq_len=128
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from treeffn.config import get_config, parse_overrides
from treeffn.data import default_data_dir
from treeffn.model import build_model
from treeffn.train import train

VARIANTS = {
    "baseline": {},
    "mod": {"mod.every": 2, "mod.capacity": 0.125},
    "mod-tree": {"ffn.kind": "tree", "mod.every": 2, "mod.capacity": 0.125},
}
ROOT = Path(__file__).resolve().parents[2]


def plan(preset: str, overrides: dict, variant: str, budget: float):
    cfg = get_config(preset, {**overrides, **VARIANTS[variant]})
    model = build_model(cfg, device="meta")  # shapes only: counts FLOPs without allocating weights
    T, B = cfg.model.seq_len, cfg.train.batch_size * cfg.train.grad_accum
    per_step = 3.0 * model.flops_per_token(T)["total"] * B * T
    steps = max(1, round(budget / per_step))
    cfg.apply({"train.max_steps": steps, "train.eval_every": steps, "train.save_every": 0,
               "train.warmup_steps": min(cfg.train.warmup_steps, max(1, steps // 10)),
               "train.log_every": max(1, min(cfg.train.log_every, steps))})
    return cfg, steps, per_step, model.num_params()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="prepared data directory (default: treeffn's default corpus)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--budgets", default="1e15,2e15", help="comma-separated training-FLOPs budgets")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--out", default=str(ROOT / "runs" / "mod-isoflop"), help="run folders go to OUT/<timestamp>/")
    p.add_argument("--doc", default=str(ROOT / "docs" / "mod-isoflop.md"), help="markdown table to write")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    data = Path(args.data) if args.data else default_data_dir()
    overrides = parse_overrides(args.set)
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]

    run_root = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")  # fresh folders: train() refuses to overwrite a run
    rows = []
    for budget in budgets:
        for variant in variants:
            cfg, steps, per_step, params = plan(args.preset, overrides, variant, budget)
            out = run_root / f"{variant}-{budget:.0e}"
            t0 = time.perf_counter()
            summary = train(cfg, out, data, device=args.device, progress=False, tensorboard=False)
            row = {"variant": variant, "budget": budget, "steps": steps, "flops": steps * per_step,
                   "params": params, "config": cfg.describe(), "val_loss": summary.get("val_loss"),
                   "train_loss": summary.get("train_loss"), "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row))

    lines = [
        "# Mixture-of-Depths: isoFLOP comparison",
        "",
        "Written by `experiments/mod-isoflop/run.py` (see its README). Validation loss: next-token cross-entropy",
        "(nats) on the held-out documents of the corpus at the end of training; training FLOPs = 3 × analytic",
        "forward FLOPs per token × tokens seen.",
        "",
        f"- preset `{args.preset}`, overrides `{json.dumps(overrides)}`, data `{data}`",
        f"- {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads",
        "",
        "One seed per cell; at small budgets (minutes of CPU) differences of a few hundredths of a nat are not",
        "conclusive. Wall time depends on the machine's load and is shown for orientation only.",
        "",
        "| variant | config | train FLOPs | steps | params | val loss | train loss | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vl = "n/a" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        lines.append(f"| {r['variant']} | {r['config']} | {r['flops']:.3g} | {r['steps']} | {r['params'] / 1e6:.2f}M "
                     f"| {vl} | {r['train_loss']:.4f} | {r['seconds']:.0f} |")
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
