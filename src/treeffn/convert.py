"""``treeffn convert``: replace every MLP of a trained checkpoint by a tree layer, fitted by layer-wise distillation.

The teacher is the checkpoint's own dense (GELU) or SwiGLU MLP; each block's tree is fitted to reproduce, on corpus
text, what that block's MLP outputs for the inputs it receives. Blocks are processed in order, one forward pass in
all: the hidden states of every window are carried from block to block, and by default (``--stream student``) they
are carried *through the fitted tree*, so block i+1's tree is fitted on the inputs it will really see after
conversion, with the target being block i+1's dense MLP applied to those inputs. ``--stream teacher`` carries the
dense outputs instead (every layer fitted on the original model's activations).

Fitting one layer (x: MLP inputs, y: MLP outputs, both (M, D); hard routing throughout):

1. **Routing, top-down, tree by tree (boosting).** Tree k is initialised on the residual r = y − (trees < k).
   Each node, from the root down, takes the tokens that reach it and sets its input vector u to a split direction
   of those tokens: ``pls`` (default) the input direction that co-varies most with the residual (top singular
   vector of X_cᵀ R_c, R projected once per tree on its top 32 principal directions), ``pca`` the top principal
   direction of the inputs alone (power iteration). Directions come from at most 4096 tokens per layer. The bias puts
   the threshold at the median, so every node sends half its tokens each way and all 2^D paths are used; u is scaled
   so the response λ = u·x + b has unit spread over those tokens (φ is then neither linear nor dead). Later trees
   see a different residual, so trees differ. Leaves get u by the same rule: they route nothing but contribute φ(λ)v.
2. **Output vectors in closed form.** With the routing fixed, y ≈ Σ φ(λ)v is linear in v: each tree's v is the
   ridge least-squares solution on its residual (backfitting over the trees, two sweeps), from all fitting tokens.
   Exact for ``placement=node`` (φ per node); ``placement=output`` gets a linearised start (φ(z) ≈ φ'(0)·z).
3. **Adam on u, b, v** (``--steps``), mean squared error normalised by the teacher's output energy, minibatches of
   tokens, cosine-decayed learning rate, routing recomputed from the current weights at every step (hard routing,
   stop-gradient, exactly as in training). Then v is solved again for the routing Adam ended with. Of the
   closed-form start, the Adam result and the re-solved one, the one with the lowest error on the *selection*
   windows is kept.

The corpus windows are disjoint (no token in two windows) and split three ways: fitting, selection (choosing the
candidate above) and report. Reported per layer: relative error ‖ŷ − y‖/‖y‖ on the report windows, which neither
fit nor choose anything (and on the fitting tokens), of the kept candidate, the closed-form start and Adam's
result, and, as a reference point, of UFB-23's random initialisation (≈ 1: a tree that outputs nothing scores
1.0). At the end, the next-token loss of the dense and the converted model on the report windows. ``convert.json``
records which candidate each layer kept and the corpus offsets of the windows of each part.

Activation and placement (measured on SmolLM2-135M layer 10, tree 12x7 = 96 of 3060 units, 16k fitting tokens,
held-out relative error of the closed-form start): gelu 0.590, silu 0.587, relu 0.592 — a SwiGLU unit computes
silu(g·x)·(w·x), a product no single tree neuron forms, and no φ comes closer than the others, so the default
``tree.activation=gelu`` (UFB-23, what the fine-tuning protocol then trains) is kept. ``tree.placement=node`` is the
placement to convert into: it makes step 2 exact. With ``placement=output`` (φ per tree after the sum, no output
projection) a gelu tree cannot output less than about −0.17 per tree and coordinate, so the signed outputs of a
pretrained MLP are reproduced only partly whatever the fit; it is supported (linearised start, then Adam) but
expect errors near 1. Routing init on the same layer (8k routing tokens): pls 0.577, pca 0.604; Adam and the
re-solved v then gain about 0.015 (0.590 -> 0.573 with 100 steps at lr 3e-3, 0.578 at 3e-4). The gap between fitting and held-out error is large at these
token counts (0.47 vs 0.57): more ``--tokens`` is the first thing to buy.

The output is a normal treeffn checkpoint with ``ffn.kind=tree`` (tokenizer and other side files copied);
fine-tune it with ``treeffn train --init OUT``.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from .checkpoint import load_model, resolve, save_checkpoint_dir
from .config import Config, parse_overrides
from .data import check_token_ids, decode_text_file, load_tokenizer, load_tokens, resolve_data
from .errors import CheckpointError, ConfigError, DataError
from .evaluate import windows_loss
from .layers import DenseMLP, SwiGLU, build_ffn
from .model import GPT
from .ops.activations import activation_fn, activation_grad
from .ops.tree import tree_reference
from .outputs import check_output_dir

INIT_METHODS = ("pls", "pca", "random")
STREAMS = ("student", "teacher")
_MAX_LS_UNITS = 4095  # per-tree unknowns above which the closed-form v (dense Gram matrix) is skipped
_MIN_NODE_TOKENS = 8  # below this a node gets a random split direction
# per-tree units up to which responses and the least-squares design are computed densely (GEMMs over every unit;
# the gathers and scatters of the sparse forms cost more below this)
_DENSE_UNITS = 1024


# ---- corpus ---------------------------------------------------------------------------------------------------
def corpus_windows(data: str | None, tokenizer, vocab_size: int, n_tokens: int, seq_len: int,
                   seed: int = 0, return_starts: bool = False):
    """(n, seq_len) token ids of the model's vocabulary from random, pairwise disjoint places of a corpus.

    ``data``: a prepared data directory (its training split), ``sample``/``default`` (as elsewhere in the CLI) or a
    plain UTF-8 text file. A prepared directory whose tokenizer differs from the model's is decoded to text and
    re-encoded with the model's tokenizer (``tokenizer``: a ``tokenizers.Tokenizer``, or None to use the data's ids
    as they are). Windows are drawn without replacement from a grid of non-overlapping slots, so no corpus token is
    in two windows: split the rows and the parts share no text. With ``return_starts`` also returns the corpus
    offset of each row's slot (in the corpus' own tokens) and the slot length (``seq_len``, or the 4·seq_len data
    tokens a re-encoded window is cut from).
    """
    n_win = max(1, math.ceil(n_tokens / seq_len))
    rng = np.random.default_rng(seed)
    path = Path(data) if data not in (None, "sample", "default") else None
    if path is not None and path.is_file():
        if tokenizer is None:
            raise DataError("a text file needs the checkpoint's tokenizer.json, which this checkpoint lacks")
        ids = np.asarray(tokenizer.encode(decode_text_file(path, path.read_bytes()), add_special_tokens=False).ids)
        return _cut_windows(ids, n_win, seq_len, rng, vocab_size, return_starts)
    ddir = resolve_data(data)
    toks = load_tokens(ddir, "train")
    dtok = load_tokenizer(ddir)
    if tokenizer is None or dtok.to_str() == tokenizer.to_str():
        return _cut_windows(np.asarray(toks), n_win, seq_len, rng, vocab_size, return_starts)
    # different vocabularies: decode pieces of the data and re-encode them; a data token is at least a byte, so
    # 4·seq_len data tokens give seq_len model tokens for any byte-level BPE of the model.
    piece = 4 * seq_len
    slots = len(toks) // piece
    if slots < n_win:
        raise DataError(f"{ddir} is too small ({len(toks)} tokens) for {n_win} disjoint windows of {seq_len} model "
                        "tokens; lower --tokens or --seq-len")
    offset = int(rng.integers(0, len(toks) - slots * piece + 1))
    out, starts = [], []
    for slot in rng.permutation(slots).tolist():
        start = offset + slot * piece
        text = dtok.decode(toks[start:start + piece].tolist())
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) >= seq_len + 1:
            out.append(ids[1:seq_len + 1])  # drop the first id: its text may be a cut-off word
            starts.append(start)
            if len(out) == n_win:
                break
    if len(out) < n_win:
        raise DataError(f"could not cut {n_win} disjoint windows of {seq_len} model tokens out of {ddir}")
    win = torch.tensor(out, dtype=torch.long)
    check_token_ids(win, vocab_size)
    return (win, starts, piece) if return_starts else win


def _cut_windows(ids, n_win: int, seq_len: int, rng, vocab_size: int, return_starts: bool = False):
    if len(ids) < seq_len:
        raise DataError(f"the corpus has {len(ids)} tokens, fewer than one window of {seq_len}")
    slots = len(ids) // seq_len
    if slots < n_win:
        raise DataError(f"the corpus has {len(ids)} tokens, room for {slots} disjoint windows of {seq_len}, not "
                        f"{n_win}; lower --tokens or --seq-len")
    offset = int(rng.integers(0, len(ids) - slots * seq_len + 1))  # a random phase of the slot grid
    starts = (offset + rng.choice(slots, size=n_win, replace=False) * seq_len).tolist()
    win = torch.tensor(np.stack([ids[s:s + seq_len] for s in starts]).astype("int64"))
    check_token_ids(win, vocab_size)
    return (win, starts, seq_len) if return_starts else win


# ---- fitting one layer ----------------------------------------------------------------------------------------
def rel_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).norm() / target.norm().clamp_min(1e-12))


@torch.no_grad()
def tree_predict(tree, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    out = []
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        if tree.total_units() <= 2048:  # the masked dense reference is cheapest for small trees
            out.append(tree_reference(xs, tree.w_in, tree.b_in, tree.w_out, tree.depth, tree.activation,
                                      tree.placement))
        else:
            out.append(tree.forward_2d(xs, impl="sparse")[0])
    return torch.cat(out)


@torch.no_grad()
def _tree_features(x: torch.Tensor, w_in_k: torch.Tensor, b_in_k, depth: int, dense: bool | None = None):
    """One tree's visited nodes (M, L) and responses λ (M, L, W) under its current weights.

    ``dense`` (default: when the tree has at most _DENSE_UNITS units) computes every unit's response with one GEMM
    and picks the visited ones; otherwise each level gathers the visited nodes' rows, (M, W, D) floats a level."""
    M = x.shape[0]
    N, W, D = w_in_k.shape
    if dense is None:
        dense = N * W <= _DENSE_UNITS
    every = None
    if dense:
        every = (x @ w_in_k.reshape(N * W, D).t()).view(M, N, W)
        if b_in_k is not None:
            every = every + b_in_k
    rows = torch.arange(M)
    node = torch.zeros(M, dtype=torch.long)
    paths, lams = [], []
    for t in range(depth + 1):
        if every is not None:
            lam = every[rows, node]
        else:
            lam = torch.einsum("mwd,md->mw", w_in_k[node], x)
            if b_in_k is not None:
                lam = lam + b_in_k[node]
        paths.append(node)
        lams.append(lam)
        node = 2 * node + 1 + (lam.sum(-1) > 0).long()
    return torch.stack(paths, 1), torch.stack(lams, 1)


