"""The transformers classes of the ``treeffn`` model type: :class:`TreeffnConfig`, :class:`TreeffnForCausalLM` and
the cache it returns as ``past_key_values`` (:class:`TreeffnCache`).

This module imports transformers (the base classes come from it); :mod:`treeffn.hf` imports it when transformers is
installed and registers the classes with the Auto* factories. See :mod:`treeffn.hf` for the export and the design.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import Config
from .model import GPT, KVCache, last_positions

MODEL_TYPE = "treeffn"


class TreeffnConfig(PretrainedConfig):
    """transformers config holding a treeffn :class:`~treeffn.config.Config` as a plain dict (``treeffn``)."""

    model_type = MODEL_TYPE
    # the standard names HF tooling reads, derived from the treeffn config (never set independently)
    _derived = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings")

    def __init__(self, treeffn: dict | None = None, **kwargs):
        cfg = Config.from_dict(treeffn) if treeffn else Config()
        m = cfg.model
        self.treeffn = cfg.to_dict()
        for key in self._derived:
            kwargs.pop(key, None)
        self.vocab_size, self.hidden_size = m.vocab_size, m.d_model
        self.num_hidden_layers, self.num_attention_heads = m.n_layer, m.n_head
        self.num_key_value_heads, self.max_position_embeddings = m.kv_heads, m.seq_len
        kwargs.setdefault("tie_word_embeddings", m.tie_embeddings)
        super().__init__(**kwargs)

    def treeffn_config(self) -> Config:
        return Config.from_dict(self.treeffn)


class TreeffnCache:
    """treeffn's :class:`~treeffn.model.KVCache` as HF ``past_key_values`` (with the few methods generate uses)."""

    is_compileable = False

    def __init__(self, n_layer: int):
        self.kv = KVCache(n_layer)
        self.padded = False  # once a padded batch went in, positions must come from the attention mask

    @property
    def seen(self) -> int:
        return self.kv.seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.kv.layers:
            if layer.k is not None:
                idx = beam_idx.to(layer.k.device)
                layer.k, layer.v = layer.k.index_select(0, idx), layer.v.index_select(0, idx)
                layer.pos, layer.valid = layer.pos.index_select(0, idx), layer.valid.index_select(0, idx)


class TreeffnPreTrainedModel(PreTrainedModel):
    config_class = TreeffnConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block", "RoutedBlock"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        # GPT initialises its own parameters when built and loading overwrites them. Non-persistent buffers
        # (rotary tables) are in no checkpoint and HF builds models on the meta device: recompute them, through
        # the same reset_buffers() hook treeffn.checkpoint.load_model uses.
        if hasattr(module, "reset_buffers"):
            with torch.no_grad():
                module.reset_buffers()


def _padding(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, past: int,
             input_ids: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and padding mask (B, T) of the new tokens: from ``attention_mask`` (B, past + T; 0 = padding), each
    row's real tokens numbered from 0, unless ``position_ids`` are given."""
    B, T = input_ids.shape
    mask = (attention_mask.bool() if attention_mask is not None
            else torch.ones(B, past + T, dtype=torch.bool, device=input_ids.device))
    pos = position_ids if position_ids is not None else (mask.long().cumsum(1) - 1).clamp(min=0)[:, -T:]
    if int(pos.max()) >= max_positions:
        raise ValueError(f"position {int(pos.max())} is beyond the model's context of {max_positions} tokens")
    return pos, mask[:, -T:]


class TreeffnForCausalLM(TreeffnPreTrainedModel, GenerationMixin):
    """A treeffn GPT (``.model``) behind the transformers causal-LM interface."""

    _tied_weights_keys = {"model.lm_head.weight": "model.tok_emb.weight"}

    def __init__(self, config: TreeffnConfig):
        super().__init__(config)
        self.model = GPT(config.treeffn_config())
        self.post_init()

    # HF's generate would otherwise create a DynamicCache and feed only the newest token; ours is made in forward
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def get_input_embeddings(self):
        return self.model.tok_emb

    def set_input_embeddings(self, value):
        self.model.tok_emb = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      use_cache=None, **kwargs):
        if isinstance(past_key_values, TreeffnCache):
            input_ids = input_ids[:, past_key_values.seen:]  # only the tokens the cache has not seen
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache}

    def _cache(self, past_key_values, use_cache: bool | None) -> tuple[TreeffnCache | None, bool]:
        """(the cache to extend: the one given, a new one when caching, else None; whether to return it)."""
        if use_cache is None:  # transformers 5 keeps use_cache in the generation config, 4 in the model config
            use_cache = getattr(self.config, "use_cache", None)
            use_cache = True if use_cache is None else use_cache
        if past_key_values is not None and not isinstance(past_key_values, TreeffnCache):
            raise ValueError(f"treeffn models keep their own cache; got past_key_values of type "
                             f"{type(past_key_values).__name__}")
        if past_key_values is None and use_cache:
            return TreeffnCache(len(self.model.blocks)), use_cache
        return past_key_values, use_cache

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds=None, return_dict: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs):
        """input_ids (B, T) -> CausalLMOutputWithPast(logits (B, T, V), loss, past_key_values).

        ``attention_mask`` (B, past + T) marks real tokens (0 = padding); ``labels`` follow HF (shifted inside,
        -100 ignored). Positions come from the mask unless ``position_ids`` are given.
        """
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("treeffn models take input_ids only (no inputs_embeds)")
        cache, use_cache = self._cache(past_key_values, use_cache)
        past = cache.seen if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past + input_ids.shape[1]:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions; expected past + new "
                             f"= {past + input_ids.shape[1]}")
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        if cache is not None:
            cache.padded = cache.padded or padded
            padded = cache.padded
        kv = cache.kv if cache is not None else None
        B, T = input_ids.shape
        select, keep = None, 0
        if labels is None and isinstance(logits_to_keep, int) and 0 < logits_to_keep < T:
            # only the last positions' logits are wanted (generation): the output layer runs on those alone
            keep = logits_to_keep
            select = last_positions(input_ids, keep)
        if not padded and position_ids is None:
            # nothing masked: treeffn's own forward (its flash path when there is no cache)
            logits = self.model(input_ids, cache=kv, select=select).logits
        else:
            pos, valid = _padding(attention_mask, position_ids, past, input_ids, self.config.max_position_embeddings)
            logits = self.model(input_ids, cache=kv, pos=pos, valid=valid, select=select).logits
        if keep:
            logits = logits.view(B, keep, -1)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        if not keep and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):  # HF's other form: the sequence indices to keep
            logits = logits[:, logits_to_keep]
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)
