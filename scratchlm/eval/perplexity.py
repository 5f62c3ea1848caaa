"""Perplexity and bits per byte of documents, each token scored exactly once (`loglik.rolling_rows`).

Per document: the summed negative log-likelihood in nats, its tokens and its UTF-8 bytes. Overall:
bits per byte = sum NLL / (ln 2 * sum bytes), lm-eval's `bits_per_byte` (its documents weighted by their
bytes); token perplexity = exp(sum NLL / sum tokens). Bits per byte compares models with different
tokenizers; token perplexity does not. Documents are encoded with `encode_ordinary` (a literal
"<|endoftext|>" inside one is text), and the first token is conditioned on the end-of-text id, as a
document follows it in the pretraining stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from scratchlm.errors import UserError
from scratchlm.eval.loglik import rolling_rows, score_tails
from scratchlm.tokenizer import Tokenizer


@dataclass
class DocScore:
    name: str
    nll: float  # nats, summed over the document's tokens
    tokens: int
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)


def score_documents(model: nn.Module, tok: Tokenizer, docs: Sequence[tuple[str, str]], *, stride: int | None = None,
                    batch_tokens: int = 8192, progress: str | None = None) -> list[DocScore]:
    """One `DocScore` per (name, text); empty documents are left out (they have no token to score)."""
    if tok.eot_id is None:
        raise UserError(f"the {tok.kind} tokenizer has no <|endoftext|>, which conditions each document's first "
                        "token", fix="evaluate a model whose tokenizer has it (every trained scratchlm tokenizer does)")
    max_len = model.config.block_size
    if stride is not None and not 0 < stride <= max_len:
        raise UserError(f"--stride {stride} is outside 1..{max_len}", fix=f"use a stride up to the model's context "
                                                                          f"({max_len}; {max_len} = disjoint windows)")
    rows, owner, kept = [], [], []
    for name, text in docs:
        ids = tok.encode_ordinary(text)
        if not ids:
            continue
        doc_rows = rolling_rows(ids, tok.eot_id, max_len, stride)
        rows += doc_rows
        owner += [len(kept)] * len(doc_rows)
        kept.append(DocScore(name, 0.0, len(ids), len(text.encode("utf-8"))))
    for i, (logp, _) in zip(owner, score_tails(model, rows, batch_tokens=batch_tokens, progress=progress)):
        kept[i].nll -= logp
    return kept


def overall(scores: Sequence[DocScore]) -> dict[str, float]:
    """Bits per byte, token perplexity and the totals over documents."""
    nll, tokens, n_bytes = sum(s.nll for s in scores), sum(s.tokens for s in scores), sum(s.bytes for s in scores)
    return {"bits_per_byte": nll / math.log(2) / max(n_bytes, 1), "perplexity": math.exp(nll / max(tokens, 1)),
            "nll": nll, "tokens": tokens, "bytes": n_bytes, "documents": len(scores)}
