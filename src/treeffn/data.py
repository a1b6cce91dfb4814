"""Corpus preparation and loading: documents in, a byte-level BPE tokenizer and flat token files out.

A prepared data directory holds::

    tokenizer.json   HF `tokenizers` byte-level BPE, trained on the training documents only
    train.bin        uint16 token ids, each document preceded by the end-of-text id (np.memmap-able)
    val.bin          the same for the held-out documents
    meta.json        vocabulary size, end-of-text id, token and UTF-8 byte counts per split, the documents of each
                     split (source, name, bytes, token offset and count), the tokenizer's hash and a parameters hash

Validation holds out whole documents (a novel, a play, a Brown file), never a slice of one, so the validation loss
measures generalisation to unseen text rather than to the other half of a page seen in training. Byte counts are the
UTF-8 size of exactly the text that was tokenised, so ``bits_per_byte = loss_nats * n_tokens / (ln 2 * n_bytes)`` is
comparable across tokenizers.

Everything is written to a temporary folder next to the output and renamed into place at the end, so a failed or
interrupted run leaves nothing that looks like a prepared dataset. A second call with the same parameters returns
the existing dataset without redoing any work.

Reading: :class:`Batches` cuts the token files into deterministic windows (training batches, evaluation windows);
:func:`resolve_data` turns a ``--data`` argument (a path, ``default``, ``sample`` or nothing: the data a checkpoint
records) into a data directory; :func:`check_vocab` and :func:`check_token_ids` check data against a model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .cache import default_cache_dir, file_lock
from .errors import ConfigError, DataError
from .outputs import check_output_dir, install_dir
from .sources import Document, fetch_source, source_specs

FORMAT = "treeffn-data"
FORMAT_VERSION = 1
EOT_TOKEN = "<|endoftext|>"
DEFAULT_SOURCES = ("shakespeare", "brown", "bible", "austen")
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
SPLITS = ("train", "val")
USER_SOURCE = "text"
SAMPLE_SOURCE = "sample"

_TOKEN_DTYPE = np.uint16
_MAX_VOCAB = int(np.iinfo(_TOKEN_DTYPE).max) + 1
_MIN_VOCAB = 256 + 1  # the byte alphabet plus the end-of-text token
_SAMPLE_DOC_CHARS = 8_000  # prepare_sample cuts the sample into documents of about this size
_MIN_SPLIT_PIECES = 20  # a corpus of a single document is cut into at least this many pieces for a validation split
_ENCODE_BATCH_CHARS = 2_000_000  # bounds the memory held by one encode_batch call (Encodings carry offsets too)
# Text counts as binary when more than this share of characters are control characters other than whitespace.
_MAX_CONTROL_RATIO = 0.01
_CONTROL_RE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_NO_DATA_HINT = "run `treeffn data prepare`"


def default_data_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``treeffn data prepare`` writes by default: ``<cache>/data/default``."""
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "data" / "default"


