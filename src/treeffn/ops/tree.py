"""Reference definition of the tree feed-forward layer (UFB-23 form, DS-26 placements), with routing thresholds.

The maths is documented in :mod:`treeffn.layers.tree` (the module users meet); this file holds the slow,
obviously correct functions every fast path (``treeffn.kernels``) is tested against, and the routing statistics.

Shapes: M tokens, D model width, K trees, L = depth + 1 levels, N = 2^L − 1 nodes per tree, W units per node;
w_in, w_out (K, N, W, D), b_in (K, N, W) or None, thresholds (K, N) or None, paths (M, K, L) int64.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .activations import activation_fn, activation_grad

PLACEMENTS = ("node", "output")
PLACEMENT_CODE = {name: i for i, name in enumerate(PLACEMENTS)}  # the codes of kernels/csrc/*.cpp
BALANCES = ("none", "threshold")
ROUTES = ("self", "children")
ROUTE_CODE = {name: i for i, name in enumerate(ROUTES)}  # the codes of kernels/csrc/tree_infer.cpp


@torch.no_grad()
def routing_rows(w_in: torch.Tensor, b_in: torch.Tensor | None, route: str = "self"):
    """The hyperplane each node routes on: (K, N, D) rows and (K, N) offsets (or None), in w_in's dtype, no grad.

    ``route="self"``: the node's own units, Σ_w u_kjw and Σ_w b_kjw (UFB-23). ``route="children"``: the difference
    of its children's, Σ_w u_k(2j+2)w − Σ_w u_k(2j+1)w (and likewise b), so a token goes to the child whose units
    respond more (leaves do not route: their rows are 0).
    """
    one = w_in.shape[2] == 1  # one unit per node: views, no copy
    u = w_in.detach()[:, :, 0] if one else w_in.detach().sum(2)
    b = None if b_in is None else (b_in.detach()[:, :, 0] if one else b_in.detach().sum(2))
    if route == "self":
        return u, b
    if route != "children":
        raise ConfigError(f"unknown tree.route '{route}'; choose one of {', '.join(ROUTES)}")
    N = u.shape[1]
    r = torch.zeros_like(u)
    r[:, : N // 2] = u[:, 2:N:2] - u[:, 1:N:2]
    rb = None
    if b is not None:
        rb = torch.zeros_like(b)
        rb[:, : N // 2] = b[:, 2:N:2] - b[:, 1:N:2]
    return r, rb


def num_nodes(depth: int) -> int:
    return 2 ** (depth + 1) - 1


@torch.no_grad()
def tree_paths(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, depth: int,
               thr: torch.Tensor | None = None, return_scores: bool = False, route: str = "self"):
    """Visited node index per token, tree and level: (M, K, L) int64. Never carries gradient.

    ``thr`` (K, N): per-node routing thresholds (right iff s > thr; 0 without). ``route``: what s is
    (:func:`routing_rows`; "self": s = Σ_w λ of the node). With ``return_scores`` also the scores s at the visited
    nodes, (M, K, L) in x's dtype (0 at the leaves under "children").
    """
    M = x.shape[0]
    K, N, W, D = w_in.shape
    rows, offs = routing_rows(w_in, b_in, route)  # (K, N, D), (K, N)
    node = torch.zeros(M, K, dtype=torch.long, device=x.device)  # (M, K)
    out = torch.empty(M, K, depth + 1, dtype=torch.long, device=x.device)
    scores = torch.empty(M, K, depth + 1, dtype=x.dtype, device=x.device) if return_scores else None
    k_idx = torch.arange(K, device=x.device)
    for t in range(depth + 1):
        out[:, :, t] = node
        if t == depth and not return_scores:
            break
        s = torch.einsum("mkd,md->mk", rows[k_idx, node].to(x.dtype), x)
        if offs is not None:
            s = s + offs[k_idx, node].to(x.dtype)
        if scores is not None:
            scores[:, :, t] = s
        if t < depth:
            cut = 0.0 if thr is None else thr[k_idx, node].to(x.dtype)  # (M, K)
            node = 2 * node + 1 + (s > cut).long()
    return (out, scores) if return_scores else out


@torch.no_grad()
def routing_scores(x: torch.Tensor, paths: torch.Tensor, rows: torch.Tensor, offs: torch.Tensor | None):
    """The routing score of every visited node, r·x + o with (rows, offs) from :func:`routing_rows`: (M, K, L)."""
    K = rows.shape[0]
    k_idx = torch.arange(K, device=x.device).view(1, K, 1)
    s = torch.einsum("mkld,md->mkl", rows[k_idx, paths].to(x.dtype), x)
    return s if offs is None else s + offs[k_idx, paths].to(x.dtype)


def tree_reference(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out: torch.Tensor,
    depth: int,
    activation: str = "gelu",
    placement: str = "node",
    paths: torch.Tensor | None = None,
    thr: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked dense simulation: every node is computed, unvisited ones are zeroed. x (M, D) -> y (M, D).

    The slow, obviously correct reference every fast path is tested against. Gradients flow only through the
    visited nodes (the mask is a constant), and never into the routing decision.
    """
    K, N, W, D = w_in.shape
    phi = activation_fn(activation)
    if paths is None:
        paths = tree_paths(x, w_in, b_in, depth, thr)  # (M, K, L)
    mask = torch.zeros(x.shape[0], K, N, dtype=x.dtype, device=x.device)
    mask.scatter_(2, paths, 1.0)  # (M, K, N)
    lam = torch.einsum("md,knwd->mknw", x, w_in)
    if b_in is not None:
        lam = lam + b_in
    if placement == "node":
        h = phi(lam) * mask.unsqueeze(-1)  # (M, K, N, W)
        return torch.einsum("mknw,knwd->md", h, w_out)
    if placement == "output":
        z = torch.einsum("mknw,knwd->mkd", lam * mask.unsqueeze(-1), w_out)  # (M, K, D)
        return phi(z).sum(1)
    raise ConfigError(f"unknown tree placement '{placement}'; choose one of {', '.join(PLACEMENTS)}")


