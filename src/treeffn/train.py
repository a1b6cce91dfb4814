"""Training loop: AdamW, warm-up + cosine schedule, clipping, accumulation, bf16 autocast, DDP, exact resume.

Batches are a pure function of (seed, step, micro-step) (:class:`treeffn.data.Batches`): the global batch of
``train.batch_size`` sequences is drawn from a generator seeded by those numbers and each DDP rank takes its own
contiguous slice. The data position is therefore the step itself, and a resumed run (model, optimizer, RNG state and
step restored from the checkpoint) reproduces the uninterrupted loss curve exactly on CPU; ``tests/test_train.py``
checks it, and that 2 processes give the result of 1 process on the same global batch.

:func:`train` reads as the steps of a run: open the data, find the checkpoint to resume (its config checked by
:func:`treeffn.config.assemble_config`), build or load the model, freeze, restore, then :class:`TrainingLoop`.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import Config, assemble_config
from .data import DATA_RECORD, Batches, check_vocab, data_record, load_meta, load_tokens
from .device import resolve_device
from .errors import ConfigError, TreeffnError
from .evaluate import evaluate_loss
from .model import GPT
from .stats import tree_summary

# what a run may change in the config of the checkpoint it continues (--resume) or starts from (--init); the
# context length shapes no weight, so fine-tuning may change it (e.g. an imported 8k-context model on 256 tokens)
RESUME_MAY_CHANGE = ("train",)
INIT_MAY_CHANGE = ("train", "model.seq_len")


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
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend)
    d = Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(d.local_rank)
    return d


def wrap_distributed(model: GPT, dist: Dist, device: torch.device) -> torch.nn.Module:
    """``model`` itself in one process, else wrapped in DistributedDataParallel."""
    if dist.world <= 1:
        return model
    # a variant whose parameters can miss a step's gradient (an expert no token chose) says so itself
    unused = any(getattr(f, "may_skip_parameters", False) for f in model.ffn_modules()) or model.cfg.mod.every > 0
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=unused)


def global_mean(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    """The mean of each value over all processes (the values themselves in one process)."""
    if dist.world <= 1:
        return values
    red = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(red)
    return (red / dist.world).tolist()


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


# ---- starting a run ----------------------------------------------------------------------------------------
def open_training_data(cfg: Config, data_dir: Path, world: int) -> tuple[dict, Batches, Batches]:
    """meta.json and the training and validation windows of ``data_dir``, checked against ``cfg``."""
    meta = load_meta(data_dir)
    check_vocab(meta, cfg.model.vocab_size, data_dir, hint=f"set model.vocab_size={meta['vocab_size']}")
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of processes "
                          f"({world})")
    train_b = Batches(load_tokens(data_dir, "train"), cfg.model.seq_len, cfg.model.vocab_size)
    val_b = Batches(load_tokens(data_dir, "val"), cfg.model.seq_len, cfg.model.vocab_size)
    return meta, train_b, val_b


def find_resume_checkpoint(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint in ``out_dir`` that ``resume`` continues; None when there is none (``--resume`` then starts
    afresh, as documented). Without ``resume``, a run already in ``out_dir`` is refused."""
    if not resume:
        if out_dir.exists() and (out_dir / ckpt.POINTER).exists():
            raise TreeffnError(f"{out_dir} already holds a training run; pass --resume to continue it or choose "
                               "another --out")
        return None
    try:
        return ckpt.resolve(out_dir)
    except TreeffnError:
        return None  # nothing to resume: start fresh


def initial_model(cfg: Config, init: str | Path | None, device: torch.device) -> GPT:
    """A new model of ``cfg`` (from the current RNG state), or the weights of the checkpoint ``init`` (fine-tuning),
    whose config may differ from ``cfg`` only in :data:`INIT_MAY_CHANGE`."""
    if init is None:
        with torch.device(device):
            return GPT(cfg)
    model = ckpt.load_model(init, device=device)
    saved_seq_len = model.cfg.model.seq_len
    model.cfg = assemble_config(base=cfg, saved=model.cfg, saved_name=f"--init {init}", may_change=INIT_MAY_CHANGE)
    if saved_seq_len != cfg.model.seq_len:
        model.set_context(cfg.model.seq_len)
    return model.train()


