"""The small-batch GEMM (treeffn.kernels.small_linear) against F.linear, its reference."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from treeffn.kernels import decode_attention, small_linear
from treeffn.kernels.small_linear import SMALL_ROWS, Linear, use_small_gemm
from treeffn.model import build_model

pytestmark = pytest.mark.skipif(small_linear.extension() is None, reason="C++ kernels unavailable")


@contextlib.contextmanager
def small_gemm(on=True):
    before = use_small_gemm(on)
    try:
        yield
    finally:
        use_small_gemm(before)


@pytest.mark.parametrize("M", range(1, SMALL_ROWS + 1))
@pytest.mark.parametrize("N,K", [(512, 512), (37, 70), (3, 16), (130, 2040), (1, 5)])
def test_kernel_matches_f_linear(M, N, K):
    """Every row count the kernel serves, row counts that are not a multiple of its row blocks, widths that are not
    a multiple of 16 (the masked tail), with and without a bias."""
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    ext = small_linear.extension()
    torch.testing.assert_close(ext.linear(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ext.linear(x, w, None), F.linear(x, w), atol=1e-4, rtol=1e-5)


def test_result_does_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 512, generator=g), torch.randn(4096, 512, generator=g)  # large enough to split
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = small_linear.extension().linear(x, w, None)
        torch.set_num_threads(2)
        two = small_linear.extension().linear(x, w, None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_linear_takes_the_kernel_only_where_it_applies(monkeypatch):
    """On: ≤ SMALL_ROWS fp32 CPU vectors with autograd off, any leading shape; off (the default), more rows,
    autograd on or bf16: F.linear."""
    lin = Linear(64, 48)
    calls = []
    real = small_linear.extension().linear
    monkeypatch.setattr(small_linear, "extension", lambda: type("E", (), {
        "linear": staticmethod(lambda *a: calls.append(a[0].shape) or real(*a))}))
    x = torch.randn(2, 4, 64)
    with torch.no_grad():
        ref = F.linear(x, lin.weight, lin.bias)
        assert torch.equal(lin(x), ref) and not calls  # off by default: exactly F.linear
        with small_gemm():
            torch.testing.assert_close(lin(x), ref, atol=1e-5, rtol=1e-5)
            assert calls == [torch.Size([8, 64])]
            lin(torch.randn(3, 3, 64))  # 9 vectors
            lin.to(torch.bfloat16)(torch.randn(1, 64, dtype=torch.bfloat16))
            lin.float()
    with small_gemm():
        y = lin(torch.randn(1, 64))  # autograd on
    assert len(calls) == 1 and y.requires_grad


@pytest.mark.parametrize("kind", ["dense", "tree"])
def test_decoding_with_the_kernel_matches(kind):
    """Greedy decoding of a model (its MLPs, attention projections in the one-call step, output layer) through the
    kernel gives the logits of the F.linear path."""
    torch.manual_seed(5)
    m = build_model("debug", {"ffn.kind": kind, "model.bias": True}).eval()
    idx = torch.randint(0, 512, (3, 10))
    with torch.no_grad():
        ref = m.generate(idx, 12)
        with small_gemm():
            fast = m.generate(idx, 12)
            logits = m(fast[:, :-1]).logits  # full forward: > SMALL_ROWS vectors, F.linear
        with decode_attention.disabled(), small_gemm():
            no_step = m.generate(idx, 12)
    assert torch.equal(fast, ref) and torch.equal(no_step, ref)
    assert torch.isfinite(logits).all()
