"""Mixture-of-Depths routing around a transformer block (Raposo et al., arXiv 2404.02258, 2024).

Shapes: B batch, T time (tokens given to the block), C tokens the block processes per sequence, D model width.

Training forward of one routed block (paper §3.4, eq. 1)::

    r_i  = w_r · x_i + b_r                   router: one scalar per token, raw (no softmax over the sequence)
    C    = max(1, ⌈capacity · T⌉)            per sequence, so a short sequence still routes one token
    x_i' = x_i + r_i · f_i(X̃)               for the top-C tokens of *each* sequence, kept in temporal order
    x_i' = x_i                               for the others, bit-identical (no residual scaling or doubling)

f is the block's update (attention + MLP, ``Block(..., residual=False)``) computed on the selected tokens X̃ only:
they attend among themselves with their *original* position ids, so rotary embeddings see true distances.
Multiplying f by r is what gives the router its gradient from the language-model loss.

Top-C over the sequence is not causal, so evaluation and generation route with a causal rule (paper §3.5):

    causal="aux"        route iff r_i > 0;  trained by  aux = w · BCE(r_i, 1[i ∈ top-C])
    causal="predictor"  route iff p_i > 0,  p = MLP(stopgrad(x_i)), D → D/8 → 1;  aux = w · BCE(p_i, 1[i ∈ top-C])

(w = ``mod.aux_weight``). Labels are the top-C membership of the same sequence. With "aux" the BCE also reaches
the model through x (the paper's 0.2–0.3 % cost on the LM objective). The predictor sees a detached copy of the
block input, so the language-model loss never reaches it and its BCE never reaches the model: the LM objective is
untouched. r itself is used raw, as in the paper (no sigmoid, no clamp); the BCE is computed in fp32 from logits.

Under the causal rule each sequence routes a different number of tokens. A batch is padded to the largest count;
padding is marked invalid, so it is never a key, and its outputs are discarded. With a KV cache only the routed
tokens (and invalid padding) are appended to this layer's cache, so a skipped token is never attended to here, and
cached decoding equals a full forward under the same rule. When no token of a batch routes, the block is skipped.

Statistics in the aux dict (detached): ``mod_routed`` fraction routed by the causal rule, ``mod_agree`` agreement
of the causal rule with top-C (when the whole sequence is present), ``mod_capacity`` fraction the block processed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.small_linear import Linear


def capacity_tokens(capacity: float, T: int) -> int:
    """Tokens a routed block processes in a sequence of T: ⌈capacity·T⌉, at least 1 and at most T."""
    # the small tolerance keeps 0.125 * 64 = 8 from becoming 9 through float error
    return min(T, max(1, math.ceil(capacity * T - 1e-9)))


class RoutedBlock(nn.Module):
    """Wraps a :class:`treeffn.model.Block`; same forward signature. See the module docstring.

    ``scale_by_router=False`` outputs x + f instead of x + r·f (tests: at capacity 1 it equals the plain block).
    """

    def __init__(self, cfg, block: nn.Module, scale_by_router: bool = True):
        super().__init__()
        D = cfg.model.d_model
        self.block = block
        self.capacity = cfg.mod.capacity
        self.causal = cfg.mod.causal
        self.aux_weight = cfg.mod.aux_weight
        self.scale_by_router = scale_by_router
        # A bias lets the aux rule learn the routed fraction directly (threshold at 0); zero-init, small weights.
        self.router = Linear(D, 1, bias=True)
        nn.init.normal_(self.router.weight, 0.0, 0.02)
        nn.init.zeros_(self.router.bias)
        self.predictor = None
        if self.causal == "predictor":
            hidden = max(1, D // 8)
            self.predictor = nn.Sequential(Linear(D, hidden), nn.GELU(), Linear(hidden, 1))

    @property
    def ffn(self) -> nn.Module:
        return self.block.ffn

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, causal={self.causal}, scale_by_router={self.scale_by_router}"

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, x, pos, cache=None, valid=None, standard=False, residual=True) -> tuple[torch.Tensor, dict]:
        """x (B, T, D), pos (B, T) -> (x', aux). ``standard`` is accepted for signature parity and not needed:
        the selected tokens are never positions 0..C-1, so the block always gets explicit positions and validity.
        ``residual=False`` returns x' − x (the routed update only), like :class:`~treeffn.model.Block`.
        """
        B, T, D = x.shape
        r = self.router(x).squeeze(-1)  # (B, T)
        # causal logits: the router itself (aux) or the predictor on a detached copy of the block input
        rule = r if self.predictor is None else self.predictor(x.detach()).squeeze(-1)  # (B, T)
        routed = rule.detach() > 0  # (B, T) the causal decision
        if valid is not None:  # callers may pad (GPT never does): padding is never routed nor selected
            routed = routed & valid
        n_real = float(B * T) if valid is None else valid.sum().clamp_min(1).float()

        labels = None
        if cache is None:
            # The whole sequence is present, so top-C is defined: the training selection and the causal target.
            C = capacity_tokens(self.capacity, T)
            score = r.detach() if valid is None else r.detach().masked_fill(~valid, float("-inf"))
            top = score.topk(C, dim=1).indices  # (B, C) per sequence, never across the batch
            labels = torch.zeros(B, T, dtype=torch.float32, device=x.device).scatter_(1, top, 1.0)

        if self.training and cache is None:
            idx = top.sort(dim=1).values  # (B, C) temporal order, so causal attention among them stays causal
            if valid is None:
                sel_valid = torch.ones(B, C, dtype=torch.bool, device=x.device)
                processed = float(B * C)
            else:
                sel_valid = valid.gather(1, idx)
                processed = sel_valid.sum()
            out, aux = self._run_selected(x, pos, r, idx, sel_valid, None, valid is not None)
        else:
            counts = routed.sum(1)  # (B,)
            n = int(counts.max()) if B else 0  # one host sync: the shapes below depend on it
            if n == 0:
                out, aux = x, {}  # no token of the batch routes here: the block and its cache are skipped
            else:
                # routed tokens first, each row in temporal order (stable sort), then padding up to n
                idx = torch.argsort((~routed).to(torch.uint8), dim=1, stable=True)[:, :n]  # (B, n)
                sel_valid = torch.arange(n, device=x.device)[None, :] < counts[:, None]  # (B, n)
                out, aux = self._run_selected(x, pos, r, idx, sel_valid, cache, B > 1 or valid is not None)
            processed = counts.sum()

        aux = dict(aux)
        if labels is not None:
            w = None if valid is None else valid.float()
            bce = F.binary_cross_entropy_with_logits(rule.float(), labels, weight=w, reduction="sum") / n_real
            mod_loss = self.aux_weight * bce
            aux["loss"] = aux["loss"] + mod_loss if "loss" in aux else mod_loss
            agree = routed == labels.bool()
            if valid is not None:
                agree = agree & valid
            aux["mod_agree"] = (agree.sum() / n_real).detach()
        aux["mod_routed"] = (routed.sum() / n_real).detach()
        aux["mod_capacity"] = (processed / n_real).detach() if torch.is_tensor(processed) else \
            torch.tensor(processed / n_real)
        return (out if residual else out - x), aux

    def _run_selected(self, x, pos, r, idx, sel_valid, cache, padded: bool) -> tuple[torch.Tensor, dict]:
        """Run the block on the tokens idx (B, n) and write x + r·f back there; every other token is left as is."""
        D = x.shape[-1]
        gidx = idx[..., None].expand(-1, -1, D)  # (B, n, D)
        xs = x.gather(1, gidx)  # (B, n, D)
        f, aux = self.block(xs, pos.gather(1, idx), cache, sel_valid, standard=False, residual=False)
        if self.scale_by_router:
            new = xs + r.gather(1, idx)[..., None].to(f.dtype) * f
        else:
            new = xs + f
        if padded:
            # padding (ragged counts under the causal rule, or padded input) is written back unchanged: discarded
            new = torch.where(sel_valid[..., None], new, xs)
        return x.scatter(1, gidx, new), aux