def _split_direction(xs: torch.Tensor, rs: torch.Tensor | None, gen: torch.Generator, iters: int = 6):
    """Unit direction of a node's split, or None when the tokens do not define one.

    pls (``rs`` given: the residual targets, already projected on their top principal directions, (c, q)): the top
    left singular vector of the cross-covariance X_cᵀR_c (D, q), one GEMM plus a q×q eigenproblem.
    pca (``rs`` None): the top principal direction of X, by power iteration (centering done algebraically).
    """
    mu = xs.mean(0)
    if rs is not None:
        c = xs.T @ rs - xs.shape[0] * torch.outer(mu, rs.mean(0))  # (D, q)
        g = c.T @ c  # (q, q); power iteration: LAPACK's eigh costs far more per call at this size
        e = torch.randn(g.shape[0], generator=gen, dtype=g.dtype)
        for _ in range(4 * iters):
            e = g @ e
            e = e / e.norm().clamp_min(1e-30)
        v = c @ e
    else:
        v = torch.randn(xs.shape[1], generator=gen)
        for _ in range(iters):
            p = xs @ v - mu @ v
            v = xs.T @ p - mu * p.sum()
            v = v / v.norm().clamp_min(1e-30)
    n = v.norm()
    if not torch.isfinite(n) or n < 1e-20:
        return None
    return v / n


