"""Reliability: a training run SIGKILLed at random moments, over and over, loses nothing.

A tree model (``debug`` preset, the committed sample text, a checkpoint after every step so that many kills land in
the middle of a checkpoint write) is started with ``treeffn train --resume`` and killed with SIGKILL, at least
``KILLS`` times: half of the kills at a random moment after the process started training, half as soon as a
checkpoint write is seen in progress (a ``.tmp-*`` entry in the run directory). After every kill each checkpoint
folder of the run and the one the pointer names must load (weights, optimizer state, trainer state), and the
published step never goes back. Finally the run is resumed to its end without interruption, and its weights and
optimizer state must be bit-equal to those of an uninterrupted run of the same configuration.

Slow (a few minutes on 2 cores: every restart imports torch): ``make test-slow`` or ``pytest -m slow``.
``TREEFFN_CRASH_KILLS`` sets the number of kills (default 20).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from treeffn import checkpoint as ckpt

KILLS = int(os.environ.get("TREEFFN_CRASH_KILLS", "20"))
STEPS = 300
OVERRIDES = {"ffn.kind": "tree", "train.max_steps": STEPS, "train.save_every": 1, "train.eval_every": 50,
             "train.eval_batches": 1, "train.log_every": 10, "train.batch_size": 4}


def _cmd(data: Path, out: Path) -> list[str]:
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "treeffn.cli", "train", "--preset", "debug", "--data", str(data), "--out", str(out),
            "--quiet", "--no-tensorboard", "--device", "cpu", "--resume", *sets]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _tensors(run: Path, name: str) -> dict[str, torch.Tensor]:
    return ckpt.load_tensors(ckpt.resolve(run) / name)


def _check_readable(run: Path) -> int | None:
    """Every visible checkpoint of ``run`` loads completely; returns the published step (None before the first)."""
    for folder in sorted(p for p in run.glob("step-*") if p.is_dir()):
        ckpt.load_model(folder)
        ckpt.load_tensors(folder / "optimizer.safetensors")
        assert json.loads((folder / "trainer.json").read_text())["step"] == int(folder.name[5:])
    if not (run / ckpt.POINTER).exists():
        return None
    folder = ckpt.resolve(run)
    ckpt.load_model(run)
    ckpt.load_tensors(folder / "optimizer.safetensors")
    return json.loads((folder / "trainer.json").read_text())["step"]


def _metrics(run: Path) -> str | None:
    try:
        return (run / "metrics.jsonl").read_text()
    except OSError:
        return None


def _tmp_entries(run: Path) -> set[str]:
    """Names of writes in progress (or left by a killed writer): checkpoint folders and the pointer's temp file."""
    try:
        return {n for n in os.listdir(run) if n.startswith(".tmp-")}
    except FileNotFoundError:
        return set()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path, sample_data):
    rng = random.Random(int(os.environ.get("TREEFFN_CRASH_SEED", "0")))
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    t0 = time.perf_counter()
    done = subprocess.run(_cmd(sample_data, ref), env=_env(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    per_step = (time.perf_counter() - t0) / STEPS  # generous: includes the start-up

    kills, mid_write, last_step, log = 0, 0, None, []
    err_file = tmp_path / "stderr.txt"
    while kills < KILLS:
        writes_only = kills % 2 == 1
        before, old_tmp = _metrics(run), _tmp_entries(run)
        with open(err_file, "w") as err:
            p = subprocess.Popen(_cmd(sample_data, run), env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            # training has started once this process has (re)written the metrics with its start event
            deadline = time.monotonic() + 300
            while p.poll() is None and time.monotonic() < deadline:
                now = _metrics(run)
                if now is not None and now != before and '"event": "start"' in now:
                    break
                time.sleep(0.005)
            if writes_only:  # kill as soon as a new checkpoint (or pointer) write is seen in progress
                deadline = time.monotonic() + 60
                while p.poll() is None and time.monotonic() < deadline and not (_tmp_entries(run) - old_tmp):
                    time.sleep(0.0005)
            else:
                time.sleep(rng.uniform(0.0, 8 * per_step))
            finished = p.poll() is not None
            if not finished:
                os.kill(p.pid, signal.SIGKILL)
        finally:
            p.wait()
        if finished:
            assert p.returncode == 0, err_file.read_text()[-3000:]
            pytest.fail(f"the run finished after {kills} kills; raise STEPS so that {KILLS} kills fit")
        kills += 1
        interrupted_write = bool(_tmp_entries(run) - old_tmp)  # a write this process began and never finished
        mid_write += interrupted_write
        step = _check_readable(run) if run.exists() else None
        assert last_step is None or (step is not None and step >= last_step), (last_step, step)
        last_step = step
        log.append((kills, "write" if writes_only else "random", step, interrupted_write))

    # the last resume runs to the end
    final = subprocess.run(_cmd(sample_data, run), env=_env(), capture_output=True, text=True, timeout=1800)
    assert final.returncode == 0, final.stderr[-3000:]
    assert _check_readable(run) == STEPS
    assert mid_write >= KILLS // 4, f"only {mid_write} of {kills} kills interrupted a checkpoint write: {log}"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = _tensors(ref, name), _tensors(run, name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs from the uninterrupted run after {kills} kills"
    print(f"\n{kills} kills ({mid_write} during a checkpoint write), published steps {[s for _, _, s, _ in log]}")
