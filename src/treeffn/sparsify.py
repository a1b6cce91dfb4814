"""``treeffn sparsify``: training-free activation sparsity of a checkpoint's MLPs (TEAL, CATS or WINA).

Every MLP of a model with ``ffn.kind=swiglu`` or ``dense`` becomes ``ffn.kind=sparse``
(:mod:`treeffn.layers.sparse_mlp`, where the three rules and their papers are described) with the same weights and
per-layer thresholds chosen so that a fraction ``--active`` F of the hidden units (the inputs of W2) is kept per
token on average. Nothing is trained.

Calibration: corpus windows (the default corpus unless ``--data`` says otherwise; never benchmark data) are cut
by :func:`treeffn.convert.corpus_windows`, pairwise disjoint, and split into calibration windows (``--tokens``) and
held-out windows (``--heldout-tokens``). The calibration hidden states are carried block by block through the
model *as it is being sparsified*: block i's thresholds are the quantiles of the magnitudes its MLP receives when
blocks < i are already sparse, which is what it will see at inference. WINA keeps a fixed top-K per token and has
nothing to calibrate (its column norms are computed from the weights).

Report, on the held-out windows only (they calibrate nothing): per layer the fraction of hidden units and of input
coordinates kept, the relative error ‖ŷ − y‖/‖y‖ of the sparse MLP's output against the dense MLP's on the same
inputs, and the next-token loss of the dense and the sparsified model. The output is a normal treeffn checkpoint
(side files such as the tokenizer copied) with ``sparsify.json`` recording the summary and the corpus offsets of
the windows of each part; ``eval``, ``eval-tasks``, ``generate`` and ``export-hf`` take it as any other.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from .checkpoint import load_model, resolve, save_checkpoint_dir
from .convert import corpus_windows, run_block
from .errors import CheckpointError, ConfigError
from .evaluate import windows_loss
from .layers import DenseMLP, SwiGLU, build_ffn
from .layers.sparse_mlp import METHODS, sparse_config
from .model import GPT
from .outputs import check_output_dir

SIDE_FILES_SKIPPED = ("config.json", "model.safetensors", "trainer.json", "optimizer.safetensors")


def check_arguments(method: str, active: float, tokens: int, heldout_tokens: int, seq_len: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown --method '{method}'; choose one of {', '.join(METHODS)}")
    if isinstance(active, bool) or not (isinstance(active, (int, float)) and math.isfinite(active)
                                        and 0.0 < active <= 1.0):
        raise ConfigError(f"--active must be a fraction in (0, 1] (got {active})")
    if tokens < 2 or heldout_tokens < 2 or seq_len < 2:
        raise ConfigError("--tokens, --heldout-tokens and --seq-len must be ≥ 2")


def check_model(model: GPT) -> None:
    """Refuse anything but plain dense (GELU …) or SwiGLU MLPs (already sparse, top-k, MoE, tree …)."""
    if not all(type(f) in (DenseMLP, SwiGLU) for f in model.ffn_modules()):
        raise CheckpointError(f"sparsify needs a model with dense or swiglu MLPs (this one has "
                              f"ffn.kind={model.cfg.ffn.kind})")


def corpus_parts(folder: Path, data, vocab_size: int, tokens: int, heldout_tokens: int, seq_len: int,
                 seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Disjoint corpus windows {calibrate, heldout} and their corpus offsets."""
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    n_cal = max(1, math.ceil(tokens / seq_len))
    n_held = max(1, math.ceil(heldout_tokens / seq_len))
    windows, starts, span = corpus_windows(data, tokenizer, vocab_size, (n_cal + n_held) * seq_len, seq_len, seed,
                                           return_starts=True)
    parts = {"calibrate": windows[:n_cal], "heldout": windows[n_cal:]}
    offsets = {"span": span, "calibrate": [int(s) for s in starts[:n_cal]],
               "heldout": [int(s) for s in starts[n_cal:]]}
    return parts, offsets


