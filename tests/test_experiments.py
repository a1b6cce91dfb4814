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
    evals = tmp_path / "runs" / "sparsity-frontier" / "evals"
    assert not list(evals.glob("*_speed.json")), "speeds are measured only with --speed"
    assert frontier.main(args + ["--speed", "--report-only"]) == 0
    assert sorted(p.name for p in evals.glob("*_speed.json")) == ["dense_speed.json", "teal-10_speed.json",
                                                                  "wina-10_speed.json"]
    row = next(ln for ln in doc.read_text().splitlines() if ln.startswith("| TEAL 10 % |"))
    assert row.split("|")[-2].strip().endswith("x")  # decoding speed relative to the dense import
    timed = doc.read_text()
    assert "Decoding at batch 1" in timed and "- 10 %: teal-10 " in timed and "No fine-tuned tree" in timed
    before = (tmp_path / "runs" / "sparsity-frontier" / "commits.json").read_text()
    assert frontier.main(args + ["--speed"]) == 0  # everything reused: nothing remade or re-timed
    assert (tmp_path / "runs" / "sparsity-frontier" / "commits.json").read_text() == before
    # the committed row summaries rebuild the same report without the models and evaluation files
    summaries = sorted(p.name for p in (tmp_path / "sparsity-frontier" / "rows").glob("*.json"))
    assert summaries == ["dense.json", "teal-10.json", "wina-10.json"]
    assert str(tmp_path / "runs") not in (tmp_path / "sparsity-frontier" / "rows" / "teal-10.json").read_text()
    table = [ln for ln in doc.read_text().splitlines() if ln.startswith("| ")]
    (tmp_path / "runs").rename(tmp_path / "moved")
    assert frontier.main(args + ["--report-only"]) == 0
    assert [ln for ln in doc.read_text().splitlines() if ln.startswith("| ")] == table


def test_quality_report_pieces():
    quality = _load(ROOT / "experiments" / "quality" / "run.py")
    # FFN FLOPs by the current accounting: routing by children reads both children's input rows
    assert quality.ffn_flops("tree-node-children") / quality.ffn_flops("tree-node") == pytest.approx(2 * 92 / 128)
    assert quality.ffn_flops("tree-node") == quality.ffn_flops("dense-32")  # 32 active units, 2 rows each

    def row(name, seed, loss, choice=None):
        r = {"name": name, "seed": seed, "steps": quality.EPOCH, "eval": {"val_loss": loss}}
        if choice is not None:
            r["choice"] = dict(zip(quality.CHOICE_KEYS, choice))
        return r

    rows = [row("dense-32", 0, 4.64), row("dense-1020", 0, 4.42), row("topk-32of1020", 0, 4.43),
            row("tree-node", 0, 4.59, (0.05, 0.16, 0.03, 0.13)), row("tree-node", 1, 4.58, (0.07, 0.18, 0.03, 0.13)),
            row("tree-node-children", 0, 4.55, (0.09, 0.23, 0.03, 0.13))]
    table = "\n".join(quality.choice_table(rows))
    assert "| tree-node (2 seeds) | 0.060 | 0.170 | 0.030 | 0.130 |" in table
    assert "| tree-node-children (1 seed) | 0.090 | 0.230 |" in table
    assert "paths hold 6% of the 32 units" in table and "Routing by children raises this to 9% and 23%" in table
    text = "\n".join(quality.choice_findings(rows))
    assert "**Routing by children.**" in text and "reaches 4.5500 against 4.5850" in text
    assert "(measured below)" in text  # the top-k paragraph points at the measurement, not at a plan
    assert quality.choice_table([row("dense-32", 0, 4.64)]) == []


def test_quality_report_scale_and_open_paragraphs_follow_the_runs():
    quality = _load(ROOT / "experiments" / "quality" / "run.py")
    E = quality.EPOCH

    def row(name, loss, steps=E, curve=()):
        return {"name": name, "seed": 0, "steps": steps, "eval": {"val_loss": loss}, "curves": {"val": list(curve)}}

    base = [row("dense-32", 4.64), row("dense-1020", 4.40, curve=[(1e6, 5.0), (4e6, 4.4)]),
            row("tree-node", 4.58, curve=[(1e6, 5.1), (4e6, 4.58)]), row("moe-top1", 4.62)]
    text = "\n".join(quality.scale_findings(base))
    assert "recovers 25%" in text and "+4.09% from the 1,020-unit MLP" in text and "is not met" in text
    assert "8% (moe-top1" in text and "less than the tree" in text
    assert "went from +2.0% to +4.1%" in text and "three epochs" not in text
    assert "the three-epoch pair" in "\n".join(quality.open_questions(base))
    # a top-2 MoE that beats the tree is said to, and the finished three-epoch pair replaces the plan with its result
    more = base + [row("moe-top2", 4.50), row("tree-node", 4.30, 3 * E), row("dense-1020", 4.10, 3 * E)]
    assert quality.longer_gap(more) == pytest.approx((4.30 / 4.10 - 1, 4.58 / 4.40 - 1))
    text = "\n".join(quality.scale_findings(more))
    assert "moe-top2 more than the tree and the other less" in text
    assert "over three epochs with their own schedule it is +4.88% against +4.09%" in text and "widen it" in text
    opened = "\n".join(quality.open_questions(more))
    assert "the three-epoch pair" not in opened and "wider models" in opened
    same = base + [row("tree-node", 4.2682, 3 * E), row("dense-1020", 4.10, 3 * E)]  # +4.10% vs +4.09%
    assert "more tokens at this size leave it unchanged" in "\n".join(quality.scale_findings(same))
    assert quality.gap_trend(0.030, 0.040) == "narrow it"
    assert quality.scale_findings([row("tree-node", 4.5)]) == []  # nothing to compare against yet