@torch.no_grad()
def _project_residual(r: torch.Tensor, q: int, gen: torch.Generator) -> torch.Tensor:
    """r (M, D) on its top-q principal directions (M, q): what the pls splits need, at q/D of the cost."""
    q = min(q, r.shape[1], r.shape[0])
    state = torch.random.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    try:
        _, _, v = torch.svd_lowrank(r, q=q, niter=2)
    finally:
        torch.random.set_rng_state(state)
    return r @ v


@torch.no_grad()
def init_tree_routing(tree, k: int, x: torch.Tensor, r: torch.Tensor | None, gen: torch.Generator) -> None:
    """Set tree k's u and b top-down from the tokens x (and residual targets r for pls); see the module docstring."""
    K, N, W, D = tree.w_in.shape
    node = torch.zeros(x.shape[0], dtype=torch.long)
    scale_all = float(x.std(0).norm().clamp_min(1e-6))
    rp = None if r is None else _project_residual(r, 32, gen)
    for t in range(tree.depth + 1):
        order = torch.argsort(node, stable=True)
        counts = torch.bincount(node, minlength=N).tolist()
        first = 2 ** t - 1
        start = sum(counts[:first])
        new_node = node.clone()
        for j in range(first, 2 * first + 1):
            c = counts[j]
            idx = order[start:start + c]
            start += c
            xs = x[idx]
            d = None
            if c >= _MIN_NODE_TOKENS:
                d = _split_direction(xs, None if rp is None else rp[idx], gen)
            if d is None:
                d = torch.randn(D, generator=gen)
                d = d / d.norm()
                u, b = d / scale_all * math.sqrt(D), 0.0
            else:
                p = xs @ d
                spread = float(p.std().clamp_min(1e-6)) if c > 1 else 1.0
                u, b = d / spread, -float(p.median()) / spread
            if W == 1:
                tree.w_in[k, j, 0] = u
            else:  # W units share the routing sum Σ_w λ_w = W(u·x + b); spread them around u so they differ
                noise = torch.randn(W, D, generator=gen) * (0.5 * float(u.norm()) / math.sqrt(D))
                tree.w_in[k, j] = u + noise - noise.mean(0)
            if tree.b_in is not None:
                tree.b_in[k, j] = b
            if c and t < tree.depth:
                lam = xs @ tree.w_in[k, j].sum(0) + (float(tree.b_in[k, j].sum()) if tree.b_in is not None else 0.0)
                new_node[idx] = 2 * j + 1 + (lam > 0).long()
        node = new_node


