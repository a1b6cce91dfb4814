"""``treeffn export-hf DIR OUT``: the command line of :mod:`treeffn.hf`.

Kept apart from :mod:`treeffn.hf` because importing that module imports transformers and registers the architecture
with it (seconds); the CLI builds every subcommand's parser on each call, so :mod:`treeffn.hf` is imported only when
export-hf runs. The dependency goes one way: this module uses :mod:`treeffn.hf`, which knows nothing of it.
"""

from __future__ import annotations

from .checkpoint import resolve
from .errors import TreeffnError
from .outputs import check_output_dir


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="DIR", help="run directory or checkpoint folder")
    parser.add_argument("out", metavar="OUT",
                        help="folder to write (must not exist, unless --overwrite replaces an earlier export)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it is an earlier treeffn export (never any other folder)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip reloading the export and comparing its logits with the checkpoint's")


def run(args) -> int:
    """``treeffn export-hf DIR OUT``: export, then reload through AutoModelForCausalLM and compare logits."""
    folder = resolve(args.checkpoint)
    check_output_dir(args.out, "hf", overwrite=args.overwrite, inputs=[args.checkpoint, folder])  # before transformers
    from .hf import check_export, export_hf  # imports transformers (optional): only once the export runs

    out = export_hf(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (load with: import treeffn.hf; "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    if not args.no_check:
        diff = check_export(args.checkpoint, out)
        print(f"reloaded with AutoModelForCausalLM: max |logit difference| = {diff:.2e}")
        if diff > 1e-4:
            raise TreeffnError(f"the exported model's logits differ from the checkpoint's by {diff:.2e}")
    return 0
