"""`treeffn bench layer`: per-layer inference time of the tree layer against its dense and sparse baselines.

Shapes: M tokens (the batch), D model width (768), K trees, L = depth + 1 levels, N = 2^L − 1 nodes per tree,
W = 1 unit per node.

Everything runs in one process, on the same random inputs, under ``torch.inference_mode()``:

===============  ===================================================================================================
name             what it is
===============  ===================================================================================================
tree-cpp         fused C++ kernel (``tree_infer(impl="cpp")``), all trees and levels in one call
tree-torch       batched PyTorch path walk (``tree_infer(impl="torch")``): gather + bmm per level
dense-train      dense GELU MLP of equal *training* width: K·2^L = K·(N+1) units, Linear → GELU → Linear (2 GEMMs)
dense-infer      dense GELU MLP of equal *inference* width: K·L units (what a tree token actually reads)
moe-top1         16 experts, top-1 softmax router, each expert a GELU MLP of K·L units: the same active units per
                 token as the tree plus a 16-way router; loop over the experts that receive tokens (the usual
                 sort/gather MoE without fused kernels)
fff              PyPI ``fastfeedforward`` 0.2.1 ``FFF(D, 1, D, depth)`` in eval mode (its hard-path walk plus a
                 per-token Python loop over leaves), only for K = 1; skipped with a note when not installed
===============  ===================================================================================================

Inputs are N(0, 1) tokens, a fresh batch from a pool of 8 for every call, so the routing is diverse (tokens spread
over the leaves) and no call finds its path's weights hot in cache from the previous call with the same input.
Each measurement: warm-up calls, then up to ``--repeats`` timed calls (stopping early after ``--budget-s`` seconds
but never below 3), reporting the median and the minimum in µs per call. ``ratio`` is dense-train time / that time
(medians; ``ratio(min)`` from the minima, the better estimate when other processes share the cores); ``ideal`` is
K·N / (K·L) = N / L, the ratio of units read per token. The 1-min load average is recorded at start and end.

The dense layer of equal training width gets K·(N+1) units, K more than the tree's K·N: a power-of-two width
(4,096 for every default configuration) instead of an odd one such as 4,095, which the CPU GEMM runs up to 1.5x
slower. The baseline does 0.02–0.8 % more arithmetic and is never handicapped by its shape.

The table is followed by one JSON line (``{"bench": "layer", ...}``) for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from .common import DenseMLP, drop_unbuilt_cpp, loadavg, parse_configs, parse_ints

MOE_EXPERTS = 16
POOL = 8





def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treeffn bench layer",
        description="Per-layer inference time of the tree layer (fused C++ kernel and PyTorch path walk) against a "
                    "dense GELU MLP of equal training width (K·2^L units, the tree's K·N rounded up to a power of two), one of equal inference width (K·L units), "
                    "a 16-expert top-1 MoE of K·L-unit experts and, for K=1, the PyPI fastfeedforward FFF. "
                    "Prints a table of µs per call and speed-up over the dense layer of equal training width, then "
                    "one JSON line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", type=parse_configs, default="1x11,16x7,32x6",
                   help="comma-separated KxDEPTH tree configurations (K trees of the given depth, 1 unit per node)")
    p.add_argument("--batches", type=parse_ints, default="1,16,256,2048", help="comma-separated batch sizes M")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per measurement (median reported)")
    p.add_argument("--budget-s", type=float, default=2.0,
                   help="stop timing a measurement after this many seconds (at least 3 calls are always timed)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weights and activations; bf16 kernels accumulate in fp32 (fff always runs fp32)")
    p.add_argument("--d-model", type=int, default=768, help="model width D")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: keep the current setting)")
    p.add_argument("--impls", default="tree-cpp,tree-torch,dense-train,dense-infer,moe-top1,fff",
                   help="comma-separated subset of implementations to time")
    p.add_argument("--skip-fff", action="store_true", help="do not time the fastfeedforward package")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and inputs")
    return p


class MoETop1(nn.Module):
    """E experts (GELU MLPs of ``hidden`` units), top-1 softmax router, output scaled by the router probability.

    Tokens are sorted by expert and each expert that receives tokens runs on its slice: the plain PyTorch MoE
    without fused kernels (one router GEMM, a sort, then 2 small GEMMs per active expert).
    """

    def __init__(self, d: int, hidden: int, experts: int):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        a = d ** -0.5
        self.w1 = nn.Parameter(torch.empty(experts, d, hidden).uniform_(-a, a))
        self.b1 = nn.Parameter(torch.zeros(experts, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, d).uniform_(-hidden ** -0.5, hidden ** -0.5))

    def forward(self, x):  # x (M, D)
        prob = self.router(x).softmax(-1)
        gate, expert = prob.max(-1)  # (M,), (M,)
        if x.shape[0] == 1:  # batch 1: no sort, one expert
            e = int(expert)
            return (F.gelu(x @ self.w1[e] + self.b1[e]) @ self.w2[e]) * gate.unsqueeze(-1)
        order = torch.argsort(expert)
        counts = torch.bincount(expert, minlength=self.w1.shape[0]).tolist()
        xs = x.index_select(0, order)
        ys = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts):
            if c:
                ys[start:start + c] = F.gelu(xs[start:start + c] @ self.w1[e] + self.b1[e]) @ self.w2[e]
                start += c
        y = torch.empty_like(x)
        y.index_copy_(0, order, ys)
        return y * gate.unsqueeze(-1)


def _time(fn, inputs: list[torch.Tensor], repeats: int, budget_s: float) -> tuple[float, float]:
    """(median, min) µs per call of fn(x), cycling through the input pool."""
    for i in range(3):  # warm-up: first-call allocations, lazy init, caches (one call is enough for slow ones)
        t0 = time.perf_counter()
        fn(inputs[i % len(inputs)])
        if time.perf_counter() - t0 > 0.1:
            break
    times = []
    t_end = time.perf_counter() + budget_s
    for i in range(max(3, repeats)):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() > t_end:
            break
    return statistics.median(times) * 1e6, min(times) * 1e6


def _versions() -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import fastfeedforward  # noqa: F401
        from importlib.metadata import version

        info["fastfeedforward"] = version("fastfeedforward")
    except Exception:  # noqa: BLE001 - optional package
        info["fastfeedforward"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..kernels.tree_infer import extension, tree_infer
    from ..layers.tree import TreeFFN

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

    info = _versions()
    print(f"treeffn bench layer: D={D} dtype={args.dtype} threads={info['threads']} torch={info['torch']} "
          f"cpu_count={info['cpu_count']} fastfeedforward={info['fastfeedforward']}")
    print("µs per call: median and min over the timed calls; ratio = dense-train µs / impl µs (median, and min/min);"
          " ideal = K·N/(K·L) units read per token")
    load0 = loadavg()
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
        tree = TreeFFN(D, K, depth).to(dtype).eval()
        w_in, b_in, w_out = tree.w_in.detach(), tree.b_in.detach(), tree.w_out.detach()
        models = {}
        if "dense-train" in impls:
            models["dense-train"] = DenseMLP(D, K * (N + 1)).to(dtype).eval()  # see the docstring
        if "dense-infer" in impls:
            models["dense-infer"] = DenseMLP(D, K * L).to(dtype).eval()
        if "moe-top1" in impls:
            models["moe-top1"] = MoETop1(D, K * L, MOE_EXPERTS).to(dtype).eval()
        fff = None
        if "fff" in impls and K == 1 and depth >= 1:
            fff = FFF(D, 1, D, depth).eval()  # fp32 only: it allocates its output as float
        fns = {
            "tree-cpp": lambda x: tree_infer(x, w_in, b_in, w_out, depth, "gelu", "node", impl="cpp"),
            "tree-torch": lambda x: tree_infer(x, w_in, b_in, w_out, depth, "gelu", "node", impl="torch"),
            **{name: m for name, m in models.items()},
        }
        if fff is not None:
            fns["fff"] = lambda x, f=fff: f(x.float())
        for M in args.batches:
            inputs = [torch.randn(M, D, generator=gen).to(dtype) for _ in range(POOL)]
            row = {}
            with torch.inference_mode():
                for name in impls:
                    if name not in fns:
                        continue
                    row[name] = _time(fns[name], inputs, args.repeats, args.budget_s)
            base, base_min = row.get("dense-train", (None, None))
            for name, (us, us_min) in row.items():
                ratio = base / us if base else float("nan")
                ratio_min = base_min / us_min if base_min else float("nan")
                print(f"{K}x{depth:<5} {M:>6} {name:>12} {us:>12.1f} {us_min:>12.1f} {ratio:>8.1f}x "
                      f"{ratio_min:>9.1f}x {ideal:>6.0f}x")
                results.append({"config": f"{K}x{depth}", "K": K, "depth": depth, "batch": M, "impl": name,
                                "us": round(us, 2), "us_min": round(us_min, 2),
                                "ratio_vs_dense_train": round(ratio, 2) if base else None,
                                "ratio_min_vs_dense_train": round(ratio_min, 2) if base_min else None,
                                "ideal": round(ideal, 2)})
            print()
    for n in notes:
        print("note:", n)
    load1 = loadavg()
    if load0 is not None and max(load0, load1) > 0.5 * (info["cpu_count"] or 1):
        print(f"note: 1-min load average {load0:.1f} at start, {load1:.1f} at end on {info['cpu_count']} CPUs: other "
              "processes competed for the cores; medians of multi-threaded calls suffer most (min is closer to an "
              "idle machine)")
    print(json.dumps({"bench": "layer", "d_model": D, "dtype": args.dtype, "moe_experts": MOE_EXPERTS, **info,
                      "loadavg_start": load0, "loadavg_end": load1, "notes": notes, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