@torch.no_grad()
def batch_thresholds(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, depth: int,
                     fallback: torch.Tensor, route: str = "self", return_paths: bool = False):
    """Per-node thresholds from the batch itself: c_kj = mean of s_kj over the tokens that reach node kj, level by
    level (tokens route on their deviation from it). x (M, D) -> (c (K, N) fp32, seen (K, N) bool); nodes no token
    reaches keep ``fallback``'s value. Under DDP the statistics of every level are summed over the ranks first.
    ``route``: what a node's score is (:func:`routing_rows`). With ``return_paths`` also the paths the tokens take
    under these thresholds, (M, K, L) int64.
    """
    M, D = x.shape
    K, N, W, _ = w_in.shape
    dev = x.device
    dist = torch.distributed
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    c = fallback.detach().clone().float()
    seen = torch.zeros(K, N, dtype=torch.bool, device=dev)
    k_idx = torch.arange(K, device=dev)
    node = torch.zeros(M, K, dtype=torch.long, device=dev)  # (M, K) global node index at level t
    paths = torch.zeros(M, K, depth + 1, dtype=torch.long, device=dev) if return_paths else None
    xf = x.float()
    # (K, N, D) and (K, N): the hyperplane each node routes on (routing_rows)
    u, b = routing_rows(w_in, b_in, route)
    u, b = u.float(), None if b is None else b.float()
    # Shallow levels (≤ 16 nodes per tree): one GEMM for all their nodes, then each token picks its node's column;
    # deeper levels: gather each token's node row and take one dot product (a GEMM there would mostly be wasted).
    top = min(depth, 5)
    n_top = 2 ** top - 1
    s_top = xf @ u[:, :n_top].reshape(K * n_top, D).t() if top else None  # (M, K·n_top)
    rows = u.reshape(K * N, D)
    b_flat = b.reshape(-1) if b is not None else None
    for t in range(depth):
        width, first = 2 ** t, 2 ** t - 1
        flat = (node + (k_idx * N).view(1, K)).reshape(-1)  # (M·K,) row of each token's node
        if t < top:
            s = s_top.view(M, K, n_top).gather(2, node.unsqueeze(-1)).squeeze(-1)  # (M, K)
        else:
            r = rows.index_select(0, flat).view(M, K, D)
            s = torch.bmm(r, xf.unsqueeze(-1)).view(M, K)
        if b_flat is not None:  # index_select, not advanced indexing: the latter is ~100x slower here on CPU
            s = s + b_flat.index_select(0, flat).view(M, K)
        local = node - first + (k_idx * width).view(1, K)  # (M, K) index within the level, all trees
        sums = torch.zeros(K * width, dtype=torch.float64, device=dev).index_add_(0, local.reshape(-1),
                                                                                  s.reshape(-1).double())
        counts = torch.bincount(local.reshape(-1), minlength=K * width).double()
        if multi:
            both = torch.stack([sums, counts])
            dist.all_reduce(both)
            sums, counts = both[0], both[1]
        hit = (counts > 0).view(K, width)
        mean = (sums / counts.clamp_min(1)).float().view(K, width)
        lvl_c = torch.where(hit, mean, c[:, first:first + width])  # (K, width)
        c[:, first:first + width] = lvl_c
        seen[:, first:first + width] = hit
        node = 2 * node + 1 + (s > lvl_c.reshape(-1).index_select(0, local.reshape(-1)).view(M, K)).long()
        if paths is not None:
            paths[:, :, t + 1] = node
    return (c, seen, paths) if return_paths else (c, seen)


