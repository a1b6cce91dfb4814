"""Training path for tree feed-forward layers: forward and backward at the cost of the visited nodes.

The layer is the UltraFastBERT form (Belcak & Wattenhofer, arXiv 2311.10770, eq. for y(x) = Σ_t φ(λ_(j_t)) v_(j_t))
with DS-26's two placements of φ (Sedghi et al., arXiv 2604.08565); :mod:`treeffn.layers.tree` defines the maths and
``tree_reference`` (:mod:`treeffn.ops.tree`), the masked dense simulation, is the ground truth this module is tested against.

Shapes: M tokens, D model width, K trees, L = depth + 1 levels, N = 2^L − 1 nodes per tree, W units per node.

    x (M, D);  w_in, w_out (K, N, W, D);  b_in (K, N, W) or None;  thr (K, N) or None
    ->  y (M, D) in x's dtype, paths (M, K, L) int64 [, lam (M, K, L, W) responses of the visited units, no grad]

``thr`` holds routing thresholds (``tree.balance``): a token goes right at node j iff Σ_w λ > thr_j (0 without
it). They only move the routing decision, so they receive no gradient and leave the formulas below unchanged.
``paths`` (M, K, L) int64, when given, replaces the routing altogether (``tree.route="children"`` routes in
:mod:`treeffn.ops.tree` and passes its paths here); the formulas are again unchanged.

Gradients (hard routing, stop-gradient on the path; G_mk is the upstream gradient of tree k's D-vector sum, i.e.
dy_m for ``"node"`` and φ'(z_mk) ⊙ dy_m for ``"output"``; g = ∂loss/∂λ for one visited unit)::

    "node":    g = φ'(λ) · (v · dy)      dv += φ(λ) · dy
    "output":  g = v · G_mk               dv += λ · G_mk
    both:      dx += g · u                du += g · x          db += g

Only the K·L·W visited units of each token are read or written, so the work per token is O(K·L·W·D); the only
O(N) cost is allocating the dense (zero) parameter-gradient tensors PyTorch expects, once per batch. Nothing of
shape (M, K, N, …) is ever built (the reference builds (M, K, N, W)).

Backends (``backend``):

* ``"cpp"``   — ``csrc/tree_train.cpp``: fused forward and backward (OpenMP). The backward walks each tree's
  tokens in leaf order, so consecutive tokens share their path's rows and each node's parameter gradient is summed
  in a local accumulator and written once by one thread (no atomics, no per-thread gradient copies). CPU; fp32,
  bf16 (fp32 accumulation) and fp64 (for gradcheck).
* ``"torch"`` — PyTorch ops, any device: routing level by level (gathered rows and batched dots, or a small GEMM
  over all nodes of a shallow level), then the visited units as a sparse token × unit matrix, so that y, dx, du
  and dv are each one sparse-dense product over all levels (see the comment above ``_TreeTrainTorch``); chunked
  over tokens where it gathers. Computes in fp32 (fp64 for fp64 inputs).
* ``"auto"``  — ``"cpp"`` for CPU tensors of a supported dtype when the extension builds, else ``"torch"``.
"""

from __future__ import annotations

import warnings

import torch

from ..errors import ConfigError
from ..ops.activations import ACT_CODE as _ACT_CODE
from ..ops.activations import ACTIVATIONS, activation_fn, activation_grad
from ..ops.tree import PLACEMENT_CODE as _PLACEMENT_CODE
from ..ops.tree import PLACEMENTS
from .build import load_extension

_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
BACKENDS = ("auto", "cpp", "torch")

# Torch path: bound on gathered elements per level (tokens of a chunk × K × W × D); a few such temporaries are alive
# at once in the backward (16 MiB each on CPU). Larger chunks mean fewer ops; accelerators prefer large launches.
_CHUNK_ELEMS_CPU = 1 << 22
_CHUNK_ELEMS_ACCEL = 1 << 25


def extension():
    """The compiled kernels' op namespace (``.forward``, ``.backward``), or ``None`` (after one warning from the
    loader) when the extension cannot be built. The library registers its ops under its own module name."""
    module = load_extension("tree_train")
    return None if module is None else getattr(torch.ops, module.__name__)


