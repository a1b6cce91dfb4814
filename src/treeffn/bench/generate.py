"""``treeffn bench generate``: end-to-end decoding of a tree model against its dense twin, in one process.

The twin has the same depth, width, attention and vocabulary, and a dense GELU MLP of the tree's *training* width
(K·N units). Both decode greedily with the KV cache from a random prompt (random weights route tokens diversely).
Reported: prefill tokens/s (the prompt through the batched path) and decoding tokens/s (new tokens only), with the
tree/dense ratios, and the ideal decoding ratio from analytic FLOPs per token.

Timing (``common.measure``): the prefill (one cached forward of the prompt) and the whole ``GPT.generate`` call of
both models, interleaved, ``--warmup`` untimed rounds then ``--repeats`` timed ones; medians. Decoding time is the
generate call's median minus the prefill's. ``paired``: each round's decoding time of the dense model over the tree
model's (generate minus prefill, all four calls of the round back to back), median over the rounds — a ratio that
a machine slowing down or speeding up between rounds moves less than the ratio of medians. JSON rows (schema of
``bench/common.py``): ``case`` {batch, phase prefill | generate, prompt, new}, ``impl`` dense | tree, ``metrics``
{prefill_tok_s, prefill_ratio} or {decode_tok_s, decode_ratio, decode_ratio_paired, ideal_ratio_flops}.

``ideal (bytes)``: the ratio of the bytes a decoding step reads from memory, analytic — every weight of the model
once per step (the embedding: only the rows of the batch's tokens; tree layers: the nodes the batch visits, uniform
routing assumed, ``TreeLayer.weight_bytes_read``) plus the KV cache (keys and values of every layer at the mean
context of the decoding steps), which both models read alike. At batch 1 both ceilings agree; at larger batches
the dense model's weight reads are shared by the batch while the KV cache grows with it, so decoding becomes bound by
memory traffic and the bytes ceiling, not the FLOP one, is what a faster tree layer can approach.

Where decoding time goes (``--shares``, on by default; after the timed rounds, one more generate call per model
and batch): forward hooks time every attention module, every feed-forward module (the tree layers or the dense
MLPs) and the output layer during the decoding steps (one-token calls), and "other" is the rest of the decoding
time (embedding, norms, residual adds, sampling and the Python of the decode loop and the blocks), from the start
of the first one-token attention call to the end of the generate call. Hooks cost a
few µs per call, counted in the module they wrap. Printed as a second table, and in the JSON ``summary.shares``
{batch: {model: {component: fraction, "ms_per_step": …}}}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..config import get_config, parse_overrides
from ..layers import dense_twin
from ..kernels.small_linear import SMALL_ROWS, use_small_gemm
from ..memory import huge_pages_available, use_huge_pages
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


COMPONENTS = ("attention", "ffn", "output layer", "other")


def decode_bytes(model: GPT, batch: int, prompt: int, new: int) -> float:
    """Analytic bytes one decoding step of ``batch`` sequences reads: the weights (feed-forward layers through their
    ``weight_bytes_read`` when they have one, the embedding's ``batch`` rows), once per step, plus the KV cache at
    the mean context of the decoding steps."""
    m = model.cfg.model
    ffn_params = {id(p) for f in model.ffn_modules() for p in f.parameters()}
    emb = model.tok_emb.weight
    total = 0.0
    for p in model.parameters():  # each tensor once (a tied output layer is the embedding)
        if id(p) in ffn_params or p is emb:
            continue
        total += p.numel() * p.element_size()
    if model.lm_head.weight is emb:  # tied: the output layer reads the whole table
        total += emb.numel() * emb.element_size()
    else:  # the embedding reads the batch's rows
        total += batch * emb.shape[1] * emb.element_size()
    for f in model.ffn_modules():
        read = getattr(f, "weight_bytes_read", None)
        total += read(batch) if read else sum(p.numel() * p.element_size() for p in f.parameters())
    context = prompt + new / 2
    total += len(model.blocks) * 2 * batch * context * m.kv_heads * m.head_dim * emb.element_size()
    return total


@torch.no_grad()
def decode_shares(model: GPT, batch: int, prompt: int, new: int) -> dict:
    """Fraction of decoding time (one-token forward calls) spent in attention, the feed-forward layers, the output
    layer and everything else, from one generate call with timing hooks; plus milliseconds per decoding step."""
    spent = dict.fromkeys(COMPONENTS[:-1], 0.0)
    start: dict[int, float] = {}
    first: list[float] = []  # when the first decoding step began

    def pre(mod, args):
        if args and args[0].dim() >= 2 and args[0].shape[-2] == 1:  # a decoding step: one new position
            start[id(mod)] = time.perf_counter()
            if not first:
                first.append(start[id(mod)])

    def post(name):
        def hook(mod, args, out):
            if id(mod) in start:
                spent[name] += time.perf_counter() - start.pop(id(mod))
        return hook

    modules = [("attention", b.attn) for b in model.blocks] + [("ffn", b.ffn) for b in model.blocks]
    modules.append(("output layer", model.lm_head))
    handles = [h for name, m in modules for h in (m.register_forward_pre_hook(pre),
                                                 m.register_forward_hook(post(name)))]
    try:
        calls(model, batch, prompt, new)["generate"]()
        end = time.perf_counter()
    finally:
        for h in handles:
            h.remove()
    decode_s = max(1e-9, end - first[0]) if first else 1e-9
    spent["other"] = max(0.0, decode_s - sum(spent.values()))
    steps = max(1, new - 1)
    return {**{k: v / decode_s for k, v in spent.items()}, "ms_per_step": decode_s / steps * 1e3}


def paired_ratio(t: dict) -> float | None:
    """Median over the timed rounds of dense decoding time / tree decoding time in that round (generate minus
    prefill), or None when a round's decoding time is not positive (too few new tokens, or noise)."""
    rounds = zip(*(t[f"{name}/{phase}"].samples for name in ("dense", "tree") for phase in ("prefill", "generate")))
    ratios = []
    for dense_prefill, dense_generate, tree_prefill, tree_generate in rounds:
        d, tr = dense_generate - dense_prefill, tree_generate - tree_prefill
        if d <= 0 or tr <= 0:
            return None
        ratios.append(d / tr)
    return statistics.median(ratios) if ratios else None


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
    p.add_argument("--huge-pages", choices=("on", "off"), default="on",
                   help="both models' weights on transparent huge pages, as treeffn.load_model places them (Linux "
                        "with THP enabled; elsewhere off)")
    p.add_argument("--gemm", choices=("torch", "small"), default="torch",
                   help="the GEMM of every linear layer of both models for up to %d token vectors (decoding): "
                        "torch = F.linear (default), small = treeffn's prefetching small-batch kernel "
                        "(treeffn.kernels.small_linear)" % SMALL_ROWS)
    p.add_argument("--no-shares", dest="shares", action="store_false",
                   help="skip the breakdown of decoding time by component")
    args = p.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    if args.prompt + args.new > get_config(args.preset, overrides).model.seq_len:
        overrides["model.seq_len"] = args.prompt + args.new
    before = use_small_gemm(args.gemm == "small")
    try:
        return _run(args, overrides)
    finally:
        use_small_gemm(before)


def _run(args, overrides: dict) -> int:
    dense, tree = make_twins(args.preset, overrides)
    if args.dtype == "bf16":
        dense, tree = dense.to(torch.bfloat16), tree.to(torch.bfloat16)
    huge = args.huge_pages == "on" and huge_pages_available()
    if huge:
        use_huge_pages(dense), use_huge_pages(tree)
    f_dense, f_tree = dense.flops_per_token(args.prompt + args.new), tree.flops_per_token(args.prompt + args.new)
    ideal = f_dense["total"] / f_tree["total"]
    batches = [int(x) for x in args.batches.split(",") if x]
    env = environment()
    settings = {"preset": args.preset, "overrides": overrides, "tree": tree.cfg.describe(),
                "dense": dense.cfg.describe(), "batches": batches, "prompt": args.prompt, "new": args.new,
                "dtype": args.dtype, "sampling": "greedy", "baseline": "dense", "warmup": args.warmup,
                "repeats": args.repeats, "interleaved": True, "huge_pages": huge, "gemm": args.gemm}
    print(f"{tree.cfg.describe()}  vs  dense twin ({dense.cfg.ffn.hidden} units); {args.dtype}; huge pages "
          f"{'on' if huge else 'off'}; decoding GEMM {args.gemm}; {env_line(env)}")
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
        paired = paired_ratio(t)
        if paired is None:
            notes.append(f"batch {b}: a round's generate call was not slower than its prefill (too few new tokens, "
                         "or noise): no paired ratio")
        for name in ("dense", "tree"):
            results.append(row({"batch": b, "phase": "prefill", "prompt": args.prompt, "new": 0}, name,
                               t[f"{name}/prefill"], prefill_tok_s=prefill[name],
                               prefill_ratio=prefill[name] / prefill["dense"]))
            results.append(row({"batch": b, "phase": "generate", "prompt": args.prompt, "new": args.new}, name,
                               t[f"{name}/generate"], decode_tok_s=decode[name],
                               decode_ratio=ratio[name],
                               decode_ratio_paired=paired if name == "tree" else (1.0 if paired else None),
                               ideal_ratio_flops=ideal))
        ideal_bytes = decode_bytes(dense, b, args.prompt, args.new) / decode_bytes(tree, b, args.prompt, args.new)
        results[-1]["metrics"]["ideal_ratio_bytes"] = round(ideal_bytes, 4)
        rows.append([b, f"{prefill['dense']:,.0f}", f"{prefill['tree']:,.0f}",
                     f"{prefill['tree'] / prefill['dense']:.2f}x", _fmt(decode["dense"], ",.1f"),
                     _fmt(decode["tree"], ",.1f"), _fmt(ratio["tree"], ".2f", "x"), _fmt(paired, ".2f", "x"),
                     f"{ideal:.2f}x",
                     f"{ideal_bytes:.2f}x"])
    print_table(["batch", "dense prefill tok/s", "tree prefill tok/s", "ratio", "dense decode tok/s",
                 "tree decode tok/s", "ratio", "paired", "ideal (FLOPs)", "ideal (bytes)"], rows)
    summary = {"flops_per_token": {"dense": f_dense, "tree": f_tree}, "ideal_ratio_flops": ideal}
    if args.shares:
        shares = {b: {name: decode_shares(m, b, args.prompt, args.new) for name, m in (("dense", dense),
                                                                                       ("tree", tree))}
                  for b in batches}
        print("\nshare of decoding time (one generate call per model with timing hooks; ms per decoding step of "
              "the whole batch)")
        print_table(["batch", "model", *COMPONENTS, "ms/step"],
                    [[b, name, *(f"{sh[c]:.1%}" for c in COMPONENTS), f"{sh['ms_per_step']:.2f}"]
                     for b, per in shares.items() for name, sh in per.items()])
        summary["shares"] = {str(b): per for b, per in shares.items()}
    print_json("generate", env, settings, results, summary=summary, notes=notes)
    return 0
