"""`treeffn bench train-ffn`: forward+backward time of the tree layer against the dense MLP of equal training width.

The question: every public tree-FFN implementation trains in O(N), as expensive as the dense layer it replaces.
``treeffn.kernels.tree_train`` trains at the cost of the visited path (UltraFastBERT form, Belcak & Wattenhofer
arXiv 2311.10770; DS-26 placements). This benchmark measures it.

Shapes: M tokens (``--tokens``, 4,096), D model width (512 and 768), K trees, L = depth + 1 levels,
N = 2^L − 1 nodes per tree, W = 1 unit per node; configurations K×depth = 1x11, 8x8, 16x7, 32x6 (K·N ≈ 4,064–4,095
units, 12–224 of them visited per token).

===========  ==========================================================================================================
name         what it times (one call = forward, then backward of a random upstream gradient; x requires grad)
===========  ==========================================================================================================
dense        the shipped ``DenseMLP``, Linear(D, K·2^L) → GELU → Linear(K·2^L, D): the dense MLP of equal *training*
             width (6 GEMMs per call)
tree-cpp     ``tree_train(backend="cpp")``: fused C++ forward and backward over the visited nodes only
tree-torch   ``tree_train(backend="torch")``: the device-agnostic PyTorch path (gather, batched dots, index_add_)
reference    ``tree_reference``: the masked dense simulation (computes all K·N nodes, zeroes the unvisited ones)
===========  ==========================================================================================================

Everything runs in one process on the same random inputs (fresh N(0, 1) tokens from a pool of 2, so routing is
diverse), on the weights of the shipped ``TreeFFN`` (``build_ffn``; UFB-23 initialisation, no routing thresholds).
Each measurement (``common.measure``): ``--warmup`` untimed calls, then up to ``--repeats`` timed calls, stopping
early once ``--budget-s`` seconds are spent (at least one timed call; a call whose warm-up alone exceeds the budget
is timed once, its warm-up counted as the sample, and marked ``*``).
Times are medians in ms. ``speedup`` = dense ms / ms (same dtype); for bf16 rows ``vs fp32`` = fp32 dense ms / ms,
because bf16 GEMMs on CPUs without native bf16 instructions are several times slower than fp32 ones.

The dense MLP gets K·2^L = K·(N+1) units, K more than the tree's K·N: a power-of-two width (4,096 for every
default configuration) instead of an odd one such as 4,095, which the CPU GEMM runs up to 1.5x slower, so the
baseline is never handicapped by its shape.

The table is followed by one JSON line in the schema of ``bench/common.py``: a row per (D, dtype, configuration,
implementation), ``case`` {d_model, dtype, config, K, depth, W, tokens}, ``metrics`` {fwd_s (median forward part),
units_total, units_visited, speedup_vs_dense, speedup_vs_dense_fp32}.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from ..kernels.tree_train import extension, tree_train
from ..ops.tree import tree_reference
from .common import (
    dense_mlp,
    drop_unbuilt_cpp,
    env_line,
    environment,
    measure,
    parse_choices,
    parse_configs,
    parse_ints,
    print_json,
    row,
    tree_ffn,
)

POOL = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("dense", "tree-cpp", "tree-torch", "reference")





def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treeffn bench train-ffn",
        description="Training step (forward + backward) of the tree layer — sparse path (fused C++ kernel and "
                    "PyTorch ops) and the masked dense reference — against the dense GELU MLP of equal training "
                    "width (K·2^L units, the tree's K·N rounded up to a power of two), in fp32 and bf16. Prints a table of ms per call and speed-up over the dense "
                    "MLP, then one JSON line. Restrict the grid for a quick run, e.g. "
                    "--d-model 768 --configs 16x7 --dtypes fp32 --repeats 3.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--d-model", type=parse_ints, default="512,768", help="comma-separated model widths D")
    p.add_argument("--configs", type=parse_configs, default="1x11,8x8,16x7,32x6",
                   help="comma-separated KxDEPTH tree configurations (K trees of the given depth, 1 unit per node)")
    p.add_argument("--dtypes", type=parse_choices(tuple(DTYPES)), default="fp32,bf16",
                   help="comma-separated dtypes of weights and activations (bf16 tree kernels accumulate in fp32)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per call M (batch × sequence, flattened)")
    p.add_argument("--impls", type=parse_choices(IMPLS), default=",".join(IMPLS),
                   help="comma-separated subset of implementations to time")
    p.add_argument("--skip-bf16-baselines", action="store_true",
                   help="time the dense MLP and the masked reference in fp32 only; bf16 tree rows are then compared "
                        "with the fp32 dense MLP ('vs fp32'). bf16 GEMMs take tens of seconds per call on CPUs "
                        "without native bf16 instructions")
    p.add_argument("--skip-reference", action="store_true", help="do not time the masked dense reference")
    p.add_argument("--placement", choices=("node", "output"), default="node", help="tree placement of φ")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median reported)")
    p.add_argument("--budget-s", type=float, default=15.0,
                   help="stop timing a measurement after this many seconds (at least one timed call)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: keep the current setting)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and inputs")
    return p


def build_layers(d_model: int, trees: int, depth: int, placement: str, with_dense: bool) -> dict[str, nn.Module]:
    """The shipped layers of one configuration: ``"tree"`` (whose weights the tree kernels train) and, when asked,
    ``"dense"``, the dense MLP of K·2^L units (a power-of-two width: see the docstring)."""
    layers = {"tree": tree_ffn(d_model, trees, depth, placement=placement)}
    if with_dense:
        layers["dense"] = dense_mlp(d_model, trees * 2 ** (depth + 1))
    return layers


def _make_step(name, params, depth, placement, dy, dense):
    """A closure: forward + backward of one implementation; returns the forward's seconds."""
    w_in, b_in, w_out = params

    def clear(x):
        x.grad = None
        for p in (*params, *dense.parameters()):
            p.grad = None

    if name == "dense":
        def fwd(x):
            return dense(x)[0]
    elif name in ("tree-cpp", "tree-torch"):
        impl = name.split("-")[1]

        def fwd(x):
            return tree_train(x, w_in, b_in, w_out, depth, "gelu", placement, backend=impl)[0]
    else:
        def fwd(x):
            return tree_reference(x, w_in, b_in, w_out, depth, "gelu", placement)

    def step(x):
        clear(x)
        t0 = time.perf_counter()
        y = fwd(x)
        t1 = time.perf_counter()
        y.backward(dy)
        return t1 - t0

    return step


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.tokens < 1:
        raise SystemExit("--tokens must be ≥ 1")
    impls = [i for i in IMPLS if i in args.impls and not (i == "reference" and args.skip_reference)]
    notes = []
    drop_unbuilt_cpp(impls, extension, notes)
    env = environment()
    M = args.tokens
    settings = {"tokens": M, "d_model": args.d_model, "dtypes": args.dtypes,
                "configs": [f"{k}x{d}" for k, d in args.configs], "impls": impls, "placement": args.placement,
                "activation": "gelu", "node_width": 1, "baseline": "dense", "dense_units": "K*2^L",
                "skip_bf16_baselines": args.skip_bf16_baselines, "input_pool": POOL, "warmup": args.warmup,
                "repeats": args.repeats, "min_repeats": 1, "budget_s": args.budget_s, "seed": args.seed}
    print(f"treeffn bench train-ffn: M={M} tokens, W=1, placement={args.placement}; {env_line(env)}")
    print("ms per forward+backward (median; fwd = forward part); speedup = dense ms / ms (same dtype); "
          "vs fp32 = fp32 dense ms / ms; * = single slow call")
    header = (f"{'D':>4} {'dtype':>5} {'config':>6} {'units':>11} {'impl':>10} {'fwd ms':>9} {'ms':>10} "
              f"{'n':>2} {'speedup':>8} {'vs fp32':>8}")
    print(header)
    print("-" * len(header))
    results = []
    dense_fp32 = {}  # (D, config) -> fp32 dense seconds, for the bf16 rows' second ratio
    gen = torch.Generator().manual_seed(args.seed)
    for D in args.d_model:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            for K, depth in args.configs:
                torch.manual_seed(args.seed)
                L, N = depth + 1, 2 ** (depth + 1) - 1
                here = [i for i in impls
                        if not (dname == "bf16" and args.skip_bf16_baselines and i in ("dense", "reference"))]
                layers = {k: m.to(dtype) for k, m in
                          build_layers(D, K, depth, args.placement, with_dense="dense" in here).items()}
                tree, dense = layers["tree"], layers.get("dense", nn.Identity())
                params = (tree.w_in, tree.b_in, tree.w_out)
                inputs = [torch.randn(M, D, generator=gen).to(dtype).requires_grad_() for _ in range(POOL)]
                dy = torch.randn(M, D, generator=gen).to(dtype)
                timings = {}
                for name in here:
                    step = _make_step(name, params, depth, args.placement, dy, dense)
                    timings[name] = measure(step, inputs, warmup=args.warmup, repeats=args.repeats,
                                            budget_s=args.budget_s, slow_sample=True)
                cfg = f"{K}x{depth}"
                base = timings["dense"].median if "dense" in timings else None
                if dname == "fp32" and base:
                    dense_fp32[(D, cfg)] = base
                base32 = dense_fp32.get((D, cfg))
                for name, t in timings.items():
                    speedup = base / t.median if base else None
                    vs32 = base32 / t.median if (base32 and dname != "fp32") else None
                    mark = "*" if t.warmup_as_sample else " "
                    print(f"{D:>4} {dname:>5} {cfg:>6} {f'{K * L}/{K * N}':>11} {name:>10} "
                          f"{t.part_median * 1e3:>9.1f} {t.median * 1e3:>9.1f}{mark} {t.n:>2} "
                          f"{f'{speedup:.2f}x' if speedup else '-':>8} {f'{vs32:.2f}x' if vs32 else '-':>8}",
                          flush=True)
                    results.append(row({"d_model": D, "dtype": dname, "config": cfg, "K": K, "depth": depth, "W": 1,
                                        "tokens": M}, name, t,
                                       fwd_s=t.part_median, units_total=K * N, units_visited=K * L,
                                       speedup_vs_dense=speedup,
                                       speedup_vs_dense_fp32=vs32))
                print()
    print_json("train-ffn", env, settings, results, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
