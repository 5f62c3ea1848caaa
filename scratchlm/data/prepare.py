"""`scratchlm data prepare`: documents in, filtered, deduplicated, tokenized shards out.

Pipeline (two passes over the inputs, so memory stays bounded by a few chunks of text rather
than by the corpus):

1. Scan: read every document (`sources.iter_documents`), apply the filters (filters.py), remember
   one label per document (dropped / train / val) and a 16-byte hash of each kept one. Filters, in
   order, each document counted by the first that drops it:
   - `duplicate`: the exact text was seen before (blake2b hash), when `data.dedup`;
   - `too_short`: fewer than `data.min_chars` characters once surrounding whitespace is stripped;
   - `repeated_lines`: the fraction of non-empty lines (compared stripped) that repeat an
     earlier line of the same document is above `data.max_repeated_line_ratio` (boilerplate,
     navigation menus, spam).
2. Split by documents: a permutation of the kept documents seeded by `data.seed` picks
   `round(val_fraction * n)` of them for validation (at least 1 when `val_fraction > 0` and
   n >= 2, at most n - 1). Inside each split documents keep their corpus order.
   Special case, ONE document (tinyshakespeare, nanoGPT's shakespeare_char): its token stream
   is cut instead; the first `int(n_tokens * (1 - val_fraction))` tokens train, the rest
   validate, exactly nanoGPT's `data[:int(n*0.9)]` convention. The manifest says
   `"split": {"by": "tokens"}` then, and both splits report that one document.
3. Encode (encode.py): the kept documents again, in chunks, in corpus order. A BPE with the
   tiktoken engine encodes each chunk with its threaded `encode_batch` (the engine releases the
   GIL); any other tokenizer runs in `data.workers` processes (0 = one per core), each rebuilding
   the tokenizer from its `to_dict()`. Results are consumed in submission order, so the shards
   are the same bytes whatever the number of workers.
   Documents are encoded with `encode_ordinary`: a literal "<|endoftext|>" inside a document
   is ordinary text, never a separator.
4. Separator: the end-of-text id goes BEFORE each document (GPT-2's convention), so every
   split's stream starts with it and a prompt made of that one token asks for a fresh
   document. A tokenizer without `<|endoftext|>` (a char tokenizer without specials) gets no
   separator; the manifest says `"separator": "none"` and `"eot_id": null`.
5. Write (shards.py): raw little-endian token arrays (`np.memmap`-able, no header), uint16 when
   vocab_size <= 65535 else uint32, at most `data.shard_tokens` tokens per file, named
   `train_000000.bin`, `val_000000.bin`, ...; beside them `config.json`, `tokenizer.json`
   and, last, `manifest.json` (format below). The folder is built under a temporary name and
   swapped in only when complete (`io.atomic_dir`), so an interrupted run leaves nothing that
   loads, and an existing folder is replaced only by a whole new one.

Fingerprint: the manifest records what the shards were made from, so prepared data is never
silently reused for other inputs or settings (`check_prepared`): `inputs` is a blake2b over
the hashes of every document read, in order (content, not paths or times: a moved or touched
file is the same data), and `data` the settings that change the tokens (every `data.*` field
but `workers`, which does not). The tokenizer's own fingerprint sits under `tokenizer`.

Manifest (format "scratchlm.shards", version 1)::

    {"format": "scratchlm.shards", "version": 1,
     "tokenizer": {"kind": "bpe", "vocab_size": 2048, "fingerprint": "3f0c..."},
     "dtype": "uint16", "eot_id": 2042, "separator": "eot_before_document",
     "inputs": ["kjv"], "fingerprint": {"inputs": "9d1e...", "data": {"jsonl_field": "text", ...}},
     "split": {"by": "documents", "val_fraction": 0.05, "seed": 1337},
     "filters": {"dedup": true, "min_chars": 16, "max_repeated_line_ratio": 0.5},
     "filtered": {"duplicate": 0, "too_short": 0, "repeated_lines": 0},
     "documents": {"read": 1189, "kept": 1189, "train": 1130, "val": 59},
     "tokens": {"train": 1000000, "val": 50000},
     "splits": {"train": {"tokens": 1000000, "documents": 1130, "shards": [
                   {"file": "train_000000.bin", "tokens": 1000000, "bytes": 2000000, "sha256": "..."}]},
                "val": {...}}}

Left out: near-duplicate detection (MinHash), language identification, model-based quality
scores, and sequence packing with per-document attention masks; documents are simply
concatenated with the separator between them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from scratchlm.config import Config, DataConfig, load_config
from scratchlm.data.encode import chunk_chars, encode_in_order
from scratchlm.data.filters import FILTERS, filter_reason, text_hash
from scratchlm.data.shards import ShardWriter, token_dtype
from scratchlm.data.sources import DEFAULT_CORPUS, Document, iter_documents
from scratchlm.errors import UserError
from scratchlm.io import atomic_dir, write_json
from scratchlm.tokenizer.base import Tokenizer

FORMAT = "scratchlm.shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")

# Per-document labels from the scan: dropped, or the split it goes to.
DROP, TRAIN, VAL = 0, 1, 2


def _check_settings(data: DataConfig) -> None:
    if not 0.0 <= data.val_fraction < 1.0:
        raise UserError(f"data.val_fraction={data.val_fraction} must be in [0, 1)",
                        fix="e.g. --data.val_fraction=0.05, or 0 for no validation split")
    if data.shard_tokens < 1:
        raise UserError(f"data.shard_tokens={data.shard_tokens} must be at least 1")
    if data.workers < 0:
        raise UserError(f"data.workers={data.workers} must be >= 0 (0 = one per core)")
    if data.min_chars < 0 or data.max_repeated_line_ratio < 0:
        raise UserError("data.min_chars and data.max_repeated_line_ratio must be >= 0")
    if data.seed < 0:
        raise UserError(f"data.seed={data.seed} must be >= 0")


def _describe_inputs(inputs: list[str] | None) -> str:
    return ", ".join(inputs) if inputs else DEFAULT_CORPUS


def _check_out_dir(out_dir: Path) -> None:
    # atomic_dir replaces whatever is at out_dir: only ever replace an earlier prepare's output.
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder", fix="choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").exists():
        raise UserError(
            f"{out_dir}: refusing to replace a non-empty folder that is not prepared data (no manifest.json)",
            fix="choose a new --out folder",
        )


def data_settings(data: DataConfig) -> dict[str, Any]:
    """The `data.*` settings that change the shards' contents (all but `workers`)."""
    return {k: v for k, v in dataclasses.asdict(data).items() if k != "workers"}


