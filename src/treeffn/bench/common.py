"""What every ``treeffn bench`` benchmark shares: one timer, one environment record, one JSON line schema, the
shipped layers as baselines, table printing and argument parsers.

Timer
-----
:func:`measure` times a function (or several, interleaved) with warm-up calls, then repeats, bounded by a time
budget and a minimum time, and returns :class:`Timing` records: every sample kept, summarised as the median (the
headline figure of every benchmark) with the minimum and maximum beside it (the minimum is the better estimate when
other processes share the cores; max/min shows the spread).

Environment
-----------
:func:`environment` records, once at the start of a run: treeffn, torch and Python versions, OS and machine, CPU
model and the vector-instruction flags that decide kernel speed (``/proc/cpuinfo``, where present), torch's CPU
capability, CPU count, the CPUs this process may use, torch's thread count, the CUDA device (or null), the
last-level cache in bytes (:func:`last_level_cache`, or null) and the 1-min load average at start; :func:`print_json`
adds the load average at the end.

JSON line schema (version 1)
----------------------------
Every benchmark prints its human-readable table, then exactly one line of JSON (the last line of stdout) — one object
with these keys and no others::

    {"bench":    "layer",                 name as in `treeffn bench NAME`
     "schema":   1,                       version of this layout
     "env":      {...},                   environment(), plus "loadavg_end"
     "settings": {...},                   every option and fixed shape the run used (JSON values only)
     "results":  [row, ...],              one row per timed measurement, see below
     "summary":  {...},                   run-wide derived figures (targets, FLOPs, …); {} when none
     "notes":    ["...", ...]}            skipped implementations, load warnings; [] when none

    row = {"case":    {...},              what identifies the measurement: shapes, batch, dtype, phase …
           "impl":    "tree-cpp",         what was timed (an implementation, a model, a variant)
           "time_s":  {"median": s, "min": s, "max": s, "n": calls, "warmup_as_sample": bool},
           "metrics": {...}}              numbers derived for this row: ratios, tokens/s, units …

``time_s`` is seconds per timed call, always; ``warmup_as_sample`` is true when one call took longer than the budget
and its warm-up call is the only sample. Metric names carry their unit (``fwd_s``, ``decode_tok_s``) and ratios name
what they compare (``speedup_vs_dense``). Values are finite numbers, strings, booleans or null (never NaN).
:func:`check_record` validates a parsed line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..config import get_config
from ..errors import ConfigError
from ..layers import build_ffn

SCHEMA_VERSION = 1
RECORD_KEYS = ("bench", "schema", "env", "settings", "results", "summary", "notes")
ROW_KEYS = ("case", "impl", "time_s", "metrics")
TIME_KEYS = ("median", "min", "max", "n", "warmup_as_sample")
# the instruction-set flags that decide GEMM and kernel speed (x86 "flags", Arm "Features" of /proc/cpuinfo)
CPU_FLAGS = ("sse4_2", "fma", "f16c", "avx", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimdhp", "sve", "sve2",
             "bf16", "i8mm")


# ---- timer -----------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds of each timed call; ``parts`` holds the floats the function returned (the seconds of a part of the
    call it timed itself, e.g. the forward inside a training step), ``warmup_as_sample`` marks a single slow call."""

    samples: list[float]
    parts: list[float] = field(default_factory=list)
    warmup_as_sample: bool = False

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def part_median(self) -> float | None:
        return statistics.median(self.parts) if self.parts else None

    def to_dict(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n,
                "warmup_as_sample": self.warmup_as_sample}


