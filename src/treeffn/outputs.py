"""Output folders: what treeffn writes, how it is made durable, and the guard every command calls first.

:func:`check_output_dir` is the one guard every command that writes a folder (train, demo, convert, import-gguf,
prune, export-hf, analyze, data prepare) calls before it writes. It refuses a target that is the command's own input
or contains it, and an existing, non-empty target that is not a treeffn folder of the kind the command writes
(:func:`output_kind`); a treeffn folder of that kind is replaced only when the user passed ``--overwrite``.

Folders are built under a hidden ``.tmp-*`` name and published with :func:`install_dir`, which moves an old folder
aside before deleting it; every rename that publishes something is followed by an fsync of the parent directory
(:func:`fsync_dir`), so it survives a power loss. :func:`write_json_atomic` does the same for one JSON file.

This module sits below :mod:`treeffn.checkpoint` and :mod:`treeffn.data` (both write folders) and imports neither.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError

# the pointer file of a training run: RUN/checkpoint.json names its latest checkpoint folder (treeffn.checkpoint)
POINTER = "checkpoint.json"

# what each kind of treeffn output folder is called in messages (see output_kind)
OUTPUT_KINDS = {
    "checkpoint": "a treeffn checkpoint folder",
    "run": "a treeffn training run",
    "data": "a treeffn data directory",
    "hf": "a treeffn Hugging Face export",
    "analysis": "a treeffn routing analysis (treeffn analyze)",
}


def fsync_dir(path: Path) -> None:
    """fsync a directory, making the renames and creations inside it durable; a no-op where directories cannot be
    opened (no ``os.O_DIRECTORY``, e.g. Windows)."""
    flag = getattr(os, "O_DIRECTORY", None)
    if flag is None:
        return
    fd = os.open(str(path), os.O_RDONLY | flag)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _json_file(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def is_checkpoint_dir(path: Path) -> bool:
    """A checkpoint folder: model.safetensors and a config.json holding a treeffn Config (not an HF export)."""
    path = Path(path)
    cfg = _json_file(path / "config.json")
    return (path / "model.safetensors").is_file() and isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) \
        and "model_type" not in cfg


def output_kind(path: str | Path) -> str | None:
    """What treeffn folder ``path`` is: ``checkpoint``, ``run`` (a pointer, or the metrics of a run that had not
    saved yet), ``data``, ``hf`` (written by export-hf), ``analysis`` (written by analyze), ``empty`` (an empty
    folder), or None (anything else,
    including a path that does not exist or is not a folder)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if not any(path.iterdir()):
        return "empty"
    pointer = _json_file(path / POINTER)
    if isinstance(pointer, dict) and "latest" in pointer:
        return "run"
    if (path / "metrics.jsonl").is_file():  # a run killed before its first checkpoint (possibly mid-write)
        try:
            with open(path / "metrics.jsonl", encoding="utf-8") as f:
                first = f.readline(200)
        except (OSError, UnicodeDecodeError):
            first = None
        if first is not None and (first == "" or first.startswith('{"event": "start"')):
            return "run"
    cfg = _json_file(path / "config.json")
    if isinstance(cfg, dict) and cfg.get("model_type") == "treeffn" and (path / "model.safetensors").is_file():
        return "hf"
    if is_checkpoint_dir(path):
        return "checkpoint"
    meta = _json_file(path / "meta.json")
    if isinstance(meta, dict) and meta.get("format") == "treeffn-data":
        return "data"
    analysis = _json_file(path / "analysis.json")
    if isinstance(analysis, dict) and "checkpoint" in analysis and "layers" in analysis:
        return "analysis"
    return None


def check_output_dir(out: str | Path, kind: str, overwrite: bool = False, inputs=(), flag: str = "--out",
                     hint: str = "pass --overwrite to replace it") -> Path:
    """The guard of every command that writes a folder; returns ``out`` as a Path, or raises :class:`OutputError`.

    Refused, whatever ``overwrite`` says: ``out`` is one of ``inputs`` (paths the command reads; None entries are
    ignored) or contains one; ``out`` exists and is not a folder; ``out`` is a non-empty folder that is not a treeffn
    folder of ``kind`` (a key of :data:`OUTPUT_KINDS`). A treeffn folder of ``kind`` is accepted only with
    ``overwrite`` (the command then replaces it); otherwise the message ends with ``hint``. A missing or empty
    folder is always accepted.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    out = Path(out).expanduser()
    target = out.resolve()
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        p = Path(inp).expanduser().resolve()
        if p == target:
            raise OutputError(f"{flag} {out} is the command's own input ({inp}); choose another folder")
        if target in p.parents:
            raise OutputError(f"{flag} {out} contains the command's input {inp}; choose another folder")
    ancestor = target
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor != target and not ancestor.is_dir():
        raise OutputError(f"{flag} {out}: {ancestor} is a file, not a folder")
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir():
        raise OutputError(f"{flag} {out} exists and is not a folder; refusing to replace it")
    found = output_kind(out)
    if found == "empty":
        return out
    if found != kind:
        raise OutputError(f"{flag} {out} exists and is not {OUTPUT_KINDS[kind]}; refusing to replace it (choose "
                          "another folder)")
    if not overwrite:
        raise OutputError(f"{flag} {out} already holds {OUTPUT_KINDS[kind]}; {hint}")
    return out


def remove_output_dir(out: str | Path, kind: str) -> None:
    """Delete ``out`` when it is a treeffn folder of ``kind`` (after :func:`check_output_dir` accepted replacing
    it); anything else is left alone."""
    out = Path(out).expanduser()
    if output_kind(out) == kind:
        shutil.rmtree(out)


def install_dir(tmp: Path, folder: Path) -> None:
    """Move the complete folder ``tmp`` to ``folder`` (same parent), replacing what is there: the old folder is
    moved aside first and deleted only after the new one is in place; both renames are made durable."""
    tmp, folder = Path(tmp), Path(folder)
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{folder.name}-", dir=folder.parent))
        os.replace(folder, old / "dir")
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
        fsync_dir(folder.parent)


__all__ = [
    "OUTPUT_KINDS",
    "POINTER",
    "check_output_dir",
    "fsync_dir",
    "install_dir",
    "is_checkpoint_dir",
    "output_kind",
    "remove_output_dir",
    "write_json_atomic",
]