@torch.no_grad()
def best_path_values(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
                     depth: int, activation: str, placement: str = "node") -> torch.Tensor:
    """Value of the best root-to-leaf path below every node, (M, K, N) fp32, no grad.

    A path's value is the magnitude of what its units add to the output, Σ_t Σ_w |φ(λ)|·‖v‖ (|λ|·‖v‖ for the
    "output" placement: the contribution the choice statistics of ``treeffn analyze`` use); V_j = val_j + max(V_2j+1, V_2j+2), leaves upwards. It reads every
    unit of the tree (a dense layer's input GEMM): a training-time signal and a diagnostic, never a routing rule.
    """
    M = x.shape[0]
    K, N, W, D = w_in.shape
    lam = (x.detach().float() @ w_in.detach().reshape(K * N * W, D).float().t()).view(M, K, N, W)
    if b_in is not None:
        lam = lam + b_in.detach().float()
    mag = activation_fn(activation)(lam).abs_() if placement == "node" else lam.abs_()
    return subtree_best(mag.mul_(w_out.detach().float().norm(dim=-1)).sum(-1), depth)


@torch.no_grad()
def subtree_best(value: torch.Tensor, depth: int) -> torch.Tensor:
    """value (M, K, N) of every node -> the best root-to-leaf path value below every node (a new tensor)."""
    v = value.clone()
    for t in range(depth - 1, -1, -1):
        j = torch.arange(2 ** t - 1, 2 ** (t + 1) - 1, device=v.device)
        v[:, :, j] += torch.maximum(v[:, :, 2 * j + 1], v[:, :, 2 * j + 2])
    return v


def better_child(v: torch.Tensor, paths: torch.Tensor, depth: int) -> torch.Tensor:
    """(M, K, depth) bool: whether the right child of each visited routing node has the larger best-path value."""
    p = paths[:, :, :depth]
    return v.gather(2, 2 * p + 2) > v.gather(2, 2 * p + 1)


@torch.no_grad()
def best_path_targets(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
                      depth: int, activation: str, paths: torch.Tensor, placement: str = "node") -> torch.Tensor:
    """(M, K, depth) bool: at each visited node that routes, whether the right child's subtree holds the better
    path (:func:`best_path_values`)."""
    return better_child(best_path_values(x, w_in, b_in, w_out, depth, activation, placement), paths, depth)


