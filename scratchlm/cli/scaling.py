"""The scaling-law verb: `scratchlm scaling` (glue only; filled in by the scaling-law work)."""

from __future__ import annotations

import argparse


def add_parsers(verbs: argparse._SubParsersAction, with_common, writes) -> None:
    """The scaling verb on the `scratchlm` parser (`with_common`, `writes`: the parser's helpers)."""
    return None
