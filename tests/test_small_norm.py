"""The decoding norms (treeffn.kernels.small_norm) against PyTorch's, their reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from treeffn.config import get_config
from treeffn.kernels import small_norm
from treeffn.kernels.small_norm import SMALL_NORM_ROWS, LayerNorm, RMSNorm
from treeffn.model import GPT, make_norm

pytestmark = pytest.mark.skipif(small_norm.extension() is None, reason="C++ kernels unavailable")


@pytest.mark.parametrize("rows", [1, 3, 8, SMALL_NORM_ROWS])
@pytest.mark.parametrize("D", [512, 37, 1])
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_kernel_matches_torch(rows, D, affine):
    g = torch.Generator().manual_seed(rows * 100 + D)
    x = torch.randn(rows, D, generator=g) * 5 + 3  # an offset and a scale, so the mean and variance matter
    w = torch.randn(D, generator=g) if affine != "none" else None
    b = torch.randn(D, generator=g) if affine == "weight+bias" else None
    ext = small_norm.extension()
    for eps in (1e-5, 1e-2):
        torch.testing.assert_close(ext.norm(x, w, b, eps, False), F.layer_norm(x, (D,), w, b, eps),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ext.norm(x, w, None, eps, True), F.rms_norm(x, (D,), w, eps),
                                   atol=1e-5, rtol=1e-5)


def test_kernel_rejects_what_it_cannot_normalise():
    ext = small_norm.extension()
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="D elements"):
        ext.norm(x, torch.ones(7), None, 1e-5, False)
    with pytest.raises(RuntimeError, match="fp32"):
        ext.norm(x.double(), None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="no bias"):
        ext.norm(x, None, torch.zeros(8), 1e-5, True)


@pytest.mark.parametrize("cls,reference", [(LayerNorm, nn.LayerNorm), (RMSNorm, nn.RMSNorm)])
def test_norm_takes_the_kernel_only_where_it_applies(monkeypatch, cls, reference):
    """Few fp32 CPU rows with autograd off: the kernel; training, more rows, bf16, a strided input: PyTorch's
    norm, with the same result either way."""
    norm = cls(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    calls = []
    real = small_norm.extension()
    counting = type("E", (), {"norm": staticmethod(lambda *a: calls.append(a[0].shape) or real.norm(*a))})
    monkeypatch.setattr(small_norm, "extension", lambda: counting)
    ref = reference(16, eps=1e-5)
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(4, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), ref(x), atol=1e-5, rtol=1e-5)
        assert calls == [torch.Size([4, 1, 16])]
        for other in (torch.randn(SMALL_NORM_ROWS + 1, 16), x.bfloat16(), torch.randn(16, 4).t()):
            norm.to(other.dtype)
            torch.testing.assert_close(norm(other), F.layer_norm(other, (16,), norm.weight, norm.bias, 1e-5)
                                       if cls is LayerNorm else F.rms_norm(other, (16,), norm.weight, 1e-5))
            norm.float()
    y = norm(x)  # autograd on
    y.sum().backward()
    assert norm.weight.grad is not None and len(calls) == 1
    with torch.no_grad(), pytest.raises(RuntimeError):
        norm(torch.randn(2, 15))  # the wrong width: PyTorch's own error, not the kernel's
    assert len(calls) == 1


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_models_build_the_decoding_norms_and_decode_alike_without_them(kind, monkeypatch):
    cfg = get_config("debug", {"model.norm": kind})
    assert isinstance(make_norm(cfg), LayerNorm if kind == "layernorm" else RMSNorm)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    assert all(not type(m) in (nn.LayerNorm, nn.RMSNorm) for m in model.modules())
    idx = torch.randint(0, cfg.model.vocab_size, (2, 5))
    real = small_norm.extension()
    calls = []
    counting = type("E", (), {"norm": staticmethod(lambda *a: calls.append(1) or real.norm(*a))})
    with torch.no_grad():
        monkeypatch.setattr(small_norm, "extension", lambda: counting)
        fast = model.generate(idx, 6)
        monkeypatch.setattr(small_norm, "extension", lambda: None)
        slow = model.generate(idx, 6)
    # the prefill and every decoding step: two norms per layer and the final one
    assert len(calls) == 6 * (2 * cfg.model.n_layer + 1)
    assert torch.equal(fast, slow)
