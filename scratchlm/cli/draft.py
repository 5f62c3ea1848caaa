"""The draft-head verb: `scratchlm train-draft` (an EAGLE head on a target's own features).

    scratchlm train-draft --target RUN [--data PATH ...] --out RUN_DRAFT [--steps N] [--draft-vocab N] [--overwrite]

Glue only, as `commands.py`: the arguments, the output folder's check, then the stage's plain function.
Sampling with the head: `scratchlm sample --ckpt RUN --draft RUN_DRAFT`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_train_draft(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.draft.train import DraftTrainSettings, train_draft
    from scratchlm.errors import UserError
    from scratchlm.rundir import check_output_path
    from scratchlm.train.device import pick_device

    for name, least in (("steps", 1), ("batch_size", 1), ("max_chars", 0), ("draft_vocab", 0)):
        if getattr(args, name) < least:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range",
                            fix=f"use {least} or more")
    if not args.lr > 0:
        raise UserError(f"--lr {args.lr} must be > 0")
    if Path(args.out).resolve() == Path(args.target).resolve():
        raise UserError(f"--out {args.out} is the target's folder", fix="write the head to a folder of its own")
    check_output_path(args.out, overwrite=args.overwrite, inputs=args.data or [], folder=True)
    s = DraftTrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                           max_chars=args.max_chars, seed=args.seed, draft_vocab=args.draft_vocab)
    train_draft(args.target, args.data, args.out, s, str(pick_device(args.device, flag="--device")),
                log=(lambda line: None) if args.quiet else print)


def add_parsers(verbs: argparse._SubParsersAction, with_common, writes) -> None:
    """The train-draft verb on the `scratchlm` parser (`with_common`, `writes`: the parser's helpers)."""
    d = {"steps": 300, "batch_size": 8, "lr": 3e-3, "max_chars": 2_000_000}
    sp = writes(with_common(verbs.add_parser(
        "train-draft", help="train an EAGLE-style draft head on a target's own features, for speculative decoding "
                            "(scratchlm sample --draft)")))
    sp.add_argument("--target", required=True, help="the target model's run or checkpoint folder")
    sp.add_argument("--data", nargs="*", help="text files, folders or .jsonl (default: the embedded corpus)")
    sp.add_argument("--out", required=True, help="the folder to write (draft.safetensors + draft.json)")
    sp.add_argument("--steps", type=int, default=d["steps"])
    sp.add_argument("--batch-size", type=int, default=d["batch_size"])
    sp.add_argument("--seq-len", type=int, default=0, help="window length (default: the target's block_size)")
    sp.add_argument("--lr", type=float, default=d["lr"])
    sp.add_argument("--max-chars", type=int, default=d["max_chars"], help="text read, in characters (0 = all)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--draft-vocab", type=int, default=1024,
                    help="draft only the N token ids most frequent in the text: a cheaper LM head per draft step; the "
                         "target still checks every id, so the output is unchanged (0 = the whole vocabulary)")
    sp.add_argument("--device", default="auto")
    sp.set_defaults(fn=cmd_train_draft)
