"""The evaluation verb: `scratchlm eval CKPT`.

    scratchlm eval RUN [--data DIR] [--text FILE ...] [--choice FILE.jsonl ...] [--gen FILE.jsonl ...]
                       [--no-suite] [--stride N] [--out DIR] [--overwrite]

Glue only, as `commands.py`: arguments, the output's check, the stage's plain function.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.rundir import check_output_path


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.eval.suite import run_eval

    if args.cloze_items < 1 or args.task_prompts < 1 or args.batch_tokens < 1:
        raise UserError("--cloze-items, --task-prompts and --batch-tokens must be positive")
    out = Path(args.out) if args.out else Path(args.ckpt) / "evaluation"
    inputs = [args.ckpt, *(args.text or []), *(args.choice or []), *(args.gen or [])] + ([args.data] if args.data
                                                                                          else [])
    check_output_path(out, overwrite=args.overwrite, inputs=[i for i in inputs if Path(i) != Path(args.ckpt)],
                      folder=True)
    result = run_eval(args.ckpt, out, data=args.data, texts=args.text or [], choice_files=args.choice or [],
                      gen_files=args.gen or [], suite=not args.no_suite, cloze_items=args.cloze_items,
                      task_prompts=args.task_prompts, stride=args.stride, batch_tokens=args.batch_tokens,
                      seed=args.seed, progress=not args.quiet)
    print(result.table)
    print(f"wrote {out} (summary.json, eval.md, eval.png) in {result.seconds:.1f}s")


def add_parsers(verbs: argparse._SubParsersAction, with_common, writes) -> None:
    """The eval verb on the `scratchlm` parser (`with_common`, `writes`: the parser's helpers)."""
    sp = writes(with_common(verbs.add_parser(
        "eval", help="bits per byte, multiple choice and generation tasks of a checkpoint (lm-eval's conventions)")))
    sp.add_argument("ckpt", help="run or checkpoint folder")
    sp.add_argument("--data", help="prepared data folder whose validation split is the held-out text (default: "
                                   "RUN/data when it exists)")
    sp.add_argument("--text", nargs="+", metavar="FILE", help="text files, folders or JSONL: bits/byte per document")
    sp.add_argument("--choice", nargs="+", metavar="FILE", help='choice JSONL: {"context", "choices", "label"}')
    sp.add_argument("--gen", nargs="+", metavar="FILE", help='generation JSONL for a chat model: {"prompt", "answer"}')
    sp.add_argument("--no-suite", action="store_true", help="only the files given, not the embedded suite")
    sp.add_argument("--stride", type=int, help="tokens between window ends (default: the model's context, disjoint "
                                               "windows as lm-eval; smaller: more context per token)")
    sp.add_argument("--cloze-items", type=int, default=200, help="cloze items from the held-out documents")
    sp.add_argument("--task-prompts", type=int, default=200, help="embedded task prompts for a chat model")
    sp.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", help="output folder (default RUN/evaluation)")
    sp.set_defaults(fn=cmd_eval)
