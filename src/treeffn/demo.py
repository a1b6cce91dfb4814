"""``treeffn demo``: the main job. Three models of the same shape, trained on the same tokens (same seed, same
batches) and evaluated side by side:

* ``dense``        — the dense GELU MLP of equal *training* width (K·N·W units, the tree's total);
* ``tree``         — the tree layer with the library's default setting (routing thresholds, docs/quality.md);
* ``dense-narrow`` — the dense GELU MLP of equal *inference* width (K·L·W units, what the tree computes per token):
  the comparison critics of fast feedforward asked for.

The runs go to ``OUT/<name>``. Before anything is prepared or trained, each is checked with
:func:`treeffn.outputs.check_output_dir`: a folder there that is not a treeffn run is never touched, and an
earlier run is replaced only with ``--overwrite``."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .analyze import analyze, tree_layers
from .config import assemble_config
from .data import data_location, load_meta, resolve_data
from .evaluate import decode_speed, evaluate_checkpoint
from .layers import dense_twin
from .outputs import check_output_dir, remove_output_dir
from .train import train

RUNS = ("dense", "tree", "dense-narrow")


def demo_configs(preset: str, steps: int | None, vocab_size: int) -> dict:
    """{run name: config} for the three models of the demo (see the module docstring)."""
    tree = assemble_config(preset, {"ffn.kind": "tree", "model.vocab_size": vocab_size})
    if steps:
        tree = assemble_config(base=tree, overrides={
            "train.max_steps": steps, "train.warmup_steps": max(1, min(tree.train.warmup_steps, steps // 10))})
    dense, narrow = dense_twin(tree, "training"), dense_twin(tree, "inference")
    return {"dense": dense, "tree": tree, "dense-narrow": narrow}


def run_demo(args) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    overwrite = getattr(args, "overwrite", False)
    for name in RUNS:  # before any work: never a folder that is not ours, ours only with --overwrite
        check_output_dir(out / name, "run", overwrite=overwrite, inputs=[data_location(args.data)])
    data_dir = resolve_data(args.data, fetch_default=True, progress=not args.quiet)  # the default corpus: fetched once
    meta = load_meta(data_dir)
    rows = {}
    for name, cfg in demo_configs(args.preset, args.steps, meta["vocab_size"]).items():
        run = out / name
        check_output_dir(run, "run", overwrite=overwrite, inputs=[data_dir])
        remove_output_dir(run, "run")  # an earlier treeffn run, accepted for replacement above
        print(f"\n== training {name}: {cfg.describe()} for {cfg.train.max_steps} steps ==", flush=True)
        summary = train(cfg, run, data_dir, progress=not args.quiet, tensorboard=False)
        res = evaluate_checkpoint(run, data_dir, windows=256, batch_size=8, progress=False)
        model = ckpt.load_model(run)
        res["train_tok_per_s"] = summary["tok_per_s"]
        ctx = cfg.model.seq_len  # 32 + 64 tokens, or what a short context allows
        res["decode_tok_per_s"] = decode_speed(model, prompt_len=min(32, ctx // 4), new_tokens=min(64, ctx // 2))
        codec = ckpt.load_codec(run)
        prompt = "The king said"
        ids = codec.encode(prompt)
        g = torch.Generator().manual_seed(0)
        sample = model.generate(torch.tensor([ids]), 48, temperature=0.8, top_k=50, generator=g, eos_id=codec.eot_id)
        res["sample"] = prompt + codec.decode(sample[0, len(ids):].tolist())
        if tree_layers(model):  # routing on the same validation windows: is every path in use?
            layers = analyze(run, data_dir, windows=256, plots=False, overwrite=True)["layers"]
            res["tree_dead_worst"] = max(r["dead_nodes"] for r in layers)
            res["tree_leaf_worst"] = min(r["leaf_util"] for r in layers)
            res["tree_entropy_worst"] = min(r["path_entropy"] for r in layers)
        rows[name] = res
    print_table(rows)
    tree = rows["tree"]["val_loss"]
    print(f"\ntree vs dense (equal training width): {tree / rows['dense']['val_loss'] - 1:+.1%} validation loss; "
          f"tree vs dense-narrow (equal inference width): {tree / rows['dense-narrow']['val_loss'] - 1:+.1%}")
    for name, r in rows.items():
        print(f"\n[{name}] {r['sample']!r}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; runs in {', '.join(f'{out}/{n}' for n in rows)} "
          f"(`treeffn eval {out}/tree`, `treeffn generate {out}/tree --prompt ...`)")
    return 0


def print_table(rows: dict) -> None:
    fields = [
        ("parameters", "params", "{:,.0f}"),
        ("FFN units / layer", "ffn_units_total", "{:,.0f}"),
        ("active FFN units / token", "ffn_units_active", "{:,.0f}"),
        ("active FFN fraction", "ffn_active_fraction", "{:.1%}"),
        ("FFN FLOPs / token", "ffn_flops_per_token", "{:,.0f}"),
        ("total FLOPs / token", "flops_per_token", "{:,.0f}"),
        ("validation loss", "val_loss", "{:.4f}"),
        ("bits per byte", "bits_per_byte", "{:.4f}"),
        ("training tokens/s", "train_tok_per_s", "{:,.0f}"),
        ("decoding tokens/s", "decode_tok_per_s", "{:,.1f}"),
        ("dead tree nodes (worst)", "tree_dead_worst", "{:.1%}"),
        ("leaf use (worst layer)", "tree_leaf_worst", "{:.3f}"),
        ("path entropy (worst)", "tree_entropy_worst", "{:.3f}"),
    ]
    names = list(rows)
    print("\n" + f"{'':<26}" + "".join(f"{n:>16}" for n in names))
    for label, key, fmt in fields:
        cells = (fmt.format(rows[n][key]) if key in rows[n] else "–" for n in names)
        print(f"{label:<26}" + "".join(f"{c:>16}" for c in cells))
