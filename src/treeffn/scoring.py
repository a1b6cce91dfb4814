"""Batched scoring and generation over a treeffn GPT, as the lm-eval model needs them (no lm-eval involved).

* :func:`score_sequences`: log-likelihoods of continuations in windows of at most the context, sorted by length and
  right-padded (a causal model cannot see padding after a row's tokens);
* :func:`generate_batch`: several prompts continued at once, left-padded, with per-row positions, a padding mask and
  the KV cache (``GPT.forward``'s ``pos=`` and ``valid=``).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .model import KVCache, last_positions, sample_next

DEFAULT_BATCH = 16  # windows (or prompts) per forward pass


def score_windows(seq: list[int], start: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Windows (input tokens, target tokens) scoring ``seq[start:]``, each input at most ``max_len`` tokens.

    Targets are cut into consecutive chunks of at most ``max_len``; each chunk's input is the ``max_len`` tokens
    before its last target, so every prediction sees as much context as fits (lm-eval's rolling windows, and a single
    left-truncated window when the continuation fits). The targets are the last ``len(targets)`` predictions.
    """
    if start < 1:
        raise ValueError("scoring needs at least one context token")
    out = []
    for a in range(start, len(seq), max_len):
        b = min(a + max_len, len(seq))
        out.append((seq[max(0, b - 1 - max_len): b - 1], seq[a:b]))
    return out


@torch.no_grad()
def score_sequences(model, seqs: list[tuple[list[int], int]], max_len: int, batch_size: int,
                    device: torch.device | str = "cpu", progress: bool = False) -> list[tuple[float, bool]]:
    """For each (tokens, start): sum of log p(tokens[j] | tokens[:j]) over j ≥ start, and whether all are greedy.

    Windows from every sequence are sorted longest first (the first batch shows the peak memory), right-padded
    within a batch and scored with one forward each; padding after a row's tokens cannot change its logits in a
    causal model.
    """
    windows = []  # (sequence index, input, targets)
    for i, (toks, start) in enumerate(seqs):
        windows += [(i, inp, tgt) for inp, tgt in score_windows(toks, start, max_len)]
    order = sorted(range(len(windows)), key=lambda w: -len(windows[w][1]))
    total = [0.0] * len(seqs)
    greedy = [True] * len(seqs)
    bar = tqdm(total=len(windows), desc="scoring", unit="window", disable=not progress)
    for lo in range(0, len(order), batch_size):
        batch = [windows[w] for w in order[lo: lo + batch_size]]
        T = max(len(inp) for _, inp, _ in batch)
        idx = torch.zeros(len(batch), T, dtype=torch.long)
        for r, (_, inp, _) in enumerate(batch):
            idx[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        # logits only where a target is predicted: the output layer is a large share of the work with a large
        # vocabulary and short continuations
        rows = torch.tensor([r for r, (_, inp, tgt) in enumerate(batch) for _ in tgt], dtype=torch.long)
        cols = torch.tensor([c for _, inp, tgt in batch for c in range(len(inp) - len(tgt), len(inp))],
                            dtype=torch.long)
        logits = model(idx.to(device), select=(rows.to(device), cols.to(device))).logits  # (S, V)
        at = 0
        for r, (i, inp, tgt) in enumerate(batch):
            k = len(tgt)
            logp = torch.log_softmax(logits[at: at + k].float(), dim=-1)
            at += k
            target = torch.tensor(tgt, dtype=torch.long, device=logp.device)
            total[i] += float(logp.gather(1, target[:, None]).sum())
            greedy[i] = greedy[i] and bool((logp.argmax(-1) == target).all())
        bar.update(len(batch))
    bar.close()
    return list(zip(total, greedy))


def _left_padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, positions and padding mask (B, T) of prompts padded on the left to the longest."""
    B, T = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for r, p in enumerate(prompts):
        idx[r, T - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[r, T - len(p):] = True
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # real tokens at 0..n-1, as in an unpadded run
    return idx.to(device), pos.to(device), valid.to(device)


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new: list[int], stop=None, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                   device: torch.device | str = "cpu") -> list[list[int]]:
    """Continue several prompts at once (left-padded, with the KV cache); row r stops after ``max_new[r]`` tokens,
    at ``eos_id`` (not returned) or when ``stop(r, tokens)`` says so. Prompts must already fit the context."""
    B = len(prompts)
    idx, pos, valid = _left_padded(prompts, device)
    lengths = valid.sum(1)
    cache = KVCache(len(model.blocks))
    logits = model(idx, cache=cache, pos=pos, valid=valid, select=last_positions(idx)).logits
    out: list[list[int]] = [[] for _ in range(B)]
    done = [m <= 0 for m in max_new]
    ones = torch.ones(B, 1, dtype=torch.bool, device=idx.device)
    for _ in range(max(max_new, default=0)):
        if all(done):
            break
        nxt = sample_next(logits, temperature, top_k, top_p)
        for r in range(B):
            if done[r]:
                continue
            tok = int(nxt[r])
            if eos_id is not None and tok == eos_id:
                done[r] = True
                continue
            out[r].append(tok)
            if len(out[r]) >= max_new[r] or (stop is not None and stop(r, out[r])):
                done[r] = True
        if all(done):
            break
        # rows already finished keep decoding in lockstep (their output is ignored); clamp their positions so they
        # stay inside the rotary table of the model's context
        step_pos = lengths.clamp(max=model.cfg.model.seq_len - 1)[:, None]
        logits = model(nxt[:, None], cache=cache, pos=step_pos, valid=ones).logits[:, -1]
        lengths = lengths + 1
    return out
