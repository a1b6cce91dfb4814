"""``treeffn prune``: remove the dead subtrees of a tree model and write a smaller static checkpoint.

DS-26: with φ before the sum, paths of a tree layer lose their traffic over training and die, so part of the
dynamic sparsity becomes static and "dead paths can be pruned". This command does it:

1. count node visits of every tree layer on fixed windows of the training split (``--split val`` counts on the
   validation text instead; ``--counts analysis.json`` reuses the counts ``treeffn analyze`` wrote);
2. mark nodes with fewer than ``--min-visits`` visits dead; a node's subtree dies with it (a child is never visited
   more often than its parent, so this only makes the rule exact for counts from elsewhere);
3. compact every layer into a :class:`~treeffn.layers.pruned_tree.PrunedTreeFFN` (``ffn.kind = tree_pruned``;
   ``ffn.hidden`` = node slots × node width, the slots being the largest layer's kept-node count, see that module
   for why every layer gets the same number) and write it atomically as a checkpoint folder that
   :func:`treeffn.load_model` reads, with the source's tokenizer.json and data.json and a ``prune.json`` report.

Tokens whose path reaches a removed node (``--dead-route``):

* ``sibling`` (default): the node forwards them to its surviving child, and the walk continues there;
* ``stop``: the walk of that tree ends at the last surviving node, later levels contribute nothing.

A node with no surviving child ends the walk under both rules. Tokens that never meet a removed node get the
original layer's output exactly (same nodes, same arithmetic).

Reported: parameters before/after, the fraction of the counted tokens whose path (in any tree of any layer, in the
unpruned model; a Mixture-of-Depths routed block counts in its per-layer figure only) touched a removed node, and
the validation loss before and after (``treeffn eval``'s :func:`~treeffn.evaluate.evaluate_checkpoint` on
``--eval-windows`` windows of the validation split, always). Counting on training text keeps the decision apart
from the data it is judged on; with ``--split val`` (or an analysis.json of validation windows) the counts come
from the very windows the loss is scored on, so with ``--min-visits 1`` no scored token meets a removed node and
the loss cannot change beyond float rounding: the report says so when that happens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .analyze import collect_visits, open_split, require_tree_layers
from .data import resolve_data
from .device import resolve_device
from .errors import ConfigError, TreeffnError
from .evaluate import evaluate_checkpoint
from .layers.pruned_tree import DEAD_ROUTES
from .layers.tree import TreeFFN
from .model import GPT
from .outputs import check_output_dir, write_json_atomic

DEFAULT_WINDOWS = 64


def parse_min_visits(value) -> int:
    try:
        n = int(str(value).strip())
    except (TypeError, ValueError):
        raise ConfigError(f"--min-visits must be a non-negative integer (got '{value}')") from None
    if n < 0:
        raise ConfigError(f"--min-visits must be a non-negative integer (got {n})")
    return n


def close_keep(keep: torch.Tensor) -> torch.Tensor:
    """keep (K, N) -> keep with every node whose parent is dropped dropped too (breadth-first numbering)."""
    keep = keep.clone().bool()
    for j in range(1, keep.shape[1]):
        keep[:, j] &= keep[:, (j - 1) // 2]
    return keep


def counts_from_file(file: str | Path, layers: list) -> list[torch.Tensor]:
    """Visit counts per tree layer from an analysis.json written by ``treeffn analyze``."""
    try:
        res = json.loads(Path(file).read_text())
        saved = {int(r["layer"]): torch.tensor(r["visits"], dtype=torch.long) for r in res["layers"]}
    except FileNotFoundError:
        raise ConfigError(f"--counts file {file} does not exist") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--counts file {file} is not an analysis.json written by treeffn analyze") from None
    out = []
    for i, f in layers:
        c = saved.get(i)
        if c is None or tuple(c.shape) != (f.trees, f.num_nodes):
            raise ConfigError(f"--counts file {file} does not match this model (layer {i}: expected visits of shape "
                              f"{(f.trees, f.num_nodes)})")
        out.append(c)
    return out


def _ffn_params(model) -> int:
    return sum(p.numel() for f in model.ffn_modules() for p in f.parameters())


def build_pruned(model, keeps: list[torch.Tensor], dead_route: str = "sibling"):
    """The pruned twin of ``model``: every tree layer compacted to its kept nodes, everything else copied."""
    ffns = model.ffn_modules()
    if not all(isinstance(f, TreeFFN) for f in ffns) or len(keeps) != len(ffns):
        raise TreeffnError("prune needs a model whose every feed-forward block is a tree layer (ffn.kind=tree)")
    keeps = [close_keep(k.cpu()) for k in keeps]
    W = model.cfg.tree.node_width
    slots = max(1, max(int(k.sum()) for k in keeps))
    cfg = model.cfg.copy()
    cfg.ffn.kind = "tree_pruned"
    cfg.ffn.hidden = slots * W
    cfg.validate()
    dev = next(model.parameters()).device
    with torch.device(dev):
        new = GPT(cfg)
    new = new.to(next(model.parameters()).dtype)
    state = {k: v for k, v in model.state_dict().items() if ".ffn." not in k}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or any(".ffn." not in k for k in missing):
        raise TreeffnError(f"cannot transfer weights to the pruned model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    for old_f, new_f, keep in zip(ffns, new.ffn_modules(), keeps):
        new_f.load_tree(old_f, keep, dead_route)
    return new.eval()


def _check_arguments(dead_route: str, windows: int, split: str) -> None:
    if dead_route not in DEAD_ROUTES:
        raise ConfigError(f"--dead-route must be one of {', '.join(DEAD_ROUTES)} (got '{dead_route}')")
    if windows < 0:
        raise ConfigError(f"--windows must be ≥ 0 (0 = the whole split; got {windows})")
    if split not in ("train", "val"):
        raise ConfigError(f"--split must be train or val (got '{split}')")


def _touched(layers: list, keeps: list[torch.Tensor], leaves: list[torch.Tensor], tokens: int):
    """Per layer: nodes kept and the fraction of counted tokens whose path met a removed node; and over all layers.

    The removed set is closed under descendants, so a walk touched it iff the leaf it ended in was removed.
    """
    touched_any = torch.zeros(tokens, dtype=torch.bool)
    per_layer = []
    for (i, f), keep, leaf in zip(layers, keeps, leaves):
        dead = ~keep
        hit = dead[torch.arange(f.trees).view(1, -1), leaf].any(1)  # (tokens,)
        if hit.numel() == touched_any.numel():  # a Mixture-of-Depths routed block sees only some tokens: skip it
            touched_any |= hit
        per_layer.append({"layer": i, "nodes": keep.numel(), "kept": int(keep.sum()),
                          "removed_fraction": float(dead.double().mean()),
                          "tokens_touched": float(hit.double().mean()) if hit.numel() else 0.0})
    return per_layer, float(touched_any.double().mean()) if touched_any.numel() else 0.0


def _side_files(folder: Path, data_dir: Path, model) -> dict[str, object]:
    """The source's tokenizer.json and data.json for the pruned checkpoint (a data.json made up when missing)."""
    extra: dict[str, object] = {}
    if (folder / "tokenizer.json").is_file():
        extra["tokenizer.json"] = folder / "tokenizer.json"
    if (folder / "data.json").is_file():
        extra["data.json"] = folder / "data.json"
    else:
        extra["data.json"] = {"data_dir": str(data_dir), "vocab_size": model.cfg.model.vocab_size}
    return extra


