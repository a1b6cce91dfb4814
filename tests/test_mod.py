"""Mixture-of-Depths (treeffn.mod) and integrated MoDE (MoE with no-op experts, treeffn.layers.moe).

One test per bug found in public MoD implementations: each would fail on that bug.
Shapes follow the ``debug`` preset (d 64, 2 layers, context 64, vocab 512); ``mod.every=2`` routes block 1.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from treeffn.config import get_config
from treeffn.errors import ConfigError
from treeffn.layers.moe import MoE
from treeffn.mod import RoutedBlock, capacity_tokens
from treeffn.model import Block, KVCache, build_model

D, CTX, V = 64, 64, 512


def _model(**over):
    torch.manual_seed(0)
    o = {"mod.every": 2}
    o.update(over)
    m = build_model("debug", o)
    for f in m.ffn_modules():  # tree layers: the reference path needs no compiled kernel
        if hasattr(f, "impl"):
            f.impl = "reference"
    return m


def _routed_block(capacity=0.125, causal="aux", scale=True, seed=0):
    torch.manual_seed(seed)
    cfg = get_config("debug", {"mod.every": 2, "mod.capacity": capacity, "mod.causal": causal})
    rb = RoutedBlock(cfg, Block(cfg), scale_by_router=scale)
    with torch.no_grad():  # a router of realistic size (GPT's 0.02 init on tiny activations gives ~1e-3 logits)
        rb.router.weight.normal_(0.0, 0.5)
    return rb


def _record_inner(rb):
    """Capture what the wrapped block receives: [(x_sel, pos_sel, cache, valid_sel), ...]."""
    calls = []
    rb.block.register_forward_hook(lambda mod, args, out: calls.append(args))
    return calls


def _inputs(B=2, T=CTX, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    pos = torch.arange(T).expand(B, T)
    return x, pos


# ---- training forward -------------------------------------------------------------------------------------------
def test_unselected_tokens_are_bit_identical():
    rb = _routed_block().train()
    calls = _record_inner(rb)
    x, pos = _inputs()
    out, _ = rb(x, pos)
    sel = torch.zeros(x.shape[:2], dtype=torch.bool).scatter_(1, calls[0][1], True)
    assert sel.sum(1).tolist() == [8, 8]
    assert torch.equal(out[~sel], x[~sel])  # not merely close: untouched
    assert not torch.allclose(out[sel], x[sel])


def test_residual_not_doubled_nor_scaled():
    rb = _routed_block().train()
    x, pos = _inputs()
    out, _ = rb(x, pos)
    r = rb.router(x).squeeze(-1)
    idx = r.topk(8, dim=1).indices.sort(1).values
    xs = x.gather(1, idx[..., None].expand(-1, -1, D))
    f, _ = rb.block(xs, pos.gather(1, idx), None, torch.ones_like(idx, dtype=torch.bool), residual=False)
    expected = xs + r.gather(1, idx)[..., None] * f  # x + r·f, not x + r·(x + f), not r·x + …
    got = out.gather(1, idx[..., None].expand(-1, -1, D))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got, xs + r.gather(1, idx)[..., None] * (xs + f), atol=1e-3)


def test_router_receives_gradient_from_lm_loss():
    m = _model(**{"mod.causal": "predictor"})  # predictor mode: the aux loss cannot reach the router
    idx = torch.randint(0, V, (2, CTX))
    out = m(idx, targets=idx)
    out.lm_loss.backward()
    g = m.blocks[1].router.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_top_c_is_per_sequence():
    rb = _routed_block().train()
    calls = _record_inner(rb)
    x, pos = _inputs()
    x[0] *= 100.0  # a batch-wide top-k would pick every token from sequence 0
    out, aux = rb(x, pos)
    got = calls[0][1]
    assert got.shape == (2, 8)
    r = rb.router(x).squeeze(-1)
    for b in range(2):
        assert set(got[b].tolist()) == set(r[b].topk(8).indices.tolist())
    assert float(aux["mod_capacity"]) == pytest.approx(8 / CTX)


def test_selected_tokens_keep_temporal_order_and_original_positions():
    rb = _routed_block().train()
    calls = _record_inner(rb)
    x, _ = _inputs(T=40)
    pos = (torch.arange(40) + 20).expand(2, 40)  # as if this were a later window of the sequence
    rb(x, pos)
    xs, ps = calls[0][0], calls[0][1]
    assert ps.shape == (2, 5)
    assert bool((ps[:, 1:] > ps[:, :-1]).all())  # temporal order
    assert int(ps.min()) >= 20  # original positions, not renumbered 0..C-1
    idx = ps - 20
    torch.testing.assert_close(xs, x.gather(1, idx[..., None].expand(-1, -1, D)), rtol=0, atol=0)
    # renumbering would change the rotary angles, hence the result
    ones = torch.ones_like(ps, dtype=torch.bool)
    f_orig, _ = rb.block(xs, ps, None, ones, residual=False)
    f_renum, _ = rb.block(xs, torch.arange(5).expand(2, 5), None, ones, residual=False)
    assert not torch.allclose(f_orig, f_renum, atol=1e-4)


def test_full_capacity_without_router_scaling_equals_plain_block():
    rb = _routed_block(capacity=1.0, scale=False).train()
    x, pos = _inputs()
    out, _ = rb(x, pos, standard=True)
    ref, _ = rb.block(x, pos, None, None, standard=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("T", [1, 2, 3, 7])
def test_short_sequences_route_at_least_one_token(T):
    assert capacity_tokens(0.125, T) == 1
    assert capacity_tokens(0.125, 64) == 8 and capacity_tokens(0.125, 65) == 9 and capacity_tokens(1.0, 5) == 5
    rb = _routed_block().train()
    calls = _record_inner(rb)
    x, pos = _inputs(T=T)
    out, _ = rb(x, pos)
    assert calls and calls[0][1].shape == (2, 1)
    assert ((out != x).any(-1).sum(1) == 1).all()
    m = _model().train()
    idx = torch.randint(0, V, (2, T))
    assert torch.isfinite(m(idx, targets=idx).loss)


# ---- causal rule: evaluation and generation ---------------------------------------------------------------------
@pytest.mark.parametrize("causal", ["aux", "predictor"])
def test_eval_is_causal(causal):
    m = _model(**{"mod.causal": causal}).eval()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, V, (3, 40), generator=g)
    t = 19
    idx2 = idx.clone()
    idx2[:, t + 1:] = torch.randint(0, V, (3, 40 - t - 1), generator=g)
    with torch.no_grad():
        a, b = m(idx).logits, m(idx2).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)


def _scale_routers(m, s=25.0):
    # GPT's init gives router logits ~1e-3: scale up so decisions are far from 0 (robust to rounding) and mixed
    with torch.no_grad():
        for blk in m.blocks:
            if isinstance(blk, RoutedBlock):
                blk.router.weight.mul_(s)
    return m


@pytest.mark.parametrize("causal", ["aux", "predictor"])
@pytest.mark.parametrize("B", [1, 3])
def test_cached_decoding_equals_full_forward(causal, B):
    m = _scale_routers(_model(**{"mod.causal": causal})).eval()
    rb = m.blocks[1]
    g = torch.Generator().manual_seed(4)
    L = 24
    idx = torch.randint(0, V, (B, L), generator=g)
    calls = _record_inner(rb)
    with torch.no_grad():
        full = m(idx)
    routed_per_row = calls[0][3].sum(1)  # valid entries = routed tokens of each row
    frac = float(full.stats[1]["mod_routed"])
    assert 0.0 < frac < 1.0, frac  # the rule routes some tokens, not all
    cache = KVCache(len(m.blocks))
    pieces = []
    with torch.no_grad():
        pieces.append(m(idx[:, :8], cache=cache).logits)  # prefill
        pieces.append(m(idx[:, 8:12], cache=cache).logits)  # a chunk
        for t in range(12, L):  # one token at a time
            pieces.append(m(idx[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full.logits, rtol=0, atol=2e-5)
    lc = cache.layers[1]
    assert torch.equal(lc.valid.sum(1), routed_per_row)  # only routed tokens are (valid) keys of this layer
    assert lc.length < L and cache.layers[0].length == L
    if B == 1:
        assert bool(lc.valid.all())  # nothing to pad with one row
    # generate() uses the same rule: its greedy continuation matches argmax of full forwards
    out = m.generate(idx[:, :6], 6)
    with torch.no_grad():
        ref = m(out[:, :-1]).logits[:, 5:].argmax(-1)
    assert torch.equal(out[:, 6:], ref)


def test_eval_skips_block_when_nothing_routes():
    rb = _routed_block().eval()
    with torch.no_grad():
        rb.router.bias.fill_(-1e4)
    calls = _record_inner(rb)
    x, pos = _inputs()
    out, aux = rb(x, pos)
    assert not calls and torch.equal(out, x) and float(aux["mod_routed"]) == 0.0


@pytest.mark.parametrize("bias", [-1e4, 0.0, 1e4])
def test_eval_reports_the_routed_fraction_and_its_flops(tmp_path, sample_data, bias):
    """In evaluation the causal rule decides how many tokens a routed block processes: `treeffn eval` reports the
    fraction it measured and counts FLOPs from it, not from mod.capacity (the top-C fraction of training)."""
    from treeffn.checkpoint import save_checkpoint_dir
    from treeffn.evaluate import evaluate_checkpoint

    m = _scale_routers(_model())
    with torch.no_grad():
        m.blocks[1].router.bias.fill_(bias)  # -1e4: nothing routes; 1e4: everything; 0: the router decides
    save_checkpoint_dir(tmp_path / "ck", m, {"data.json": {"data_dir": str(sample_data)}})
    res = evaluate_checkpoint(tmp_path / "ck", sample_data, windows=4, batch_size=2, progress=False)
    frac = res["mod_routed_fraction"]
    assert res["mod_capacity"] == 0.125
    if bias < 0:
        assert frac == 0.0
    elif bias > 0:
        assert frac == 1.0
    else:
        assert 0.0 < frac < 1.0 and frac != 0.125
    # the same windows through the model by hand: the block's own statistic, token-weighted
    from treeffn.data import load_tokens
    from treeffn.data import Batches

    val = Batches(load_tokens(sample_data, "val"), CTX, V)
    x, _ = val.window(val.eval_starts(4))
    with torch.no_grad():
        assert frac == pytest.approx(float(m.eval()(x).stats[1]["mod_routed"]), abs=1e-6)
    plain = build_model("debug", {"mod.every": 0}).flops_per_token()  # every block processes every token
    one_block = plain["ffn"] / 2
    assert res["ffn_flops_per_token"] == pytest.approx(one_block + frac * one_block)
    assert res["flops_per_token"] == pytest.approx(m.flops_per_token(routed=frac)["total"])
    assert m.flops_per_token()["ffn"] == pytest.approx(one_block * 1.125)  # training: the capacity


# ---- predictor --------------------------------------------------------------------------------------------------
def test_predictor_trained_on_detached_input_only_by_its_bce():
    m = _model(**{"mod.causal": "predictor"}).train()
    rb = m.blocks[1]
    seen = []
    rb.predictor.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    block_in = []
    rb.register_forward_hook(lambda mod, args, out: block_in.append(args[0]))
    idx = torch.randint(0, V, (2, CTX))
    out = m(idx, targets=idx)
    assert not seen[0].requires_grad and torch.equal(seen[0], block_in[0])  # stop-gradient of the block *input*
    out.lm_loss.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in rb.predictor.parameters())
    m.zero_grad(set_to_none=True)
    out.aux_loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in rb.predictor.parameters())
    others = [p for n, p in m.named_parameters() if ".predictor." not in n]
    assert all(p.grad is None or not p.grad.any() for p in others)  # the BCE does not reach the model


def test_predictor_labels_come_from_the_same_sequence():
    rb = _routed_block(causal="predictor").train()
    x, pos = _inputs(B=3)
    x[1] *= 50.0
    _, aux = rb(x, pos)
    r = rb.router(x).squeeze(-1)
    labels = torch.zeros_like(r).scatter_(1, r.topk(8, dim=1).indices, 1.0)
    p = rb.predictor(x).squeeze(-1)
    expected = rb.aux_weight * F.binary_cross_entropy_with_logits(p, labels)
    torch.testing.assert_close(aux["loss"], expected)


# ---- combinations: dense, staged MoDE (moe), tree, integrated MoDE (mode) -----------------------------------------
@pytest.mark.parametrize("kind,over", [("dense", {}), ("moe", {}), ("tree", {}), ("mode", {"moe.noop_experts": 2})])
def test_ffn_kinds(kind, over):
    m = _scale_routers(_model(**{"ffn.kind": kind, **over}))
    assert isinstance(m.blocks[1], RoutedBlock) and m.blocks[1].ffn is m.blocks[1].block.ffn
    m.train()
    idx = torch.randint(0, V, (2, 32))
    out = m(idx, targets=idx)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert m.blocks[1].router.weight.grad.abs().sum() > 0
    if kind in ("moe", "mode"):  # staged / integrated MoDE: the expert router inside the routed block trains too
        assert m.blocks[1].ffn.router.weight.grad.abs().sum() > 0
        assert float(out.aux_loss.detach()) > 0
    m.eval()
    # other tokens than the training batch: a tree's running thresholds are that batch's per-node means after one
    # step, so its own tokens would sit exactly on them, where kernels with different summation orders may disagree
    idx = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(idx).logits
        cache = KVCache(len(m.blocks))
        pieces = [m(idx[:, :20], cache=cache).logits] + [m(idx[:, t:t + 1], cache=cache).logits for t in range(20, 32)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=2e-5)
    assert m.generate(idx[:1, :4], 4).shape == (1, 8)


@pytest.mark.parametrize("causal", ["aux", "predictor"])
def test_bf16_autocast(causal):
    m = _model(**{"ffn.kind": "mode", "moe.noop_experts": 2, "mod.causal": causal}).train()
    idx = torch.randint(0, V, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(idx, targets=idx)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    m.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(m(idx).logits).all()


# ---- integrated MoDE layer --------------------------------------------------------------------------------------
def test_noop_experts_never_chosen_change_nothing():
    """Integrated MoDE is the MoE plus no-op experts: when the router never picks a no-op, the outputs are the MoE's."""
    torch.manual_seed(0)
    moe = MoE(D, 32, 4, 2)
    mode = MoE(D, 32, 4, 2, noop_experts=3)
    mode.experts.load_state_dict(moe.experts.state_dict())
    mode.router = torch.nn.Linear(D, 7, bias=True)  # a bias keeps the no-op logits far below the real ones
    with torch.no_grad():
        mode.router.weight.zero_()
        mode.router.weight[:4] = moe.router.weight
        mode.router.bias.zero_()
        mode.router.bias[4:] = -1e4  # probability exp(-1e4) = 0: never in the top 2, no share of the renormalisation
    x = torch.randn(3, 5, D)
    torch.testing.assert_close(mode(x)[0], moe(x)[0])