def freeze_parameters(model: GPT, freeze: str) -> None:
    """``attn``: freeze attention, norms and embeddings; empty: nothing."""
    if freeze == "attn":
        for name, p in model.named_parameters():
            if ".attn." in name or name.startswith("tok_emb") or "norm" in name:
                p.requires_grad_(False)
    elif freeze:
        raise ConfigError(f"unknown --freeze '{freeze}'; choose attn")


def restore_training_state(folder: Path, model: GPT, opt: torch.optim.Optimizer) -> int:
    """Load weights, optimizer state and the RNG state of the training checkpoint ``folder``; returns its step."""
    ckpt.load_state_into(model, ckpt.load_tensors(folder / "model.safetensors"), str(folder))
    load_optimizer_tensors(opt, ckpt.load_tensors(folder / "optimizer.safetensors"))
    tstate = json.loads((folder / "trainer.json").read_text())
    torch.set_rng_state(torch.tensor(tstate["rng"], dtype=torch.uint8))
    return int(tstate["step"])


# ---- the trainer ---------------------------------------------------------------------------------------------
def train(cfg: Config, out_dir: str | Path, data_dir: str | Path, resume: bool = False, init: str | Path | None = None,
          device: str = "auto", progress: bool = True, tensorboard: bool = True, freeze: str = "",
          stop_at: int | None = None) -> dict:
    """Train ``cfg`` on the prepared data in ``data_dir``, writing checkpoints and logs to ``out_dir``.

    Returns a summary dict (final train/val loss, tokens/s, steps). ``init`` starts from another checkpoint's
    weights (fine-tuning); ``freeze="attn"`` freezes attention and embeddings. ``stop_at`` ends the run early at
    that step (after saving a checkpoint), as an interruption would; ``resume`` continues it.
    """
    dev = resolve_device(device)
    dist = init_distributed(dev)
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    meta, train_b, val_b = open_training_data(cfg, data_dir, dist.world)
    resume_folder = find_resume_checkpoint(out_dir, resume)
    if resume_folder is not None:
        cfg = assemble_config(base=cfg, saved=ckpt.load_config(resume_folder), may_change=RESUME_MAY_CHANGE,
                              saved_name=f"the checkpoint in {resume_folder} that --resume continues")
    torch.manual_seed(cfg.train.seed)
    model = initial_model(cfg, init, dev)
    cfg = model.cfg
    freeze_parameters(model, freeze)
    opt = make_optimizer(model, cfg, dev)
    start = restore_training_state(resume_folder, model, opt) if resume_folder is not None else 0
    loop = TrainingLoop(model, opt, dist, dev, out_dir, data_dir, meta, start, progress=progress,
                        tensorboard=tensorboard)
    return loop.run(train_b, val_b, stop_at)