def _loss_change(folder: Path, out: Path, data_dir: Path, windows: int, batch_size: int, dev) -> dict:
    """Validation loss of the source and the pruned checkpoint on the same windows."""
    kw = {"windows": windows, "batch_size": batch_size, "device": str(dev), "progress": False}
    before = evaluate_checkpoint(folder, data_dir, **kw)
    after = evaluate_checkpoint(out, data_dir, **kw)
    return {"val_loss_before": before["val_loss"], "val_loss_after": after["val_loss"],
            "eval_tokens": before["val_tokens_scored"]}


def prune(path: str | Path, out: str | Path, min_visits, data: str | Path | None = None,
          windows: int = DEFAULT_WINDOWS, counts: str | Path | None = None, dead_route: str = "sibling",
          split: str = "train", eval_windows: int | None = None, evaluate: bool = True, device: str = "auto",
          batch_size: int = 8, overwrite: bool = False, progress: bool = False, force: bool = False) -> dict:
    """Prune the checkpoint at ``path`` into the checkpoint folder ``out``; returns the report (also prune.json).

    Visits are counted on ``split`` (training text by default); the loss before/after is always scored on the
    validation split. An existing ``out`` is replaced only if it is a checkpoint folder and ``overwrite`` (or its
    older name ``force``) is set."""
    min_visits = parse_min_visits(min_visits)
    _check_arguments(dead_route, windows, split)
    dev = resolve_device(device)
    folder = ckpt.resolve(path)
    data_path = data if data not in (None, "sample", "default") else None
    out = check_output_dir(out, "checkpoint", overwrite=overwrite or force, inputs=[path, folder, counts, data_path])
    model = ckpt.load_model(folder, device=dev)
    layers = require_tree_layers(model, str(path))
    if not all(isinstance(f, TreeFFN) for _, f in layers) or len(layers) != len(model.ffn_modules()):
        raise TreeffnError(f"{path} is already pruned (ffn.kind '{model.cfg.ffn.kind}'); prune the original model")
    data_dir = resolve_data(data, recorded_in=folder)
    batches = open_split(model, data_dir, split)
    starts = batches.eval_starts(windows)
    col = collect_visits(model, batches, starts, batch_size, dev, keep_leaves=True, progress=progress)
    visits = counts_from_file(counts, layers) if counts is not None else col["counts"]
    keeps = [close_keep(c >= min_visits) for c in visits]
    per_layer, touched = _touched(layers, keeps, col["leaves"], col["tokens"])

    pruned = build_pruned(model, keeps, dead_route)
    report = {
        "source": str(folder),
        "out": str(out),
        "min_visits": min_visits,
        "dead_route": dead_route,
        "counts_from": str(counts) if counts is not None else f"{split} split, {len(starts)} windows",
        "counts_split": None if counts is not None else split,
        "eval_split": "val",
        "data_dir": str(data_dir),
        "tokens_counted": col["tokens"],
        "slots": pruned.ffn_modules()[0].slots,
        "layers": per_layer,
        "nodes_before": sum(r["nodes"] for r in per_layer),
        "nodes_after": sum(r["kept"] for r in per_layer),
        "params_before": model.num_params(),
        "params_after": pruned.num_params(),
        "ffn_params_before": _ffn_params(model),
        "ffn_params_after": _ffn_params(pruned),
        "tokens_touched_removed": touched,
    }
    extra = _side_files(folder, data_dir, model)
    extra["prune.json"] = report
    ckpt.save_checkpoint_dir(out, pruned, extra)  # temp folder + rename: a killed prune leaves no half checkpoint
    if evaluate:
        ew = windows if eval_windows is None else eval_windows
        report.update(_loss_change(folder, out, data_dir, ew, batch_size, dev))
        write_json_atomic(out / "prune.json", report)
    return report


