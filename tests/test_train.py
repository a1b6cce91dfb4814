import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from treeffn import checkpoint as ckpt
from treeffn.config import get_config
from treeffn.train import train

BASE = {"train.max_steps": 12, "train.eval_every": 6, "train.log_every": 3, "train.eval_batches": 2,
        "train.batch_size": 4, "train.warmup_steps": 2, "train.stats_every": 3}


def _cfg(**extra):
    return get_config("debug", {**BASE, **extra})


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _initial_val_loss(cfg, data):
    """Validation loss of the untrained model train() starts from (same seed, same windows as its evaluation)."""
    from treeffn.data import load_tokens
    from treeffn.model import GPT
    from treeffn.data import Batches
    from treeffn.evaluate import evaluate_loss

    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg)
    val = Batches(load_tokens(data, "val"), cfg.model.seq_len, cfg.model.vocab_size)
    return evaluate_loss(model, val, cfg.train.eval_batches * cfg.train.batch_size, cfg.train.batch_size,
                         torch.device("cpu"))[0]


@pytest.mark.parametrize("kind", ["dense", "tree"])
def test_training_smoke_leaves_files_and_logs(tmp_path, sample_data, kind):
    run = tmp_path / "run"
    cfg = _cfg(**{"ffn.kind": kind})
    s = train(cfg, run, sample_data, progress=False, tensorboard=False)
    folder = ckpt.resolve(run)
    for f in ("config.json", "model.safetensors", "optimizer.safetensors", "trainer.json", "tokenizer.json"):
        assert (folder / f).is_file(), f"checkpoint lacks {f}"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in recs)
    losses = _losses(run)
    assert len(losses) == 4 and losses[-1] < losses[0], f"loss did not go down: {losses}"
    if kind == "tree":
        assert any(k.startswith("tree/leaf_util") for r in recs for k in r), "tree statistics were not logged"
    # real learning, not a loss below some ceiling: a uniform guess scores ln 512 = 6.24 and so does the untrained
    # model; 12 steps reach 5.64 (dense) and 5.73 (tree) on the sample
    assert s["val_loss"] < math.log(cfg.model.vocab_size) - 0.35, s["val_loss"]
    assert s["val_loss"] < _initial_val_loss(cfg, sample_data) - 0.35, s["val_loss"]
    assert not list(run.glob(".tmp-*")), "temporary files left behind"


def test_tokens_per_second_counts_training_steps_only(tmp_path, sample_data, monkeypatch):
    """Evaluation and checkpoint writes between logging points must not lower the training tokens/s."""
    import treeffn.train as tr

    pause = 0.5
    real_eval, real_save = tr.evaluate_loss, tr.save_training_checkpoint
    monkeypatch.setattr(tr, "evaluate_loss", lambda *a, **k: (time.sleep(pause), real_eval(*a, **k))[1])
    monkeypatch.setattr(tr, "save_training_checkpoint", lambda *a, **k: (time.sleep(pause), real_save(*a, **k))[1])
    cfg = _cfg(**{"train.max_steps": 4, "train.eval_every": 1, "train.log_every": 2, "train.eval_batches": 1})
    t0 = time.perf_counter()
    s = train(cfg, tmp_path / "r", sample_data, progress=False, tensorboard=False)
    wall = time.perf_counter() - t0
    tokens = 4 * cfg.train.batch_size * cfg.model.seq_len
    assert wall > 8 * pause  # 4 evaluations and 4 checkpoints, each slowed down
    # tokens/s of the steps alone: their time is the wall time minus (at least) the pauses
    assert s["tok_per_s"] > tokens / (wall - 8 * pause + 0.05)
    logged = [r["tok_per_s"] for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
              if "tok_per_s" in r]
    assert len(logged) == 2 and all(t > 2 * cfg.train.batch_size * cfg.model.seq_len / (wall - 8 * pause + 0.05)
                                    for t in logged)


def test_resume_reproduces_uninterrupted_run(tmp_path, sample_data):
    cfg = _cfg(**{"ffn.kind": "tree", "model.dropout": 0.1})
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg, full, sample_data, progress=False, tensorboard=False)
    train(cfg, part, sample_data, progress=False, tensorboard=False, stop_at=6)
    assert ckpt.resolve(part).name == "step-0000006"
    train(cfg, part, sample_data, progress=False, tensorboard=False, resume=True)
    assert _losses(full) == _losses(part), "resumed loss curve differs from the uninterrupted one"
    a, b = ckpt.load_model(full), ckpt.load_model(part)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), f"parameter {n} differs after resume"


def test_refuses_to_overwrite_a_run(tmp_path, sample_data):
    from treeffn.errors import TreeffnError

    cfg = _cfg(**{"train.max_steps": 2})
    train(cfg, tmp_path / "r", sample_data, progress=False, tensorboard=False)
    with pytest.raises(TreeffnError, match="--resume"):
        train(cfg, tmp_path / "r", sample_data, progress=False, tensorboard=False)


def test_ddp_two_processes_equal_one(tmp_path, sample_data):
    """torchrun --nproc_per_node 2 (gloo on CPU) gives the single-process result on the same global batch."""
    over = ["--set", "train.max_steps=4", "--set", "train.batch_size=4", "--set", "train.eval_every=4",
            "--set", "train.eval_batches=1", "--set", "ffn.kind=tree", "--set", "train.warmup_steps=1"]
    cmd = ["-m", "treeffn.cli", "train", "--preset", "debug", "--data", str(sample_data), "--quiet",
           "--no-tensorboard", "--device", "cpu"] + over
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable] + cmd + ["--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533"] + cmd + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = ckpt.load_model(tmp_path / "one"), ckpt.load_model(tmp_path / "two")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=f"DDP result differs from 1 process in {n}")
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), rel=1e-4)


