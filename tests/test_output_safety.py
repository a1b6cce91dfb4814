"""Nothing lost: every command that writes a folder goes through ``outputs.check_output_dir``.

Each command must refuse, with one ``treeffn: error:`` line and exit status 2 and before doing any work, a target
that exists and is not a treeffn folder of the kind it writes, or that is its own input or contains it; a treeffn
folder of that kind is replaced only with ``--overwrite``. Cheap: the ``debug`` preset and the committed
sample text.
"""

from __future__ import annotations

import json

import pytest
import torch

from treeffn import checkpoint as ckpt
from treeffn import outputs
from treeffn.cli import main
from treeffn.errors import OutputError
from treeffn.model import build_model


def refused(capsys, argv, *words):
    """The command exits 2 with exactly one `treeffn: error:` line naming ``words``."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("treeffn: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def precious(folder):
    """A user's folder with a file that must survive every refused command."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("keep me")
    return folder


def intact(folder):
    return (folder / "notes.txt").read_text() == "keep me"


@pytest.fixture
def dense_ck(tmp_path):
    torch.manual_seed(0)
    return ckpt.save_checkpoint_dir(tmp_path / "dense", build_model("debug", {"ffn.kind": "swiglu",
                                                                            "ffn.hidden": 64}))


@pytest.fixture
def tree_ck(tmp_path, sample_data):
    torch.manual_seed(0)
    return ckpt.save_checkpoint_dir(tmp_path / "tree", build_model("debug", {"ffn.kind": "tree"}),
                                    {"data.json": {"data_dir": str(sample_data)}})


# ---- the shared helper -----------------------------------------------------------------------------------------
def test_output_kind_and_guard(tmp_path, dense_ck, sample_data):
    assert outputs.output_kind(dense_ck) == "checkpoint"
    assert outputs.output_kind(sample_data) == "data"
    assert outputs.output_kind(precious(tmp_path / "mine")) is None
    (tmp_path / "empty").mkdir()
    assert outputs.output_kind(tmp_path / "empty") == "empty"
    outputs.check_output_dir(tmp_path / "new", "checkpoint")
    outputs.check_output_dir(tmp_path / "empty", "checkpoint")
    with pytest.raises(OutputError, match="refusing"):
        outputs.check_output_dir(tmp_path / "mine", "checkpoint", overwrite=True)
    with pytest.raises(OutputError, match="--overwrite"):
        outputs.check_output_dir(dense_ck, "checkpoint")
    outputs.check_output_dir(dense_ck, "checkpoint", overwrite=True)
    with pytest.raises(OutputError, match="not a treeffn training run"):
        outputs.check_output_dir(dense_ck, "run", overwrite=True)  # a checkpoint is not a run
    with pytest.raises(OutputError, match="own input"):
        outputs.check_output_dir(dense_ck, "checkpoint", overwrite=True, inputs=[dense_ck])
    with pytest.raises(OutputError, match="contains"):
        outputs.check_output_dir(tmp_path, "checkpoint", overwrite=True, inputs=[dense_ck])
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        outputs.check_output_dir(tmp_path / "file", "checkpoint", overwrite=True)
    with pytest.raises(OutputError, match="is a file"):
        outputs.check_output_dir(tmp_path / "file" / "sub", "checkpoint", overwrite=True)
    assert intact(tmp_path / "mine")


# ---- convert ------------------------------------------------------------------------------------------------------
CONVERT = ["--set", "tree.trees=1", "--set", "tree.depth=2", "--tokens", "512", "--seq-len", "32", "--steps", "0",
           "--quiet"]


def test_convert_refuses(tmp_path, dense_ck, sample_data, capsys):
    mine = precious(tmp_path / "mine")
    refused(capsys, ["convert", dense_ck, "--out", mine, "--data", sample_data, *CONVERT], str(mine), "refusing")
    refused(capsys, ["convert", dense_ck, "--out", tmp_path, "--data", sample_data, *CONVERT], "contains")
    refused(capsys, ["convert", dense_ck, "--out", dense_ck, "--data", sample_data, *CONVERT], "own input")
    assert intact(mine) and outputs.output_kind(dense_ck) == "checkpoint"