def _design(paths: torch.Tensor, a: torch.Tensor, N: int) -> torch.Tensor:
    """One tree's design matrix Φ (M, N·W) as CSR: row m holds φ(λ) of the L·W units token m visits.

    Node indices grow with depth (children of j are 2j+1, 2j+2), so each row's columns are already sorted.
    """
    M, L, W = a.shape
    cols = (paths[:, :, None] * W + torch.arange(W)).reshape(-1)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matmuls with it are all we use
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(torch.arange(0, M * L * W + 1, L * W), cols, a.reshape(-1).contiguous(),
                                       size=(M, N * W))


def _design_dense(paths: torch.Tensor, a: torch.Tensor, N: int) -> torch.Tensor:
    """Φ of :func:`_design` as a dense (M, N·W) matrix, for trees of at most _DENSE_UNITS units."""
    M, L, W = a.shape
    cols = (paths[:, :, None] * W + torch.arange(W)).reshape(M, L * W)
    return a.new_zeros(M, N * W).scatter_(1, cols, a.reshape(M, L * W))


@torch.no_grad()
def _solve_tree_out(paths, lam, r: torch.Tensor, W: int, N: int, activation: str, ridge: float,
                    dense: bool | None = None) -> torch.Tensor:
    """Ridge least-squares v (N, W, D) of one tree on residual r, its routing and λ fixed (placement node).

    The design matrix Φ has L·W non-zeros per token. A tree of at most _DENSE_UNITS units (``dense``) forms Φ as a
    dense matrix and takes ΦᵀΦ (fp64) and Φᵀr as GEMMs; a larger one accumulates ΦᵀΦ (fp64) from per-token outer
    products and Φᵀr by a sparse product, never touching the N·W − L·W units a token does not visit.
    """
    a = activation_fn(activation)(lam)  # (M, L, W)
    M, L, _ = a.shape
    P = N * W
    if dense if dense is not None else P <= _DENSE_UNITS:
        phi = _design_dense(paths, a, N)
        G, B = phi.double().t() @ phi.double(), phi.t() @ r
    else:
        idx = (paths[:, :, None] * W + torch.arange(W)).reshape(M, L * W)
        af = a.reshape(M, L * W).double()
        G = torch.zeros(P * P, dtype=torch.float64)
        G.index_add_(0, (idx[:, :, None] * P + idx[:, None, :]).reshape(-1),
                     (af[:, :, None] * af[:, None, :]).reshape(-1))
        G = G.view(P, P)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            B = _design(paths, a, N).t() @ r  # (P, D)
    alpha = ridge * float(G.diagonal().mean().clamp_min(1e-12)) + 1e-9
    G.diagonal().add_(alpha)
    v = torch.linalg.solve(G, B.double())
    return v.float().view(N, W, -1)


