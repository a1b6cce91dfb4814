"""Top-k activation MLP: a dense GELU (or other φ) MLP that keeps, per token, only its k largest unit activations.

The trained-activation-sparsity baseline of the field ("lazy neuron" top-k FFNs; ProSparse-style training):
conditional sparsity learned end to end, with no routing structure. Shapes: (..., D) -> (..., D), H hidden units,
k kept per token::

    h = φ(W1 x + b1)            (H pre-activations: all of them are computed)
    y = W2 (h ⊙ m) + b2         m = 1 on the k largest entries of h, 0 elsewhere (a constant for the gradient)

It is a quality reference at equal *active* units (k), not a fast layer: finding the k largest needs every
pre-activation, so its inference cost is D·H multiply-adds for the input side plus D·k for the output side, and
``flops_per_token`` counts exactly that. With k = H it is the dense MLP (``tests/test_topk.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from ..errors import ConfigError
from .dense import DenseMLP
from .registry import INIT_STD, FFNVariant, residual_std


@dataclass
class TopKConfig:
    NAME = "topk"
    active: int = 32  # units kept per token (the k largest activations), of ffn.hidden

    def check(self) -> None:
        if self.active < 1:
            raise ConfigError(f"topk.active must be positive (got {self.active})")


class TopKMLP(DenseMLP):
    def __init__(self, d_model: int, hidden: int, k: int, activation: str = "gelu", bias: bool = True,
                 init_std: float | None = None, out_std: float | None = None):
        super().__init__(d_model, hidden, activation, bias, init_std, out_std)
        if not 1 <= k <= hidden:
            raise ConfigError(f"topk.active ({k}) must be between 1 and ffn.hidden ({hidden})")
        self.k = k

    def active_units(self) -> float:
        return float(self.k)

    def flops_per_token(self) -> float:
        return 2.0 * self.d_model * (self.hidden + self.k)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, hidden={self.hidden}, k={self.k}, activation={self.activation}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        h = self.phi(self.fc_in(x))
        if self.k < self.hidden:
            idx = h.detach().topk(self.k, dim=-1).indices  # (..., k)
            h = torch.zeros_like(h).scatter(-1, idx, h.gather(-1, idx))
        return self.fc_out(h), {}


def _check(cfg: Config) -> None:
    if cfg.topk.active > cfg.ffn.hidden:
        raise ConfigError(f"topk.active ({cfg.topk.active}) must be between 1 and ffn.hidden ({cfg.ffn.hidden})")


TOPK = FFNVariant(
    "topk",
    build=lambda cfg: TopKMLP(cfg.model.d_model, cfg.ffn.hidden, cfg.topk.active, cfg.ffn.activation,
                              cfg.model.bias, INIT_STD, residual_std(cfg)),
    describe=lambda cfg: f"topk {cfg.topk.active} of {cfg.ffn.hidden}",
    section=TopKConfig,
    check=_check,
)