def test_convert_overwrites_a_checkpoint_only_when_asked(tmp_path, dense_ck, sample_data, capsys):
    out = ckpt.save_checkpoint_dir(tmp_path / "old", build_model("debug"))
    refused(capsys, ["convert", dense_ck, "--out", out, "--data", sample_data, *CONVERT], "--overwrite")
    assert ckpt.load_config(out).ffn.kind == "dense"
    assert main([str(a) for a in ["convert", dense_ck, "--out", out, "--data", sample_data, *CONVERT,
                                  "--overwrite"]]) == 0
    assert ckpt.load_config(out).ffn.kind == "tree"


# ---- import-gguf --------------------------------------------------------------------------------------------------
def test_import_gguf_refuses(tmp_path, capsys):
    pytest.importorskip("gguf")
    mine = precious(tmp_path / "mine")
    (mine / "model.gguf").write_bytes(b"never read")
    refused(capsys, ["import-gguf", "--gguf", mine / "model.gguf", "--out", tmp_path / "other-mine-not", "--quiet"],
            "GGUF")  # sanity: an unreadable GGUF is its own error when --out is fine
    refused(capsys, ["import-gguf", "--gguf", mine / "model.gguf", "--out", mine, "--quiet"], "contains")
    user = precious(tmp_path / "user")
    refused(capsys, ["import-gguf", "--gguf", mine / "model.gguf", "--out", user, "--quiet"], "refusing")
    old = ckpt.save_checkpoint_dir(tmp_path / "old", build_model("debug"))
    refused(capsys, ["import-gguf", "--gguf", mine / "model.gguf", "--out", old, "--quiet"], "--overwrite")
    assert intact(mine) and intact(user) and outputs.output_kind(old) == "checkpoint"


# ---- prune --------------------------------------------------------------------------------------------------------
def test_prune_refuses(tmp_path, tree_ck, capsys):
    mine = precious(tmp_path / "mine")
    args = ["--min-visits", "1", "--windows", "2", "--quiet"]
    refused(capsys, ["prune", tree_ck, "--out", mine, *args], "refusing")
    refused(capsys, ["prune", tree_ck, "--out", tmp_path, *args], "contains")
    refused(capsys, ["prune", tree_ck, "--out", tree_ck, *args], "own input")
    old = ckpt.save_checkpoint_dir(tmp_path / "old", build_model("debug"))
    refused(capsys, ["prune", tree_ck, "--out", old, *args], "--overwrite")
    assert intact(mine) and ckpt.load_config(old).ffn.kind == "dense"


# ---- analyze -------------------------------------------------------------------------------------------------------
def test_analyze_refuses_and_overwrites_an_analysis_only_when_asked(tmp_path, tree_ck, capsys):
    mine = precious(tmp_path / "mine")
    args = ["--windows", "2", "--no-plots", "--quiet"]
    refused(capsys, ["analyze", tree_ck, "--out", mine, *args], "refusing")
    refused(capsys, ["analyze", tree_ck, "--out", tree_ck, *args], "own input")
    out = tmp_path / "analysis"
    assert main(["analyze", str(tree_ck), "--out", str(out), *args]) == 0
    assert outputs.output_kind(out) == "analysis"
    capsys.readouterr()
    refused(capsys, ["analyze", tree_ck, "--out", out, *args], "--overwrite")
    assert main(["analyze", str(tree_ck), "--out", str(out), "--overwrite", *args]) == 0
    assert intact(mine)


# ---- export-hf ----------------------------------------------------------------------------------------------------
def test_export_hf_refuses(tmp_path, tree_ck, capsys):
    mine = precious(tmp_path / "mine")
    refused(capsys, ["export-hf", tree_ck, mine, "--no-check"], "refusing")
    refused(capsys, ["export-hf", tree_ck, tmp_path, "--no-check"], "contains")
    refused(capsys, ["export-hf", tree_ck, tree_ck, "--no-check"], "own input")
    assert intact(mine) and outputs.output_kind(tree_ck) == "checkpoint"


def test_export_hf_overwrites_an_export_only_when_asked(tmp_path, tree_ck, sample_data, capsys):
    pytest.importorskip("transformers")
    (tree_ck / "tokenizer.json").write_bytes((sample_data / "tokenizer.json").read_bytes())
    out = tmp_path / "hf"
    assert main(["export-hf", str(tree_ck), str(out), "--no-check"]) == 0
    assert outputs.output_kind(out) == "hf"
    refused(capsys, ["export-hf", tree_ck, out, "--no-check"], "--overwrite")
    assert main(["export-hf", str(tree_ck), str(out), "--no-check", "--overwrite"]) == 0
    assert outputs.output_kind(out) == "hf" and not list(tmp_path.glob(".tmp-*"))