def format_report(r: dict) -> str:
    lines = [f"pruned {r['source']} -> {r['out']}",
             f"nodes with < {r['min_visits']} visits removed (visits counted on: {r['counts_from']}, "
             f"{r['tokens_counted']:,} tokens); dead route: {r['dead_route']}",
             f"{'layer':>5} {'kept/nodes':>13} {'removed':>8} {'tokens touching removed':>24}"]
    for x in r["layers"]:
        lines.append(f"{x['layer']:>5} {x['kept']:>6}/{x['nodes']:<6} {x['removed_fraction']:>8.1%} "
                     f"{x['tokens_touched']:>24.2%}")
    pb, pa = r["params_before"], r["params_after"]
    fb, fa = r["ffn_params_before"], r["ffn_params_after"]
    lines.append(f"parameters: {pb:,} -> {pa:,} ({(pa - pb) / pb:+.1%}); tree layers {fb:,} -> {fa:,} "
                 f"({(fa - fb) / max(1, fb):+.1%}; {r['nodes_after']:,} of {r['nodes_before']:,} nodes kept, "
                 f"{r['slots']} slots per layer)")
    lines.append(f"tokens whose path touched a removed node: {r['tokens_touched_removed']:.2%}")
    if "val_loss_before" in r:
        d = r["val_loss_after"] - r["val_loss_before"]
        lines.append(f"val loss (scored on the validation split, {r['eval_tokens']:,} tokens): "
                     f"{r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f} ({d:+.4f})")
        if r.get("counts_split") == "val":
            lines.append("note: visits were counted on the validation split the loss is scored on (in-sample); "
                         "count on --split train for an out-of-sample loss change")
    return "\n".join(lines)


# ---- CLI -------------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("dir", help="run directory or checkpoint folder of a tree model")
    p.add_argument("--min-visits", required=True, metavar="N",
                   help="remove nodes visited fewer than N times on the counted tokens (0 keeps everything)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (must not exist, unless --overwrite)")
    p.add_argument("--data", default=None,
                   help="prepared data directory, or 'default' / 'sample' "
                        "(default: the data recorded in the checkpoint)")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                   help=f"windows of seq_len tokens to count visits on (default {DEFAULT_WINDOWS}; 0 = whole split)")
    p.add_argument("--split", choices=["train", "val"], default="train",
                   help="split to count visits on (default train; the loss change is always scored on val)")
    p.add_argument("--counts", default=None, metavar="ANALYSIS_JSON",
                   help="reuse the visit counts of an analysis.json from `treeffn analyze` instead of counting")
    p.add_argument("--dead-route", default="sibling",
                   help="tokens routed to a removed child: 'sibling' (go to the surviving child, default) or 'stop' "
                        "(end the walk of that tree)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="windows of the validation split for the loss before/after (default: --windows)")
    p.add_argument("--no-eval", action="store_true", help="skip the validation loss before/after")
    p.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                   help="replace --out if it is a treeffn checkpoint folder (never any other folder)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    report = prune(args.dir, args.out, args.min_visits, data=args.data, windows=args.windows, counts=args.counts,
                   dead_route=args.dead_route, split=args.split, eval_windows=args.eval_windows,
                   evaluate=not args.no_eval, device=args.device, batch_size=args.batch_size, overwrite=args.overwrite,
                   progress=not args.quiet)
    print(json.dumps(report) if args.json else format_report(report))
    return 0
