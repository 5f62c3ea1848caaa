"""Labelled texts for classification: reading, the stratified split, encoding and batching.

- data: JSONL (or a JSON list) of {"text": str, "label": str | int}, or CSV with a header naming
  `text` and `label` columns; every problem names the file and line.
- framing: when the tokenizer has `<|endoftext|>`, a text is `EOT text EOT`: the leading one is
  how every pretraining document began, the trailing one is a fixed "read it all" position for the
  classifier to pool at (GPT-1's extract token), whatever the text's last word.
- padding: batches are right-padded with `PAD` = -1, never a real id, so each row's length is
  recoverable from x alone (the classifier reads it there); -1 is already the repository's
  "ignore" value, so no pad token is needed.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scratchlm.data.order import EpochOrder, python_permutation
from scratchlm.data.sources import read_records
from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer

PAD = -1  # the padding value in x: never a real id, so lengths are recoverable from x alone


@dataclass
class Labelled:
    text: str
    label: str
    where: str  # file:line, for error messages and predictions.jsonl


def _field(rec: dict[str, Any], key: str, where: str) -> str:
    if key not in rec or rec[key] is None:
        raise UserError(f"{where}: missing field {key!r} (has: {', '.join(sorted(k for k in rec if k)) or 'nothing'})")
    value = rec[key]
    if key == "label" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # integer class ids are labels too; they sort as strings
    if not isinstance(value, str):
        raise UserError(f"{where}: field {key!r} is {type(value).__name__}, not a string")
    if not value.strip():
        raise UserError(f"{where}: field {key!r} is empty")
    return value


def _csv_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark is not part of "text"
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{path}: file is empty", fix="pass a file with labelled examples")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    for key in ("text", "label"):
        if key not in header:
            raise UserError(f"{path}:1: the CSV header has no {key!r} column (has: {', '.join(header)})",
                            fix="the first line must name the columns, e.g. text,label")
    try:
        return [(reader.line_num, row) for row in reader]  # line_num: the record's last line
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: bad CSV ({e})") from None


def read_labelled(path: str | Path) -> list[Labelled]:
    """Labelled examples from JSONL / a JSON list (fields text, label) or CSV (header text,label)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "no such file"
        raise UserError(f"{path}: {what}", fix="pass a labelled JSONL or CSV file")
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        head = f.read(4096).lstrip()  # enough to tell JSON ({ or [) from CSV when the suffix does not say
    if suffix == ".csv" or (suffix not in (".json", ".jsonl") and head and head[0] not in "[{"):
        rows = _csv_rows(path)
    else:
        rows = read_records(path)
    out = []
    for lineno, rec in rows:
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: a record must be a JSON object with text and label, got {type(rec).__name__}")
        out.append(Labelled(_field(rec, "text", where), _field(rec, "label", where), where))
    if not out:
        raise UserError(f"{path}: no examples (only a header?)", fix="add rows of text,label")
    return out


def label_names(examples: list[Labelled], source: str) -> list[str]:
    """The sorted distinct labels (id = position); at least two."""
    names = sorted({e.label for e in examples})
    if len(names) < 2:
        raise UserError(f"{source}: every one of the {len(examples)} examples has the label {names[0]!r}",
                        fix="a classifier needs examples of at least two labels")
    return names


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: each class contributes round(fraction x its count) to validation, at
    least one example of each class stays in training; seeded, both lists sorted."""
    if not 0 < fraction < 1:
        raise UserError(f"sft.val_fraction={fraction} must be between 0 and 1")
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    val: list[int] = []
    for y in sorted(by_class):
        members = by_class[y]
        rng.shuffle(members)
        val += members[: min(round(fraction * len(members)), len(members) - 1)]
    if not val:
        raise UserError(f"only {len(labels)} examples: too few to hold out sft.val_fraction={fraction} for validation",
                        fix="add examples or raise --sft.val_fraction")
    held = set(val)
    return [i for i in range(len(labels)) if i not in held], sorted(val)


def encode_text(tok: Tokenizer, text: str, block_size: int, overlong: str = "truncate"
                ) -> tuple[list[int] | None, bool]:
    """(ids, whether the text was cut): `EOT text EOT` (just the text without an EOT token) in at
    most block_size ids; an overlong text keeps its start (truncate) or gives None (drop). The
    trailing EOT always survives: it is where the classifier reads."""
    body = tok.encode(text, disallowed_special=())  # a special typed in the text stays text
    eot = tok.eot_id
    room = block_size - (2 if eot is not None else 0)
    cut = len(body) > room
    if cut:
        if overlong == "drop":
            return None, True
        body = body[:room]
    return ([eot, *body, eot] if eot is not None else body), cut


class ClassifyLoader:
    """Batches of (x (B, L) ids right-padded with -1 to the batch's longest, y (B, 1) class ids).

    Training (`fill=True`) keeps every batch full, running into the next epoch's order (reshuffled
    by (seed, epoch)); validation (`fill=False`, unshuffled) ends an epoch with a short batch, so
    ceil(n / B) batches see each example exactly once. Resumable through state_dict()."""

    def __init__(self, ids: list[list[int]], labels: list[int], batch_size: int, *, shuffle: bool = True,
                 fill: bool = True, seed: int = 0, device: str | torch.device = "cpu") -> None:
        if not ids:
            raise UserError("no examples to batch")
        self.ids, self.labels = ids, labels
        self.batch_size, self.device = batch_size, device
        self.order = EpochOrder(len(ids), shuffle=shuffle, fill=fill, seed=seed, permutation=python_permutation)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        picks = self.order.take(self.batch_size)
        return collate([self.ids[i] for i in picks], [self.labels[i] for i in picks], self.device)

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict("rows")

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order.load_state_dict(state, "rows", "classification data", "use the same data")


def collate(rows: list[list[int]], labels: list[int] | None = None, device: str | torch.device = "cpu"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with -1 to the longest row: x (B, L); y (B, 1) class ids (-1 when not given)."""
    L = max(len(r) for r in rows)
    x = torch.tensor([r + [PAD] * (L - len(r)) for r in rows], dtype=torch.long)
    y = torch.tensor(labels if labels is not None else [-1] * len(rows), dtype=torch.long)[:, None]
    return x.to(device), y.to(device)
