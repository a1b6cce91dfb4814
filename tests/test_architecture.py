"""Layering of the package: the shared maths (treeffn.ops) sits below both the layers and their kernels."""

import ast
from pathlib import Path

import treeffn

PKG = Path(treeffn.__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    """Modules a file imports (relative imports resolved against the package), including inside functions."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    here = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_kernels_and_ops_do_not_import_layers():
    for folder in ("kernels", "ops"):
        for f in (PKG / folder).glob("*.py"):
            bad = sorted(m for m in _imports(f) if m.startswith("treeffn.layers"))
            assert not bad, f"{f.relative_to(PKG)} imports {bad}: shared maths belongs in treeffn.ops"


def test_ops_import_nothing_above_them():
    for f in (PKG / "ops").glob("*.py"):
        bad = sorted(m for m in _imports(f) if m.startswith("treeffn.") and not m.startswith(("treeffn.ops",
                                                                                              "treeffn.errors")))
        assert not bad, f"{f.relative_to(PKG)} imports {bad}"


def test_no_library_module_imports_the_cli():
    for f in PKG.rglob("*.py"):
        if f.name in ("cli.py", "__main__.py"):
            continue
        bad = sorted(m for m in _imports(f) if m == "treeffn.cli" or m.startswith("treeffn.cli."))
        assert not bad, f"{f.relative_to(PKG)} imports the command line ({bad}); shared helpers belong below it"
