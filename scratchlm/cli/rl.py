"""The online-RL verb: `scratchlm rl` (PPO or GRPO on an SFT policy).

    scratchlm rl --algo grpo|ppo --base RUN/sft [--reward checker|rm:RUN/rm|both:RUN/rm] [--out RUN/rl]

Glue only, as `commands.py`: settings, the run folder's claim, the stage's plain function.
"""

from __future__ import annotations

import argparse

from scratchlm.cli.commands import run_config
from scratchlm.config import Config
from scratchlm.errors import UserError
from scratchlm.rundir import claim_run_dir

REWARD_HELP = ("checker (each task family's checker), rm:RUN (a reward model from `scratchlm rm train`), or "
               "both:RUN (checker + rl.rm_weight x the reward model)")


def parse_reward(text: str) -> tuple[str, str]:
    """--reward checker | rm:PATH | both:PATH -> (rl.reward, rl.reward_model)."""
    kind, _, path = text.partition(":")
    if kind == "checker" and not path:
        return kind, ""
    if kind in ("rm", "both") and path:
        return kind, path
    raise UserError(f"--reward {text!r} is not understood", fix=f"use {REWARD_HELP}")


def rl_config(args: argparse.Namespace, overrides: list[str]) -> Config:
    if args.algo == "ppo" and args.preset == args.default_preset:  # the default preset follows --algo
        args.preset = "ppo-tiny"
    cfg = run_config(args, overrides, "rl")
    if args.algo:
        cfg.rl.algo = args.algo
    if args.base:
        cfg.rl.base = args.base
    if args.reward:
        cfg.rl.reward, reward_model = parse_reward(args.reward)
        cfg.rl.reward_model = reward_model or cfg.rl.reward_model
    if args.out:
        cfg.out_dir = args.out
    if not cfg.rl.base:
        raise UserError("rl: no base model", fix="pass --base RUN (the SFT run or checkpoint folder)")
    cfg.validate("rl")
    return cfg


def cmd_rl(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.rl.stage import rl

    cfg = rl_config(args, overrides)
    inputs = [cfg.rl.base] + ([cfg.rl.reward_model] if cfg.rl.reward_model else [])
    with claim_run_dir(cfg.out_dir, resume=args.resume, overwrite=args.overwrite, inputs=inputs):
        rl(cfg, progress=not args.quiet, resume=args.resume)


def add_parsers(verbs: argparse._SubParsersAction, with_common, writes) -> None:
    """The RL verb on the `scratchlm` parser (`with_common`, `writes`: the parser's helpers)."""
    sp = writes(with_common(verbs.add_parser("rl", help="online RL (GRPO or PPO) on an SFT policy, with held-out "
                                                        "checker accuracy before and after"), "grpo-tiny"))
    sp.add_argument("--algo", choices=("grpo", "ppo"), help="grpo (default preset grpo-tiny) or ppo (ppo-tiny)")
    sp.add_argument("--base", help="the SFT run or checkpoint folder to start from (and the reference model)")
    sp.add_argument("--reward", help=REWARD_HELP)
    sp.add_argument("--out", help="run folder (default: the preset's out_dir)")
    sp.add_argument("--resume", action="store_true")
    sp.set_defaults(fn=cmd_rl)
