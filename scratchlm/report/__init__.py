"""The report card: a run folder (or two) read back from its files and written as one
self-contained HTML page (`card.py`), by `scratchlm report RUN [RUN_B]` and by the demo.

This layer sits above the stages and below the CLI, and reads files rather than importing stages:
what each stage wrote (config.json, metrics.jsonl, eval/*.md, eval/summary.json, *.png, report.md)
is the whole interface (`runs.py`), with a small reader for the markdown they write (`markdown.py`).
"""

from scratchlm.report.card import build_card, default_output, is_card, write_card
from scratchlm.report.runs import read_run

__all__ = ["build_card", "default_output", "is_card", "read_run", "write_card"]