# ---- data prepare -------------------------------------------------------------------------------------------------
def test_data_prepare_refuses(tmp_path, capsys):
    mine = precious(tmp_path / "mine")
    refused(capsys, ["data", "prepare", "--sample", "--out", mine, "--quiet"], "refusing")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text to read " * 100)
    refused(capsys, ["data", "prepare", "--text", corpus, "--out", corpus, "--quiet"], "own input")
    refused(capsys, ["data", "prepare", "--text", corpus / "a.txt", "--out", corpus, "--quiet"], "contains")
    assert intact(mine) and (corpus / "a.txt").is_file()


def test_data_prepare_replaces_a_dataset_only_when_asked(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["data", "prepare", "--sample", "--vocab-size", "300", "--out", str(out), "--quiet"]) == 0
    assert main(["data", "prepare", "--sample", "--vocab-size", "300", "--out", str(out), "--quiet"]) == 0  # reuse
    refused(capsys, ["data", "prepare", "--sample", "--vocab-size", "320", "--out", out, "--quiet"], "--overwrite")
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 300
    assert main(["data", "prepare", "--sample", "--vocab-size", "320", "--out", str(out), "--quiet",
                 "--overwrite"]) == 0
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 320


# ---- train --------------------------------------------------------------------------------------------------------
TRAIN = ["--preset", "debug", "--quiet", "--no-tensorboard", "--set", "train.max_steps=2", "--set",
         "train.eval_every=2", "--set", "train.eval_batches=1"]


def test_train_refuses(tmp_path, dense_ck, sample_data, capsys):
    mine = precious(tmp_path / "mine")
    refused(capsys, ["train", "--data", sample_data, "--out", mine, *TRAIN], "refusing")
    refused(capsys, ["train", "--data", sample_data, "--out", mine, "--resume", *TRAIN], "refusing")
    refused(capsys, ["train", "--data", sample_data, "--out", sample_data.parent, *TRAIN], "contains")
    refused(capsys, ["train", "--data", sample_data, "--init", dense_ck, "--out", dense_ck, *TRAIN], "own input")
    refused(capsys, ["train", "--data", sample_data, "--out", tmp_path / "r", "--resume", "--overwrite", *TRAIN],
            "--resume")
    assert intact(mine) and outputs.output_kind(sample_data) == "data" and outputs.output_kind(dense_ck) == "checkpoint"


def test_train_overwrite_replaces_a_run(tmp_path, sample_data, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(sample_data), "--out", str(run), *TRAIN]) == 0
    (run / "step-0000002" / "marker").write_text("old")
    refused(capsys, ["train", "--data", sample_data, "--out", run, *TRAIN], "--resume", "--overwrite")
    assert (run / "step-0000002" / "marker").is_file()
    assert main(["train", "--data", str(sample_data), "--out", str(run), "--overwrite", *TRAIN]) == 0
    assert outputs.output_kind(run) == "run" and not (run / "step-0000002" / "marker").exists()


# ---- demo ---------------------------------------------------------------------------------------------------------
def test_demo_refuses_before_any_work(tmp_path, sample_data, capsys):
    runs = tmp_path / "runs"
    user = precious(runs / "dense")  # e.g. `treeffn demo --out runs` where runs/dense is somebody's folder
    refused(capsys, ["demo", "--data", sample_data, "--out", runs, "--steps", "1", "--quiet"], "refusing")
    refused(capsys, ["demo", "--data", sample_data, "--out", runs, "--steps", "1", "--quiet", "--overwrite"],
            "refusing")
    assert intact(user) and not (runs / "tree").exists()
    # an earlier treeffn run is replaced only with --overwrite
    (user / "notes.txt").unlink()
    user.rmdir()
    assert main(["train", "--data", str(sample_data), "--out", str(runs / "tree"), *TRAIN]) == 0
    capsys.readouterr()
    refused(capsys, ["demo", "--data", sample_data, "--out", runs, "--steps", "1", "--quiet"], "--overwrite")
    assert outputs.output_kind(runs / "tree") == "run"
