"""Weights on transparent huge pages (treeffn.memory): same values, same modules, same checkpoints."""

import pytest
import torch

from treeffn import checkpoint as ckpt
from treeffn import memory
from treeffn.layers.tree import TreeFFN
from treeffn.model import build_model

needs_thp = pytest.mark.skipif(not memory.huge_pages_available(), reason="transparent huge pages unavailable")


@needs_thp
def test_huge_page_copy_keeps_values_and_is_idempotent():
    t = torch.randn(700, 600)[:, ::2]  # not contiguous: the copy is
    h = memory.huge_page_copy(t, min_bytes=0)
    assert torch.equal(h, t) and h.dtype == t.dtype and h.is_contiguous()
    assert memory.on_huge_pages(h) and not memory.on_huge_pages(torch.randn(700, 600))
    assert h.data_ptr() % memory.HUGE_PAGE == 0
    assert memory.huge_page_copy(h, min_bytes=0) is h  # already there
    small = torch.randn(10)
    assert memory.huge_page_copy(small) is small  # below MIN_BYTES: stays put
    del t
    assert torch.isfinite(h).all()  # the mapping lives as long as the tensor


@needs_thp
def test_tree_layer_fast_path_follows_its_weights_onto_huge_pages():
    torch.manual_seed(0)
    layer = TreeFFN(64, 2, 4, balance="threshold").eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        before, _ = layer(x)
        assert layer._infer is not None
        w_in = layer.w_in
        assert memory.use_huge_pages(layer, min_bytes=0) > 0
        assert layer.w_in is w_in and memory.on_huge_pages(layer.w_in)  # the same Parameter, its data moved
        after, _ = layer(x)
    assert torch.equal(before, after)
    assert layer._infer is not None and layer._infer[1].data_ptr() == layer.w_in.data_ptr()


def test_use_huge_pages_keeps_a_model_and_its_checkpoint(tmp_path, monkeypatch):
    """Logits, tied embeddings, state_dict names and the saved checkpoint are those of the model before the move;
    where huge pages are unavailable nothing moves."""
    torch.manual_seed(0)
    m = build_model("debug", {"ffn.kind": "tree"}).eval()
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        before = m(x).logits
    keys = list(m.state_dict())
    moved = memory.use_huge_pages(m, min_bytes=0)
    assert (moved > 0) == memory.huge_pages_available()
    assert m.lm_head.weight is m.tok_emb.weight and list(m.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(m(x).logits, before)
    folder = ckpt.save_checkpoint_dir(tmp_path / "run" / "step-0000001", m)
    ckpt.publish(tmp_path / "run", folder.name)
    monkeypatch.setattr(memory, "MIN_BYTES", 0)  # load_model's move covers the debug model's small tensors too
    for huge in (True, False):
        loaded = ckpt.load_model(tmp_path / "run", huge_pages=huge)
        assert loaded.lm_head.weight is loaded.tok_emb.weight
        assert memory.on_huge_pages(loaded.tok_emb.weight) == (huge and memory.huge_pages_available())
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, before)
    monkeypatch.setattr(memory, "_available", False)
    fresh = build_model("debug", {"ffn.kind": "tree"})
    assert memory.use_huge_pages(fresh, min_bytes=0) == 0
    assert not any(memory.on_huge_pages(p) for p in fresh.parameters())


@needs_thp
@pytest.mark.parametrize("method", ["teal", "cats", "wina"])
def test_sparse_kernel_tables_follow_the_weights_onto_huge_pages(method, monkeypatch):
    from treeffn.config import get_config
    from treeffn.layers import build_ffn

    cfg = get_config("debug", {"ffn.kind": "sparse", "sparsity.method": method, "sparsity.active": 0.25})
    torch.manual_seed(0)
    layer = build_ffn(cfg).eval()
    layer.calibrate(torch.randn(256, cfg.model.d_model))
    x = torch.randn(1, cfg.model.d_model)
    monkeypatch.setattr(memory, "MIN_BYTES", 0)  # the debug shape's tables are small
    with torch.no_grad():
        before, _ = layer(x)
        assert not memory.on_huge_pages(layer._kernel_tables()["w_in"])
        memory.use_huge_pages(layer)
        after, _ = layer(x)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    tables = layer._kernel_tables()
    assert memory.on_huge_pages(tables["w_in"]) and memory.on_huge_pages(tables["w_out_t"])