@torch.no_grad()
def _tree_out(paths, lam, v: torch.Tensor, activation: str, dense: bool | None = None) -> torch.Tensor:
    """Σ_t Σ_w φ(λ) v for one tree: (M, D), as Φ @ v (Φ dense for at most _DENSE_UNITS units, or ``dense``)."""
    N, W, D = v.shape
    a = activation_fn(activation)(lam)
    if dense if dense is not None else N * W <= _DENSE_UNITS:
        return _design_dense(paths, a, N) @ v.reshape(N * W, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _design(paths, a, N) @ v.reshape(N * W, D)


@torch.no_grad()
def solve_outputs(tree, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3, sweeps: int = 2) -> bool:
    """Backfit every tree's v by ridge least squares, routing fixed. False when not applicable (left unchanged).

    ``placement=node``: y = Σ φ(λ)v is linear in v, the solution is exact. ``placement=output``: y = Σ_k φ(z_k) with
    z_k = Σ λv is not; we linearise φ at 0 (φ(z) ≈ φ'(0)·z, slope ½ for gelu and silu) and solve for Σ_k z_k ≈
    y/φ'(0), a start for Adam rather than an optimum.
    """
    K, N, W, D = tree.w_in.shape
    if N * W > _MAX_LS_UNITS:
        return False
    act = tree.activation
    if tree.placement == "output":
        slope = float(activation_grad(act, torch.zeros(1)))
        slope = slope if slope > 1e-6 and act != "relu" else 0.5  # relu: the mean of its two slopes
        y, act = y / slope, "identity"
    feats = [_tree_features(x, tree.w_in[k], None if tree.b_in is None else tree.b_in[k], tree.depth)
             for k in range(K)]
    parts = [_tree_out(p, lam, tree.w_out[k], act) for k, (p, lam) in enumerate(feats)]
    total = sum(parts)
    for _ in range(sweeps):
        for k, (p, lam) in enumerate(feats):
            res = y - (total - parts[k])
            tree.w_out[k] = _solve_tree_out(p, lam, res, W, N, act, ridge)
            new = _tree_out(p, lam, tree.w_out[k], act)
            total = total - parts[k] + new
            parts[k] = new
    return True


@torch.no_grad()
def initialise_tree(tree, x: torch.Tensor, y: torch.Tensor, method: str = "pls", ridge: float = 1e-3,
                    max_init_tokens: int = 4096, seed: int = 0) -> None:
    """Routing (top-down, boosted over trees) and closed-form outputs; ``random`` keeps UFB-23's init."""
    if method not in INIT_METHODS:
        raise ConfigError(f"unknown init '{method}'; choose one of {', '.join(INIT_METHODS)}")
    tree.reset_parameters()
    if method == "random":
        return
    gen = torch.Generator().manual_seed(seed)
    K, N, W, D = tree.w_in.shape
    if x.shape[0] > max_init_tokens:  # the routing needs directions, not every token; v below uses all of them
        sel = torch.randperm(x.shape[0], generator=gen)[:max_init_tokens]
        xi, yi = x[sel], y[sel]
    else:
        xi, yi = x, y
    can_ls = N * W <= _MAX_LS_UNITS
    # boosting: each tree's splits follow what the trees before it leave unexplained (for output placement the
    # residual is taken in the linearised model of solve_outputs)
    act = tree.activation if tree.placement == "node" else "identity"
    res = yi.clone()
    tree.w_out.zero_()
    for k in range(K):
        init_tree_routing(tree, k, xi, res if method == "pls" else None, gen)
        if can_ls:
            p, lam = _tree_features(xi, tree.w_in[k], None if tree.b_in is None else tree.b_in[k], tree.depth)
            tree.w_out[k] = _solve_tree_out(p, lam, res, W, N, act, ridge)
            res = res - _tree_out(p, lam, tree.w_out[k], act)
    if not can_ls or not solve_outputs(tree, x, y, ridge):
        c = 1.0 / math.sqrt(tree.trees * (tree.depth + 1) * tree.node_width)
        tree.w_out.uniform_(-c, c, generator=gen)


def refine_tree(tree, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-3, batch: int = 4096,
                seed: int = 0, impl: str = "auto", on_step=None) -> None:
    """Adam on u, b, v: normalised MSE, hard routing recomputed from the current weights at every step."""
    if steps <= 0:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    params = [p for p in (tree.w_in, tree.b_in, tree.w_out) if p is not None]
    opt = torch.optim.Adam(params, lr=lr)
    energy = float(y.pow(2).sum(1).mean().clamp_min(1e-12))
    if impl == "auto":
        impl = "reference" if tree.total_units() <= 512 else "sparse"
    for step in range(steps):
        for g in opt.param_groups:  # cosine decay to 0
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)
        pred, _ = tree.forward_2d(x[idx], impl=impl)
        loss = (pred - y[idx]).pow(2).sum(1).mean() / energy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(float(loss.detach()))