@torch.no_grad()
def best_paths(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, depth: int,
               activation: str, placement: str = "node") -> torch.Tensor:
    """The walk every routing loss target points along: from the root, always to the child whose subtree holds the
    better path (:func:`best_path_values`), (M, K, L) int64 — the best path by its units' contributions. It reads
    every unit, so it is an analysis oracle (``treeffn analyze --best-paths``), not a routing rule."""
    v = best_path_values(x, w_in, b_in, w_out, depth, activation, placement)
    M, K = x.shape[0], w_in.shape[0]
    out = torch.zeros(M, K, depth + 1, dtype=torch.long, device=x.device)
    for t in range(depth):
        j = out[:, :, t]
        out[:, :, t + 1] = 2 * j + 1 + (v.gather(2, (2 * j + 2).unsqueeze(-1)) >
                                        v.gather(2, (2 * j + 1).unsqueeze(-1))).squeeze(-1).long()
    return out


class _RouteLoss(torch.autograd.Function):
    """Mean binary cross-entropy of the visited routing decisions, logits s − c with s = Σ_w λ (the node's own
    units, ``route="self"``) and c the node's threshold, against given targets. Gradient only into w_in and b_in
    (every unit of a node gets its node's, as s sums them); x, paths, thresholds and targets are constants."""

    @staticmethod
    def forward(ctx, w_in, b_in, x, paths, thr, target):
        M, K, _ = paths.shape
        steps = target.shape[2]
        N = w_in.shape[1]
        u = w_in.detach().float().sum(2).reshape(K * N, -1)  # (K·N, D)
        b = None if b_in is None else b_in.detach().float().sum(2).reshape(-1)
        xf = x.detach().float()
        base = (torch.arange(K, device=x.device) * N).view(1, K)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        grads = []
        for t in range(steps):
            flat = (paths[:, :, t] + base).reshape(-1)
            z = torch.bmm(u.index_select(0, flat).view(M, K, -1), xf.unsqueeze(-1)).view(M, K)
            if b is not None:
                z = z + b.index_select(0, flat).view(M, K)
            if thr is not None:
                z = z - thr.float().reshape(-1).index_select(0, flat).view(M, K)
            y = target[:, :, t].float()
            total += torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum").double()
            grads.append((flat, torch.sigmoid(z) - y))
        n = M * K * max(steps, 1)
        ctx.save_for_backward(xf)
        ctx.grads, ctx.n, ctx.shape, ctx.has_b = grads, n, w_in.shape, b_in is not None
        ctx.dtypes = (w_in.dtype, None if b_in is None else b_in.dtype)
        return (total / n).float()

    @staticmethod
    def backward(ctx, grad):
        (xf,) = ctx.saved_tensors
        K, N, W, D = ctx.shape
        M = xf.shape[0]
        gu = torch.zeros(K * N, D, dtype=torch.float32, device=xf.device)
        gb = torch.zeros(K * N, dtype=torch.float32, device=xf.device)
        scale = grad.float() / ctx.n
        for flat, g in ctx.grads:
            g = g * scale  # (M, K)
            gu.index_add_(0, flat, (g.unsqueeze(-1) * xf.unsqueeze(1)).reshape(M * K, D))
            gb.index_add_(0, flat, g.reshape(-1))
        gw = gu.view(K, N, 1, D).expand(K, N, W, D).to(ctx.dtypes[0])
        gbias = gb.view(K, N, 1).expand(K, N, W).to(ctx.dtypes[1]) if ctx.has_b else None
        return gw, gbias, None, None, None, None


