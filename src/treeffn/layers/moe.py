"""Token-choice top-k mixture of experts (Switch / Mixtral form).

Shapes: M tokens, D model width, E experts, k = top_k, H expert width.

router logits (M, E) -> softmax p; each token goes to its k most probable experts, weighted by p renormalised over
the chosen k (for k = 1 the weight is p itself, as in Switch, so the router is trained). No capacity limit: every
token is processed by its experts (no drops). The load-balancing loss (Switch, eq. 4) is
``aux = E · Σ_e f_e · P_e`` with f_e the fraction of token-slots sent to e and P_e the mean router probability; it
is returned in the aux dict already multiplied by ``aux_weight``, never through globals.

One expert with top-1 is exactly its MLP (p = 1): tested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dense import DenseMLP, SwiGLU


class MoE(nn.Module):
    may_skip_parameters = True  # an expert no token of a step chose gets no gradient (DDP must know)

    def __init__(self, d_model: int, hidden: int, experts: int, top_k: int, aux_weight: float = 0.01,
                 expert: str = "dense", activation: str = "gelu", bias: bool = False):
        super().__init__()
        self.router = nn.Linear(d_model, experts, bias=False)
        make = (lambda: SwiGLU(d_model, hidden)) if expert == "swiglu" else (
            lambda: DenseMLP(d_model, hidden, activation, bias))
        self.experts = nn.ModuleList(make() for _ in range(experts))
        self.d_model, self.hidden, self.n_experts, self.top_k = d_model, hidden, experts, top_k
        self.aux_weight = aux_weight
        self.track_stats = False

    def total_units(self) -> int:
        return self.hidden * self.n_experts

    def active_units(self) -> float:
        return float(self.hidden * self.top_k)

    def flops_per_token(self) -> float:
        return self.top_k * self.experts[0].flops_per_token() + 2.0 * self.d_model * self.n_experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, D)
        logits = self.router(x2)  # (M, E)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_p, top_e = probs.topk(self.top_k, dim=-1)  # (M, k)
        if self.top_k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        y = None  # created from the first expert output so its dtype follows autocast
        flat_e = top_e.reshape(-1)  # (M·k,)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=self.n_experts)
        token_of_slot = order // self.top_k  # which token each sorted slot belongs to
        weight_of_slot = top_p.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            tok = token_of_slot[start:start + n]
            out, _ = self.experts[e](x2.index_select(0, tok))
            if y is None:
                y = out.new_zeros(x2.shape[0], out.shape[1])
            y.index_add_(0, tok, out * weight_of_slot[start:start + n, None].to(out.dtype))
            start += n
        aux = {}
        if self.training or self.aux_weight:
            f = counts.to(torch.float32) / max(1, flat_e.numel())
            P = probs.mean(0)
            aux["loss"] = self.aux_weight * self.n_experts * (f * P).sum()
        if self.track_stats:
            aux["moe_load"] = counts.detach()
        if y is None:  # no tokens at all
            y = torch.zeros_like(x2)
        return y.reshape(shape), aux
