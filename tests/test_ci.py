"""CI that can see: a C++ kernel that cannot build fails a CI run instead of skipping every kernel test, skip
reasons are printed, and a missing optional package skips only the tests that need it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from treeffn.kernels import build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(build, "_CACHE", {})
    monkeypatch.delenv("TREEFFN_NO_EXT", raising=False)
    monkeypatch.delenv("TREEFFN_REQUIRE_EXT", raising=False)


def _no_toolchain(monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name: None)


def test_unbuildable_kernel_falls_back_with_a_warning(fresh_cache, monkeypatch):
    _no_toolchain(monkeypatch)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert build.load_extension("tree_infer") is None


def test_require_ext_turns_the_fallback_into_an_error(fresh_cache, monkeypatch):
    _no_toolchain(monkeypatch)
    monkeypatch.setenv("TREEFFN_REQUIRE_EXT", "1")
    with pytest.raises(build.ExtensionRequiredError, match="TREEFFN_REQUIRE_EXT"):
        build.load_extension("tree_infer")
    monkeypatch.setenv("TREEFFN_NO_EXT", "1")  # disabling the kernels contradicts requiring them
    with pytest.raises(build.ExtensionRequiredError, match="TREEFFN_NO_EXT"):
        build.load_extension("tree_train")
    monkeypatch.setenv("TREEFFN_REQUIRE_EXT", "0")  # "0" means off, as for TREEFFN_NO_EXT
    assert build.load_extension("tree_train") is None


def test_ci_requires_the_kernels_and_prints_skip_reasons():
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    require = next(i for i, ln in enumerate(lines) if re.fullmatch(r"export TREEFFN_REQUIRE_EXT=1", ln))
    assert require < lines.index("make test"), "TREEFFN_REQUIRE_EXT must be exported before `make test`"
    make = (ROOT / "Makefile").read_text()
    recipe = make.split("\ntest: install\n", 1)[1].splitlines()[0]
    assert "pytest" in recipe and re.search(r"(^|\s)-[a-zA-Z]*r[a-zA-Z]*s", recipe), recipe


def test_conversion_tests_run_without_gguf(tmp_path):
    """Hide the gguf package: the GGUF tests skip, the conversion tests in the same file still run."""
    target = str(ROOT / "tests" / "test_gguf_convert.py")
    code = ("import sys; sys.modules['gguf'] = None; import pytest; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rs', {target!r}, "
            "'-k', 'least_squares or split_initialisation or cli_import']))")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert re.search(r"\b2 passed\b", res.stdout) and re.search(r"\b1 skipped\b", res.stdout), res.stdout[-2000:]
    assert "gguf" in res.stdout  # the skip reason names what is missing


def test_every_kernel_source_ships_in_the_package():
    """A header the kernels include but the package data leaves out builds in a checkout and fails in a wheel."""
    import fnmatch
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["treeffn"]
    pkg = ROOT / "src" / "treeffn"
    sources = [p.relative_to(pkg).as_posix() for p in (pkg / "kernels" / "csrc").iterdir() if p.is_file()]
    assert sources
    missing = [s for s in sources if not any(fnmatch.fnmatch(s, g) for g in globs)]
    assert not missing, f"kernel sources left out of the package data: {missing}"