def fit_layer(tree, x: torch.Tensor, y: torch.Tensor, x_sel: torch.Tensor, y_sel: torch.Tensor,
              x_test: torch.Tensor, y_test: torch.Tensor, steps: int, init: str = "pls", lr: float = 1e-3,
              batch: int = 4096, seed: int = 0, impl: str = "auto", on_step=None) -> dict:
    """Fit ``tree`` (a TreeFFN) to map x -> y on three disjoint token sets; returns relative errors.

    Candidates: the closed-form start, the Adam result and (node placement) Adam's routing with v solved again.
    The one with the lowest error on the *selection* tokens (x_sel, y_sel) is kept (``chosen``; its selection
    errors are ``*_select``). Reported errors are measured on the *test* tokens (x_test, y_test), which choose
    nothing, so the kept candidate's ``final_val`` is an unbiased held-out figure (it may exceed another
    candidate's): ``random_val`` (UFB-23's initialisation), ``init_val``, ``adam_val``, ``resolved_val``,
    ``final_val``; and ``final_fit`` on the fitting tokens.
    """
    res: dict = {}

    def err(xx, yy):
        return rel_error(tree_predict(tree, xx), yy)

    with torch.no_grad():
        tree.reset_parameters()
        res["random_val"] = err(x_test, y_test)
    initialise_tree(tree, x, y, init, seed=seed)

    def snapshot():
        return {k: v.detach().clone() for k, v in tree.state_dict().items()}

    with torch.no_grad():
        res["init_select"] = best_err = err(x_sel, y_sel)
        res["init_val"] = err(x_test, y_test)
    best, chosen = snapshot(), "init"
    if steps > 0:
        refine_tree(tree, x, y, steps, lr, batch, seed, impl, on_step)
        with torch.no_grad():
            res["adam_select"] = e = err(x_sel, y_sel)
            res["adam_val"] = err(x_test, y_test)
            if e < best_err:
                best, best_err, chosen = snapshot(), e, "adam"
            if tree.placement == "node" and solve_outputs(tree, x, y):  # v optimal for the routing Adam ended with
                res["resolved_select"] = e = err(x_sel, y_sel)
                res["resolved_val"] = err(x_test, y_test)
                if e < best_err:
                    best, best_err, chosen = snapshot(), e, "resolved"
    tree.load_state_dict(best)
    res["final_select"] = best_err
    res["chosen"] = chosen
    with torch.no_grad():
        res["final_val"] = err(x_test, y_test)
        res["final_fit"] = err(x, y)
    return res


# ---- whole model ----------------------------------------------------------------------------------------------
@torch.no_grad()
def run_block(block, ffn, h: torch.Tensor, chunk: int, capture: bool):
    """Block output for every window (chunked); with ``capture``, also the inputs and outputs (M, D) of its
    feed-forward module ``ffn``."""
    xs, ys, outs = [], [], []

    def hook(mod, args, out):
        xs.append(args[0].reshape(-1, args[0].shape[-1]).clone())
        ys.append(out[0].reshape(-1, out[0].shape[-1]).clone())

    handle = ffn.register_forward_hook(hook) if capture else None
    try:
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            pos = torch.arange(hc.shape[1]).expand(hc.shape[0], -1)
            outs.append(block(hc, pos, None, None, True)[0])
    finally:
        if handle is not None:
            handle.remove()
    out = torch.cat(outs)
    if capture:
        return out, torch.cat(xs), torch.cat(ys)
    return out


def _check_arguments(init: str, stream: str, tokens: int, seq_len: int, steps: int, batch: int,
                     val_fraction: float) -> None:
    if init not in INIT_METHODS:
        raise ConfigError(f"unknown --init '{init}'; choose one of {', '.join(INIT_METHODS)}")
    if stream not in STREAMS:
        raise ConfigError(f"unknown --stream '{stream}'; choose one of {', '.join(STREAMS)}")
    if tokens < 2 or seq_len < 2 or steps < 0 or batch < 1 or not 0.0 < val_fraction < 1.0:
        raise ConfigError("--tokens and --seq-len must be ≥ 2, --steps ≥ 0, --batch-size ≥ 1, "
                          "--val-fraction in (0, 1)")


def _tree_config(model: GPT, overrides: dict | None) -> Config:
    """The converted model's config: the model's with ``ffn.kind=tree`` and the (tree.* / train.* only) overrides."""
    cfg = model.cfg
    if not all(isinstance(f, (DenseMLP, SwiGLU)) for f in model.ffn_modules()):
        raise CheckpointError(f"convert needs a model with dense or swiglu MLPs (this one has ffn.kind={cfg.ffn.kind})")
    for key in overrides or {}:
        if not key.startswith(("tree.", "train.")):
            raise ConfigError(f"convert accepts only tree.* and train.* overrides (got '{key}'); the rest of the "
                              "model is kept as it is")
    new_cfg = cfg.copy()
    new_cfg.ffn.kind = "tree"
    new_cfg.apply(overrides)
    return new_cfg


