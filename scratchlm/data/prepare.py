"""`scratchlm data prepare`: documents in, filtered, deduplicated, tokenized shards out.

Pipeline (two passes over the inputs, so memory stays bounded by a few chunks of text plus a
fixed-size record per document, rather than by the corpus):

1. Scan (`scan`): read every document (`sources.iter_document_slots`: JSONL streams line by line),
   scrub PII when `data.scrub_pii`, and judge it: `duplicate` when its exact-dedup key (the
   normalised or raw text's hash, dedup.py) was seen before, else the first per-document rule
   that drops it (filters.py: too_short, repeated_lines, the Gopher/C4-style rules). Kept per
   document: its index, raw-text hash, dedup key, verdict, length, and for documents that pass
   a MinHash signature (dedup.py).
2. Decide (`decide`): exact duplicates by first occurrence of each key over the whole input, then
   near duplicates (MinHash + LSH + union-find) among the documents every other rule kept; each
   near-duplicate cluster keeps its first document. Each dropped document is counted under the
   first rule that drops it (filters.py lists them in order).
3. Split by documents: a permutation of the kept documents seeded by `data.seed` picks
   `round(val_fraction * n)` of them for validation (at least 1 when `val_fraction > 0` and
   n >= 2, at most n - 1). Inside each split documents keep their corpus order.
   Special case, ONE document (tinyshakespeare, nanoGPT's shakespeare_char): its token stream
   is cut instead; the first `int(n_tokens * (1 - val_fraction))` tokens train, the rest
   validate, exactly nanoGPT's `data[:int(n*0.9)]` convention. The manifest says
   `"split": {"by": "tokens"}` then, and both splits report that one document.
4. Encode (encode.py): the kept documents again, in chunks, in corpus order. A BPE with the
   tiktoken engine encodes each chunk with its threaded `encode_batch` (the engine releases the
   GIL); any other tokenizer runs in `data.workers` processes (0 = one per core), each rebuilding
   the tokenizer from its `to_dict()`. Results are consumed in submission order, so the shards
   are the same bytes whatever the number of workers.
   Documents are encoded with `encode_ordinary`: a literal "<|endoftext|>" inside a document
   is ordinary text, never a separator.
5. Separator: the end-of-text id goes BEFORE each document (GPT-2's convention), so every
   split's stream starts with it and a prompt made of that one token asks for a fresh
   document. A tokenizer without `<|endoftext|>` (a char tokenizer without specials) gets no
   separator; the manifest says `"separator": "none"` and `"eot_id": null`.
6. Write (shards.py): raw little-endian token arrays (`np.memmap`-able, no header), uint16 when
   vocab_size <= 65535 else uint32, at most `data.shard_tokens` tokens per file, named
   `train_000000.bin`, `val_000000.bin`, ...; beside them `config.json`, `tokenizer.json`
   and, last, `manifest.json` (format below). The folder is built under a temporary name and
   swapped in only when complete (`io.atomic_dir`), so an interrupted run leaves nothing that
   loads, and an existing folder is replaced only by a whole new one.

Sharded runs (parts.py) run steps 1 and 4 per slice of the inputs and steps 2, 3, 5 and 6 once
over all slices, with the same functions, so their output is the single run's, byte for byte.

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
     "filters": {"rules": ["duplicate", "too_short", ..., "near_duplicate"],
                 "lsh": {"bands": 9, "rows": 13, "approx_threshold": 0.845}},
     "filtered": {"duplicate": 0, "too_short": 0, ..., "near_duplicate": 0},
     "documents": {"read": 1189, "kept": 1189, "train": 1130, "val": 59},
     "tokens": {"train": 1000000, "val": 50000},
     "splits": {"train": {"tokens": 1000000, "documents": 1130, "shards": [
                   {"file": "train_000000.bin", "tokens": 1000000, "bytes": 2000000, "sha256": "..."}]},
                "val": {...}}}

`filtered` lists the rules that are on, each with the documents it dropped; with
`data.scrub_pii` a `"pii": {"email": n, "ipv4": n}` entry counts the replacements.

Left out: language identification by a model, model-based quality scores, and sequence packing
with per-document attention masks; documents are simply concatenated with the separator between
them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from scratchlm.config import Config, DataConfig, load_config
from scratchlm.data.dedup import MinHasher, approx_threshold, dedup_key, lsh_params, near_duplicates, normalize
from scratchlm.data.encode import chunk_chars, encode_in_order
from scratchlm.data.filters import RULES, active_rules, document_rule, scrub_pii, text_hash
from scratchlm.data.shards import ShardWriter, token_dtype
from scratchlm.data.sources import DEFAULT_CORPUS, Document, iter_document_slots, iter_documents
from scratchlm.errors import UserError
from scratchlm.io import atomic_dir, write_json
from scratchlm.tokenizer.base import Tokenizer

FORMAT = "scratchlm.shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")

# Per-document verdicts: KEEP, or 1 + the index in RULES of the rule that drops it.
KEEP = 0
CODE = {rule: i + 1 for i, rule in enumerate(RULES)}
# Labels of the kept documents once split.
TRAIN, VAL = 1, 2
SIGNATURE_BATCH = 1024  # documents per MinHash batch in the scan
# What to try when no document is left, by the rule that removed the most.
FIXES = {
    "duplicate": "--data.dedup=false", "too_short": "a lower --data.min_chars",
    "repeated_lines": "a higher --data.max_repeated_line_ratio", "word_count": "other --data.min_words/max_words",
    "mean_word_length": "other --data.min_mean_word_length/max_mean_word_length",
    "symbol_ratio": "a higher --data.max_symbol_word_ratio", "bullet_lines": "a higher --data.max_bullet_line_ratio",
    "ellipsis_lines": "a higher --data.max_ellipsis_line_ratio",
    "alpha_words": "a lower --data.min_alpha_word_fraction", "stop_words": "--data.min_stop_words=0",
    "script": "another --data.script, or --data.script=any", "top_ngram": "a higher --data.max_top_ngram_fraction",
    "dup_ngram": "a higher --data.max_dup_ngram_fraction", "near_duplicate": "--data.near_dedup=false",
}


def check_settings(data: DataConfig) -> None:
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
    if data.near_dedup_bands > data.near_dedup_perms:
        raise UserError(f"data.near_dedup_bands={data.near_dedup_bands} must be at most "
                        f"data.near_dedup_perms={data.near_dedup_perms}", fix="fewer bands, or 0 to choose them")


def describe_inputs(inputs: list[str] | None) -> str:
    return ", ".join(inputs) if inputs else DEFAULT_CORPUS


def check_out_dir(out_dir: Path, marker: str = "manifest.json") -> None:
    """atomic_dir replaces whatever is at out_dir: only ever replace an earlier prepare's output
    (a folder holding `marker`)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder", fix="choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / marker).exists():
        raise UserError(
            f"{out_dir}: refusing to replace a non-empty folder that is not prepared data (no {marker})",
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
                            f"{describe_inputs(inputs)}", fix=fix)


