"""Weights on transparent huge pages, for inference on CPU.

A tree layer's token reads a dozen rows scattered over megabytes of weights, and inside a model the other layers have
evicted them since its last call: every row is a cache miss, and with 4 KiB pages a TLB miss too, whose page walk
misses the cache as well. Backed by 2 MiB pages, a layer's rows are covered by a handful of TLB entries and each row
costs one memory round trip. The same holds, less strongly, for the gathered rows of the sparse MLPs; dense layers,
which stream their weights, gain little (``treeffn bench layer --huge-pages off`` compares).

Linux only, where transparent huge pages are enabled (``always`` or ``madvise`` in
/sys/kernel/mm/transparent_hugepage/enabled): a tensor is copied into an anonymous mapping advised with
MADV_HUGEPAGE. Elsewhere every function here leaves tensors where they are. The copies are ordinary CPU tensors (one
mapping each, never shared), so saving, loading, ``.to()`` and pickling behave as before.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
PAGE = mmap.PAGESIZE
MIN_BYTES = HUGE_PAGE  # a smaller tensor holds no whole huge page: it stays put
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_available: bool | None = None


def huge_pages_available() -> bool:
    """Whether this system gives huge pages to memory advised with MADV_HUGEPAGE."""
    global _available
    if _available is None:
        try:
            mode = _THP.read_text()
        except OSError:
            mode = ""
        _available = hasattr(mmap, "MADV_HUGEPAGE") and ("[always]" in mode or "[madvise]" in mode)
    return _available


def _mapping_size(nbytes: int) -> int:
    """Bytes of the mapping that holds ``nbytes``: whole ordinary pages, plus 2 MiB of room for the alignment."""
    return -(-nbytes // PAGE) * PAGE + HUGE_PAGE


def _mapping(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` starting on a 2 MiB boundary of an anonymous mapping: its whole 2 MiB ranges are
    advised onto huge pages, its tail (under 2 MiB) onto ordinary pages, so that no huge page extends past the data.
    The mapping is 2 MiB longer than the data to make room for the alignment; that slack is never touched, so it
    costs address space, not memory."""
    size = _mapping_size(nbytes)
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = torch.frombuffer(mm, dtype=torch.uint8)  # the tensor's storage keeps the mapping alive
    offset = -buf.data_ptr() % HUGE_PAGE
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    if whole:
        mm.madvise(mmap.MADV_HUGEPAGE, offset, whole)
    if offset + whole < size and hasattr(mmap, "MADV_NOHUGEPAGE"):  # where THP is "always": not the tail either
        mm.madvise(mmap.MADV_NOHUGEPAGE, offset + whole, size - offset - whole)
    return buf[offset:offset + nbytes]


def huge_page_copy(t: torch.Tensor, min_bytes: int | None = None) -> torch.Tensor:
    """``t`` copied onto huge pages (contiguous, same dtype, shape and values), or ``t`` itself when it is not a
    dense CPU tensor of at least ``min_bytes`` (default :data:`MIN_BYTES`), is there already, or huge pages are
    unavailable."""
    nbytes = t.numel() * t.element_size()
    if (nbytes == 0 or nbytes < (MIN_BYTES if min_bytes is None else min_bytes) or t.device.type != "cpu"
            or t.layout != torch.strided or t.is_quantized or on_huge_pages(t) or not huge_pages_available()):
        return t
    out = _mapping(nbytes).view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def on_huge_pages(t: torch.Tensor) -> bool:
    """Whether ``t`` is the data of a mapping :func:`huge_page_copy` made (2 MiB-aligned, within 2 MiB of the start of
    a storage of exactly the size :func:`_mapping` gives) — which ordinary allocations are not."""
    s = t.untyped_storage()
    nbytes = t.numel() * t.element_size()
    return (t.data_ptr() % HUGE_PAGE == 0 and 0 <= t.data_ptr() - s.data_ptr() < HUGE_PAGE
            and s.nbytes() == _mapping_size(nbytes))


@torch.no_grad()
def use_huge_pages(module: nn.Module, min_bytes: int | None = None) -> int:
    """Move every parameter and buffer of ``module`` of at least ``min_bytes`` (default :data:`MIN_BYTES`) onto huge
    pages, in place (the same Parameter objects, so tied weights stay tied and optimizers keep their references);
    returns the bytes moved.

    For inference on CPU: call it after loading and after any dtype or device change (``treeffn.load_model`` does).
    """
    moved = 0
    seen: set[int] = set()
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                data = t.data
                new = huge_page_copy(data, min_bytes)
                if new is not data:
                    moved += new.numel() * new.element_size()
                    if isinstance(t, nn.Parameter):
                        t.data = new
                    else:
                        table[name] = new
        drop = getattr(m, "_drop_infer", None)
        if drop is not None:  # a tree layer's fast path holds its weights: rebuild it on the next call
            drop()
    return moved
