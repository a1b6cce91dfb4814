"""The compute device of a command: ``--device`` (auto, cpu, cuda, cuda:N) -> a :class:`torch.device`."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is this process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is available, else the CPU; any other
    name is a torch device, refused with a ConfigError when unknown or when it asks for CUDA that is not there."""
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


__all__ = ["resolve_device"]
