"""LayerNorm and RMSNorm for decoding: a few rows normalised in one call on the calling thread
(``csrc/small_norm.cpp``).

A decoding step normalises one position per sequence twice per layer and once before the output layer. On a few
thousand numbers PyTorch's norm is mostly dispatch and the wake-up of its thread team, both paid 2·n_layer + 1
times per step by every model alike; the kernel here is a plain loop per row.

:class:`LayerNorm` and :class:`RMSNorm` are the norms every treeffn model builds (``treeffn.model.make_norm``):
``nn.LayerNorm`` / ``nn.RMSNorm`` with the same parameters, whose calls on at most :data:`SMALL_NORM_ROWS` rows,
fp32 on the CPU with autograd off, take the kernel; everything else (training, prefill, GPU, bf16) takes PyTorch's,
the reference the kernel is tested against (``tests/test_small_norm.py``). ``TREEFFN_NO_EXT=1`` turns it off with
every other kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from .build import load_extension

SMALL_NORM_ROWS = 64


def extension():
    """The compiled kernel module (built once, then cached by the loader), or ``None`` (with one warning from the
    loader) when it cannot be built."""
    return load_extension("small_norm")


def small_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               rms: bool) -> torch.Tensor | None:
    """The norm of x's rows through the kernel, or None where it does not apply (autograd on, not fp32 on the CPU,
    more than SMALL_NORM_ROWS rows, a non-contiguous input, or no compiled kernel)."""
    if (torch.is_grad_enabled() or x.dtype != torch.float32 or not x.is_cpu or not x.is_contiguous()
            or not 0 < x.numel() <= SMALL_NORM_ROWS * x.shape[-1]
            or (weight is not None and (weight.dtype != torch.float32 or not weight.is_contiguous()))
            or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()))):
        return None
    ext = extension()
    if ext is None:
        return None
    return ext.norm(x, weight, bias, eps, rms)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension whose few-row inference calls (decoding) take :func:`small_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if self.normalized_shape == x.shape[-1:]:
            y = small_norm(x, self.weight, self.bias, self.eps, False)
        return super().forward(x) if y is None else y


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` over the last dimension whose few-row inference calls (decoding) take :func:`small_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if self.normalized_shape == x.shape[-1:]:
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
            y = small_norm(x, self.weight, None, eps, True)
        return super().forward(x) if y is None else y
