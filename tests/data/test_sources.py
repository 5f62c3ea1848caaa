"""Reading documents: files, folders, JSONL, the embedded corpus, and every bad-input message."""

from __future__ import annotations

import pytest

from scratchlm.data.sources import iter_documents, kjv_chapters
from scratchlm.errors import UserError


def docs(paths, field="text"):
    return list(iter_documents([str(p) for p in paths], field))


def test_files_folders_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("second")
    (sub / "c.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth", "x": 1}\n')
    (sub / "skip.bin").write_bytes(b"\x00\x01")
    got = docs([tmp_path])
    assert [d.text for d in got] == ["first", "second", "third", "fourth"]
    assert got[3].source.endswith("c.jsonl:3")


@pytest.mark.parametrize("content, message", [
    (b"", "file is empty"),
    (b"   \n", "file is empty"),
    (b"abc\x00def", "binary file"),
    (b"line one\nline two caf\xe9\n", r":2: not valid UTF-8"),
])
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        docs([path])
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        docs([tmp_path / "nope.txt"])


@pytest.mark.parametrize("lines, message", [
    ('{"text": "ok"}\n{broken\n', r"bad.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', r"bad.jsonl:2: no field 'text' \(has: body\)"),
    ('{"text": 3}\n', r"bad.jsonl:1: field 'text' is int"),
])
def test_bad_jsonl(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(lines)
    with pytest.raises(UserError, match=message):
        docs([path])


def test_jsonl_field_choice(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "x y z"}\n')
    assert [d.text for d in docs([path], "body")] == ["x y z"]


def test_embedded_corpus_is_the_kjv_by_chapter():
    chapters = kjv_chapters()
    assert len(chapters) == 1189
    assert chapters[0].startswith("In the beginning God created the heaven and the earth.")
    assert chapters[-1].rstrip().endswith("Amen.")
    assert 4_000_000 < sum(map(len, chapters)) < 4_500_000
    first = next(iter_documents(None))
    assert first.text == chapters[0] and first.source == "kjv:chapter-1"
