"""Decoder-only transformer with a pluggable feed-forward block.

Shapes: B batch, T time (new tokens), S cached keys, D model width, H heads, G key/value heads, C head size, V vocab.

Pre-norm blocks (LayerNorm or RMSNorm), rotary position embeddings (rotate-half convention, as Llama in HF),
causal attention through ``scaled_dot_product_attention`` with grouped-query attention, tied or untied
embeddings, and a KV cache for decoding. The feed-forward block comes from the registry in
:mod:`treeffn.layers`; auxiliary losses and routing statistics come back explicitly in :class:`ModelOutput`.
Blocks listed by ``mod.every`` are wrapped by :class:`treeffn.mod.RoutedBlock` (Mixture-of-Depths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, get_config
from .errors import DataError, TreeffnError
from .kernels import decode_attention
from .kernels.small_linear import Linear
from .kernels.small_norm import LayerNorm, RMSNorm
from .layers import build_ffn
from .layers.registry import INIT_STD, residual_std
from .mod import RoutedBlock


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V); (S, V) for the S positions of ``GPT.forward(select=...)``
    loss: torch.Tensor | None = None  # lm_loss + aux_loss when targets are given
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # sum of every layer's weighted auxiliary losses
    stats: list[dict] = field(default_factory=list)  # per layer: detached routing statistics


# ---- cache ---------------------------------------------------------------------------------------------------
class LayerCache:
    """Keys/values one attention layer has seen: k, v (B, G, S, C), their positions and validity (B, S).

    A routed (MoD) layer appends only the tokens routed to it, so its S can be smaller than the model's.
    Storage grows geometrically and new entries are written in place, so decoding T tokens copies O(T) entries in
    all instead of re-concatenating the whole cache at every step. ``k``/``v``/``pos``/``valid`` are views of the
    first S entries; assigning all four (e.g. reordering beams) replaces the storage.
    """

    def __init__(self):
        self._k = self._v = self._pos = self._valid = None
        self.n = 0
        self.all_valid = True  # no padding entries: decoding may skip building a mask

    def _view(self, t, dim):
        return None if t is None else t.narrow(dim, 0, self.n)

    k = property(lambda self: self._view(self._k, 2), lambda self, t: self._set("_k", t, 2))
    v = property(lambda self: self._view(self._v, 2), lambda self, t: self._set("_v", t, 2))
    pos = property(lambda self: self._view(self._pos, 1), lambda self, t: self._set("_pos", t, 1))
    valid = property(lambda self: self._view(self._valid, 1), lambda self, t: self._set("_valid", t, 1))

    def _set(self, name, t, dim):
        setattr(self, name, t)
        self.n = t.shape[dim]

    def append(self, k, v, pos, valid=None):
        """Add t entries (k, v (B, G, t, C), pos (B, t), valid (B, t) or None for all valid); returns the views
        k, v, pos, valid of everything cached."""
        if valid is None:
            valid = torch.ones(pos.shape, dtype=torch.bool, device=pos.device) if self._k is None else None
        elif self.all_valid:
            self.all_valid = bool(valid.all())
        t = k.shape[2]
        if self._k is None:
            self._k, self._v, self._pos, self._valid = k, v, pos, valid
            self.n = t
            return k, v, pos, valid
        self.reserve(t)
        n = self.n
        self._k.narrow(2, n, t).copy_(k)
        self._v.narrow(2, n, t).copy_(v)
        self._pos.narrow(1, n, t).copy_(pos)
        if valid is None:
            self._valid.narrow(1, n, t).fill_(True)
        else:
            self._valid.narrow(1, n, t).copy_(valid)
        self.n = n + t
        return self.k, self.v, self.pos, self.valid

    def reserve(self, t: int) -> None:
        """Make room for t more entries after the first append (storage grows geometrically)."""
        n, cap = self.n, self._k.shape[2]
        if n + t > cap:
            new_cap = max(2 * cap, n + t, 64)
            self._k = self._grow(self._k, 2, new_cap)
            self._v = self._grow(self._v, 2, new_cap)
            self._pos = self._grow(self._pos, 1, new_cap)
            self._valid = self._grow(self._valid, 1, new_cap)

    def _grow(self, t, dim, cap):
        shape = list(t.shape)
        shape[dim] = cap
        out = t.new_empty(shape)
        out.narrow(dim, 0, self.n).copy_(t.narrow(dim, 0, self.n))
        return out

    @property
    def length(self) -> int:
        return self.n


class KVCache:
    """One :class:`LayerCache` per block plus the number of positions consumed so far."""

    def __init__(self, n_layer: int):
        self.layers = [LayerCache() for _ in range(n_layer)]
        self.seen = 0


# ---- pieces --------------------------------------------------------------------------------------------------
def make_norm(cfg: Config) -> nn.Module:
    m = cfg.model
    if m.norm == "rmsnorm":
        return RMSNorm(m.d_model, eps=m.norm_eps)
    return LayerNorm(m.d_model, eps=m.norm_eps, bias=m.bias)


class Rotary(nn.Module):
    """Rotary embeddings with precomputed tables for positions < seq_len (looked up, not recomputed).

    With x = [x1 | x2] (halves of the head), rotation by angles θ is [x1·cos − x2·sin | x2·cos + x1·sin] =
    x·[cos | cos] + swap(x)·[−sin | sin], swap exchanging the halves: ``table`` holds [cos | cos | −sin | sin] per
    position, so a rotation is one lookup shared by q and k (:meth:`angles`) and three ops per tensor (:meth:`rotate`).
    """

    def __init__(self, head_dim: int, base: float, max_pos: int):
        super().__init__()
        self.head_dim, self.base, self.max_pos = head_dim, base, max_pos
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.register_buffer("table", torch.empty(max_pos, 2 * head_dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        dev = self.inv_freq.device
        C = self.head_dim
        inv = 1.0 / (self.base ** (torch.arange(0, C, 2, dtype=torch.float32, device=dev) / C))
        ang = torch.arange(self.max_pos, dtype=torch.float32, device=dev)[:, None] * inv  # (P, C/2)
        cos, sin = ang.cos(), ang.sin()
        self.inv_freq = inv
        self.table = torch.cat([cos, cos, -sin, sin], -1)

    def angles(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (B, T) -> ([cos | cos], [−sin | sin]), each (B, 1, T, C) fp32."""
        return self.table[pos][:, None].chunk(2, dim=-1)

    def rotate(self, x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, H, T, C) rotated by :meth:`angles` (computed in fp32, returned in x's dtype)."""
        cos, sin = angles
        xf = x if x.dtype == torch.float32 else x.float()
        out = torch.addcmul(xf * cos, xf.roll(self.head_dim // 2, dims=-1), sin)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, C), pos (B, T) -> x rotated by its absolute positions."""
        return self.rotate(x, self.angles(pos))


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.n_head, self.n_kv, self.head_dim = m.n_head, m.kv_heads, m.head_dim
        self.q = Linear(m.d_model, m.n_head * m.head_dim, bias=m.bias)
        self.k = Linear(m.d_model, self.n_kv * m.head_dim, bias=m.bias)
        self.v = Linear(m.d_model, self.n_kv * m.head_dim, bias=m.bias)
        self.o = Linear(m.n_head * m.head_dim, m.d_model, bias=m.bias)
        self.rotary = Rotary(m.head_dim, m.rope_base, m.seq_len)
        self.dropout = m.dropout

    def forward(self, x, pos, cache: LayerCache | None = None, valid: torch.Tensor | None = None,
                standard: bool = False) -> torch.Tensor:
        """x (B, T, D); pos (B, T) absolute positions; valid (B, T) marks real tokens (padding is False).

        ``standard`` = positions are 0..T-1 for every row, nothing cached, nothing padded: the causal flash path.
        Otherwise a query at position p attends to valid keys at positions ≤ p (and always to itself).
        """
        B, T, _ = x.shape
        if (T == 1 and cache is not None and cache._k is not None and not (self.training and self.dropout > 0)
                and decode_attention.usable(x, self.q.weight, cache._k, cache._v)):
            # one decoding step in one C++ call (treeffn.kernels.decode_attention); the code below is its reference
            return decode_attention.decode_step(x, self, pos, cache, valid)
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, C)
        k = self.k(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, G, T, C)
        v = self.v(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        ang = self.rotary.angles(pos)
        q, k = self.rotary.rotate(q, ang), self.rotary.rotate(k, ang)
        padded = valid is not None and not bool(valid.all())
        drop = self.dropout if self.training else 0.0
        gqa = self.n_kv != self.n_head
        if cache is None and standard:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop, enable_gqa=gqa)
        elif cache is not None and T == 1 and cache.all_valid and not padded:
            # one new token after a padding-free cache: it may see every cached key, no mask needed
            k, v, _, _ = cache.append(k, v, pos, valid)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, enable_gqa=gqa)
        else:
            if valid is None:
                valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
            kpos, kvalid = pos, valid
            if cache is not None:
                k, v, kpos, kvalid = cache.append(k, v, pos, valid)
            S = k.shape[2]
            mask = (kpos[:, None, :] <= pos[:, :, None]) & kvalid[:, None, :]  # (B, T, S)
            own = torch.arange(S - T, S, device=x.device)
            mask[:, torch.arange(T, device=x.device), own] = True  # a row is never empty (padding rows too)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=drop, enable_gqa=gqa)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)). ``residual=False`` returns only the update f(x) (used by MoD)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.ffn = build_ffn(cfg)
        self.drop = nn.Dropout(cfg.model.dropout)

    def forward(self, x, pos, cache=None, valid=None, standard=False, residual=True) -> tuple[torch.Tensor, dict]:
        a = self.attn(self.norm1(x), pos, cache, valid, standard)
        h = x + (self.drop(a) if self.training else a)  # eval: dropout is the identity, skip its call
        f, aux = self.ffn(self.norm2(h))
        h = h + (self.drop(f) if self.training else f)
        return (h if residual else h - x), aux


# ---- model ---------------------------------------------------------------------------------------------------
class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        m = cfg.model
        self.tok_emb = nn.Embedding(m.vocab_size, m.d_model)
        blocks = []
        for i in range(m.n_layer):
            block = Block(cfg)
            if is_routed_layer(cfg, i):
                block = RoutedBlock(cfg, block)
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = make_norm(cfg)
        self.lm_head = Linear(m.d_model, m.vocab_size, bias=False)
        # Feed-forward variants initialise themselves (treeffn.layers.registry); everything else as GPT-2, with the
        # attention output projection into the residual stream scaled by 1/sqrt(2 n_layer).
        ffn_parts = {id(mod) for f in self.ffn_modules() for mod in f.modules()}
        for mod in self.modules():
            if id(mod) not in ffn_parts:
                self._init_weights(mod)
        for mod in self.modules():  # after the loop above, which reaches each projection after its Attention
            if isinstance(mod, Attention):
                nn.init.normal_(mod.o.weight, 0.0, residual_std(cfg))
        if m.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, INIT_STD)

    # ---- accounting ---------------------------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
        return n

    def ffn_modules(self) -> list[nn.Module]:
        return [blk.ffn for blk in self.blocks]  # a RoutedBlock exposes its inner block's ffn

    def replace_ffn(self, layer: int, module: nn.Module) -> None:
        """Put ``module`` in place of layer ``layer``'s feed-forward block (inside a Mixture-of-Depths wrapper too)."""
        blk = self.blocks[layer]
        (blk.block if isinstance(blk, RoutedBlock) else blk).ffn = module

    def ffn_units(self) -> dict:
        """Per-token feed-forward units: total, active (mean over layers) and the active fraction."""
        ffns = self.ffn_modules()
        total = sum(f.total_units() for f in ffns) / len(ffns)
        active = sum(f.active_units() for f in ffns) / len(ffns)
        return {"total": total, "active": active, "fraction": active / total}

    def set_context(self, seq_len: int) -> None:
        """Resize the rotary tables to ``seq_len`` positions (the weights do not depend on the context length)."""
        self.cfg.model.seq_len = seq_len
        for mod in self.modules():
            if isinstance(mod, Rotary):
                mod.max_pos = seq_len
                mod.reset_buffers()

    def flops_per_token(self, context: int | None = None, routed: float | dict[int, float] | None = None) -> dict:
        """Analytic inference FLOPs per token (2 per multiply-add), averaged over a causal sequence of ``context``.

        ``ffn`` counts feed-forward blocks only; ``total`` adds attention projections, attention scores and values
        (mean context (T+1)/2), and the output head. A Mixture-of-Depths block counts the fraction of tokens it
        processes: ``routed`` when given (one fraction for every routed block, or ``{layer: fraction}``), which is
        what evaluation and decoding must pass, since there the causal rule decides and routes a fraction measured on
        the data (``treeffn eval`` reports it); without it ``mod.capacity``, the top-C fraction of training.
        """
        m = self.cfg.model
        T = context or m.seq_len
        D, C = m.d_model, m.head_dim
        attn_proj = 2 * D * (m.n_head * C) * 2 + 2 * D * (m.kv_heads * C) * 2
        attn_ctx = 2 * 2 * m.n_head * C * (T + 1) / 2
        total = ffn = 0.0
        for i, f in enumerate(self.ffn_modules()):
            frac = 1.0
            if is_routed_layer(self.cfg, i):
                frac = self.cfg.mod.capacity if routed is None else \
                    float(routed[i] if isinstance(routed, dict) else routed)
            ffn += frac * f.flops_per_token()
            total += frac * (f.flops_per_token() + attn_proj + attn_ctx)
        total += 2 * D * m.vocab_size
        return {"total": total, "ffn": ffn}

    def set_track_stats(self, on: bool) -> None:
        for mod in self.modules():
            if hasattr(mod, "track_stats"):
                mod.track_stats = on

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                pos: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                select: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModelOutput:
        """idx (B, T) token ids -> :class:`ModelOutput` with logits (B, T, V).

        Positions default to ``cache.seen + arange(T)`` for every row. Batches of prompts of different lengths pass
        per-row positions ``pos`` (B, T) and a padding mask ``valid`` (B, T, True = real token): padding rows attend
        only to themselves and are never attended to. ``select`` = (rows, columns), two index tensors of S entries:
        the output layer runs on those positions only and logits are (S, V) — what scoring a continuation or
        starting a generation needs, at a fraction of the output layer's cost when the vocabulary is large.
        """
        if idx.dim() != 2:
            raise TreeffnError(f"token ids must have shape (batch, time); got {tuple(idx.shape)}")
        if select is not None and targets is not None:
            raise TreeffnError("select= computes logits at some positions only; the loss needs every position")
        B, T = idx.shape
        V, ctx = self.cfg.model.vocab_size, self.cfg.model.seq_len
        start = cache.seen if cache is not None else 0
        # explicit positions (padded batches) say where each row is; otherwise the cache length does
        last = int(pos.max()) + 1 if pos is not None and pos.numel() else start + T
        if last > ctx:
            raise TreeffnError(f"sequence of {last} tokens exceeds the model's context of {ctx}")
        if idx.numel():
            lo, hi = (int(v) for v in torch.aminmax(idx))
            if lo < 0 or hi >= V:
                raise DataError(f"token id {hi if hi >= V else lo} is out of range for vocabulary size {V}")
        standard = cache is None and valid is None and pos is None  # positions 0..T-1, nothing padded or cached
        if pos is None:
            pos = torch.arange(start, start + T, device=idx.device).expand(B, T)
        elif pos.shape != idx.shape or (valid is not None and valid.shape != idx.shape):
            raise TreeffnError(f"positions {tuple(pos.shape)} and padding mask must match the token ids {(B, T)}")
        x = self.tok_emb(idx)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        stats = []
        for i, block in enumerate(self.blocks):
            x, aux = block(x, pos, cache.layers[i] if cache is not None else None, valid, standard)
            if "loss" in aux:
                aux_loss = aux_loss + aux["loss"].float()
            stats.append({k: v for k, v in aux.items() if k != "loss"})
        if cache is not None:
            cache.seen += T
        if select is not None:
            x = x[select]
        logits = self.lm_head(self.norm_f(x))
        out = ModelOutput(logits=logits, aux_loss=aux_loss, stats=stats)
        if targets is not None:
            out.lm_loss = F.cross_entropy(logits.float().view(-1, V), targets.reshape(-1), ignore_index=-1)
            out.loss = out.lm_loss + aux_loss
        return out

    # ---- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 eos_id: int | None = None) -> torch.Tensor:
        """Continue idx (B, T) by up to ``max_new_tokens`` tokens with the KV cache; temperature 0 is greedy.

        Returns (B, T + n). Stops early when every row has produced ``eos_id``.
        """
        ctx = self.cfg.model.seq_len
        if idx.dim() == 1:
            idx = idx[None]
        if idx.shape[1] == 0:
            raise TreeffnError("the prompt is empty; give at least one token")
        if idx.shape[1] > ctx:
            raise TreeffnError(f"prompt of {idx.shape[1]} tokens is longer than the model's context of {ctx}")
        if max_new_tokens < 0:
            raise TreeffnError(f"max_new_tokens must be ≥ 0 (got {max_new_tokens})")
        if idx.shape[1] + max_new_tokens > ctx:
            raise TreeffnError(f"prompt ({idx.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                               f"model's context of {ctx}")
        check_sampling(temperature, top_k, top_p)
        was_training = self.training
        self.eval()
        try:
            cache = KVCache(len(self.blocks))
            logits = self(idx, cache=cache, select=last_positions(idx)).logits
            out = [idx]
            done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
            for step in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
                out.append(nxt[:, None])
                if eos_id is not None:
                    done |= nxt == eos_id
                    if bool(done.all()):
                        break
                if step + 1 < max_new_tokens:
                    logits = self(nxt[:, None], cache=cache).logits[:, -1]
            return torch.cat(out, 1)
        finally:
            self.train(was_training)


def last_positions(idx: torch.Tensor, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``GPT.forward``'s ``select`` for the last ``n`` positions of every row of idx (B, T): logits (B·n, V), row
    by row."""
    B, T = idx.shape
    rows = torch.arange(B, device=idx.device).repeat_interleave(n)
    return rows, torch.arange(T - n, T, device=idx.device).repeat(B)


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """TreeffnError unless temperature ≥ 0 (0 = greedy), top_k ≥ 0 (0 = off) and top_p in (0, 1] (None = off)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise TreeffnError(f"temperature must be a finite number ≥ 0 (0 = greedy); got {temperature}")
    if top_k is not None and top_k < 0:
        raise TreeffnError(f"top-k must be ≥ 0 (0 = off); got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise TreeffnError(f"top-p must be in (0, 1]; got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). Greedy at temperature 0; otherwise top-k, then nucleus top-p."""
    if temperature <= 0:
        return logits.max(-1).indices  # argmax's first maximum; max is the faster reduction on CPU
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def is_routed_layer(cfg: Config, i: int) -> bool:
    e = cfg.mod.every
    return e > 0 and i % e == e - 1


def build_model(preset: str | Config = "tiny", overrides: dict | None = None, device=None) -> GPT:
    """Build a model from a preset name (or a Config) plus dotted overrides, e.g. ``{"ffn.kind": "tree"}``."""
    cfg = preset.copy().apply(overrides) if isinstance(preset, Config) else get_config(preset, overrides)
    if device is not None:
        with torch.device(device):
            return GPT(cfg)
    return GPT(cfg)
