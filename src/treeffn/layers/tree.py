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

Depth 0 is a dense MLP of K·W units (every token visits every root): ``tests/test_tree.py`` checks it.

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
IMPLS = ("auto", "reference", "sparse", "fused")


def num_nodes(depth: int) -> int:
    return 2 ** (depth + 1) - 1


@torch.no_grad()
def tree_paths(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, depth: int) -> torch.Tensor:
    """Visited node index per token, tree and level: (M, K, L) int64. Never carries gradient."""
    M = x.shape[0]
    K, N, W, D = w_in.shape
    node = torch.zeros(M, K, dtype=torch.long, device=x.device)  # (M, K)
    out = torch.empty(M, K, depth + 1, dtype=torch.long, device=x.device)
    k_idx = torch.arange(K, device=x.device)
    for t in range(depth + 1):
        out[:, :, t] = node
        if t == depth:
            break
        u = w_in[k_idx, node]  # (M, K, W, D)
        s = torch.einsum("mkwd,md->mk", u.to(x.dtype), x)
        if b_in is not None:
            s = s + b_in[k_idx, node].sum(-1).to(x.dtype)
        node = 2 * node + 1 + (s > 0).long()
    return out


def tree_reference(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out: torch.Tensor,
    depth: int,
    activation: str = "gelu",
    placement: str = "node",
    paths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked dense simulation: every node is computed, unvisited ones are zeroed. x (M, D) -> y (M, D).

    The slow, obviously correct reference every fast path is tested against. Gradients flow only through the
    visited nodes (the mask is a constant), and never into the routing decision.
    """
    K, N, W, D = w_in.shape
    phi = activation_fn(activation)
    if paths is None:
        paths = tree_paths(x, w_in, b_in, depth)  # (M, K, L)
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
        self.d_model, self.trees, self.depth, self.node_width = d_model, trees, depth, node_width
        self.activation, self.placement, self.impl = activation, placement, impl
        N = num_nodes(depth)
        self.w_in = nn.Parameter(torch.empty(trees, N, node_width, d_model))
        self.b_in = nn.Parameter(torch.empty(trees, N, node_width)) if bias else None
        self.w_out = nn.Parameter(torch.empty(trees, N, node_width, d_model))
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
                f"activation={self.activation}, placement={self.placement}, impl={self.impl}")

    # ---- forward ----------------------------------------------------------------------------------------------
    def _choose_impl(self, x: torch.Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.w_in.requires_grad)
        return "sparse" if needs_grad else "fused"

    def forward_2d(self, x: torch.Tensor, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (M, D) -> (y (M, D), paths (M, K, L) or None when the implementation does not expose them)."""
        impl = impl or self._choose_impl(x)
        if impl == "sparse":
            try:
                from ..kernels.tree_train import tree_train
            except ImportError:
                impl = "reference"
            else:
                return tree_train(x, self.w_in, self.b_in, self.w_out, self.depth, self.activation, self.placement)
        if impl == "fused":
            if torch.is_grad_enabled() and (x.requires_grad or self.w_in.requires_grad):
                raise RuntimeError("the fused tree kernel is inference-only; use impl='sparse' under autograd")
            try:
                from ..kernels.tree_infer import tree_infer
            except ImportError:
                impl = "reference"
            else:
                return tree_infer(x, self.w_in, self.b_in, self.w_out, self.depth, self.activation, self.placement,
                                  return_paths=self.track_stats)
        paths = tree_paths(x, self.w_in, self.b_in, self.depth)
        y = tree_reference(x, self.w_in, self.b_in, self.w_out, self.depth, self.activation, self.placement, paths)
        return y, paths

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        shape = x.shape
        y, paths = self.forward_2d(x.reshape(-1, shape[-1]))
        aux: dict = {}
        if self.track_stats:
            if paths is None:
                paths = tree_paths(x.reshape(-1, shape[-1]), self.w_in, self.b_in, self.depth)
            aux["tree_visits"] = visit_counts(paths, self.num_nodes)
        return y.reshape(shape), aux


@torch.no_grad()
def visit_counts(paths: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """paths (M, K, L) -> visits per tree and node (K, N), int64."""
    M, K, L = paths.shape
    flat = paths + torch.arange(K, device=paths.device).view(1, K, 1) * n_nodes
    return torch.bincount(flat.reshape(-1), minlength=K * n_nodes).view(K, n_nodes)