def route_loss(w_in: torch.Tensor, b_in: torch.Tensor | None, x: torch.Tensor, paths: torch.Tensor,
               thr: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    """Scalar loss training each visited node's own routing score towards ``target`` (M, K, depth) bool (right =
    True): mean over tokens, trees and routing levels of BCE(s − c, target). Gradient reaches w_in and b_in only.
    :func:`route_loss_reference` is the autograd definition it is tested against."""
    return _RouteLoss.apply(w_in, b_in, x, paths, thr, target)


def route_loss_reference(w_in, b_in, x, paths, thr, target):
    """Slow autograd form of :func:`route_loss`."""
    K = w_in.shape[0]
    steps = target.shape[2]
    k_idx = torch.arange(K, device=x.device).view(1, K, 1)
    p = paths[:, :, :steps]
    s = torch.einsum("mktd,md->mkt", w_in.sum(2)[k_idx, p], x.detach())
    if b_in is not None:
        s = s + b_in.sum(2)[k_idx, p]
    if thr is not None:
        s = s - thr[k_idx, p]
    return torch.nn.functional.binary_cross_entropy_with_logits(s, target.to(s.dtype))


class _RouteStraightThrough(torch.autograd.Function):
    """Identity on the tree's output y in the forward pass; in the backward pass it also sends the gradient that a
    soft decision p = σ(s − c) at every visited routing node would receive, dL/ds = weight · σ'(s − c) ·
    dL/dy · (h_right − h_left), h a child's own output Σ_w φ(λ)·v, into that node's input weights and bias (the
    straight-through estimate of the hard decision's gradient, one level of lookahead). Under ``route="children"``
    s is the children's difference Σ_w λ_right − Σ_w λ_left, so the gradient goes to the two children's units
    (+ to the right one's, − to the left one's).

    The backward pass works on every unit at once — λ = x·Wᵀ and dL/dy·Vᵀ as two GEMMs, the node gradients as a
    third — which costs three dense-layer GEMMs but no per-token gathers (those were ~30x slower on CPU)."""

    @staticmethod
    def forward(ctx, y, w_in, b_in, w_out, x, paths, thr, weight, activation, route):
        ctx.save_for_backward(w_in, b_in if b_in is not None else torch.empty(0), w_out, x, paths,
                              thr if thr is not None else torch.empty(0))
        ctx.has_b, ctx.has_thr, ctx.weight, ctx.activation = b_in is not None, thr is not None, weight, activation
        ctx.route = route
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        w_in, b_in, w_out, x, paths, thr = ctx.saved_tensors
        K, N, W, D = w_in.shape
        M, _, L = paths.shape
        xf, gf = x.detach().float(), g.float()
        lam = xf @ w_in.detach().float().reshape(K * N * W, D).t()  # (M, K·N·W): every unit's response
        if ctx.has_b:
            lam = lam + b_in.detach().float().reshape(-1)
        gv = gf @ w_out.detach().float().reshape(K * N * W, D).t()  # dL/dy · v of every unit
        lam, gv = lam.view(M, K, N, W), gv.view(M, K, N, W)
        gh = (activation_fn(ctx.activation)(lam) * gv).sum(-1)  # (M, K, N): dL/dy · h_n for every node n
        node = paths[:, :, : L - 1]
        lam_sum = lam.sum(-1)
        if ctx.route == "children":  # routing scores s of the visited routing nodes
            z = lam_sum.gather(2, 2 * node + 2) - lam_sum.gather(2, 2 * node + 1)
        else:
            z = lam_sum.gather(2, node)
        if ctx.has_thr:
            z = z - thr.float()[torch.arange(K, device=x.device).view(1, K, 1), node]
        sig = torch.sigmoid(z)
        ds = ctx.weight * (gh.gather(2, 2 * node + 2) - gh.gather(2, 2 * node + 1)) * sig * (1 - sig)
        dz = torch.zeros(M, K, N, dtype=torch.float32, device=x.device)
        if ctx.route == "children":
            dz.scatter_add_(2, 2 * node + 2, ds).scatter_add_(2, 2 * node + 1, -ds)
        else:
            dz.scatter_add_(2, node, ds)
        dz = dz.view(M, K * N)
        gu = dz.t() @ xf  # (K·N, D)
        gw = gu.view(K, N, 1, D).expand(K, N, W, D).to(w_in.dtype)
        gbias = dz.sum(0).view(K, N, 1).expand(K, N, W).to(b_in.dtype) if ctx.has_b else None
        return g, gw, gbias, None, None, None, None, None, None, None


def route_straight_through(y: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
                           x: torch.Tensor, paths: torch.Tensor, thr: torch.Tensor | None, weight: float,
                           activation: str, route: str = "self") -> torch.Tensor:
    """y unchanged; its backward adds the straight-through routing gradient (:class:`_RouteStraightThrough`) of the
    "node" placement to w_in and b_in, for the routing rule ``route``. :func:`route_straight_through_reference` is the autograd
    definition it is tested against."""
    if route not in ROUTES:
        raise ConfigError(f"unknown tree.route '{route}'; choose one of {', '.join(ROUTES)}")
    return _RouteStraightThrough.apply(y, w_in, b_in, w_out, x.detach(), paths, thr, float(weight), activation,
                                       route)


def route_straight_through_reference(y, w_in, b_in, w_out, x, paths, thr, weight, activation, route="self"):
    """y + Σ_levels,trees weight · (p − p.detach()) · (h_right − h_left).detach(), p = σ(s − c): equal to y in value,
    with the gradient of :func:`route_straight_through`."""
    K, N, W, D = w_in.shape
    L = paths.shape[2]
    k_idx = torch.arange(K, device=x.device).view(1, K, 1)
    x = x.detach()
    node = paths[:, :, : L - 1]
    if route == "children":
        u = w_in.sum(2)[k_idx, 2 * node + 2] - w_in.sum(2)[k_idx, 2 * node + 1]
        bias = None if b_in is None else b_in.sum(2)[k_idx, 2 * node + 2] - b_in.sum(2)[k_idx, 2 * node + 1]
    else:
        u, bias = w_in.sum(2)[k_idx, node], None if b_in is None else b_in.sum(2)[k_idx, node]
    s = torch.einsum("mktd,md->mkt", u, x)
    if bias is not None:
        s = s + bias
    if thr is not None:
        s = s - thr[k_idx, node]
    p = torch.sigmoid(s)
    with torch.no_grad():
        phi = activation_fn(activation)

        def h(n):
            lam = torch.einsum("mktwd,md->mktw", w_in[k_idx, n], x)
            if b_in is not None:
                lam = lam + b_in[k_idx, n]
            return torch.einsum("mktw,mktwd->mktd", phi(lam), w_out[k_idx, n])

        diff = h(2 * node + 2) - h(2 * node + 1)  # (M, K, L-1, D)
    return y + weight * torch.einsum("mkt,mktd->md", p - p.detach(), diff)


@torch.no_grad()
def visit_counts(paths: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """paths (M, K, L) -> visits per tree and node (K, N), int64."""
    M, K, L = paths.shape
    flat = paths + torch.arange(K, device=paths.device).view(1, K, 1) * n_nodes
    return torch.bincount(flat.reshape(-1), minlength=K * n_nodes).view(K, n_nodes)


@torch.no_grad()
def routing_diagnostics(x: torch.Tensor, lam: torch.Tensor, thr: torch.Tensor | None, paths: torch.Tensor,
                        w_in: torch.Tensor, b_in: torch.Tensor | None, activation: str,
                        eps: float = 0.05, max_tokens: int = 1024,
                        scores: torch.Tensor | None = None, route: str = "self",
                        w_out: torch.Tensor | None = None, placement: str = "node") -> dict[str, torch.Tensor]:
    """What tells the causes of a routing collapse apart, for one layer and one batch.

    x (M, D) routing inputs, lam (M, K, L, W) visited responses, paths (M, K, L), ``scores`` (M, K, L) the routing
    scores when they are not the nodes' own Σ_w λ (``route="children"``). Returns detached tensors:

    * ``align``: mean cosine similarity between the routing inputs of two different tokens (1 = all alike);
    * ``margin`` (L − 1,): mean |s − c| per routing level (leaves do not route), s = Σ_w λ, c the node's threshold
      (0 without balance);
    * ``centre`` (L − 1,): per routing level, mean over visited nodes of |mean_node(s) − c| / std_node(s)
      (token-weighted): ≫ 1 means the node sends its tokens one way whatever they are;
    * ``u_norm``, ``b_abs`` (L,): mean ‖Σ_w u‖ and |Σ_w b| of the nodes of each level (of the rows they route on,
      :func:`routing_rows`, under ``route``);
    * ``live_grad`` (L,): fraction of visited units with φ'(λ) > eps (gradient reaches them, "node" placement);
    * with ``w_out``, ``best_agree`` (L − 1,): per routing level, the fraction of decisions that go the way of the
      better subtree (:func:`best_path_targets`; 0.5 is chance), on the same ≤ ``max_tokens`` tokens as ``align``.
    """
    M, K, L, W = lam.shape
    N = w_in.shape[1]
    step = max(1, M // max_tokens)
    xs = x[::step].float()
    n = xs.shape[0]
    xn = torch.nn.functional.normalize(xs, dim=-1)
    tot = xn.sum(0)
    align = (tot @ tot - n) / max(1, n * (n - 1))
    s = (lam.sum(-1) if scores is None else scores).double()  # (M, K, L)
    cut = thr.double()[torch.arange(K, device=x.device).view(1, K, 1), paths] if thr is not None else torch.zeros_like(s)
    margin = (s - cut)[:, :, : L - 1].abs().mean((0, 1))
    flat = (paths + torch.arange(K, device=x.device).view(1, K, 1) * N).reshape(-1)
    cnt = torch.bincount(flat, minlength=K * N).double()
    s1 = torch.zeros(K * N, dtype=torch.float64, device=x.device).index_add_(0, flat, s.reshape(-1))
    s2 = torch.zeros(K * N, dtype=torch.float64, device=x.device).index_add_(0, flat, (s * s).reshape(-1))
    mean = s1 / cnt.clamp_min(1)
    std = (s2 / cnt.clamp_min(1) - mean * mean).clamp_min(0).sqrt()
    c_all = thr.double().reshape(-1) if thr is not None else torch.zeros_like(mean)
    off = (mean - c_all).abs() / std.clamp_min(1e-6)
    centre = []
    rows, offs = routing_rows(w_in, b_in, route)
    u_sum = rows.float().norm(dim=-1)  # (K, N)
    b_sum = offs.float().abs() if offs is not None else torch.zeros_like(u_sum)
    u_norm, b_abs = [], []
    for t in range(L):
        sl = slice(2 ** t - 1, 2 ** (t + 1) - 1)
        ct = cnt.view(K, N)[:, sl]
        ok = ct > 1
        if t < L - 1:
            centre.append((off.view(K, N)[:, sl][ok] * ct[ok]).sum() / ct[ok].sum().clamp_min(1))
        u_norm.append(u_sum[:, sl].mean())
        b_abs.append(b_sum[:, sl].mean())
    live = (activation_grad(activation, lam.float()).abs() > eps).double().mean((0, 1, 3))
    centre = torch.stack(centre) if centre else torch.zeros(0, dtype=torch.float64, device=x.device)
    out = {"align": align.double(), "margin": margin, "centre": centre,
           "u_norm": torch.stack(u_norm).double(), "b_abs": torch.stack(b_abs).double(), "live_grad": live}
    if w_out is not None and L > 1:
        best = best_path_targets(xs, w_in, b_in, w_out, L - 1, activation, paths[::step], placement)
        went = (s - cut)[::step, :, : L - 1] > 0
        out["best_agree"] = (went == best).double().mean((0, 1))
    return out
