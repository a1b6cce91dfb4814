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


def _module_files() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def test_no_import_cycles():
    """Between modules of the package, counting imports inside functions too (a package's __init__ aside)."""
    files = _module_files()
    graph = {}
    for name, f in files.items():
        deps = set()
        for m in _imports(f):
            while m not in files and "." in m:
                m = m.rsplit(".", 1)[0]
            if m in files and m != name and not (files[m].name == "__init__.py" and name.startswith(m + ".")):
                deps.add(m)
        graph[name] = deps
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_no_module_imports_another_modules_private_names():
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("treeffn")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{f.relative_to(PKG)} imports private {private} from {node.module}"


def test_shared_helpers_do_not_live_in_the_training_loop():
    """Batches live with the data, device resolution in treeffn.device: only the commands that train import it."""
    for f in PKG.rglob("*.py"):
        if f.name in ("cli.py", "demo.py"):
            continue
        assert not any(m == "treeffn.train" or m.startswith("treeffn.train.") for m in _imports(f)), \
            f"{f.relative_to(PKG)} imports treeffn.train"


def test_the_cache_folder_is_read_in_one_place():
    readers = sorted(str(f.relative_to(PKG)) for f in PKG.rglob("*.py") if '"TREEFFN_CACHE"' in f.read_text())
    assert readers == ["cache.py"], readers
