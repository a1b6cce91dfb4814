"""Inference for tree feed-forward layers: a fused C++ kernel and a batched PyTorch path walk.

Shapes: M tokens, D model width, K trees, L = depth + 1 levels, N = 2^L − 1 nodes per tree, W units per node.

    x (M, D);  w_in, w_out (K, N, W, D);  b_in (K, N, W) or None;  thr (K, N) or None
    ->  y (M, D) in x's dtype, paths (M, K, L) int64

``thr`` holds per-node routing thresholds (``tree.balance``): right child iff Σ_w λ > thr_j (0 without it).
``route="children"`` (``tree.route``) routes on the children's responses instead: right child iff
Σ_w λ_right − Σ_w λ_left > thr_j, so each level computes both children's responses and keeps the chosen one's.

The maths (routing on the sign of a node's summed responses, "node" and "output" placements) is defined in
:mod:`treeffn.layers.tree`; ``tree_reference`` (:mod:`treeffn.ops.tree`) is the slow ground truth both paths here are tested against.

Why a fused kernel: a token touches K·L of the K·N nodes, but walking the tree with one framework op per level
costs microseconds per op, which at batch 1 is more than the arithmetic of the whole walk (the
``tree-torch`` row of ``treeffn bench layer``: a PyTorch walk is far from the ideal ratio at batch 1). ``csrc/tree_infer.cpp`` walks all trees and levels of all
tokens in one call, so a batch-1 call costs a few microseconds.

Backends (``backend``):

* ``"cpp"``   — the fused kernel; CPU tensors, fp32 or bf16 (fp32 accumulation). Raises if it cannot be built. Its
  result does not depend on the thread count: every schedule adds a token's terms in one order.
* ``"torch"`` — one gather + batched dot per level, in chunks of tokens to bound the gathered memory. Device
  agnostic: this is the GPU path, and the fallback when the extension cannot be built (``TREEFFN_NO_EXT=1``).
* ``"auto"``  — ``"cpp"`` for CPU tensors of a supported dtype when the extension loads, else ``"torch"``.

Inference only: calling with autograd recording on a tensor that requires grad raises (use the training path).

``TreeFFN.forward`` in eval mode skips this function: it calls the compiled module's ``try_infer`` directly, which
takes x of any shape (..., D), returns y in that shape, and answers None (instead of raising) for tensors off the
CPU or of another dtype, so that the layer's batch-1 call is one C++ call.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..ops.activations import ACT_CODE as _ACT_CODE
from ..ops.activations import activation_fn
from ..ops.tree import PLACEMENT_CODE as _PLACEMENT_CODE
from ..ops.tree import ROUTE_CODE as _ROUTE_CODE
from .build import load_extension

_CPP_DTYPES = (torch.float32, torch.bfloat16)

_ext = None  # the loaded module, cached so the hot path is one global read
_ext_tried = False


def extension():
    """The compiled kernel module, or ``None`` (with one warning from the loader) when it cannot be built."""
    global _ext, _ext_tried
    if not _ext_tried:
        _ext = load_extension("tree_infer")
        _ext_tried = True
    return _ext


def tree_infer(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out: torch.Tensor,
    depth: int,
    activation: str = "gelu",
    placement: str = "node",
    return_paths: bool = False,
    backend: str = "auto",
    thr: torch.Tensor | None = None,
    route: str = "self",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tree layer output for x (M, D): ``(y (M, D), paths (M, K, L) int64 or None)``. See the module docstring."""
    # Hot path: a batch-1 call must stay within a few microseconds, so checks are cheap attribute reads; shape and
    # dtype checks happen in C++.
    if torch.is_grad_enabled() and (x.requires_grad or w_in.requires_grad or w_out.requires_grad
                                    or (b_in is not None and b_in.requires_grad)):
        raise RuntimeError("tree_infer is inference-only; call it under torch.no_grad()/inference_mode() "
                           "or use the training path (impl='sparse')")
    try:
        act = _ACT_CODE[activation]
        place = _PLACEMENT_CODE[placement]
        rc = _ROUTE_CODE[route]
    except KeyError:
        raise ConfigError(f"unknown activation '{activation}', placement '{placement}' or route '{route}'") from None
    if backend == "auto":
        ext = _ext if _ext_tried else extension()
        # x.is_cpu is ~10x cheaper than x.device.type; w_out's dtype and all shapes are checked in C++.
        if ext is None or not x.is_cpu or x.dtype not in _CPP_DTYPES or w_in.dtype not in _CPP_DTYPES:
            return tree_infer_torch(x, w_in, b_in, w_out, depth, activation, placement, return_paths, thr, route)
    elif backend == "cpp":
        ext = _ext if _ext_tried else extension()
        if ext is None:
            raise RuntimeError("tree_infer: the C++ kernel could not be built (see the warning above); "
                               "use backend='torch'")
    elif backend == "torch":
        return tree_infer_torch(x, w_in, b_in, w_out, depth, activation, placement, return_paths, thr, route)
    else:
        raise ConfigError(f"unknown tree_infer backend '{backend}'; choose one of auto, cpp, torch")
    if return_paths:
        return ext.infer_paths(x, w_in, b_in, w_out, depth, act, place, thr, rc)
    return ext.infer(x, w_in, b_in, w_out, depth, act, place, thr, rc), None


