"""Tree-structured feed-forward layer (UltraFastBERT form, UFB-23; scaled in DS-26).

Shapes: M tokens (B·T flattened), D model width, K trees, L = depth + 1 levels, N = 2^L − 1 nodes per tree,
W units per node (``node_width``).

For one tree k and token x, node j holds W units with responses λ_kjw = u_kjw · x + b_kjw. The path starts at the
root j_0 = 0 and goes to child 2j+1 (left) or 2j+2 (right)::

    right  iff  s_kj = Σ_w λ_kjw > 0        (W = 1: the sign of the node's single response, as UFB-23)

Summing the W responses makes a node of width W route like one neuron whose input vector is Σ_w u_kjw, so the W
units of a node stay one contiguous block of W·D weights read together (what makes gathers efficient), and no unit
of the node is privileged. The path is computed under stop-gradient in training and inference alike.

Output, by ``placement``::

    "node"    y = Σ_k Σ_t Σ_w φ(λ_k j_t w) · v_k j_t w            (UFB-23: φ on each node before the sum)
    "output"  y = Σ_k φ( Σ_t Σ_w λ_k j_t w · v_k j_t w )          (φ after the sparse accumulation, per tree)

"output" is the balanced variant of DS-26. We apply φ per tree to the D-dimensional accumulated vector: it adds no
parameters (same count and same visited units as "node"), keeps trees independent, and λ enters linearly so a
token routed left still sends gradient to its node — which is why paths do not starve. No output bias (UFB-23).

Initialisation (UFB-23, generalised to W units per node):

    =========  =======================================
    parameter  distribution
    =========  =======================================
    w_in  u    uniform(−1/√D, 1/√D)
    b_in  b    uniform(−1/√D, 1/√D)
    w_out v    uniform(−1/√(K·L·W), 1/√(K·L·W))
    =========  =======================================

Routing balance (``balance``; docs/quality.md has the evidence). Early in LM training the routing inputs — the
normed residual stream — point the same way for every token, so at every node all tokens land on the same side of
the hyperplane: within a few dozen steps each tree collapses onto one path and the subtrees it left stop receiving
gradient. ``"threshold"`` routes on the score's deviation from a per-node threshold instead of its sign::

    right  iff  s_kj > c_kj

In training c_kj is the mean of s_kj over the batch's tokens that reach node kj, set level by level (a node's
tokens depend on the thresholds above it), as batch normalisation uses batch statistics; every node then splits its
tokens around their mean, whatever direction they share. A running average of these batch means,
c ← c + r·(batch mean − c) with r = ``balance_rate``, is kept in a (K, N) buffer and used in evaluation and
decoding, where batches are small or a single token. Thresholds receive no gradient and move only the routing
decision (a node's output φ(λ) is unchanged), so every kernel takes them as one more (K, N) input; the buffer is
saved with the weights. The threshold of a node no training token reached keeps its previous value. Under DDP the
per-level statistics are summed over ranks, so routing is that of the global batch. ``"none"`` is the faithful
UFB-23 / DS-26 layer.

Depth 0 is a dense MLP of K·W units (every token visits every root): ``tests/test_model.py`` checks it.

Implementations (selected by ``impl``; ``"auto"`` picks the fastest available):

* ``"reference"`` — masked dense simulation below: computes every node, masks the unvisited ones. O(N) work.
* ``"sparse"`` — training path whose work scales with the K·L visited nodes (``treeffn.kernels.tree_train``).
* ``"fused"`` — inference kernel (``treeffn.kernels.tree_infer``), no autograd.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .activations import ACTIVATIONS, activation_fn

PLACEMENTS = ("node", "output")
BALANCES = ("none", "threshold")
IMPLS = ("auto", "reference", "sparse", "fused")


def num_nodes(depth: int) -> int:
    return 2 ** (depth + 1) - 1


@torch.no_grad()
def tree_paths(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, depth: int,
               thr: torch.Tensor | None = None, return_scores: bool = False):
    """Visited node index per token, tree and level: (M, K, L) int64. Never carries gradient.

    ``thr`` (K, N): per-node routing thresholds (right iff s > thr; 0 without). With ``return_scores`` also the
    scores s = Σ_w λ at the visited nodes, (M, K, L) in x's dtype.
    """
    M = x.shape[0]
    K, N, W, D = w_in.shape
    node = torch.zeros(M, K, dtype=torch.long, device=x.device)  # (M, K)
    out = torch.empty(M, K, depth + 1, dtype=torch.long, device=x.device)
    scores = torch.empty(M, K, depth + 1, dtype=x.dtype, device=x.device) if return_scores else None
    k_idx = torch.arange(K, device=x.device)
    for t in range(depth + 1):
        out[:, :, t] = node
        if t == depth and not return_scores:
            break
        u = w_in[k_idx, node]  # (M, K, W, D)
        s = torch.einsum("mkwd,md->mk", u.to(x.dtype), x)
        if b_in is not None:
            s = s + b_in[k_idx, node].sum(-1).to(x.dtype)
        if scores is not None:
            scores[:, :, t] = s
        if t < depth:
            cut = 0.0 if thr is None else thr[k_idx, node].to(x.dtype)  # (M, K)
            node = 2 * node + 1 + (s > cut).long()
    return (out, scores) if return_scores else out


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


class TreeFFN(nn.Module):
    """K binary trees of the given depth replacing a transformer MLP block. See the module docstring."""

    def __init__(
        self,
        d_model: int,
        trees: int,
        depth: int,
        node_width: int = 1,
        activation: str = "gelu",
        placement: str = "node",
        bias: bool = True,
        impl: str = "auto",
        balance: str = "none",
        balance_rate: float = 0.1,
    ):
        super().__init__()
        if d_model < 1 or trees < 1 or node_width < 1:
            raise ConfigError(f"tree layer needs d_model, trees and node_width ≥ 1 (got {d_model}, {trees}, {node_width})")
        if not 0 <= depth <= 24:
            raise ConfigError(f"tree.depth must be between 0 and 24 (got {depth})")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown tree.activation '{activation}'; choose one of {', '.join(ACTIVATIONS)}")
        if placement not in PLACEMENTS:
            raise ConfigError(f"unknown tree.placement '{placement}'; choose one of {', '.join(PLACEMENTS)}")
        if impl not in IMPLS:
            raise ConfigError(f"unknown tree impl '{impl}'; choose one of {', '.join(IMPLS)}")
        if balance not in BALANCES:
            raise ConfigError(f"unknown tree.balance '{balance}'; choose one of {', '.join(BALANCES)}")
        if not 0.0 < balance_rate <= 1.0:
            raise ConfigError(f"tree.balance_rate must be in (0, 1] (got {balance_rate})")
        self.d_model, self.trees, self.depth, self.node_width = d_model, trees, depth, node_width
        self.activation, self.placement, self.impl = activation, placement, impl
        self.balance, self.balance_rate = balance, balance_rate
        N = num_nodes(depth)
        self.w_in = nn.Parameter(torch.empty(trees, N, node_width, d_model))
        self.b_in = nn.Parameter(torch.empty(trees, N, node_width)) if bias else None
        self.w_out = nn.Parameter(torch.empty(trees, N, node_width, d_model))
        # Routing thresholds c (K, N), fp32 (see the module docstring); only with balance="threshold".
        self.register_buffer("route_threshold", torch.zeros(trees, N) if balance != "none" else None)
        self.track_stats = False  # set by the trainer / analysis; visit counts come back in the aux dict
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        a = 1.0 / math.sqrt(self.d_model)
        self.w_in.uniform_(-a, a)
        if self.b_in is not None:
            self.b_in.uniform_(-a, a)
        c = 1.0 / math.sqrt(self.trees * (self.depth + 1) * self.node_width)
        self.w_out.uniform_(-c, c)
        if self.route_threshold is not None:
            self.route_threshold.zero_()

    # ---- accounting -------------------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return num_nodes(self.depth)

    def total_units(self) -> int:
        return self.trees * self.num_nodes * self.node_width

    def active_units(self) -> float:
        return float(self.trees * (self.depth + 1) * self.node_width)

    def flops_per_token(self) -> float:
        """Inference multiply-adds ×2 over the visited units (routing sums and φ are O(units), not counted)."""
        return 2.0 * 2.0 * self.active_units() * self.d_model

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, trees={self.trees}, depth={self.depth}, node_width={self.node_width}, "
                f"activation={self.activation}, placement={self.placement}, balance={self.balance}, "
                f"impl={self.impl}")

    # ---- forward ----------------------------------------------------------------------------------------------
    def _choose_impl(self, x: torch.Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.w_in.requires_grad)
        return "sparse" if needs_grad else "fused"

    def forward_2d(self, x: torch.Tensor, impl: str | None = None, return_lam: bool = False,
                   thr: torch.Tensor | None = None):
        """x (M, D) -> (y (M, D), paths (M, K, L) or None when the implementation does not expose them), and with
        ``return_lam`` the visited units' responses λ (M, K, L, W), detached (``"fused"`` cannot give them).
        ``thr`` overrides the stored routing thresholds (training uses the batch's own)."""
        impl = impl or self._choose_impl(x)
        thr = self.route_threshold if thr is None else thr
        if impl == "sparse":
            try:
                from ..kernels.tree_train import tree_train
            except ImportError:
                impl = "reference"
            else:
                return tree_train(x, self.w_in, self.b_in, self.w_out, self.depth, self.activation, self.placement,
                                  thr=thr, return_lam=return_lam)
        if impl == "fused":
            if torch.is_grad_enabled() and (x.requires_grad or self.w_in.requires_grad):
                raise RuntimeError("the fused tree kernel is inference-only; use impl='sparse' under autograd")
            if return_lam:
                raise ValueError("the fused tree kernel does not return responses; use impl='sparse' or 'reference'")
            try:
                from ..kernels.tree_infer import tree_infer
            except ImportError:
                impl = "reference"
            else:
                return tree_infer(x, self.w_in, self.b_in, self.w_out, self.depth, self.activation, self.placement,
                                  return_paths=self.track_stats, thr=thr)
        paths = tree_paths(x, self.w_in, self.b_in, self.depth, thr)
        y = tree_reference(x, self.w_in, self.b_in, self.w_out, self.depth, self.activation, self.placement, paths)
        if not return_lam:
            return y, paths
        K, N, W, D = self.w_in.shape
        k_idx = torch.arange(K, device=x.device).view(1, K, 1)
        with torch.no_grad():
            lam = torch.einsum("mkld,mklwd->mklw", x.unsqueeze(1).unsqueeze(1).expand(-1, K, paths.shape[2], -1),
                               self.w_in[k_idx, paths].to(x.dtype))
            if self.b_in is not None:
                lam = lam + self.b_in[k_idx, paths].to(x.dtype)
        return y, paths, lam

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        batch_stats = self.training and self.route_threshold is not None and torch.is_grad_enabled()
        need_lam = self.track_stats
        impl = self._choose_impl(x2)
        if need_lam and impl == "fused":  # the fused kernel returns no responses; the sparse path does, cheaply
            impl = "sparse"
        thr = None
        if batch_stats:
            thr, seen = batch_thresholds(x2.detach(), self.w_in.detach(), None if self.b_in is None else
                                         self.b_in.detach(), self.depth, self.route_threshold)
            with torch.no_grad():  # running average for evaluation and decoding
                c = self.route_threshold
                c[seen] += self.balance_rate * (thr[seen] - c[seen])
        out = self.forward_2d(x2, impl=impl, return_lam=need_lam, thr=thr)
        y, paths = out[0], out[1]
        aux: dict = {}
        if self.track_stats:
            if paths is None:
                paths = tree_paths(x2, self.w_in, self.b_in, self.depth, self.route_threshold)
            aux["tree_visits"] = visit_counts(paths, self.num_nodes)
            aux["tree_diag"] = routing_diagnostics(x2, out[2], thr if thr is not None else self.route_threshold,
                                                   paths, self.w_in, self.b_in, self.activation)
        return y.reshape(shape), aux


@torch.no_grad()
def batch_thresholds(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, depth: int,
                     fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-node thresholds from the batch itself: c_kj = mean of s_kj over the tokens that reach node kj, level by
    level (tokens route on their deviation from it). x (M, D) -> (c (K, N) fp32, seen (K, N) bool); nodes no token
    reaches keep ``fallback``'s value. Under DDP the statistics of every level are summed over the ranks first.
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
    xf = x.float()
    for t in range(depth):
        width, first = 2 ** t, 2 ** t - 1
        if width <= 16:  # all nodes of the level at once: (M, K, width), then pick each token's node
            lvl = w_in[:, first:first + width].float().sum(2)  # (K, width, D)
            s = torch.einsum("md,kjd->mkj", xf, lvl).gather(2, (node - first).unsqueeze(-1)).squeeze(-1)
        else:
            s = torch.einsum("mkd,md->mk", w_in[k_idx, node].float().sum(2), xf)
        if b_in is not None:
            s = s + b_in[k_idx, node].float().sum(-1)
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
        lvl_c = c[:, first:first + width]
        lvl_c[hit] = mean[hit]
        seen[:, first:first + width] = hit
        node = 2 * node + 1 + (s > lvl_c.reshape(-1)[local]).long()
    return c, seen


@torch.no_grad()
def visit_counts(paths: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """paths (M, K, L) -> visits per tree and node (K, N), int64."""
    M, K, L = paths.shape
    flat = paths + torch.arange(K, device=paths.device).view(1, K, 1) * n_nodes
    return torch.bincount(flat.reshape(-1), minlength=K * n_nodes).view(K, n_nodes)


@torch.no_grad()
def routing_diagnostics(x: torch.Tensor, lam: torch.Tensor, thr: torch.Tensor | None, paths: torch.Tensor,
                        w_in: torch.Tensor, b_in: torch.Tensor | None, activation: str,
                        eps: float = 0.05, max_tokens: int = 1024) -> dict[str, torch.Tensor]:
    """What tells the causes of a routing collapse apart, for one layer and one batch.

    x (M, D) routing inputs, lam (M, K, L, W) visited responses, paths (M, K, L). Returns detached tensors:

    * ``align``: mean cosine similarity between the routing inputs of two different tokens (1 = all alike);
    * ``margin`` (L,): mean |s − c| per level, s = Σ_w λ, c the node's threshold (0 without balance);
    * ``centre`` (L,): per level, mean over visited nodes of |mean_node(s) − c| / std_node(s) (token-weighted):
      ≫ 1 means the node sends its tokens one way whatever they are;
    * ``u_norm``, ``b_abs`` (L,): mean ‖Σ_w u‖ and |Σ_w b| of the nodes of each level;
    * ``live_grad`` (L,): fraction of visited units with φ'(λ) > eps (gradient reaches them, "node" placement).
    """
    from .activations import activation_grad

    M, K, L, W = lam.shape
    N = w_in.shape[1]
    xs = x[:: max(1, M // max_tokens)].float()
    n = xs.shape[0]
    xn = torch.nn.functional.normalize(xs, dim=-1)
    tot = xn.sum(0)
    align = (tot @ tot - n) / max(1, n * (n - 1))
    s = lam.sum(-1).double()  # (M, K, L)
    cut = thr.double()[torch.arange(K, device=x.device).view(1, K, 1), paths] if thr is not None else torch.zeros_like(s)
    margin = (s - cut).abs().mean((0, 1))
    flat = (paths + torch.arange(K, device=x.device).view(1, K, 1) * N).reshape(-1)
    cnt = torch.bincount(flat, minlength=K * N).double()
    s1 = torch.zeros(K * N, dtype=torch.float64, device=x.device).index_add_(0, flat, s.reshape(-1))
    s2 = torch.zeros(K * N, dtype=torch.float64, device=x.device).index_add_(0, flat, (s * s).reshape(-1))
    mean = s1 / cnt.clamp_min(1)
    std = (s2 / cnt.clamp_min(1) - mean * mean).clamp_min(0).sqrt()
    c_all = thr.double().reshape(-1) if thr is not None else torch.zeros_like(mean)
    off = (mean - c_all).abs() / std.clamp_min(1e-6)
    centre = []
    u_sum = w_in.detach().float().sum(2).norm(dim=-1)  # (K, N)
    b_sum = b_in.detach().float().sum(2).abs() if b_in is not None else torch.zeros_like(u_sum)
    u_norm, b_abs = [], []
    for t in range(L):
        sl = slice(2 ** t - 1, 2 ** (t + 1) - 1)
        ct = cnt.view(K, N)[:, sl]
        ok = ct > 1
        centre.append((off.view(K, N)[:, sl][ok] * ct[ok]).sum() / ct[ok].sum().clamp_min(1))
        u_norm.append(u_sum[:, sl].mean())
        b_abs.append(b_sum[:, sl].mean())
    live = (activation_grad(activation, lam.float()).abs() > eps).double().mean((0, 1, 3))
    return {"align": align.double(), "margin": margin, "centre": torch.stack(centre),
            "u_norm": torch.stack(u_norm).double(), "b_abs": torch.stack(b_abs).double(), "live_grad": live}
