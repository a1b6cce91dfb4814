"""Dense feed-forward blocks: the GELU MLP (GPT-2) and SwiGLU (Llama). Shapes: (..., D) -> (..., D), H hidden."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.activations import activation_fn


class DenseMLP(nn.Module):
    """y = W2 φ(W1 x + b1) + b2. With ``bias=False`` both biases are absent."""

    def __init__(self, d_model: int, hidden: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.fc_in = nn.Linear(d_model, hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, d_model, bias=bias)
        self.activation = activation
        self.phi = activation_fn(activation)
        self.d_model, self.hidden = d_model, hidden

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

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down
        self.d_model, self.hidden = d_model, hidden

    def total_units(self) -> int:
        return self.hidden

    def active_units(self) -> float:
        return float(self.hidden)

    def flops_per_token(self) -> float:
        return 2.0 * 3.0 * self.hidden * self.d_model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), {}
