"""A tree feed-forward layer with dead subtrees removed: the static, compact form written by ``treeffn prune``.

DS-26 observes that with φ before the sum (placement ``"node"``) paths lose their traffic over training and die.
Nodes that (almost) no token reaches cost parameters and memory but contribute nothing, so ``treeffn prune``
removes them. This module holds what is left.

Shapes: M tokens, D model width, K trees, L = depth + 1 levels, N = 2^L − 1 nodes per original tree, W units per
node, P node *slots* (kept nodes plus padding, see below).

Compact form (all persistent, so a pruned checkpoint is ordinary safetensors + config.json)::

    w_in, w_out  (P, W, D)   parameters of the kept nodes, tree-major, breadth-first inside a tree
    b_in         (P, W)      (when tree.bias)
    child        (P, 2)      slot of the node reached on "left" / "right", or −1: the walk of that tree ends here
    root         (K,)        slot of each tree's root, or −1 when the whole tree was removed
    node_id      (P,)        original node k·N + j of the slot, −1 for padding (statistics map back through it)
    route_threshold (P,)     the node's routing threshold (``tree.balance``; 0 for the faithful layer), fp32

Routing is exactly :class:`~treeffn.layers.tree.TreeFFN`'s in evaluation (right iff Σ_w λ > c, c the node's stored
routing threshold, stop-gradient) on the kept nodes; the thresholds are frozen here (no batch statistics).
What a token does when its routing decision points at a removed child is baked into ``child`` at prune time:

* ``"sibling"`` (default) — it goes to the surviving sibling and keeps walking: a node with one live child no longer
  routes, it always forwards. The path keeps its length whenever some child survives.
* ``"stop"``    — its walk of that tree ends at the last surviving node: the remaining levels contribute nothing.

In both rules a node none of whose children survives ends the walk. A token that never meets a removed node gets
exactly the original layer's output (same nodes, same operations in the same order as
``treeffn.kernels.tree_infer.tree_infer_torch``; ``tests/test_analyze_prune.py`` checks bit equality).

Why padding: a block builds its feed-forward module from the model config alone, without its layer index, so every
layer of a model gets the same number of slots P = ``ffn.hidden / tree.node_width`` (the largest layer's kept count).
Slots a layer does not need are zero and unreachable (``node_id`` −1) and counted as parameters; the number of
*kept* nodes is reported separately. (Passing the layer index to the registry would remove the padding.)

The forward pass is differentiable (routing excepted), so a pruned model can be fine-tuned with ``treeffn train
--init``; the work per token is O(K·L·W·D) as in the tree layer's sparse paths.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError
from ..ops.activations import activation_fn
from .registry import FFNVariant
from .tree import TREE, TreeConfig, TreeLayer, check_tree, init_tree_weights

DEAD_ROUTES = ("sibling", "stop")

# Bound on gathered elements per level and chunk of tokens (~64 MiB fp32); equal to tree_infer_torch's, so the two
# walks chunk alike and give bit-identical results on surviving paths.
_CHUNK_ELEMS = 1 << 24


class PrunedTreeFFN(TreeLayer):
    """K pruned binary trees stored as P node slots. See the module docstring."""

    def __init__(self, d_model: int, trees: int, depth: int, slots: int, node_width: int = 1,
                 activation: str = "gelu", placement: str = "node", bias: bool = True):
        super().__init__()
        check_tree(d_model, trees, depth, node_width, activation, placement)
        if slots < 1:
            raise ConfigError(f"pruned tree layer needs at least one node slot (got {slots})")
        self.d_model, self.trees, self.depth, self.node_width, self.slots = d_model, trees, depth, node_width, slots
        self.activation, self.placement = activation, placement
        P, W, D = slots, node_width, d_model
        self.w_in = nn.Parameter(torch.empty(P, W, D))
        self.b_in = nn.Parameter(torch.empty(P, W)) if bias else None
        self.w_out = nn.Parameter(torch.empty(P, W, D))
        self.register_buffer("child", torch.empty(P, 2, dtype=torch.long))
        self.register_buffer("root", torch.empty(trees, dtype=torch.long))
        self.register_buffer("node_id", torch.empty(P, dtype=torch.long))
        self.register_buffer("route_threshold", torch.zeros(P))
        self.track_stats = False
        self.reset_parameters()

    # ---- construction -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A fresh layer: slots filled breadth-first, round-robin over the trees (slot s = node s//K of tree s%K).

        Only used when a ``tree_pruned`` model is built from scratch; a pruned checkpoint overwrites everything.
        Initialisation as TreeFFN (UFB-23).
        """
        K, N, P = self.trees, self.num_nodes, self.slots
        s = torch.arange(P)
        k, j = s % K, s // K
        valid = j < N

        def slot(jj: torch.Tensor) -> torch.Tensor:
            t = jj * K + k
            return torch.where(valid & (jj < N) & (t < P), t, torch.full_like(t, -1))

        internal = 2 * j + 1 < N
        left = torch.where(internal, slot(2 * j + 1), torch.full_like(s, -1))
        right = torch.where(internal, slot(2 * j + 2), torch.full_like(s, -1))
        self.child.copy_(torch.stack([left, right], 1))
        self.root.copy_(torch.where(torch.arange(K) < P, torch.arange(K), torch.full((K,), -1)))
        self.node_id.copy_(torch.where(valid, k * N + j, torch.full_like(s, -1)))
        self.route_threshold.zero_()
        init_tree_weights(self, None)

    @torch.no_grad()
    def load_tree(self, tree: nn.Module, keep: torch.Tensor, dead_route: str = "sibling") -> int:
        """Fill this layer from a :class:`~treeffn.layers.tree.TreeFFN` keeping the nodes where ``keep`` (K, N).

        A node is kept only if its parent is (``keep`` is closed under ancestors here). Returns the number of kept
        nodes; raises if it exceeds the slots.
        """
        if dead_route not in DEAD_ROUTES:
            raise ConfigError(f"unknown dead-node route '{dead_route}'; choose one of {', '.join(DEAD_ROUTES)}")
        K, N = self.trees, self.num_nodes
        if (tree.trees, tree.depth, tree.node_width, tree.d_model) != (K, self.depth, self.node_width, self.d_model):
            raise ConfigError("pruned layer and tree layer differ in shape")
        keep = keep.detach().to("cpu", torch.bool).clone()
        if tuple(keep.shape) != (K, N):
            raise ConfigError(f"keep mask has shape {tuple(keep.shape)}, expected {(K, N)}")
        for j in range(1, N):  # breadth-first order: the parent (j-1)//2 is final before its children
            keep[:, j] &= keep[:, (j - 1) // 2]
        n = int(keep.sum())
        if n > self.slots:
            raise ConfigError(f"{n} kept nodes do not fit in {self.slots} slots")
        slot_of = torch.full((K, N), -1, dtype=torch.long)
        slot_of[keep] = torch.arange(n)  # boolean indexing is row-major: tree-major, breadth-first in a tree
        kk, jj = keep.nonzero(as_tuple=True)
        internal = 2 * jj + 1 < N
        lj, rj = (2 * jj + 1).clamp_max(N - 1), (2 * jj + 2).clamp_max(N - 1)
        left = torch.where(internal, slot_of[kk, lj], torch.full_like(jj, -1))
        right = torch.where(internal, slot_of[kk, rj], torch.full_like(jj, -1))
        if dead_route == "sibling":
            left, right = torch.where(left >= 0, left, right), torch.where(right >= 0, right, left)
        dev = self.w_in.device
        self.w_in.zero_()
        self.w_out.zero_()
        self.w_in[:n] = tree.w_in.detach()[keep.to(tree.w_in.device)].to(dev, self.w_in.dtype)
        self.w_out[:n] = tree.w_out.detach()[keep.to(tree.w_out.device)].to(dev, self.w_out.dtype)
        if self.b_in is not None:
            self.b_in.zero_()
            if tree.b_in is not None:
                self.b_in[:n] = tree.b_in.detach()[keep.to(tree.b_in.device)].to(dev, self.b_in.dtype)
        self.route_threshold.zero_()
        if getattr(tree, "route_threshold", None) is not None:
            self.route_threshold[:n] = tree.route_threshold.detach()[keep.to(tree.route_threshold.device)].to(
                self.route_threshold.device, self.route_threshold.dtype)
        child = torch.full((self.slots, 2), -1, dtype=torch.long)
        child[:n] = torch.stack([left, right], 1)
        node_id = torch.full((self.slots,), -1, dtype=torch.long)
        node_id[:n] = kk * N + jj
        self.child.copy_(child)
        self.node_id.copy_(node_id)
        self.root.copy_(slot_of[:, 0])
        return n

    @classmethod
    def from_tree(cls, tree: nn.Module, keep: torch.Tensor, slots: int | None = None,
                  dead_route: str = "sibling") -> "PrunedTreeFFN":
        """A new pruned layer from a TreeFFN; ``slots`` defaults to the number of kept nodes."""
        if tree.route != "self":
            raise ConfigError(f"pruning routes on each node's own units; a tree with tree.route={tree.route} "
                              "cannot be pruned")
        K, N = tree.trees, tree.num_nodes
        closed = keep.detach().to("cpu", torch.bool).clone()
        for j in range(1, N):
            closed[:, j] &= closed[:, (j - 1) // 2]
        n = max(1, int(closed.sum()))
        layer = cls(tree.d_model, K, tree.depth, slots or n, tree.node_width, tree.activation, tree.placement,
                    tree.b_in is not None).to(tree.w_in.device, tree.w_in.dtype)
        layer.load_tree(tree, closed, dead_route)
        return layer

    # ---- accounting -------------------------------------------------------------------------------------------
    def kept_nodes(self) -> int:
        if self.node_id.is_meta:
            return self.slots
        return int((self.node_id >= 0).sum())

    def total_units(self) -> int:
        return self.kept_nodes() * self.node_width

    def active_units(self) -> float:
        """Units per token: K·L·W (an upper bound under the "stop" rule, where some walks end early)."""
        return super().active_units()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, trees={self.trees}, depth={self.depth}, node_width={self.node_width}, "
                f"slots={self.slots}, activation={self.activation}, placement={self.placement}")

    # ---- forward ----------------------------------------------------------------------------------------------
    def walk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, D) -> (y (M, D) in x's dtype, slots visited (M, K, L), −1 after a walk ended).

        Mirrors ``tree_infer_torch`` operation for operation (fp32 accumulation, same chunking) so surviving paths
        reproduce the unpruned layer bit for bit; masked steps multiply by 0 instead of branching.
        """
        phi = activation_fn(self.activation)
        M, D = x.shape
        K, W, P, L = self.trees, self.node_width, self.slots, self.depth + 1
        u_rows = self.w_in.reshape(P, W * D)
        v_rows = self.w_out.reshape(P, W * D)
        b_rows = self.b_in if self.b_in is not None else None
        thr = self.route_threshold.float()
        paths = torch.empty(M, K, L, dtype=torch.long, device=x.device)
        chunk = max(1, _CHUNK_ELEMS // max(1, K * W * D))
        outs = []
        for m0 in range(0, M, chunk):
            xc = x[m0:m0 + chunk].float()
            mc = xc.shape[0]
            node = self.root.view(1, K).expand(mc, K)
            acc = xc.new_zeros(mc, D) if self.placement == "node" else xc.new_zeros(mc, K, D)
            for t in range(L):
                paths[m0:m0 + mc, :, t] = node
                alive = node >= 0  # (mc, K)
                idx = node.clamp_min(0).reshape(-1)
                u = u_rows.index_select(0, idx).view(mc, K * W, D).float()
                lam = torch.bmm(u, xc.unsqueeze(-1)).view(mc, K, W)
                if b_rows is not None:
                    lam = lam + b_rows.index_select(0, idx).view(mc, K, W).float()
                v = v_rows.index_select(0, idx).view(mc, K * W, D).float()
                keep = alive.unsqueeze(-1).to(lam.dtype)  # 1.0 leaves values bit-exact, 0.0 drops ended walks
                if self.placement == "node":
                    acc = torch.baddbmm(acc.unsqueeze(1), (phi(lam) * keep).view(mc, 1, K * W), v).squeeze(1)
                else:
                    acc = torch.baddbmm(acc.view(mc * K, 1, D), (lam * keep).view(mc * K, 1, W),
                                        v.view(mc * K, W, D)).view(mc, K, D)
                if t < self.depth:
                    cut = thr.index_select(0, idx).view(mc, K)
                    go = (lam.detach().sum(-1) > cut).long()  # (mc, K): the routing rule of TreeFFN
                    nxt = self.child.index_select(0, idx).view(mc, K, 2).gather(2, go.unsqueeze(-1)).squeeze(-1)
                    node = torch.where(alive, nxt, torch.full_like(nxt, -1))
            outs.append(acc if self.placement == "node" else phi(acc).sum(1))
        y = torch.cat(outs, 0) if outs else x.new_zeros(0, D)
        return y.to(x.dtype), paths

    @torch.no_grad()
    def paths(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, D) -> visited node per token, tree and level (M, K, L), original numbering, −1 after a walk ended."""
        return self.original_paths(self.walk(x)[1])

    def original_paths(self, slots: torch.Tensor) -> torch.Tensor:
        """Slots visited (M, K, L) -> original node index j inside its tree, −1 where the walk had ended."""
        ids = self.node_id[slots.clamp_min(0)]
        return torch.where(slots >= 0, ids % self.num_nodes, torch.full_like(ids, -1))

    @torch.no_grad()
    def visit_counts(self, slots: torch.Tensor) -> torch.Tensor:
        """Slots visited (M, K, L) -> visits (K, N) in the original numbering (removed nodes: 0)."""
        K, N = self.trees, self.num_nodes
        ids = self.node_id[slots.clamp_min(0)]
        ids = ids[(slots >= 0) & (ids >= 0)]
        return torch.bincount(ids.reshape(-1), minlength=K * N).view(K, N)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        shape = x.shape
        y, slots = self.walk(x.reshape(-1, shape[-1]))
        aux: dict = {}
        if self.track_stats:
            aux["tree_visits"] = self.visit_counts(slots)
        return y.reshape(shape), aux


def _build(cfg: Config) -> PrunedTreeFFN:
    t = cfg.tree
    if cfg.ffn.hidden % t.node_width:
        raise ConfigError(f"ffn.hidden ({cfg.ffn.hidden}) of a tree_pruned model must be a multiple of "
                          f"tree.node_width ({t.node_width}): it is node slots × node width")
    return PrunedTreeFFN(cfg.model.d_model, t.trees, t.depth, cfg.ffn.hidden // t.node_width, t.node_width,
                         t.activation, t.placement, t.bias)


TREE_PRUNED = FFNVariant(
    "tree_pruned",
    build=_build,
    describe=lambda cfg: f"{TREE.describe(cfg)}, pruned to {cfg.ffn.hidden // cfg.tree.node_width} node slots",
    section=TreeConfig,
    check=TREE.check,
)
