"""The one-call decoding step of attention (treeffn.kernels.decode_attention) against the PyTorch path it replaces."""

import contextlib

import pytest
import torch

from treeffn.kernels import decode_attention
from treeffn.model import KVCache, build_model

pytestmark = pytest.mark.skipif(decode_attention.extension() is None, reason="C++ kernels unavailable")


def _decode(m, idx, prompt, kernel):
    """Logits of a prefill of ``prompt`` tokens, then one token at a time, and the cache afterwards."""
    cache = KVCache(len(m.blocks))
    with torch.no_grad():
        if kernel:
            parts = [m(idx[:, :prompt], cache=cache).logits]
            parts += [m(idx[:, t:t + 1], cache=cache).logits for t in range(prompt, idx.shape[1])]
        else:
            with decode_attention.disabled():
                parts = [m(idx[:, :prompt], cache=cache).logits]
                parts += [m(idx[:, t:t + 1], cache=cache).logits for t in range(prompt, idx.shape[1])]
    return torch.cat(parts, 1), cache


@pytest.mark.parametrize("head_dim,kv", [(64, 0), (64, 2), (32, 0), (128, 1), (48, 3)],
                         ids=["c64", "c64-gqa", "c32", "c128-mqa", "c48-gqa"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("B", [1, 3])
def test_kernel_matches_the_pytorch_path(head_dim, kv, bias, B):
    """Logits and cache contents equal the reference's over decoding steps that cross the cache's growth (the
    prefill leaves it full, the first step doubles it), for head widths the kernel specialises (64, 128) and not
    (32, 48), multi-, grouped- and multi-query attention, with and without projection biases."""
    n_head = 6 if head_dim == 48 else 4
    torch.manual_seed(0)
    m = build_model("debug", {"model.d_model": n_head * head_dim, "model.n_head": n_head, "model.n_kv_head": kv,
                              "model.bias": bias, "model.seq_len": 160}).eval()
    if bias:
        with torch.no_grad():
            for blk in m.blocks:
                for lin in (blk.attn.q, blk.attn.k, blk.attn.v, blk.attn.o):
                    lin.bias.normal_(0.0, 0.1)
    idx = torch.randint(0, m.cfg.model.vocab_size, (B, 150), generator=torch.Generator().manual_seed(1))
    fast, fc = _decode(m, idx, 64, kernel=True)
    ref, rc = _decode(m, idx, 64, kernel=False)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(fc.layers, rc.layers):
        assert a.length == b.length == 150
        torch.testing.assert_close(a.k, b.k, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.v, b.v, atol=1e-6, rtol=1e-5)
        assert torch.equal(a.pos, b.pos) and torch.equal(a.valid, b.valid)


def test_peaked_attention_matches():
    """Large query/key weights make the softmax nearly one-hot (scores tens apart): the kernel's exponential and its
    maximum subtraction hold there too."""
    torch.manual_seed(2)
    m = build_model("debug", {"model.seq_len": 96}).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.q.weight.mul_(30.0)
            blk.attn.k.weight.mul_(30.0)
    idx = torch.randint(0, m.cfg.model.vocab_size, (2, 90), generator=torch.Generator().manual_seed(3))
    fast, _ = _decode(m, idx, 10, kernel=True)
    ref, _ = _decode(m, idx, 10, kernel=False)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_the_kernel_is_what_decoding_runs(monkeypatch):
    """A no-grad fp32 CPU decoding step goes through the kernel; with autograd on, or in bf16, the PyTorch path."""
    calls = []
    real = decode_attention.decode_step
    monkeypatch.setattr(decode_attention, "decode_step", lambda *a: calls.append(1) or real(*a))
    m = build_model("debug").eval()
    idx = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        m.generate(idx[:, :5], 3)
    assert len(calls) == 2 * len(m.blocks)  # the prefill has 5 positions; then 2 one-token steps
    calls.clear()
    cache = KVCache(len(m.blocks))
    m(idx[:, :5], cache=cache)
    out = m(idx[:, 5:6], cache=cache).logits  # autograd on: the reference path, differentiable
    assert not calls and out.requires_grad
    with torch.no_grad():
        mb = build_model("debug").eval().to(torch.bfloat16)
        mb.generate(idx[:, :5], 3)
    assert not calls


def test_generate_is_unchanged_by_the_kernel():
    """Greedy generation with the kernel equals generation through the PyTorch path, token for token."""
    torch.manual_seed(3)
    m = build_model("debug", {"ffn.kind": "tree"}).eval()
    idx = torch.randint(0, 512, (3, 12))
    fast = m.generate(idx, 20)
    with decode_attention.disabled():
        ref = m.generate(idx, 20)
    assert torch.equal(fast, ref)


def test_training_mode_with_attention_dropout_takes_the_pytorch_path(monkeypatch):
    """The kernel has no dropout: a cached step in training mode with dropout on goes through the reference."""
    calls = []
    real = decode_attention.decode_step
    monkeypatch.setattr(decode_attention, "decode_step", lambda *a: calls.append(1) or real(*a))
    m = build_model("debug", {"model.dropout": 0.1}).train()
    idx = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        cache = KVCache(len(m.blocks))
        m(idx[:, :5], cache=cache)
        m(idx[:, 5:], cache=cache)
        assert not calls
        m.eval()
        m(idx[:, 5:], cache=cache)
    assert len(calls) == len(m.blocks)


def test_padded_batches_match():
    """Left-padded prompts (explicit positions, padding invalid) and decoding steps where some rows add an invalid
    entry (as a Mixture-of-Depths block does for rows it skips): the kernel's masked attention equals the PyTorch
    path's, including a row whose new entry is invalid (it attends to its valid keys and itself)."""
    torch.manual_seed(6)
    m = build_model("debug", {"model.n_kv_head": 2}).eval()
    B, P = 3, 9
    g = torch.Generator().manual_seed(7)
    lengths = [9, 5, 2]
    valid = torch.tensor([[i >= P - n for i in range(P)] for n in lengths])
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    idx = torch.randint(0, 512, (B, P), generator=g)
    steps = [(torch.randint(0, 512, (B, 1), generator=g), torch.tensor([[True], [t % 2 == 0], [t != 1]]))
             for t in range(6)]

    def run(kernel):
        cache = KVCache(len(m.blocks))
        ctx = contextlib.nullcontext() if kernel else decode_attention.disabled()
        with torch.no_grad(), ctx:
            out = [m(idx, cache=cache, pos=pos, valid=valid).logits]
            p = pos[:, -1:].clone()
            for tok, ok in steps:
                p = p + 1
                out.append(m(tok, cache=cache, pos=p, valid=ok).logits)
        return torch.cat(out, 1), cache

    fast, fc = run(True)
    ref, rc = run(False)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(fc.layers, rc.layers):
        assert torch.equal(a.valid, b.valid) and torch.equal(a.pos, b.pos) and a.all_valid == b.all_valid is False