def sample_data_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the committed text sample is prepared (``--data sample``): ``<cache>/data/sample``."""
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "data" / "sample"


def sample_text_path() -> Path:
    """The committed English sample (Shakespeare, Austen, King James Bible) used by tests and tiny runs."""
    return Path(str(resources.files("treeffn") / "assets" / "sample.txt"))


# ---------------------------------------------------------------------------------------------------------------------
# Reading user text


def decode_text_file(path: Path, data: bytes) -> str:
    """Validated text of a user file: reject empty, binary and non-UTF-8 input with a DataError naming the file."""
    if not data.strip():
        raise DataError(f"{path}: file is empty")
    if b"\x00" in data:
        raise DataError(f"{path}: looks binary (contains NUL bytes), expected UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (bad byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    if len(_CONTROL_RE.findall(text)) > _MAX_CONTROL_RATIO * len(text):
        raise DataError(f"{path}: looks binary (too many control characters), expected UTF-8 text")
    if not text.strip():  # e.g. only a byte-order mark and Unicode spaces
        raise DataError(f"{path}: file is empty")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl_documents(path: Path, text: str) -> list[Document]:
    """One document per line of a JSON-lines file, taken from its ``text`` field."""
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{lineno}: not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected a JSON object with a string `text` field")
        if record["text"].strip():
            docs.append(Document(USER_SOURCE, f"{path}:{lineno}", record["text"]))
    if not docs:
        raise DataError(f"{path}: no non-empty `text` fields")
    return docs


def _expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files named directly, plus *.txt/*.md/*.jsonl found recursively in named folders, in a stable order."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"{path}: folder holds no {'/'.join('*' + s for s in TEXT_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def read_user_documents(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Document], list[dict[str, str]]]:
    """Documents from user files/folders, and a fingerprint (path, sha256) of each file for the parameters hash."""
    docs: list[Document] = []
    fingerprints = []
    for path in _expand_paths(paths):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror})") from None
        text = decode_text_file(path, data)
        if path.suffix.lower() == ".jsonl":
            docs.extend(_jsonl_documents(path, text))
        else:
            docs.append(Document(USER_SOURCE, str(path), text))
        fingerprints.append({"path": str(path.resolve()), "sha256": hashlib.sha256(data).hexdigest()})
    return docs, fingerprints


def split_into_pieces(text: str, max_chars: int) -> list[str]:
    """Cut text into pieces of about ``max_chars`` or less, after blank lines where possible, else after newlines.

    Pieces are exact consecutive slices (only whitespace-only ones are dropped), so their byte counts add up to the
    text's. A piece is longer than ``max_chars`` only when a single paragraph is.
    """
    for pattern in (r"\n[ \t]*\n(?:[ \t]*\n)*", r"\n"):
        cuts = [m.end() for m in re.finditer(pattern, text) if m.end() < len(text)]
        if cuts:
            break
    else:
        cuts = list(range(max_chars, len(text), max_chars))  # one long line: fixed-size slices
    pieces = []
    start = last = 0
    for cut in cuts + [len(text)]:
        if cut - start > max_chars and last > start:
            pieces.append(text[start:last])
            start = last
        last = cut
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def _split_single_documents(docs: list[Document]) -> list[Document]:
    """When no source has two documents there is nothing whole to hold out, so cut each document into pieces."""
    out = []
    for doc in docs:
        max_chars = max(1, math.ceil(len(doc.text) / _MIN_SPLIT_PIECES))
        pieces = split_into_pieces(doc.text, max_chars)
        out.extend(Document(doc.source, f"{doc.name}#{i}", p) for i, p in enumerate(pieces))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Choosing validation documents


def _by_source(docs: Sequence[Document]) -> dict[str, list[Document]]:
    groups: dict[str, list[Document]] = {}
    for doc in docs:
        groups.setdefault(doc.source, []).append(doc)
    return groups


def split_documents(
    docs: Sequence[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents, per source, until about ``val_fraction`` of that source's bytes are held out.

    Every source with at least two documents gives at least one to validation and keeps at least one for training;
    the choice depends only on the seed and the document names, not on fetch order.
    """
    train: list[Document] = []
    val: list[Document] = []
    for source, group in _by_source(docs).items():
        group = sorted(group, key=lambda d: d.name)
        if len(group) < 2:
            train.extend(group)
            continue
        order = list(range(len(group)))
        random.Random(f"{seed}:{source}").shuffle(order)
        target = val_fraction * sum(d.n_bytes for d in group)
        held: set[int] = set()
        held_bytes = 0
        for i in order[:-1]:
            if held and held_bytes >= target:
                break
            held.add(i)
            held_bytes += group[i].n_bytes
        val.extend(d for i, d in enumerate(group) if i in held)
        train.extend(d for i, d in enumerate(group) if i not in held)
    # Mix the registers in the training file, so that reading it in order is not four corpora back to back.
    random.Random(f"{seed}:train-order").shuffle(train)
    return train, val


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and token files


