"""``treeffn bench generate``: end-to-end decoding of a tree model against its dense twin, in one process.

The twin has the same depth, width, attention and vocabulary, and a dense GELU MLP of the tree's *training* width
(K·N units). Both decode greedily with the KV cache from a random prompt (random weights route tokens diversely).
Reported: prefill tokens/s (the prompt through the batched path) and decoding tokens/s (new tokens only), with the
tree/dense ratios, and the ideal decoding ratio from analytic FLOPs per token.
"""

from __future__ import annotations

import argparse
import time

import torch

from ..config import get_config
from ..model import GPT, KVCache
from .common import environment, print_json, print_table


def make_twins(preset: str, overrides: dict):
    tree_cfg = get_config(preset, {"ffn.kind": "tree", **overrides})
    t = tree_cfg.tree
    dense_cfg = tree_cfg.copy().apply({"ffn.kind": "dense", "ffn.hidden": t.trees * (2 ** (t.depth + 1) - 1) * t.node_width})
    torch.manual_seed(0)
    return GPT(dense_cfg).eval(), GPT(tree_cfg).eval()


@torch.no_grad()
def measure(model: GPT, batch: int, prompt: int, new: int, repeats: int) -> dict:
    V = model.cfg.model.vocab_size
    idx = torch.randint(0, V, (batch, prompt), generator=torch.Generator().manual_seed(1))
    model.generate(idx[:, :16], 4)  # warm-up: kernels compiled/loaded, allocator primed
    best_prefill, best_total = float("inf"), float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model(idx, cache=KVCache(len(model.blocks)))
        best_prefill = min(best_prefill, time.perf_counter() - t)
        t = time.perf_counter()
        model.generate(idx, new)
        best_total = min(best_total, time.perf_counter() - t)
    decode = max(1e-9, best_total - best_prefill)
    return {"prefill_tok_s": batch * prompt / best_prefill, "decode_tok_s": batch * new / decode}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="treeffn bench generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model shape (default: small — 8 layers, d 512, tree 8x7)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for both models, e.g. tree.depth=8")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new", type=int, default=128, help="new tokens (default 128)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args(argv)
    from ..config import parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.prompt + args.new > get_config(args.preset, overrides).model.seq_len:
        overrides["model.seq_len"] = args.prompt + args.new
    dense, tree = make_twins(args.preset, overrides)
    if args.dtype == "bf16":
        dense, tree = dense.to(torch.bfloat16), tree.to(torch.bfloat16)
    f_dense, f_tree = dense.flops_per_token(args.prompt + args.new), tree.flops_per_token(args.prompt + args.new)
    ideal = f_dense["total"] / f_tree["total"]
    print(f"{tree.cfg.describe()}  vs  dense twin ({dense.cfg.ffn.hidden} units); "
          f"threads {environment()['threads']}, {args.dtype}")
    rows, results = [], []
    for b in [int(x) for x in args.batches.split(",") if x]:
        d = measure(dense, b, args.prompt, args.new, args.repeats)
        t = measure(tree, b, args.prompt, args.new, args.repeats)
        r = {"batch": b, "dense": d, "tree": t, "decode_ratio": t["decode_tok_s"] / d["decode_tok_s"],
             "prefill_ratio": t["prefill_tok_s"] / d["prefill_tok_s"], "ideal_ratio_flops": ideal}
        results.append(r)
        rows.append([b, f"{d['prefill_tok_s']:,.0f}", f"{t['prefill_tok_s']:,.0f}", f"{r['prefill_ratio']:.2f}x",
                     f"{d['decode_tok_s']:,.1f}", f"{t['decode_tok_s']:,.1f}", f"{r['decode_ratio']:.2f}x",
                     f"{ideal:.2f}x"])
    print_table(["batch", "dense prefill tok/s", "tree prefill tok/s", "ratio", "dense decode tok/s",
                 "tree decode tok/s", "ratio", "ideal (FLOPs)"], rows)
    print_json("generate", results, preset=args.preset, prompt=args.prompt, new=args.new, dtype=args.dtype,
               flops_per_token={"dense": f_dense, "tree": f_tree})
    return 0