def measure(fns: Callable | Mapping[str, Callable], inputs: Sequence | None = None, *, warmup: int = 1,
            repeats: int = 5, min_repeats: int = 1, budget_s: float = math.inf, min_time_s: float = 0.0,
            warmup_cutoff_s: float = math.inf, slow_sample: bool = False,
            before: Callable | None = None) -> Timing | dict[str, Timing]:
    """Time ``fns`` — one function, or a dict of them run interleaved (a, b, a, b, …, so that load from other
    processes hits all of them alike) — and return a :class:`Timing` (a dict of them for a dict).

    * Each function is called as ``fn()``, or ``fn(inputs[i % len(inputs)])`` at its i-th call when ``inputs`` is
      given (a pool of fresh inputs, so no call finds its data hot in cache from the previous one).
    * ``before`` is called untimed before every call (warm-up calls too), with the same argument as the call: it
      sets up the state the call should find, e.g. evicted caches. Its time counts towards ``budget_s``.
    * Warm-up: ``warmup`` untimed calls (first-call allocations, lazy initialisation, caches), cut short after a
      call slower than ``warmup_cutoff_s`` (one such call amortises the start-up costs).
    * ``slow_sample``: a function whose last warm-up call alone took longer than ``budget_s`` is not called again;
      that call is its one sample (``warmup_as_sample``).
    * Timed rounds: ``repeats`` rounds; fewer once ``budget_s`` seconds are spent (never fewer than
      ``min_repeats``), more while under ``min_time_s`` seconds (at most 100 × ``repeats``).
    """
    single = callable(fns)
    table = {"": fns} if single else dict(fns)
    pool = list(inputs) if inputs is not None else None

    def call(fn, i):
        if pool is None:
            if before is not None:
                before()
            t0 = time.perf_counter()
            r = fn()
        else:
            arg = pool[i % len(pool)]
            if before is not None:
                before(arg)
            t0 = time.perf_counter()
            r = fn(arg)
        return time.perf_counter() - t0, r

    last: dict[str, tuple[float, object]] = {}
    warming = list(table)
    for i in range(max(0, warmup)):
        for k in list(warming):
            last[k] = call(table[k], i)
            if last[k][0] > warmup_cutoff_s:
                warming.remove(k)
    out: dict[str, Timing] = {}
    timed: dict[str, Timing] = {}
    for k in table:
        if slow_sample and k in last and last[k][0] > budget_s:
            dt, r = last[k]
            out[k] = Timing([dt], [r] if isinstance(r, float) else [], warmup_as_sample=True)
        else:
            out[k] = timed[k] = Timing([])
    start = time.perf_counter()
    rounds, cap = 0, 100 * max(1, repeats, min_repeats)
    while timed:
        for k, t in timed.items():
            dt, r = call(table[k], rounds)
            t.samples.append(dt)
            if isinstance(r, float):
                t.parts.append(r)
        rounds += 1
        elapsed = time.perf_counter() - start
        if rounds < min_repeats:
            continue
        if (rounds >= repeats and elapsed >= min_time_s) or elapsed > budget_s or rounds >= cap:
            break
    return out[""] if single else out


# ---- environment -----------------------------------------------------------------------------------------------
def loadavg() -> float | None:
    """1-minute load average (other processes competing for the cores), or None where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """CPU model name and the vector-instruction flags of :data:`CPU_FLAGS` it has; None for each where the file
    or the field is missing (not Linux, some virtual machines)."""
    model, flags = None, None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                key = key.strip().lower()
                if not sep:
                    if flags is not None:
                        break  # the first processor's block is enough
                    continue
                if model is None and key in ("model name", "hardware", "cpu model"):
                    model = value.strip()
                elif flags is None and key in ("flags", "features"):
                    have = set(value.split())
                    flags = [f for f in CPU_FLAGS if f in have]
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": flags}


def _cache_bytes(text: str) -> int:
    """A sysfs cache size ("32768K", "1M", "512") in bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def _sysfs_caches(root: str) -> dict[int, dict[str, int]]:
    """{level: {shared_cpu_list: bytes}} of the data and unified caches sysfs lists under ``root``."""
    found: dict[int, dict[str, int]] = {}
    for cpu in os.listdir(root):
        cache = os.path.join(root, cpu, "cache")
        if not (cpu.startswith("cpu") and cpu[3:].isdigit() and os.path.isdir(cache)):
            continue
        for index in os.listdir(cache):
            if not index.startswith("index"):
                continue
            info = {}
            for name in ("type", "level", "size", "shared_cpu_list"):
                with open(os.path.join(cache, index, name), encoding="ascii") as f:
                    info[name] = f.read().strip()
            if info["type"] in ("Data", "Unified"):
                found.setdefault(int(info["level"]), {})[info["shared_cpu_list"]] = _cache_bytes(info["size"])
    return found


def _lscpu_caches() -> dict[int, int]:
    """{level: total bytes} of the data and unified caches from ``lscpu -B`` ("L3 cache:  33554432 (1 instance)";
    "L1i" lines are instruction caches)."""
    out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=10).stdout
    found = (re.match(r"L(\d)(d?) cache:\s*(\d+)", line.strip()) for line in out.splitlines())
    return {int(m[1]): int(m[3]) for m in found if m}


