"""The scaling-law verb: `scratchlm scaling` (an IsoFLOP grid on the embedded corpus, fitted and drawn).

    scratchlm scaling [--budget 1e11,3e11,1e12,3e12] [--widths 12,16,24,32,48,64,96] [--layers 4] [--heads 4]
                      [--arch gpt|llama] [--threads 1] [--max-epochs 8] [--quick] --out DIR
                      [--resume | --overwrite]

Glue only, as `commands.py`: the arguments parsed into the grid's settings, then the stage's plain
function (`scratchlm.scaling.stage.run_scaling`).
"""

from __future__ import annotations

import argparse

from scratchlm.errors import UserError


def _numbers(flag: str, text: str, kind: type) -> list:
    try:
        values = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        example = "1e12,3e12,1e13" if kind is float else "64,96,128"
        raise UserError(f"{flag} {text}: not a comma-separated list of {'numbers' if kind is float else 'integers'}",
                        fix=f"e.g. {flag} {example}") from None
    if not values:
        raise UserError(f"{flag} {text!r}: empty", fix="give at least one value")
    return values


def cmd_scaling(args: argparse.Namespace, overrides: list[str]) -> None:
    from dataclasses import replace

    from scratchlm.scaling import grid
    from scratchlm.scaling.stage import run_scaling

    budgets = _numbers("--budget", args.budget, float) if args.budget else \
        list(grid.QUICK_BUDGETS if args.quick else grid.DEFAULT_BUDGETS)
    widths = _numbers("--widths", args.widths, int) if args.widths else \
        list(grid.QUICK_WIDTHS if args.quick else grid.DEFAULT_WIDTHS)
    chosen = {k: getattr(args, k) for k in ("layers", "heads", "arch", "threads", "device", "max_epochs")
              if getattr(args, k) is not None}
    for key, least in (("layers", 1), ("heads", 1), ("threads", 0)):
        if chosen.get(key, least) < least:
            raise UserError(f"--{key} {chosen[key]} is out of range", fix=f"use a whole number >= {least}")
    if not chosen.get("max_epochs", 1) > 0:
        raise UserError(f"--max-epochs {chosen['max_epochs']} is out of range", fix="use a number > 0")
    settings = replace(grid.QUICK_SETTINGS if args.quick else grid.DEFAULT_SETTINGS, **chosen)
    run_scaling(args.out, budgets, widths, settings, resume=args.resume, overwrite=args.overwrite,
                progress=not args.quiet)


def add_parsers(verbs: argparse._SubParsersAction, with_common, writes) -> None:
    """The scaling verb on the `scratchlm` parser (`with_common`, `writes`: the parser's helpers)."""
    sp = writes(with_common(verbs.add_parser(
        "scaling", help="scaling laws: an IsoFLOP grid of pretraining runs on the embedded corpus, the compute-optimal "
                        "N_opt(C) and D_opt(C) fitted (Chinchilla approach 2) and drawn",
        description="Trains every (budget, width) point for D = C / 6N tokens (N: non-embedding parameters), fits a "
                    "parabola in ln N per budget and power laws through the minima, for non-embedding and total N; "
                    "writes scaling.png, results.json and summary.md. The default grid: 4 budgets x 7 widths of the "
                    "demo's 4-layer GPT shape (24 points; 4 left out, over 8 epochs), about 25 minutes on one CPU "
                    "core.")))
    sp.add_argument("--budget", help="compute budgets in FLOPs, comma-separated (default 1e11,3e11,1e12,3e12; "
                                     "--quick: 1e9,2e9,4e9)")
    sp.add_argument("--widths", help="model widths (n_embd), comma-separated, multiples of --heads "
                                     "(default 12,16,24,32,48,64,96; --quick: 16,24,32)")
    sp.add_argument("--layers", type=int, help="blocks per model (default 4; --quick: 2)")
    sp.add_argument("--heads", type=int, help="attention heads (default 4; --quick: 2)")
    sp.add_argument("--arch", choices=("gpt", "llama"), help="model family (default gpt)")
    sp.add_argument("--threads", type=int, help="torch threads per run (default 1: 2 were slower at these widths; "
                                                "0 = auto)")
    sp.add_argument("--max-epochs", type=float, help="leave out a point that would pass over the training split more "
                                                     "often than this (default 8)")
    sp.add_argument("--device", help="auto, cpu, cuda, ... (default auto; bf16 on a GPU, fp32 on a CPU)")
    sp.add_argument("--quick", action="store_true", help="a tiny grid for tests (seconds)")
    sp.add_argument("--out", required=True, help="the grid's folder: data, one run folder per point, the results")
    sp.add_argument("--resume", action="store_true", help="finish the grid in --out: finished points are kept, an "
                                                          "interrupted one resumes; budgets and widths may be added")
    sp.set_defaults(fn=cmd_scaling)
