"""treeffn's cache folder, and fetching packages into it with their ordinary clients.

The cache is ``$TREEFFN_CACHE`` or ``~/.cache/treeffn`` (:func:`default_cache_dir`); every module that keeps files
between runs (corpora, benchmark data, imported models, compiled kernels) asks this module where it is. Layout of the
parts kept here::

    downloads/<archive>              a package exactly as its client (pip, npm, apt-get) fetched it
    locks/<name>.lock                serialises concurrent fetches of one thing (:func:`cache_lock`)

A download is made in a hidden temporary folder inside ``downloads/`` and renamed into place, so an interrupted fetch
never leaves something that a later call would take as complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import DataError

# Fetching runs package managers; a hung mirror should fail loudly rather than stall `treeffn data prepare` forever.
COMMAND_TIMEOUT_S = 900


def default_cache_dir() -> Path:
    """``$TREEFFN_CACHE`` or ``~/.cache/treeffn``."""
    return Path(os.environ.get("TREEFFN_CACHE", Path.home() / ".cache" / "treeffn")).expanduser()


def run_client(source: str, cmd: Sequence[str], cwd: Path) -> None:
    """Run one client command; any failure becomes a one-line DataError naming the source and the command."""
    shown = " ".join(cmd[2:] if cmd[:2] == [sys.executable, "-m"] else cmd)
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise DataError(f"cannot fetch {source}: `{cmd[0]}` is not installed (needed for `{shown}`)") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"cannot fetch {source}: `{shown}` timed out after {COMMAND_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR", "npm ERR", "npm error"))]
        detail = (errors or lines or ["no output"])[-1]
        raise DataError(f"cannot fetch {source}: `{shown}` failed (exit {proc.returncode}): {detail}")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed), released on exit or process death."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cache_lock(cache_dir: Path, name: str) -> contextlib.AbstractContextManager[None]:
    """``locks/<name>.lock`` in the cache: one lock per fetched thing, so two processes do not both download it."""
    return file_lock(cache_dir / "locks" / f"{name}.lock")


def cached_download(
    source: str, cache_dir: Path, pattern: str, fetch: Callable[[Path], None], command_hint: str
) -> Path:
    """Return ``downloads/<file matching pattern>``, running ``fetch(tmp_dir)`` first if it is not there yet."""
    downloads = cache_dir / "downloads"
    found = sorted(p for p in downloads.glob(pattern) if p.is_file())
    if found:
        return found[-1]
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=f".tmp-{source}-") as tmp:
        fetch(Path(tmp))
        produced = sorted(p for p in Path(tmp).glob(pattern) if p.is_file())
        if not produced:
            raise DataError(f"cannot fetch {source}: `{command_hint}` produced no file matching {pattern}")
        final = downloads / produced[-1].name
        os.replace(produced[-1], final)
    return final


def pip_download(source: str, requirement: str, sdist_only: bool) -> Callable[[Path], None]:
    """A ``fetch`` for :func:`cached_download`: ``pip download --no-deps`` of one requirement into its folder."""

    def fetch(tmp: Path) -> None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input"]
        if sdist_only:
            cmd += ["--no-binary", ":all:"]
        run_client(source, cmd + [requirement, "-d", str(tmp)], cwd=tmp)

    return fetch


__all__ = [
    "cache_lock",
    "cached_download",
    "default_cache_dir",
    "file_lock",
    "pip_download",
    "run_client",
]
