"""Top-k activation MLP (ffn.kind=topk): k = H is the dense MLP; only k units reach the output; honest FLOPs."""

import pytest
import torch

from treeffn.config import get_config
from treeffn.errors import ConfigError
from treeffn.layers import DenseMLP, TopKMLP, build_ffn
from treeffn.model import GPT


def test_full_k_is_the_dense_mlp():
    torch.manual_seed(0)
    dense = DenseMLP(16, 24)
    topk = TopKMLP(16, 24, k=24)
    topk.load_state_dict(dense.state_dict())
    x = torch.randn(5, 7, 16)
    torch.testing.assert_close(topk(x)[0], dense(x)[0], rtol=0, atol=0)


def test_only_the_k_largest_units_contribute_and_get_gradient():
    torch.manual_seed(0)
    layer = TopKMLP(16, 24, k=3, bias=False)
    x = torch.randn(10, 16)
    h = layer.phi(layer.fc_in(x))
    keep = torch.zeros_like(h).scatter(-1, h.topk(3, -1).indices, 1.0)
    y, _ = layer(x)
    torch.testing.assert_close(y, (h * keep) @ layer.fc_out.weight.T)
    y.square().sum().backward()
    used = keep.bool().any(0)  # columns of W2 no token kept receive exactly zero gradient
    assert (layer.fc_out.weight.grad[:, ~used] == 0).all()
    assert (layer.fc_out.weight.grad[:, used].abs().sum(0) > 0).all()


def test_accounting_and_config():
    cfg = get_config("debug", {"ffn.kind": "topk", "ffn.hidden": 64, "topk.active": 8})
    f = build_ffn(cfg)
    assert isinstance(f, TopKMLP) and f.total_units() == 64 and f.active_units() == 8
    assert f.flops_per_token() == 2 * cfg.model.d_model * (64 + 8), "all pre-activations are computed"
    assert "topk 8 of 64" in cfg.describe()
    out = GPT(cfg)(torch.randint(0, 512, (2, 8)))
    assert out.logits.shape == (2, 8, 512)
    with pytest.raises(ConfigError, match="topk.active"):
        get_config("debug", {"ffn.kind": "topk", "ffn.hidden": 64, "topk.active": 65})