def load_fixed_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """An existing ``tokenizer.json`` (or a checkpoint folder holding one), e.g. to fine-tune an imported model on
    this corpus with its own vocabulary. It must know ``<|endoftext|>``, the document separator."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"tokenizer file not found: {p}")
    try:
        tokenizer = Tokenizer.from_file(str(p))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions for bad files
        raise DataError(f"{p} is not a tokenizers JSON file ({str(exc).splitlines()[0] if str(exc) else exc})")
    if tokenizer.token_to_id(EOT_TOKEN) is None:
        raise DataError(f"tokenizer {p} has no {EOT_TOKEN} token, which separates documents in the token files")
    return tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int, progress: bool) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenisation, lossless) with ``<|endoftext|>`` as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _batches(docs: Sequence[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        if batch and size + len(doc.text) > _ENCODE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
        batch.append(doc)
        size += len(doc.text)
    if batch:
        yield batch


def write_tokens(
    tokenizer: Tokenizer, docs: Sequence[Document], path: Path, split: str, progress: bool
) -> list[dict[str, Any]]:
    """Encode documents to ``path`` as uint16, each preceded by the end-of-text id; returns per-document records."""
    from tqdm.auto import tqdm

    eot_id = tokenizer.token_to_id(EOT_TOKEN)
    # encode_batch_fast (tokenizers >= 0.20) skips computing character offsets, which we do not need.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    records = []
    offset = 0
    total = sum(d.n_bytes for d in docs)
    with open(path, "wb") as fh, tqdm(
        total=total, unit="B", unit_scale=True, desc=f"tokenising {split}", disable=not progress
    ) as bar:
        for batch in _batches(docs):
            encodings = encode([d.text for d in batch], add_special_tokens=False)
            for doc, enc in zip(batch, encodings):
                ids = np.empty(len(enc.ids) + 1, dtype=_TOKEN_DTYPE)
                ids[0] = eot_id
                ids[1:] = enc.ids
                ids.tofile(fh)
                record = {"source": doc.source, "name": doc.name, "bytes": doc.n_bytes}
                records.append({**record, "start": offset + 1, "tokens": len(enc.ids)})
                offset += len(ids)
                bar.update(doc.n_bytes)
    return records


def _sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# Writing a data directory


def _check_replaceable(out_dir: Path, overwrite: bool, inputs: Sequence[Any] = ()) -> None:
    """The shared output guard (:func:`treeffn.outputs.check_output_dir`): an empty folder may be written, an
    earlier treeffn dataset replaced only with ``overwrite``, and never a user's unrelated files or our own inputs."""
    check_output_dir(out_dir, "data", overwrite=overwrite, inputs=inputs)


