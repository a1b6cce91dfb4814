"""Gathered sparse GEMV for the training-free sparse MLPs of :mod:`treeffn.layers.sparse_mlp` (TEAL, CATS, WINA).

At batch 1 an MLP is a matrix-vector product that streams all its weights from memory; zeroing activations saves
nothing unless the weights they multiply are never read. ``csrc/sparse_mlp.cpp`` reads, per token, only the rows
of the kept input coordinates (TEAL, WINA) and of the kept hidden units (all three), from tables laid out so each
kept coordinate or unit is one contiguous row:

    TEAL/WINA  w_in = [W1; W3]ᵀ (D, n·H)     CATS  w_in = [W1; W3] (n·H, D)     all  w_out_t = W2ᵀ (H, D)

(n = 2 for SwiGLU, 1 for a dense MLP; :func:`tables` builds them). The masked dense forward of the layer is the
reference it is tested against; :meth:`SparsityMixin.forward_gathered` is a second, ``index_select`` reference.
CPU and fp32 only: :func:`sparse_gemv` answers None for anything else (the caller then runs the masked forward).
"""

from __future__ import annotations

import torch

from ..ops.activations import ACT_CODE
from .build import load_extension

METHOD_CODE = {"teal": 0, "cats": 1, "wina": 2}


def extension():
    """The compiled kernel module (built once, then cached by the loader), or ``None`` (with one warning from the
    loader) when it cannot be built."""
    return load_extension("sparse_mlp")


@torch.no_grad()
def tables(method: str, w_in: list[torch.Tensor], w_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's weight tables from the MLP's matrices: ``w_in`` the (H, D) matrices reading x, gate first;
    ``w_out`` W2 (D, H). Returns (w_in table, W2ᵀ), contiguous fp32 copies (twice the memory of the weights they
    are built from, as long as they are kept)."""
    stacked = torch.cat([w.detach().float() for w in w_in], 0)  # (n·H, D)
    w_in_table = stacked.contiguous() if method == "cats" else stacked.t().contiguous()
    return w_in_table, w_out.detach().float().t().contiguous()


def sparse_gemv(x: torch.Tensor, method: str, w_in_table: torch.Tensor, w_out_t: torch.Tensor,
                b_in: torch.Tensor | None, b_out: torch.Tensor | None, n_in: int, activation: str,
                t_in: float, t_mid: float, norm_in: torch.Tensor | None, norm_mid: torch.Tensor | None,
                k_in: int, k_mid: int) -> torch.Tensor | None:
    """y = the sparse MLP of x (..., D), each token reading only its kept rows; ``None`` when the kernel is not
    available or x is not a contiguous fp32 CPU tensor. ``n_in`` is 2 for SwiGLU, 1 for a dense MLP (whose
    ``activation`` and biases apply); thresholds are TEAL's/CATS's, norms and k WINA's."""
    ext = extension()
    if ext is None or not x.is_cpu or x.dtype != torch.float32:
        return None
    return ext.forward(x.contiguous(), w_in_table, b_in, w_out_t, b_out, METHOD_CODE[method], n_in,
                       ACT_CODE[activation], t_in, t_mid, norm_in, norm_mid, k_in, k_mid)