def inputs_fingerprint(inputs: list[str] | None, jsonl_field: str) -> str:
    """blake2b over the hashes of every document of `inputs`, in order (what `prepare` records)."""
    h = hashlib.blake2b(digest_size=16)
    for doc in iter_documents(inputs, jsonl_field):
        h.update(text_hash(doc.text))
    return h.hexdigest()


def check_prepared(data_dir: Path, cfg: Config, inputs: list[str] | None, *, check_inputs: bool = True) -> None:
    """Refuse prepared data made with other tokenizer or data settings than `cfg`'s, or (when
    `check_inputs`) from other inputs; the message names the first difference."""
    fix = "pass the same inputs and settings, or start a new run (another --out, or --overwrite)"
    mpath = data_dir / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath}: corrupt manifest ({e})", fix=fix) from None
    if not isinstance(manifest, dict):
        raise UserError(f"{mpath}: not a scratchlm shard manifest", fix=fix)
    made_with = load_config(data_dir / "config.json")
    wanted = {**{f"tokenizer.{k}": v for k, v in dataclasses.asdict(cfg.tokenizer).items()},
              **{f"data.{k}": v for k, v in data_settings(cfg.data).items()}}
    had = {**{f"tokenizer.{k}": v for k, v in dataclasses.asdict(made_with.tokenizer).items()},
           **{f"data.{k}": v for k, v in manifest.get("fingerprint", {}).get("data", {}).items()}}
    for key, value in wanted.items():
        if had.get(key) != value:
            raise UserError(f"{data_dir}: prepared with {key}={had.get(key)!r}, but this run has {value!r}", fix=fix)
    if check_inputs:
        recorded = manifest.get("fingerprint", {}).get("inputs")
        if recorded != inputs_fingerprint(inputs, cfg.data.jsonl_field):
            raise UserError(f"{data_dir}: prepared from other inputs ({', '.join(manifest['inputs'])}) than "
                            f"{_describe_inputs(inputs)}", fix=fix)


