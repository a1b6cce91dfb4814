"""Shared helpers for benchmarks: timing with warm-up and repeats, environment record, table printing, argument
parsers and the dense MLP baseline."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn


def timeit(fn, repeats: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    t_start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - t_start < min_time and len(times) < 100 * repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def print_json(name: str, results, **extra) -> None:
    print(json.dumps({"benchmark": name, "env": environment(), **extra, "results": results}))


def parse_configs(text: str) -> list[tuple[int, int]]:
    """argparse type: "1x11,16x7" -> [(1, 11), (16, 7)] (K trees × depth)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            k, d = item.split("x")
            out.append((int(k), int(d)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad config '{item}': expected KxDEPTH, e.g. 1x11") from None
        if out[-1][0] < 1 or out[-1][1] < 0:
            raise argparse.ArgumentTypeError(f"bad config '{item}': K ≥ 1 and depth ≥ 0")
    if not out:
        raise argparse.ArgumentTypeError("no configs given")
    return out


def parse_ints(text: str) -> list[int]:
    """argparse type: "1,16,256" -> [1, 16, 256], positive integers."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad integer list '{text}'") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError("expected positive integers")
    return vals


class DenseMLP(nn.Module):
    """Linear → GELU → Linear: the dense transformer MLP (2 GEMMs), as the benchmarks' baseline."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def loadavg() -> float | None:
    """1-minute load average (other processes competing for the cores), or None where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def drop_unbuilt_cpp(impls: list[str], extension, notes: list[str]) -> None:
    """Remove "tree-cpp" from ``impls`` (with a note) when its C++ extension cannot be built."""
    if "tree-cpp" in impls:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if extension() is None:
                impls.remove("tree-cpp")
                notes.append("tree-cpp skipped: the C++ extension could not be built")