def _corpus_parts(folder: Path, data, vocab_size: int, tokens: int, val_fraction: float, seq_len: int,
                  seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Disjoint corpus windows {fit, select, report} and their corpus offsets (``convert.json``'s ``windows``)."""
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    n_fit_win = max(1, math.ceil(tokens / seq_len))
    n_sel_win = max(1, math.ceil(val_fraction * tokens / seq_len))
    windows, starts, span = corpus_windows(data, tokenizer, vocab_size, (n_fit_win + 2 * n_sel_win) * seq_len,
                                           seq_len, seed, return_starts=True)
    cut = {"fit": (0, n_fit_win), "select": (n_fit_win, n_fit_win + n_sel_win),
           "report": (n_fit_win + n_sel_win, n_fit_win + 2 * n_sel_win)}
    parts = {k: windows[a:b] for k, (a, b) in cut.items()}
    # corpus offsets of the windows of each part (slots of `span` corpus tokens, pairwise disjoint)
    offsets = {"span": span, **{k: [int(v) for v in starts[a:b]] for k, (a, b) in cut.items()}}
    return parts, offsets


def _convert_layers(model, new_cfg: Config, parts: dict[str, torch.Tensor], steps: int, init: str, stream: str,
                    lr: float, batch: int, seed: int, impl: str, progress: bool, log) -> list[dict]:
    """Fit a tree to every block's MLP in turn and put it in place; returns the per-layer results."""
    seq_len = parts["fit"].shape[1]
    chunk = max(1, 4096 // seq_len)
    # each part is carried through the blocks on its own, so a layer's fitting, selection and report tokens come
    # from different windows (also for Mixture-of-Depths blocks, which see only the tokens routed to them)
    h = {k: model.tok_emb(w).detach() for k, w in parts.items()}
    layers = []
    bar = tqdm(total=len(model.blocks) * (steps + 1), desc="convert", disable=not progress, file=sys.stderr,
               unit="step")
    for i, block in enumerate(model.blocks):
        lt = time.time()
        mlp = model.ffn_modules()[i]
        cap = {k: run_block(block, mlp, hk, chunk, capture=True) for k, hk in h.items()}
        (_, x, y), (_, xs, ys), (_, xr, yr) = cap["fit"], cap["select"], cap["report"]
        torch.manual_seed(seed + i)
        tree = build_ffn(new_cfg)
        res = fit_layer(tree, x, y, xs, ys, xr, yr, steps, init, lr, batch, seed + i, impl,
                        on_step=lambda loss: bar.update(1))
        bar.update(1)
        tree.requires_grad_(True)
        model.replace_ffn(i, tree)
        if stream == "student":
            h = {k: run_block(block, tree, hk, chunk, capture=False) for k, hk in h.items()}
        else:
            h = {k: c[0] for k, c in cap.items()}
        res = {"layer": i, **{k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()},
               "seconds": round(time.time() - lt, 1)}
        layers.append(res)
        msg = (f"layer {i:2d}: rel. error held-out {res['final_val']:.3f} (fit {res['final_fit']:.3f}; "
               f"{res['chosen']} chosen on the selection windows; closed-form start {res['init_val']:.3f}; random "
               f"init {res['random_val']:.3f}) {res['seconds']:.0f} s")
        bar.write(msg, file=sys.stderr) if progress else log(msg)
    bar.close()
    return layers


def convert(src: str | Path, out: str | Path, overrides: dict | None = None, data: str | None = "sample",
            tokens: int = 16384, seq_len: int = 256, steps: int = 100, init: str = "pls", stream: str = "student",
            lr: float = 1e-3, batch: int = 4096, val_fraction: float = 0.1, seed: int = 0, impl: str = "auto",
            progress: bool = True, log=print, overwrite: bool = False) -> dict:
    """Convert checkpoint ``src`` into a tree-FFN checkpoint ``out``; returns a summary (per-layer errors …).

    The corpus windows are split three ways, no token shared between the parts (see :func:`corpus_windows`):
    ``tokens`` for fitting, ``val_fraction``·tokens for choosing each layer's candidate (:func:`fit_layer`), and
    as many again for the reported figures (per-layer errors and the LM loss of the dense and the converted
    model), which therefore choose nothing. An existing ``out`` is replaced only if it is a checkpoint folder and
    ``overwrite`` is set (:func:`treeffn.outputs.check_output_dir`).
    """
    _check_arguments(init, stream, tokens, seq_len, steps, batch, val_fraction)
    t0 = time.time()
    folder = resolve(src)
    data_path = Path(data) if data not in (None, "sample", "default") else None
    check_output_dir(out, "checkpoint", overwrite=overwrite, inputs=[src, folder, data_path])
    model = load_model(folder)
    cfg = model.cfg
    new_cfg = _tree_config(model, overrides)
    if new_cfg.tree.route != "self":
        raise ConfigError(f"convert fits each node's routing on its own units; tree.route={new_cfg.tree.route} "
                          "is not supported")
    seq_len = min(seq_len, cfg.model.seq_len)
    parts, offsets = _corpus_parts(folder, data, cfg.model.vocab_size, tokens, val_fraction, seq_len, seed)
    n_fit, n_sel = parts["fit"].numel(), parts["select"].numel()
    dense_loss = windows_loss(model, parts["report"])
    t = new_cfg.tree
    probe = build_ffn(new_cfg)
    active = probe.active_units() / probe.total_units()
    log(f"converting {folder} ({cfg.describe()}) -> tree {t.trees}x{t.depth} w{t.node_width} "
        f"{t.activation}/{t.placement}: {probe.active_units():.0f} of {probe.total_units()} units per token "
        f"({active:.1%}); {n_fit} fitting, {n_sel} selection and {n_sel} held-out report tokens (disjoint windows), "
        f"init {init}, {steps} Adam steps, stream {stream}")
    layers = _convert_layers(model, new_cfg, parts, steps, init, stream, lr, batch, seed, impl, progress, log)
    model.cfg = new_cfg
    model.eval()
    tree_loss = windows_loss(model, parts["report"])
    summary = {
        "source": str(folder), "out": str(out), "tree": f"{t.trees}x{t.depth}", "node_width": t.node_width,
        "activation": t.activation, "placement": t.placement, "init": init, "stream": stream, "steps": steps,
        "fit_tokens": n_fit, "select_tokens": n_sel, "heldout_tokens": n_sel, "seq_len": seq_len,
        "active_fraction": active, "mean_rel_error": round(sum(r["final_val"] for r in layers) / len(layers), 4),
        "heldout_loss_dense": round(dense_loss, 4), "heldout_loss_tree": round(tree_loss, 4),
        "seconds": round(time.time() - t0, 1), "layers": layers, "windows": offsets,
    }
    extra = {p.name: p for p in folder.iterdir()
             if p.is_file() and p.name not in ("config.json", "model.safetensors", "trainer.json",
                                               "optimizer.safetensors")}
    extra["convert.json"] = summary
    save_checkpoint_dir(Path(out), model, extra_files=extra)
    return summary


# ---- command line ---------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.description = ("Replace each MLP of a checkpoint by a tree layer initialised by layer-wise distillation: "
                     "routing set top-down from split directions of the tokens reaching each node, output vectors "
                     "solved in closed form, then Adam on the MLP's inputs/outputs with hard routing. Fine-tune the "
                     "result with `treeffn train --init OUT`.")
    p.add_argument("dir", help="run directory or checkpoint folder with a dense or swiglu model")
    p.add_argument("--ffn", default="tree", choices=["tree"], help="the replacement feed-forward kind (tree)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="tree.* (and train.*) values of the new model, e.g. --set tree.trees=12 --set tree.depth=7")
    p.add_argument("--out", required=True, help="checkpoint folder to write (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a treeffn checkpoint folder (never any other folder)")
    p.add_argument("--data", default="sample",
                   help="corpus for the activations: a prepared data directory, 'sample' (default), 'default', or "
                        "a UTF-8 text file; re-encoded with the checkpoint's tokenizer when the vocabularies differ")
    p.add_argument("--tokens", type=int, default=16384,
                   help="fitting tokens per layer (default 16384); 10%% more choose each layer's fit and another 10%% "
                        "(never used to fit or choose) give the reported errors and losses")
    p.add_argument("--seq-len", type=int, default=256, help="window length of the corpus samples (default 256)")
    p.add_argument("--steps", type=int, default=100, help="Adam steps per layer after the closed-form start (default 100)")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per Adam step (default 4096)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed (default 1e-3)")
    p.add_argument("--init", default="pls", choices=INIT_METHODS,
                   help="routing initialisation: pls (input direction co-varying with the MLP output, default), pca "
                        "(input principal direction), random (UFB-23, no closed-form start)")
    p.add_argument("--stream", default="student", choices=STREAMS,
                   help="hidden states carried to the next block: through the fitted tree (student, default) or "
                        "the dense MLP (teacher)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    overrides = parse_overrides(args.overrides)
    torch.set_grad_enabled(True)
    summary = convert(args.dir, args.out, overrides, data=args.data, tokens=args.tokens, seq_len=args.seq_len,
                      steps=args.steps, init=args.init, stream=args.stream, lr=args.lr, batch=args.batch_size,
                      seed=args.seed, progress=not args.quiet, log=lambda m: print(m, file=sys.stderr),
                      overwrite=args.overwrite)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: mean held-out relative error {summary['mean_rel_error']:.3f} over "
              f"{len(summary['layers'])} layers; held-out loss dense {summary['heldout_loss_dense']:.3f} -> tree "
              f"{summary['heldout_loss_tree']:.3f} (before fine-tuning) in {summary['seconds']:.0f} s")
    return 0

