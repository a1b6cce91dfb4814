"""No stale references: files named in the code, tests and docs exist, and notes that were never part of the
repository (``tree-ffn.md``, ``docs/reference``) are not cited."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".cpp", ".toml", ".yaml", ".txt", ""}
GONE = ("tree-ffn.md", "docs/reference")


def _files():
    for top in ("src", "tests", "docs", "experiments", ".ci"):
        for p in sorted((ROOT / top).rglob("*")):
            if p.is_file() and p.suffix in SUFFIXES and ".egg-info" not in str(p) and "__pycache__" not in str(p):
                yield p
    for name in ("README.md", "Makefile", "pyproject.toml"):
        yield ROOT / name


def _text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""


def test_gone_notes_are_not_cited():
    me = Path(__file__).resolve()
    found = {}
    for p in _files():
        if p.resolve() == me:
            continue
        rel = p.relative_to(ROOT).as_posix()
        hits = [g for g in GONE if g in _text(p)]
        if hits:
            found[rel] = hits
    assert not found, f"references to notes that do not exist: {found}"


def test_named_test_files_exist():
    """Every tests/test_*.py a docstring or comment names is a file of the repository."""
    missing = set()
    for p in _files():
        for name in re.findall(r"tests/test_\w+\.py", _text(p)):
            if not (ROOT / name).is_file():
                missing.add((p.relative_to(ROOT).as_posix(), name))
    assert not missing, f"references to test files that do not exist: {sorted(missing)}"
