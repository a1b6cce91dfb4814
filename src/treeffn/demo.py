"""``treeffn demo``: the main job. A dense model and a tree model of the same shape and the same training width,
trained on the same tokens (same seed, same batches), evaluated side by side."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import get_config


def twin_configs(preset: str, steps: int | None, vocab_size: int):
    tree = get_config(preset, {"ffn.kind": "tree", "model.vocab_size": vocab_size})
    if steps:
        tree.apply({"train.max_steps": steps, "train.warmup_steps": max(1, min(tree.train.warmup_steps, steps // 10))})
    t = tree.tree
    dense = tree.copy().apply({"ffn.kind": "dense", "ffn.hidden": t.trees * (2 ** (t.depth + 1) - 1) * t.node_width})
    return dense, tree


def run_demo(args) -> int:
    from .cli import resolve_data
    from .data import default_data_dir, load_meta, prepare
    from .evaluate import decode_speed, evaluate_checkpoint
    from .train import train

    t0 = time.perf_counter()
    if args.data in (None, "default"):
        data_dir = default_data_dir()
        prepare(data_dir, progress=not args.quiet)
    else:
        data_dir = resolve_data(args.data)
    meta = load_meta(data_dir)
    dense_cfg, tree_cfg = twin_configs(args.preset, args.steps, meta["vocab_size"])
    out = Path(args.out)
    rows = {}
    for name, cfg in (("dense", dense_cfg), ("tree", tree_cfg)):
        run = out / name
        shutil.rmtree(run, ignore_errors=True)  # the demo owns its run folders
        print(f"\n== training {name}: {cfg.describe()} for {cfg.train.max_steps} steps ==", flush=True)
        summary = train(cfg, run, data_dir, progress=not args.quiet, tensorboard=False)
        res = evaluate_checkpoint(run, data_dir, windows=256, batch_size=8, progress=False)
        model = ckpt.load_model(run)
        res["train_tok_per_s"] = summary["tok_per_s"]
        res["decode_tok_per_s"] = decode_speed(model, prompt_len=32, new_tokens=64)
        codec = ckpt.load_codec(run)
        prompt = "The king said"
        ids = codec.encode(prompt)
        g = torch.Generator().manual_seed(0)
        sample = model.generate(torch.tensor([ids]), 48, temperature=0.8, top_k=50, generator=g, eos_id=codec.eot_id)
        res["sample"] = prompt + codec.decode(sample[0, len(ids):].tolist())
        rows[name] = res
    print_table(rows)
    for name, r in rows.items():
        print(f"\n[{name}] {r['sample']!r}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; runs in {out}/dense and {out}/tree "
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
    ]
    names = list(rows)
    print("\n" + f"{'':<26}" + "".join(f"{n:>16}" for n in names))
    for label, key, fmt in fields:
        print(f"{label:<26}" + "".join(f"{fmt.format(rows[n][key]):>16}" for n in names))