def test_bf16_autocast_accumulation_and_tensorboard(tmp_path, sample_data):
    pytest.importorskip("tensorboard")
    cfg = _cfg(**{"ffn.kind": "moe", "train.dtype": "bf16", "train.grad_accum": 2, "train.max_steps": 4,
                  "train.eval_every": 4, "train.log_every": 2})
    s = train(cfg, tmp_path / "r", sample_data, progress=False, tensorboard=True)
    assert s["steps"] == 4 and s["val_loss"] == s["val_loss"], "bf16 run produced NaN"
    assert list((tmp_path / "r" / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file written"
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 for r in recs if "aux_loss" in r), "MoE balancing loss missing from the log"


def test_init_fine_tunes_with_shorter_context_and_frozen_attention(tmp_path, sample_data):
    from treeffn.errors import ConfigError

    base = _cfg(**{"train.max_steps": 2})
    train(base, tmp_path / "base", sample_data, progress=False, tensorboard=False)
    start = ckpt.load_model(tmp_path / "base").state_dict()
    cfg = _cfg(**{"train.max_steps": 3, "model.seq_len": base.model.seq_len // 2, "train.lr": 1e-2})
    train(cfg, tmp_path / "ft", sample_data, progress=False, tensorboard=False, init=tmp_path / "base",
          freeze="attn")
    tuned = ckpt.load_model(tmp_path / "ft")
    assert tuned.cfg.model.seq_len == base.model.seq_len // 2
    assert tuned.blocks[0].attn.rotary.table.shape[0] == base.model.seq_len // 2
    after = tuned.state_dict()
    frozen = [n for n in start if ".attn." in n or n.startswith("tok_emb") or "norm" in n]
    moved = [n for n in start if n not in frozen and not torch.equal(start[n], after[n])]
    assert frozen and all(torch.equal(start[n], after[n]) for n in frozen), "frozen weights changed"
    assert any(".ffn." in n for n in moved), "feed-forward weights did not train"
    with pytest.raises(ConfigError, match="differs"):
        train(_cfg(**{"model.d_model": 2 * base.model.d_model}), tmp_path / "bad", sample_data, progress=False,
              tensorboard=False, init=tmp_path / "base")


# ---- the config of a run: one assembly for the command line and the Python API ---------------------------------
def test_assemble_config_order_and_sources(tmp_path):
    from treeffn.config import assemble_config

    cfg = assemble_config("debug", ["ffn.kind=tree", "tree.depth=3"], defaults={"model.vocab_size": 300,
                                                                                 "tree.depth": 5})
    assert (cfg.ffn.kind, cfg.tree.depth, cfg.model.vocab_size) == ("tree", 3, 300), "overrides beat defaults"
    assert assemble_config("debug", {"train.lr": "1e-2"}).train.lr == 1e-2
    copy = assemble_config(base=cfg, overrides={"train.max_steps": 7})
    assert copy.train.max_steps == 7 and cfg.train.max_steps != 7, "the base config is copied, not changed"
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert assemble_config(base=tmp_path / "config.json") == cfg
    assert assemble_config().preset == "tiny"


def test_assemble_config_refuses_what_a_saved_config_forbids(tmp_path):
    from treeffn.config import assemble_config
    from treeffn.errors import ConfigError

    saved = get_config("debug")
    with pytest.raises(ConfigError, match="not both"):
        assemble_config("debug", base=saved)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        assemble_config(base=tmp_path / "bad.json")
    ok = assemble_config(base=saved, overrides={"train.lr": 0.5, "model.seq_len": 32}, saved=saved,
                         may_change=("train", "model.seq_len"))
    assert ok.train.lr == 0.5 and ok.model.seq_len == 32
    with pytest.raises(ConfigError, match=r"differs from the run in model\.seq_len \(only train\.\* may change\)"):
        assemble_config(base=saved, overrides={"model.seq_len": 32}, saved=saved, saved_name="the run")
    with pytest.raises(ConfigError, match=r"model\.d_model, model\.n_head"):
        assemble_config(base=saved, overrides={"model.d_model": 96, "model.n_head": 3}, saved=saved)


def test_resume_refuses_another_model(tmp_path, sample_data):
    from treeffn.errors import ConfigError

    cfg = _cfg(**{"train.max_steps": 2})
    train(cfg, tmp_path / "r", sample_data, progress=False, tensorboard=False, stop_at=1)
    with pytest.raises(ConfigError, match=r"--resume.* in model\.d_model"):
        train(_cfg(**{"train.max_steps": 2, "model.d_model": 128}), tmp_path / "r", sample_data, progress=False,
              tensorboard=False, resume=True)
    s = train(_cfg(**{"train.max_steps": 2, "train.lr": 1e-4}), tmp_path / "r", sample_data, progress=False,
              tensorboard=False, resume=True)  # train.* may change
    assert s["steps"] == 2


def test_vocabulary_of_the_data_is_checked(tmp_path, sample_data):
    from treeffn.errors import DataError

    with pytest.raises(DataError, match="set model.vocab_size=512"):
        train(_cfg(**{"model.vocab_size": 600}), tmp_path / "r", sample_data, progress=False, tensorboard=False)
    assert not (tmp_path / "r").exists()
