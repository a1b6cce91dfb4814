"""Token-choice top-k mixture of experts (Switch / Mixtral form), and integrated Mixture-of-Depths-and-Experts.

Shapes: M tokens, D model width, E real experts, N no-op experts, k = top_k, H expert width.

router logits (M, E + N) -> softmax p; each token goes to its k most probable experts, weighted by p renormalised
over the chosen k (for k = 1 the weight is p itself, as in Switch, so the router is trained)::

    y = Σ_{e ∈ S, e < E} p̂_e · MLP_e(x)          S: the k chosen experts; a no-op expert contributes and costs nothing

No capacity limit: every token is processed by its experts (no drops). The load-balancing loss (Switch, eq. 4) is
``aux = (E + N) · Σ_e f_e · P_e`` with f_e the fraction of token-slots sent to e and P_e the mean router probability;
it is returned in the aux dict already multiplied by ``aux_weight``, never through globals.

``ffn.kind=moe`` has no no-op experts (N = 0). ``ffn.kind=mode`` is integrated MoDE (Raposo et al.,
"Mixture-of-Depths", arXiv 2404.02258 (2024), §3.6 / fig. 7): ``moe.noop_experts`` no-op experts sit among the MLP
experts, so one routing decision chooses both *which* expert and *whether* to compute. A token whose k choices are
all no-ops gets y = 0: the residual stream passes it through unchanged, i.e. it skips the MLP. In balance a fraction
N / (E + N) of the token-slots are no-ops; that sets the compute budget (``active_units`` and ``flops_per_token``
report the balanced expectation).

One expert with top-1 is exactly its MLP (p = 1): tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..errors import ConfigError
from ..kernels.small_linear import Linear
from .dense import DenseMLP, SwiGLU, init_linear
from .registry import INIT_STD, FFNVariant, residual_std

EXPERTS = ("dense", "swiglu")


@dataclass
class MoEConfig:
    NAME = "moe"
    experts: int = 8
    top_k: int = 2
    aux_weight: float = 0.01  # weight of the load-balancing loss (Switch form)
    expert: str = "dense"  # dense (GELU MLP) | swiglu
    noop_experts: int = 0  # ffn.kind=mode (integrated MoDE): no-op experts beside the real ones

    def check(self) -> None:
        if self.experts < 1:
            raise ConfigError(f"moe.experts must be positive (got {self.experts})")
        if self.noop_experts < 0:
            raise ConfigError(f"moe.noop_experts must be ≥ 0 (got {self.noop_experts})")
        if not 1 <= self.top_k <= self.experts:
            raise ConfigError(f"moe.top_k ({self.top_k}) must be between 1 and moe.experts ({self.experts})")
        if self.expert not in EXPERTS:
            raise ConfigError(f"moe.expert must be one of {', '.join(EXPERTS)} (got '{self.expert}')")


class MoE(nn.Module):
    may_skip_parameters = True  # an expert no token of a step chose gets no gradient (DDP must know)

    def __init__(self, d_model: int, hidden: int, experts: int, top_k: int, aux_weight: float = 0.01,
                 expert: str = "dense", activation: str = "gelu", bias: bool = False, noop_experts: int = 0,
                 init_std: float | None = None, out_std: float | None = None):
        super().__init__()
        self.router = Linear(d_model, experts + noop_experts, bias=False)
        make = (lambda: SwiGLU(d_model, hidden, init_std, out_std)) if expert == "swiglu" else (
            lambda: DenseMLP(d_model, hidden, activation, bias, init_std, out_std))
        self.experts = nn.ModuleList(make() for _ in range(experts))  # only the real ones hold parameters
        if init_std is not None:
            init_linear(self.router, init_std)
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
        y = None  # created from the first expert output so its dtype follows autocast
        flat_e = top_e.reshape(-1)  # (M·k,)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=self.n_choices)
        token_of_slot = order // self.top_k  # which token each sorted slot belongs to
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
            if self.n_noop:
                aux["mode_noop_frac"] = (counts[self.n_experts:].sum().float() / max(1, flat_e.numel())).detach()
        if y is None:  # every slot chose a no-op (or no tokens): the whole batch skips the MLP
            y = torch.zeros_like(x2)
        return y.reshape(shape), aux


def _build(cfg: Config, noop: int) -> MoE:
    m = cfg.moe
    return MoE(cfg.model.d_model, cfg.ffn.hidden, m.experts, m.top_k, m.aux_weight, m.expert, cfg.ffn.activation,
               cfg.model.bias, noop, INIT_STD, residual_std(cfg))


MOE = FFNVariant(
    "moe",
    build=lambda cfg: _build(cfg, 0),
    describe=lambda cfg: f"moe {cfg.moe.experts}e top-{cfg.moe.top_k} x{cfg.ffn.hidden}",
    section=MoEConfig,
)
MODE = FFNVariant(
    "mode",
    build=lambda cfg: _build(cfg, cfg.moe.noop_experts),
    describe=lambda cfg: (f"mode {cfg.moe.experts}e+{cfg.moe.noop_experts} no-op top-{cfg.moe.top_k} "
                          f"x{cfg.ffn.hidden}"),
    section=MoEConfig,
)
