"""``treeffn bench balance``: what the routing thresholds cost in training.

Times one tree layer's training step (forward and backward; the layer picks its sparse training path under autograd)
with ``tree.balance=none`` and with ``tree.balance=threshold`` (batch thresholds computed level by level before the
kernel runs, running average updated) in the same process, on the same weights and inputs, and the shipped dense
MLP of equal training width (the tree's K·N units) as the baseline. All three are built by ``build_ffn`` and timed
interleaved (``common.measure``: 2 warm-up steps, then ``--repeats``; medians). Prints a table and one JSON line in
the schema of ``bench/common.py`` (rows: ``case`` {config, K, depth}, ``impl`` dense | tree-none | tree-threshold).

    treeffn bench balance [--d-model 256] [--configs 4x7] [--tokens 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

from .common import (
    dense_mlp,
    env_line,
    environment,
    measure,
    parse_configs,
    print_json,
    print_table,
    row,
    tree_ffn,
)

WARMUP = 2


def training_step(layer: torch.nn.Module, x: torch.Tensor):
    """One forward + backward of ``layer`` (in training mode) on ``x``, as a function of no arguments."""
    layer.train()

    def step():
        y, _ = layer(x)
        y.square().mean().backward()

    return step


def build_layers(d_model: int, trees: int, depth: int) -> dict[str, torch.nn.Module]:
    """The three shipped layers of one configuration: the tree without and with thresholds (same weights) and the
    dense MLP of the tree's width."""
    torch.manual_seed(0)
    plain = tree_ffn(d_model, trees, depth, balance="none")
    balanced = tree_ffn(d_model, trees, depth, balance="threshold")
    balanced.load_state_dict(plain.state_dict(), strict=False)  # the thresholds start at zero
    return {"dense": dense_mlp(d_model, plain.total_units()), "tree-none": plain, "tree-threshold": balanced}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="treeffn bench balance", description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--configs", type=parse_configs, default=parse_configs("4x7"), help="K x depth list (4x7)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (the tiny preset's batch: 4096)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    env = environment()
    settings = {"d_model": args.d_model, "configs": [f"{k}x{d}" for k, d in args.configs], "tokens": args.tokens,
                "node_width": 1, "activation": "gelu", "placement": "node", "baseline": "dense",
                "dense_units": "K*N", "warmup": WARMUP, "repeats": args.repeats, "interleaved": True}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.d_model, generator=g).requires_grad_()
    rows, results = [], []
    for K, depth in args.configs:
        layers = build_layers(args.d_model, K, depth)
        t = measure({name: training_step(m, x) for name, m in layers.items()}, warmup=WARMUP, repeats=args.repeats)
        t_dense, t_plain, t_bal = t["dense"].median, t["tree-none"].median, t["tree-threshold"].median
        rows.append([f"{K}x{depth}", f"{t_dense * 1e3:.1f}", f"{t_plain * 1e3:.1f}", f"{t_bal * 1e3:.1f}",
                     f"{t_bal / t_plain:.2f}x", f"{t_dense / t_bal:.2f}x"])
        case = {"config": f"{K}x{depth}", "K": K, "depth": depth}
        for name, timing in t.items():
            extra = {"threshold_over_none": t_bal / t_plain} if name == "tree-threshold" else {}
            results.append(row(case, name, timing, speedup_vs_dense=t_dense / timing.median, **extra))
    print(f"training step (forward + backward), {args.tokens} tokens, d_model {args.d_model}; {env_line(env)}")
    print_table(["tree", "dense ms", "balance=none ms", "balance=threshold ms", "threshold/none",
                 "dense/threshold"], rows)
    print_json("balance", env, settings, results)
    return 0
