"""The lm-eval model over a treeffn checkpoint: :class:`TreeffnLM`, registered as ``treeffn`` by
:func:`treeffn.lmeval.register`.

This module imports lm-eval (the base class comes from it), so only :func:`treeffn.lmeval.register` imports it;
importing :mod:`treeffn.lmeval` never does. The scoring and generation themselves are in :mod:`treeffn.scoring`.
"""

from __future__ import annotations

import json
import sys

import torch
from lm_eval.api.model import TemplateLM
from tqdm.auto import tqdm

from .checkpoint import load_codec, load_model
from .errors import TreeffnError
from .scoring import DEFAULT_BATCH, generate_batch, score_sequences

DEFAULT_GEN_TOKENS = 256

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_batch_size(value) -> int:
    """lm-eval's ``batch_size`` argument -> sequences per forward pass (``auto`` / ``auto:N`` mean the default)."""
    if value is None:
        return DEFAULT_BATCH
    text = str(value)
    if text.startswith("auto"):  # no probing on CPU; a fixed size is fine
        return DEFAULT_BATCH
    try:
        n = int(text)
    except ValueError:
        raise TreeffnError(f"batch_size must be a positive integer or 'auto' (got {value!r})") from None
    if n < 1:
        raise TreeffnError(f"batch_size must be a positive integer (got {n})")
    return n


