"""Feed-forward variants and their registry (:mod:`treeffn.layers.registry` says what a variant declares).

A block asks ``build_ffn(cfg)`` for its feed-forward module and never branches on names. Adding a variant is one
file in this folder that defines an :class:`FFNVariant` and one line below that registers it.
"""

from __future__ import annotations

from . import dense, moe, pruned_tree, sparse_mlp, topk, tree
from .dense import DenseMLP, SwiGLU
from .moe import MoE
from .pruned_tree import PrunedTreeFFN
from .registry import VARIANTS, FFNVariant, build_ffn, dense_twin, get_variant, register, units
from .topk import TopKMLP
from .tree import TreeFFN, TreeLayer

register(dense.DENSE)
register(dense.SWIGLU)
register(topk.TOPK)
register(moe.MOE)
register(moe.MODE)
register(tree.TREE)
register(pruned_tree.TREE_PRUNED)
register(sparse_mlp.SPARSE)

__all__ = ["VARIANTS", "FFNVariant", "build_ffn", "dense_twin", "get_variant", "register", "units", "DenseMLP",
           "SwiGLU", "MoE", "TopKMLP", "TreeFFN", "TreeLayer", "PrunedTreeFFN"]