def test_mode_noop_tokens_skip_the_mlp():
    torch.manual_seed(0)
    mode = MoE(D, 32, experts=2, noop_experts=2, top_k=1)
    with torch.no_grad():
        mode.router.weight.zero_()
        mode.router.weight[0, 0] = 10.0  # x[0] > 0 -> real expert 0
        mode.router.weight[2, 0] = -10.0  # x[0] < 0 -> no-op expert 2
    x = torch.randn(40, D)
    calls = []
    for e in mode.experts:
        e.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    mode.track_stats = True
    y, aux = mode(x)
    skip = x[:, 0] < 0
    assert torch.equal(y[skip], torch.zeros_like(y[skip]))
    assert (y[~skip] != 0).any(-1).all()
    assert calls == [int((~skip).sum())]  # the no-op tokens never reach an MLP
    assert float(aux["mode_noop_frac"]) == pytest.approx(float(skip.float().mean()))
    assert mode.active_units() == pytest.approx(32 * 1 * 2 / 4)


def test_mode_config():
    with pytest.raises(ConfigError):
        get_config("debug", {"moe.noop_experts": -1})
    m = _model(**{"ffn.kind": "mode", "moe.noop_experts": 4, "mod.every": 0})
    assert isinstance(m.ffn_modules()[0], MoE) and m.ffn_modules()[0].n_noop == 4
    assert m.ffn_units()["fraction"] == pytest.approx(2 / 4 * 4 / 8)  # top-2 of 4 experts, half the slots no-op


