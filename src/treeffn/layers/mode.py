"""Integrated Mixture-of-Depths-and-Experts (MoDE): an MoE whose router may also pick no-op experts.

Raposo et al., "Mixture-of-Depths", arXiv 2404.02258 (2024), §3.6 / fig. 7 "integrated MoDE": no-op experts sit
among the conventional MLP experts, so one routing decision chooses both *which* expert and *whether* to compute.

Shapes: M tokens, D model width, E real experts, N no-op experts, k = top_k, H expert width.

Token-choice top-k over E + N experts, as :class:`treeffn.layers.moe.MoE`::

    p      = softmax(router(x))                     (M, E + N)
    S      = the k most probable experts of x       weights p renormalised over S (k > 1) or p itself (k = 1)
    y      = Σ_{e ∈ S, e < E} p̂_e · MLP_e(x)        a no-op expert contributes nothing and costs nothing

A token whose k choices are all no-ops gets y = 0: the block's residual stream passes it through unchanged, i.e.
it skips the MLP. The Switch load-balancing loss ``(E + N) · Σ_e f_e · P_e`` runs over all E + N experts, so in
balance a fraction N / (E + N) of the token-slots are no-ops: that sets the compute budget
(``active_units`` and ``flops_per_token`` report the balanced expectation). ``noop_experts = 0`` is the plain MoE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dense import DenseMLP, SwiGLU


class MoDE(nn.Module):
    may_skip_parameters = True  # an expert no token of a step chose gets no gradient (DDP must know)

    def __init__(self, d_model: int, hidden: int, experts: int, noop_experts: int, top_k: int,
                 aux_weight: float = 0.01, expert: str = "dense", activation: str = "gelu", bias: bool = False):
        super().__init__()
        self.router = nn.Linear(d_model, experts + noop_experts, bias=False)
        make = (lambda: SwiGLU(d_model, hidden)) if expert == "swiglu" else (
            lambda: DenseMLP(d_model, hidden, activation, bias))
        self.experts = nn.ModuleList(make() for _ in range(experts))  # only the real ones hold parameters
        self.d_model, self.hidden, self.top_k = d_model, hidden, top_k
        self.n_experts, self.n_noop = experts, noop_experts
        self.aux_weight = aux_weight
        self.track_stats = False

    @property
    def n_choices(self) -> int:
        return self.n_experts + self.n_noop

    def _real_fraction(self) -> float:
        return self.n_experts / self.n_choices  # expected share of slots on real experts when balanced

    def total_units(self) -> int:
        return self.hidden * self.n_experts

    def active_units(self) -> float:
        return self.hidden * self.top_k * self._real_fraction()

    def flops_per_token(self) -> float:
        return (self.top_k * self._real_fraction() * self.experts[0].flops_per_token()
                + 2.0 * self.d_model * self.n_choices)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, noop_experts={self.n_noop}, top_k={self.top_k}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, D)
        probs = F.softmax(self.router(x2), dim=-1, dtype=torch.float32)  # (M, E + N)
        top_p, top_e = probs.topk(self.top_k, dim=-1)  # (M, k)
        if self.top_k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        y = None  # created from the first expert output so its dtype follows autocast (as MoE)
        flat_e = top_e.reshape(-1)  # (M·k,)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=self.n_choices)
        token_of_slot = order // self.top_k
        weight_of_slot = top_p.reshape(-1)[order]
        start = 0
        # sorted by expert id, so the no-op slots (ids ≥ E) come last and are simply never visited
        for e, n in enumerate(counts[: self.n_experts].tolist()):
            if n:
                tok = token_of_slot[start:start + n]
                out, _ = self.experts[e](x2.index_select(0, tok))
                if y is None:
                    y = out.new_zeros(x2.shape[0], out.shape[1])
                y.index_add_(0, tok, out * weight_of_slot[start:start + n, None].to(out.dtype))
            start += n
        aux: dict = {}
        if self.training or self.aux_weight:
            f = counts.to(torch.float32) / max(1, flat_e.numel())
            aux["loss"] = self.aux_weight * self.n_choices * (f * probs.mean(0)).sum()
        if self.track_stats:
            aux["moe_load"] = counts.detach()
            aux["mode_noop_frac"] = (counts[self.n_experts:].sum().float() / max(1, flat_e.numel())).detach()
        if y is None:  # every slot chose a no-op (or no tokens): the whole batch skips the MLP
            y = torch.zeros_like(x2)
        return y.reshape(shape), aux


def _build(cfg) -> nn.Module:
    m = cfg.moe
    return MoDE(cfg.model.d_model, cfg.ffn.hidden, m.experts, m.noop_experts, m.top_k, m.aux_weight, m.expert,
                cfg.ffn.activation, cfg.model.bias)


# imported at the end of treeffn/layers/__init__.py, after register_ffn exists
from . import register_ffn  # noqa: E402

register_ffn("mode")(_build)
