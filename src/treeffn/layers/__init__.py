"""Feed-forward variants and their registry.

A block asks ``build_ffn(cfg)`` for its feed-forward module and never branches on names. Every variant returns
``(y, aux)`` from ``forward`` — aux is a dict whose ``"loss"`` entry (if any) is an already-weighted auxiliary loss
and whose other entries are detached statistics — and reports ``total_units()``, ``active_units()`` (per token) and
``flops_per_token()`` (analytic, inference); a variant some of whose parameters can get no gradient in a step (an
expert no token chose) sets ``may_skip_parameters = True``. Register a new variant with ``@register_ffn("name")``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .dense import DenseMLP, SwiGLU
from .moe import MoE
from .topk import TopKMLP
from .tree import TreeFFN

FFN_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_ffn(name: str):
    def deco(builder: Callable[..., nn.Module]):
        FFN_REGISTRY[name] = builder
        return builder

    return deco


@register_ffn("dense")
def _dense(cfg) -> nn.Module:
    return DenseMLP(cfg.model.d_model, cfg.ffn.hidden, cfg.ffn.activation, cfg.model.bias)


@register_ffn("swiglu")
def _swiglu(cfg) -> nn.Module:
    return SwiGLU(cfg.model.d_model, cfg.ffn.hidden)


@register_ffn("topk")
def _topk(cfg) -> nn.Module:
    return TopKMLP(cfg.model.d_model, cfg.ffn.hidden, cfg.ffn.active, cfg.ffn.activation, cfg.model.bias)


@register_ffn("moe")
def _moe(cfg) -> nn.Module:
    m = cfg.moe
    return MoE(cfg.model.d_model, cfg.ffn.hidden, m.experts, m.top_k, m.aux_weight, m.expert, cfg.ffn.activation,
               cfg.model.bias)


@register_ffn("tree")
def _tree(cfg) -> nn.Module:
    t = cfg.tree
    out_std = 0.02 / (2 * cfg.model.n_layer) ** 0.5 if t.init == "residual" else None  # as GPT's projections
    return TreeFFN(cfg.model.d_model, t.trees, t.depth, t.node_width, t.activation, t.placement, t.bias,
                   balance=t.balance, balance_rate=t.balance_rate, out_std=out_std)


def build_ffn(cfg) -> nn.Module:
    return FFN_REGISTRY[cfg.ffn.kind](cfg)


from . import mode as _mode  # noqa: E402,F401  registers "mode" (integrated MoDE); needs register_ffn above
from . import pruned_tree as _pruned_tree  # noqa: E402,F401  registers "tree_pruned" (treeffn prune)


__all__ = ["FFN_REGISTRY", "register_ffn", "build_ffn", "DenseMLP", "SwiGLU", "MoE", "TopKMLP", "TreeFFN"]