def inputs_digest(s: Scan) -> str:
    """The manifest's `fingerprint.inputs`: blake2b over the raw-text hash of every document, in order."""
    return hashlib.blake2b(s.text_hash.tobytes(), digest_size=16).hexdigest()


def split_documents(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask (n,): True for the documents held out for validation."""
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    is_val = np.zeros(n, dtype=bool)
    perm = np.random.default_rng(seed).permutation(n)
    is_val[perm[:n_val]] = True
    return is_val


def minhasher(data: DataConfig) -> MinHasher:
    return MinHasher(data.near_dedup_perms, data.near_dedup_ngram, data.near_dedup_unit)


def clean_text(text: str, data: DataConfig) -> str:
    """The text the rules judge and the tokenizer encodes: PII scrubbed when `data.scrub_pii`."""
    return scrub_pii(text)[0] if data.scrub_pii else text


# ----------------------------------------------------------------------------------------------
# 1. scan


@dataclass
class Scan:
    """What the scan keeps of each document it read (n of them: all, or one part's), in input order."""

    total: int  # documents in the inputs (every part's)
    index: np.ndarray  # (n,) int64: each document's position in the inputs
    text_hash: np.ndarray  # (n, 16) uint8: hash of the raw text (the inputs fingerprint; the re-read check)
    key: np.ndarray  # (n, 16) uint8: exact-dedup key
    code: np.ndarray  # (n,) uint8: KEEP, or CODE[rule] (`duplicate` only for repeats within this scan)
    chars: np.ndarray  # (n,) int64: characters of the text to encode
    signatures: np.ndarray  # (passed, perms) uint32: MinHash of each document whose code is KEEP, in order
    pii: dict[str, int]  # replacements made by the scrubber

    @staticmethod
    def concat(scans: list[Scan]) -> Scan:
        """The scans of the parts of one input as one, in input order."""
        fields = ("index", "text_hash", "key", "code", "chars")
        cat = {f: np.concatenate([getattr(s, f) for s in scans]) for f in fields}
        rows, start = [], 0  # each document's row in the concatenated signatures, -1 when it has none
        for s in scans:
            r = np.full(len(s.code), -1, dtype=np.int64)
            passed = s.code == KEEP
            r[passed] = start + np.arange(int(passed.sum()))
            rows.append(r)
            start += int(passed.sum())
        order = np.argsort(cat["index"], kind="stable")
        row = np.concatenate(rows)[order]
        sigs = np.concatenate([s.signatures for s in scans])  # (0, 0) without near-dedup
        return Scan(total=scans[0].total, **{f: v[order] for f, v in cat.items()},
                    signatures=sigs[row[row >= 0]] if len(sigs) else sigs,
                    pii={k: sum(s.pii.get(k, 0) for s in scans) for k in scans[0].pii})


def scan(inputs: list[str] | None, data: DataConfig, part: tuple[int, int] | None = None,
         progress: bool = True) -> Scan:
    """Read the documents of `inputs` (those of `part` (k, n) only, when given) and judge each on its own."""
    rules = active_rules(data)
    hasher = minhasher(data) if data.near_dedup else None
    perms = data.near_dedup_perms if hasher else 0
    seen: set[bytes] = set()
    index = array("q")  # 8 bytes a document, not a Python int's 36
    hashes, keys = bytearray(), bytearray()
    codes = bytearray()
    chars = array("q")
    pii = {"email": 0, "ipv4": 0} if data.scrub_pii else {}
    pending: list[np.ndarray] = []  # shingles of passed documents awaiting their signatures
    sigs: list[np.ndarray] = []
    # the normalised text serves normalised dedup, shingles and the word n-gram rules
    need_norm = (data.dedup and data.dedup_normalize) or hasher is not None or bool(
        set(rules) & {"stop_words", "top_ngram", "dup_ngram"})
    total = 0
    for i, doc in enumerate(tqdm(iter_document_slots(inputs, data.jsonl_field, part), desc="scan", unit="doc",
                                 disable=not progress, leave=False)):
        total = i + 1
        if doc is None:
            continue
        raw_hash = text_hash(doc.text)
        text = doc.text
        if data.scrub_pii:
            text, emails, ips = scrub_pii(text)
            pii["email"] += emails
            pii["ipv4"] += ips
        norm = normalize(text) if need_norm else None
        key = dedup_key(norm if data.dedup_normalize else text) if data.dedup else raw_hash
        if data.dedup and key in seen:
            code = CODE["duplicate"]
        else:
            seen.add(key)
            rule = document_rule(text, data, rules, norm)
            code = KEEP if rule is None else CODE[rule]
        if code == KEEP and hasher is not None:
            pending.append(hasher.shingles(norm))
            if len(pending) >= SIGNATURE_BATCH:
                sigs.append(hasher.signatures_of(pending))
                pending = []
        index.append(i)
        hashes += raw_hash
        keys += key
        codes.append(code)
        chars.append(len(text))
    if pending:
        sigs.append(hasher.signatures_of(pending))
    n = len(index)
    return Scan(
        total=total,
        index=np.frombuffer(index, dtype=np.int64).copy() if index else np.zeros(0, dtype=np.int64),
        text_hash=np.frombuffer(bytes(hashes), dtype=np.uint8).reshape(n, 16),
        key=np.frombuffer(bytes(keys), dtype=np.uint8).reshape(n, 16),
        code=np.frombuffer(bytes(codes), dtype=np.uint8).copy(),
        chars=np.frombuffer(chars, dtype=np.int64).copy() if chars else np.zeros(0, dtype=np.int64),
        signatures=np.concatenate(sigs) if sigs else np.zeros((0, perms), dtype=np.uint32),
        pii=pii,
    )


# ----------------------------------------------------------------------------------------------
# 2. decide, 3. split


def decide(s: Scan, data: DataConfig) -> tuple[np.ndarray, dict[str, int]]:
    """Final verdicts (n,) uint8 over a whole input's scan, and the count dropped by each rule that is on."""
    codes = s.code.copy()
    if data.dedup and len(codes):
        _, first = np.unique(s.key.view(np.dtype((np.void, 16))).ravel(), return_index=True)
        repeat = np.ones(len(codes), dtype=bool)
        repeat[first] = False  # np.unique's return_index gives each key's first occurrence
        codes[repeat] = CODE["duplicate"]
    if data.near_dedup:
        rows = np.cumsum(s.code == KEEP) - 1  # each scan-passed document's signature row
        survivors = np.flatnonzero(codes == KEEP)
        drop = near_duplicates(s.signatures[rows[survivors]], data.near_dedup_threshold, data.near_dedup_bands,
                               data.near_dedup_verify)
        codes[survivors[drop]] = CODE["near_duplicate"]
    return codes, {rule: int((codes == CODE[rule]).sum()) for rule in active_rules(data)}


def split_labels(codes: np.ndarray, data: DataConfig, where: str) -> tuple[np.ndarray, bool]:
    """Labels (n,) uint8 from final verdicts: 0 for dropped documents, TRAIN or VAL for kept ones; and
    whether the one kept document is split by tokens. Refuses an input with nothing left, naming the
    rule that removed the most."""
    filtered = {r: int((codes == CODE[r]).sum()) for r in RULES if (codes == CODE[r]).any()}
    kept = np.flatnonzero(codes == KEEP)
    if len(kept) == 0:
        worst = max(filtered, key=filtered.get)
        raise UserError(
            f"{where}: no documents left after filtering: all {len(codes):,} removed "
            f"({', '.join(f'{k}: {v}' for k, v in filtered.items())})",
            fix=f"most by {worst}; try {FIXES[worst]}",
        )
    labels = np.zeros(len(codes), dtype=np.uint8)
    by_tokens = len(kept) == 1
    labels[kept] = TRAIN
    if not by_tokens:
        labels[kept[split_documents(len(kept), data.val_fraction, data.seed)]] = VAL
    return labels, by_tokens


# ----------------------------------------------------------------------------------------------
# 4.-6. encode and write


def encoded(docs: Iterator[tuple[Document, int]], tokenizer: Tokenizer, workers: int,
            chunk: int) -> Iterator[tuple[Document, int, np.ndarray]]:
    """`encode_in_order`, with every id checked against the vocabulary."""
    vocab_size = tokenizer.vocab_size
    for doc, label, ids in encode_in_order(docs, tokenizer, workers, chunk):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise UserError(f"{doc.source}: the tokenizer produced an id outside 0..{vocab_size - 1}",
                            fix="the tokenizer file is corrupt; re-train it")
        yield doc, label, ids


def write_prepared(out_dir: Path, stream: Iterator[tuple[int, np.ndarray]], *, tokenizer: Tokenizer, cfg: Config,
                   inputs: list[str], fingerprint: str, filtered: dict[str, int], n_read: int, n_kept: int,
                   by_tokens: bool, pii: dict[str, int], where: str, progress: bool) -> dict[str, Any]:
    """Write the (label, ids) of the kept documents, in input order, as shards + manifest in `out_dir`."""
    data = cfg.data
    dtype = token_dtype(tokenizer.vocab_size)
    eot = tokenizer.eot_id
    sep = np.array([eot] if eot is not None else [], dtype=np.int64)
    with atomic_dir(out_dir) as tmp:
        writers = {s: ShardWriter(tmp, s, dtype, data.shard_tokens) for s in SPLITS}
        bar = tqdm(total=n_kept, desc="tokenize", unit="doc", disable=not progress, leave=False)
        for label, ids in stream:
            tokens = np.concatenate([sep, ids])
            if by_tokens:
                # nanoGPT's convention: the first int(n * (1 - f)) tokens train, the rest validate.
                cut = int(len(tokens) * (1.0 - data.val_fraction))
                writers["train"].write(tokens[:cut])
                writers["val"].write(tokens[cut:])
                for w in writers.values():
                    w.documents += 1 if w.tokens else 0
            else:
                w = writers["val" if label == VAL else "train"]
                w.write(tokens)
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
        filters: dict[str, Any] = {"rules": list(active_rules(data))}
        if data.near_dedup:
            b, r = lsh_params(data.near_dedup_threshold, data.near_dedup_perms, data.near_dedup_bands)
            filters["lsh"] = {"bands": b, "rows": r, "approx_threshold": round(approx_threshold(b, r), 4)}
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                          "fingerprint": tokenizer.fingerprint()},
            "dtype": dtype.name,
            "eot_id": eot,
            "separator": "eot_before_document" if eot is not None else "none",
            "inputs": inputs,
            "fingerprint": {"inputs": fingerprint, "data": data_settings(data)},
            "split": {"by": "tokens" if by_tokens else "documents", "val_fraction": data.val_fraction,
                      "seed": data.seed},
            "filters": filters,
            "filtered": filtered,
            **({"pii": pii} if data.scrub_pii else {}),
            "documents": {"read": n_read, "kept": n_kept, **{s: splits[s]["documents"] for s in SPLITS}},
            "tokens": {s: splits[s]["tokens"] for s in SPLITS},
            "splits": splits,
        }
        cfg.save(tmp / "config.json")
        tokenizer.save(tmp / "tokenizer.json")
        write_json(tmp / "manifest.json", manifest)  # last: its presence means the folder is whole
    return manifest


