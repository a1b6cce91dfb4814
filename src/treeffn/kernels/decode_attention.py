"""One decoding step of an attention layer in one C++ call (``csrc/decode_attention.cpp``).

Decoding runs each attention layer on one new position per sequence. Op by op, most of that call is dispatch: the
projections are four GEMVs, but around them come a dozen framework ops on tensors of a few hundred numbers (views,
two rotary rotations, the cache writes, the attention over the cache, the output projection), a few microseconds
each. :func:`decode_step` does the step in one call — the projections through the GEMM every other linear layer
of both a tree model and its dense twin uses (``at::linear``, or ``treeffn.kernels.small_linear``'s when that is
on), the rest in plain loops — so the saving is the same for every model.

Used by :class:`treeffn.model.Attention` for a cached one-position step (padded batches included), on CPU in fp32
with autograd off; anything else (GPU, bf16, training with dropout, a prefill) takes the PyTorch path, which is the
reference the kernel is tested against (``tests/test_decode_attention.py``). :func:`disabled` turns the kernel off,
e.g. to time or test the reference; ``TREEFFN_NO_EXT=1`` does so for every kernel.
"""

from __future__ import annotations

import contextlib

import torch

from .build import load_extension
from .small_linear import small_gemm_on

_state = {"ext": None, "tried": False, "enabled": True}


def extension():
    """The compiled kernel module, or ``None`` (with one warning from the loader) when it cannot be built."""
    if not _state["tried"]:
        _state["ext"] = load_extension("decode_attention")
        _state["tried"] = True
    return _state["ext"]


@contextlib.contextmanager
def disabled():
    """Within this block attention layers decode through the PyTorch path."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before


def usable(x: torch.Tensor, weight: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor) -> bool:
    """Whether a step on x (B, 1, D) with projection weights like ``weight`` and cached keys and values in
    kbuf/vbuf can take the kernel."""
    return (_state["enabled"] and not torch.is_grad_enabled() and x.is_cpu and x.dtype == torch.float32
            and weight.dtype == torch.float32 and kbuf.dtype == torch.float32 and vbuf.dtype == torch.float32
            and kbuf.stride(-1) == 1 and vbuf.stride(-1) == 1 and extension() is not None)


def decode_step(x: torch.Tensor, attn, pos: torch.Tensor, cache, valid: torch.Tensor | None = None) -> torch.Tensor:
    """y (B, 1, D) of attention module ``attn`` (q, k, v, o linear layers, n_head, rotary) for x (B, 1, D) at
    positions ``pos`` (B, 1), appending the new position's rotated key, value, position and validity (``valid``
    (B, 1), None = valid) to ``cache`` (a :class:`treeffn.model.LayerCache` holding at least one entry), with the
    PyTorch path's rule: without padding in the cache or the step every cached key is attended to; with padding a
    position attends to the valid keys at positions up to its own, and to itself. The caller has checked
    :func:`usable`."""
    masked = valid is not None or not cache.all_valid
    cache.reserve(1)
    y = _state["ext"].decode_attention(x, attn.q.weight, attn.q.bias, attn.k.weight, attn.k.bias, attn.v.weight,
                                       attn.v.bias, attn.o.weight, attn.o.bias, attn.rotary.table, pos, cache._k,
                                       cache._v, cache._pos, cache._valid, cache.n, valid, masked, attn.n_head,
                                       small_gemm_on())
    cache.n += 1
    if valid is not None and cache.all_valid:
        cache.all_valid = bool(valid.all())
    return y