def tree_train(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out: torch.Tensor,
    depth: int,
    activation: str = "gelu",
    placement: str = "node",
    backend: str = "auto",
    thr: torch.Tensor | None = None,
    return_lam: bool = False,
    paths: torch.Tensor | None = None,
):
    """Differentiable tree layer on x (M, D): ``(y (M, D), paths (M, K, L) int64, no grad)``, and with
    ``return_lam`` also the visited units' responses λ (M, K, L, W) (detached; what routing statistics need).

    Equal in value and gradient (w.r.t. x, w_in, b_in, w_out) to ``tree_reference``; see the module docstring.
    Weights of another dtype than x are cast to x's dtype first (the cast is part of the autograd graph).
    """
    if activation not in _ACT_CODE:
        raise ConfigError(f"unknown activation '{activation}'; choose one of {', '.join(ACTIVATIONS)}")
    if placement not in _PLACEMENT_CODE:
        raise ConfigError(f"unknown tree placement '{placement}'; choose one of {', '.join(PLACEMENTS)}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown tree_train backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if x.dim() != 2 or w_in.dim() != 4 or w_out.shape != w_in.shape:
        raise ConfigError(f"tree_train: expected x (M, D) and w_in, w_out (K, N, W, D); got x {tuple(x.shape)}, "
                          f"w_in {tuple(w_in.shape)}, w_out {tuple(w_out.shape)}")
    K, N, W, D = w_in.shape
    if depth < 0 or N != 2 ** (depth + 1) - 1 or x.shape[1] != D:
        raise ConfigError(f"tree_train: w_in {tuple(w_in.shape)} does not match depth {depth} and x {tuple(x.shape)}")
    if b_in is not None and b_in.shape != (K, N, W):
        raise ConfigError(f"tree_train: b_in {tuple(b_in.shape)} should be {(K, N, W)}")
    if thr is not None:
        if thr.shape != (K, N):
            raise ConfigError(f"tree_train: routing threshold {tuple(thr.shape)} should be {(K, N)}")
        thr = thr.detach().float().contiguous()
    if paths is not None:
        if paths.shape != (x.shape[0], K, depth + 1) or paths.dtype != torch.long:
            raise ConfigError(f"tree_train: given paths {tuple(paths.shape)} {paths.dtype} should be "
                              f"{(x.shape[0], K, depth + 1)} int64")
        paths = paths.detach().contiguous()

    dt = x.dtype
    w_in, w_out = w_in.to(dt).contiguous(), w_out.to(dt).contiguous()
    b_in = b_in.to(dt).contiguous() if b_in is not None else None
    x = x.contiguous()
    act, place = _ACT_CODE[activation], _PLACEMENT_CODE[placement]

    if backend == "auto":
        use_cpp = x.device.type == "cpu" and dt in _CPP_DTYPES and extension() is not None
    elif backend == "cpp":
        if x.device.type != "cpu" or dt not in _CPP_DTYPES:
            raise ConfigError(f"tree_train backend='cpp' needs CPU tensors of float32, bfloat16 or float64 "
                              f"(got {dt} on {x.device.type}); use backend='torch'")
        if extension() is None:
            raise RuntimeError("tree_train: the C++ kernel could not be built (see the warning above); "
                               "use backend='torch'")
        use_cpp = True
    else:
        use_cpp = False
    fn = _TreeTrainCpp if use_cpp else _TreeTrainTorch
    y, paths, lam = fn.apply(x, w_in, b_in, w_out, depth, act, place, thr, paths)
    return (y, paths, lam) if return_lam else (y, paths)


# ---- C++ path -------------------------------------------------------------------------------------------------------

class _TreeTrainCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, depth, act, place, thr, given):
        y, paths, lam = extension().forward(x, w_in, b_in, w_out, depth, act, place, thr, given)
        ctx.save_for_backward(x, w_in, b_in, w_out, paths, lam)
        ctx.depth, ctx.act, ctx.place = depth, act, place
        ctx.mark_non_differentiable(paths, lam)
        return y, paths, lam

    @staticmethod
    def backward(ctx, dy, _dpaths, _dlam):
        x, w_in, b_in, w_out, paths, lam = ctx.saved_tensors
        need_x, need_u, need_b, need_v = ctx.needs_input_grad[:4]
        need_params = need_u or need_b or need_v
        dx, dw_in, db_in, dw_out = extension().backward(
            dy.contiguous(), x, w_in, b_in, w_out, paths, lam, ctx.depth, ctx.act, ctx.place, need_x, need_params)
        return (dx if need_x else None, dw_in if need_u else None, db_in if need_b else None,
                dw_out if need_v else None, None, None, None, None, None)


# ---- PyTorch path ---------------------------------------------------------------------------------------------------
#
# Row gathers (index_select of visited rows, then batched dots) cost a full copy of every visited row, and
# index_add_ / index_put_ of per-pair outer products builds (pairs, W·D) temporaries. So the path uses them only where
# it must (the routing dots of deep levels, whose nodes are only known level by level) and otherwise treats the visited
# units as a sparse (M × K·N·W) matrix S with one entry per (token, visited unit): y = S_φ·V, dx = S_g·U, du = S_gᵀ·x,
# dv = S_φᵀ·dy are single sparse-dense products over all levels (CSR rows are the tokens; work O(M·K·L·W·D)).