def _device(device: str | None) -> torch.device:
    device = str(device or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        # lm-eval's command line passes --device cuda unless told otherwise; HF models fall back the same way
        print(f"treeffn: device {device} is not available; using cpu", file=sys.stderr)
        device = "cpu"
    return torch.device(device)


def _dtype(dtype):
    if isinstance(dtype, str) and dtype not in DTYPES and dtype != "auto":
        raise TreeffnError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    return DTYPES.get(dtype) if isinstance(dtype, str) else dtype


def _load(checkpoint, model, codec, device: torch.device, dtype):
    """(model, codec): loaded from ``checkpoint``, or the given ones moved to ``device`` / ``dtype``."""
    if model is None:
        if checkpoint is None:
            raise TreeffnError("the treeffn model needs checkpoint=DIR in --model_args")
        return load_model(checkpoint, device=device, dtype=dtype), codec or load_codec(checkpoint)
    if codec is None:
        raise TreeffnError("TreeffnLM(model=...) needs codec= as well")
    model = model.to(device)
    return (model.to(dtype) if dtype is not None else model), codec


def _generation_args(gen_kwargs: dict, default_max: int) -> dict:
    """lm-eval's generation arguments -> until (list), max_gen, temperature (0 = greedy), top_k, top_p."""
    kw = dict(gen_kwargs)
    until = kw.pop("until", None) or []
    do_sample = bool(kw.pop("do_sample", False))
    top_k, top_p = kw.pop("top_k", None), kw.pop("top_p", None)
    return {"until": [until] if isinstance(until, str) else list(until),
            "max_gen": int(kw.pop("max_gen_toks", default_max)),
            "temperature": float(kw.pop("temperature", 0.0) or 0.0) if do_sample else 0.0,
            "top_k": int(top_k) if top_k else None, "top_p": float(top_p) if top_p else None}


def _cut_at_stops(text: str, until: list[str]) -> str:
    for s in until:  # cut at the first stop sequence, as lm-eval's HF model does
        if s:
            text = text.split(s)[0]
    return text


class TreeffnLM(TemplateLM):
    """lm-eval model over a treeffn checkpoint (``--model treeffn --model_args checkpoint=DIR``).

    Arguments (all optional but one of checkpoint / model): ``checkpoint`` run or checkpoint folder;
    ``device`` (cpu); ``batch_size`` windows per forward (16; ``auto`` means 16); ``dtype`` float32 | bfloat16 |
    float16; ``max_length`` shorter context than the model's; ``context`` resize the model's rotary tables to
    this many positions first (the weights do not depend on it); ``max_gen_toks`` default generation budget (256).
    From Python, ``model=GPT`` and ``codec=`` (anything with encode/decode/eot_id/vocab_size) skip loading.
    """

    backend = "causal"

    def __init__(self, checkpoint: str | None = None, device: str | None = "cpu", batch_size=None,
                 max_batch_size=None, dtype: str | None = None, max_length=None, max_gen_toks=DEFAULT_GEN_TOKENS,
                 model=None, codec=None, progress=True, context=None, **_unused):
        super().__init__()
        if _unused:  # lm-eval passes any --model_args key through; a typo should not pass silently
            print(f"treeffn: ignoring unknown model arguments {sorted(_unused)}", file=sys.stderr)
        self._device = _device(device)
        model, codec = _load(checkpoint, model, codec, self._device, _dtype(dtype))
        self.model = model.eval()
        self.codec = codec
        self.checkpoint = str(checkpoint) if checkpoint is not None else None
        if context:  # e.g. restore an imported model's context after fine-tuning it on shorter windows
            model.set_context(int(context))
        ctx = int(model.cfg.model.seq_len)
        self._max_length = min(ctx, int(max_length)) if max_length else ctx
        self.batch_size = parse_batch_size(batch_size)
        if max_batch_size:
            self.batch_size = min(self.batch_size, int(max_batch_size))
        self.max_gen_toks = int(max_gen_toks)
        self.progress = bool(progress) if not isinstance(progress, str) else progress.lower() == "true"
        if int(codec.vocab_size) > int(model.cfg.model.vocab_size):
            raise TreeffnError(f"tokenizer has {codec.vocab_size} tokens but the model only "
                               f"{model.cfg.model.vocab_size}")

    # ---- lm-eval plumbing ---------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.codec.eot_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"treeffn:{self.checkpoint or 'in-memory'}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.codec.encode(string))

    def tok_decode(self, tokens) -> str:
        # a model may have more embedding rows than its tokenizer has tokens: ids the tokenizer lacks have no text
        n = int(self.codec.vocab_size)
        return self.codec.decode([int(t) for t in tokens if int(t) < n])

    def get_model_info(self) -> dict:
        cfg = self.model.cfg
        return {"model_checkpoint": self.checkpoint, "model_description": cfg.describe(),
                "model_num_parameters": self.model.num_params(), "model_ffn_kind": cfg.ffn.kind,
                "max_length": self.max_length}

    # ---- scoring ------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        seqs, empty = [], []
        for k, (_, ctx, cont) in enumerate(requests):
            if not cont:  # nothing to score: log 1 = 0, trivially greedy
                empty.append(k)
                seqs.append(([self.eot_token_id, self.eot_token_id], 2))
                continue
            if not ctx:  # a context of only spaces encodes to nothing; condition on end-of-text instead
                ctx = [self.eot_token_id]
            seqs.append((list(ctx) + list(cont), len(ctx)))
        res = score_sequences(self.model, seqs, self.max_length, self.batch_size, self._device,
                              progress=self.progress and not disable_tqdm)
        for k in empty:
            res[k] = (0.0, True)
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        seqs = [([self.prefix_token_id] + self.tok_encode(req.args[0]), 1) for req in requests]
        res = score_sequences(self.model, seqs, self.max_length, self.batch_size, self._device,
                              progress=self.progress and not disable_tqdm)
        out = []
        for req, (lp, _) in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), lp)
            out.append(lp)
        return out

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for k, req in enumerate(requests):  # one batch shape per distinct set of generation arguments
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(k)
        bar = tqdm(total=len(requests), desc="generating", disable=disable_tqdm or not self.progress)
        for members in groups.values():
            gen = _generation_args(requests[members[0]].args[1], self.max_gen_toks)
            prompts = {k: self.tok_encode(requests[k].args[0]) or [self.eot_token_id] for k in members}
            order = sorted(members, key=lambda k: -len(prompts[k]))
            for lo in range(0, len(order), self.batch_size):
                chunk = order[lo: lo + self.batch_size]
                for k, text in zip(chunk, self._generate_chunk([prompts[k] for k in chunk], gen)):
                    results[k] = text
                    self.cache_hook.add_partial("generate_until", requests[k].args, text)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _generate_chunk(self, prompts: list[list[int]], gen: dict) -> list[str]:
        """Texts continuing one batch of prompts (left-truncated to fit), each cut at its first stop sequence."""
        L, max_gen, until = self.max_length, gen["max_gen"], gen["until"]
        kept, budget = [], []
        for p in prompts:
            n = min(len(p), max(L - max_gen, L // 2, 1))  # keep at least half the context for the prompt
            kept.append(p[-n:])
            budget.append(max(0, min(max_gen, L - n)))

        def stop(r, toks):
            if not until:
                return False
            text = self.tok_decode(toks)
            return any(s and s in text for s in until)

        outs = generate_batch(self.model, kept, budget, stop, gen["temperature"], gen["top_k"], gen["top_p"],
                              self.eot_token_id, self._device)
        return [_cut_at_stops(self.tok_decode(toks), until) for toks in outs]
