"""Lesson 1 of any LLM course, measured: the same corpus through every tokenizer kind.

For each kind: the vocabulary size, bytes of UTF-8 text per token (higher = shorter sequences
for the model), training time, encoding throughput, and one sentence cut into its tokens.
Training and measurement use the same text sample (the first `sample_chars` characters), so
the kinds are compared on equal terms; a bar chart can be written beside the table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from scratchlm.config import Config
from scratchlm.data.sources import read_corpus_text
from scratchlm.errors import UserError
from scratchlm.tokenizer import train_tokenizer
from scratchlm.tokenizer.base import KINDS


@dataclass
class CompareRow:
    kind: str
    vocab_size: int
    bytes_per_token: float
    train_s: float
    encode_mb_s: float
    example: list[str]


def compare(
    inputs: list[str] | None,
    cfg: Config,
    kinds: list[str],
    sentence: str,
    progress: bool = True,
    sample_chars: int = 1_000_000,
) -> list[CompareRow]:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"--kinds: unknown tokenizer kind {unknown[0]!r}", fix=f"choose from {', '.join(KINDS)}")
    texts = read_corpus_text(inputs, cfg.tokenizer.jsonl_field, cfg.tokenizer.max_chars or sample_chars)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    rows = []
    for kind in kinds:
        tcfg = replace(cfg.tokenizer, kind=kind)
        # A character vocabulary must also cover the example sentence.
        texts_for_training = [*texts, sentence] if kind == "char" else texts
        t0 = time.perf_counter()
        tok = train_tokenizer(texts_for_training, tcfg, progress=progress)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_tokens = sum(len(tok.encode_ordinary(t)) for t in texts)
        encode_s = time.perf_counter() - t0
        example = [tok.id_to_piece(i) for i in tok.encode_ordinary(sentence)]
        rows.append(CompareRow(kind, tok.vocab_size, n_bytes / max(n_tokens, 1), train_s,
                               n_bytes / 1e6 / max(encode_s, 1e-9), example))
    return rows


def format_table(rows: list[CompareRow]) -> str:
    head = f"{'kind':<10} {'vocab':>7} {'bytes/token':>11} {'train s':>8} {'encode MB/s':>11}  example"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.kind:<10} {r.vocab_size:>7} {r.bytes_per_token:>11.2f} {r.train_s:>8.2f} "
                     f"{r.encode_mb_s:>11.2f}  {'|'.join(r.example)}")
    return "\n".join(lines)


def plot(rows: list[CompareRow], path: str | Path) -> None:
    """Two bar charts: compression (bytes per token) and encoding throughput, per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [f"{r.kind}\n({r.vocab_size})" for r in rows]
    a.bar(names, [r.bytes_per_token for r in rows], color="tab:blue")
    a.set_title("bytes per token (higher = shorter sequences)")
    b.bar(names, [r.encode_mb_s for r in rows], color="tab:orange")
    b.set_title("encoding throughput, MB/s")
    b.set_yscale("log")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
