"""`treeffn bench sparse-mlp`: the training-free sparse MLPs (TEAL, CATS, WINA; ``ffn.kind=sparse``) against the
dense MLP they replace, at small batch, with the weights in cache and out of it.

Shapes: D model width, H hidden units (default 576 and 1,536: SmolLM2-135M's MLP), SwiGLU (``--mlp swiglu``, three
D×H matrices) or a GELU MLP with biases (``--mlp dense``, two).

Everything runs in one process, on the same random inputs, under ``torch.no_grad()``:

* ``dense`` — the shipped dense MLP (``SwiGLU`` or ``DenseMLP``), the baseline of every ratio;
* ``teal`` / ``cats`` / ``wina`` at each active fraction F (``--active``), the shipped sparse module built from the
  dense layer's weights, its thresholds calibrated on 2,048 random inputs from the timed inputs' distribution.
  Path ``kernel``: the module as a model calls it, which at ``GATHER_MAX_TOKENS`` tokens or fewer runs the gathered
  sparse GEMV kernel (``kernels/csrc/sparse_mlp.cpp``: only the kept rows of the weights are read); path
  ``masked`` (``--paths``): the masked dense reference (every product computed, the dropped ones zeroed), which
  shows that zeroing activations alone buys nothing.

Cache states as in ``treeffn bench layer``: ``warm`` (one layer, its weights stay in cache as far as they fit) and
``cold`` (copies of every layer in rotation and, before each timed call, a read of twice the last-level cache, then
the same call on another copy: the weights come from memory, as inside a model whose other layers evicted them).

``ratio`` = dense µs / that row's µs in the same cache state and batch (medians; ``ratio(min)`` from the minima);
``read`` = the fraction of the dense layer's weights the rule reads per token (TEAL, WINA: F; CATS: the gate in
full and F of the others, (1 + 2F)/3 for SwiGLU, (1 + F)/2 for a dense MLP), so 1/read is the ratio a purely
memory-bound kernel would reach; ``kept`` = the fraction of hidden units kept on the timed inputs. The table is
followed by one JSON line in the schema of ``bench/common.py``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from ..kernels.sparse_mlp import extension
from ..layers.sparse_mlp import GATHER_MAX_TOKENS, METHODS, MLPS
from ..memory import huge_pages_available, use_huge_pages
from .common import env_line, environment, parse_choices, parse_ints, print_json, row, shipped_ffn, torch_threads
from .layer import DEFAULT_LLC_MB, EVICT_LLC, Evict, cold_copies, layer_bytes, time_calls

CACHES = ("warm", "cold")
PATHS = ("kernel", "masked")
POOL = 8
CALIBRATION_TOKENS = 2048


def _fractions(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad fraction list '{text}'") from None
    if not vals or any(not 0.0 < v < 1.0 for v in vals):
        raise argparse.ArgumentTypeError("active fractions must be in (0, 1)")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treeffn bench sparse-mlp",
        description="Training-free activation sparsity (TEAL, CATS, WINA) of an MLP at small batch: the shipped "
                    "sparse module (gathered sparse GEMV kernel, or the masked reference) against the dense MLP of "
                    "the same weights, warm and cache-cold. Prints a table of µs per call and the speed-up over "
                    "the dense MLP, then one JSON line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mlp", choices=MLPS, default="swiglu", help="the MLP made sparse")
    p.add_argument("--d-model", type=int, default=576, help="model width D (even)")
    p.add_argument("--hidden", type=int, default=1536, help="hidden units H")
    p.add_argument("--methods", type=parse_choices(METHODS), default=",".join(METHODS), help="rules to time")
    p.add_argument("--active", type=_fractions, default="0.5,0.25,0.1,0.05",
                   help="comma-separated active fractions F of the hidden units")
    p.add_argument("--batches", type=parse_ints, default="1", help="comma-separated batch sizes M")
    p.add_argument("--cache", type=parse_choices(CACHES), default="warm,cold", help="cache states to time")
    p.add_argument("--paths", type=parse_choices(PATHS), default="kernel",
                   help="how the sparse module computes: kernel (as a model calls it: the gathered kernel up to "
                        f"{GATHER_MAX_TOKENS} token(s) per call), masked (the masked dense reference)")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per measurement (median reported)")
    p.add_argument("--budget-s", type=float, default=2.0,
                   help="stop timing a measurement after this many seconds (at least 3 calls are always timed)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: keep the current setting)")
    p.add_argument("--llc-mb", type=float, default=0.0,
                   help=f"last-level cache size in MiB (0: what the machine says, else {DEFAULT_LLC_MB})")
    p.add_argument("--huge-pages", choices=("on", "off"), default="on",
                   help="every layer's weights (and the sparse kernels' tables) on transparent huge pages, as "
                        "treeffn.load_model places a model's (Linux with THP enabled; elsewhere off)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and inputs")
    return p


def dense_layer(mlp: str, d_model: int, hidden: int, huge_pages: bool = False) -> nn.Module:
    overrides = {"ffn.hidden": hidden} if mlp == "swiglu" else {"ffn.hidden": hidden, "ffn.activation": "gelu"}
    layer = shipped_ffn(mlp, d_model, overrides).eval()
    if huge_pages:
        use_huge_pages(layer)
    return layer


def sparse_layer(dense: nn.Module, mlp: str, method: str, active: float, calibration: torch.Tensor,
                 huge_pages: bool = False) -> nn.Module:
    """The shipped sparse module with ``dense``'s weights, calibrated on ``calibration``; ``huge_pages``: its
    weights, and so the kernel's tables, on huge pages."""
    layer = shipped_ffn("sparse", dense.d_model, {"ffn.hidden": dense.hidden, "sparsity.mlp": mlp,
                                                  "sparsity.method": method, "sparsity.active": active,
                                                  "ffn.activation": getattr(dense, "activation", "gelu")})
    layer.load_state_dict(dense.state_dict(), strict=False)
    layer.eval()
    layer.calibrate(calibration)
    if huge_pages:
        use_huge_pages(layer)
    return layer