def filter_summary(n_read: int, where: str, filtered: dict[str, int], n_kept: int) -> str:
    return (f"read {n_read:,} document{'s' * (n_read != 1)} from {where}; filtered out "
            + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in filtered.items()) + f"; kept {n_kept:,}")


def prepare(
    inputs: list[str] | None, tokenizer: Tokenizer, cfg: Config, out_dir: Path, progress: bool = True
) -> dict[str, Any]:
    """Filter, split, tokenize and shard the documents of `inputs` into `out_dir`; return the manifest."""
    data = cfg.data
    check_settings(data)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    where = describe_inputs(inputs)
    workers = data.workers or os.cpu_count() or 1

    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr)  # stdout is the CLI's JSON summary

    s = scan(inputs, data, None, progress)
    codes, filtered = decide(s, data)
    n_read, n_kept = s.total, int((codes == KEEP).sum())
    log(filter_summary(n_read, where, filtered, n_kept))
    labels, by_tokens = split_labels(codes, data, where)

    def kept_docs() -> Iterator[tuple[Document, int]]:
        fix = "re-run when the inputs are stable"
        read = 0
        for i, doc in enumerate(iter_documents(inputs, data.jsonl_field)):
            if i >= n_read:
                break
            read += 1
            if labels[i] == KEEP:
                continue
            if text_hash(doc.text) != s.text_hash[i].tobytes():
                raise UserError(f"{doc.source}: changed while being prepared", fix=fix)
            yield Document(clean_text(doc.text, data), doc.source), int(labels[i])
        if read != n_read:
            raise UserError(f"{where}: inputs changed while being prepared", fix=fix)

    if by_tokens:
        workers = 1  # one document: nothing to share out
    chunk = chunk_chars(int(s.chars[codes == KEEP].sum()), workers)
    stream = ((label, ids) for _, label, ids in encoded(kept_docs(), tokenizer, workers, chunk))
    manifest = write_prepared(out_dir, stream, tokenizer=tokenizer, cfg=cfg,
                              inputs=list(inputs) if inputs else [DEFAULT_CORPUS], fingerprint=inputs_digest(s),
                              filtered=filtered, n_read=n_read, n_kept=n_kept, by_tokens=by_tokens, pii=s.pii,
                              where=where, progress=progress)
    log(f"wrote {manifest['tokens']['train']:,} train + {manifest['tokens']['val']:,} val tokens "
        f"({manifest['dtype']}) -> {out_dir}")
    return manifest
