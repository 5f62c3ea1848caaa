"""The preference-alignment verbs: `rm train`, `rm score`, `dpo`, `cai` (one `cmd_*` each).

    scratchlm rm train [PAIRS ...] --base RUN/sft [--out RUN/rm]
    scratchlm rm score --ckpt RUN/rm --prompt TEXT --response TEXT [--response TEXT ...]
    scratchlm dpo [PAIRS ...] --base RUN/sft [--out RUN/dpo]
    scratchlm cai [--constitution FILE] --base RUN/sft [--out RUN/cai]

Without PAIRS the pairs are made from the embedded verifiable tasks (`pref.kind`). Glue only, as
`commands.py`: settings, the run folder's claim, the stage's plain function.
"""

from __future__ import annotations

import argparse

from scratchlm.cli.commands import run_config
from scratchlm.config import Config
from scratchlm.errors import UserError
from scratchlm.rundir import claim_run_dir


def _stage_config(args: argparse.Namespace, overrides: list[str], verb: str) -> Config:
    """`run_config` (--preset + overrides, or a resumed run's own config); then the positional pair
    files, --base and --out."""
    cfg = run_config(args, overrides, verb)
    if args.base:
        cfg.pref.base = args.base
    if getattr(args, "inputs", None):
        cfg.pref.data = args.inputs
    if args.out:
        cfg.out_dir = args.out
    if not cfg.pref.base:
        raise UserError(f"{verb}: no base model", fix="pass --base RUN (the SFT run or checkpoint folder)")
    return cfg


def cmd_rm(args: argparse.Namespace, overrides: list[str]) -> None:
    if args.action == "score":
        return _rm_score(args)
    from scratchlm.align.reward import train_reward_model

    cfg = _stage_config(args, overrides, "rm train")
    with claim_run_dir(cfg.out_dir, resume=args.resume, overwrite=args.overwrite,
                       inputs=[cfg.pref.base, *cfg.pref.data]):
        train_reward_model(cfg, progress=not args.quiet, resume=args.resume)


def _rm_score(args: argparse.Namespace) -> None:
    from scratchlm.align.reward import score
    from scratchlm.checkpoint import load_reward_model

    if not args.ckpt or args.prompt is None or not args.response:
        raise UserError("rm score needs --ckpt, --prompt and at least one --response",
                        fix="scratchlm rm score --ckpt RUN/rm --prompt TEXT --response TEXT")
    rm, tok, _ = load_reward_model(args.ckpt)
    for response in args.response:
        print(f"{score(rm, tok, args.prompt, response):+.4f}\t{response}")


def cmd_dpo(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.align.dpo import dpo

    cfg = _stage_config(args, overrides, "dpo")
    with claim_run_dir(cfg.out_dir, resume=args.resume, overwrite=args.overwrite,
                       inputs=[cfg.pref.base, *cfg.pref.data]):
        dpo(cfg, progress=not args.quiet, resume=args.resume)


def cmd_cai(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.align.cai import cai

    cfg = _stage_config(args, overrides, "cai")
    cfg.cai.base = cfg.pref.base
    if args.constitution:
        cfg.cai.constitution = args.constitution
    with claim_run_dir(cfg.out_dir, overwrite=args.overwrite,
                       inputs=[x for x in (cfg.pref.base, cfg.cai.constitution) if x]):
        cai(cfg, progress=not args.quiet)


def add_parsers(verbs: argparse._SubParsersAction, with_common, writes) -> None:
    """The alignment verbs on the `scratchlm` parser (`with_common`, `writes`: the parser's helpers)."""
    rm = verbs.add_parser("rm", help="reward model: train one from the SFT policy on preference pairs, or score")
    rv = rm.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = writes(with_common(rv.add_parser("train", help="train a reward model (Bradley-Terry) on preference pairs"),
                            "rm-tiny"))
    sp.add_argument("inputs", nargs="*", help="preference pairs: JSON/JSONL with prompt/chosen/rejected, alpaca "
                                              "instruction/input/chosen/rejected, message lists, or HH transcripts "
                                              "(default: embedded pairs, pref.kind)")
    sp.add_argument("--base", help="the SFT run or checkpoint folder the reward model grows from")
    sp.add_argument("--out", help="run folder (default: the preset's out_dir)")
    sp.add_argument("--resume", action="store_true")
    sp.set_defaults(fn=cmd_rm)
    sp = with_common(rv.add_parser("score", help="score responses to a prompt with a trained reward model"))
    sp.add_argument("--ckpt", help="the reward model's run or checkpoint folder")
    sp.add_argument("--prompt", help="the user's prompt")
    sp.add_argument("--response", action="append", help="a response to score (repeat for several)")
    sp.set_defaults(fn=cmd_rm)

    sp = writes(with_common(verbs.add_parser("dpo", help="direct preference optimisation of an SFT policy, with "
                                                         "gold evaluation before and after"), "dpo-tiny"))
    sp.add_argument("inputs", nargs="*", help="preference pairs (as rm train; default: embedded pairs)")
    sp.add_argument("--base", help="the SFT run or checkpoint folder to start from (and the reference model)")
    sp.add_argument("--out", help="run folder (default: the preset's out_dir)")
    sp.add_argument("--resume", action="store_true")
    sp.set_defaults(fn=cmd_dpo)

    sp = writes(with_common(verbs.add_parser("cai", help="Constitutional AI: critique, revise, SFT on revisions, "
                                                         "DPO on revision > original"), "sft-tiny"))
    sp.add_argument("--constitution", help="a constitution JSON file (default: the embedded one)")
    sp.add_argument("--base", help="the SFT run or checkpoint folder to start from")
    sp.add_argument("--out", help="run folder (default: the preset's out_dir)")
    sp.set_defaults(fn=cmd_cai)
