"""The report card verb: `scratchlm report`.

    scratchlm report RUN [--out FILE] [--overwrite]           # -> RUN/report.html
    scratchlm report RUN_A RUN_B [--out FILE] [--overwrite]   # -> RUN_A/compare-<name of RUN_B>.html

Glue only, as `commands.py`: the arguments, then `scratchlm.report.write_card`. An existing file at
the output path, an earlier card included, is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse


def cmd_report(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.report import write_card

    print(write_card(args.run, args.out, other=args.run_b, overwrite=args.overwrite))


def add_parsers(verbs: argparse._SubParsersAction, with_common, writes) -> None:
    """The report verb on the `scratchlm` parser (`with_common`, `writes`: the parser's helpers)."""
    sp = writes(with_common(verbs.add_parser(
        "report", help="a run's report card: one self-contained HTML page (settings, tokenizers, loss curves, "
                       "each stage's numbers, eval scores, timings); two runs side by side")))
    sp.add_argument("run", metavar="RUN", help="a run folder: one stage's, or a demo's folder of stages")
    sp.add_argument("run_b", metavar="RUN_B", nargs="?", help="a second run to compare with RUN, side by side")
    sp.add_argument("--out", help="the HTML file to write (default: RUN/report.html; with RUN_B: "
                                  "RUN/compare-<name of RUN_B>.html)")
    sp.set_defaults(fn=cmd_report)
