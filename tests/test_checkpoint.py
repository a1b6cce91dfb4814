import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from treeffn import checkpoint as ckpt
from treeffn.errors import CheckpointError
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