def last_level_cache(root: str = "/sys/devices/system/cpu") -> int | None:
    """Bytes of last-level cache on the machine: the highest data cache level's size times its number of instances
    (one per group of CPUs sharing it) from sysfs, else the total ``lscpu -B`` gives for that level; None when
    neither says."""
    try:
        found = _sysfs_caches(root)
        if found:
            return sum(found[max(found)].values())
    except (OSError, ValueError):
        pass
    try:
        sizes = _lscpu_caches()
    except (OSError, subprocess.SubprocessError):
        return None
    return sizes[max(sizes)] if sizes else None


def environment() -> dict:
    """The record of the machine and software a benchmark ran on (the ``env`` of its JSON line). Call it after
    setting the thread count, at the start of the run: it reads the load average then."""
    try:
        from importlib.metadata import version

        treeffn_version = version("treeffn")
    except Exception:  # noqa: BLE001 - a source tree that is not installed
        treeffn_version = None
    try:
        cpus_available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus_available = None
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        capability = None
    return {
        "treeffn": treeffn_version,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "system": platform.system(),
        "machine": platform.machine(),
        **cpu_info(),
        "cpu_capability": capability,
        "cpu_count": os.cpu_count(),
        "cpus_available": cpus_available,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "llc_bytes": last_level_cache(),
        "loadavg_start": loadavg(),
    }


def env_line(env: dict) -> str:
    """One human line of the environment, printed above each table."""
    flags = env.get("cpu_flags")
    return (f"torch {env['torch']}, {env['threads']} threads, {env['cpu_count']} CPUs"
            f" ({env['cpu_model'] or env['machine']}{', ' + ' '.join(flags) if flags else ''}), "
            f"load average {env['loadavg_start']} at start")


# ---- JSON line -------------------------------------------------------------------------------------------------
def row(case: dict, impl: str, timing: Timing, **metrics) -> dict:
    """One result row of the schema (see the module docstring)."""
    return {"case": dict(case), "impl": impl, "time_s": timing.to_dict(), "metrics": metrics}


def print_json(bench: str, env: dict, settings: dict, results: list[dict], summary: dict | None = None,
               notes: Sequence[str] = ()) -> dict:
    """Finish a run: record the load average at the end, add a note when other processes competed for the cores,
    print the notes, then the one JSON line of the schema. Returns the record."""
    env = dict(env, loadavg_end=loadavg())
    notes = list(notes)
    busy = [v for v in (env.get("loadavg_start"), env["loadavg_end"]) if v is not None]
    cpus = env.get("cpus_available") or env.get("cpu_count") or 1
    if busy and max(busy) > 0.5 * cpus:
        notes.append(f"1-min load average {env.get('loadavg_start')} at start, {env['loadavg_end']} at end on "
                     f"{cpus} CPUs: other processes competed for the cores; medians of multi-threaded calls suffer "
                     "most (min is closer to an idle machine)")
    for n in notes:
        print("note:", n)
    record = {"bench": bench, "schema": SCHEMA_VERSION, "env": env, "settings": settings, "results": results,
              "summary": summary or {}, "notes": notes}
    record = _jsonable(record)
    print(json.dumps(record, allow_nan=False), flush=True)
    return record


def check_record(rec: dict, bench: str | None = None) -> None:
    """Raise ValueError naming the first way ``rec`` (a parsed JSON line) departs from the schema."""
    def need(cond, what):
        if not cond:
            raise ValueError(f"bench JSON line: {what}")

    need(isinstance(rec, dict) and set(rec) == set(RECORD_KEYS), f"top-level keys must be {RECORD_KEYS}")
    need(bench is None or rec["bench"] == bench, f"bench is {rec['bench']!r}, expected {bench!r}")
    need(rec["schema"] == SCHEMA_VERSION, f"schema {rec['schema']!r} is not {SCHEMA_VERSION}")
    for key in ("env", "settings", "summary"):
        need(isinstance(rec[key], dict), f"{key} must be an object")
    for key in ("torch", "threads", "cpu_count", "machine", "python", "cpu_model", "cpu_flags", "cuda",
                "loadavg_start", "loadavg_end"):
        need(key in rec["env"], f"env lacks {key!r}")
    need(isinstance(rec["notes"], list) and all(isinstance(n, str) for n in rec["notes"]), "notes: list of strings")
    need(isinstance(rec["results"], list) and rec["results"], "results must be a non-empty list")
    for i, r in enumerate(rec["results"]):
        need(isinstance(r, dict) and set(r) == set(ROW_KEYS), f"results[{i}] keys must be {ROW_KEYS}")
        need(isinstance(r["case"], dict) and isinstance(r["metrics"], dict), f"results[{i}]: case, metrics objects")
        need(isinstance(r["impl"], str) and r["impl"], f"results[{i}]: impl must be a name")
        t = r["time_s"]
        need(isinstance(t, dict) and set(t) == set(TIME_KEYS), f"results[{i}].time_s keys must be {TIME_KEYS}")
        need(isinstance(t["n"], int) and t["n"] >= 1, f"results[{i}].time_s.n must be ≥ 1")
        need(0 <= t["min"] <= t["median"] <= t["max"], f"results[{i}].time_s: min ≤ median ≤ max")
    _check_finite(rec, "record")


