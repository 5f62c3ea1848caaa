"""Sharded `scratchlm data prepare` (scratchlm/data/parts.py): --part K/N jobs merged with --merge write
the single run's folder byte for byte, deduplicating across parts; bad parts get one line and exit 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from scratchlm import cli
from scratchlm.data.parts import merge_parts, parse_part, prepare_part
from scratchlm.data.prepare import prepare
from scratchlm.errors import UserError
from scratchlm.tokenizer import ByteTokenizer
from tests.helpers import byte_tok, make_cfg, make_docs, write_corpus


def corpus(root: Path) -> list[str]:
    """A folder of text files and a JSONL file, with duplicates planted across and within slices."""
    docs = make_docs(40, seed=11)
    docs[9] = "Mail me at someone@example.com. " + docs[9]
    fresh = make_docs(1, seed=12)[0].replace("Document 0.", "Fresh start.")
    extra = [
        docs[2],  # exact duplicate
        docs[4].upper().replace(".", "!"),  # the same once normalised
        docs[6] + " and more",  # near duplicate (word 5-gram Jaccard ~0.95)...
        docs[6] + " as well",  # ...and another one of the same cluster
        "tiny",  # too short...
        "tiny",  # ...and its exact copy: counted as a duplicate
        "\n".join(["spam spam spam"] * 6 + ["real text"]),  # repeated lines
        fresh.replace("\n", "...\n") + "...",  # ellipsis lines, dropped...
        fresh + " and more",  # ...so this near copy is kept: near-dedup compares the documents the rules kept
        docs[9].replace("someone@example.com", "other@example.org"),  # a duplicate once PII is scrubbed
    ]
    folder = write_corpus(root / "files", docs[:30])
    jsonl = root / "more.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[30:] + extra))
    return [str(folder), str(jsonl)]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("n", [1, 3, 7])
def test_merged_parts_equal_the_single_run(tmp_path, n):
    inputs = corpus(tmp_path)
    cfg = make_cfg(val_fraction=0.1, shard_tokens=900, scrub_pii=True)
    single = prepare(inputs, byte_tok(), cfg, tmp_path / "single", progress=False)
    assert single["filtered"] == {"duplicate": 4, "too_short": 1, "repeated_lines": 1, "bullet_lines": 0,
                                  "ellipsis_lines": 1, "near_duplicate": 2}
    assert single["documents"]["kept"] == 41 and single["pii"] == {"email": 2, "ipv4": 0}

    parts = [tmp_path / f"part{k}" for k in range(n)]
    for k in reversed(range(n)):  # any order
        m = prepare_part(inputs, byte_tok(), cfg, parts[k], (k, n), progress=False)
        assert m["part"] == [k, n] and m["documents"]["inputs"] == 50
    merged = merge_parts([str(p) for p in parts], cfg, tmp_path / "merged", progress=False)
    assert merged == single
    assert files(tmp_path / "merged") == files(tmp_path / "single")  # every shard, byte for byte


def test_one_document_and_an_empty_part(tmp_path):
    """A slice may hold no document; one kept document is split by tokens in the merge too."""
    src = tmp_path / "one.txt"
    src.write_text(make_docs(1)[0], encoding="utf-8")
    cfg = make_cfg(val_fraction=0.2)
    single = prepare([str(src)], byte_tok(), cfg, tmp_path / "single", progress=False)
    for k in range(2):
        prepare_part([str(src)], byte_tok(), cfg, tmp_path / f"p{k}", (k, 2), progress=False)
    merged = merge_parts([str(tmp_path / "p1"), str(tmp_path / "p0")], cfg, tmp_path / "merged", progress=False)
    assert merged == single and merged["split"]["by"] == "tokens"
    assert files(tmp_path / "merged") == files(tmp_path / "single")


def test_parse_part():
    assert parse_part("0/1") == (0, 1) and parse_part(" 3 / 4 ") == (3, 4)
    for bad in ("4/4", "1/0", "-1/2", "a/b", "1", "1/2/3", ""):
        with pytest.raises(UserError, match=r"--part .*must be K/N with 0 <= K < N"):
            parse_part(bad)


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(["data", "prepare", "--quiet", "--data.workers=1", *argv])
    err = capsys.readouterr().err
    return rc, err


def test_cli_parts_merge_and_every_bad_input(tmp_path, capsys):
    inputs = corpus(tmp_path)
    tok, other_tok = tmp_path / "tok.json", tmp_path / "other.json"
    byte_tok().save(tok)
    ByteTokenizer({"<|endoftext|>": 256, "<|pad|>": 257}).save(other_tok)  # another vocabulary
    assert run(capsys, *inputs, "--tokenizer", str(tok), "--out", str(tmp_path / "single"))[0] == 0
    for k in range(2):
        assert run(capsys, *inputs, "--tokenizer", str(tok), "--out", str(tmp_path / f"p{k}"),
                   "--part", f"{k}/2")[0] == 0
    p0, p1 = str(tmp_path / "p0"), str(tmp_path / "p1")
    assert run(capsys, "--merge", p0, p1, "--out", str(tmp_path / "merged"))[0] == 0
    assert files(tmp_path / "merged") == files(tmp_path / "single")

    # parts made otherwise: another tokenizer, other settings
    assert run(capsys, *inputs, "--tokenizer", str(other_tok), "--out", str(tmp_path / "q1"), "--part", "1/2")[0] == 0
    assert run(capsys, *inputs, "--tokenizer", str(tok), "--out", str(tmp_path / "s1"), "--part", "1/2",
               "--data.seed=7")[0] == 0
    (tmp_path / "notapart").mkdir()
    out = ["--out", str(tmp_path / "m2")]
    cases = [
        (["--merge", p0, str(tmp_path / "q1"), *out], r"q1 \(part 1/2\): made with another tokenizer than .*p0"),
        (["--merge", p0, str(tmp_path / "s1"), *out], r"s1 \(part 1/2\): made with data.seed=7, but this merge has "
                                                      r"1337 \(give the merge the parts' settings \(--data.seed=7\)"),
        (["--merge", p0, p1, "--data.seed=7", *out], r"p0 \(part 0/2\): made with data.seed=1337, but this merge "
                                                     r"has 7"),
        (["--merge", p0, *out], r"missing part 1/2 \(have 0/2\)"),
        (["--merge", p0, p0, p1, *out], r"p0 and .*p0 are both part 0/2"),
        (["--merge", p0, str(tmp_path / "gone"), *out], r"gone: no such part folder"),
        (["--merge", p0, str(tmp_path / "notapart"), *out], r"notapart: not a part folder \(no part.json\)"),
        (["--merge", p0, str(tmp_path / "single"), *out], r"single: not a part folder"),
        (["--merge", p0, p1, "--tokenizer", str(other_tok), *out], r"--tokenizer: not the tokenizer the parts"),
        ([*inputs, "--merge", p0, p1, *out], r"--merge takes part folders only, not inputs"),
        (["--part", "0/2", "--merge", p0, p1, *out], r"--merge takes part folders only, not --part"),
        (["--merge", p0, p1, "--out", str(tmp_path / "merged")], r"merged: already exists.*--overwrite"),
        (["--merge", p0, p1, "--out", p1], r"p1: is the input .* or overlaps it"),
        ([*inputs, "--tokenizer", str(tok), "--part", "2/2", *out], r"--part 2/2: must be K/N"),
        ([*inputs, "--part", "0/2", *out], r"--tokenizer is required"),
        ([*inputs, "--tokenizer", str(tok), "--part", "0/2", "--out", str(tmp_path / "files")],
         r"is the input .* or overlaps it"),
    ]
    for argv, message in cases:
        rc, err = run(capsys, *argv)
        assert rc == 2 and err.startswith("scratchlm: error:") and err.count("\n") == 1, (argv, err)
        assert re.search(message, err), (message, err)
    assert not (tmp_path / "m2").exists()

    # a truncated part file is named, not a traceback
    tokens = tmp_path / "p1" / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    rc, err = run(capsys, "--merge", p0, p1, *out)
    assert rc == 2 and "p1: part files disagree with part.json" in err and err.count("\n") == 1
    # a part folder is replaced only with --overwrite, and only by a part run
    assert run(capsys, *inputs, "--tokenizer", str(tok), "--out", p1, "--part", "1/2")[0] == 2
    assert run(capsys, *inputs, "--tokenizer", str(tok), "--out", p1, "--part", "1/2", "--overwrite")[0] == 0
    assert run(capsys, "--merge", p0, p1, *out)[0] == 0 and files(tmp_path / "m2") == files(tmp_path / "single")
    # a hand-edited part.json without a key the merge reads is named, not a KeyError
    manifest_file = tmp_path / "p1" / "part.json"
    manifest = json.loads(manifest_file.read_text())
    for key, edit in (("documents.read", lambda m: m["documents"].pop("read")), ("data", lambda m: m.pop("data"))):
        edited = json.loads(json.dumps(manifest))
        edit(edited)
        manifest_file.write_text(json.dumps(edited))
        rc, err = run(capsys, "--merge", p0, p1, "--out", str(tmp_path / "m3"))
        assert rc == 2 and err.count("\n") == 1, err
        assert f"p1/part.json: corrupt (key '{key}' missing or malformed)" in err, err


def test_a_part_parses_only_its_own_documents(tmp_path):
    src = tmp_path / "d.jsonl"
    docs = make_docs(4, seed=3)
    src.write_text(json.dumps({"text": docs[0]}) + "\n{broken\n\n" + "".join(json.dumps({"text": d}) + "\n"
                                                                             for d in docs[2:]))
    m = prepare_part([str(src)], byte_tok(), make_cfg(), tmp_path / "p0", (0, 2), progress=False)
    assert m["documents"] == {"inputs": 4, "read": 2, "passed": 2}  # documents 0 and 2; line 2 is part 1's
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid JSON"):
        prepare_part([str(src)], byte_tok(), make_cfg(), tmp_path / "p1", (1, 2), progress=False)
    assert not (tmp_path / "p1").exists()
