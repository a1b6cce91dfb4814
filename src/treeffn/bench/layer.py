"""`treeffn bench layer`: per-layer inference time of the tree layer against its dense and sparse baselines.

Shapes: M tokens (the batch), D model width (768), K trees, L = depth + 1 levels, N = 2^L − 1 nodes per tree,
W = 1 unit per node.

Everything runs in one process, on the same random inputs, under ``torch.inference_mode()``:

===============  ===================================================================================================
name             what it is
===============  ===================================================================================================
tree-cpp         fused C++ kernel (``tree_infer(backend="cpp")``) on the shipped ``TreeFFN``'s weights, all trees and
                 levels in one call
tree-torch       batched PyTorch path walk (``tree_infer(backend="torch")``) on the same weights: gather + bmm per level
dense-train      the shipped ``DenseMLP`` of equal *training* width: K·2^L = K·(N+1) units, Linear → GELU → Linear
                 (2 GEMMs)
dense-infer      the shipped ``DenseMLP`` of equal *inference* width: K·L units (what a tree token actually reads)
moe-top1         the shipped ``MoE``: 16 experts, top-1 softmax router, each expert a GELU MLP of K·L units: the same
                 active units per token as the tree plus a 16-way router; sort, then a loop over the experts that
                 receive tokens (the usual MoE without fused kernels); no load-balancing loss
fff              PyPI ``fastfeedforward`` 0.2.1 ``FFF(D, 1, D, depth)`` in eval mode (its hard-path walk plus a
                 per-token Python loop over leaves), only for K = 1; skipped with a note when not installed
===============  ===================================================================================================

Inputs are N(0, 1) tokens, a fresh batch from a pool of 8 for every call, so the routing is diverse (tokens spread
over the leaves) and no call finds its path's weights hot in cache from the previous call with the same input.
Each measurement (``common.measure``): up to 3 warm-up calls (one if it takes over 0.1 s), then up to ``--repeats``
timed calls (stopping early after ``--budget-s`` seconds but never below 3), reporting the median and the minimum in
µs per call. ``ratio`` is dense-train time / that time (medians; ``ratio(min)`` from the minima, the better estimate
when other processes share the cores); ``ideal`` is K·N / (K·L) = N / L, the ratio of units read per token. The
1-min load average is recorded at start and end.

The dense layer of equal training width gets K·(N+1) units, K more than the tree's K·N: a power-of-two width
(4,096 for every default configuration) instead of an odd one such as 4,095, which the CPU GEMM runs up to 1.5x
slower. The baseline does 0.02–0.8 % more arithmetic and is never handicapped by its shape.

Every layer is built by ``treeffn.layers.build_ffn`` from a config (``bench/common.py``), as a model would build it.
The table is followed by one JSON line in the schema of ``bench/common.py``: a row per (configuration, batch,
implementation), ``case`` {config, K, depth, batch}, ``metrics`` {ratio_vs_dense_train, ratio_min_vs_dense_train,
ideal}.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from ..kernels.tree_infer import extension, tree_infer
from .common import (
    dense_mlp,
    drop_unbuilt_cpp,
    env_line,
    environment,
    measure,
    moe,
    parse_configs,
    parse_ints,
    print_json,
    row,
    tree_ffn,
)

MOE_EXPERTS = 16
MOE_TOP_K = 1
POOL = 8
WARMUP, WARMUP_CUTOFF_S, MIN_REPEATS = 3, 0.1, 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treeffn bench layer",
        description="Per-layer inference time of the tree layer (fused C++ kernel and PyTorch path walk) against a "
                    "dense GELU MLP of equal training width (K·2^L units, the tree's K·N rounded up to a power of "
                    "two), one of equal inference width (K·L units), a 16-expert top-1 MoE of K·L-unit experts "
                    "(the shipped layers) and, for K=1, the PyPI fastfeedforward FFF. Prints a table of µs per "
                    "call and speed-up over the dense layer of equal training width, then one JSON line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", type=parse_configs, default="1x11,16x7,32x6",
                   help="comma-separated KxDEPTH tree configurations (K trees of the given depth, 1 unit per node)")
    p.add_argument("--batches", type=parse_ints, default="1,16,256,2048", help="comma-separated batch sizes M")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per measurement (median reported)")
    p.add_argument("--budget-s", type=float, default=2.0,
                   help="stop timing a measurement after this many seconds (at least 3 calls are always timed)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weights and activations; bf16 kernels accumulate in fp32 (fff always runs fp32)")
    p.add_argument("--d-model", type=int, default=768, help="model width D (even)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: keep the current setting)")
    p.add_argument("--impls", default="tree-cpp,tree-torch,dense-train,dense-infer,moe-top1,fff",
                   help="comma-separated subset of implementations to time")
    p.add_argument("--skip-fff", action="store_true", help="do not time the fastfeedforward package")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and inputs")
    return p


def build_layers(d_model: int, trees: int, depth: int, impls: list[str], dtype=torch.float32) -> dict[str, nn.Module]:
    """The shipped layers of one configuration, in eval mode: ``"tree"`` (whose weights the tree kernels run on)
    and each baseline of ``impls`` among dense-train, dense-infer and moe-top1."""
    L, N = depth + 1, 2 ** (depth + 1) - 1
    layers = {"tree": tree_ffn(d_model, trees, depth)}
    if "dense-train" in impls:
        layers["dense-train"] = dense_mlp(d_model, trees * (N + 1))  # a power-of-two width: see the docstring
    if "dense-infer" in impls:
        layers["dense-infer"] = dense_mlp(d_model, trees * L)
    if "moe-top1" in impls:
        layers["moe-top1"] = moe(d_model, MOE_EXPERTS, MOE_TOP_K, trees * L)
    return {name: m.to(dtype).eval() for name, m in layers.items()}


def _fff_version() -> str | None:
    try:
        import fastfeedforward  # noqa: F401
        from importlib.metadata import version

        return version("fastfeedforward")
    except Exception:  # noqa: BLE001 - optional package
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    D = args.d_model
    notes = []

    drop_unbuilt_cpp(impls, extension, notes)
    FFF = None
    if "fff" in impls:
        if args.skip_fff:
            impls.remove("fff")
        else:
            try:
                from fastfeedforward import FFF
            except ImportError:
                impls.remove("fff")
                notes.append("fff skipped: `pip install --no-deps fastfeedforward==0.2.1` to include it")

    env = environment()
    settings = {"configs": [f"{k}x{d}" for k, d in args.configs], "batches": args.batches, "d_model": D,
                "dtype": args.dtype, "impls": impls, "node_width": 1, "activation": "gelu", "placement": "node",
                "baseline": "dense-train", "dense_train_units": "K*2^L", "dense_infer_units": "K*L",
                "moe": {"experts": MOE_EXPERTS, "top_k": MOE_TOP_K, "expert_units": "K*L", "aux_weight": 0.0},
                "fastfeedforward": _fff_version(), "input_pool": POOL, "warmup": WARMUP,
                "warmup_cutoff_s": WARMUP_CUTOFF_S, "repeats": args.repeats, "min_repeats": MIN_REPEATS,
                "budget_s": args.budget_s, "seed": args.seed}
    print(f"treeffn bench layer: D={D} dtype={args.dtype}; {env_line(env)}; "
          f"fastfeedforward={settings['fastfeedforward']}")
    print("µs per call: median and min over the timed calls; ratio = dense-train µs / impl µs (median, and min/min);"
          " ideal = K·N/(K·L) units read per token")
    results = []
    gen = torch.Generator().manual_seed(args.seed)
    header = (f"{'config':>7} {'batch':>6} {'impl':>12} {'µs median':>12} {'µs min':>12} {'ratio':>9} "
              f"{'ratio(min)':>10} {'ideal':>7}")
    print(header)
    print("-" * len(header))
    for K, depth in args.configs:
        torch.manual_seed(args.seed)
        L = depth + 1
        N = 2 ** L - 1
        ideal = N / L
        layers = build_layers(D, K, depth, impls, dtype)
        tree = layers.pop("tree")
        w_in, b_in, w_out = tree.w_in.detach(), tree.b_in.detach(), tree.w_out.detach()
        fns = {
            "tree-cpp": lambda x: tree_infer(x, w_in, b_in, w_out, depth, "gelu", "node", backend="cpp"),
            "tree-torch": lambda x: tree_infer(x, w_in, b_in, w_out, depth, "gelu", "node", backend="torch"),
            **layers,
        }
        if "fff" in impls and K == 1 and depth >= 1:
            fff = FFF(D, 1, D, depth).eval()  # fp32 only: it allocates its output as float
            fns["fff"] = lambda x, f=fff: f(x.float())
        for M in args.batches:
            inputs = [torch.randn(M, D, generator=gen).to(dtype) for _ in range(POOL)]
            timings = {}
            with torch.inference_mode():
                for name in impls:
                    if name in fns:
                        timings[name] = measure(fns[name], inputs, warmup=WARMUP, warmup_cutoff_s=WARMUP_CUTOFF_S,
                                                repeats=args.repeats, min_repeats=MIN_REPEATS,
                                                budget_s=args.budget_s)
            base = timings.get("dense-train")
            for name, t in timings.items():
                us, us_min = t.median * 1e6, t.min * 1e6
                ratio = base.median / t.median if base else None
                ratio_min = base.min / t.min if base else None
                print(f"{K}x{depth:<5} {M:>6} {name:>12} {us:>12.1f} {us_min:>12.1f} "
                      f"{f'{ratio:.1f}x' if ratio else '-':>9} {f'{ratio_min:.1f}x' if ratio_min else '-':>10} "
                      f"{ideal:>6.0f}x")
                results.append(row({"config": f"{K}x{depth}", "K": K, "depth": depth, "batch": M}, name, t,
                                   ratio_vs_dense_train=ratio,
                                   ratio_min_vs_dense_train=ratio_min,
                                   ideal=ideal))
            print()
    print_json("layer", env, settings, results, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
