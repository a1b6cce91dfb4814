"""Training-free activation sparsity of a dense MLP: a SwiGLU (Llama) or GELU MLP whose small activations are zeroed.

``ffn.kind=sparse`` is the MLP named by ``sparsity.mlp`` (``swiglu``: y = W2 (silu(W1 x) ⊙ W3 x); ``dense``:
y = W2 φ(W1 x + b1) + b2) with the same weights and one of three published rules deciding, per token, which hidden
units (and which input coordinates) take part. ``sparsity.active`` = F is the fraction of the H hidden units — the
inputs of W2 — kept per token on average; ``treeffn sparsify`` (:mod:`treeffn.sparsify`) calibrates the
thresholds on corpus text so that the fraction is F. Notation: x (D) the MLP input, g = silu(W1 x) (SwiGLU gate) or
φ(W1 x + b1) (dense), h = g ⊙ W3 x (SwiGLU) or g (dense) the input of W2.

* ``teal`` — TEAL (Liu, Ponnusamy, Cai, Guo, Kim, Athiwaratkun, "Training-Free Activation Sparsity in Large
  Language Models", arXiv 2408.14690, 2024): magnitude thresholding of the hidden state entering each weight
  matrix, x̃ = x ⊙ [|x| > t_in] for W1 (and W3, which reads the same x), h̃ = h ⊙ [|h| > t_mid] for W2, with h
  computed from x̃. One threshold per matrix input and layer, each the (1 − F) quantile of that input's magnitudes
  on calibration text, so both x and h keep a fraction F (TEAL's *uniform* allocation: one sparsity level for every
  matrix; the paper's greedy per-block reallocation is not done here). The active fraction reported is that of h
  (W2's input units), the one that names hidden units; x's kept fraction is calibrated to the same F.
* ``cats`` — CATS (Lee, Lee, Hwang, Hwang, Schlag, Chang, "CATS: Contextually-Aware Thresholding for Sparsity in
  Large Language Models", arXiv 2404.08763, 2024): the gate activation g is computed in full and units with
  |g_j| ≤ t are zeroed; t per layer is the (1 − F) quantile of |g| on calibration text. W3's rows and W2's columns of
  zeroed units need not be computed. For a dense MLP g = h (the rule is then activation thresholding of h).
* ``wina`` — WINA (Chen, Zhao, Ko, Banbury, Zhuang, Liang, Cameron, Chen, "WINA: Weight Informed Neuron Activation
  for Accelerating Large Language Model Inference", arXiv 2505.19427, 2025): input coordinate i of a weight matrix
  W is scored |x_i|·‖W[:, i]‖₂ and each token keeps its top K = round(F·n) coordinates (top-K per token, as the
  paper's gate; no threshold to calibrate, the fraction is exact). For x the column norms are those of the stacked
  [W1; W3] (one mask for the two matrices that read x: that mask minimises the output error bound of both
  together); for h those of W2. The paper's optional orthogonalising transformation of the weights (SVD plus
  computational invariance through the residual stream) is not applied: the model's weights are kept as they are.

Thresholds are buffers (``threshold_in``, ``threshold_mid``; WINA: the column norms ``norm_in``, ``norm_mid``),
saved with the weights, so each layer has its own values while the module is built from the config alone. A value
is kept when its magnitude (score) is strictly above the threshold. With F = 1 the module is the dense MLP exactly
(the masking is skipped).

Cost (``flops_per_token``, 2 per multiply-add, selection and comparisons not counted): TEAL and WINA compute every
matrix on a fraction F of its input coordinates, F times the dense cost; CATS computes W1 in full and W3 and W2 for
the kept units only, 2·D·H·(1 + 2F) for SwiGLU and 2·D·H·(1 + F) for a dense MLP.

Paths: with autograd recording, or more than ``GATHER_MAX_TOKENS`` tokens, the forward is the masked dense reference
(every product computed, the dropped ones zeroed). Without autograd (generation, evaluation) and at most that many
tokens, a CPU fp32 call goes to the gathered sparse GEMV kernel (:mod:`treeffn.kernels.sparse_mlp`), which reads only
the kept rows of transposed copies of the weights, built on the first such call and rebuilt when the weights
change; that is where the sparsity turns into speed (``treeffn bench sparse-mlp``).
:meth:`SparsityMixin.forward_gathered` is a second reference of the gathered computation (``index_select``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..errors import ConfigError
from ..kernels.sparse_mlp import sparse_gemv, tables
from ..memory import huge_page_copy, on_huge_pages
from .dense import DenseMLP, SwiGLU
from .registry import INIT_STD, FFNVariant, residual_std

METHODS = ("teal", "cats", "wina")
MLPS = ("swiglu", "dense")
_MAX_QUANTILE_VALUES = 1 << 24  # magnitudes a threshold is estimated from (a fixed random subset above this)
# Tokens per call up to which the gathered kernel runs: each token reads its own rows, so beyond a few tokens the
# masked dense product, which reads every weight once for the whole batch, is faster (`treeffn bench sparse-mlp`).
GATHER_MAX_TOKENS = 1


@dataclass
class SparsityConfig:
    NAME = "sparsity"
    mlp: str = "swiglu"  # the MLP made sparse: swiglu | dense (GELU or ffn.activation, biases per model.bias)
    method: str = "teal"  # teal | cats | wina
    active: float = 0.5  # fraction F of the hidden units kept per token on average, in (0, 1]

    def check(self) -> None:
        if self.mlp not in MLPS:
            raise ConfigError(f"sparsity.mlp must be one of {', '.join(MLPS)} (got '{self.mlp}')")
        if self.method not in METHODS:
            raise ConfigError(f"sparsity.method must be one of {', '.join(METHODS)} (got '{self.method}')")
        if not 0.0 < self.active <= 1.0:
            raise ConfigError(f"sparsity.active must be in (0, 1] (got {self.active})")


def magnitude_quantile(values: torch.Tensor, keep: float, seed: int = 0) -> float:
    """The threshold t with a fraction ``keep`` of |values| strictly above it (exact order statistic; a fixed random
    subset of 2^24 values when there are more)."""
    v = values.detach().reshape(-1).abs().float()
    if v.numel() > _MAX_QUANTILE_VALUES:
        g = torch.Generator(device=v.device).manual_seed(seed)
        v = v[torch.randint(0, v.numel(), (_MAX_QUANTILE_VALUES,), generator=g, device=v.device)]
    k = round((1.0 - keep) * v.numel())  # values at or below t
    if k <= 0:
        return 0.0
    return float(v.kthvalue(k).values)


def _version(t: torch.Tensor) -> int:
    """The in-place version counter of t; -1 for inference tensors, which have none (and cannot be modified in
    place outside inference mode, so their storage address identifies their contents)."""
    return -1 if t.is_inference() else t._version


def _top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    idx = score.topk(k, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)


class SparsityMixin:
    """The masking shared by both MLPs; the MLP class supplies ``_intermediate``, ``_project`` and the weights."""

    def _init_sparsity(self, method: str, active: float, n_in: int, n_mid: int) -> None:
        if method not in METHODS:
            raise ConfigError(f"sparsity.method must be one of {', '.join(METHODS)} (got '{method}')")
        if not 0.0 < active <= 1.0:
            raise ConfigError(f"sparsity.active must be in (0, 1] (got {active})")
        self.method, self.active = method, float(active)
        self.k_in, self.k_mid = max(1, round(active * n_in)), max(1, round(active * n_mid))
        if method == "teal":
            self.register_buffer("threshold_in", torch.zeros(()))
        if method in ("teal", "cats"):
            self.register_buffer("threshold_mid", torch.zeros(()))
        if method == "wina":
            self.register_buffer("norm_in", torch.zeros(n_in))
            self.register_buffer("norm_mid", torch.zeros(n_mid))
            if not self._in_weights()[0].is_meta:
                self.refresh_norms()

    # ---- what the MLP class provides ------------------------------------------------------------------------
    def _in_weights(self) -> list[torch.Tensor]:  # matrices reading x, (H, D) each; the gate first
        raise NotImplementedError

    def _out_weight(self) -> torch.Tensor:  # W2 (D, H)
        raise NotImplementedError

    def _intermediate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (h, g)
        raise NotImplementedError

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- the rule -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_norms(self) -> None:
        """WINA's column norms from the current weights (call after changing them)."""
        self.__dict__.pop("_gemv_cache", None)
        w_in = torch.cat([w.detach().float() for w in self._in_weights()], 0)  # (n·H, D)
        self.norm_in.copy_(w_in.norm(dim=0))
        self.norm_mid.copy_(self._out_weight().detach().float().norm(dim=0))

    def input_keep(self, x: torch.Tensor) -> torch.Tensor | None:
        """Which input coordinates reach W1 (and W3): a bool mask like x, or None for all."""
        if self.method == "teal":
            return x.abs() > self.threshold_in
        if self.method == "wina":
            return _top_k_mask(x.abs() * self.norm_in.to(x.dtype), self.k_in)
        return None

    def mid_keep(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Which hidden units reach W2: a bool mask like h."""
        if self.method == "teal":
            return h.abs() > self.threshold_mid
        if self.method == "cats":
            return g.abs() > self.threshold_mid
        return _top_k_mask(h.abs() * self.norm_mid.to(h.dtype), self.k_mid)

    def sparse_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(h̃, input mask, unit mask): W2's input with the dropped units zeroed, and the masks that made it."""
        keep_in = self.input_keep(x)
        h, g = self._intermediate(x if keep_in is None else x.masked_fill(~keep_in, 0))
        keep = self.mid_keep(h, g)
        return h.masked_fill(~keep, 0), keep_in, keep

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._project(self._intermediate(x)[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.active >= 1.0:
            return self.dense_forward(x), {}
        if not torch.is_grad_enabled() and x.numel() <= GATHER_MAX_TOKENS * self.d_model:
            y = self.forward_kernel(x)
            if y is not None:
                return y, {}
        return self._project(self.sparse_hidden(x)[0]), {}

    def forward_kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        """The gathered sparse GEMV kernel on x (..., D), or None where it does not apply (not CPU fp32, or the
        extension unavailable). Inference only: no gradient flows through it."""
        if not x.is_cpu or x.dtype != torch.float32:
            return None
        t = self._kernel_tables()
        return sparse_gemv(x, self.method, t["w_in"], t["w_out_t"], t["b_in"], t["b_out"], len(self._in_weights()),
                           getattr(self, "activation", "silu"), t["t_in"], t["t_mid"], t["norm_in"], t["norm_mid"],
                           self.k_in, self.k_mid)

    def _kernel_tables(self) -> dict:
        """The kernel's weight tables and scalars, rebuilt when a weight or threshold has changed: replaced, changed
        in place (version counter), or recalibrated. Inference tensors have no version counter: after changing one
        in place inside ``torch.inference_mode()``, call :meth:`calibrate` or :meth:`refresh_norms`."""
        watched = [*self.parameters(), *self.buffers()]
        key = tuple((t.data_ptr(), _version(t)) for t in watched)
        cached = self.__dict__.get("_gemv_cache")
        if cached is None or cached[0] != key:
            w_in, w_out_t = tables(self.method, self._in_weights(), self._out_weight())
            if on_huge_pages(self._out_weight()):  # the tables follow the weights' placement (treeffn.memory)
                w_in, w_out_t = huge_page_copy(w_in), huge_page_copy(w_out_t)
            b_in, b_out = self._biases_or_none()
            value = {"w_in": w_in, "w_out_t": w_out_t,
                     "b_in": None if b_in is None else b_in.detach().float().contiguous(),
                     "b_out": None if b_out is None else b_out.detach().float().contiguous(),
                     "t_in": float(self.threshold_in) if hasattr(self, "threshold_in") else 0.0,
                     "t_mid": float(self.threshold_mid) if hasattr(self, "threshold_mid") else 0.0,
                     "norm_in": self.norm_in.float().contiguous() if self.method == "wina" else None,
                     "norm_mid": self.norm_mid.float().contiguous() if self.method == "wina" else None}
            self.__dict__["_gemv_cache"] = cached = (key, value)
        return cached[1]

    def _biases_or_none(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # (b1, b2)
        return None, None

    # ---- calibration and measurement -------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, seed: int = 0) -> dict:
        """Set this layer's thresholds from its inputs x (M, D) so a fraction ``active`` is kept; returns them."""
        self.__dict__.pop("_gemv_cache", None)
        x = x.reshape(-1, x.shape[-1])
        if self.method == "wina":
            self.refresh_norms()
            return {}
        if self.active >= 1.0:
            return {}
        if self.method == "teal":
            self.threshold_in.fill_(magnitude_quantile(x, self.active, seed))
            x = x.masked_fill(~self.input_keep(x), 0)
        h, g = self._intermediate(x)
        self.threshold_mid.fill_(magnitude_quantile(g if self.method == "cats" else h, self.active, seed + 1))
        return {k: float(getattr(self, k)) for k in ("threshold_in", "threshold_mid") if hasattr(self, k)}

    @torch.no_grad()
    def kept_counts(self, x: torch.Tensor) -> tuple[float, float, int]:
        """(input coordinates kept, hidden units kept, tokens) summed over the tokens of x."""
        x = x.reshape(-1, x.shape[-1])
        if self.active >= 1.0:
            return float(x.numel()), float(x.shape[0] * self.hidden), x.shape[0]
        _, keep_in, keep = self.sparse_hidden(x)
        n_in = float(x.numel()) if keep_in is None else float(keep_in.sum())
        return n_in, float(keep.sum()), x.shape[0]

    # ---- accounting ----------------------------------------------------------------------------------------
    def active_units(self) -> float:
        return self.active * self.hidden

    def flops_per_token(self) -> float:
        n_in = len(self._in_weights())
        f, dh = self.active, 2.0 * self.d_model * self.hidden
        if self.method == "cats":  # the gate in full; the other input matrices and W2 for kept units only
            return dh * (1.0 + f * (n_in - 1) + f)
        return dh * f * (n_in + 1)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, hidden={self.hidden}, method={self.method}, active={self.active:g}"

    # ---- one token: read only the kept columns and rows -----------------------------------------------------
    @torch.no_grad()
    def forward_gathered(self, x: torch.Tensor) -> torch.Tensor:
        """One token x (D,) -> y (D,) reading only the weights the rule keeps: the kept input columns of W1/W3
        (TEAL, WINA) or the kept rows of W3 (CATS), and the kept columns of W2 (``index_select``). Equal to the
        masked forward up to the order of summation; a reference for a sparse GEMV kernel, not itself faster."""
        keep_in = self.input_keep(x)
        cols = None if keep_in is None else keep_in.nonzero().squeeze(-1)
        xs = x if cols is None else x.index_select(0, cols)
        g = self._gate_from(xs, cols)  # every unit's gate: W1 is read in full (on the kept columns)
        if self.method == "cats":
            units = (g.abs() > self.threshold_mid).nonzero().squeeze(-1)
            h = self._hidden_from(g, xs, cols, units)
        else:
            h = self._hidden_from(g, xs, cols, None)
            units = self.mid_keep(h, g).nonzero().squeeze(-1)
            h = h.index_select(0, units)
        return self._project_units(h, units)

    @staticmethod
    def _read(w: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
        w = w if rows is None else w.index_select(0, rows)
        return w if cols is None else w.index_select(1, cols)


class SparseSwiGLU(SparsityMixin, SwiGLU):
    def __init__(self, d_model: int, hidden: int, method: str, active: float, init_std: float | None = None,
                 out_std: float | None = None):
        SwiGLU.__init__(self, d_model, hidden, init_std, out_std)
        self._init_sparsity(method, active, d_model, hidden)

    def _in_weights(self):
        return [self.w1.weight, self.w3.weight]

    def _out_weight(self):
        return self.w2.weight

    def _intermediate(self, x):
        g = F.silu(self.w1(x))
        return g * self.w3(x), g

    def _project(self, h):
        return self.w2(h)

    def _gate_from(self, xs, cols):
        return F.silu(self._read(self.w1.weight, None, cols) @ xs)

    def _hidden_from(self, g, xs, cols, units):
        return (g if units is None else g.index_select(0, units)) * (self._read(self.w3.weight, units, cols) @ xs)

    def _project_units(self, h, units):
        return self._read(self.w2.weight, None, units) @ h


class SparseDenseMLP(SparsityMixin, DenseMLP):
    def __init__(self, d_model: int, hidden: int, method: str, active: float, activation: str = "gelu",
                 bias: bool = True, init_std: float | None = None, out_std: float | None = None):
        DenseMLP.__init__(self, d_model, hidden, activation, bias, init_std, out_std)
        self._init_sparsity(method, active, d_model, hidden)

    def _in_weights(self):
        return [self.fc_in.weight]

    def _out_weight(self):
        return self.fc_out.weight

    def _intermediate(self, x):
        h = self.phi(self.fc_in(x))
        return h, h

    def _project(self, h):
        return self.fc_out(h)

    def _gate_from(self, xs, cols):
        z = self._read(self.fc_in.weight, None, cols) @ xs
        return self.phi(z if self.fc_in.bias is None else z + self.fc_in.bias)

    def _hidden_from(self, g, xs, cols, units):
        return g if units is None else g.index_select(0, units)

    def _biases_or_none(self):
        return self.fc_in.bias, self.fc_out.bias

    def _project_units(self, h, units):
        y = self._read(self.fc_out.weight, None, units) @ h
        return y if self.fc_out.bias is None else y + self.fc_out.bias


def build(cfg: Config) -> nn.Module:
    s = cfg.sparsity
    if s.mlp == "swiglu":
        return SparseSwiGLU(cfg.model.d_model, cfg.ffn.hidden, s.method, s.active, INIT_STD, residual_std(cfg))
    return SparseDenseMLP(cfg.model.d_model, cfg.ffn.hidden, s.method, s.active, cfg.ffn.activation,
                          cfg.model.bias, INIT_STD, residual_std(cfg))


def sparse_config(cfg: Config, method: str, active: float) -> Config:
    """The config of ``cfg``'s model (dense or swiglu MLPs) with its MLPs made sparse by ``method`` at ``active``."""
    new = cfg.copy()
    new.apply({"ffn.kind": "sparse", "sparsity.mlp": cfg.ffn.kind, "sparsity.method": method,
               "sparsity.active": float(active)})
    return new


SPARSE = FFNVariant(
    "sparse",
    build=build,
    describe=lambda cfg: (f"sparse {cfg.sparsity.mlp} {cfg.ffn.hidden} {cfg.sparsity.method} "
                          f"{cfg.sparsity.active:.0%} active"),
    section=SparsityConfig,
)