# Levels with at most this many nodes per tree compute their routing dots densely for all their nodes (a small GEMM,
# K·2^t·W columns) instead of gathering one row per token and tree.
_DENSE_LEVEL_NODES = 16


def _chunk_tokens(x: torch.Tensor, K: int, W: int, D: int) -> int:
    budget = _CHUNK_ELEMS_CPU if x.device.type == "cpu" else _CHUNK_ELEMS_ACCEL
    return max(1, budget // max(1, K * W * D))


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def _level_dots(src: torch.Tensor, table: torch.Tensor, node: torch.Tensor, t: int) -> torch.Tensor:
    """Dot products of src rows with the rows of their visited node at level t, per tree and unit.

    src (Mc, D) or (Mc, K, D) (one vector per tree), table (K, N, W, D), node (Mc, K) global node indices of level t
    -> (Mc, K, W) in src's dtype.
    """
    K, N, W, D = table.shape
    mc = node.shape[0]
    width = 2 ** t
    if width <= _DENSE_LEVEL_NODES:  # all nodes of the level: (Mc, K, width, W), then pick the visited one
        lvl = table[:, width - 1:2 * width - 1].to(src.dtype)  # (K, width, W, D)
        if src.dim() == 2:
            alld = torch.einsum("md,kjwd->mkjw", src, lvl)
        else:
            alld = torch.einsum("mkd,kjwd->mkjw", src, lvl)
        pick = (node - (width - 1)).view(mc, K, 1, 1).expand(mc, K, 1, W)
        return alld.gather(2, pick).view(mc, K, W)
    idx = (node + (torch.arange(K, device=node.device) * N).view(1, K)).reshape(-1)  # (Mc·K,)
    rows = table.reshape(K * N, W, D).index_select(0, idx).to(src.dtype)  # (Mc·K, W, D)
    if src.dim() == 2:
        return torch.bmm(rows.view(mc, K * W, D), src.unsqueeze(-1)).view(mc, K, W)
    return torch.bmm(rows, src.reshape(mc * K, D, 1)).view(mc, K, W)


def _unit_columns(paths: torch.Tensor, N: int, W: int) -> torch.Tensor:
    """Flat unit index (k·N + node)·W + w of every visited unit: paths (M, K, L) -> (M·K·L·W,), token-major, and
    ascending within a token (trees in order, a child's index exceeds its parent's), i.e. valid CSR column order."""
    M, K, L = paths.shape
    base = (paths + (torch.arange(K, device=paths.device) * N).view(1, K, 1)) * W
    return (base.unsqueeze(-1) + torch.arange(W, device=paths.device)).reshape(-1)


def _csr(values: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """(n_rows × n_cols) CSR matrix with the same number of entries per row (values, cols row-major)."""
    per_row = cols.numel() // max(1, n_rows)
    crow = torch.arange(0, n_rows * per_row + 1, max(1, per_row), device=cols.device)[:n_rows + 1]
    with warnings.catch_warnings():  # torch flags sparse CSR as beta; CSR × dense is all this path uses of it
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, cols, values.reshape(-1), (n_rows, n_cols), check_invariants=False)


def _csr_t_mm(values: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int, dense: torch.Tensor):
    """Sᵀ · dense for S (n_rows × n_cols) given as in :func:`_csr`: (n_cols, dense.shape[1])."""
    per_row = cols.numel() // max(1, n_rows)
    rows = torch.arange(n_rows, device=cols.device).repeat_interleave(per_row)
    st = torch.sparse_coo_tensor(torch.stack([cols, rows]), values.reshape(-1), (n_cols, n_rows),
                                 check_invariants=False)
    return torch.sparse.mm(st, dense)


class _TreeTrainTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, depth, act, place, thr, given):
        M, D = x.shape
        K, N, W, _ = w_in.shape
        L = depth + 1
        cdt = _compute_dtype(x.dtype)
        phi = activation_fn(ACTIVATIONS[act])
        dev = x.device
        b_rows = b_in.reshape(K * N, W) if b_in is not None else None
        tree_base = (torch.arange(K, device=dev) * N).view(1, K)
        paths = torch.empty(M, K, L, dtype=torch.long, device=dev)
        lam = torch.empty(M, K, L, W, dtype=cdt, device=dev)  # saved: the backward needs λ, and it is small
        chunk = _chunk_tokens(x, K, W, D)
        for m0 in range(0, M, chunk):  # routing: level by level, the next node depends on this level's responses
            xc = x[m0:m0 + chunk].to(cdt)
            mc = xc.shape[0]
            node = torch.zeros(mc, K, dtype=torch.long, device=dev)
            for t in range(L):
                paths[m0:m0 + mc, :, t] = node
                lt = _level_dots(xc, w_in, node, t)  # (Mc, K, W)
                if b_rows is not None:
                    lt = lt + b_rows.index_select(0, (node + tree_base).reshape(-1)).view(mc, K, W).to(cdt)
                lam[m0:m0 + mc, :, t] = lt
                if t < depth and given is not None:
                    node = given[m0:m0 + mc, :, t + 1]
                elif t < depth:
                    cut = 0.0 if thr is None else thr.view(-1)[node + tree_base].to(cdt)  # (Mc, K)
                    node = 2 * node + 1 + (lt.sum(-1) > cut).long()
        cols = _unit_columns(paths, N, W)
        v_all = w_out.reshape(K * N * W, D).to(cdt)
        if place == 0:  # y = Σ φ(λ) v: one sparse product, tokens × visited units
            y = (_csr(phi(lam), cols, M, K * N * W) @ v_all).to(x.dtype)
        else:  # z_mk = Σ λ v per tree (rows are (token, tree)), y = Σ_k φ(z), in chunks of tokens
            y = torch.empty(M, D, dtype=x.dtype, device=dev)
            per_tok = K * L * W
            for m0 in range(0, M, chunk):
                mc = min(chunk, M - m0)
                c = cols[m0 * per_tok:(m0 + mc) * per_tok]
                z = _csr(lam[m0:m0 + mc], c, mc * K, K * N * W) @ v_all  # (Mc·K, D)
                y[m0:m0 + mc] = phi(z.view(mc, K, D)).sum(1).to(x.dtype)
        ctx.save_for_backward(x, w_in, b_in, w_out, paths, lam)
        ctx.depth, ctx.act, ctx.place = depth, act, place
        ctx.mark_non_differentiable(paths, lam)
        return y, paths, lam

    @staticmethod
    def backward(ctx, dy, _dpaths, _dlam):
        x, w_in, b_in, w_out, paths, lam = ctx.saved_tensors
        need_x, need_u, need_b, need_v = ctx.needs_input_grad[:4]
        need_b = need_b and b_in is not None
        place, name = ctx.place, ACTIVATIONS[ctx.act]
        phi = activation_fn(name)
        M, D = x.shape
        K, N, W, _ = w_in.shape
        L = ctx.depth + 1
        KNW = K * N * W
        cdt = lam.dtype
        dev = x.device
        dyc_all = dy.to(cdt)
        cols = _unit_columns(paths, N, W)
        g = torch.empty(M, K, L, W, dtype=cdt, device=dev)  # ∂loss/∂λ per visited unit
        gv = torch.zeros(KNW, D, dtype=cdt, device=dev) if (need_v and place == 1) else None
        chunk = _chunk_tokens(x, K, W, D)
        for m0 in range(0, M, chunk):
            dyc = dyc_all[m0:m0 + chunk]
            mc = dyc.shape[0]
            pc, lc = paths[m0:m0 + mc], lam[m0:m0 + mc]
            if place == 0:
                for t in range(L):  # v · dy, all trees against the same dy
                    g[m0:m0 + mc, :, t] = _level_dots(dyc, w_out, pc[:, :, t], t) * activation_grad(name, lc[:, :, t])
            else:
                per_tok = K * L * W
                c = cols[m0 * per_tok:(m0 + mc) * per_tok]
                z = (_csr(lc, c, mc * K, KNW) @ w_out.reshape(KNW, D).to(cdt)).view(mc, K, D)
                G = activation_grad(name, z) * dyc.unsqueeze(1)  # φ'(z) ⊙ dy, per tree
                for t in range(L):  # v · G_k per tree
                    g[m0:m0 + mc, :, t] = _level_dots(G, w_out, pc[:, :, t], t)
                if need_v:  # dv += λ G_k: rows are (token, tree) pairs, so no single token-major product
                    idx = cols.view(M, K, L, W)[m0:m0 + mc].reshape(-1)
                    gv.index_put_((idx,), (lc.unsqueeze(-1) * G.view(mc, K, 1, 1, D)).reshape(-1, D), accumulate=True)
        dx = dw_in = db_in = dw_out = None
        if need_x:  # dx = Σ g u
            dx = (_csr(g, cols, M, KNW) @ w_in.reshape(KNW, D).to(cdt)).to(x.dtype)
        if need_u:  # du = Σ g x
            dw_in = _csr_t_mm(g, cols, M, KNW, x.to(cdt)).view(K, N, W, D).to(w_in.dtype)
        if need_v:  # dv = Σ φ(λ) dy
            if place == 0:
                gv = _csr_t_mm(phi(lam), cols, M, KNW, dyc_all)
            dw_out = gv.view(K, N, W, D).to(w_out.dtype)
        if need_b:
            gb = torch.zeros(KNW, dtype=cdt, device=dev)
            gb.index_put_((cols,), g.reshape(-1), accumulate=True)
            db_in = gb.view(K, N, W).to(b_in.dtype)
        return dx, dw_in, db_in, dw_out, None, None, None, None, None
