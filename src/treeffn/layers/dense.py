"""Dense feed-forward blocks: the GELU MLP (GPT-2) and SwiGLU (Llama). Shapes: (..., D) -> (..., D), H hidden.

Initialisation: given ``init_std``, weights are normal(0, init_std) and biases zero, except the output projection,
normal(0, out_std) (GPT-2 scales the projections into the residual stream by 1/√(2·n_layer)); without it PyTorch's
default ``nn.Linear`` initialisation (a standalone layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.small_linear import Linear
from ..ops.activations import activation_fn
from .registry import INIT_STD, FFNVariant, residual_std


@torch.no_grad()
def init_linear(layer: nn.Linear, std: float) -> None:
    nn.init.normal_(layer.weight, 0.0, std)
    if layer.bias is not None:
        layer.bias.zero_()


class DenseMLP(nn.Module):
    """y = W2 φ(W1 x + b1) + b2. With ``bias=False`` both biases are absent."""

    def __init__(self, d_model: int, hidden: int, activation: str = "gelu", bias: bool = True,
                 init_std: float | None = None, out_std: float | None = None):
        super().__init__()
        self.fc_in = Linear(d_model, hidden, bias=bias)
        self.fc_out = Linear(hidden, d_model, bias=bias)
        self.activation = activation
        self.phi = activation_fn(activation)
        self.d_model, self.hidden = d_model, hidden
        if init_std is not None:
            init_linear(self.fc_in, init_std)
            init_linear(self.fc_out, out_std or init_std)

    def total_units(self) -> int:
        return self.hidden

    def active_units(self) -> float:
        return float(self.hidden)

    def flops_per_token(self) -> float:
        return 2.0 * 2.0 * self.hidden * self.d_model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.fc_out(self.phi(self.fc_in(x))), {}


class SwiGLU(nn.Module):
    """y = W2 (silu(W1 x) ⊙ W3 x), no biases (Llama)."""

    def __init__(self, d_model: int, hidden: int, init_std: float | None = None, out_std: float | None = None):
        super().__init__()
        self.w1 = Linear(d_model, hidden, bias=False)  # gate
        self.w3 = Linear(d_model, hidden, bias=False)  # up
        self.w2 = Linear(hidden, d_model, bias=False)  # down
        self.d_model, self.hidden = d_model, hidden
        if init_std is not None:
            init_linear(self.w1, init_std)
            init_linear(self.w3, init_std)
            init_linear(self.w2, out_std or init_std)

    def total_units(self) -> int:
        return self.hidden

    def active_units(self) -> float:
        return float(self.hidden)

    def flops_per_token(self) -> float:
        return 2.0 * 3.0 * self.hidden * self.d_model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), {}


DENSE = FFNVariant(
    "dense",
    build=lambda cfg: DenseMLP(cfg.model.d_model, cfg.ffn.hidden, cfg.ffn.activation, cfg.model.bias, INIT_STD,
                               residual_std(cfg)),
    describe=lambda cfg: f"dense {cfg.ffn.hidden}",
)
SWIGLU = FFNVariant(
    "swiglu",
    build=lambda cfg: SwiGLU(cfg.model.d_model, cfg.ffn.hidden, INIT_STD, residual_std(cfg)),
    describe=lambda cfg: f"swiglu {cfg.ffn.hidden}",
)
