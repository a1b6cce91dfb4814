"""The command line as a user meets it: --help everywhere, one-line errors without tracebacks, real runs."""

import json
import os
import subprocess
import sys

import pytest
import torch

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


@pytest.mark.parametrize("flags, word", [(["--temperature", "-1"], "temperature"),
                                         (["--temperature", "nan"], "temperature"),
                                         (["--top-p", "0"], "top-p"), (["--top-p", "1.5"], "top-p"),
                                         (["--top-p", "-0.2"], "top-p"), (["--top-k", "-3"], "top-k")])
def test_generate_refuses_bad_sampling_settings(tmp_path, capsys, flags, word):
    from treeffn.checkpoint import save_checkpoint_dir
    from treeffn.errors import TreeffnError
    from treeffn.model import build_model

    model = build_model("debug")
    ck = save_checkpoint_dir(tmp_path / "ck", model)
    assert main(["generate", str(ck), "--prompt", "hello", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("treeffn: error:") and word in err[0], err
    kwargs = {"--temperature": "temperature", "--top-p": "top_p", "--top-k": "top_k"}
    value = float(flags[1]) if flags[0] != "--top-k" else int(flags[1])
    with pytest.raises(TreeffnError, match=word):  # the library refuses them too
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, **{kwargs[flags[0]]: value})
    # the limits themselves are accepted: greedy, top-p 1 (no truncation), top-k 0 (off)
    out = model.generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=0.0, top_p=1.0, top_k=0)
    assert out.shape == (1, 4)


def test_demo_trains_the_tree_and_both_dense_baselines(tmp_path, sample_data, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "debug", "--data", str(sample_data), "--steps", "3", "--out", str(out),
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    header = next(ln for ln in text.splitlines() if ln.split() == ["dense", "tree", "dense-narrow"])
    assert header
    rows = {ln[:26].strip(): ln[26:].split() for ln in text.splitlines() if ln[:26].strip()}
    assert rows["FFN units / layer"] == ["252", "252", "24"], "debug: 4 trees of depth 5; narrow = K·(D+1) units"
    assert rows["active FFN units / token"] == ["252", "24", "24"]
    assert rows["dead tree nodes (worst)"][0] == "–" and rows["dead tree nodes (worst)"][1].endswith("%")
    assert "tree vs dense-narrow (equal inference width)" in text
    for name in ("dense", "tree", "dense-narrow"):
        assert (out / name / "checkpoint.json").is_file(), name
