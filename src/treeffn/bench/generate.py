"""``treeffn bench generate``: end-to-end decoding of a tree model against its dense twin, in one process.

The twin has the same depth, width, attention and vocabulary, and a dense GELU MLP of the tree's *training* width
(K·N units). Both decode greedily with the KV cache from a random prompt (random weights route tokens diversely).
Reported: prefill tokens/s (the prompt through the batched path) and decoding tokens/s (new tokens only), with the
tree/dense ratios, and the ideal decoding ratio from analytic FLOPs per token.

Timing (``common.measure``): the prefill (one cached forward of the prompt) and the whole ``GPT.generate`` call of
both models, interleaved, ``--warmup`` untimed rounds then ``--repeats`` timed ones; medians. Decoding time is the
generate call's median minus the prefill's. JSON rows (schema of ``bench/common.py``): ``case`` {batch, phase
prefill | generate, prompt, new}, ``impl`` dense | tree, ``metrics`` {prefill_tok_s, prefill_ratio} or
{decode_tok_s, decode_ratio, ideal_ratio_flops}.
"""

from __future__ import annotations

import argparse

import torch

from ..config import get_config, parse_overrides
from ..layers import dense_twin
from ..model import GPT, KVCache
from .common import env_line, environment, measure, print_json, print_table, row


def make_twins(preset: str, overrides: dict):
    tree_cfg = get_config(preset, {"ffn.kind": "tree", **overrides})
    dense_cfg = dense_twin(tree_cfg, "training")
    torch.manual_seed(0)
    return GPT(dense_cfg).eval(), GPT(tree_cfg).eval()


def calls(model: GPT, batch: int, prompt: int, new: int) -> dict:
    """The two timed calls of one model: the prefill of a random prompt (B, prompt), and greedy generation of
    ``new`` tokens after it (prefill included)."""
    V = model.cfg.model.vocab_size
    idx = torch.randint(0, V, (batch, prompt), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def prefill():
        model(idx, cache=KVCache(len(model.blocks)))

    @torch.no_grad()
    def generate():
        model.generate(idx, new)

    return {"prefill": prefill, "generate": generate}


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="treeffn bench generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model shape (default: small — 8 layers, d 512, tree 8x7)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for both models, e.g. tree.depth=8")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new", type=int, default=128, help="new tokens (default 128)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds, the median is reported (default 3)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    if args.prompt + args.new > get_config(args.preset, overrides).model.seq_len:
        overrides["model.seq_len"] = args.prompt + args.new
    dense, tree = make_twins(args.preset, overrides)
    if args.dtype == "bf16":
        dense, tree = dense.to(torch.bfloat16), tree.to(torch.bfloat16)
    f_dense, f_tree = dense.flops_per_token(args.prompt + args.new), tree.flops_per_token(args.prompt + args.new)
    ideal = f_dense["total"] / f_tree["total"]
    batches = [int(x) for x in args.batches.split(",") if x]
    env = environment()
    settings = {"preset": args.preset, "overrides": overrides, "tree": tree.cfg.describe(),
                "dense": dense.cfg.describe(), "batches": batches, "prompt": args.prompt, "new": args.new,
                "dtype": args.dtype, "sampling": "greedy", "baseline": "dense", "warmup": args.warmup,
                "repeats": args.repeats, "interleaved": True}
    print(f"{tree.cfg.describe()}  vs  dense twin ({dense.cfg.ffn.hidden} units); {args.dtype}; {env_line(env)}")
    rows, results, notes = [], [], []
    for b in batches:
        fns = {f"{name}/{phase}": fn for name, m in (("dense", dense), ("tree", tree))
               for phase, fn in calls(m, b, args.prompt, args.new).items()}
        t = measure(fns, warmup=args.warmup, repeats=args.repeats)
        prefill = {name: b * args.prompt / t[f"{name}/prefill"].median for name in ("dense", "tree")}
        decode = {}
        for name in ("dense", "tree"):
            decode_s = t[f"{name}/generate"].median - t[f"{name}/prefill"].median
            decode[name] = b * args.new / decode_s if decode_s > 0 else None
            if decode[name] is None:
                notes.append(f"batch {b}, {name}: the generate call's median is not above the prefill's (too few "
                             "new tokens, or noise): no decoding speed")
        ratio = {name: decode[name] / decode["dense"] if decode[name] and decode["dense"] else None
                 for name in ("dense", "tree")}
        for name in ("dense", "tree"):
            results.append(row({"batch": b, "phase": "prefill", "prompt": args.prompt, "new": 0}, name,
                               t[f"{name}/prefill"], prefill_tok_s=prefill[name],
                               prefill_ratio=prefill[name] / prefill["dense"]))
            results.append(row({"batch": b, "phase": "generate", "prompt": args.prompt, "new": args.new}, name,
                               t[f"{name}/generate"], decode_tok_s=decode[name],
                               decode_ratio=ratio[name], ideal_ratio_flops=ideal))
        rows.append([b, f"{prefill['dense']:,.0f}", f"{prefill['tree']:,.0f}",
                     f"{prefill['tree'] / prefill['dense']:.2f}x", _fmt(decode["dense"], ",.1f"),
                     _fmt(decode["tree"], ",.1f"), _fmt(ratio["tree"], ".2f", "x"), f"{ideal:.2f}x"])
    print_table(["batch", "dense prefill tok/s", "tree prefill tok/s", "ratio", "dense decode tok/s",
                 "tree decode tok/s", "ratio", "ideal (FLOPs)"], rows)
    print_json("generate", env, settings, results,
               summary={"flops_per_token": {"dense": f_dense, "tree": f_tree}, "ideal_ratio_flops": ideal},
               notes=notes)
    return 0
