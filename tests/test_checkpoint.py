import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from treeffn import checkpoint as ckpt
from treeffn import outputs
from treeffn.errors import CheckpointError, OutputError
from treeffn.model import build_model


def _save(tmp_path, kind="tree"):
    m = build_model("debug", {"ffn.kind": kind})
    folder = ckpt.save_checkpoint_dir(tmp_path / "run" / "step-0000001", m)
    ckpt.publish(tmp_path / "run", folder.name)
    return m, tmp_path / "run"


@pytest.mark.parametrize("kind", ["dense", "moe", "tree"])
def test_round_trip(tmp_path, kind):
    m, run = _save(tmp_path, kind)
    m2 = ckpt.load_model(run)
    x = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(m.eval()(x).logits, m2(x).logits)
    assert m2.lm_head.weight is m2.tok_emb.weight, "tied embeddings were untied by loading"


def test_missing(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a treeffn checkpoint"):
        ckpt.load_model(tmp_path / "empty")


def test_truncated(tmp_path):
    _, run = _save(tmp_path)
    f = ckpt.resolve(run) / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt.load_model(run)


def test_mismatched(tmp_path):
    _, run = _save(tmp_path)
    cfg = json.loads((ckpt.resolve(run) / "config.json").read_text())
    cfg["tree"]["depth"] = 3
    (ckpt.resolve(run) / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match its config"):
        ckpt.load_model(run)


def test_corrupt_config(tmp_path):
    _, run = _save(tmp_path)
    (ckpt.resolve(run) / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ckpt.load_model(run)
    (ckpt.resolve(run) / "config.json").write_text(json.dumps({"model": {"bogus": 1}}))
    with pytest.raises(CheckpointError, match="bogus"):
        ckpt.load_model(run)


def test_sigkill_while_saving_keeps_previous(tmp_path):
    """A writer killed mid-save leaves the previously published checkpoint loadable and nothing half-visible."""
    m, run = _save(tmp_path)
    code = textwrap.dedent(f"""
        import os, signal, torch
        from safetensors import torch as st
        from treeffn import checkpoint as ckpt
        from treeffn.model import build_model
        real = st.save_file
        def slow(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            print("written", flush=True)
            import time; time.sleep(60)
        st.save_file = slow
        m = build_model("debug", {{"ffn.kind": "tree"}})
        ckpt.save_checkpoint_dir(ckpt.Path({str(run)!r}) / "step-0000002", m)
        ckpt.publish(ckpt.Path({str(run)!r}), "step-0000002")
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "written"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    m2 = ckpt.load_model(run)
    assert ckpt.resolve(run).name == "step-0000001"
    x = torch.randint(0, 512, (1, 5))
    torch.testing.assert_close(m.eval()(x).logits, m2(x).logits)
    assert not (run / "step-0000002").exists(), "a half-written checkpoint became visible"


def test_save_checkpoint_dir_never_replaces_other_folders(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError):
        ckpt.save_checkpoint_dir(mine, build_model("debug"))
    assert (mine / "notes.txt").read_text() == "keep me" and not list(tmp_path.glob(".tmp-*"))


def test_fsync_dir_syncs_a_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real(fd))
    outputs.fsync_dir(tmp_path)
    assert synced == [True]
    synced.clear()
    monkeypatch.delattr(os, "O_DIRECTORY", raising=False)  # platforms without it: a no-op, not an error
    outputs.fsync_dir(tmp_path)
    assert synced == []


def test_every_rename_is_followed_by_a_directory_fsync(tmp_path, monkeypatch):
    """Checkpoint folders and the pointer become visible by os.replace; the directory holding the visible name must
    be fsynced afterwards (a move into a `.tmp-` trash folder is visible by the name leaving its directory)."""
    events = []
    real_replace, real_fsync_dir = os.replace, outputs.fsync_dir

    def replace(src, dst):
        real_replace(src, dst)
        src_dir, dst_dir = (os.path.dirname(os.path.abspath(p)) for p in (src, dst))
        events.append(("replace", src_dir if os.path.basename(dst_dir).startswith(".tmp-") else dst_dir))

    def fsync_dir(path):
        real_fsync_dir(path)
        events.append(("fsync", os.path.abspath(path)))

    monkeypatch.setattr(ckpt.os, "replace", replace)
    monkeypatch.setattr(ckpt, "fsync_dir", fsync_dir)  # checkpoint folders before they are installed
    monkeypatch.setattr(outputs, "fsync_dir", fsync_dir)  # install_dir and write_json_atomic
    run = tmp_path / "run"
    m = build_model("debug")
    for step in (1, 2):
        ckpt.save_checkpoint_dir(run / f"step-{step:07d}", m)
        ckpt.publish(run, f"step-{step:07d}")
    ckpt.save_checkpoint_dir(run / "step-0000002", m)  # replacing an existing folder: two renames
    renames = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert len(renames) >= 6
    for i in renames:
        assert ("fsync", events[i][1]) in events[i + 1:], \
            f"rename in {events[i][1]} not followed by an fsync of that directory: {events}"
    assert ckpt.load_model(run) is not None


def test_killed_while_deleting_old_checkpoints_leaves_no_half_deleted_folder(tmp_path, monkeypatch):
    """publish() drops superseded step folders; a process killed in the middle of deleting one must not leave a
    visible step-* folder without its files (found by tests/test_crash_resume.py)."""
    m = build_model("debug")
    run = tmp_path / "run"
    ckpt.save_checkpoint_dir(run / "step-0000001", m)
    ckpt.publish(run, "step-0000001")
    ckpt.save_checkpoint_dir(run / "step-0000002", m)

    def killed_midway(path, ignore_errors=False):  # deletes one file, then the process "dies"
        victim = next(p for p in sorted(ckpt.Path(path).rglob("*")) if p.is_file())
        victim.unlink()
        raise SystemExit("killed")

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(SystemExit):
        ckpt.publish(run, "step-0000002")
    monkeypatch.undo()
    assert ckpt.resolve(run).name == "step-0000002"
    for folder in run.glob("step-*"):
        ckpt.load_model(folder)  # every visible checkpoint folder is complete
    ckpt.publish(run, "step-0000002")  # the next publish sweeps the leftovers
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.json", "step-0000002"]