def _check_finite(v, where: str) -> None:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"bench JSON line: {where} is {v}")
    if isinstance(v, dict):
        for k, x in v.items():
            _check_finite(x, f"{where}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_finite(x, f"{where}[{i}]")


def _round(v: float) -> float:
    return float(f"{v:.6g}")


def _jsonable(v):
    """Tuples to lists, NaN/inf to None, tensors and numpy scalars to numbers, so the line is strict JSON; floats
    to 6 significant digits (far below the noise of any timing)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if hasattr(v, "item") and not isinstance(v, (int, float, str, bool)):
        v = v.item()
    if isinstance(v, float):
        return _round(v) if math.isfinite(v) else None
    return v


# ---- baselines: the shipped layers -----------------------------------------------------------------------------
def ffn_config(kind: str, d_model: int, overrides: dict | None = None):
    """The configuration of one shipped feed-forward layer of width ``d_model`` (``ffn.kind`` = ``kind``): the
    ``tiny`` preset with one attention head (attention is not built, but the config must be valid: an even
    d_model), biases on (the GELU MLP of GPT-2), plus ``overrides``."""
    if d_model < 2 or d_model % 2:
        raise ConfigError(f"--d-model must be an even number ≥ 2 (got {d_model})")
    return get_config("tiny", {"model.d_model": d_model, "model.n_head": 1, "model.bias": True, "ffn.kind": kind,
                               **(overrides or {})})


def shipped_ffn(kind: str, d_model: int, overrides: dict | None = None) -> nn.Module:
    """``treeffn.layers.build_ffn`` of :func:`ffn_config`: the layer a model of that config would use."""
    return build_ffn(ffn_config(kind, d_model, overrides))


def dense_mlp(d_model: int, hidden: int) -> nn.Module:
    """The shipped dense GELU MLP (Linear → GELU → Linear, with biases) of ``hidden`` units."""
    return shipped_ffn("dense", d_model, {"ffn.hidden": hidden, "ffn.activation": "gelu"})


def tree_ffn(d_model: int, trees: int, depth: int, **tree) -> nn.Module:
    """The shipped tree layer as UFB-23 defines it (1 unit per node, GELU, node placement, biases, UFB-23's output
    initialisation, no routing thresholds) unless ``tree`` overrides ``tree.*`` keys (``balance="threshold"``)."""
    keys = {"trees": trees, "depth": depth, "node_width": 1, "activation": "gelu", "placement": "node",
            "bias": True, "balance": "none", "init": "ufb", **tree}
    return shipped_ffn("tree", d_model, {f"tree.{k}": v for k, v in keys.items()})


def moe(d_model: int, experts: int, top_k: int, hidden: int) -> nn.Module:
    """The shipped token-choice MoE: ``experts`` GELU MLPs of ``hidden`` units, top-``top_k`` softmax router; no
    load-balancing loss (an inference benchmark needs none)."""
    return shipped_ffn("moe", d_model, {"moe.experts": experts, "moe.top_k": top_k, "ffn.hidden": hidden,
                                        "ffn.activation": "gelu", "moe.expert": "dense", "moe.aux_weight": 0.0})


# ---- tables and arguments --------------------------------------------------------------------------------------
def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


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


def parse_choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated subset of ``allowed`` ("warm,cold" -> ["warm", "cold"]), no repeats."""
    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        if not names or any(n not in allowed for n in names):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(allowed)} "
                                             f"(got '{text}')")
        return names
    return parse


@contextlib.contextmanager
def torch_threads(n: int):
    """``torch.set_num_threads(n)`` for the duration (n ≤ 0: unchanged), then the caller's setting back (the smoke
    tests run benchmarks inside pytest)."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def drop_unbuilt_cpp(impls: list[str], extension, notes: list[str]) -> None:
    """Remove "tree-cpp" from ``impls`` (with a note) when its C++ extension cannot be built."""
    if "tree-cpp" in impls:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if extension() is None:
                impls.remove("tree-cpp")
                notes.append("tree-cpp skipped: the C++ extension could not be built")