def _existing(out_dir: Path, params_hash: str) -> dict[str, Any] | None:
    """The meta of a complete dataset prepared with the same parameters, or None."""
    try:
        meta = load_meta(out_dir)
        if meta.get("params_hash") != params_hash:
            return None
        for split in SPLITS:
            load_tokens(out_dir, split)
        if _sha256_file(out_dir / "tokenizer.json") != meta["tokenizer_hash"]:
            return None
    except (DataError, OSError, KeyError):
        return None
    return meta


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished folder into place; an earlier dataset there is moved aside first, then deleted."""
    _check_replaceable(out_dir, overwrite)
    install_dir(tmp, out_dir)


def _source_summary(docs: Sequence[Document], versions: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {
        source: {"version": versions.get(source), "documents": len(group), "bytes": sum(d.n_bytes for d in group)}
        for source, group in _by_source(docs).items()
    }


def _build(
    tmp: Path,
    docs: list[Document],
    params: dict[str, Any],
    versions: dict[str, str],
    progress: bool,
) -> dict[str, Any]:
    """Tokenizer, token files and meta.json for ``docs`` inside ``tmp``; returns the meta."""
    train, val = split_documents(docs, params["val_fraction"], params["seed"])
    if not val:
        raise DataError("cannot hold out a validation document: the corpus has fewer than two documents")
    if params.get("tokenizer"):
        tokenizer = load_fixed_tokenizer(params["tokenizer"]["path"])
    else:
        tokenizer = train_tokenizer([d.text for d in train], params["vocab_size"], progress)
    tokenizer.save(str(tmp / "tokenizer.json"))
    if hasattr(tokenizer, "encode_special_tokens"):
        # Corpus text that happens to spell "<|endoftext|>" stays text; only our separators are end-of-text ids.
        tokenizer.encode_special_tokens = True
    documents = {
        split: write_tokens(tokenizer, split_docs, tmp / f"{split}.bin", split, progress)
        for split, split_docs in (("train", train), ("val", val))
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "params_hash": _params_hash(params),
        "params": params,
        "vocab_size": tokenizer.get_vocab_size(),
        "eot_id": tokenizer.token_to_id(EOT_TOKEN),
        "eot_token": EOT_TOKEN,
        "dtype": np.dtype(_TOKEN_DTYPE).name,
        "layout": "each document is preceded by eot_id",
        "tokenizer_file": "tokenizer.json",
        "tokenizer_hash": _sha256_file(tmp / "tokenizer.json"),
        "tokens": {s: len(documents[s]) + sum(r["tokens"] for r in documents[s]) for s in SPLITS},
        "bytes": {s: sum(r["bytes"] for r in documents[s]) for s in SPLITS},
        "n_documents": {s: len(documents[s]) for s in SPLITS},
        "sources": _source_summary(docs, versions),
        "documents": documents,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return meta


def _print_summary(meta: dict[str, Any], out_dir: Path, seconds: float | None) -> None:
    took = f" in {seconds:.1f} s" if seconds is not None else " (already prepared)"
    print(f"data in {out_dir}{took}: vocab {meta['vocab_size']}, eot id {meta['eot_id']}")
    for split in SPLITS:
        print(
            f"  {split:5s} {meta['tokens'][split]:>11,} tokens {meta['bytes'][split]:>12,} bytes "
            f"{meta['n_documents'][split]:>5} documents"
        )


def _prepare_documents(
    out_dir: Path,
    gather: Any,
    params: dict[str, Any],
    progress: bool,
    overwrite: bool = False,
    inputs: Sequence[Any] = (),
) -> dict[str, Any]:
    """Shared tail of :func:`prepare` and :func:`prepare_sample`: reuse, or gather documents and build atomically.

    ``gather`` is a callable returning (documents, source versions); it runs only when there is work to do, so a
    prepared dataset is returned without fetching anything. A dataset prepared with other parameters is replaced
    only with ``overwrite``; ``inputs`` (the paths read) must not be ``out_dir`` nor lie inside it.
    """
    _check_replaceable(out_dir, True, inputs)  # inputs and unrelated folders first, before any work
    # Serialise preparations of one output folder: a second process waits, then finds the first one's result.
    with file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        meta = _existing(out_dir, _params_hash(params))
        if meta is not None:
            if progress:
                _print_summary(meta, out_dir, None)
            return {**meta, "data_dir": str(out_dir), "reused": True}
        _check_replaceable(out_dir, overwrite, inputs)
        started = time.perf_counter()
        docs, versions = gather()
        if not any(len(group) >= 2 for group in _by_source(docs).values()):
            docs = _split_single_documents(docs)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the finished dataset should read like any other folder
            meta = _build(tmp, docs, params, versions, progress)
            _install(tmp, out_dir, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if progress:
        _print_summary(meta, out_dir, time.perf_counter() - started)
    return {**meta, "data_dir": str(out_dir), "reused": False}


def _check_params(vocab_size: int, val_fraction: float) -> None:
    if not isinstance(vocab_size, int) or not _MIN_VOCAB <= vocab_size <= _MAX_VOCAB:
        raise ConfigError(f"vocab_size must be an integer in [{_MIN_VOCAB}, {_MAX_VOCAB}], got {vocab_size!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")


def prepare(
    out_dir: str | os.PathLike[str] | None = None,
    sources: Sequence[str] | None = DEFAULT_SOURCES,
    text_paths: Sequence[str | os.PathLike[str]] | None = None,
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    tokenizer: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare a training corpus from named sources and/or user text; returns meta.json plus ``data_dir``/``reused``.

    ``text_paths`` may name UTF-8 text files (one document each), ``.jsonl`` files (one document per line, from its
    ``text`` field) and folders (searched recursively for *.txt, *.md and *.jsonl). ``out_dir`` defaults to
    :func:`default_data_dir`. A dataset already there with the same parameters and inputs is returned untouched.
    ``tokenizer`` (a ``tokenizer.json`` or a checkpoint folder) replaces BPE training: the token files then use that
    vocabulary, and ``vocab_size`` is ignored. A dataset prepared with other parameters is replaced only with
    ``overwrite``; a folder that is not a treeffn dataset, or that holds the text or tokenizer read, never is.
    """
    fixed = None
    if tokenizer is not None:
        tok = load_fixed_tokenizer(tokenizer)
        path = Path(tokenizer).expanduser()
        path = path / "tokenizer.json" if path.is_dir() else path
        fixed = {"path": str(path.resolve()), "sha256": _sha256_file(path)}
        vocab_size = tok.get_vocab_size()
    else:
        _check_params(vocab_size, val_fraction)
    sources = tuple(sources or ())
    specs = source_specs()
    unknown = [s for s in sources if s not in specs]
    if unknown:
        raise DataError(f"unknown data source {unknown[0]!r}; choose from {', '.join(specs)}")
    if len(set(sources)) != len(sources):
        raise DataError(f"data source listed twice: {', '.join(sources)}")
    if not sources and not text_paths:
        raise DataError("nothing to prepare: give at least one data source or text path")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = Path(out_dir).expanduser() if out_dir is not None else default_data_dir(cache)
    # User text is read (and validated) up front: its content is part of the parameters hash.
    user_docs, fingerprints = read_user_documents(text_paths or ())
    versions = {s: specs[s].version for s in sources}
    params = {
        "format_version": FORMAT_VERSION,
        "sources": [{"name": s, "version": versions[s]} for s in sources],
        "text": fingerprints,
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    if fixed is not None:
        params["tokenizer"] = fixed

    def gather() -> tuple[list[Document], dict[str, str]]:
        from tqdm.auto import tqdm

        docs: list[Document] = []
        for name in tqdm(sources, desc="fetching sources", disable=not progress or not sources):
            docs.extend(fetch_source(name, cache))
        return docs + user_docs, versions

    inputs = [*(text_paths or ()), tokenizer]
    return _prepare_documents(out, gather, params, progress, overwrite, inputs)


def prepare_sample(
    out_dir: str | os.PathLike[str] | None = None, vocab_size: int = 512, seed: int = 0, progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """A tiny dataset from the committed ``assets/sample.txt`` (cut into ~8 KB documents); takes a few seconds.

    ``out_dir`` defaults to :func:`sample_data_dir`. A sample prepared with other parameters in ``out_dir`` is
    replaced only with ``overwrite``."""
    _check_params(vocab_size, 0.05)
    path = sample_text_path()
    data = path.read_bytes()
    params = {
        "format_version": FORMAT_VERSION,
        "sample": hashlib.sha256(data).hexdigest(),
        "vocab_size": vocab_size,
        "val_fraction": 0.05,
        "seed": seed,
    }

    def gather() -> tuple[list[Document], dict[str, str]]:
        pieces = split_into_pieces(decode_text_file(path, data), _SAMPLE_DOC_CHARS)
        docs = [Document(SAMPLE_SOURCE, f"sample-{i:03d}", p) for i, p in enumerate(pieces)]
        return docs, {SAMPLE_SOURCE: params["sample"][:12]}

    out = Path(out_dir).expanduser() if out_dir is not None else sample_data_dir()
    return _prepare_documents(out, gather, params, progress, overwrite)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """meta.json of a prepared data directory; a DataError if it is missing, corrupt or of another format."""
    path = Path(data_dir).expanduser() / "meta.json"
    if not path.is_file():
        raise DataError(f"no prepared data in {Path(data_dir)}; {_NO_DATA_HINT}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(f"corrupt {path}; {_NO_DATA_HINT}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not treeffn data; {_NO_DATA_HINT}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has data format {meta.get('format_version')}, this treeffn reads {FORMAT_VERSION}; {_NO_DATA_HINT}"
        )
    return meta


def load_tokens(data_dir: str | os.PathLike[str], split: str) -> np.memmap:
    """Read-only uint16 memmap of one split's token ids, checked against the count in meta.json."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    meta = load_meta(data_dir)
    path = Path(data_dir).expanduser() / f"{split}.bin"
    expected = int(meta["tokens"][split]) * np.dtype(_TOKEN_DTYPE).itemsize
    try:
        size = path.stat().st_size
    except OSError:
        raise DataError(f"missing {path}; {_NO_DATA_HINT}") from None
    if size != expected or expected == 0:
        raise DataError(f"corrupt {path}: {size} bytes, meta.json says {expected}; {_NO_DATA_HINT}")
    return np.memmap(path, dtype=_TOKEN_DTYPE, mode="r")


def load_tokenizer(data_dir: str | os.PathLike[str]) -> Tokenizer:
    """The data directory's tokenizer, checked against the hash recorded in meta.json."""
    meta = load_meta(data_dir)
    path = Path(data_dir).expanduser() / meta.get("tokenizer_file", "tokenizer.json")
    try:
        if _sha256_file(path) != meta.get("tokenizer_hash"):
            raise DataError(f"{path} does not match meta.json (tokenizer changed); {_NO_DATA_HINT}")
        return Tokenizer.from_file(str(path))
    except OSError:
        raise DataError(f"missing {path}; {_NO_DATA_HINT}") from None
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        if isinstance(exc, DataError):
            raise
        raise DataError(f"corrupt {path}: {exc}; {_NO_DATA_HINT}") from None


def check_token_ids(ids: Any, vocab_size: int) -> None:
    """DataError naming the first offending id when any id is outside ``[0, vocab_size)``.

    Accepts a list of ints, a numpy array or a torch tensor (checked with its own min/max, so no copy to host
    beyond two scalars).
    """
    if hasattr(ids, "numel") and hasattr(ids, "min"):  # torch tensor
        if ids.numel() == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        bad = high if high >= vocab_size else low if low < 0 else None
    else:
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"token ids must be integers, got {arr.dtype}")
        wrong = np.flatnonzero((arr.ravel() < 0) | (arr.ravel() >= vocab_size))
        bad = int(arr.ravel()[wrong[0]]) if wrong.size else None
    if bad is not None:
        raise DataError(f"token id {bad} is out of range for vocab size {vocab_size}")


def check_vocab(meta: dict[str, Any], vocab_size: int, data_dir: str | os.PathLike[str],
                hint: str = "pass the data the model was trained on with --data") -> None:
    """DataError unless the prepared data in ``data_dir`` (whose meta.json is ``meta``) has the vocabulary size
    ``vocab_size`` of the model that is to read it; ``hint`` says what to do instead."""
    if int(meta["vocab_size"]) != int(vocab_size):
        raise DataError(f"the data in {data_dir} has a vocabulary of {meta['vocab_size']} tokens, the model "
                        f"{vocab_size}; {hint}")


class TextCodec:
    """Text <-> token ids with a prepared data directory's tokenizer."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        meta = load_meta(data_dir)
        self._init(load_tokenizer(data_dir), int(meta["eot_id"]))

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> TextCodec:
        """A codec for a tokenizer held elsewhere (for example one saved inside a checkpoint)."""
        eot_id = tokenizer.token_to_id(EOT_TOKEN)
        if eot_id is None:
            raise DataError(f"tokenizer has no {EOT_TOKEN} token")
        codec = cls.__new__(cls)
        codec._init(tokenizer, eot_id)
        return codec

    def _init(self, tokenizer: Tokenizer, eot_id: int) -> None:
        self.tokenizer = tokenizer
        self.eot_id = eot_id
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; a literal ``<|endoftext|>`` in it becomes the end-of-text id."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], skip_eot: bool = False) -> str:
        """Text of token ids (end-of-text ids appear as ``<|endoftext|>`` unless ``skip_eot``)."""
        ids = [int(i) for i in ids]
        check_token_ids(ids, self.vocab_size)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_eot)


# ---------------------------------------------------------------------------------------------------------------------
# Windows of a token file


def hash_ints(*xs: int) -> int:
    """A seed from a few integers (FNV-1a style, 61 bits): the same numbers give the same seed on every platform."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


class Batches:
    """Deterministic random windows of a uint16 token memmap.

    A training batch is a pure function of (seed, step, micro-step): the global batch is drawn from a generator seeded
    by those numbers and each of ``world`` processes takes its own contiguous slice, so the data position of a run is
    its step and a resumed run reads exactly what an uninterrupted one would.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, vocab_size: int):
        if len(tokens) < seq_len + 2:
            raise DataError(f"the corpus has {len(tokens)} tokens, fewer than one training window of {seq_len + 1}")
        check_token_ids(tokens[: min(len(tokens), 1 << 20)], vocab_size)  # cheap spot check; full one at prepare
        self.tokens, self.seq_len = tokens, seq_len

    def window(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, (len(starts), seq_len) each, of the windows starting at ``starts``."""
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[s: s + T + 1], dtype=np.int64) for s in starts.tolist()])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def train_batch(self, seed: int, step: int, micro: int, batch: int, rank: int = 0,
                    world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Process ``rank``'s slice (``batch // world`` windows) of the global batch of (seed, step, micro)."""
        g = torch.Generator().manual_seed(hash_ints(seed, step, micro))
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (batch,), generator=g)
        per = batch // world
        return self.window(starts[rank * per: (rank + 1) * per])

    def eval_starts(self, n_windows: int) -> torch.Tensor:
        """Evenly spaced, non-overlapping windows: the same ones every evaluation."""
        total = (len(self.tokens) - 1) // self.seq_len
        n = total if n_windows <= 0 else min(n_windows, total)
        idx = torch.linspace(0, total - 1, n).round().long()
        return idx * self.seq_len