class TrainingLoop:
    """The steps of one run from ``start`` to ``train.max_steps`` (or ``stop_at``), with its logging points,
    evaluations and checkpoints.

    tokens/s counts training steps only (forward, backward, optimizer), never evaluation or checkpoint writes: step
    time is accumulated per logging window and over the run (the summary's figure).
    """

    def __init__(self, model: GPT, opt: torch.optim.Optimizer, dist: Dist, device: torch.device, out_dir: Path,
                 data_dir: Path, meta: dict, start: int, progress: bool = True, tensorboard: bool = True):
        cfg = model.cfg
        self.cfg, self.tr, self.raw, self.opt, self.dist, self.dev = cfg, cfg.train, model, opt, dist, device
        self.data_dir, self.meta = data_dir, meta
        self.model = wrap_distributed(model, dist, device)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if self.tr.dtype == "bf16" \
            else nullcontext
        self.start, self.out_dir = start, out_dir
        self.log = MetricsLog(out_dir, start, enabled=dist.main, tensorboard=tensorboard)
        if dist.main:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.log.write({"event": "start", "step": start, "config": cfg.to_dict(), "world": dist.world,
                            "params": model.num_params(), "device": str(device)})
        self.visits = VisitWindow()
        self.tokens_per_step = self.tr.batch_size * self.tr.grad_accum * cfg.model.seq_len
        self.bar = None
        if progress and dist.main:
            self.bar = tqdm(total=self.tr.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        self.win_time, self.win_steps, self.run_time, self.run_steps = 0.0, 0, 0.0, 0

    def run(self, train_b: Batches, val_b: Batches, stop_at: int | None = None) -> dict:
        """Train to the end (or to ``stop_at``, after saving a checkpoint there); returns the run's summary."""
        tr = self.tr
        summary: dict = {"params": self.raw.num_params()}
        step, loss = self.start, float("nan")
        self.model.train()
        try:
            for step in range(self.start, tr.max_steps):
                t_step = time.perf_counter()
                lr, loss, aux, gnorm, stats = self.step(train_b, step)
                dt = time.perf_counter() - t_step
                self.win_time, self.win_steps = self.win_time + dt, self.win_steps + 1
                self.run_time, self.run_steps = self.run_time + dt, self.run_steps + 1
                done = step + 1
                if self.bar is not None:
                    self.bar.update(1)
                if done % tr.log_every == 0 or done == tr.max_steps:
                    self.log_point(done, lr, loss, aux, gnorm, stats)
                stopping = stop_at is not None and done >= stop_at
                is_eval = (tr.eval_every > 0 and done % tr.eval_every == 0) or done == tr.max_steps or stopping
                if is_eval:
                    summary["val_loss"] = self.evaluate(val_b, done, loss)
                if self.dist.main and (is_eval or (tr.save_every and done % tr.save_every == 0)):
                    save_training_checkpoint(self.out_dir, self.raw, self.opt, done, self.data_dir, self.meta)
                if stopping:
                    break
        finally:
            if self.bar is not None:
                self.bar.close()
            self.log.close()
            self.raw.set_track_stats(False)
        summary.update({"train_loss": loss, "steps": step + 1, "out": str(self.out_dir),
                        "tok_per_s": self.run_steps * self.tokens_per_step / self.run_time if self.run_steps else 0.0})
        return summary

    def step(self, train_b: Batches, step: int) -> tuple[float, float, float, torch.Tensor | None, list[dict]]:
        """One optimizer step over ``train.grad_accum`` micro-batches; returns (lr, loss, aux loss, gradient norm,
        the last micro-batch's layer statistics)."""
        tr, dist = self.tr, self.dist
        lr = lr_at(step, self.cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        track = tr.stats_every > 0 and step % tr.stats_every == 0
        self.raw.set_track_stats(track)
        loss, aux = 0.0, 0.0
        for micro in range(tr.grad_accum):
            x, y = train_b.train_batch(tr.seed, step, micro, tr.batch_size, dist.rank, dist.world)
            x, y = x.to(self.dev), y.to(self.dev)
            sync = nullcontext() if (dist.world == 1 or micro == tr.grad_accum - 1) else self.model.no_sync()
            with sync:
                with self.autocast():
                    out = self.model(x, targets=y)
                (out.loss / tr.grad_accum).backward()
            loss += out.lm_loss.item() / tr.grad_accum
            aux += out.aux_loss.item() / tr.grad_accum
            if track:
                self.visits.add(out.stats)
        loss, aux = global_mean([loss, aux], dist, self.dev)  # log the global-batch loss, not this rank's share
        if not math.isfinite(loss):
            raise TreeffnError(f"training diverged at step {step} (loss {loss}); lower train.lr")
        gnorm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), tr.grad_clip) if tr.grad_clip > 0 else None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return lr, loss, aux, gnorm, out.stats

    def log_point(self, done: int, lr: float, loss: float, aux: float, gnorm, stats: list[dict]) -> None:
        """One metrics record: the step's losses, lr, the window's tokens/s, MoD and tree statistics."""
        tok_s = self.win_steps * self.tokens_per_step / max(1e-9, self.win_time)
        self.win_time, self.win_steps = 0.0, 0
        rec = {"step": done, "loss": loss, "aux_loss": aux, "lr": lr, "tok_per_s": tok_s}
        if gnorm is not None:
            rec["grad_norm"] = float(gnorm)
        rec.update(_mod_stats(stats))
        if self.visits.counts:
            rec.update(self.visits.summary())
        self.log.write(rec)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")

    def evaluate(self, val_b: Batches, done: int, loss: float) -> float:
        """Validation loss on the run's fixed windows, logged; returns it."""
        tr = self.tr
        vl, _ = evaluate_loss(self.raw, val_b, tr.eval_batches * tr.batch_size, tr.batch_size, self.dev, self.autocast)
        self.log.write({"step": done, "val_loss": vl})
        if self.bar is not None:
            self.bar.write(f"step {done}: train loss {loss:.4f}  val loss {vl:.4f}")
        return vl


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
    extra = {"trainer.json": trainer, DATA_RECORD: data_record(data_dir, meta)}
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
