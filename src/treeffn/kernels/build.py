"""Compile-on-first-use C++ extensions, cached between runs.

Each kernel lives in ``kernels/csrc/<name>.cpp`` and is built with ``torch.utils.cpp_extension.load`` (ninja,
``-O3 -march=native -fopenmp``, and ``-mprefer-vector-width=512`` where PyTorch itself runs AVX-512 kernels). The
build directory is ``$TREEFFN_CACHE/kernels`` (default ``~/.cache/treeffn/kernels``), keyed by the hash of the source,
the shared headers of ``csrc`` and the flags, so the second process loads it in milliseconds.
When no compiler or ninja is available, :func:`load_extension` returns ``None`` once with a one-line warning and
callers fall back to their PyTorch path. ``TREEFFN_NO_EXT=1`` disables compilation entirely.

``TREEFFN_REQUIRE_EXT=1`` turns that fallback into an error: a kernel that cannot be built (or is disabled with
``TREEFFN_NO_EXT``) raises :class:`ExtensionRequiredError` instead, so a CI run (``.ci/run`` sets it) cannot go
green with every kernel test skipped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig
import threading
import warnings
from pathlib import Path

from ..cache import default_cache_dir as cache_root

_CSRC = Path(__file__).parent / "csrc"
_LOCK = threading.Lock()
_CACHE: dict[str, object] = {}


class ExtensionRequiredError(RuntimeError):
    """``TREEFFN_REQUIRE_EXT`` is set and a C++ kernel is unavailable."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _ensure_ninja_on_path() -> None:
    # pip installs ninja next to the interpreter; a venv used without activation lacks it on PATH.
    bindir = str(Path(sys.executable).parent)
    scripts = sysconfig.get_path("scripts")
    for d in (bindir, scripts):
        if d and d not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")


def _wide_vectors() -> bool:
    """Whether loops the compiler vectorises itself should use 512-bit vectors: where PyTorch runs its own AVX-512
    kernels on this CPU (GCC's default for AVX-512 targets is 256-bit, a guard against the clock drop of older
    AVX-512 cores that PyTorch's choice already accepts)."""
    import torch

    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def load_extension(name: str, verbose: bool = False):
    """Build (once) and import the extension ``csrc/<name>.cpp``; ``None`` if it cannot be built (with
    ``TREEFFN_REQUIRE_EXT`` set: :class:`ExtensionRequiredError`)."""
    with _LOCK:
        if name in _CACHE:
            if _CACHE[name] is None and _flag("TREEFFN_REQUIRE_EXT"):
                raise ExtensionRequiredError(f"treeffn: C++ kernel '{name}' is unavailable and TREEFFN_REQUIRE_EXT "
                                             "is set")
            return _CACHE[name]
        module = None
        if _flag("TREEFFN_NO_EXT"):
            if _flag("TREEFFN_REQUIRE_EXT"):
                raise ExtensionRequiredError(f"treeffn: C++ kernel '{name}' is disabled by TREEFFN_NO_EXT but "
                                             "TREEFFN_REQUIRE_EXT is set")
            _CACHE[name] = None
            return None
        try:
            _ensure_ninja_on_path()
            if shutil.which("ninja") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
                raise RuntimeError("ninja or a C++ compiler is not on PATH")
            from torch.utils import cpp_extension

            src = _CSRC / f"{name}.cpp"
            flags = ["-O3", "-fopenmp"]
            if os.environ.get("TREEFFN_PORTABLE_EXT", "") in ("", "0"):
                flags.append("-march=native")
                if _wide_vectors():
                    flags.append("-mprefer-vector-width=512")
            headers = b"".join(h.read_bytes() for h in sorted(_CSRC.glob("*.h")))  # what a source may include
            digest = hashlib.sha1(src.read_bytes() + headers + " ".join(flags).encode()).hexdigest()[:12]
            build_dir = cache_root() / "kernels" / f"{name}-{digest}"
            build_dir.mkdir(parents=True, exist_ok=True)
            module = cpp_extension.load(
                name=f"treeffn_{name}_{digest}",
                sources=[str(src)],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=verbose,
            )
        except Exception as exc:  # noqa: BLE001 - any build failure means "use the PyTorch path"
            if _flag("TREEFFN_REQUIRE_EXT"):
                raise ExtensionRequiredError(
                    f"treeffn: C++ kernel '{name}' could not be built and TREEFFN_REQUIRE_EXT is set "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
            warnings.warn(
                f"treeffn: C++ kernel '{name}' unavailable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "using the PyTorch path",
                RuntimeWarning,
                stacklevel=2,
            )
            module = None
        _CACHE[name] = module
        return module
