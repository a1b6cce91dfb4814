"""Checkpoints: safetensors tensors + JSON, written atomically, never unpickled.

A training run directory holds one or more complete checkpoint folders and a pointer::

    RUN/checkpoint.json          {"latest": "step-000400"}   (replaced atomically with os.replace)
    RUN/step-000400/config.json   the full Config
    RUN/step-000400/model.safetensors
    RUN/step-000400/tokenizer.json, data.json      tokenizer and the data it was trained on
    RUN/step-000400/optimizer.safetensors, trainer.json   only in training checkpoints (resume)

A folder is first written as ``.tmp-*`` and renamed when complete; the pointer moves only after that, and old
folders are deleted only after the pointer moved, by renaming them to ``.tmp-old-*`` first (so no ``step-*`` folder
is ever seen half-deleted). Every rename that publishes something is followed by an fsync of the parent directory,
so it survives a power loss. A process killed at any moment therefore leaves the previous checkpoint loadable and
every visible checkpoint folder complete (``tests/test_crash_resume.py`` kills a run at random moments to check
it). ``load_model`` accepts a run directory or a checkpoint folder.

Output folders are guarded and published by :mod:`treeffn.outputs` (:func:`~treeffn.outputs.check_output_dir`,
:func:`~treeffn.outputs.install_dir`); :func:`save_checkpoint_dir` itself never replaces anything but a checkpoint
folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .config import Config
from .data import TextCodec
from .errors import CheckpointError, ConfigError, OutputError, TreeffnError
from .memory import use_huge_pages
from .model import GPT
from .outputs import OUTPUT_KINDS, POINTER, fsync_dir, install_dir, output_kind, write_json_atomic

FORMAT_VERSION = 1


def _state_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # tied weights appear twice in state_dict; safetensors refuses shared storage, so store each tensor once
    sd, seen, out = module.state_dict(), {}, {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.shape, v.stride())
        if key in seen and v.numel():
            continue
        seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out


def save_checkpoint_dir(folder: Path, model, extra_files: dict[str, object] | None = None,
                        tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a complete checkpoint folder atomically (temp folder + rename). Returns the folder.

    An existing ``folder`` is replaced only when it is empty or a checkpoint folder (callers decide whether that
    is wanted: see :func:`treeffn.outputs.check_output_dir`); anything else raises :class:`OutputError` before any work.
    """
    from safetensors.torch import save_file  # looked up per call: tests replace it to kill a writer mid-save

    folder = Path(folder)
    if folder.exists() and output_kind(folder) not in ("empty", "checkpoint"):
        raise OutputError(f"{folder} exists and is not {OUTPUT_KINDS['checkpoint']}; refusing to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        save_file(_state_for_save(model), str(tmp / "model.safetensors"), metadata={"format": "treeffn"})
        (tmp / "config.json").write_text(model.cfg.to_json())
        for name, group in (tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / name))
        for name, obj in (extra_files or {}).items():
            if isinstance(obj, (str, bytes)):
                (tmp / name).write_bytes(obj.encode() if isinstance(obj, str) else obj)
            elif isinstance(obj, Path):
                shutil.copyfile(obj, tmp / name)
            else:
                (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True))
        for p in tmp.iterdir():  # make the data durable before it becomes visible
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        install_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def publish(run_dir: Path, folder_name: str, keep: int = 1) -> None:
    """Point ``run_dir/checkpoint.json`` at ``folder_name``, then drop older step folders beyond ``keep``."""
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / POINTER, {"latest": folder_name, "format": FORMAT_VERSION})
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and p.name != folder_name)
    for p in steps[: max(0, len(steps) - (keep - 1))]:
        # renamed out of sight first: a process killed while deleting never leaves a half-deleted step-* folder
        trash = Path(tempfile.mkdtemp(prefix=f".tmp-old-{p.name}-", dir=run_dir))
        os.replace(p, trash / "dir")
        shutil.rmtree(trash, ignore_errors=True)
    for p in run_dir.glob(".tmp-*"):  # leftovers of a killed writer
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def resolve(path: str | Path) -> Path:
    """A run directory (follow its pointer) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if (path / POINTER).exists():
        try:
            latest = json.loads((path / POINTER).read_text())["latest"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path / POINTER} is corrupt") from None
        path = path / latest
        if not path.is_dir():
            raise CheckpointError(f"{path} named by {POINTER} is missing")
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"'{path}' is not a treeffn checkpoint (needs config.json and model.safetensors)")
    return path


def load_config(folder: Path) -> Config:
    try:
        return Config.from_dict(json.loads((Path(folder) / "config.json").read_text()))
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise CheckpointError(f"{folder}/config.json: {exc}") from None
        raise CheckpointError(f"{folder}/config.json is not valid JSON") from None


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(file).is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{file} is truncated or corrupt ({msg})") from None


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    # Checkpoints written before tree.balance existed have no routing thresholds: zero thresholds route exactly as
    # those models did (on the sign of the score), and their running average starts afresh (route_batches 0).
    # Thresholds saved without their batch count are taken as settled.
    state = dict(state)
    for k in expected:
        if k.endswith("route_threshold") and k not in state:
            state[k] = torch.zeros_like(expected[k], device="cpu")
            state.setdefault(k[: -len("route_threshold")] + "route_batches", torch.zeros((), dtype=torch.float64))
        elif k.endswith("route_batches") and k not in state:
            state[k] = torch.tensor(1e6, dtype=torch.float64)
    tied = {k for k in expected if k == "lm_head.weight" and getattr(model.cfg.model, "tie_embeddings", False)}
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{where} does not match its config: {what} tensors")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where} does not match its config: '{k}' has shape {tuple(v.shape)}, "
                                  f"expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               huge_pages: bool = True):
    """Load a trained model from a run directory or checkpoint folder; returned in eval mode.

    On CPU its large weights are placed on transparent huge pages where the system offers them
    (:func:`treeffn.memory.use_huge_pages`; ``huge_pages=False`` keeps ordinary pages): a tree layer's scattered row
    reads then miss the TLB far less often."""
    folder = resolve(path)
    cfg = load_config(folder)
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device=device)
    load_state_into(model, load_tensors(folder / "model.safetensors"), str(folder / "model.safetensors"))
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    for mod in model.modules():  # non-persistent buffers (rotary tables) were left empty by to_empty
        if hasattr(mod, "reset_buffers"):
            mod.reset_buffers()
    if dtype is not None:
        model = model.to(dtype)
    if huge_pages:
        use_huge_pages(model)  # CPU tensors only; a no-op where huge pages are unavailable
    model.checkpoint_dir = folder
    return model.eval()


def load_codec(path: str | Path):
    """The tokenizer saved with a checkpoint, as a :class:`treeffn.data.TextCodec`."""
    folder = resolve(path)
    tok = folder / "tokenizer.json"
    if not tok.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json")
    try:
        return TextCodec.from_tokenizer(Tokenizer.from_file(str(tok)))
    except TreeffnError:
        raise
    except Exception as exc:  # noqa: BLE001 - a tokenizer file we cannot parse is a corrupt checkpoint
        raise CheckpointError(f"{tok} is corrupt ({type(exc).__name__})") from None
