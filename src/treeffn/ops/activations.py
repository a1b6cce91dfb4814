"""Node nonlinearities φ for tree layers, by name.

``gelu`` (UFB-23) and ``relu`` are asymmetric: φ'(λ) ≈ 0 for λ ≪ 0, which drives auto-pruning (DS-26).
``tanh`` and ``identity`` are odd (symmetric about 0): a token below zero keeps pushing on its node, the ablation
that shows the asymmetry is the cause.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError

ACTIVATIONS = ("gelu", "relu", "tanh", "silu", "identity")
ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}  # the codes of kernels/csrc/*.cpp


def activation_fn(name: str):
    """φ as a function of a tensor."""
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    if name == "tanh":
        return torch.tanh
    if name == "silu":
        return F.silu
    if name == "identity":
        return lambda t: t
    raise ConfigError(f"unknown activation '{name}'; choose one of {', '.join(ACTIVATIONS)}")


def activation_grad(name: str, z: torch.Tensor) -> torch.Tensor:
    """φ'(z), elementwise, for hand-written backward passes."""
    if name == "gelu":  # exact (erf) GELU, as F.gelu
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + z * pdf
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "tanh":
        t = torch.tanh(z)
        return 1.0 - t * t
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if name == "identity":
        return torch.ones_like(z)
    raise ConfigError(f"unknown activation '{name}'; choose one of {', '.join(ACTIVATIONS)}")
