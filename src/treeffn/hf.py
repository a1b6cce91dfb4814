"""Hugging Face transformers interoperability: a ``treeffn`` model type for ``AutoModelForCausalLM``.

:func:`export_hf` turns a treeffn checkpoint into a ``save_pretrained`` folder::

    OUT/config.json              model_type "treeffn"; the full treeffn Config under "treeffn"
    OUT/model.safetensors        the GPT's tensors, named model.<treeffn name> (tied head stored once)
    OUT/generation_config.json   end-of-text as eos/bos/pad
    OUT/tokenizer.json, tokenizer_config.json   a PreTrainedTokenizerFast over the checkpoint's tokenizer

and, once the classes are registered, ``AutoModelForCausalLM.from_pretrained(OUT)`` and
``AutoTokenizer.from_pretrained(OUT)`` load it without remote code. The wrapped module is treeffn's own
:class:`~treeffn.model.GPT`, so every feed-forward kind (dense, swiglu, moe, tree) and Mixture-of-Depths blocks run
exactly as in treeffn: on an unpadded batch the logits are treeffn's own.

``generate()`` works with greedy search, sampling and beam search. The KV cache is treeffn's (HF's ``DynamicCache``
has no room for the positions and padding masks that routed blocks keep), returned as ``past_key_values``;
``use_cache=False`` recomputes the whole sequence each step instead. Left-padded batches (``attention_mask``) are
supported: padding is masked and each row's positions start at 0.

Registration: ``import treeffn.hf`` registers the ``treeffn`` model type with ``AutoConfig`` and
``AutoModelForCausalLM`` when transformers is installed (it imports transformers, which takes a few seconds; without
transformers the import still succeeds and :func:`register` explains what is missing). :func:`register` stays
available and is idempotent::

    import transformers, treeffn.hf
    model = transformers.AutoModelForCausalLM.from_pretrained(OUT)

The ``treeffn export-hf`` command line lives in :mod:`treeffn.hf_cli`, so building the CLI's parser never imports
transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import CheckpointError, TreeffnError

MODEL_TYPE = "treeffn"
EOT_TOKEN = "<|endoftext|>"

_classes: dict[str, type] = {}


def _build_classes() -> dict[str, type]:
    import torch.nn.functional as F
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .config import Config
    from .lmeval import padded_forward
    from .model import GPT, KVCache

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

        def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                    past_key_values=None, use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                    position_ids: torch.LongTensor | None = None, inputs_embeds=None, return_dict: bool | None = None,
                    logits_to_keep: int = 0, **kwargs):
            """input_ids (B, T) -> CausalLMOutputWithPast(logits (B, T, V), loss, past_key_values).

            ``attention_mask`` (B, past + T) marks real tokens (0 = padding); ``labels`` follow HF (shifted inside,
            -100 ignored). Positions come from the mask unless ``position_ids`` are given.
            """
            if inputs_embeds is not None or input_ids is None:
                raise ValueError("treeffn models take input_ids only (no inputs_embeds)")
            if use_cache is None:  # transformers 5 keeps use_cache in the generation config, 4 in the model config
                use_cache = getattr(self.config, "use_cache", None)
                use_cache = True if use_cache is None else use_cache
            if past_key_values is not None and not isinstance(past_key_values, TreeffnCache):
                raise ValueError(f"treeffn models keep their own cache; got past_key_values of type "
                                 f"{type(past_key_values).__name__}")
            cache = past_key_values
            if cache is None and use_cache:
                cache = TreeffnCache(len(self.model.blocks))
            past = cache.seen if cache is not None else 0
            B, T = input_ids.shape
            if attention_mask is not None and attention_mask.shape[-1] != past + T:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions; expected past + new "
                                 f"= {past + T}")
            padded = attention_mask is not None and not bool(attention_mask.bool().all())
            if cache is not None:
                cache.padded = cache.padded or padded
                padded = cache.padded
            if not padded and position_ids is None:
                # nothing masked: treeffn's own forward (its flash path when there is no cache)
                logits = self.model(input_ids, cache=cache.kv if cache is not None else None).logits
            else:
                mask = (attention_mask.bool() if attention_mask is not None
                        else torch.ones(B, past + T, dtype=torch.bool, device=input_ids.device))
                valid = mask[:, -T:]
                pos = position_ids if position_ids is not None else (mask.long().cumsum(1) - 1).clamp(min=0)[:, -T:]
                if int(pos.max()) >= self.config.max_position_embeddings:
                    raise ValueError(f"position {int(pos.max())} is beyond the model's context of "
                                     f"{self.config.max_position_embeddings} tokens")
                logits = padded_forward(self.model, input_ids, pos, valid, cache.kv if cache is not None else None)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
            return CausalLMOutputWithPast(loss=loss, logits=logits,
                                          past_key_values=cache if use_cache else None)

    return {"TreeffnConfig": TreeffnConfig, "TreeffnForCausalLM": TreeffnForCausalLM, "TreeffnCache": TreeffnCache}


def register() -> tuple[type, type]:
    """Register the ``treeffn`` model type with AutoConfig and AutoModelForCausalLM; returns (config, model) classes.

    Idempotent. Needs transformers (``pip install 'treeffn[hf]'``).
    """
    if not _classes:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise TreeffnError("Hugging Face interoperability needs transformers: pip install 'treeffn[hf]'") from None
        _classes.update(_build_classes())
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg_cls, model_cls = _classes["TreeffnConfig"], _classes["TreeffnForCausalLM"]
        AutoConfig.register(MODEL_TYPE, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
    return _classes["TreeffnConfig"], _classes["TreeffnForCausalLM"]


def __getattr__(name: str):
    if name in ("TreeffnConfig", "TreeffnForCausalLM", "TreeffnCache"):
        register()
        return _classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


try:  # register on import, as documented; idempotent
    register()
except Exception:  # noqa: BLE001 - never make `import treeffn.hf` fail (e.g. no transformers); register() reports it
    _classes.clear()


# ---------------------------------------------------------------------------------------------------------------------
# Export and load


def export_hf(ckpt_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write a transformers ``save_pretrained`` folder (model, config, generation config, tokenizer) for a
    treeffn run directory or checkpoint folder. Returns ``out_dir``.

    The folder is written next to ``out_dir`` and renamed into place when complete. An existing ``out_dir`` is
    replaced only if it is an earlier treeffn export and ``overwrite`` is set."""
    import shutil
    import tempfile

    from .checkpoint import check_output_dir, install_dir, load_model, resolve

    cfg_cls, model_cls = register()
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    folder = resolve(ckpt_dir)
    out = check_output_dir(out_dir, "hf", overwrite=overwrite, inputs=[ckpt_dir, folder])
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json; the HF export needs the tokenizer")
    gpt = load_model(folder)
    try:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), eos_token=EOT_TOKEN, bos_token=EOT_TOKEN,
                                            unk_token=EOT_TOKEN, pad_token=EOT_TOKEN,
                                            model_max_length=gpt.cfg.model.seq_len)
    except Exception as exc:  # noqa: BLE001 - a tokenizer we cannot parse is a corrupt checkpoint
        raise CheckpointError(f"{tok_path} is corrupt ({type(exc).__name__}: {exc})") from None
    eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    if eot is None or tokenizer.convert_ids_to_tokens(eot) != EOT_TOKEN:
        raise CheckpointError(f"{tok_path} has no {EOT_TOKEN} token")

    config = cfg_cls(treeffn=gpt.cfg.to_dict(), bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    config.architectures = [model_cls.__name__]
    with torch.device("meta"):  # skip a random initialisation that load_state_dict would overwrite
        hf = model_cls(config)
    hf.model = gpt  # the loaded GPT itself (weights, tying and buffers as treeffn made them)
    hf.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        hf.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        install_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def from_pretrained(path: str | os.PathLike[str], **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path)`` after :func:`register`."""
    register()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# treeffn export-hf: the command line is in treeffn.hf_cli (importing this module imports transformers)

from .hf_cli import add_arguments, run  # noqa: E402,F401 - kept importable from here


@torch.no_grad()
def check_export(ckpt_dir, out_dir) -> float:
    """Largest absolute logit difference between the checkpoint and its export on a short token sequence."""
    from .checkpoint import load_model

    gpt = load_model(ckpt_dir)
    hf = from_pretrained(out_dir).eval()
    m = gpt.cfg.model
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, m.vocab_size, (2, min(16, m.seq_len)), generator=g)
    return float((gpt(idx).logits - hf(idx, use_cache=False).logits).abs().max())
