"""Training-free activation sparsity (treeffn.sparsify, treeffn.layers.sparse_mlp): TEAL, CATS and WINA.

A briefly trained debug SwiGLU model, a GELU MLP with biases and the tiny synthetic Llama of
tests/test_gguf_convert.py are sparsified on the committed text sample. Checked: the calibrated fraction of active
hidden units is within ±2 points of the target on held-out tokens (windows that calibrate nothing); ``--active 1``
gives the dense logits exactly; the result loads, evaluates, generates and reloads with the reported loss; the
one-token gathered path equals the masked forward; bad input is one error line, exit 2, nothing written.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from treeffn import cli
from treeffn.checkpoint import load_model, save_checkpoint_dir
from treeffn.config import get_config
from treeffn.data import load_tokens
from treeffn.errors import ConfigError
from treeffn.evaluate import evaluate_checkpoint, windows_loss
from treeffn.layers import build_ffn
from treeffn.layers.sparse_mlp import METHODS, magnitude_quantile
from treeffn.model import build_model

ARGS = ["--tokens", "2048", "--heldout-tokens", "2048", "--seq-len", "64", "--quiet", "--json"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def swiglu_run(tmp_path_factory, sample_data):
    """A debug SwiGLU model trained for 40 steps (seconds)."""
    from treeffn.train import train

    torch.manual_seed(0)
    cfg = get_config("debug", {"ffn.kind": "swiglu", "ffn.hidden": 128, "train.max_steps": 40,
                               "train.eval_every": 40, "train.eval_batches": 1, "train.seed": 1})
    out = tmp_path_factory.mktemp("sparsify") / "dense"
    train(cfg, out, sample_data, progress=False, tensorboard=False)
    return out


def sparsify(src, out, method, active, data, capsys, *extra):
    rc = cli.main(["sparsify", str(src), "--method", method, "--active", str(active), "--out", str(out),
                   "--data", str(data), *ARGS, *extra])
    assert rc == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def heldout_windows(summary, data) -> torch.Tensor:
    toks = load_tokens(data, "train")
    n = summary["seq_len"]
    return torch.tensor(np.stack([toks[s:s + n] for s in summary["windows"]["heldout"]]).astype("int64"))


def check_fraction(summary, target):
    for layer in summary["layers"]:
        assert abs(layer["heldout_active"] - target) <= 0.02, layer
        if summary["method"] != "cats":  # TEAL and WINA also keep a fraction F of the input coordinates
            assert abs(layer["heldout_input_active"] - target) <= 0.02, layer
        else:
            assert layer["heldout_input_active"] == 1.0


@pytest.mark.parametrize("method", METHODS)
def test_swiglu_fraction_loss_and_reload(method, swiglu_run, sample_data, tmp_path, capsys):
    out = tmp_path / method
    s = sparsify(swiglu_run, out, method, 0.4, sample_data, capsys)
    check_fraction(s, 0.4)
    w = s["windows"]
    spans = sorted(w["calibrate"] + w["heldout"])
    assert all(b - a >= w["span"] for a, b in zip(spans, spans[1:])), "calibration and held-out windows overlap"
    assert s["ffn_flops_sparse"] < s["ffn_flops_dense"]
    model = load_model(out)
    assert model.cfg.ffn.kind == "sparse" and model.cfg.sparsity.method == method
    assert model.ffn_units()["fraction"] == pytest.approx(0.4)
    held = heldout_windows(s, sample_data)
    assert windows_loss(model, held) == pytest.approx(s["heldout_loss_sparse"], abs=1e-3)
    assert windows_loss(load_model(swiglu_run), held) == pytest.approx(s["heldout_loss_dense"], abs=1e-3)
    assert s["heldout_loss_sparse"] != s["heldout_loss_dense"]
    if method != "wina":  # per-layer thresholds, saved with the weights
        t = [float(f.threshold_mid) for f in model.ffn_modules()]
        assert t[0] != t[1] and t == [pytest.approx(x["threshold_mid"], abs=1e-5) for x in s["layers"]]
    res = evaluate_checkpoint(out, str(sample_data), windows=2, batch_size=2, progress=False)
    assert res["ffn_active_fraction"] == pytest.approx(0.4) and np.isfinite(res["val_loss"])
    assert json.loads((out / "sparsify.json").read_text())["method"] == method
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("method", METHODS)
def test_active_one_is_the_dense_model_exactly(method, swiglu_run, sample_data, tmp_path, capsys):
    s = sparsify(swiglu_run, tmp_path / "s", method, 1.0, sample_data, capsys)
    assert s["ffn_flops_sparse"] == s["ffn_flops_dense"] and s["heldout_loss_sparse"] == s["heldout_loss_dense"]
    idx = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "s")(idx).logits, load_model(swiglu_run)(idx).logits)


@pytest.mark.parametrize("method", METHODS)
def test_gelu_mlp_with_biases(method, sample_data, tmp_path, capsys):
    torch.manual_seed(0)
    src = save_checkpoint_dir(tmp_path / "gelu", build_model("debug", {"ffn.kind": "dense", "model.bias": True}))
    s = sparsify(src, tmp_path / "s", method, 0.25, sample_data, capsys)
    check_fraction(s, 0.25)
    assert load_model(tmp_path / "s").cfg.sparsity.mlp == "dense"


def test_tiny_llama_from_gguf(sample_data, tmp_path, capsys):
    """The imported Llama (its own byte-level vocabulary: the sample is re-encoded for it), generated from."""
    pytest.importorskip("gguf")
    from test_gguf_convert import write_tiny_gguf

    from treeffn import gguf_import as gi

    write_tiny_gguf(tmp_path / "tiny.gguf", seed=1, tied=True)
    src = gi.import_gguf(tmp_path / "tiny.gguf", tmp_path / "ckpt", progress=False)
    s = sparsify(src, tmp_path / "s", "cats", 0.5, sample_data, capsys)
    check_fraction(s, 0.5)
    assert s["mlp"] == "swiglu"
    assert cli.main(["generate", str(tmp_path / "s"), "--prompt", "the cat", "--max-new-tokens", "4",
                     "--temperature", "0"]) == 0


@pytest.mark.parametrize("mlp", ["swiglu", "dense"])
@pytest.mark.parametrize("method", METHODS)
def test_layer_gathered_path_and_accounting(mlp, method):
    torch.manual_seed(0)
    cfg = get_config("debug", {"ffn.kind": "sparse", "sparsity.mlp": mlp, "sparsity.method": method,
                               "sparsity.active": 0.3, "model.bias": True})
    f = build_ffn(cfg).eval()
    x = torch.randn(512, 64)
    f.calibrate(x)
    with torch.no_grad():
        y = f(x[:8])[0]
        for i in range(8):
            torch.testing.assert_close(f.forward_gathered(x[i]), y[i], atol=1e-5, rtol=1e-4)
    D, H, n_in = 64, 252, 2 if mlp == "swiglu" else 1
    dense = 2 * D * H * (n_in + 1)
    expect = 2 * D * H * (1 + 0.3 * n_in) if method == "cats" else 0.3 * dense
    assert f.flops_per_token() == pytest.approx(expect) and f.active_units() == pytest.approx(0.3 * H)
    assert "sparse" in cfg.describe() and method in cfg.describe()


def test_magnitude_quantile():
    v = torch.arange(-50, 50, dtype=torch.float32)
    t = magnitude_quantile(v, 0.3)
    assert float((v.abs() > t).float().mean()) == pytest.approx(0.3, abs=0.011)
    assert magnitude_quantile(v, 1.0) == 0.0


def test_config_validation():
    with pytest.raises(ConfigError, match="sparsity.active"):
        get_config("debug", {"ffn.kind": "sparse", "sparsity.active": 0})
    with pytest.raises(ConfigError, match="sparsity.method"):
        get_config("debug", {"ffn.kind": "sparse", "sparsity.method": "relu"})


@pytest.mark.parametrize("args, word", [(["--method", "dejavu", "--active", "0.5"], "--method"),
                                        (["--method", "teal", "--active", "0"], "--active"),
                                        (["--method", "teal", "--active", "1.5"], "--active"),
                                        (["--method", "teal", "--active", "half"], "--active"),
                                        (["--method", "wina", "--active", "0.5", "TREE"], "ffn.kind=tree")])
def test_bad_input_is_one_line_and_writes_nothing(args, word, swiglu_run, sample_data, tmp_path, capsys):
    src = swiglu_run
    if "TREE" in args:
        args = [a for a in args if a != "TREE"]
        src = save_checkpoint_dir(tmp_path / "tree", build_model("debug", {"ffn.kind": "tree"}))
    out = tmp_path / "out"
    rc = cli.main(["sparsify", str(src), *args, "--out", str(out), "--data", str(sample_data), "--quiet"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("treeffn: error")]
    assert rc == 2 and len(lines) == 1 and word in lines[0] and "Traceback" not in err, err
    assert not out.exists()


def test_output_guard(swiglu_run, sample_data, tmp_path, capsys):
    """The output is guarded as every command's: never the input, never a foreign folder, a checkpoint only with
    --overwrite."""
    def rc(out, *extra):
        return cli.main(["sparsify", str(swiglu_run), "--method", "cats", "--active", "0.5", "--out", str(out),
                         "--data", str(sample_data), *ARGS, *extra])

    assert rc(swiglu_run) == 2 and "own input" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert rc(mine) == 2 and (mine / "notes.txt").read_text() == "keep"
    assert rc(tmp_path / "s") == 0
    capsys.readouterr()
    assert rc(tmp_path / "s") == 2 and "--overwrite" in capsys.readouterr().err
    assert rc(tmp_path / "s", "--overwrite") == 0


# ---- the gathered sparse GEMV kernel against the masked reference ------------------------------------------------
def _kernel_or_skip():
    from treeffn.kernels import sparse_mlp as kernel

    if kernel.extension() is None:  # TREEFFN_REQUIRE_EXT (CI) turns this into an error instead
        pytest.skip("the sparse GEMV extension could not be built")
    return kernel


def _sparse_layer(mlp, method, active, D=256, H=1024):
    from treeffn.layers.sparse_mlp import SparseDenseMLP, SparseSwiGLU

    torch.manual_seed(0)
    f = SparseSwiGLU(D, H, method, active) if mlp == "swiglu" else SparseDenseMLP(D, H, method, active)
    with torch.no_grad():  # non-zero biases, so the kernel's bias handling is exercised
        for p in f.parameters():
            if p.dim() == 1:
                p.normal_()
    f.eval().calibrate(torch.randn(1024, D))
    return f


@pytest.mark.parametrize("mlp", ["swiglu", "dense"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("active", [0.5, 0.1])
def test_sparse_gemv_kernel_matches_the_masked_reference(mlp, method, active):
    _kernel_or_skip()
    f = _sparse_layer(mlp, method, active)
    x = torch.randn(6, 256)
    threads = torch.get_num_threads()
    with torch.no_grad():
        ref = f._project(f.sparse_hidden(x)[0])
        y = f.forward_kernel(x)
        torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-4)
        try:  # the same bits whatever the thread count (the parallel split is by columns or rows, never a sum)
            torch.set_num_threads(1)
            assert torch.equal(f.forward_kernel(x), y)
        finally:
            torch.set_num_threads(threads)
        _, keep_in, keep = f.sparse_hidden(x)
    assert 0 < float(keep.float().mean()) < 1 and (keep_in is None or 0 < float(keep_in.float().mean()) < 1)


def test_module_runs_the_kernel_at_batch_one_without_autograd(monkeypatch):
    kernel = _kernel_or_skip()
    import treeffn.layers.sparse_mlp as sm

    calls = []
    monkeypatch.setattr(sm, "sparse_gemv", lambda *a, **k: calls.append(1) or kernel.sparse_gemv(*a, **k))
    f = _sparse_layer("swiglu", "teal", 0.25)
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        y = f(x)[0]
        assert len(calls) == 1 and y.shape == x.shape
        torch.testing.assert_close(y, f._project(f.sparse_hidden(x)[0]), atol=2e-5, rtol=1e-4)
        f(torch.randn(2, 256))  # more than GATHER_MAX_TOKENS tokens: the masked product
        assert len(calls) == 1
    y = f(x)[0]  # autograd recording: the masked reference, differentiable
    assert len(calls) == 1 and y.requires_grad
    with torch.no_grad():  # the kernel's weight tables follow an in-place change of the weights
        f.w2.weight.mul_(2.0)
        f.threshold_mid.mul_(0.5)
        torch.testing.assert_close(f(x)[0], f._project(f.sparse_hidden(x)[0]), atol=4e-5, rtol=1e-4)


def test_kernel_under_inference_mode_and_recalibration():
    _kernel_or_skip()
    with torch.inference_mode():  # a model built and used under inference mode: its tensors have no versions
        f = _sparse_layer("dense", "cats", 0.5, D=64, H=128)
        x = torch.randn(1, 64)
        torch.testing.assert_close(f(x)[0], f._project(f.sparse_hidden(x)[0]), atol=2e-5, rtol=1e-4)
        f.active = 0.1  # recalibrating to another fraction reaches the kernel's cached thresholds too
        f.calibrate(torch.randn(1024, 64))
        torch.testing.assert_close(f(x)[0], f._project(f.sparse_hidden(x)[0]), atol=2e-5, rtol=1e-4)
