"""Evaluation of a trained checkpoint: loss, perplexity, bits per byte, size and analytic cost per token."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .data import Batches, check_vocab, load_meta, load_tokens, resolve_data
from .device import resolve_device
from .errors import DataError
from .mod import RoutedBlock
from .model import GPT


@torch.no_grad()
def evaluate_loss(model: GPT, batches: Batches, n_windows: int, batch_size: int, device: torch.device,
                  autocast=nullcontext, progress: bool = False) -> tuple[float, int]:
    """Mean next-token loss (nats) over fixed validation windows; returns (loss, tokens)."""
    was = model.training
    model.eval()
    starts = batches.eval_starts(n_windows)
    total, count = 0.0, 0
    it = range(0, len(starts), batch_size)
    if progress:
        it = tqdm(it, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
    for i in it:
        x, y = batches.window(starts[i: i + batch_size])
        with autocast():
            out = model(x.to(device), targets=y.to(device))
        total += out.lm_loss.item() * y.numel()
        count += y.numel()
    model.train(was)
    return total / max(1, count), count


def evaluate_checkpoint(path: str | Path, data: str | Path | None = None, windows: int = 0, batch_size: int = 8,
                        device: str = "auto", progress: bool = True, context: int = 0) -> dict:
    """Validation metrics for a checkpoint on its data's validation split (``windows`` ≤ 0: all of it), in windows
    of the model's context, or of ``context`` tokens (at most the model's) to compare models of different contexts.

    ``data`` is a ``--data`` argument (:func:`treeffn.data.resolve_data`); by default the data the checkpoint
    records."""
    dev = resolve_device(device)
    folder = ckpt.resolve(path)
    model = ckpt.load_model(folder, device=dev)
    ddir = resolve_data(data, recorded_in=folder)
    meta = load_meta(ddir)
    check_vocab(meta, model.cfg.model.vocab_size, ddir)
    T = model.cfg.model.seq_len
    if context > 0:
        if context > T:
            raise DataError(f"--context {context} exceeds the model's context of {T}")
        T = context
    val = Batches(load_tokens(ddir, "val"), T, model.cfg.model.vocab_size)
    with RoutedFraction(model) as routed:
        loss, ntok = evaluate_loss(model, val, windows, batch_size, dev, progress=progress)
    units = model.ffn_units()
    # a Mixture-of-Depths block processes what the causal rule routed on these windows, not mod.capacity
    flops = model.flops_per_token(routed=routed.per_layer() or None)
    bytes_per_token = meta["bytes"]["val"] / max(1, meta["tokens"]["val"])
    mod = {}
    if routed.per_layer():
        mod = {"mod_routed_fraction": routed.mean(), "mod_capacity": model.cfg.mod.capacity}
    return {
        "checkpoint": str(folder),
        "config": model.cfg.describe(),
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": loss / math.log(2) / bytes_per_token,
        "val_tokens_scored": ntok,
        "val_context": T,
        "params": model.num_params(),
        "params_non_embedding": model.num_params(exclude_embeddings=True),
        "ffn_units_total": units["total"],
        "ffn_units_active": units["active"],
        "ffn_active_fraction": units["fraction"],
        "flops_per_token": flops["total"],
        "ffn_flops_per_token": flops["ffn"],
        **mod,
    }


class RoutedFraction:
    """Context manager counting, per Mixture-of-Depths block, the fraction of tokens the causal rule routed through
    it (``mod_routed``, weighted by the tokens of each call) while the model runs in evaluation mode."""

    def __init__(self, model):
        self.blocks = {i: b for i, b in enumerate(model.blocks) if isinstance(b, RoutedBlock)}
        self.sums = {i: [0.0, 0] for i in self.blocks}
        self.handles = []

    def __enter__(self) -> "RoutedFraction":
        for i, b in self.blocks.items():
            def hook(module, args, output, i=i):
                n = args[0].shape[0] * args[0].shape[1]
                self.sums[i][0] += float(output[1]["mod_routed"]) * n
                self.sums[i][1] += n

            self.handles.append(b.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def per_layer(self) -> dict[int, float]:
        return {i: s / n for i, (s, n) in self.sums.items() if n}

    def mean(self) -> float:
        fr = self.per_layer()
        return sum(fr.values()) / len(fr) if fr else float("nan")


@torch.no_grad()
def decode_speed(model, prompt_len: int = 64, new_tokens: int = 64, batch: int = 1, repeats: int = 2,
                 seed: int = 0) -> float:
    """Greedy decoding tokens/s with the KV cache (prefill excluded from the count, included in the time)."""
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.model.vocab_size
    prompt = torch.randint(0, V, (batch, prompt_len), generator=g).to(next(model.parameters()).device)
    model.generate(prompt[:, :8], 4)  # warm-up (kernels, allocator)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model.generate(prompt, new_tokens)
        best = min(best, time.perf_counter() - t)
    return batch * new_tokens / best


@torch.no_grad()
def windows_loss(model, windows: torch.Tensor, chunk: int = 8) -> float:
    """Mean next-token loss of ``model`` over token windows (W, T+1), ``chunk`` windows per forward pass."""
    tot, n = 0.0, 0
    for s in range(0, windows.shape[0], chunk):
        w = windows[s:s + chunk]
        out = model(w[:, :-1], targets=w[:, 1:])
        tot += float(out.lm_loss) * w[:, 1:].numel()
        n += w[:, 1:].numel()
    return tot / max(n, 1)