# ---- bench smoke test -------------------------------------------------------------------------------------------
def test_bench_smoke(capsys):
    from treeffn.bench.common import check_record
    from treeffn.bench.mod import main

    threads = torch.get_num_threads()
    rc = main(["--preset", "debug", "--prompt", "6", "--new", "4", "--decode-batch", "1,2", "--batch", "2",
               "--seq-len", "16", "--warmup", "0", "--repeats", "1", "--router-steps", "2"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    check_record(res, "mod")  # the JSON line schema shared by every benchmark (bench/common.py)
    s, summary = res["settings"], res["summary"]
    assert (s["every"], s["capacity"], s["causal"], s["router_steps"]) == (2, 0.125, "aux", 2)
    assert res["env"]["threads"] == 1 and torch.get_num_threads() == threads  # the bench restores the caller's threads
    train = {r["impl"]: r for r in res["results"] if r["case"]["phase"] == "train"}
    assert set(train) == {"baseline", "mod"}
    for r in train.values():
        assert (r["case"]["batch"], r["case"]["seq_len"]) == (2, 16) and r["time_s"]["median"] > 0
    ratio = train["mod"]["time_s"]["median"] / train["baseline"]["time_s"]["median"]
    assert summary["train_ratio"] == pytest.approx(ratio, rel=1e-3)
    assert train["mod"]["metrics"]["time_ratio_vs_baseline"] == pytest.approx(ratio, rel=1e-3)
    decode = [r for r in res["results"] if r["case"]["phase"] == "decode"]
    assert [(r["case"]["batch"], r["impl"]) for r in decode] == [(1, "baseline"), (1, "mod"), (2, "baseline"),
                                                                   (2, "mod")]
    speedups = []
    for base, mod in zip(decode[::2], decode[1::2]):
        assert (mod["case"]["prompt"], mod["case"]["new"]) == (6, 4) and 0.0 <= mod["metrics"]["routed_frac"] <= 1.0
        speedup = mod["metrics"]["speedup_vs_baseline"]
        assert speedup == pytest.approx(mod["metrics"]["tok_s"] / base["metrics"]["tok_s"], rel=1e-3)
        assert mod["metrics"]["tok_s"] == pytest.approx(mod["case"]["batch"] * 4 / mod["time_s"]["median"], rel=1e-3)
        assert math.isfinite(speedup) and base["metrics"]["tok_s"] > 0
        speedups.append(speedup)
    # one routed block (2 layers, every 2): one agreement figure, a fraction
    assert len(summary["router_agreement"]) == 1 and 0.0 <= summary["router_agreement"][0] <= 1.0
    # the analytic FLOPs ratio is that of the two configurations at T = 16 (training: top-C at capacity)
    base = build_model("debug", {"mod.every": 0}).flops_per_token(16)["total"]
    mod = build_model("debug", {"mod.every": 2, "mod.capacity": 0.125}).flops_per_token(16)["total"]
    assert summary["flops_ratio"] == pytest.approx(mod / base, rel=1e-4) and summary["flops_ratio"] < 1
    assert train["mod"]["metrics"]["flops_per_token"] == pytest.approx(mod, rel=1e-4)
    t = summary["targets"]
    assert t["decode_met"] == all(sp >= t["decode_speedup"] for sp in speedups)
    assert t["train_met"] == (summary["train_ratio"] <= t["train_ratio"])


def test_mod_checkpoint_round_trip(tmp_path):
    """RoutedBlock must not shadow nn.Module internals: a MoD model saves, loads and moves between devices."""
    from treeffn.checkpoint import load_model, save_checkpoint_dir

    m = build_model("debug", {"mod.every": 2}).eval()
    save_checkpoint_dir(tmp_path / "ck", m)
    m2 = load_model(tmp_path / "ck").to(torch.float32)
    x = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(m(x).logits, m2(x).logits)