def weights_read(mlp: str, method: str, active: float) -> float:
    """Fraction of the dense layer's weights the rule reads per token."""
    if method != "cats":
        return active
    return (1 + 2 * active) / 3 if mlp == "swiglu" else (1 + active) / 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with torch_threads(args.threads):
        return _run(args)


def _run(args) -> int:
    notes = []
    if extension() is None:
        notes.append("the sparse GEMV kernel could not be built: kernel rows run the masked reference")
    env = environment()
    llc = int(args.llc_mb * 2**20) or env["llc_bytes"] or (DEFAULT_LLC_MB << 20)
    cold = "cold" in args.cache
    evict = Evict(EVICT_LLC * llc) if cold else None
    torch.manual_seed(args.seed)
    huge = args.huge_pages == "on" and huge_pages_available()
    first = dense_layer(args.mlp, args.d_model, args.hidden, huge)
    n = cold_copies(layer_bytes(first), llc) if cold else 1
    denses = [first] + [dense_layer(args.mlp, args.d_model, args.hidden, huge) for _ in range(n - 1)]
    gen = torch.Generator().manual_seed(args.seed)
    calibration = torch.randn(CALIBRATION_TOKENS, args.d_model, generator=gen)
    settings = {"mlp": args.mlp, "d_model": args.d_model, "hidden": args.hidden, "methods": args.methods,
                "active": args.active, "batches": args.batches, "cache": args.cache, "paths": args.paths,
                "gather_max_tokens": GATHER_MAX_TOKENS, "calibration_tokens": CALIBRATION_TOKENS,
                "input": "standard normal", "llc_bytes": llc, "eviction_bytes": EVICT_LLC * llc if cold else 0,
                "copies": n, "repeats": args.repeats, "budget_s": args.budget_s, "seed": args.seed,
                "huge_pages": huge}
    print(f"treeffn bench sparse-mlp: {args.mlp} D={args.d_model} H={args.hidden} fp32; huge pages "
          f"{'on' if huge else 'off'}; {env_line(env)}")
    print("µs per call: median and min; ratio = dense µs / row µs in the same cache state (median, min/min); "
          "read = fraction of the dense weights read per token; kept = hidden units kept on the timed inputs")
    header = (f"{'active':>6} {'batch':>5} {'cache':>5} {'impl':>6} {'path':>6} {'µs median':>10} {'µs min':>9} "
              f"{'ratio':>7} {'ratio(min)':>10} {'1/read':>7} {'kept':>6}")
    print(header)
    print("-" * len(header))
    results = []
    dense_calls = [lambda x, d=d: d(x)[0] for d in denses]
    with torch.no_grad():
        for M in args.batches:
            inputs = [torch.randn(M, args.d_model, generator=gen) for _ in range(POOL)]
            base = {c: time_calls(dense_calls, inputs, c, evict, args) for c in args.cache}
            for c in args.cache:
                _print_row(results, None, M, c, "dense", "module", base[c], base[c], 1.0, 1.0)
            for active in args.active:
                for method in args.methods:
                    layers = [sparse_layer(d, args.mlp, method, active, calibration, huge) for d in denses]
                    kept = _kept(layers[0], inputs)
                    for path in args.paths:
                        calls = ([lambda x, s=s: s(x)[0] for s in layers] if path == "kernel"
                                 else [lambda x, s=s: s._project(s.sparse_hidden(x)[0]) for s in layers])
                        for c in args.cache:
                            t = time_calls(calls, inputs, c, evict, args)
                            _print_row(results, active, M, c, method, path, t, base[c],
                                       weights_read(args.mlp, method, active), kept)
                    del layers
            print()
    print_json("sparse-mlp", env, settings, results, notes=notes)
    return 0


def _kept(layer: nn.Module, inputs: list[torch.Tensor]) -> float:
    _, units, tokens = layer.kept_counts(torch.cat(inputs))
    return units / (tokens * layer.hidden)


def _print_row(results, active, M, cache, impl, path, t, base, read, kept) -> None:
    ratio, ratio_min = base.median / t.median, base.min / t.min
    print(f"{'-' if active is None else f'{active:.0%}':>6} {M:>5} {cache:>5} {impl:>6} {path:>6} "
          f"{t.median * 1e6:>10.1f} {t.min * 1e6:>9.1f} {ratio:>6.2f}x {ratio_min:>9.2f}x {1 / read:>6.1f}x "
          f"{kept:>6.3f}")
    case = {"active": active, "batch": M, "cache": cache, "path": path}
    results.append(row(case, impl, t, ratio_vs_dense=ratio, ratio_min_vs_dense=ratio_min, weights_read=read,
                       kept=kept))


if __name__ == "__main__":
    sys.exit(main())