# ---------------------------------------------------------------------------------------------------------------------
# Which data: --data arguments and the data a checkpoint records

DATA_RECORD = "data.json"  # in a checkpoint folder: the data the model was trained on (data_record)


def data_record(data_dir: str | os.PathLike[str], meta: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint folder records as ``data.json`` about the data it was trained on."""
    return {"data_dir": str(data_dir), "vocab_size": meta["vocab_size"], "eot_id": meta.get("eot_id")}


def data_location(name: str | os.PathLike[str] | None = None,
                  recorded_in: str | os.PathLike[str] | None = None) -> Path:
    """Where a ``--data`` argument points, without preparing anything (see :func:`resolve_data`)."""
    if name is None and recorded_in is not None:
        record = Path(recorded_in) / DATA_RECORD
        if not record.is_file():
            raise DataError(f"{recorded_in} does not record its training data; pass --data DIR")
        try:
            return Path(json.loads(record.read_text(encoding="utf-8"))["data_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"{record} is corrupt; pass --data DIR") from None
    if name is None or name == "default":
        return default_data_dir()
    if name == "sample":
        return sample_data_dir()
    return Path(name)


def resolve_data(name: str | os.PathLike[str] | None = None, recorded_in: str | os.PathLike[str] | None = None,
                 fetch_default: bool = False, progress: bool = False) -> Path:
    """A ``--data`` argument -> a prepared data directory.

    ``None`` is the data recorded in the checkpoint folder ``recorded_in`` (its data.json) when one is given, else
    the default corpus; ``default`` is the default corpus in treeffn's cache (fetched and prepared here only with
    ``fetch_default``; otherwise ``treeffn data prepare`` does that); ``sample`` is the committed text sample,
    prepared on the fly into treeffn's cache; anything else is a path.
    """
    where = data_location(name, recorded_in)
    if name == "sample":
        prepare_sample(where, progress=progress, overwrite=True)  # treeffn's own cache: a stale sample is replaced
    elif fetch_default and where == default_data_dir():
        prepare(where, progress=progress, overwrite=True)  # treeffn's own cache
    return where


__all__ = [
    "DATA_RECORD",
    "DEFAULT_SOURCES",
    "EOT_TOKEN",
    "FORMAT_VERSION",
    "Batches",
    "TextCodec",
    "check_token_ids",
    "check_vocab",
    "data_location",
    "data_record",
    "decode_text_file",
    "default_data_dir",
    "hash_ints",
    "load_meta",
    "load_tokenizer",
    "load_tokens",
    "prepare",
    "prepare_sample",
    "read_user_documents",
    "resolve_data",
    "sample_data_dir",
    "sample_text_path",
    "split_documents",
    "split_into_pieces",
]