@torch.no_grad()
def calibrate_layers(model: GPT, new_cfg, windows: torch.Tensor, seed: int, progress: bool, log) -> list[dict]:
    """Replace every block's MLP by its sparse twin, calibrated on the inputs it receives from the (already
    sparsified) blocks before it; returns the thresholds and the calibration-token active fraction per layer."""
    chunk = max(1, 4096 // windows.shape[1])
    h = model.tok_emb(windows)
    layers = []
    bar = tqdm(total=len(model.blocks), desc="sparsify", disable=not progress, file=sys.stderr, unit="layer")
    for i, block in enumerate(model.blocks):
        dense = model.ffn_modules()[i]
        _, x, _ = run_block(block, dense, h, chunk, capture=True)
        sparse = build_ffn(new_cfg)
        sparse.load_state_dict(dense.state_dict(), strict=False)  # the same weights; the thresholds are new
        sparse.eval()
        thresholds = sparse.calibrate(x, seed=seed + 2 * i)
        n_in, n_mid, n = sparse.kept_counts(x)
        model.replace_ffn(i, sparse)
        h = run_block(block, None, h, chunk, capture=False)
        res = {"layer": i, **{k: round(v, 6) for k, v in thresholds.items()},
               "calibration_active": round(n_mid / (n * sparse.hidden), 4)}
        layers.append(res)
        msg = (f"layer {i:2d}: {n_mid / (n * sparse.hidden):.1%} of units active on the calibration tokens"
               + "".join(f", {k} {v:.4g}" for k, v in thresholds.items()))
        bar.update(1)
        bar.write(msg, file=sys.stderr) if progress else log(msg)
    bar.close()
    return layers


@torch.no_grad()
def measure(model: GPT, windows: torch.Tensor) -> tuple[float, list[dict]]:
    """Held-out loss of the sparsified model and, per layer, the kept fractions and the MLP's relative error."""
    acc = [[0.0] * 5 for _ in model.ffn_modules()]  # input kept, units kept, tokens, error², dense²
    handles = []

    def hook(i):
        def fn(mod, args, out):
            x = args[0].reshape(-1, args[0].shape[-1])
            n_in, n_mid, n = mod.kept_counts(x)
            y = mod.dense_forward(x)
            err = (out[0].reshape(y.shape) - y).float().pow(2).sum()
            for j, v in enumerate((n_in, n_mid, n, float(err), float(y.float().pow(2).sum()))):
                acc[i][j] += v
        return fn

    for i, f in enumerate(model.ffn_modules()):
        handles.append(f.register_forward_hook(hook(i)))
    try:
        loss = windows_loss(model, windows)
    finally:
        for hd in handles:
            hd.remove()
    layers = []
    for f, (n_in, n_mid, n, err, ref) in zip(model.ffn_modules(), acc):
        layers.append({"heldout_active": round(n_mid / max(n * f.hidden, 1), 4),
                       "heldout_input_active": round(n_in / max(n * f.d_model, 1), 4),
                       "rel_error": round(math.sqrt(err / max(ref, 1e-30)), 4)})
    return loss, layers


def sparsify(src: str | Path, out: str | Path, method: str = "teal", active: float = 0.5, data: str | None = "default",
             tokens: int = 16384, heldout_tokens: int = 4096, seq_len: int = 256, seed: int = 0,
             progress: bool = True, log=print, overwrite: bool = False) -> dict:
    """Sparsify checkpoint ``src`` into ``out``; returns the summary (also written as ``out/sparsify.json``)."""
    check_arguments(method, active, tokens, heldout_tokens, seq_len)
    t0 = time.time()
    folder = resolve(src)
    data_path = Path(data) if data not in (None, "sample", "default") else None
    check_output_dir(out, "checkpoint", overwrite=overwrite, inputs=[src, folder, data_path])
    model = load_model(folder)
    check_model(model)
    cfg = model.cfg
    new_cfg = sparse_config(cfg, method, active)
    seq_len = min(seq_len, cfg.model.seq_len)
    parts, offsets = corpus_parts(folder, data, cfg.model.vocab_size, tokens, heldout_tokens, seq_len, seed)
    n_cal, n_held = parts["calibrate"].numel(), parts["heldout"].numel()
    dense_loss = windows_loss(model, parts["heldout"])
    dense_flops = model.flops_per_token()["ffn"]
    log(f"sparsifying {folder} ({cfg.describe()}) with {method} to {active:.1%} active units; {n_cal} calibration "
        f"and {n_held} held-out tokens (disjoint windows)")
    layers = calibrate_layers(model, new_cfg, parts["calibrate"], seed, progress, log)
    model.cfg = new_cfg
    model.eval()
    sparse_loss, held = measure(model, parts["heldout"])
    layers = [{**a, **b} for a, b in zip(layers, held)]
    summary = {
        "source": str(folder), "out": str(out), "method": method, "active": active, "mlp": cfg.ffn.kind,
        "calibration_tokens": n_cal, "heldout_tokens": n_held, "seq_len": seq_len,
        "heldout_active": round(sum(r["heldout_active"] for r in layers) / len(layers), 4),
        "mean_rel_error": round(sum(r["rel_error"] for r in layers) / len(layers), 4),
        "heldout_loss_dense": round(dense_loss, 4), "heldout_loss_sparse": round(sparse_loss, 4),
        "ffn_flops_dense": dense_flops, "ffn_flops_sparse": model.flops_per_token()["ffn"],
        "seconds": round(time.time() - t0, 1), "layers": layers, "windows": offsets,
    }
    extra = {p.name: p for p in folder.iterdir() if p.is_file() and p.name not in SIDE_FILES_SKIPPED}
    extra["sparsify.json"] = summary
    save_checkpoint_dir(Path(out), model, extra_files=extra)
    return summary


# ---- command line ---------------------------------------------------------------------------------------------
def _fraction(text: str):
    """--active as given: a number is checked by :func:`check_arguments`, anything else is kept as text for it."""
    try:
        return float(text)
    except ValueError:
        return text

def add_arguments(p) -> None:
    p.description = ("Training-free activation sparsity of a checkpoint's dense or SwiGLU MLPs: TEAL (magnitude "
                     "thresholds on the input of every MLP matrix), CATS (threshold on the gate activation) or WINA "
                     "(top-K of |input| × weight column norm). Thresholds are calibrated per layer on corpus text "
                     "so that --active of the hidden units are kept per token; the result is a normal checkpoint.")
    p.add_argument("dir", help="run directory or checkpoint folder with a dense or swiglu model")
    p.add_argument("--method", required=True, help=f"sparsity rule: {', '.join(METHODS)}")
    p.add_argument("--active", type=_fraction, required=True,
                   help="fraction of the MLP's hidden units kept per token on average, in (0, 1]; 1 is the dense "
                        "model exactly")
    p.add_argument("--out", required=True, help="checkpoint folder to write (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a treeffn checkpoint folder (never any other folder)")
    p.add_argument("--data", default="default",
                   help="calibration corpus: a prepared data directory, 'default' (the default corpus, default), "
                        "'sample', or a UTF-8 text file; re-encoded with the checkpoint's tokenizer when the "
                        "vocabularies differ")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--heldout-tokens", type=int, default=4096,
                   help="held-out tokens, from other windows, for the reported fractions and losses (default 4096)")
    p.add_argument("--seq-len", type=int, default=256, help="window length of the corpus samples (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    summary = sparsify(args.dir, args.out, method=args.method, active=args.active, data=args.data,
                       tokens=args.tokens, heldout_tokens=args.heldout_tokens, seq_len=args.seq_len, seed=args.seed,
                       progress=not args.quiet, log=lambda m: print(m, file=sys.stderr), overwrite=args.overwrite)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: {summary['method']} {summary['heldout_active']:.1%} of units active on held-out "
              f"tokens (asked {summary['active']:.1%}); held-out loss dense {summary['heldout_loss_dense']:.3f} -> "
              f"sparse {summary['heldout_loss_sparse']:.3f}; MLP FLOPs per token {summary['ffn_flops_sparse']:.3g} "
              f"of {summary['ffn_flops_dense']:.3g} in {summary['seconds']:.0f} s")
    return 0
