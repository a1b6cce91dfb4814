"""The command line as a user meets it: --help everywhere, one-line errors without tracebacks, real runs."""

import json
import os
import subprocess
import sys

import pytest

from treeffn.cli import BENCHES, PLUGINS, main

CORE = ["data", "train", "eval", "generate", "bench", "config", "demo"]


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "treeffn.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("cmd", CORE + list(PLUGINS) + ["data prepare"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd.split() + ["--help"])
    assert e.value.code == 0
    assert "usage: treeffn" in capsys.readouterr().out


def user_error(res, *words):
    assert res.returncode != 0, "a user error must exit non-zero"
    assert "Traceback" not in res.stderr, f"user error printed a traceback:\n{res.stderr}"
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("treeffn: error")]
    assert len(lines) == 1, f"expected one error line, got:\n{res.stderr}"
    for w in words:
        assert w in lines[0], f"error line does not name {w!r}: {lines[0]}"


def test_unknown_config_key():
    user_error(run_cli("config", "--set", "tree.bogus=3"), "tree.bogus")


def test_heads_do_not_divide():
    user_error(run_cli("config", "--set", "model.d_model=100", "--set", "model.n_head=3"), "model.n_head")


def test_missing_checkpoint(tmp_path):
    user_error(run_cli("eval", str(tmp_path / "nope")), "nope")


@pytest.mark.parametrize("content, word", [(b"", "empty"), (b"\x00\x01\x02binary\x00" * 50, "binary"),
                                           (b"caf\xe9 au lait " * 50, "UTF-8")])
def test_bad_corpus(tmp_path, content, word):
    f = tmp_path / "corpus.txt"
    f.write_bytes(content)
    out = tmp_path / "prepared"
    res = run_cli("data", "prepare", "--text", str(f), "--out", str(out), "--quiet")
    user_error(res, "corpus.txt")
    assert word.lower() in res.stderr.lower()
    assert not out.exists(), "a failed prepare left a half-written output"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_data):
    run = tmp_path_factory.mktemp("cli") / "run"
    res = run_cli("train", "--preset", "debug", "--data", str(sample_data), "--out", str(run), "--quiet",
                  "--no-tensorboard", "--set", "ffn.kind=tree", "--set", "train.max_steps=6",
                  "--set", "train.eval_every=6", "--set", "train.eval_batches=1")
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def test_eval_and_generate(trained):
    res = run_cli("eval", str(trained), "--json", "--windows", "4", "--quiet", "--decode-speed")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["ffn_active_fraction"] < 0.1 and r["bits_per_byte"] > 0 and r["perplexity"] > 1
    assert r["decode_tok_per_s"] > 0
    res = run_cli("eval", str(trained), "--json", "--windows", "2", "--quiet", "--context", "16")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["val_context"] == 16
    user_error(run_cli("eval", str(trained), "--quiet", "--context", "100000"), "context")
    res = run_cli("generate", str(trained), "--prompt", "To be or not", "--max-new-tokens", "8")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("To be or not")


def test_prompt_longer_than_context(trained):
    user_error(run_cli("generate", str(trained), "--prompt", "word " * 200, "--max-new-tokens", "1"), "context")


def test_train_into_existing_run_needs_resume(trained, sample_data):
    user_error(run_cli("train", "--preset", "debug", "--data", str(sample_data), "--out", str(trained), "--quiet"),
               "--resume")


def test_vocab_mismatch(tmp_path, sample_data):
    user_error(run_cli("train", "--preset", "debug", "--data", str(sample_data), "--out", str(tmp_path / "r"),
                       "--set", "model.vocab_size=100", "--quiet"), "vocab")
    assert not (tmp_path / "r").exists()


def test_unknown_bench():
    user_error(run_cli("bench", "nope"), "nope")


def test_bench_help_lists_each():
    res = run_cli("bench", "--help")
    assert res.returncode == 0 and all(name in res.stdout for name in BENCHES)
