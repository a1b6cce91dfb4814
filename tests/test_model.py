import pytest
import torch

from treeffn.errors import DataError, TreeffnError
from treeffn.layers import DenseMLP, MoE, TreeFFN
from treeffn.model import KVCache, build_model

KINDS = ["dense", "swiglu", "moe", "tree"]


def test_tree_depth0_is_dense_mlp():
    torch.manual_seed(0)
    D, K = 16, 12
    tree = TreeFFN(D, trees=K, depth=0, activation="gelu")
    mlp = DenseMLP(D, K, "gelu", bias=True)
    with torch.no_grad():
        mlp.fc_in.weight.copy_(tree.w_in[:, 0, 0, :])
        mlp.fc_in.bias.copy_(tree.b_in[:, 0, 0])
        mlp.fc_out.weight.copy_(tree.w_out[:, 0, 0, :].T)
        mlp.fc_out.bias.zero_()
    x = torch.randn(3, 5, D)
    for impl in ("reference", "sparse", "fused"):
        tree.impl = impl
        with torch.set_grad_enabled(impl != "fused"):
            torch.testing.assert_close(tree(x)[0], mlp(x)[0], msg=f"depth-0 tree ({impl}) differs from the dense MLP")


def test_moe_one_expert_top1_is_its_mlp():
    torch.manual_seed(0)
    moe = MoE(16, 32, experts=1, top_k=1)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(moe(x)[0], moe.experts[0](x)[0])


def test_moe_aux_loss_is_returned_and_balanced_value():
    """aux = E · Σ_e f_e · P_e (Switch eq. 4): recomputed independently from the router, exactly 1 for a uniform
    router, close to E when every token goes to one expert."""
    torch.manual_seed(0)
    E, k = 4, 2
    moe = MoE(16, 8, experts=E, top_k=k, aux_weight=0.5)
    x = torch.randn(64, 16)
    _, aux = moe(x)
    probs = torch.softmax(moe.router(x).float(), -1)
    chosen = probs.topk(k, -1).indices.reshape(-1)
    f = torch.bincount(chosen, minlength=E).float() / chosen.numel()
    torch.testing.assert_close(aux["loss"], 0.5 * E * (f * probs.mean(0)).sum())
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities: P_e = 1/E whatever f is
    assert moe(x)[1]["loss"].item() == pytest.approx(0.5 * 1.0)
    with torch.no_grad():  # every token to experts 0 and 1: f = (½, ½, 0, 0), P ≈ (0.73, 0.27, 0, 0), aux ≈ E/k = 2
        moe.router.weight[0, 0], moe.router.weight[1, 0] = 10.0, 9.0
    xc = x.clone()
    xc[:, 0] = 1.0
    assert moe(xc)[1]["loss"].item() / 0.5 == pytest.approx(E / k, rel=1e-3)  # far above the balanced value 1


@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_every_kind(kind):
    torch.manual_seed(0)
    m = build_model("debug", {"ffn.kind": kind})
    x = torch.randint(0, 512, (2, 24))
    out = m(x, targets=x)
    assert out.logits.shape == (2, 24, 512)
    out.loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} got a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    if kind == "moe":
        assert out.aux_loss.item() > 0, "MoE auxiliary loss did not reach the model output"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gqa", [0, 2])
def test_cached_equals_uncached(kind, gqa):
    torch.manual_seed(1)
    m = build_model("debug", {"ffn.kind": kind, "model.n_kv_head": gqa}).eval()
    x = torch.randint(0, 512, (3, 20))
    with torch.no_grad():
        full = m(x).logits
        cache = KVCache(len(m.blocks))
        parts = [m(x[:, :7], cache=cache).logits] + [m(x[:, t:t + 1], cache=cache).logits for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4,
                               msg="KV-cache decoding differs from the full forward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_matches_the_pairwise_rotation(dtype):
    """Rotary's table form (one lookup, x·cos + swap(x)·sin) against the rotation written out on the two halves,
    θ_i = p / base^(2i/C), computed in float64."""
    from treeffn.model import Rotary

    C, base = 16, 10000.0
    rot = Rotary(C, base, 64)
    x = torch.randn(2, 3, 5, C, generator=torch.Generator().manual_seed(0)).to(dtype)
    pos = torch.tensor([[0, 1, 2, 30, 63], [7, 7, 8, 9, 40]])
    ang = pos.double()[:, None, :, None] / base ** (torch.arange(0, C, 2, dtype=torch.float64) / C)
    x1, x2 = x.double().chunk(2, dim=-1)
    want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    got = rot(x, pos)
    assert got.dtype == dtype and got.shape == x.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("kind", ["dense", "tree"])
def test_select_computes_the_logits_of_the_chosen_positions(kind):
    """forward(select=(rows, cols)) gives exactly the full forward's logits at those positions, (S, V); with a
    loss it is refused."""
    torch.manual_seed(0)
    model = build_model("debug", {"ffn.kind": kind}).eval()
    idx = torch.randint(0, model.cfg.model.vocab_size, (3, 9))
    rows, cols = torch.tensor([0, 0, 2, 1]), torch.tensor([8, 3, 0, 5])
    with torch.no_grad():
        full = model(idx).logits
        some = model(idx, select=(rows, cols)).logits
    assert some.shape == (4, model.cfg.model.vocab_size)
    torch.testing.assert_close(some, full[rows, cols], rtol=1e-5, atol=1e-5)
    with pytest.raises(TreeffnError, match="select"):
        model(idx, targets=idx, select=(rows, cols))


def test_generate_greedy_matches_argmax_rollout():
    torch.manual_seed(2)
    m = build_model("debug", {"ffn.kind": "tree", "model.norm": "rmsnorm", "model.tie_embeddings": False}).eval()
    prompt = torch.randint(0, 512, (2, 5))
    out = m.generate(prompt, 6)
    seq = prompt
    for _ in range(6):
        nxt = m(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_generate_sampling_is_seeded():
    m = build_model("debug").eval()
    p = torch.randint(0, 512, (1, 4))
    a = m.generate(p, 8, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = m.generate(p, 8, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (1, 12)


def test_out_of_range_ids_and_long_prompt():
    m = build_model("debug").eval()
    with pytest.raises(DataError, match="out of range"):
        m(torch.tensor([[1, 512]]))
    with pytest.raises(DataError, match="out of range"):
        m(torch.tensor([[-1, 3]]))
    with pytest.raises(TreeffnError, match="longer than the model's context"):
        m.generate(torch.zeros(1, 65, dtype=torch.long), 1)
    with pytest.raises(TreeffnError, match="exceeds the model's context"):
        m.generate(torch.zeros(1, 60, dtype=torch.long), 10)


def test_accounting():
    m = build_model("debug", {"ffn.kind": "tree"})
    u = m.ffn_units()
    assert u["total"] == 4 * 63 and u["active"] == 4 * 6
    d = build_model("debug", {"ffn.kind": "dense", "ffn.hidden": 252})
    assert d.flops_per_token()["ffn"] == pytest.approx(m.flops_per_token()["ffn"] * 63 / 6)
