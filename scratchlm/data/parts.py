"""Sharded `scratchlm data prepare`: one slice of the inputs per job (`--part K/N`), then one `--merge`.

    scratchlm data prepare INPUTS --tokenizer T --part 0/4 --out parts/0     (any machine, any order)
    ...
    scratchlm data prepare INPUTS --tokenizer T --part 3/4 --out parts/3
    scratchlm data prepare --merge parts/0 parts/1 parts/2 parts/3 --out data

A part (`prepare_part`) takes the documents whose index i in the inputs has i % N == K (the others
are skipped without being parsed), runs the single run's scan on them (prepare.scan: PII scrub,
exact dedup within the part, the per-document rules, MinHash signatures) and tokenizes every
document that passed, since only the merge knows which survive dedup across parts. Part folder:

    part.json        format "scratchlm.part": part [K, N], inputs, documents, tokenizer, data settings
    docs.npz         one record per document of the part (index, text_hash, key, code, chars), and
                     offsets (passed + 1,) into tokens.bin
    signatures.npy   (passed, perms) uint32 MinHash signatures
    tokens.bin       the passed documents' tokens, concatenated (the shards' dtype, little-endian)
    tokenizer.json, config.json

The merge (`merge_parts`) checks that the folders are all N parts of one split of the same inputs,
made with the same tokenizer and the data settings the merge itself has (a one-line error naming
the part and the setting otherwise), puts the records back in input order (`Scan.concat`), and runs
the single run's own steps on them: `decide` (exact duplicates across parts by first occurrence,
near duplicates over all survivors), `split_labels` and `write_prepared`, reading each kept
document's tokens from its part. A document a part dropped as a repeat is dropped by the merge
too: its first copy comes earlier in the inputs. So the merged folder is, byte for byte, the one a
single `prepare` of the same inputs with the same settings writes.

Left out: merging parts made from different inputs (each part reads the same input list and
counts all of its documents), and parallel merges: the merge holds every document's record and
signature in memory, like a single run.
"""

from __future__ import annotations

import json
import os
import re
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scratchlm.config import Config
from scratchlm.data.encode import chunk_chars
from scratchlm.data.filters import text_hash
from scratchlm.data.prepare import (
    DEFAULT_CORPUS,
    KEEP,
    Scan,
    check_out_dir,
    check_settings,
    clean_text,
    data_settings,
    decide,
    describe_inputs,
    encoded,
    filter_summary,
    inputs_digest,
    scan,
    split_labels,
    write_prepared,
)
from scratchlm.data.shards import token_dtype
from scratchlm.data.sources import Document, iter_document_slots
from scratchlm.errors import UserError
from scratchlm.io import atomic_dir, write_json
from scratchlm.tokenizer.base import Tokenizer, load_tokenizer

PART_FORMAT = "scratchlm.part"
PART_VERSION = 1
RECORDS = ("index", "text_hash", "key", "code", "chars")


