"""Linear layers for decoding: y = x Wᵀ + b on a few token vectors in one pass over W (``csrc/small_linear.h``).

Decoding multiplies one vector per sequence by every weight matrix of the model, so each matrix streams from
memory once per step and a handful of tokens share it. PyTorch's GEMM handles some of these shapes well below
what that stream allows; the kernel here loads a few rows of W at a time into one accumulator per row and token
and prefetches the next rows, so W streams through the core once whatever the number of tokens (``treeffn bench
generate --gemm small`` measures what it changes end to end, for a tree model and its dense twin alike, and
``treeffn bench layer --gemm small`` for the dense baselines of a single layer).

:class:`Linear` is the ``nn.Linear`` every treeffn model builds — attention projections, output layer, dense and
SwiGLU MLPs, routers — so that both models of a comparison multiply alike. The kernel is off by default
(:func:`use_small_gemm` turns it on for every such layer and for the projections of the one-call attention step,
``treeffn.kernels.decode_attention``); when on, it serves at most :data:`SMALL_ROWS` token vectors on the CPU in
fp32 with autograd off, and ``F.linear`` everything else — the reference it is tested against
(``tests/test_small_linear.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .build import load_extension

SMALL_ROWS = 8  # csrc/small_linear.h: kSmallRows

_state = {"ext": None, "tried": False, "on": False}


def use_small_gemm(on: bool) -> bool:
    """Turn the kernel on or off for every :class:`Linear` and the attention step; returns the previous setting."""
    before = _state["on"]
    _state["on"] = bool(on)
    return before


def small_gemm_on() -> bool:
    return _state["on"]


def extension():
    """The compiled kernel module, or ``None`` (with one warning from the loader) when it cannot be built."""
    if not _state["tried"]:
        _state["ext"] = load_extension("small_linear")
        _state["tried"] = True
    return _state["ext"]


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x (..., K) Wᵀ + b through the kernel, or None where it does not apply (kernel off, more than SMALL_ROWS
    vectors, not fp32 on the CPU, autograd on, or no compiled kernel)."""
    K = weight.shape[1]
    if (not _state["on"] or torch.is_grad_enabled() or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not x.is_cpu
            or not 0 < x.numel() <= SMALL_ROWS * K or x.shape[-1] != K or not weight.is_contiguous()
            or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()))):
        return None
    ext = extension()
    if ext is None:
        return None
    return ext.linear(x.reshape(-1, K).contiguous(), weight, bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` whose few-vector inference calls (decoding) take :func:`small_linear`; same parameters, same
    results up to the order of summation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = small_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) if y is None else y
