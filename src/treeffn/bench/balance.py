"""``treeffn bench balance``: what the routing thresholds cost in training.

Times one tree layer's training step (forward and backward, ``impl="sparse"``) with ``tree.balance=none`` and with
``tree.balance=threshold`` (batch thresholds computed level by level before the kernel runs, running average updated)
in the same process, on the same weights and inputs, and the dense MLP of equal training width as the baseline.
Prints a table and one JSON line.

    treeffn bench balance [--d-model 256] [--configs 4x7] [--tokens 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

from ..layers.dense import DenseMLP
from ..layers.tree import TreeFFN
from .common import environment, loadavg, parse_configs, print_json, print_table, timeit


def step_time(layer: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    layer.train()

    def step():
        y, _ = layer(x)
        y.square().mean().backward()

    return timeit(step, repeats=repeats, warmup=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="treeffn bench balance", description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--configs", type=parse_configs, default=parse_configs("4x7"), help="K x depth list (4x7)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (the tiny preset's batch: 4096)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.d_model, generator=g).requires_grad_()
    rows, results = [], []
    for K, depth in args.configs:
        torch.manual_seed(0)
        plain = TreeFFN(args.d_model, K, depth, balance="none", impl="sparse")
        balanced = TreeFFN(args.d_model, K, depth, balance="threshold", impl="sparse")
        balanced.load_state_dict(plain.state_dict(), strict=False)
        dense = DenseMLP(args.d_model, plain.total_units())
        t_plain, t_bal, t_dense = (step_time(m, x, args.repeats) for m in (plain, balanced, dense))
        rows.append([f"{K}x{depth}", f"{t_dense * 1e3:.1f}", f"{t_plain * 1e3:.1f}", f"{t_bal * 1e3:.1f}",
                     f"{t_bal / t_plain:.2f}x", f"{t_dense / t_bal:.2f}x"])
        results.append({"config": f"{K}x{depth}", "dense_ms": t_dense * 1e3, "tree_none_ms": t_plain * 1e3,
                        "tree_threshold_ms": t_bal * 1e3, "threshold_over_none": t_bal / t_plain,
                        "dense_over_threshold": t_dense / t_bal})
    print(f"training step (forward + backward), {args.tokens} tokens, d_model {args.d_model}, "
          f"{torch.get_num_threads()} threads, load {loadavg()}")
    print_table(["tree", "dense ms", "balance=none ms", "balance=threshold ms", "threshold/none",
                 "dense/threshold"], rows)
    print_json("balance", results, tokens=args.tokens, d_model=args.d_model, loadavg=loadavg())
    return 0