def parse_part(text: str) -> tuple[int, int]:
    """"K/N" -> (K, N) with 0 <= K < N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if m is None or not int(m[1]) < int(m[2]):
        raise UserError(f"--part {text}: must be K/N with 0 <= K < N (the K-th of N slices, counted from 0)",
                        fix="e.g. --part 0/4, then 1/4, 2/4 and 3/4")
    return int(m[1]), int(m[2])


def prepare_part(inputs: list[str] | None, tokenizer: Tokenizer, cfg: Config, out_dir: Path,
                 part: tuple[int, int], progress: bool = True) -> dict[str, Any]:
    """Scan and tokenize slice `part` (K, N) of `inputs` into the part folder `out_dir`; return its part.json."""
    data = cfg.data
    check_settings(data)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, "part.json")
    s = scan(inputs, data, part, progress)
    passed = s.code == KEEP
    workers = data.workers or os.cpu_count() or 1
    dtype = token_dtype(tokenizer.vocab_size).newbyteorder("<")

    def passed_docs() -> Iterator[tuple[Document, int]]:
        j = 0  # position among this part's documents
        for i, doc in enumerate(iter_document_slots(inputs, data.jsonl_field, part)):
            if doc is None:
                continue
            if j >= len(s.code) or s.index[j] != i or text_hash(doc.text) != s.text_hash[j].tobytes():
                raise UserError(f"{doc.source}: changed while being prepared", fix="re-run when the inputs are stable")
            if passed[j]:
                yield Document(clean_text(doc.text, data), doc.source), 0
            j += 1
        if j != len(s.code):
            raise UserError(f"{describe_inputs(inputs)}: inputs changed while being prepared",
                            fix="re-run when the inputs are stable")

    with atomic_dir(out_dir) as tmp:
        offsets = [0]
        with open(tmp / "tokens.bin", "wb") as f:
            chunk = chunk_chars(int(s.chars[passed].sum()), workers)
            for _, _, ids in encoded(passed_docs(), tokenizer, workers, chunk):
                f.write(ids.astype(dtype).tobytes())
                offsets.append(offsets[-1] + len(ids))
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / "docs.npz", "wb") as f:
            np.savez(f, offsets=np.array(offsets, dtype=np.int64), **{r: getattr(s, r) for r in RECORDS})
        with open(tmp / "signatures.npy", "wb") as f:
            np.save(f, s.signatures)
        manifest = {
            "format": PART_FORMAT,
            "version": PART_VERSION,
            "part": list(part),
            "inputs": list(inputs) if inputs else [DEFAULT_CORPUS],
            "documents": {"inputs": s.total, "read": len(s.code), "passed": int(passed.sum())},
            "tokens": offsets[-1],
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                          "fingerprint": tokenizer.fingerprint()},
            "dtype": dtype.name,
            "data": data_settings(data),
            "pii": s.pii,
        }
        cfg.save(tmp / "config.json")
        tokenizer.save(tmp / "tokenizer.json")
        write_json(tmp / "part.json", manifest)  # last: its presence means the folder is whole
    return manifest


@dataclass
class Part:
    dir: Path
    manifest: dict[str, Any]
    scan: Scan
    offsets: np.ndarray  # (passed + 1,) int64
    tokens: np.ndarray  # (tokens,) memory-mapped

    @property
    def name(self) -> str:
        k, n = self.manifest["part"]
        return f"{self.dir} (part {k}/{n})"


# part.json's keys that loading and merging read: dicts with the keys they must hold, or the value's type
_MANIFEST_KEYS: dict[str, tuple[str, ...] | type] = {
    "part": list, "inputs": list, "dtype": str, "tokens": int, "data": (),
    "documents": ("read", "passed", "inputs"), "tokenizer": ("fingerprint",),
}


def _bad_manifest_key(manifest: dict) -> str | None:
    """The first key of a part manifest that is missing or of the wrong kind, as "key" or "key.inner"."""
    for key, want in _MANIFEST_KEYS.items():
        value = manifest.get(key)
        if isinstance(want, type):
            if not isinstance(value, want) or isinstance(value, bool):
                return key
            continue
        if not isinstance(value, dict):
            return key
        for inner in want:
            if inner not in value:
                return f"{key}.{inner}"
    if len(manifest["part"]) != 2:
        return "part"
    return None


def load_part(path: Path) -> Part:
    make = f"make it with `scratchlm data prepare INPUTS --part K/N --out {path}`"
    if not path.is_dir():
        raise UserError(f"{path}: no such part folder", fix=make)
    try:
        manifest = json.loads((path / "part.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not a part folder (no part.json)", fix=make) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}/part.json: corrupt ({e})", fix=f"re-run that part ({make})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PART_FORMAT:
        raise UserError(f"{path}/part.json: not a scratchlm part manifest", fix=make)
    if manifest.get("version") != PART_VERSION:
        raise UserError(f"{path}: part format version {manifest.get('version')}, this scratchlm reads {PART_VERSION}",
                        fix=f"re-run that part ({make})")
    bad = _bad_manifest_key(manifest)
    if bad:
        raise UserError(f"{path}/part.json: corrupt (key {bad!r} missing or malformed)",
                        fix=f"re-run that part ({make})")
    try:
        with np.load(path / "docs.npz") as z:
            records = {r: z[r] for r in (*RECORDS, "offsets")}
        signatures = np.load(path / "signatures.npy")
        tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(manifest["dtype"]), mode="r") \
            if manifest["tokens"] else np.zeros(0, dtype=np.dtype(manifest["dtype"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: missing or corrupt part file ({' '.join(str(e).split())})",
                        fix=f"re-run that part ({make})") from None
    offsets = records.pop("offsets")
    n_read, n_passed = manifest["documents"]["read"], manifest["documents"]["passed"]
    n_signed = n_passed if manifest["data"].get("near_dedup") else 0
    if (len(records["code"]) != n_read or len(offsets) != n_passed + 1 or len(signatures) != n_signed
            or offsets[-1] != len(tokens)):
        raise UserError(f"{path}: part files disagree with part.json (truncated or mixed copies)",
                        fix=f"re-run that part ({make})")
    s = Scan(total=manifest["documents"]["inputs"], signatures=signatures, pii=manifest.get("pii", {}), **records)
    return Part(path, manifest, s, offsets, tokens)


def check_parts(parts: list[Part], cfg: Config, tokenizer: Tokenizer | None) -> None:
    """Refuse parts that are not all N parts of one split of the same inputs, made with one tokenizer
    (`tokenizer`, when given) and with `cfg`'s data settings."""
    first = parts[0]
    k0, n = first.manifest["part"]
    rerun = "re-run every part with the same inputs, --tokenizer and settings"
    for p in parts:
        m = p.manifest
        if m["part"][1] != n:
            raise UserError(f"{p.name}: not of the same split as {first.name}",
                            fix="merge the N parts of one --part K/N")
        if m["inputs"] != first.manifest["inputs"] or m["documents"]["inputs"] != first.manifest["documents"]["inputs"]:
            raise UserError(f"{p.name}: made from other inputs ({', '.join(m['inputs'])}: "
                            f"{m['documents']['inputs']:,} documents) than {first.name} "
                            f"({', '.join(first.manifest['inputs'])}: {first.manifest['documents']['inputs']:,})",
                            fix=rerun)
        fp, fp0 = m["tokenizer"]["fingerprint"], first.manifest["tokenizer"]["fingerprint"]
        if fp != fp0:
            raise UserError(f"{p.name}: made with another tokenizer than {first.name} (fingerprint {fp} vs {fp0})",
                            fix=rerun)
        for key, value in data_settings(cfg.data).items():
            if m["data"].get(key) != value:
                raise UserError(f"{p.name}: made with data.{key}={m['data'].get(key)!r}, but this merge has {value!r}",
                                fix=f"give the merge the parts' settings (--data.{key}={m['data'].get(key)}), "
                                    "or re-run the parts")
    if tokenizer is not None and tokenizer.fingerprint() != first.manifest["tokenizer"]["fingerprint"]:
        raise UserError(f"--tokenizer: not the tokenizer the parts were made with (fingerprint "
                        f"{tokenizer.fingerprint()} vs {first.manifest['tokenizer']['fingerprint']})",
                        fix="drop --tokenizer (the merge uses the parts' own), or re-run the parts with it")
    have: dict[int, Part] = {}
    for p in parts:
        k = p.manifest["part"][0]
        if k in have:
            raise UserError(f"{have[k].dir} and {p.dir} are both part {k}/{n}", fix="pass each part folder once")
        have[k] = p
    missing = [k for k in range(n) if k not in have]
    if missing:
        raise UserError(f"--merge: missing part{'s' * (len(missing) > 1)} {', '.join(f'{k}/{n}' for k in missing)} "
                        f"(have {', '.join(f'{k}/{n}' for k in sorted(have))})",
                        fix="make them with --part K/N, and pass every part folder to --merge")


