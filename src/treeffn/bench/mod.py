"""``treeffn bench mod``: Mixture-of-Depths training step and decoding speed against the same model without MoD.

Raposo et al., "Mixture-of-Depths", arXiv 2404.02258 (2024): with every other block routed at capacity c, the
linear FLOPs of the blocks fall to ≈ (1 + c)/2, and sampling steps get faster because a token the causal router
skips does no work at that block (and adds nothing to its KV cache).

Measured in one process, same preset, same seed, with ``common.measure``: warm-up then repeats, the two models
interleaved (median):

* training step: forward + backward + AdamW step on random tokens (batch ``--batch`` × ``--seq-len``);
* decoding: cached decoding of ``--new`` tokens after a ``--prompt``-token random prompt, at each batch size of
  ``--decode-batch``; tokens/s = batch · new / wall time of the whole call (prefill included).

Two honest adjustments are needed because both models are untrained (training them is out of scope here):

1. *Router calibration.* The causal rule of an untrained router routes about half the tokens (random signs),
   which says nothing about a trained MoD model. Before decoding, each routed block's router (``causal=aux``) or
   predictor (``causal=predictor``) is trained — everything else frozen — on its own objective, BCE against
   top-C membership, for ``--router-steps`` steps on the block's inputs for random tokens (:func:`calibrate_routers`).
   This is the auxiliary task of MoD training; it drives the causal rule towards routing ≈ capacity.
2. *Token stream.* Greedy decoding of an untrained model with tied embeddings repeats its last prompt token
   forever, so every decode step would present the same state and the router would route all or none of them.
   ``--tokens stream`` (default) does exactly the work of greedy ``GPT.generate`` per step (one cached forward of
   one token per row, argmax of its logits) but feeds the next token from a fixed random stream;
   ``--tokens greedy`` times ``GPT.generate`` itself.

The fraction actually routed while decoding (decode steps only, prefill excluded) is measured in a separate untimed
run and printed beside the speed, and the analytic FLOPs ratio beside the training time. A table, then one JSON
line in the schema of ``bench/common.py``, go to stdout: rows ``case`` {phase train, batch, seq_len} or {phase
decode, batch, prompt, new}, ``impl`` baseline | mod; the targets and router agreement in ``summary``.

What bounds the result: MoD does not touch the embedding and output head, so the speed-up cannot exceed
1 / (analytic FLOPs ratio) where compute- or weight-bandwidth-bound — for ``tiny`` (vocabulary 8192, 4 layers
of d 256) the head is ~40 % of the FLOPs and the ratio is 0.73. At decoding batch > 1 a routed block runs whenever
*any* row routes (ragged rows are padded): at c = 0.125 and 8 rows that is ~66 % of the steps, so decoding gains
shrink with the batch.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from ..config import get_config, parse_overrides
from ..mod import RoutedBlock
from ..model import GPT, KVCache, build_model, sample_next
from .common import env_line, environment, measure, print_json, row, torch_threads

TARGET_DECODE_SPEEDUP = 1.4
TARGET_TRAIN_RATIO = 0.7


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="treeffn bench mod", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model shape")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--every", type=int, default=2, help="mod.every: every n-th block is routed")
    p.add_argument("--capacity", type=float, default=0.125, help="mod.capacity")
    p.add_argument("--causal", default="aux", choices=("aux", "predictor"), help="mod.causal")
    p.add_argument("--batch", type=int, default=8, help="training batch size")
    p.add_argument("--seq-len", type=int, default=0, help="training sequence length (0 = the model's context)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens for decoding")
    p.add_argument("--new", type=int, default=128, help="new tokens for decoding")
    p.add_argument("--decode-batch", default="1,8", help="comma-separated decoding batch sizes")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    p.add_argument("--router-steps", type=int, default=200, help="steps of router/predictor calibration (0 = none)")
    p.add_argument("--tokens", default="stream", choices=("stream", "greedy"),
                   help="decode-step tokens: a fixed random stream (greedy work per step) or GPT.generate greedy")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 keeps ratios stable on a shared machine (0 = leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _routed_blocks(model: GPT) -> list:
    return [b for b in model.blocks if isinstance(b, RoutedBlock)]


def calibrate_routers(model: GPT, tokens: torch.Tensor, steps: int, lr: float = 0.1) -> list[float]:
    """Train each routed block's router (aux) or predictor (predictor) on its own BCE-vs-top-C loss, all else frozen.

    Block by block in depth order: the block's inputs are recorded once from an eval forward over ``tokens``
    (earlier routed blocks already use their calibrated causal rule, as in decoding), then the block is run in
    training mode on them for ``steps`` optimiser steps of its ``aux["loss"]`` — the auxiliary objective of
    training, nothing invented for the bench. Cheap: the block itself only sees its top-C tokens and is frozen.
    Returns the final causal-rule / top-C agreement per routed block.
    """
    agreement = []
    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for rb in _routed_blocks(model):
            seen = []
            handle = rb.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
            model.eval()
            with torch.no_grad():
                model(tokens)
            handle.remove()
            x = seen[0]
            pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            params = list((rb.predictor or rb.router).parameters())
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=lr)
            rb.train()
            aux = {}
            for _ in range(steps):
                _, aux = rb(x, pos)
                opt.zero_grad(set_to_none=True)
                aux["loss"].backward()
                opt.step()
            for p in params:
                p.requires_grad_(False)
            agreement.append(float(aux["mod_agree"]) if aux else float("nan"))
    finally:
        for p, rg in frozen.items():
            p.requires_grad_(rg)
        model.train(was_training)
    return agreement


def _routed_hook(model: GPT, seen: list[float]):
    def hook(module, args, output):
        if args[0].shape[1] == 1:  # decode steps only, not the prefill
            seen.append(float(output[1]["mod_routed"]))

    return [b.register_forward_hook(hook) for b in _routed_blocks(model)]


@torch.no_grad()
def decode(model: GPT, prompt: torch.Tensor, new: int, stream: torch.Tensor | None) -> torch.Tensor:
    """Cached decoding of ``new`` tokens after ``prompt`` (B, P).

    ``stream`` None: ``GPT.generate`` greedy. Otherwise the same work per step as greedy generate — one cached
    forward of one token per row and the argmax of its logits — but the token fed next is ``stream[:, t]``
    (B, new), so an untrained model does not repeat one token forever (see the module docstring).
    """
    if stream is None:
        return model.generate(prompt, new)
    model.eval()
    cache = KVCache(len(model.blocks))
    logits = model(prompt, cache=cache).logits[:, -1]
    out = []
    for t in range(new):
        out.append(sample_next(logits))  # greedy choice, computed as generate does, then replaced by the stream
        if t + 1 < new:
            logits = model(stream[:, t:t + 1], cache=cache).logits[:, -1]
    return torch.stack(out, 1)


def decode_routed_fraction(model: GPT, prompt: torch.Tensor, new: int, stream: torch.Tensor | None) -> float:
    """Mean fraction of decode-step tokens (T = 1 calls) that the causal rule sends through a routed block."""
    seen: list[float] = []
    handles = _routed_hook(model, seen)
    try:
        decode(model, prompt, new, stream)
    finally:
        for h in handles:
            h.remove()
    return statistics.mean(seen) if seen else float("nan")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    with torch_threads(args.threads):
        return _run(args)


def _time_decoding(args, base: GPT, mod: GPT, vocab: int, g: torch.Generator, decode_batches: list[int]) -> list:
    """Decoding tokens/s of both models at each batch size (interleaved), with the fraction MoD routed."""
    decode_rows = []
    for B in decode_batches:
        prompt = torch.randint(0, vocab, (B, args.prompt), generator=g)
        stream = torch.randint(0, vocab, (B, args.new), generator=g) if args.tokens == "stream" else None
        rec = {"batch": B}
        base.eval()
        mod.eval()
        t = measure({"baseline": lambda: decode(base, prompt, args.new, stream),
                     "mod": lambda: decode(mod, prompt, args.new, stream)}, warmup=args.warmup, repeats=args.repeats)
        for name in ("baseline", "mod"):
            rec[f"{name}_tok_s"] = B * args.new / t[name].median
        rec["speedup"] = rec["mod_tok_s"] / rec["baseline_tok_s"]
        rec["routed_frac"] = decode_routed_fraction(mod, prompt, args.new, stream)
        rec["timing"] = t
        decode_rows.append(rec)
    return decode_rows


def _time_training(args, base: GPT, mod: GPT, vocab: int, seq: int, g: torch.Generator) -> dict:
    """One AdamW step of each model (interleaved) on the same random batch; the MoD model is a copy."""
    idx = torch.randint(0, vocab, (args.batch, seq + 1), generator=g)
    x, y = idx[:, :-1], idx[:, 1:]
    steps = {}
    for name, m in (("baseline", base), ("mod", copy.deepcopy(mod))):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

        def step(m=m, opt=opt):
            opt.zero_grad(set_to_none=True)
            m(x, targets=y).loss.backward()
            opt.step()

        steps[name] = step
    return measure(steps, warmup=max(1, args.warmup), repeats=args.repeats)


def _run(args) -> int:
    overrides = parse_overrides(args.set)
    base_cfg = get_config(args.preset, overrides)
    ctx = max(base_cfg.model.seq_len, args.prompt + args.new, args.seq_len)
    base_cfg.apply({"model.seq_len": ctx, "mod.every": 0})
    mod_cfg = base_cfg.copy().apply({"mod.every": args.every, "mod.capacity": args.capacity, "mod.causal": args.causal})
    seq = args.seq_len or ctx
    decode_batches = [int(b) for b in args.decode_batch.split(",") if b.strip()]

    torch.manual_seed(args.seed)
    base = build_model(base_cfg)
    torch.manual_seed(args.seed)
    mod = build_model(mod_cfg)
    flops = {name: m.flops_per_token(seq)["total"] for name, m in (("baseline", base), ("mod", mod))}
    env = environment()
    print(f"bench mod: {mod_cfg.describe()}  (baseline without MoD); {env_line(env)}")

    g = torch.Generator().manual_seed(args.seed + 1)
    calib = torch.randint(0, base_cfg.model.vocab_size, (4, seq), generator=g)
    agree = calibrate_routers(mod, calib, args.router_steps)
    decode_rows = _time_decoding(args, base, mod, base_cfg.model.vocab_size, g, decode_batches)
    train_t = _time_training(args, base, mod, base_cfg.model.vocab_size, seq, g)
    _report(args, env, overrides, mod_cfg, seq, decode_batches, flops, agree, decode_rows, train_t)
    return 0


def _report(args, env, overrides, mod_cfg, seq, decode_batches, flops, agree, decode_rows, train_t) -> None:
    train_s = {name: t.median for name, t in train_t.items()}
    train_ratio = train_s["mod"] / train_s["baseline"]
    print(f"router calibration: {args.router_steps} steps (causal={args.causal}); causal rule vs top-C agreement "
          f"per routed block {', '.join(f'{a:.3f}' for a in agree)}; decode tokens: {args.tokens}")
    print(f"{'metric':<34}{'baseline':>12}{'MoD':>12}{'MoD/base':>10}")
    print(f"{'analytic FLOPs/token (fwd)':<34}{flops['baseline']:>12.3g}{flops['mod']:>12.3g}"
          f"{flops['mod'] / flops['baseline']:>10.3f}")
    print(f"{f'train step ms (B={args.batch}, T={seq})':<34}{1e3 * train_s['baseline']:>12.1f}"
          f"{1e3 * train_s['mod']:>12.1f}{train_ratio:>10.3f}")
    for r in decode_rows:
        label = f"decode tok/s (B={r['batch']}, routed {r['routed_frac']:.3f})"
        print(f"{label:<34}{r['baseline_tok_s']:>12.1f}{r['mod_tok_s']:>12.1f}{r['speedup']:>10.3f}")
    met_decode = all(r["speedup"] >= TARGET_DECODE_SPEEDUP for r in decode_rows)
    met_train = train_ratio <= TARGET_TRAIN_RATIO
    print(f"targets: decode ≥ {TARGET_DECODE_SPEEDUP}x {'met' if met_decode else 'NOT met'}; "
          f"train step ≤ {TARGET_TRAIN_RATIO}x {'met' if met_train else 'NOT met'}")
    results = [row({"phase": "train", "batch": args.batch, "seq_len": seq}, name, train_t[name],
                   time_ratio_vs_baseline=train_s[name] / train_s["baseline"], flops_per_token=flops[name])
               for name in ("baseline", "mod")]
    for r in decode_rows:
        case = {"phase": "decode", "batch": r["batch"], "prompt": args.prompt, "new": args.new}
        results.append(row(case, "baseline", r["timing"]["baseline"], tok_s=r["baseline_tok_s"],
                           speedup_vs_baseline=1.0))
        results.append(row(case, "mod", r["timing"]["mod"], tok_s=r["mod_tok_s"], speedup_vs_baseline=r["speedup"],
                           routed_frac=r["routed_frac"]))
    settings = {"preset": args.preset, "overrides": overrides, "config": mod_cfg.describe(), "every": args.every,
                "capacity": args.capacity, "causal": args.causal, "batch": args.batch, "seq_len": seq,
                "prompt": args.prompt, "new": args.new, "decode_batches": decode_batches, "tokens": args.tokens,
                "router_steps": args.router_steps, "baseline": "baseline", "warmup": args.warmup,
                "repeats": args.repeats, "interleaved": True, "seed": args.seed}
    summary = {"train_ratio": train_ratio, "flops_ratio": flops["mod"] / flops["baseline"],
               "router_agreement": agree,
               "targets": {"decode_speedup": TARGET_DECODE_SPEEDUP, "train_ratio": TARGET_TRAIN_RATIO,
                           "decode_met": met_decode, "train_met": met_train}}
    print_json("mod", env, settings, results, summary=summary)


if __name__ == "__main__":
    raise SystemExit(main())
