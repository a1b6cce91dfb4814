"""Training loop: AdamW, warm-up + cosine schedule, clipping, accumulation, bf16 autocast, DDP, exact resume.

Batches are a pure function of (seed, step, micro-step): the global batch of ``train.batch_size`` sequences is drawn
from a generator seeded by those numbers and each DDP rank takes its own contiguous slice. The data position is
therefore the step itself, and a resumed run (model, optimizer, RNG state and step restored from the checkpoint)
reproduces the uninterrupted loss curve exactly on CPU; ``tests/test_train.py`` checks it, and that 2 processes
give the result of 1 process on the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import Config
from .errors import ConfigError, DataError, TreeffnError
from .model import GPT


# ---- distributed ---------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(d.local_rank)
    return d


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return dev


# ---- data ----------------------------------------------------------------------------------------------------
class Batches:
    """Deterministic random windows of a uint16 token memmap."""

    def __init__(self, tokens: np.ndarray, seq_len: int, vocab_size: int):
        if len(tokens) < seq_len + 2:
            raise DataError(f"the corpus has {len(tokens)} tokens, fewer than one training window of {seq_len + 1}")
        top = int(np.max(tokens[: min(len(tokens), 1 << 20)]))  # cheap spot check; full check at prepare time
        if top >= vocab_size:
            raise DataError(f"token id {top} in the corpus is out of range for vocabulary size {vocab_size}")
        self.tokens, self.seq_len = tokens, seq_len

    def window(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[s: s + T + 1], dtype=np.int64) for s in starts.tolist()])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def train_batch(self, seed: int, step: int, micro: int, batch: int, dist: Dist) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(hash_ints(seed, step, micro))
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (batch,), generator=g)
        per = batch // dist.world
        return self.window(starts[dist.rank * per: (dist.rank + 1) * per])

    def eval_starts(self, n_windows: int) -> torch.Tensor:
        """Evenly spaced, non-overlapping windows: the same ones every evaluation."""
        total = (len(self.tokens) - 1) // self.seq_len
        n = total if n_windows <= 0 else min(n_windows, total)
        idx = torch.linspace(0, total - 1, n).round().long()
        return idx * self.seq_len


def hash_ints(*xs: int) -> int:
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


# ---- schedule / optimiser -------------------------------------------------------------------------------------
def lr_at(step: int, cfg: Config) -> float:
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    floor = t.lr * t.min_lr_ratio
    return floor + 0.5 * (t.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith("bias") or name.endswith("b_in") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), fused=fused)


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, _, k = key.partition(".")
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


# ---- tree statistics ------------------------------------------------------------------------------------------
class VisitWindow:
    """Per-layer tree statistics between two log points: visit counts are summed, routing diagnostics
    (``layers.tree.routing_diagnostics``) averaged. Per-level diagnostics are logged as lists (metrics.jsonl) and
    as their mean over levels (a scalar, also in TensorBoard)."""

    def __init__(self):
        self.counts: dict[int, torch.Tensor] = {}
        self.diag: dict[int, dict[str, torch.Tensor]] = {}
        self.n_diag: dict[int, int] = {}

    def add(self, stats: list[dict]) -> None:
        for i, s in enumerate(stats):
            if "tree_visits" in s:
                c = s["tree_visits"].detach().cpu()
                self.counts[i] = self.counts[i] + c if i in self.counts else c.clone()
            if "tree_diag" in s:
                d = {k: v.detach().cpu().double() for k, v in s["tree_diag"].items()}
                acc = self.diag.get(i)
                self.diag[i] = d if acc is None else {k: acc[k] + d[k] for k in d}
                self.n_diag[i] = self.n_diag.get(i, 0) + 1

    def summary(self) -> dict:
        from .stats import tree_summary

        out = {f"tree/{k}/layer{i}": v for i, c in self.counts.items() for k, v in tree_summary(c).items()}
        for i, d in self.diag.items():
            for k, v in d.items():
                v = v / self.n_diag[i]
                if v.dim() == 0:
                    out[f"tree/{k}/layer{i}"] = float(v)
                elif v.numel():
                    out[f"tree/{k}/layer{i}"] = float(v.mean())
                    out[f"tree/{k}_levels/layer{i}"] = [round(float(e), 6) for e in v]
        self.counts, self.diag, self.n_diag = {}, {}, {}
        return out


# ---- evaluation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_loss(model: GPT, batches: Batches, n_windows: int, batch_size: int, device: torch.device,
                  autocast=nullcontext, progress: bool = False) -> tuple[float, int]:
    """Mean next-token loss (nats) over fixed validation windows; returns (loss, tokens)."""
    was = model.training
    model.eval()
    starts = batches.eval_starts(n_windows)
    total, count = 0.0, 0
    it = range(0, len(starts), batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
    for i in it:
        x, y = batches.window(starts[i: i + batch_size])
        with autocast():
            out = model(x.to(device), targets=y.to(device))
        total += out.lm_loss.item() * y.numel()
        count += y.numel()
    model.train(was)
    return total / max(1, count), count


# ---- the trainer ---------------------------------------------------------------------------------------------
def train(cfg: Config, out_dir: str | Path, data_dir: str | Path, resume: bool = False, init: str | Path | None = None,
          device: str = "auto", progress: bool = True, tensorboard: bool = True, freeze: str = "",
          stop_at: int | None = None) -> dict:
    """Train ``cfg`` on the prepared data in ``data_dir``, writing checkpoints and logs to ``out_dir``.

    Returns a summary dict (final train/val loss, tokens/s, steps). ``init`` starts from another checkpoint's
    weights (fine-tuning); ``freeze="attn"`` freezes attention and embeddings. ``stop_at`` ends the run early at
    that step (after saving a checkpoint), as an interruption would; ``resume`` continues it.
    """
    from .data import load_meta, load_tokens

    dev = resolve_device(device)
    dist = init_distributed(dev)
    out_dir = Path(out_dir)
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    if cfg.model.vocab_size != meta["vocab_size"]:
        raise ConfigError(f"model.vocab_size is {cfg.model.vocab_size} but the data in {data_dir} has a vocabulary "
                          f"of {meta['vocab_size']}; set model.vocab_size={meta['vocab_size']}")
    if cfg.train.batch_size % dist.world:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of processes "
                          f"({dist.world})")
    tr = cfg.train
    train_b = Batches(load_tokens(data_dir, "train"), cfg.model.seq_len, cfg.model.vocab_size)
    val_b = Batches(load_tokens(data_dir, "val"), cfg.model.seq_len, cfg.model.vocab_size)

    state_step = 0
    resume_folder = None
    if resume:
        try:
            resume_folder = ckpt.resolve(out_dir)
        except TreeffnError:
            resume_folder = None  # nothing to resume: start fresh (documented behaviour of --resume)
        if resume_folder is not None:
            saved = ckpt.load_config(resume_folder)
            if saved.model != cfg.model or saved.ffn != cfg.ffn or saved.tree != cfg.tree or saved.moe != cfg.moe \
                    or saved.mod != cfg.mod:
                raise ConfigError(f"--resume: the model config differs from the checkpoint in {resume_folder}")
    elif out_dir.exists() and (out_dir / ckpt.POINTER).exists():
        raise TreeffnError(f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out")

    torch.manual_seed(tr.seed)
    if init is not None:
        model = ckpt.load_model(init, device=dev)
        icfg = model.cfg
        # The context length shapes no weight: fine-tuning may change it (e.g. train an imported 8k-context model
        # on 256-token windows).
        same = dataclasses.replace(icfg.model, seq_len=cfg.model.seq_len)
        if (same, icfg.ffn, icfg.tree, icfg.moe, icfg.mod) != (cfg.model, cfg.ffn, cfg.tree, cfg.moe, cfg.mod):
            raise ConfigError(f"--init {init}: its model config differs from the requested one (only train.* and "
                              "model.seq_len may change)")
        model.cfg = cfg
        if icfg.model.seq_len != cfg.model.seq_len:
            model.set_context(cfg.model.seq_len)
        model.train()
    else:
        with torch.device(dev):
            model = GPT(cfg)
    if freeze == "attn":
        for name, p in model.named_parameters():
            if ".attn." in name or name.startswith("tok_emb") or "norm" in name:
                p.requires_grad_(False)
    elif freeze:
        raise ConfigError(f"unknown --freeze '{freeze}'; choose attn")
    opt = make_optimizer(model, cfg, dev)

    if resume_folder is not None:
        ckpt.load_state_into(model, ckpt.load_tensors(resume_folder / "model.safetensors"), str(resume_folder))
        load_optimizer_tensors(opt, ckpt.load_tensors(resume_folder / "optimizer.safetensors"))
        tstate = json.loads((resume_folder / "trainer.json").read_text())
        state_step = int(tstate["step"])
        torch.set_rng_state(torch.tensor(tstate["rng"], dtype=torch.uint8))

    raw_model = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # a variant whose parameters can miss a step's gradient (an expert no token chose) says so itself
        unused = any(getattr(f, "may_skip_parameters", False) for f in raw_model.ffn_modules()) or cfg.mod.every > 0
        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=unused)

    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if tr.dtype == "bf16" else nullcontext
    log = MetricsLog(out_dir, state_step, enabled=dist.main, tensorboard=tensorboard)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log.write({"event": "start", "step": state_step, "config": cfg.to_dict(), "world": dist.world,
                   "params": raw_model.num_params(), "device": str(dev)})

    visits = VisitWindow()
    tokens_per_step = tr.batch_size * tr.grad_accum * cfg.model.seq_len
    bar = None
    if progress and dist.main:
        from tqdm import tqdm

        bar = tqdm(total=tr.max_steps, initial=state_step, desc="train", unit="step", dynamic_ncols=True)
    summary: dict = {"params": raw_model.num_params()}
    # tokens/s counts training steps only (forward, backward, optimizer), never evaluation or checkpoint writes:
    # step time is accumulated per logging window and over the run (the summary's figure)
    win_time, win_steps, run_time, run_steps, tok_s, loss_val = 0.0, 0, 0.0, 0, 0.0, float("nan")
    step = state_step
    model.train()
    try:
        for step in range(state_step, tr.max_steps):
            t_step = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            track = tr.stats_every > 0 and step % tr.stats_every == 0
            raw_model.set_track_stats(track)
            loss_acc, aux_acc = 0.0, 0.0
            for micro in range(tr.grad_accum):
                x, y = train_b.train_batch(tr.seed, step, micro, tr.batch_size, dist)
                x, y = x.to(dev), y.to(dev)
                sync = nullcontext() if (dist.world == 1 or micro == tr.grad_accum - 1) else model.no_sync()
                with sync:
                    with autocast():
                        out = model(x, targets=y)
                    (out.loss / tr.grad_accum).backward()
                loss_acc += out.lm_loss.item() / tr.grad_accum
                aux_acc += float(out.aux_loss) / tr.grad_accum
                if track:
                    visits.add(out.stats)
            if dist.world > 1:  # log the global-batch loss, not this rank's half
                import torch.distributed as tdist

                red = torch.tensor([loss_acc, aux_acc], dtype=torch.float64, device=dev)
                tdist.all_reduce(red)
                loss_acc, aux_acc = (red / dist.world).tolist()
            if not math.isfinite(loss_acc):
                raise TreeffnError(f"training diverged at step {step} (loss {loss_acc}); lower train.lr")
            gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tr.grad_clip) if tr.grad_clip > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t_step
            win_time, win_steps, run_time, run_steps = win_time + dt, win_steps + 1, run_time + dt, run_steps + 1
            loss_val = loss_acc
            done = step + 1
            if bar is not None:
                bar.update(1)
            if done % tr.log_every == 0 or done == tr.max_steps:
                tok_s = win_steps * tokens_per_step / max(1e-9, win_time)
                win_time, win_steps = 0.0, 0
                rec = {"step": done, "loss": loss_val, "aux_loss": aux_acc, "lr": lr, "tok_per_s": tok_s}
                if gnorm is not None:
                    rec["grad_norm"] = float(gnorm)
                rec.update({k: v for k, v in _mod_stats(out.stats).items()})
                if visits.counts:
                    rec.update(visits.summary())
                log.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}")
            stopping = stop_at is not None and done >= stop_at
            is_eval = (tr.eval_every > 0 and done % tr.eval_every == 0) or done == tr.max_steps or stopping
            if is_eval:
                vl, _ = evaluate_loss(raw_model, val_b, tr.eval_batches * tr.batch_size, tr.batch_size, dev, autocast)
                log.write({"step": done, "val_loss": vl})
                summary["val_loss"] = vl
                if bar is not None:
                    bar.write(f"step {done}: train loss {loss_val:.4f}  val loss {vl:.4f}")
            if dist.main and (is_eval or (tr.save_every and done % tr.save_every == 0)):
                save_training_checkpoint(out_dir, raw_model, opt, done, data_dir, meta)
            if stopping:
                break
    finally:
        if bar is not None:
            bar.close()
        log.close()
        raw_model.set_track_stats(False)
    summary.update({"train_loss": loss_val, "steps": step + 1, "out": str(out_dir),
                    "tok_per_s": run_steps * tokens_per_step / run_time if run_steps else 0.0})
    return summary


def _mod_stats(stats: list[dict]) -> dict:
    out = {}
    for i, s in enumerate(stats):
        for k, v in s.items():
            if k.startswith("mod_") and (not torch.is_tensor(v) or v.numel() == 1):
                out[f"mod/{k[4:]}/layer{i}"] = float(v)
    return out


def save_training_checkpoint(out_dir: Path, model: GPT, opt, step: int, data_dir: Path, meta: dict) -> Path:
    name = f"step-{step:07d}"
    trainer = {"step": step, "rng": torch.get_rng_state().tolist(), "format": ckpt.FORMAT_VERSION}
    data_info = {"data_dir": str(data_dir), "vocab_size": meta["vocab_size"], "eot_id": meta.get("eot_id")}
    extra = {"trainer.json": trainer, "data.json": data_info}
    tok = data_dir / "tokenizer.json"
    if tok.is_file():
        extra["tokenizer.json"] = tok
    folder = ckpt.save_checkpoint_dir(out_dir / name, model, extra,
                                      tensors={"optimizer.safetensors": optimizer_tensors(opt)})
    ckpt.publish(out_dir, name)
    return folder


class MetricsLog:
    """JSONL metrics (one object per line) and, when available, TensorBoard scalars."""

    def __init__(self, out_dir: Path, resume_step: int, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.exists():  # drop lines logged after the checkpoint we resume from
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step and "event" not in json.loads(ln)]
            self.path.write_text("".join(k + "\n" for k in keep))
        elif not resume_step:
            self.path.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
            except Exception:  # noqa: BLE001 - tensorboard is an optional extra
                self.tb = None

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None and "step" in rec:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