# Bound on gathered elements per level (chunk of tokens × K × W × D), ~64 MiB of fp32: the walk gathers one row
# block per token and tree, which for M=4096, K=32, D=768 would be 400 MB per level unchunked.
_CHUNK_ELEMS = 1 << 24


@torch.no_grad()
def tree_infer_torch(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out: torch.Tensor,
    depth: int,
    activation: str = "gelu",
    placement: str = "node",
    return_paths: bool = False,
    thr: torch.Tensor | None = None,
    route: str = "self",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batched path walk in plain PyTorch ops (any device). Accumulates in fp32 whatever the input dtypes."""
    if placement not in _PLACEMENT_CODE:
        raise ConfigError(f"unknown tree placement '{placement}'")
    if route not in _ROUTE_CODE:
        raise ConfigError(f"unknown tree route '{route}'")
    phi = activation_fn(activation)
    M, D = x.shape
    K, N, W, _ = w_in.shape
    L = depth + 1
    if N != 2 ** L - 1 or w_in.shape[-1] != D or w_out.shape != w_in.shape:
        raise ConfigError(f"tree_infer: w_in {tuple(w_in.shape)} / w_out {tuple(w_out.shape)} do not match "
                          f"depth {depth} and x {tuple(x.shape)}")
    dev = x.device
    # Rows of (W·D) per (tree, node): a visited node is one row of the flattened tables.
    u_rows = w_in.reshape(K * N, W * D)
    v_rows = w_out.reshape(K * N, W * D)
    b_rows = b_in.reshape(K * N, W) if b_in is not None else None
    thr_rows = thr.reshape(K * N).float() if thr is not None else None
    y = torch.empty(M, D, dtype=x.dtype, device=dev)
    paths = torch.empty(M, K, L, dtype=torch.long, device=dev) if return_paths else None
    tree_base = (torch.arange(K, device=dev) * N).view(1, K)  # (1, K) row offset of each tree
    chunk = max(1, _CHUNK_ELEMS // max(1, K * W * D))
    for m0 in range(0, M, chunk):
        xc = x[m0:m0 + chunk].float()  # (Mc, D)
        mc = xc.shape[0]
        node = torch.zeros(mc, K, dtype=torch.long, device=dev)  # (Mc, K)

        def child_sum(side: int) -> torch.Tensor:  # Σ_w λ of each token's child 2j + side, (Mc, K)
            cidx = (2 * node + side + tree_base).reshape(-1)
            s = torch.bmm(u_rows.index_select(0, cidx).view(mc, K * W, D).float(), xc.unsqueeze(-1)).view(mc, K, W)
            if b_rows is not None:
                s = s + b_rows.index_select(0, cidx).view(mc, K, W).float()
            return s.sum(-1)

        acc = torch.zeros(mc, D, device=dev) if placement == "node" else torch.zeros(mc, K, D, device=dev)
        for t in range(L):
            if paths is not None:
                paths[m0:m0 + mc, :, t] = node
            idx = (node + tree_base).reshape(-1)  # (Mc·K,)
            u = u_rows.index_select(0, idx).view(mc, K * W, D).float()  # (Mc, K·W, D)
            lam = torch.bmm(u, xc.unsqueeze(-1)).view(mc, K, W)  # (Mc, K, W)
            if b_rows is not None:
                lam = lam + b_rows.index_select(0, idx).view(mc, K, W).float()
            v = v_rows.index_select(0, idx).view(mc, K * W, D).float()  # (Mc, K·W, D)
            if placement == "node":  # Σ_k Σ_w φ(λ) v over all trees at once
                acc = torch.baddbmm(acc.unsqueeze(1), phi(lam).view(mc, 1, K * W), v).squeeze(1)
            else:  # per tree Σ_w λ v
                acc = torch.baddbmm(acc.view(mc * K, 1, D), lam.view(mc * K, 1, W),
                                    v.view(mc * K, W, D)).view(mc, K, D)
            if t < depth:
                cut = 0.0 if thr_rows is None else thr_rows.index_select(0, idx).view(mc, K)
                s = lam.sum(-1) if route == "self" else child_sum(2) - child_sum(1)
                node = 2 * node + 1 + (s > cut).long()
        y[m0:m0 + mc] = acc if placement == "node" else phi(acc).sum(1)
    return y, paths
