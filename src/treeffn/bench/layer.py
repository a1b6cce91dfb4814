"""`treeffn bench layer`: per-layer inference time of the tree layer against its dense and sparse baselines, with
the weights in cache and out of it, through the module a model calls and through the raw kernel.

Shapes: M tokens (the batch), D model width (768), K trees, L = depth + 1 levels, N = 2^L − 1 nodes per tree,
W = 1 unit per node.

Everything runs in one process, on the same random inputs, under ``torch.no_grad()`` (as ``GPT.generate`` runs):

===============  ===================================================================================================
name             what it is
===============  ===================================================================================================
tree-cpp         the fused C++ kernel on the shipped ``TreeFFN``'s weights, all trees and levels in one call
tree-torch       batched PyTorch path walk (``tree_infer(backend="torch")``) on the same weights: gather + bmm per level
dense-train      the shipped ``DenseMLP`` of equal *training* width: K·2^L = K·(N+1) units, Linear → GELU → Linear
                 (2 GEMMs)
dense-infer      the shipped ``DenseMLP`` of equal *inference* width: K·L units (what a tree token actually reads)
moe-top1         the shipped ``MoE``: 16 experts, top-1 softmax router, each expert a GELU MLP of K·L units: the same
                 active units per token as the tree plus a 16-way router; sort, then a loop over the experts that
                 receive tokens (the usual MoE without fused kernels); no load-balancing loss
read-floor       not a layer: the time to read the input and output weight rows of the nodes the tree visits on
                 the call's input, each once, every address known up front (the C++ extension's ``read_rows``:
                 no arithmetic, no dependence, the kernel's thread policy); a floor on what any kernel of this
                 layer can reach in that cache state on this machine, so ``ratio`` there is the ceiling of the
                 tree's. Timed as ``kernel`` path, for ``--route self`` only
fff              PyPI ``fastfeedforward`` 0.2.1 ``FFF(D, 1, D, depth)`` in eval mode (its hard-path walk plus a
                 per-token Python loop over leaves), only for K = 1; skipped with a note when not installed
===============  ===================================================================================================

Paths (``--paths``, the ``path`` of each row): ``module`` calls the layer as a model does, ``layer(x)`` in eval mode
(for the tree: ``TreeFFN.forward``, whose inference fast path reaches the fused kernel); ``kernel`` calls the tree's
inference kernel on its weights (``tree_infer(..., backend="cpp"|"torch")``), without the module's Python. The
baselines are always called as modules. The module reaches the PyTorch walk only where the C++ kernel cannot be
built: its rows are then tree-torch's.

Cache states (``--cache``, the ``cache`` of each row):

* ``warm`` — one layer, called on a pool of 8 inputs in turn. The tree reads K·L rows per token, a few hundred KB for
  the whole pool, which stay in cache from one call to the next, while the dense layer of equal training width
  streams its 25 MB every call. The kernel at its best; not what a model sees.
* ``cold`` — what a layer sees inside a model, whose other layers evict its weights between two of its calls:
  C independent copies of the layer (``--cold-copies``; by default enough to fill twice the last-level cache, 2 to
  64), the i-th call on copy i mod C with the next input of the pool; before each call, untimed, a read of twice
  the last-level cache evicts everything (``--llc-mb``, else the size sysfs or ``lscpu`` give), then the same call
  on the next copy brings back what a model's other layers keep in cache — the interpreter, torch's dispatcher,
  the kernel's code, the input — but not this copy's weights. Rotating through copies alone does not evict the
  tree: a call reads a few of a copy's rows, so the rows near each root stay cached whatever the number of copies.

Weights (``--huge-pages``): on transparent huge pages by default, every layer's and baseline's alike, as
``treeffn.load_model`` places a model's (:mod:`treeffn.memory`); a cold tree call then pays one memory round trip per
row instead of a TLB miss as well. ``--huge-pages off`` keeps 4 KiB pages.

Each measurement (``common.measure``): up to 3 warm-up calls (one if it takes over 0.1 s), then up to ``--repeats``
timed calls (stopping early after ``--budget-s`` seconds, the untimed work of cold calls included, but never below
3), reporting the median and the minimum in µs per call. ``ratio`` is dense-train time / that time in the same cache
state (medians; ``ratio(min)`` from the minima, the better estimate when other processes share the cores);
``ideal`` is K·N / (K·L) = N / L, the ratio of units read per token. The 1-min load average is recorded at start
and end.

The dense layer of equal training width gets K·(N+1) units, K more than the tree's K·N: a power-of-two width
(4,096 for every default configuration) instead of an odd one such as 4,095, which the CPU GEMM runs up to 1.5x
slower. The baseline does 0.02–0.8 % more arithmetic and is never handicapped by its shape.

Every layer is built by ``treeffn.layers.build_ffn`` from a config (``bench/common.py``), as a model would build it.
The table is followed by one JSON line in the schema of ``bench/common.py``: a row per (configuration, batch, cache
state, implementation, path), ``case`` {config, K, depth, batch, cache, path}, ``metrics`` {ratio_vs_dense_train,
ratio_min_vs_dense_train, ideal, copies}.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from typing import Callable

import torch
from torch import nn

from ..kernels.small_linear import SMALL_ROWS, use_small_gemm
from ..kernels.tree_infer import extension, tree_infer
from ..memory import huge_pages_available, use_huge_pages
from ..ops.tree import ROUTES
from .common import (
    dense_mlp,
    drop_unbuilt_cpp,
    env_line,
    environment,
    measure,
    moe,
    parse_choices,
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
BASELINES = ("dense-train", "dense-infer", "moe-top1")
FLOOR = "read-floor"
IMPLS = ("tree-cpp", "tree-torch", *BASELINES, FLOOR, "fff")
KERNEL_BACKENDS = {"tree-cpp": "cpp", "tree-torch": "torch"}  # tree_infer's backend of each tree implementation
CACHES = ("warm", "cold")
PATHS = ("module", "kernel")
EVICT_LLC = 2  # a cold call's eviction read, and the copies' total size, in last-level caches
MAX_COPIES = 64
DEFAULT_LLC_MB = 64  # when the machine does not say


def _mib(text: str) -> float:
    v = float(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a size in MiB ≥ 0 (got {text})")
    return v


def _copies(text: str) -> int:
    v = int(text)
    if v == 1 or v < 0:
        raise argparse.ArgumentTypeError(f"cold runs need 0 (automatic) or at least 2 copies (got {text})")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treeffn bench layer",
        description="Per-layer inference time of the tree layer (fused C++ kernel and PyTorch path walk) against a "
                    "dense GELU MLP of equal training width (K·2^L units, the tree's K·N rounded up to a power of "
                    "two), one of equal inference width (K·L units), a 16-expert top-1 MoE of K·L-unit experts "
                    "(the shipped layers) and, for K=1, the PyPI fastfeedforward FFF; with the weights in cache "
                    "(warm) and evicted before every call (cold, as inside a model), the tree called as a module "
                    "and as the raw kernel, and the time merely reading the weight rows the tree visits takes (the "
                    "memory floor of any kernel on the same threads, read-floor). Prints a table of µs per call and "
                    "speed-up over the dense layer of equal training width, then one JSON line.",
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
    p.add_argument("--impls", type=parse_choices(IMPLS), default=",".join(IMPLS),
                   help="comma-separated subset of implementations to time (read-floor: the time to read the "
                        "weight rows the tree visits, no arithmetic: the memory floor of any kernel on the same "
                        "threads)")
    p.add_argument("--cache", type=parse_choices(CACHES), default="warm,cold",
                   help="cache states to time: warm (one layer, the rows it reads stay cached), cold (the weights "
                        "evicted before every call, as inside a model)")
    p.add_argument("--paths", type=parse_choices(PATHS), default="module,kernel",
                   help="how the tree layer is called: module (TreeFFN in eval mode, as a model calls it), kernel "
                        "(its inference kernel on its weights); baselines are always called as modules")
    p.add_argument("--llc-mb", type=_mib, default=0.0,
                   help="last-level cache size in MiB that cold runs evict (0: what sysfs or lscpu say, else "
                        f"{DEFAULT_LLC_MB})")
    p.add_argument("--cold-copies", type=_copies, default=0,
                   help=f"layer copies rotated through in cold runs (0: enough to fill {EVICT_LLC}x the last-level "
                        f"cache, 2 to {MAX_COPIES})")
    p.add_argument("--skip-fff", action="store_true", help="do not time the fastfeedforward package")
    p.add_argument("--route", choices=ROUTES, default="self",
                   help="the tree's routing rule (tree.route): self (UFB-23), or children (both children's responses "
                        "compared, their input rows read)")
    p.add_argument("--huge-pages", choices=("on", "off"), default="on",
                   help="every layer's weights (the baselines' too) on transparent huge pages, as treeffn.load_model "
                        "places a model's (Linux with THP enabled; elsewhere off)")
    p.add_argument("--gemm", choices=("torch", "small"), default="torch",
                   help="the GEMM of the baselines' linear layers for up to %d token vectors: torch = F.linear "
                        "(default), small = treeffn's prefetching small-batch kernel (treeffn.kernels.small_linear), "
                        "the stronger dense baseline" % SMALL_ROWS)
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and inputs")
    return p


def build_layer(name: str, d_model: int, trees: int, depth: int, dtype=torch.float32,
                route: str = "self", huge_pages: bool = False) -> nn.Module:
    """One shipped layer of the configuration, in eval mode: ``"tree"`` (whose weights the tree kernels run on, with
    routing rule ``route``) or a baseline of :data:`BASELINES`; ``huge_pages``: its weights moved onto huge pages
    as ``treeffn.load_model`` does (:mod:`treeffn.memory`)."""
    L, N = depth + 1, 2 ** (depth + 1) - 1
    if name == "tree":
        layer = tree_ffn(d_model, trees, depth, route=route)
    elif name == "dense-train":
        layer = dense_mlp(d_model, trees * (N + 1))  # a power-of-two width: see the module docstring
    elif name == "dense-infer":
        layer = dense_mlp(d_model, trees * L)
    else:
        layer = moe(d_model, MOE_EXPERTS, MOE_TOP_K, trees * L)
    layer = layer.to(dtype).eval()
    if huge_pages:
        use_huge_pages(layer)
    return layer


def build_layers(d_model: int, trees: int, depth: int, impls: list[str], dtype=torch.float32) -> dict[str, nn.Module]:
    """``"tree"`` and each baseline of ``impls`` (:func:`build_layer`)."""
    return {name: build_layer(name, d_model, trees, depth, dtype)
            for name in ("tree", *(b for b in BASELINES if b in impls))}


def layer_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(layer.parameters(), layer.buffers()))


def cold_copies(nbytes: int, llc: int, override: int = 0) -> int:
    """Copies of a layer of ``nbytes`` for a cold run: ``override``, else enough to fill EVICT_LLC × ``llc`` bytes,
    within [2, MAX_COPIES]."""
    return override or min(MAX_COPIES, max(2, math.ceil(EVICT_LLC * llc / max(1, nbytes))))


def _call(item):
    """A timed call: item = (function, the next copy's function or None, input)."""
    return item[0](item[2])


class Evict:
    """``before`` hook of a cold measurement: read a buffer of ``nbytes`` (evicting every cache level), then make
    the item's call on the next copy (so that code, interpreter state and the input are back in cache, but not the
    weights of the copy about to be timed)."""

    def __init__(self, nbytes: int):
        self.buf = torch.ones(max(1, nbytes // 4))

    def __call__(self, item) -> None:
        self.buf.sum()
        item[1](item[2])


def time_calls(calls: list[Callable], inputs: list[torch.Tensor], cache: str, evict: Evict | None, args):
    """Timing of ``calls`` (one per copy of a layer; warm uses the first) in one cache state."""
    if cache == "warm":
        items, before = [(calls[0], None, x) for x in inputs], None
    else:
        n = len(calls)
        items = [(calls[i % n], calls[(i + 1) % n], inputs[i % len(inputs)]) for i in range(n * len(inputs))]
        before = evict
    return measure(_call, items, warmup=WARMUP, warmup_cutoff_s=WARMUP_CUTOFF_S, repeats=args.repeats,
                   min_repeats=MIN_REPEATS, budget_s=args.budget_s, before=before)


def _fff_version() -> str | None:
    try:
        import fastfeedforward  # noqa: F401
        from importlib.metadata import version

        return version("fastfeedforward")
    except Exception:  # noqa: BLE001 - optional package
        return None


def _kernel_call(tree: nn.Module, impl: str) -> Callable:
    """The tree's inference kernel of ``impl`` on its weights, taken out of the module once."""
    w_in, b_in, w_out = tree.w_in.detach(), tree.b_in.detach(), tree.w_out.detach()
    depth, backend, route = tree.depth, KERNEL_BACKENDS[impl], tree.route
    return lambda x: tree_infer(x, w_in, b_in, w_out, depth, "gelu", "node", backend=backend, route=route)


def targets(d_model: int, trees: int, depth: int, impls: list[str], paths: list[str], dtype, fff, n_copies,
            module_impl: str, route: str = "self", huge_pages: bool = False) -> list[tuple[str, str, list[Callable]]]:
    """(impl, path, one call per copy) for everything timed on one configuration; ``n_copies(first layer)`` says
    how many copies of each layer to build; ``huge_pages`` puts every layer's weights (baselines' too) on huge
    pages."""

    def copies(make):
        first = make()
        return [first] + [make() for _ in range(n_copies(first) - 1)]

    out = []
    tree_rows = [(impl, path) for impl in KERNEL_BACKENDS if impl in impls for path in paths
                 if path == "kernel" or impl == module_impl]
    floor = FLOOR in impls and route == "self"
    if tree_rows or floor:
        tree_copies = copies(lambda: build_layer("tree", d_model, trees, depth, dtype, route, huge_pages))
        for impl, path in tree_rows:
            calls = tree_copies if path == "module" else [_kernel_call(t, impl) for t in tree_copies]
            out.append((impl, path, calls))
        if floor:
            out.append((FLOOR, "kernel", tree_copies))  # the layers; floor_calls makes the calls per batch
    for name in BASELINES:
        if name in impls:
            out.append((name, "module", copies(lambda name=name: build_layer(name, d_model, trees, depth, dtype,
                                                                             huge_pages=huge_pages))))
    if fff is not None and "fff" in impls and trees == 1 and depth >= 1:
        # fp32 only: it allocates its output as float
        def make_fff():
            f = fff(d_model, 1, d_model, depth).eval()
            if huge_pages:
                use_huge_pages(f)
            return f

        out.append(("fff", "module", [lambda x, f=f: f(x.float()) for f in copies(make_fff)]))
    return out


def visited_nodes(tree: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The distinct nodes the tree visits on the tokens x (M, D), as sorted flat indices k·N + j."""
    b_in = tree.b_in.detach() if tree.b_in is not None else None
    _, paths = extension().infer_paths(x, tree.w_in.detach(), b_in, tree.w_out.detach(), tree.depth, 0, 0)
    K, N = tree.w_in.shape[:2]
    return (paths + torch.arange(K).view(1, K, 1) * N).flatten().unique()


def floor_calls(trees: list[nn.Module], inputs: list[torch.Tensor]) -> list[Callable]:
    """One read-floor call per tree copy: on input x, read the rows of the nodes that copy visits on x (found once,
    here, by the kernel itself)."""
    ext = extension()
    calls = []
    for tree in trees:
        u, v = tree.w_in.detach(), tree.w_out.detach()
        nodes = {id(x): visited_nodes(tree, x) for x in inputs}
        calls.append(lambda x, u=u, v=v, nodes=nodes: ext.read_rows(u, v, nodes[id(x)]))
    return calls


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    before = use_small_gemm(args.gemm == "small")
    try:
        return _run(args)
    finally:
        use_small_gemm(before)


def _run(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    impls = list(args.impls)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    D = args.d_model
    notes = []

    drop_unbuilt_cpp(impls, extension, notes)
    if FLOOR in impls and extension() is None:
        impls.remove(FLOOR)
        notes.append(f"{FLOOR} skipped: it needs the C++ extension")
    if FLOOR in impls and args.route != "self":
        notes.append(f"{FLOOR} skipped: only for --route self (route children reads both children's input rows)")
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
    llc = int(args.llc_mb * 2**20) or env["llc_bytes"]
    if not llc:
        llc = DEFAULT_LLC_MB << 20
        notes.append(f"last-level cache size unknown: cold runs assume {DEFAULT_LLC_MB} MiB (--llc-mb sets it)")
    cold = "cold" in args.cache
    evict = Evict(EVICT_LLC * llc) if cold else None
    module_impl = "tree-cpp" if extension() is not None else "tree-torch"  # what TreeFFN's inference runs

    huge = args.huge_pages == "on" and huge_pages_available()
    if args.huge_pages == "on" and not huge:
        notes.append("huge pages unavailable here (transparent huge pages disabled or not Linux): weights on 4 KiB "
                     "pages")

    def n_copies(layer):
        return cold_copies(layer_bytes(layer), llc, args.cold_copies) if cold else 1

    settings = {"configs": [f"{k}x{d}" for k, d in args.configs], "batches": args.batches, "d_model": D,
                "dtype": args.dtype, "impls": impls, "cache": args.cache, "paths": args.paths, "grad_mode": "no_grad",
                "node_width": 1, "activation": "gelu", "placement": "node", "route": args.route,
                "baseline": "dense-train", "dense_train_units": "K*2^L", "dense_infer_units": "K*L",
                "moe": {"experts": MOE_EXPERTS, "top_k": MOE_TOP_K, "expert_units": "K*L", "aux_weight": 0.0},
                "fastfeedforward": _fff_version(), "input_pool": POOL, "llc_bytes": llc,
                "eviction_bytes": EVICT_LLC * llc if cold else 0, "cold_copies": args.cold_copies,
                "max_cold_copies": MAX_COPIES, "warmup": WARMUP, "warmup_cutoff_s": WARMUP_CUTOFF_S,
                "repeats": args.repeats, "min_repeats": MIN_REPEATS, "budget_s": args.budget_s, "seed": args.seed,
                "huge_pages": huge, "gemm": args.gemm}
    print(f"treeffn bench layer: D={D} dtype={args.dtype} tree.route={args.route} huge pages "
          f"{'on' if huge else 'off'}; baselines' GEMM {args.gemm}; {env_line(env)}; "
          f"fastfeedforward={settings['fastfeedforward']}")
    if cold:
        print(f"cold: before every call, read {EVICT_LLC * llc / 2**20:.0f} MiB ({EVICT_LLC}x the last-level cache), "
              "then make the same call on another copy of the layer (code, interpreter and input back in cache)")
    print("µs per call: median and min over the timed calls; ratio = dense-train µs / impl µs in the same cache "
          "state (median, and min/min); ideal = K·N/(K·L) units read per token; copies = layers rotated through"
          + (f"; {FLOOR} = reading the weight rows the tree visits, no arithmetic: a floor for any kernel on the "
             "same threads" if FLOOR in impls else ""))
    results = []
    gen = torch.Generator().manual_seed(args.seed)
    header = (f"{'config':>7} {'batch':>6} {'cache':>5} {'impl':>12} {'path':>6} {'µs median':>12} {'µs min':>12} "
              f"{'ratio':>9} {'ratio(min)':>10} {'ideal':>7} {'copies':>6}")
    print(header)
    print("-" * len(header))
    for K, depth in args.configs:
        torch.manual_seed(args.seed)
        L = depth + 1
        N = 2 ** L - 1
        ideal = N / L
        timed = targets(D, K, depth, impls, args.paths, dtype, FFF, n_copies, module_impl, args.route, huge)
        for M in args.batches:
            inputs = [torch.randn(M, D, generator=gen).to(dtype) for _ in range(POOL)]
            for cache in args.cache:
                timings = {}
                with torch.no_grad():
                    for impl, path, calls in timed:
                        if impl == FLOOR:
                            calls = floor_calls(calls, inputs)
                        timings[impl, path] = (time_calls(calls, inputs, cache, evict, args), len(calls))
                base = timings.get(("dense-train", "module"), (None,))[0]
                for (impl, path), (t, n) in timings.items():
                    us, us_min = t.median * 1e6, t.min * 1e6
                    ratio = base.median / t.median if base else None
                    ratio_min = base.min / t.min if base else None
                    copies = n if cache == "cold" else 1
                    print(f"{K}x{depth:<5} {M:>6} {cache:>5} {impl:>12} {path:>6} {us:>12.1f} {us_min:>12.1f} "
                          f"{f'{ratio:.1f}x' if ratio else '-':>9} {f'{ratio_min:.1f}x' if ratio_min else '-':>10} "
                          f"{ideal:>6.0f}x {copies:>6}")
                    case = {"config": f"{K}x{depth}", "K": K, "depth": depth, "batch": M, "cache": cache, "path": path}
                    results.append(row(case, impl, t, ratio_vs_dense_train=ratio, ratio_min_vs_dense_train=ratio_min,
                                       ideal=ideal, copies=copies))
                print()
    print_json("layer", env, settings, results, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
