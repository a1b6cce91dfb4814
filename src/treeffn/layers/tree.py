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

Initialisation (UFB-23, generalised to W units per node; ``out_std`` replaces the output rule):

    =========  ===================================================================================
    parameter  distribution
    =========  ===================================================================================
    w_in  u    uniform(−1/√D, 1/√D)
    b_in  b    uniform(−1/√D, 1/√D)
    w_out v    uniform(−1/√(K·L·W), 1/√(K·L·W)), or normal(0, out_std) when ``out_std`` is given
    =========  ===================================================================================

UFB-23's output rule gives a standalone layer unit-scale outputs; inside a pre-norm transformer it makes each tree
layer add to the residual stream a random vector several times larger than the dense MLP's initial output (whose
projection starts at 0.02/√(2·n_layer), GPT-2's residual scaling; docs/quality.md gives the measured ratio). ``tree.init=residual`` (the default) gives the
tree's output vectors that same scale (out_std = 0.02/√(2·n_layer)); ``tree.init=ufb`` keeps UFB-23's rule.
docs/quality.md measures the difference.

Routing balance (``balance``; docs/quality.md has the evidence). Early in LM training the routing inputs — the
normed residual stream — point the same way for every token, so at every node all tokens land on the same side of
the hyperplane: within a few dozen steps each tree collapses onto one path and the subtrees it left stop receiving
gradient. ``"threshold"`` routes on the score's deviation from a per-node threshold instead of its sign::

    right  iff  s_kj > c_kj

