"""Tokenizing documents in parallel, in corpus order (pass 2 of `scratchlm data prepare`).

Documents are grouped into chunks of about `chunk_chars` characters. A BPE with the tiktoken engine
encodes each chunk with its threaded `encode_batch` (the engine releases the GIL); any other tokenizer
runs in `workers` processes, each rebuilding the tokenizer from its `to_dict()` (that works for every
kind, whatever their pickling support, and is sent once per worker). Results are consumed in
submission order, so the output is the same whatever the number of workers. Documents are encoded
with `encode_ordinary`: a literal "<|endoftext|>" inside a document is ordinary text. A document the
tokenizer fails on is named in a one-line `UserError`.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from scratchlm.data.sources import Document
from scratchlm.errors import UserError
from scratchlm.tokenizer.base import Tokenizer, tokenizer_from_dict
from scratchlm.tokenizer.bpe import BPETokenizer

# Encoding chunks hold at most this many characters (smaller when the corpus is small, so every
# worker gets several chunks); a few chunks per worker are in flight at once.
CHUNK_CHARS = 1 << 20
IN_FLIGHT_PER_WORKER = 2


def chunk_chars(total_chars: int, workers: int) -> int:
    """The characters per chunk for `total_chars` of text shared among `workers`: about four chunks
    per worker, at most `CHUNK_CHARS`."""
    return max(1, min(CHUNK_CHARS, total_chars // (4 * workers) + 1))


# A pool worker's own tokenizer, rebuilt once from the parent's `to_dict()` (`_init_worker`).
_worker_tok: Tokenizer | None = None


def _init_worker(tok_dict: dict[str, Any]) -> None:
    global _worker_tok
    _worker_tok = tokenizer_from_dict(tok_dict)


def _encode_texts(tok: Tokenizer, texts: list[str]) -> list[np.ndarray] | tuple[int, str]:
    """Encode each text to an int64 array (len_i,), or return (index, message) of the first failure."""
    out = []
    for i, text in enumerate(texts):
        try:
            out.append(np.asarray(tok.encode_ordinary(text), dtype=np.int64))
        except Exception as e:  # any failure: reported by the parent, naming the document
            return i, f"{type(e).__name__}: {e}"
    return out


def _worker_encode(texts: list[str]) -> list[np.ndarray] | tuple[int, str]:
    assert _worker_tok is not None
    return _encode_texts(_worker_tok, texts)


def _batch_encoder(tok: Tokenizer, workers: int):
    """A function texts -> per-text arrays for the threaded BPE path, or None if it does not apply."""
    if not (isinstance(tok, BPETokenizer) and tok._fast_ok()):
        return None

    def encode(texts: list[str]) -> list[np.ndarray] | tuple[int, str]:
        try:
            return [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(texts, num_threads=workers)]
        except Exception:  # find and name the failing document one by one
            return _encode_texts(tok, texts)

    return encode


def _chunks(docs: Iterator[tuple[Document, int]], chunk_chars: int) -> Iterator[tuple[list[Document], list[int]]]:
    """Group (document, label) pairs into chunks of about `chunk_chars` characters."""
    batch: list[Document] = []
    labels: list[int] = []
    size = 0
    for doc, label in docs:
        batch.append(doc)
        labels.append(label)
        size += len(doc.text)
        if size >= chunk_chars:
            yield batch, labels
            batch, labels, size = [], [], 0
    if batch:
        yield batch, labels


def encode_in_order(
    docs: Iterator[tuple[Document, int]], tok: Tokenizer, workers: int, chunk_chars: int
) -> Iterator[tuple[Document, int, np.ndarray]]:
    """Yield (document, label, ids) in input order, encoding chunks in parallel.

    At most `IN_FLIGHT_PER_WORKER * workers` chunks are pending, and results are taken from the
    front of the queue only, so order (and so the output) does not depend on `workers`.
    """

    def unpack(batch: list[Document], labels: list[int], result: Any) -> Iterator[tuple[Document, int, np.ndarray]]:
        if isinstance(result, tuple):
            i, msg = result
            msg = " ".join(msg.split())  # one line
            raise UserError(f"{batch[i].source}: cannot encode with the {tok.kind} tokenizer ({msg})")
        yield from zip(batch, labels, result)

    chunks = _chunks(docs, chunk_chars)
    fast = _batch_encoder(tok, workers)
    if fast is not None or workers <= 1:
        encode = fast or (lambda texts: _encode_texts(tok, texts))
        for batch, labels in chunks:
            yield from unpack(batch, labels, encode([d.text for d in batch]))
        return

    # fork where the platform allows it (Linux): workers start at once and need no importable
    # __main__ (spawn re-runs the caller's script, which fails from stdin or without a main guard).
    # The children only run the tokenizer's pure-Python code, so threads in the parent are harmless.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.to_dict(),)) as pool:
        pending: deque = deque()
        for batch, labels in chunks:
            pending.append((batch, labels, pool.apply_async(_worker_encode, ([d.text for d in batch],))))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                b, lab, res = pending.popleft()
                yield from unpack(b, lab, res.get())
        while pending:
            b, lab, res = pending.popleft()
            yield from unpack(b, lab, res.get())
