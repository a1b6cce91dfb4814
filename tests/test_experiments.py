"""The study scripts under experiments/ on tiny models: plumbing only (slow: they shell out to the CLI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.parent.name.replace("-", "_"), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sparsity_frontier_designs_match_their_fractions():
    frontier = _load(ROOT / "experiments" / "sparsity-frontier" / "run.py")
    for f in frontier.FRACTIONS:
        active, total = frontier.tree_units(f)
        assert abs(active / frontier.MLP_UNITS - f) <= 0.2 * f, f  # within a fifth of the target fraction
        assert 0.4 * frontier.MLP_UNITS <= total <= 1.2 * frontier.MLP_UNITS, f  # about one MLP's units in all
    rows = frontier.plan(frontier.FRACTIONS, ft_steps=10)
    assert len(rows) == 1 + len(frontier.FRACTIONS) * (len(frontier.METHODS) + 2)


@pytest.mark.slow
def test_sparsity_frontier_study_on_a_tiny_llama(tmp_path):
    pytest.importorskip("gguf")
    from test_gguf_convert import write_tiny_gguf

    from treeffn import gguf_import

    write_tiny_gguf(tmp_path / "tiny.gguf", seed=1, tied=True)
    gguf_import.import_gguf(tmp_path / "tiny.gguf", tmp_path / "runs" / "smollm2", progress=False)
    frontier = _load(ROOT / "experiments" / "sparsity-frontier" / "run.py")
    doc = tmp_path / "doc.md"
    args = ["--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data"), "--fractions", "10",
            "--rows", "dense,teal-10,wina-10", "--limit", "2", "--doc", str(doc), "--calibration", "sample"]
    assert frontier.main(args) == 0
    text = doc.read_text()
    for label in ("dense import", "TEAL 10 %", "WINA 10 %"):
        assert f"| {label} |" in text
    assert "`tree-10`" in text and "Not run yet" in text  # rows not made are listed, not invented
    before = (tmp_path / "runs" / "sparsity-frontier" / "commits.json").read_text()
    assert frontier.main(args) == 0  # everything reused: nothing remade
    assert (tmp_path / "runs" / "sparsity-frontier" / "commits.json").read_text() == before