In training c_kj is the mean of s_kj over the batch's tokens that reach node kj, set level by level (a node's
tokens depend on the thresholds above it), as batch normalisation uses batch statistics; every node then splits its
tokens around their mean, whatever direction they share. A running average of these batch means,
c ← c + max(r, 1/n)·(batch mean − c) with r = ``balance_rate`` and n the number of training batches seen (a plain
mean over the first 1/r batches, so a short run's thresholds are not biased towards their zero start), is kept in
a (K, N) buffer and used in evaluation and
decoding, where batches are small or a single token. Thresholds receive no gradient and move only the routing
decision (a node's output φ(λ) is unchanged), so every kernel takes them as one more (K, N) input; the buffer is
saved with the weights. The threshold of a node no training token reached keeps its previous value. Under DDP the
per-level statistics are summed over ranks, so routing is that of the global batch. ``"none"`` is the faithful
UFB-23 / DS-26 layer.

Routing rule (``route``). ``"self"`` (UFB-23, the default) routes on the node's own units as above, so a node's
units are both a feature and the hyperplane that splits its tokens. ``"children"`` routes each token to the child
whose units respond more::

    right  iff  Σ_w λ_k(2j+2)w − Σ_w λ_k(2j+1)w > c_kj        (c_kj = 0 without balance)

a hyperplane through the difference of the children's input vectors, so every decision is a local top-1 by
response, the way a top-k MLP chooses its units (docs/quality.md measures both rules). It reads both children's W·D
input weights per level instead of one (the fused kernel computes both responses and keeps the chosen one's; the
training kernel follows paths walked in PyTorch, where the batch thresholds are computed anyway); the accounting
above (``active_units``) counts the units whose outputs are used. Pruning and ``treeffn convert`` route on a node's
own units and refuse this setting.

Routing loss (``route_loss``, a weight; 0 = off). With ``route="self"`` a node's hyperplane is also its units'
feature, trained only by what its φ(λ) adds to the output, not by whether it sends tokens to the units below that
would serve them best. The routing loss adds that signal: for every visited node that routes, the target is the
child whose subtree holds the better path, a path's value being the magnitude of its contributions
Σ |φ(λ)|·‖v‖ (found by dynamic programming over every unit, :func:`treeffn.ops.tree.best_path_targets`), and the loss
is the mean binary cross-entropy of the decision's logit s − c against it, times the weight::

    L_route = weight · mean_{tokens, trees, levels < L−1} BCE(s_kj − c_kj, [V(2j+2) > V(2j+1)])

Its gradient reaches the nodes' input weights and biases only (not the residual stream, not the outputs); the
targets read every unit, a dense layer's input GEMM, in training only. Inference is unchanged. The agreement of the
decisions with these targets is logged as ``tree/best_agree`` (and by ``treeffn analyze``) for every tree, with or
without the loss; docs/quality.md measures the effect.

Straight-through routing gradient (``route_grad``, a weight; 0 = off; "node" placement). The hard decision gets no
gradient from the LM loss. With this option the backward pass gives each visited routing node the gradient a soft
decision p = σ(s − c) would receive, with the two children's own outputs h = Σ_w φ(λ)·v as the alternatives::

    ∂L/∂s_kj = weight · σ'(s_kj − c_kj) · ∂L/∂y · (h_k(2j+2) − h_k(2j+1))

into the node's input weights and bias (not into x); with ``route="children"``, where s is the children's difference,
into the two children's (+ right, − left). The forward pass, and so inference, is unchanged; in training the
backward pass computes every unit's response (a dense layer's GEMMs) for the children's outputs.

Depth 0 is a dense MLP of K·W units (every token visits every root): ``tests/test_model.py`` checks it.

Implementations (selected by ``impl``; ``"auto"`` picks the fastest available):

* ``"reference"`` — masked dense simulation below: computes every node, masks the unvisited ones. O(N) work.
* ``"sparse"`` — training path whose work scales with the K·L visited nodes (``treeffn.kernels.tree_train``).
* ``"fused"`` — inference kernel (``treeffn.kernels.tree_infer``), no autograd. In eval mode with autograd off and
  ``track_stats`` unset, ``forward`` goes straight to it (one C++ call, no Python reshapes or dispatch): the
  batch-1 decoding path, where the general path's Python cost more than the kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from ..config import Config
from ..errors import ConfigError
from ..kernels.tree_infer import extension, tree_infer
from ..kernels.tree_train import tree_train
from ..ops.activations import ACT_CODE, ACTIVATIONS
from ..ops.tree import (  # noqa: F401  (re-exported: the reference maths lives on the floor below)
    BALANCES,
    PLACEMENT_CODE,
    PLACEMENTS,
    ROUTE_CODE,
    ROUTES,
    batch_thresholds,
    best_path_targets,
    num_nodes,
    route_loss,
    route_straight_through,
    routing_diagnostics,
    routing_rows,
    routing_scores,
    tree_paths,
    tree_reference,
    visit_counts,
)
from .registry import FFNVariant, residual_std

IMPLS = ("auto", "reference", "sparse", "fused")
_FUSED_IMPLS = ("auto", "fused")  # the settings under which inference runs the fused kernel
# nn.Module's global hook registries (dicts changed in place): any hook in them sends a call down the general path
_GLOBAL_HOOKS = (_nn_module._global_forward_hooks, _nn_module._global_forward_pre_hooks,
                 _nn_module._global_backward_hooks, _nn_module._global_backward_pre_hooks)
INITS = ("residual", "ufb")
MAX_PARAMS = 2**31  # per layer: beyond this a config is a typo, not a model


@dataclass
class TreeConfig:
    NAME = "tree"
    trees: int = 4  # K
    depth: int = 6  # D: each tree has 2^(D+1) - 1 nodes, a token visits D + 1 of them
    node_width: int = 1  # W units per node
    activation: str = "gelu"
    placement: str = "node"  # node (UFB-23) | output (balanced, DS-26)
    bias: bool = True
    balance: str = "threshold"  # threshold (per-node routing thresholds, docs/quality.md) | none (UFB-23 as published)
    balance_rate: float = 0.1  # update rate of the thresholds towards the batch mean of each node's score
    init: str = "residual"  # output vectors: residual (GPT-2 residual-branch scale) | ufb (UFB-23's uniform rule)
    route: str = "self"  # what a node routes on: self (its own units, UFB-23) | children (which child responds more)
    route_loss: float = 0.0  # weight of the routing loss (nodes trained towards their better subtree); 0 = off
    route_grad: float = 0.0  # weight of the straight-through routing gradient from the LM loss; 0 = off

    def check(self) -> None:
        if self.trees < 1 or self.node_width < 1:
            raise ConfigError(f"tree.trees and tree.node_width must be positive (got {self.trees}, {self.node_width})")
        if self.depth < 0:
            raise ConfigError(f"tree.depth must be ≥ 0 (got {self.depth})")
        if self.balance not in BALANCES:
            raise ConfigError(f"tree.balance must be one of {', '.join(BALANCES)} (got '{self.balance}')")
        if not 0.0 < self.balance_rate <= 1.0:
            raise ConfigError(f"tree.balance_rate must be in (0, 1] (got {self.balance_rate})")
        if self.init not in INITS:
            raise ConfigError(f"tree.init must be one of {', '.join(INITS)} (got '{self.init}')")
        if self.route not in ROUTES:
            raise ConfigError(f"tree.route must be one of {', '.join(ROUTES)} (got '{self.route}')")
        check_route_training(self.route_loss, self.route_grad, self.route, self.placement)


def check_route_training(loss: float, grad: float, route: str, placement: str) -> None:
    """The routing loss trains the nodes' own routing scores; the straight-through routing gradient those of either
    routing rule, under the "node" placement."""
    for key, weight in (("route_loss", loss), ("route_grad", grad)):
        if not weight >= 0.0:
            raise ConfigError(f"tree.{key} must be ≥ 0 (got {weight})")
    if loss > 0.0 and route != "self":
        raise ConfigError(f"tree.route_loss trains the nodes' own routing scores; it needs tree.route=self "
                          f"(got '{route}')")
    if grad > 0.0 and placement != "node":
        raise ConfigError(f"tree.route_grad needs tree.placement=node (got '{placement}')")


def check_tree(d_model: int, trees: int, depth: int, node_width: int, activation: str, placement: str) -> None:
    """Raise ConfigError for a tree shape or setting no layer can have (shared by the tree and the pruned tree)."""
    if d_model < 1 or trees < 1 or node_width < 1:
        raise ConfigError(f"tree layer needs d_model, trees and node_width ≥ 1 (got {d_model}, {trees}, {node_width})")
    if not 0 <= depth <= 24:
        raise ConfigError(f"tree.depth must be between 0 and 24 (got {depth})")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown tree.activation '{activation}'; choose one of {', '.join(ACTIVATIONS)}")
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown tree.placement '{placement}'; choose one of {', '.join(PLACEMENTS)}")


@torch.no_grad()
def init_tree_weights(layer: nn.Module, out_std: float | None) -> None:
    """UFB-23's initialisation of ``layer.w_in``/``b_in``/``w_out`` (module docstring); ``out_std`` replaces the
    output rule by normal(0, out_std)."""
    a = 1.0 / math.sqrt(layer.d_model)
    layer.w_in.uniform_(-a, a)
    if layer.b_in is not None:
        layer.b_in.uniform_(-a, a)
    if out_std is not None:
        layer.w_out.normal_(0.0, out_std)
    else:
        c = 1.0 / math.sqrt(layer.trees * (layer.depth + 1) * layer.node_width)
        layer.w_out.uniform_(-c, c)


class TreeLayer(nn.Module):
    """What every tree feed-forward layer shares (the trained :class:`TreeFFN` and the pruned form): the shape
    (``d_model``, ``trees``, ``depth``, ``node_width``), the visited units, and ``paths(x)`` — the node each token
    visits per tree and level, in the original numbering (M, K, L), −1 after a walk ended. Analysis and pruning work
    on any ``TreeLayer``."""

    d_model: int
    trees: int
    depth: int
    node_width: int
    route: str = "self"  # the routing rule (TreeFFN's tree.route; a pruned layer routes on its nodes' own units)

    @property
    def num_nodes(self) -> int:
        """Nodes per (original) tree, N = 2^(depth+1) − 1."""
        return num_nodes(self.depth)

    def active_units(self) -> float:
        return float(self.trees * (self.depth + 1) * self.node_width)

    def input_units(self) -> float:
        """Units whose input vectors a token reads: the visited ones, and with ``route="children"`` also the
        sibling of every visited node below the root (both children are compared)."""
        extra = self.depth if self.route == "children" else 0
        return float(self.trees * (self.depth + 1 + extra) * self.node_width)

    def flops_per_token(self) -> float:
        """Inference multiply-adds ×2: input dots of :meth:`input_units`, outputs of the visited units (routing sums
        and φ are O(units), not counted)."""
        return 2.0 * (self.input_units() + self.active_units()) * self.d_model

    def weight_bytes_read(self, tokens: int) -> float:
        """Expected bytes of input and output vectors one call on ``tokens`` tokens reads, if routing is uniform
        (every node sends half its tokens each way, as routing thresholds make it): a node at level t is visited by
        at least one of the tokens with probability 1 − (1 − 2^−t)^tokens, and a visited node's W·D input and W·D
        output weights are read once per call (with ``route="children"`` a node's input weights are read whenever
        its parent is visited)."""
        def reached(t: int) -> float:  # nodes of level t that at least one token visits
            return 2 ** t * (1.0 - (1.0 - 2.0 ** -t) ** tokens)

        out_nodes = sum(reached(t) for t in range(self.depth + 1))
        in_nodes = out_nodes
        if self.route == "children":
            in_nodes = 1.0 + sum(2.0 * reached(t - 1) for t in range(1, self.depth + 1))
        elem = next(self.parameters()).element_size()
        return self.trees * (in_nodes + out_nodes) * self.node_width * self.d_model * elem

    def paths(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TreeFFN(TreeLayer):
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
        out_std: float | None = None,
        route: str = "self",
        route_loss: float = 0.0,
        route_grad: float = 0.0,
    ):
        super().__init__()
        check_tree(d_model, trees, depth, node_width, activation, placement)
        if impl not in IMPLS:
            raise ConfigError(f"unknown tree impl '{impl}'; choose one of {', '.join(IMPLS)}")
        if balance not in BALANCES:
            raise ConfigError(f"unknown tree.balance '{balance}'; choose one of {', '.join(BALANCES)}")
        if not 0.0 < balance_rate <= 1.0:
            raise ConfigError(f"tree.balance_rate must be in (0, 1] (got {balance_rate})")
        if route not in ROUTES:
            raise ConfigError(f"unknown tree.route '{route}'; choose one of {', '.join(ROUTES)}")
        check_route_training(route_loss, route_grad, route, placement)
        self.route, self.route_loss, self.route_grad = route, route_loss, route_grad
        self.d_model, self.trees, self.depth, self.node_width = d_model, trees, depth, node_width
        self.activation, self.placement, self.impl = activation, placement, impl
        self.balance, self.balance_rate = balance, balance_rate
        if out_std is not None and not out_std > 0:
            raise ConfigError(f"tree output init std must be positive (got {out_std})")
        self.out_std = out_std
        N = num_nodes(depth)
        self.w_in = nn.Parameter(torch.empty(trees, N, node_width, d_model))
        self.b_in = nn.Parameter(torch.empty(trees, N, node_width)) if bias else None
        self.w_out = nn.Parameter(torch.empty(trees, N, node_width, d_model))
        # Routing thresholds c (K, N), fp32 (see the module docstring); only with balance="threshold".
        self.register_buffer("route_threshold", torch.zeros(trees, N) if balance != "none" else None)
        self.register_buffer("route_batches", torch.zeros((), dtype=torch.float64) if balance != "none" else None)
        self.track_stats = False  # set by the trainer / analysis; visit counts come back in the aux dict
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_tree_weights(self, self.out_std)
        if self.route_threshold is not None:
            self.route_threshold.zero_()
            self.route_batches.zero_()

    # ---- accounting -------------------------------------------------------------------------------------------
    def total_units(self) -> int:
        return self.trees * self.num_nodes * self.node_width

    @torch.no_grad()
    def paths(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, D) -> visited node per token, tree and level (M, K, L), as routed in evaluation."""
        return tree_paths(x, self.w_in, self.b_in, self.depth, self.route_threshold, route=self.route)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, trees={self.trees}, depth={self.depth}, node_width={self.node_width}, "
                f"activation={self.activation}, placement={self.placement}, balance={self.balance}, route={self.route}, "
                f"route_loss={self.route_loss:g}, route_grad={self.route_grad:g}, impl={self.impl}")

    # ---- forward ----------------------------------------------------------------------------------------------
    def _choose_impl(self, x: torch.Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.w_in.requires_grad)
        return "sparse" if needs_grad else "fused"

    def forward_2d(self, x: torch.Tensor, impl: str | None = None, return_lam: bool = False,
                   thr: torch.Tensor | None = None, paths: torch.Tensor | None = None):
        """x (M, D) -> (y (M, D), paths (M, K, L) or None when the implementation does not expose them), and with
        ``return_lam`` the visited units' responses λ (M, K, L, W), detached (``"fused"`` cannot give them).
        ``thr`` overrides the stored routing thresholds (training uses the batch's own); ``paths``, the routing
        itself (``"sparse"`` and ``"reference"`` only)."""
        impl = impl or self._choose_impl(x)
        thr = self.route_threshold if thr is None else thr
        if impl == "sparse":
            if paths is None and self.route != "self":  # the training kernel routes on the nodes' own units only
                paths = tree_paths(x, self.w_in, self.b_in, self.depth, thr, route=self.route)
            return tree_train(x, self.w_in, self.b_in, self.w_out, self.depth, self.activation, self.placement,
                              thr=thr, return_lam=return_lam, paths=paths)
        if impl == "fused":
            if torch.is_grad_enabled() and (x.requires_grad or self.w_in.requires_grad):
                raise RuntimeError("the fused tree kernel is inference-only; use impl='sparse' under autograd")
            if return_lam:
                raise ValueError("the fused tree kernel does not return responses; use impl='sparse' or 'reference'")
            return tree_infer(x, self.w_in, self.b_in, self.w_out, self.depth, self.activation, self.placement,
                              return_paths=self.track_stats, thr=thr, route=self.route)
        if paths is None:
            paths = tree_paths(x, self.w_in, self.b_in, self.depth, thr, route=self.route)
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

    # ---- inference fast path ---------------------------------------------------------------------------------
    # In eval mode with autograd off and no hooks, a call is one call into the fused kernel, which takes x of any
    # shape (..., D) and checks shapes, devices and dtypes itself. At batch 1 the kernel takes a few microseconds, and
    # nn.Module.__call__ and the general forward below cost about as much again, most of it cache misses on this
    # module's own Python objects (its attribute, parameter and four hook dicts) when other layers have evicted
    # them. So the call's arguments are gathered once into one tuple (``_infer``), and ``__call__`` reads only that:
    # every change that could make it stale (an attribute or parameter set or deleted, train()/eval(), .to(), a hook
    # registered) drops it, and the next call builds it again.
    _infer: tuple | None = None

    def _infer_call(self) -> tuple | None:
        """(kernel function, its arguments after x) for the fast path, or None where the module must take
        nn.Module's path (training, statistics, another impl, hooks, a compiled call, no compiled extension)."""
        if (self.training or self.track_stats or self.impl not in _FUSED_IMPLS
                or self._compiled_call_impl is not None or self._forward_hooks or self._forward_pre_hooks
                or self._backward_hooks or self._backward_pre_hooks):
            return None
        p = self._parameters
        if p["w_in"].device.type != "cpu":  # the kernel is CPU-only: a GPU layer always takes the general path
            return None
        ext = extension()
        if ext is None:
            return None
        return (ext.try_infer, p["w_in"], p.get("b_in"), p["w_out"], self.depth, ACT_CODE[self.activation],
                PLACEMENT_CODE[self.placement], self._buffers["route_threshold"], ROUTE_CODE[self.route])

    def __call__(self, *args, **kwargs):
        f = self._infer
        if f is None:  # dropped, or the module is not eligible (training, say): check again
            f = self._infer_call()
            if f is not None:
                self.__dict__["_infer"] = f
        if (f is not None and len(args) == 1 and not kwargs and not torch.is_grad_enabled()
                and not (_GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1] or _GLOBAL_HOOKS[2] or _GLOBAL_HOOKS[3])
                and not torch._C._get_tracing_state()):
            y = f[0](args[0], *f[1:])  # None for tensors the kernel cannot run (a GPU, float16)
            if y is not None:
                return y, {}
        return super().__call__(*args, **kwargs)

    def _drop_infer(self) -> None:
        self.__dict__.pop("_infer", None)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        self._drop_infer()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        self._drop_infer()

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_infer", None)  # holds a function of the compiled extension, which does not pickle
        return state

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        replica._drop_infer()
        return replica

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        batch_stats = self.training and self.route_threshold is not None and torch.is_grad_enabled()
        need_lam = self.track_stats
        impl = self._choose_impl(x2)
        if need_lam and impl == "fused":  # the fused kernel returns no responses; the sparse path does, cheaply
            impl = "sparse"
        thr = given = None
        if batch_stats:
            # with route="children" the walk that sets the thresholds also gives the paths the kernel then follows
            thr, seen, *given = batch_thresholds(x2.detach(), self.w_in.detach(), None if self.b_in is None else
                                                 self.b_in.detach(), self.depth, self.route_threshold, self.route,
                                                 return_paths=self.route != "self")
            given = given[0] if given else None
            with torch.no_grad():  # running average for evaluation and decoding
                self.route_batches += 1
                rate = max(self.balance_rate, 1.0 / float(self.route_batches))
                c = self.route_threshold
                c[seen] += rate * (thr[seen] - c[seen])
        out = self.forward_2d(x2, impl=impl, return_lam=need_lam, thr=thr, paths=given)
        y, paths = out[0], out[1]
        aux: dict = {}
        if self.route_loss > 0.0 and self.training and torch.is_grad_enabled():
            if paths is None:
                paths = tree_paths(x2, self.w_in, self.b_in, self.depth, thr, route=self.route)
            target = best_path_targets(x2, self.w_in, self.b_in, self.w_out, self.depth, self.activation, paths,
                                       self.placement)
            aux["loss"] = self.route_loss * route_loss(self.w_in, self.b_in, x2, paths, thr, target)
        if self.route_grad > 0.0 and self.training and torch.is_grad_enabled():
            if paths is None:
                paths = tree_paths(x2, self.w_in, self.b_in, self.depth, thr, route=self.route)
            y = route_straight_through(y, self.w_in, self.b_in, self.w_out, x2, paths,
                                       thr if thr is not None else self.route_threshold, self.route_grad,
                                       self.activation, self.route)
        if self.track_stats:
            if paths is None:
                paths = tree_paths(x2, self.w_in, self.b_in, self.depth, self.route_threshold, route=self.route)
            aux["tree_visits"] = visit_counts(paths, self.num_nodes)
            scores = None
            if self.route != "self":  # the routing scores are not the visited units' sums: recompute them
                scores = routing_scores(x2.detach(), paths, *routing_rows(self.w_in, self.b_in, self.route))
            aux["tree_diag"] = routing_diagnostics(x2, out[2], thr if thr is not None else self.route_threshold,
                                                   paths, self.w_in, self.b_in, self.activation, scores=scores,
                                                   route=self.route, w_out=self.w_out, placement=self.placement)
        return y.reshape(shape), aux


def _dropping_infer(name: str):
    """nn.Module's method ``name``, first dropping the fast path's cached call (see TreeFFN.__call__)."""
    base = getattr(nn.Module, name)

    def method(self, *args, **kwargs):
        self._drop_infer()
        return base(self, *args, **kwargs)

    method.__name__, method.__qualname__, method.__doc__ = name, f"TreeFFN.{name}", base.__doc__
    return method


# What changes parameters, buffers or hooks without an attribute assignment: .to()/.half() (_apply), direct
# registration, and every kind of hook.
for _name in ("_apply", "register_parameter", "register_buffer", "register_forward_hook", "register_forward_pre_hook",
              "register_full_backward_hook", "register_full_backward_pre_hook", "register_backward_hook"):
    setattr(TreeFFN, _name, _dropping_infer(_name))


def _check(cfg: Config) -> None:
    t = cfg.tree
    params = 2 * t.trees * num_nodes(min(t.depth, 64)) * t.node_width * cfg.model.d_model
    if t.depth > 24 or params > MAX_PARAMS:
        raise ConfigError(f"tree {t.trees}x{t.depth} (node_width {t.node_width}) at d_model {cfg.model.d_model} needs "
                          f"{params:.3g} parameters per layer; lower tree.depth or tree.trees")


def _describe(cfg: Config) -> str:
    t = cfg.tree
    text = f"tree {t.trees}x{t.depth} w{t.node_width} {t.activation}/{t.placement}"
    if t.balance != "none":
        text += f" balance={t.balance}@{t.balance_rate:g}"
    if t.init != "residual":
        text += f" init={t.init}"
    if t.route != "self":
        text += f" route={t.route}"
    if t.route_loss > 0:
        text += f" route_loss={t.route_loss:g}"
    if t.route_grad > 0:
        text += f" route_grad={t.route_grad:g}"
    return text


def _build(cfg: Config) -> TreeFFN:
    t = cfg.tree
    return TreeFFN(cfg.model.d_model, t.trees, t.depth, t.node_width, t.activation, t.placement, t.bias,
                   balance=t.balance, balance_rate=t.balance_rate,
                   out_std=residual_std(cfg) if t.init == "residual" else None, route=t.route,
                   route_loss=t.route_loss, route_grad=t.route_grad)


TREE = FFNVariant("tree", build=_build, describe=_describe, section=TreeConfig, check=_check)
