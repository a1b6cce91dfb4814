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

The transformers classes themselves are in :mod:`treeffn.hf_modeling` (which imports transformers). The
``treeffn export-hf`` command line lives in :mod:`treeffn.hf_cli`, so building the CLI's parser never imports
transformers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .checkpoint import load_config, load_model, resolve
from .data import EOT_TOKEN
from .errors import CheckpointError, TreeffnError
from .outputs import check_output_dir, install_dir

_import_error: Exception | None = None
try:  # the classes derive from transformers' own, an optional dependency; without it this module still imports
    from . import hf_modeling
except Exception as exc:  # noqa: BLE001 - never make `import treeffn.hf` fail; register() reports the error
    hf_modeling, _import_error = None, exc

_CLASSES = ("TreeffnConfig", "TreeffnForCausalLM", "TreeffnCache")


def register() -> tuple[type, type]:
    """Register the ``treeffn`` model type with AutoConfig and AutoModelForCausalLM; returns (config, model) classes.

    Idempotent. Needs transformers (``pip install 'treeffn[hf]'``).
    """
    if hf_modeling is None:
        err = _import_error
        if isinstance(err, ModuleNotFoundError) and (err.name or "").startswith("transformers"):
            raise TreeffnError("Hugging Face interoperability needs transformers: pip install 'treeffn[hf]'")
        raise err  # transformers is there but failed to import, or a bug in hf_modeling: show it
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_cls, model_cls = hf_modeling.TreeffnConfig, hf_modeling.TreeffnForCausalLM
    AutoConfig.register(hf_modeling.MODEL_TYPE, cfg_cls, exist_ok=True)
    AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
    return cfg_cls, model_cls


def __getattr__(name: str):
    if name in _CLASSES:
        register()
        return getattr(hf_modeling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if hf_modeling is not None:  # register on import, as documented; idempotent
    register()


# ---------------------------------------------------------------------------------------------------------------------
# Export and load


def _tokenizer(folder: Path, seq_len: int):
    """The checkpoint's tokenizer as a PreTrainedTokenizerFast, end-of-text as eos/bos/unk/pad; its eot id."""
    from transformers import PreTrainedTokenizerFast

    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json; the HF export needs the tokenizer")
    try:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), eos_token=EOT_TOKEN, bos_token=EOT_TOKEN,
                                            unk_token=EOT_TOKEN, pad_token=EOT_TOKEN, model_max_length=seq_len)
    except Exception as exc:  # noqa: BLE001 - a tokenizer we cannot parse is a corrupt checkpoint
        raise CheckpointError(f"{tok_path} is corrupt ({type(exc).__name__}: {exc})") from None
    eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    if eot is None or tokenizer.convert_ids_to_tokens(eot) != EOT_TOKEN:
        raise CheckpointError(f"{tok_path} has no {EOT_TOKEN} token")
    return tokenizer, eot


def export_hf(ckpt_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write a transformers ``save_pretrained`` folder (model, config, generation config, tokenizer) for a
    treeffn run directory or checkpoint folder. Returns ``out_dir``.

    The folder is written next to ``out_dir`` and renamed into place when complete. An existing ``out_dir`` is
    replaced only if it is an earlier treeffn export and ``overwrite`` is set."""
    cfg_cls, model_cls = register()
    from transformers import GenerationConfig

    folder = resolve(ckpt_dir)
    out = check_output_dir(out_dir, "hf", overwrite=overwrite, inputs=[ckpt_dir, folder])
    tokenizer, eot = _tokenizer(folder, load_config(folder).model.seq_len)
    gpt = load_model(folder)

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


@torch.no_grad()
def check_export(ckpt_dir, out_dir) -> float:
    """Largest absolute logit difference between the checkpoint and its export on a short token sequence."""
    gpt = load_model(ckpt_dir)
    hf = from_pretrained(out_dir).eval()
    m = gpt.cfg.model
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, m.vocab_size, (2, min(16, m.seq_len)), generator=g)
    return float((gpt(idx).logits - hf(idx, use_cache=False).logits).abs().max())
