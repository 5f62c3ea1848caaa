"""The `serve` verb (being built)."""

from __future__ import annotations

import argparse


def add_parsers(verbs: argparse._SubParsersAction, with_common, writes) -> None:
    """The serve verb on the `scratchlm` parser (`with_common`, `writes`: the parser's helpers)."""