def split_documents(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask (n,): True for the documents held out for validation."""
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    is_val = np.zeros(n, dtype=bool)
    perm = np.random.default_rng(seed).permutation(n)
    is_val[perm[:n_val]] = True
    return is_val


def prepare(
    inputs: list[str] | None, tokenizer: Tokenizer, cfg: Config, out_dir: Path, progress: bool = True
) -> dict[str, Any]:
    """Filter, split, tokenize and shard the documents of `inputs` into `out_dir`; return the manifest."""
    data = cfg.data
    _check_settings(data)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    where = _describe_inputs(inputs)
    workers = data.workers or os.cpu_count() or 1
    vocab_size = tokenizer.vocab_size
    dtype = token_dtype(vocab_size)
    eot = tokenizer.eot_id

    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr)  # stdout is the CLI's JSON summary

    # -- pass 1: filter ------------------------------------------------------------------------
    labels = bytearray()  # one per document read: DROP, or TRAIN until the split decides
    fingerprint = hashlib.blake2b(digest_size=16)  # of every document read (see `inputs_fingerprint`)
    kept_hashes: list[bytes] = []  # (kept,) to check that pass 2 reads the same documents
    filtered = dict.fromkeys(FILTERS, 0)
    seen: set[bytes] = set()
    kept_chars = 0
    for doc in tqdm(iter_documents(inputs, data.jsonl_field), desc="scan", unit="doc", disable=not progress,
                    leave=False):
        h = text_hash(doc.text)
        fingerprint.update(h)
        reason = filter_reason(doc.text, h, seen, data)
        if reason is None:
            labels.append(TRAIN)
            kept_hashes.append(h)
            kept_chars += len(doc.text)
        else:
            labels.append(DROP)
            filtered[reason] += 1
    del seen
    n_read, n_kept = len(labels), len(kept_hashes)
    log(f"read {n_read:,} document{'s' * (n_read != 1)} from {where}; filtered out "
        + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in filtered.items()) + f"; kept {n_kept:,}")
    if n_kept == 0:
        worst = max(filtered, key=filtered.get)
        fixes = {"duplicate": "--data.dedup=false", "too_short": "a lower --data.min_chars",
                 "repeated_lines": "a higher --data.max_repeated_line_ratio"}
        raise UserError(
            f"{where}: no documents left after filtering: all {n_read:,} removed "
            f"({', '.join(f'{k}: {v}' for k, v in filtered.items())})",
            fix=f"most by {worst}; try {fixes[worst]}",
        )

    # -- split -----------------------------------------------------------------------------------
    by_tokens = n_kept == 1
    if not by_tokens:
        is_val = split_documents(n_kept, data.val_fraction, data.seed)
        kept_positions = [i for i, lab in enumerate(labels) if lab != DROP]
        for pos, v in zip(kept_positions, is_val):
            labels[pos] = VAL if v else TRAIN

    # -- pass 2: encode and write -----------------------------------------------------------------
    def kept_docs() -> Iterator[tuple[Document, int]]:
        k = 0
        for i, doc in enumerate(iter_documents(inputs, data.jsonl_field)):
            if i >= n_read:
                break
            if labels[i] == DROP:
                continue
            if text_hash(doc.text) != kept_hashes[k]:
                raise UserError(f"{doc.source}: changed while being prepared", fix="re-run when the inputs are stable")
            k += 1
            yield doc, labels[i]
        if k != n_kept:
            raise UserError(f"{where}: inputs changed while being prepared", fix="re-run when the inputs are stable")

    if by_tokens:
        workers = 1  # one document: nothing to share out
    sep = np.array([eot] if eot is not None else [], dtype=np.int64)

    with atomic_dir(out_dir) as tmp:
        writers = {s: ShardWriter(tmp, s, dtype, data.shard_tokens) for s in SPLITS}
        bar = tqdm(total=n_kept, desc="tokenize", unit="doc", disable=not progress, leave=False)
        for doc, label, ids in encode_in_order(kept_docs(), tokenizer, workers, chunk_chars(kept_chars, workers)):
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise UserError(f"{doc.source}: the tokenizer produced an id outside 0..{vocab_size - 1}",
                                fix="the tokenizer file is corrupt; re-train it")
            stream = np.concatenate([sep, ids])
            if by_tokens:
                # nanoGPT's convention: the first int(n * (1 - f)) tokens train, the rest validate.
                cut = int(len(stream) * (1.0 - data.val_fraction))
                writers["train"].write(stream[:cut])
                writers["val"].write(stream[cut:])
                for w in writers.values():
                    w.documents += 1 if w.tokens else 0
            else:
                w = writers["val" if label == VAL else "train"]
                w.write(stream)
                w.documents += 1
            bar.update(1)
        bar.close()
        splits = {s: w.close() for s, w in writers.items()}

        if splits["train"]["tokens"] == 0:
            raise UserError(f"{where}: the train split is empty ({n_kept} document(s), "
                            f"{splits['val']['tokens']} tokens in val)", fix="add text or lower --data.val_fraction")
        if data.val_fraction > 0 and splits["val"]["tokens"] == 0:
            raise UserError(
                f"{where}: the val split would be empty (data.val_fraction={data.val_fraction} of "
                f"{splits['train']['tokens']:,} tokens in {n_kept} document(s) rounds to nothing)",
                fix="raise --data.val_fraction, add documents, or set --data.val_fraction=0 for no validation",
            )

        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": vocab_size, "fingerprint": tokenizer.fingerprint()},
            "dtype": dtype.name,
            "eot_id": eot,
            "separator": "eot_before_document" if eot is not None else "none",
            "inputs": list(inputs) if inputs else [DEFAULT_CORPUS],
            "fingerprint": {"inputs": fingerprint.hexdigest(), "data": data_settings(data)},
            "split": {"by": "tokens" if by_tokens else "documents", "val_fraction": data.val_fraction,
                      "seed": data.seed},
            "filters": {"dedup": data.dedup, "min_chars": data.min_chars,
                        "max_repeated_line_ratio": data.max_repeated_line_ratio},
            "filtered": filtered,
            "documents": {"read": n_read, "kept": n_kept,
                          **{s: splits[s]["documents"] for s in SPLITS}},
            "tokens": {s: splits[s]["tokens"] for s in SPLITS},
            "splits": splits,
        }
        cfg.save(tmp / "config.json")
        tokenizer.save(tmp / "tokenizer.json")
        write_json(tmp / "manifest.json", manifest)  # last: its presence means the folder is whole
    log(f"wrote {manifest['tokens']['train']:,} train + {manifest['tokens']['val']:,} val tokens "
        f"({dtype.name}) -> {out_dir}")
    return manifest
