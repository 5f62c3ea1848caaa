"""Preference data: the four formats load as the same pairs and the same token ids, each bad record
is one line naming file, line and field, long prompts lose tokens from the left with both responses
whole, the held-out split shares no prompt, and the embedded corrupted pairs are right vs wrong."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from scratchlm.align.data import (
    PreferencePair,
    ResponseTooLong,
    assert_prompts_disjoint,
    corrupted_pairs,
    detect_format,
    read_pairs,
    split_pairs_by_prompt,
    tokenize_pair,
    tokenize_pairs,
)
from scratchlm.errors import UserError
from scratchlm.tasks.families import FAMILIES, check, generate_tasks
from scratchlm.tokenizer import ByteTokenizer
from scratchlm.tokenizer.chat import ensure_chat_specials, render
from tests.helpers import shared_file


@pytest.fixture
def tok():
    return ensure_chat_specials(ByteTokenizer({"<|endoftext|>": 256}))[0]


def write(tmp_path, name, records, as_list=False):
    p = tmp_path / name
    if as_list:
        p.write_text(json.dumps(records, indent=2))
    else:
        p.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in records) + "\n")
    return str(p)


def msgs(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def hh(turns):
    return "".join(f"\n\n{'Human' if r == 'user' else 'Assistant'}: {c}" for r, c in turns)


# (instruction, input, chosen, rejected, margin): the alpaca user turn is instruction + "\n\n" + input
PAIRS = [
    ("Say hi", "to Bob", "hi Bob", "go away", 1.0),
    ("Add: 2 + 2", "", "4", "5", 0.5),
    ("Name a colour.", "", "Blue is a colour.", "Blue.", 2.0),
]


def user_turn(instruction, extra):
    return instruction + (f"\n\n{extra}" if extra else "")


def four_files(tmp_path):
    prompt = write(tmp_path, "prompt.jsonl", [{"prompt": user_turn(i, x), "chosen": c, "rejected": r, "margin": m}
                                              for i, x, c, r, m in PAIRS])
    alpaca = write(tmp_path, "alpaca.json", [{"instruction": i, "input": x, "output": "ignored", "chosen": c,
                                              "rejected": r, "margin": m} for i, x, c, r, m in PAIRS], as_list=True)
    conv = write(tmp_path, "conv.jsonl", [{"chosen": msgs(("user", user_turn(i, x)), ("assistant", c)),
                                           "rejected": msgs(("user", user_turn(i, x)), ("assistant", r)),
                                           "margin": m} for i, x, c, r, m in PAIRS])
    trl = write(tmp_path, "trl.jsonl", [{"prompt": msgs(("user", user_turn(i, x))),
                                         "chosen": msgs(("assistant", c)), "rejected": msgs(("assistant", r)),
                                         "margin": m} for i, x, c, r, m in PAIRS])
    hh_file = write(tmp_path, "hh.jsonl", [{"chosen": hh([("user", user_turn(i, x)), ("assistant", c)]),
                                            "rejected": hh([("user", user_turn(i, x)), ("assistant", r)]),
                                            "margin": m} for i, x, c, r, m in PAIRS])
    return {"prompt": prompt, "alpaca": alpaca, "conversational": conv, "trl": trl, "hh": hh_file}


def content(pair: PreferencePair):
    return pair.prompt, pair.chosen, pair.rejected, pair.meta


def test_the_four_formats_give_the_same_pairs_and_token_ids(tmp_path, tok):
    files = four_files(tmp_path)
    loaded = {name: read_pairs([path])[0] for name, path in files.items()}
    expected = [([("user", user_turn(i, x))], c, r, {"kind": "file", "margin": m}) for i, x, c, r, m in PAIRS]
    for name, pairs in loaded.items():
        assert [content(p) for p in pairs] == expected, name
        assert [p.source for p in pairs] == [f"{files[name]}:{n}" for n in (1, 2, 3)], name
        assert [tokenize_pair(p, tok, 64) for p in pairs] == [tokenize_pair(p, tok, 64) for p in loaded["prompt"]]
    first = {name: json.loads(Path(path).read_text())[0] if name == "alpaca" else
             json.loads(Path(path).read_text().split("\n")[0]) for name, path in files.items()}
    assert {name: detect_format(r) for name, r in first.items()} == {
        "prompt": "prompt", "alpaca": "alpaca", "conversational": "conversational", "trl": "conversational",
        "hh": "hh"}
    together, counts = read_pairs(list(files.values()))  # each file detected on its own
    assert len(together) == 15 and counts == {"identical": 0}


def test_multi_turn_prompts_agree_across_conversational_trl_and_hh(tmp_path):
    turns = [("user", "Hi."), ("assistant", "Hello! How can I help?"), ("user", "What is 2 + 2?")]
    conv = write(tmp_path, "c.jsonl", [{"chosen": msgs(*turns, ("assistant", "4")),
                                        "rejected": msgs(*turns, ("assistant", "22"))}])
    trl = write(tmp_path, "t.jsonl", [{"prompt": msgs(*turns), "chosen": msgs(("assistant", "4")),
                                       "rejected": msgs(("assistant", "22"))}])
    hh_file = write(tmp_path, "h.jsonl", [{"chosen": hh(turns + [("assistant", "4")]),
                                           "rejected": hh(turns + [("assistant", "22")])}])
    got = [content(read_pairs([p])[0][0]) for p in (conv, trl, hh_file)]
    assert got == [(turns, "4", "22", {"kind": "file"})] * 3
    # HH responses sharing their first words: the split is at the last "Assistant:" both open
    shared = write(tmp_path, "s.jsonl", [{"chosen": "Human: 2+2?\n\nAssistant: It is 4.",
                                          "rejected": "Human: 2+2?\n\nAssistant: It is 5."}])
    assert content(read_pairs([shared])[0][0]) == ([("user", "2+2?")], "It is 4.", "It is 5.", {"kind": "file"})
    system = write(tmp_path, "y.jsonl", [{"prompt": msgs(("system", "Be brief."), ("user", "q")),
                                          "chosen": msgs(("assistant", "a")), "rejected": msgs(("assistant", "b"))}])
    assert read_pairs([system])[0][0].prompt == [("system", "Be brief."), ("user", "q")]


BAD = [
    ({"prompt": "q", "chosen": "same  answer", "rejected": "same answer "},
     "fields 'chosen' and 'rejected' are the same text"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "field 'chosen': the response is empty"),
    ({"instruction": "x", "input": "", "chosen": "a", "rejected": ""}, "field 'rejected': the response is empty"),
    ({"chosen": msgs(("user", "q"), ("assistant", "")), "rejected": msgs(("user", "q"), ("assistant", "b"))},
     "field 'chosen': the response is empty"),
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"instruction": "x", "input": "", "rejected": "b"}, "missing field 'chosen'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' is int, not a string"),
    ({"instruction": "x", "input": 5, "chosen": "a", "rejected": "b"}, "field 'input' is int, not a string"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin' is str, not a number"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: r\n\nAssistant: b"},
     "fields 'chosen' and 'rejected' share no '\\n\\nAssistant:' turn"),
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."},
     "fields 'chosen' and 'rejected' share no '\\n\\nAssistant:' turn"),
    ({"chosen": "hello\n\nHuman: q\n\nAssistant: a", "rejected": "hello\n\nHuman: q\n\nAssistant: b"},
     "field 'chosen': text before the first"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a\n\nHuman: more\n\nAssistant: c",
      "rejected": "\n\nHuman: q\n\nAssistant: b"}, "field 'chosen': the response goes on into further turns"),
    ({"chosen": msgs(("user", "q1"), ("assistant", "a")), "rejected": msgs(("user", "q2"), ("assistant", "b"))},
     "fields 'chosen' and 'rejected' differ at message 0, before their last message"),
    ({"chosen": msgs(("user", "q"), ("assistant", "a"), ("user", "more")),
      "rejected": msgs(("user", "q"), ("assistant", "b"))}, "field 'chosen': the last message is the user's"),
    ({"chosen": [{"role": "bot", "content": "a"}], "rejected": msgs(("assistant", "b"))}, "chosen[0] needs a role"),
    ({"prompt": msgs(("user", "q"), ("assistant", "a")), "chosen": msgs(("assistant", "b")),
      "rejected": msgs(("assistant", "c"))}, "field 'prompt': the prompt's last turn is the assistant's"),
    ({"prompt": [], "chosen": msgs(("assistant", "b")), "rejected": msgs(("assistant", "c"))},
     "field 'prompt' is an empty list"),
    ({"chosen": msgs(("assistant", "b")), "rejected": msgs(("assistant", "c"))},
     "field 'chosen': no prompt before the response"),
    ({"text": "x"}, "unknown preference format"),
]


@pytest.mark.parametrize("record, message", BAD, ids=[m[:40] for _, m in BAD])
def test_each_bad_record_is_one_line_naming_file_line_and_field(tmp_path, record, message):
    path = write(tmp_path, "x.jsonl", [record])
    with pytest.raises(UserError, match=re.escape(f"x.jsonl:1: {message}")) as err:
        read_pairs([path])
    assert "\n" not in str(err.value)
    fmt = detect_format(record)
    if fmt != "unknown":  # the same record after a good one of its format: the error names line 2
        with pytest.raises(UserError, match=re.escape(f"x.jsonl:2: {message}")):
            read_pairs([write(tmp_path, "x.jsonl", [GOOD[fmt], record])])


GOOD = {
    "prompt": {"prompt": "q", "chosen": "a", "rejected": "b"},
    "alpaca": {"instruction": "q", "chosen": "a", "rejected": "b"},
    "conversational": {"chosen": msgs(("user", "q"), ("assistant", "a")),
                       "rejected": msgs(("user", "q"), ("assistant", "b"))},
    "hh": {"chosen": hh([("user", "q"), ("assistant", "a")]), "rejected": hh([("user", "q"), ("assistant", "b")])},
}


def test_files_and_settings_that_cannot_be_read(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(UserError, match="no preference pairs"):
        read_pairs([str(tmp_path / "empty.json")])
    with pytest.raises(UserError, match="no such file"):
        read_pairs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(UserError, match="format 'csv' is unknown"):
        read_pairs([str(tmp_path / "empty.json")], fmt="csv")


def test_identical_pairs_refused_or_dropped_and_counted(tmp_path):
    path = write(tmp_path, "x.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                       {"prompt": "r", "chosen": "same", "rejected": "same"}])
    with pytest.raises(UserError, match="x.jsonl:2: fields 'chosen' and 'rejected' are the same text"):
        read_pairs([path])
    pairs, counts = read_pairs([path], identical="drop")
    assert [p.chosen for p in pairs] == ["a"] and counts == {"identical": 1}


def test_labels_train_only_the_response_and_its_end(tok):
    turns = [("system", "s"), ("user", "q"), ("assistant", "earlier"), ("user", "again")]
    pair = PreferencePair(turns, "yes", "no", "x:1")
    c_ids, c_labels, r_ids, r_labels, truncated = tokenize_pair(pair, tok, 64)
    assert not truncated
    assert c_ids == render(tok, turns + [("assistant", "yes")])[0]
    assert r_ids == render(tok, turns + [("assistant", "no")])[0]
    end = tok.special_tokens["<|end|>"]
    assert [i for i in c_labels if i >= 0] == tok.encode("yes") + [end]  # the earlier assistant turn is prompt
    assert [i for i in r_labels if i >= 0] == tok.encode("no") + [end]
    assert all(lab in (i, -1) for i, lab in zip(c_ids + r_ids, c_labels + r_labels))


def test_a_long_prompt_is_cut_from_the_left_and_both_responses_stay_whole(tok):
    pair = PreferencePair([("user", "a long question " * 10 + "THE END?")], "short", "a longer answer", "x:1")
    full = tokenize_pair(pair, tok, 512)
    c_ids, c_labels, r_ids, r_labels, truncated = tokenize_pair(pair, tok, 40)
    assert truncated and not full[4]
    assert max(len(c_ids), len(r_ids)) == 40
    assert c_ids == full[0][-len(c_ids):] and r_ids == full[2][-len(r_ids):]  # what is kept is the end
    n_prompt_c, n_prompt_r = len(c_ids) - len("short") - 1, len(r_ids) - len("a longer answer") - 1
    assert c_ids[:n_prompt_c] == r_ids[:n_prompt_r]  # both keep the same prompt tokens
    assert tok.decode(c_ids[:n_prompt_c]).endswith("THE END?<|end|><|assistant|>")
    assert [i for i in c_labels if i >= 0] == full[1][-len(c_ids):][n_prompt_c:]
    assert tok.decode([i for i in r_labels if i >= 0]) == "a longer answer<|end|>"
    # the longer response plus <|end|> is 16 tokens: 17 leaves the <|assistant|> token, 16 nothing
    assert len(tokenize_pair(pair, tok, 17)[2]) == 17
    with pytest.raises(ResponseTooLong, match="x:1: a response of 16 tokens leaves no room"):
        tokenize_pair(pair, tok, 16)


def test_tokenize_pairs_counts_truncated_prompts_and_drops_overlong_responses(tok):
    ok = PreferencePair([("user", "q")], "a", "b", "x:1", {"kind": "file"})
    long_prompt = PreferencePair([("user", "q" * 50)], "a", "b", "x:2")
    long_answer = PreferencePair([("user", "q")], "a" * 50, "b", "x:3")
    out, counts = tokenize_pairs([ok, long_prompt, long_answer], tok, 20)
    assert counts == {"truncated": 1, "dropped": 1}
    assert [t.meta["source"] for t in out] == ["x:1", "x:2"] and out[0].meta["kind"] == "file"
    assert all(len(t.chosen_ids) <= 20 and len(t.rejected_ids) <= 20 for t in out)
    with pytest.raises(ResponseTooLong, match="x:3"):
        tokenize_pairs([ok, long_answer], tok, 20, overlong="error")
    with pytest.raises(UserError, match="no preference pair fits"):
        tokenize_pairs([long_answer], tok, 20)


def test_the_split_keeps_every_prompt_on_one_side():
    def pair(prompt: str, chosen: str, i: int) -> PreferencePair:
        return PreferencePair([("user", prompt)], chosen, "no", f"x.jsonl:{i}")

    pairs = [pair(f"question {i % 30}", f"yes {i}", i) for i in range(60)]  # each prompt twice
    pairs += [pair(f"question  {i}", "other", 60 + i) for i in range(10)]  # the same prompts, other spacing
    train, held = split_pairs_by_prompt(pairs, 0.2, seed=3)
    assert len(train) + len(held) == 70 and len({p.prompt[0][1].split()[1] for p in held}) == 6
    assert_prompts_disjoint(train, held)
    assert train == [p for p in pairs if p in train] and split_pairs_by_prompt(pairs, 0.2, seed=3) == (train, held)
    with pytest.raises(AssertionError, match="1 held-out pairs share a prompt with training"):
        assert_prompts_disjoint(train, held + [pair("question  " + train[0].prompt[0][1].split()[1], "z", 99)])
    with pytest.raises(UserError, match="only 1 distinct prompts"):
        split_pairs_by_prompt(pairs[:1] + pairs[30:31], 0.5, seed=0)
    with pytest.raises(UserError, match="outside"):
        split_pairs_by_prompt(pairs, 1.0, seed=0)


def test_corrupted_pairs_are_a_right_answer_against_a_wrong_one():
    pairs = corrupted_pairs(500, seed=7)
    assert pairs == corrupted_pairs(500, seed=7) and pairs != corrupted_pairs(500, seed=8)
    tasks = generate_tasks(500, seed=7)
    assert [p.prompt for p in pairs] == [[("user", t.instruction)] for t in tasks]
    for p in pairs:
        fam = p.meta["family"]
        assert check(fam, p.prompt[0][1], p.chosen) and not check(fam, p.prompt[0][1], p.rejected), p
        assert p.meta["kind"] == "corrupted" and p.chosen != p.rejected
    assert {f: sum(p.meta["family"] == f for p in pairs) for f in FAMILIES} == dict.fromkeys(FAMILIES, 100)
    train, held = split_pairs_by_prompt(pairs, 0.1, seed=0)
    assert len(held) == 50 and {p.meta["family"] for p in held} == set(FAMILIES)


def test_the_real_preference_file_loads(tok):
    path = str(shared_file("instruction-data-with-preference.json"))
    with pytest.raises(UserError, match=r"instruction-data-with-preference.json:123: fields 'chosen' and 'rejected'"):
        read_pairs([path])
    pairs, counts = read_pairs([path], identical="drop")
    assert len(pairs) == 1094 and counts == {"identical": 6}
    assert pairs[0].prompt == [("user", "Evaluate the following phrase by transforming it into the spelling "
                                        "given.\n\nfreind --> friend")]
    assert pairs[2].prompt == [("user", "Convert 45 kilometers to meters.")]  # empty input: no blank lines
    train, held = split_pairs_by_prompt(pairs, 0.1, seed=0)
    assert_prompts_disjoint(train, held)
    assert tokenize_pairs(pairs, tok, 512)[1] == {"truncated": 0, "dropped": 0}
    assert tokenize_pairs(pairs, tok, 256)[1] == {"truncated": 27, "dropped": 1}  # one token per byte
