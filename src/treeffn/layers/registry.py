"""The registry of feed-forward variants: what a variant declares, and the lookups the rest of the package uses.

A variant is one file in ``treeffn/layers/`` that defines an :class:`FFNVariant` and one line in
``treeffn/layers/__init__.py`` that registers it. The variant declares everything the package needs to know about
it, so nothing outside its file names it:

* ``build(cfg)`` — the module for one block. Modules initialise their own weights (``init_std`` for input-side
  weights, :func:`residual_std` for the projections that write into the residual stream, as GPT-2) and implement
  ``forward(x) -> (y, aux)``, ``total_units()``, ``active_units()`` and ``flops_per_token()``; a module some of whose
  parameters can get no gradient in a step (an expert no token chose) sets ``may_skip_parameters = True`` (DDP reads
  it); a module with routing statistics has a ``track_stats`` flag and returns them in ``aux``.
* ``section`` — an optional settings dataclass with a ``NAME`` class attribute (``tree`` → ``tree.depth`` …) and a
  ``check()`` method for its own values; it becomes a section of :class:`treeffn.config.Config`, saved in every
  checkpoint's config.json. Variants may share a section (``moe`` and ``mode``).
* ``check(cfg)`` — validation across sections when this kind is chosen (e.g. k ≤ ffn.hidden).
* ``describe(cfg)`` — the short text in ``Config.describe()`` ("tree 4x7 w1 gelu/node").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import Config, register_section, register_variant_hooks
from ..errors import ConfigError

INIT_STD = 0.02  # GPT-2's initialisation of input-side weights


@dataclass(frozen=True)
class FFNVariant:
    name: str  # the ffn.kind value
    build: Callable[[Config], nn.Module]
    describe: Callable[[Config], str]
    section: type | None = None  # settings dataclass (NAME class attribute, check() method)
    check: Callable[[Config], None] | None = None  # validation across sections when this kind is chosen


VARIANTS: dict[str, FFNVariant] = {}


def register(variant: FFNVariant) -> FFNVariant:
    if variant.name in VARIANTS and VARIANTS[variant.name] is not variant:
        raise ValueError(f"feed-forward variant '{variant.name}' is registered twice")
    VARIANTS[variant.name] = variant
    if variant.section is not None:
        register_section(variant.section)
    return variant


def get_variant(kind: str) -> FFNVariant:
    if kind not in VARIANTS:
        raise ConfigError(f"unknown ffn.kind '{kind}'; choose one of {', '.join(sorted(VARIANTS))}")
    return VARIANTS[kind]


def build_ffn(cfg: Config) -> nn.Module:
    return get_variant(cfg.ffn.kind).build(cfg)


def residual_std(cfg: Config) -> float:
    """Initial std of a projection that writes into the residual stream: 0.02/√(2·n_layer) (GPT-2)."""
    return INIT_STD / (2 * cfg.model.n_layer) ** 0.5


def units(cfg: Config) -> tuple[int, float]:
    """(total, active per token) feed-forward units of one block of ``cfg``, from a parameter-free (meta) build."""
    with torch.device("meta"):
        f = build_ffn(cfg)
    return f.total_units(), f.active_units()


def dense_twin(cfg: Config, width: str = "training") -> Config:
    """``cfg`` with a dense GELU MLP as wide as its feed-forward block's total units (``"training"``: equal
    parameters) or its active units per token (``"inference"``: equal inference cost)."""
    if width not in ("training", "inference"):
        raise ValueError(f"width must be training or inference (got {width!r})")
    total, active = units(cfg)
    hidden = total if width == "training" else round(active)
    return cfg.copy().apply({"ffn.kind": "dense", "ffn.hidden": hidden})


def _check_kind(cfg: Config) -> None:
    v = get_variant(cfg.ffn.kind)
    if v.check is not None:
        v.check(cfg)


register_variant_hooks(check=_check_kind, describe=lambda cfg: get_variant(cfg.ffn.kind).describe(cfg))