def merge_parts(part_dirs: list[str], cfg: Config, out_dir: Path, tokenizer: Tokenizer | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Merge the part folders of one sharded run into prepared data in `out_dir`; return the manifest."""
    data = cfg.data
    check_settings(data)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    parts = [load_part(Path(d)) for d in part_dirs]
    check_parts(parts, cfg, tokenizer)
    parts.sort(key=lambda p: p.manifest["part"][0])
    n = len(parts)
    tokenizer = tokenizer or load_tokenizer(parts[0].dir / "tokenizer.json")
    inputs = parts[0].manifest["inputs"]
    where = describe_inputs(inputs)
    s = Scan.concat([p.scan for p in parts])
    if not np.array_equal(s.index, np.arange(s.total)):
        raise UserError(f"--merge: the parts do not hold every document of {where} once",
                        fix="re-run the parts with the same inputs")
    codes, filtered = decide(s, data)
    n_kept = int((codes == KEEP).sum())
    if progress:
        print(filter_summary(s.total, where, filtered, n_kept), file=sys.stderr)
    labels, by_tokens = split_labels(codes, data, where)
    rows = [np.cumsum(p.scan.code == KEEP) - 1 for p in parts]  # each document's row among its part's passed

    def stream() -> Iterator[tuple[int, np.ndarray]]:
        for i in np.flatnonzero(labels).tolist():
            p, r = parts[i % n], rows[i % n][i // n]  # document i is the (i // n)-th of part i % n
            yield int(labels[i]), np.asarray(p.tokens[p.offsets[r] : p.offsets[r + 1]], dtype=np.int64)

    return write_prepared(out_dir, stream(), tokenizer=tokenizer, cfg=cfg, inputs=inputs, fingerprint=inputs_digest(s),
                          filtered=filtered, n_read=s.total, n_kept=n_kept, by_tokens=by_tokens, pii=s.pii,
                          where=where, progress=progress)
