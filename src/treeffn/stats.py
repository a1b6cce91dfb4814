"""Routing statistics of tree layers (DS-26's auto-pruning, measured).

Input everywhere: visit counts (K, N) of one layer, node j's children at 2j+1 and 2j+2, leaves the last 2^depth
nodes. Counts come from training (``train.stats_every``) or from ``treeffn analyze`` on validation data.
"""

from __future__ import annotations

import math

import torch


def depth_of(n_nodes: int) -> int:
    return int(round(math.log2(n_nodes + 1))) - 1


def level_slices(depth: int) -> list[slice]:
    return [slice(2 ** t - 1, 2 ** (t + 1) - 1) for t in range(depth + 1)]


def tree_summary(counts: torch.Tensor) -> dict[str, float]:
    """Scalars for one layer: dead-node fraction, leaf utilisation, normalised path entropy."""
    counts = counts.double()
    K, N = counts.shape
    depth = depth_of(N)
    leaves = counts[:, 2 ** depth - 1:]  # (K, 2^depth)
    p = leaves / leaves.sum(1, keepdim=True).clamp_min(1)
    ent = -(p * p.clamp_min(1e-30).log2()).sum(1)  # bits, per tree
    return {
        "dead_nodes": float((counts == 0).double().mean()),
        "leaf_util": float((leaves > 0).double().mean()),
        "path_entropy": float(ent.mean() / max(1, depth)) if depth else 1.0,
    }


def level_utilisation(counts: torch.Tensor) -> list[float]:
    """Fraction of nodes visited at least once, per tree level (averaged over trees)."""
    depth = depth_of(counts.shape[1])
    return [float((counts[:, s] > 0).double().mean()) for s in level_slices(depth)]


def union_sparsity(paths: torch.Tensor, n_nodes: int, chunk: int) -> float:
    """Chunk-level union sparsity (BlockFFN): fraction of units touched by ``chunk`` consecutive tokens.

    paths (M, K, L) of consecutive tokens; returns the mean over chunks of |∪ visited nodes| / (K·N).
    """
    M, K, L = paths.shape
    n_chunks = M // chunk
    if n_chunks == 0:
        return float("nan")
    p = paths[: n_chunks * chunk].reshape(n_chunks, chunk * K * L // (K * L), K, L)
    flat = (p + torch.arange(K, device=paths.device).view(1, 1, K, 1) * n_nodes).reshape(n_chunks, -1)
    touched = torch.zeros(n_chunks, K * n_nodes, dtype=torch.bool, device=paths.device)
    touched.scatter_(1, flat, True)
    return float(touched.double().mean())
