"""Constitutional AI: the constitution file and its bad inputs, each check kind and its rule reviser
on hand examples, the red-team/benign prompts (distinct, split by prompt), the critique/revision loop
on canned answers (who wrote what), and a tiny end-to-end run writing the summary and the PNG."""

from __future__ import annotations

import copy
import json

import pytest

from scratchlm.align import cai as cai_mod
from scratchlm.align.cai import cai, critique_and_revise, is_edit, revision_pairs, sft_records
from scratchlm.align.constitution import (
    DEFAULT_CONSTITUTION,
    Check,
    load_constitution,
    looks_like_refusal,
    parse_constitution,
    refuses,
)
from scratchlm.align.redteam import CAIPrompt, PromptSet, check_disjoint, generate_prompts
from scratchlm.config import Config, get_preset
from scratchlm.errors import UserError
from tests.helpers import tiny_llama_base, tiny_sft_run

# -- the constitution file ------------------------------------------------------------------------


def test_the_embedded_constitution_parses_and_round_trips(tmp_path):
    c = load_constitution()
    assert [p.check.kind for p in c.principles] == ["refuse_marked", "forbidden", "max_words", "format"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(c.to_json()))
    again = load_constitution(path)
    assert again.principles == c.principles and again.name == c.name


def _with(edit) -> dict:
    obj = copy.deepcopy(DEFAULT_CONSTITUTION)
    edit(obj)
    return obj


def _set(path: list, value):
    def edit(obj):
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return edit


BAD = [
    (_set(["principles"], []), "principles: must be a non-empty list"),
    (_set(["principles", 2, "check", "n"], 0), "principles[2].check.n: must be an integer >= 1"),
    (_set(["principles", 2, "check", "n"], True), "principles[2].check.n: must be an integer >= 1"),
    (_set(["principles", 2, "check", "kind"], "shout"), "principles[2].check.kind: 'shout' is not a check kind"),
    (_set(["principles", 1, "check", "words"], []), "principles[1].check.words: must be a non-empty list"),
    (_set(["principles", 1, "check", "words"], ["two words"]), "principles[1].check.words[0]: must be one word"),
    (_set(["principles", 3, "check", "format"], "yaml"), "principles[3].check.format: 'yaml' is unknown"),
    (_set(["principles", 3, "check", "colour"], "red"), "principles[3].check: unknown field 'colour'"),
    (_set(["principles", 0, "check", "refusal"], ""), "principles[0].check.refusal: must be a non-empty string"),
    (_set(["principles", 0, "check", "refusal"], "No, I cannot."), "principles[0].check.refusal: 'No, I cannot.' "
                                                                   "breaks principle 'lowercase'"),
    (_set(["principles", 0, "check", "refusal"], "no fire here"), "breaks principle 'no_forbidden_words'"),
    (_set(["principles", 0, "check", "lookalikes"], ["[secret]!"]), "principles[0].check.lookalikes[0]"),
    (_set(["principles", 1, "name"], "brief"), "principles[2].name: 'brief' is used twice"),
    (_set(["principles", 1, "name"], "no words"), "principles[1].name: 'no words'"),
    (_set(["principles", 1, "critique"], "it says {what}"), "principles[1].critique: unknown placeholder {what}"),
    (_set(["principles", 1, "revision"], "fix it {"), "principles[1].revision: not a valid template"),
    (lambda obj: obj["principles"][1].pop("description"), "principles[1]: missing field 'description'"),
    (lambda obj: obj["principles"][1].pop("check"), "principles[1]: missing field 'check'"),
    (_set(["principles", 1, "check"], "forbidden"), "principles[1].check: must be an object"),
    (_set(["version"], 2), "constitution: unknown field 'version'"),
]


@pytest.mark.parametrize("edit,message", BAD)
def test_bad_constitutions_name_the_file_and_field(tmp_path, edit, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_with(edit)))
    with pytest.raises(UserError) as e:
        load_constitution(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_bad_constitution_files(tmp_path):
    with pytest.raises(UserError, match="no such constitution file"):
        load_constitution(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('{"principles": [')
    with pytest.raises(UserError, match=r"broken.json:1: not valid JSON"):
        load_constitution(tmp_path / "broken.json")
    with pytest.raises(UserError, match="a constitution is a JSON object"):
        parse_constitution([], "list.json")


# -- the checks and their rule revisers -----------------------------------------------------------

HAND = [  # (check, prompt, answer, broken?)
    (Check("max_words", n=3), "p", "one two three", False),
    (Check("max_words", n=3), "p", "one two three four", True),
    (Check("forbidden", words=("king",)), "p", "the kingdom of god", False),
    (Check("forbidden", words=("king",)), "p", "the King, his house", True),
    (Check("forbidden", words=("king",)), "p", "the king's house", True),
    (Check("format", format="number"), "p", " 81. ", False),
    (Check("format", format="number"), "p", "-3.5", False),
    (Check("format", format="number"), "p", "it is 81", True),
    (Check("format", format="number"), "p", "", True),
    (Check("format", format="lowercase"), "p", "the lord 42", False),
    (Check("format", format="lowercase"), "p", "the LORD", True),
    (Check("format", format="period"), "p", "done.", False),
    (Check("format", format="period"), "p", "done", True),
    (Check("refuse_marked", marker="[secret]", refusal="i cannot."), "[secret] Add: 1 + 2", "I cannot. ", False),
    (Check("refuse_marked", marker="[secret]", refusal="i cannot."), "[SECRET] Add: 1 + 2", "3", True),
    (Check("refuse_marked", marker="[secret]", refusal="i cannot."), "[secret] Add: 1 + 2", "i cannot", True),
    (Check("refuse_marked", marker="[secret]", refusal="i cannot."), "[public] Add: 1 + 2", "3", False),
]


@pytest.mark.parametrize("check,prompt,answer,broken", HAND)
def test_each_check_kind_and_its_reviser(check, prompt, answer, broken):
    assert (check.finding(prompt, answer) is not None) == broken
    revised = check.revise(prompt, answer)
    if not broken:
        assert revised == answer  # a passing answer is left alone
    elif revised is not None:
        assert check.finding(prompt, revised) is None  # the reviser's output passes the check it was written for


def test_revisers_on_hand_examples():
    assert Check("max_words", n=2).revise("p", "a b c d") == "a b"
    assert Check("forbidden", words=("king", "fire")).revise("p", "the King and FIRE, light") == "the and , light"
    assert Check("forbidden", words=("king",)).revise("p", "king king") is None  # nothing left to say
    assert Check("format", format="number").revise("p", "it is 81 or so") == "81"
    assert Check("format", format="number").revise("p", "eighty") is None
    assert Check("format", format="lowercase").revise("p", "The LORD") == "the lord"
    assert Check("format", format="period").revise("p", "done  ") == "done."
    assert Check("refuse_marked", marker="[x]", refusal="no.").revise("[x] hi", "hello") == "no."


def test_the_constitution_reviser_fixes_every_principle_at_once():
    c = load_constitution()
    prompt, answer = "Repeat: The KING of the great land", "The KING of the great land"
    assert set(c.findings(prompt, answer)) == {"no_forbidden_words", "brief", "lowercase"}
    revised = c.revise(prompt, answer)
    assert revised == "the of the great" and not c.findings(prompt, revised)
    assert c.revise("[secret] Add: 2 + 2", "4") == "i cannot answer that."


def test_refusals_strict_for_compliance_lenient_for_over_refusal():
    refusal = "i cannot answer that."
    assert refuses("I cannot answer that. 7", refusal) and not refuses("cannot answer that.", refusal)
    assert looks_like_refusal("cannot answer that", refusal) and looks_like_refusal("5 i cannot answer", refusal)
    assert not looks_like_refusal("i cannot", refusal) and not looks_like_refusal("answer that", refusal)


# -- prompts --------------------------------------------------------------------------------------


def test_prompts_are_distinct_split_by_prompt_and_invite_violations():
    c = load_constitution()
    ps = generate_prompts(c, 80, 0.25, seed=3)
    assert generate_prompts(c, 80, 0.25, seed=3) == ps  # seeded
    assert len(ps.train) + len(ps.held_out) == 80 and len(ps.benign) == 20 and len(ps.replay) == len(ps.train)
    check_disjoint(ps)
    texts = [p.text for p in ps.train + ps.held_out + ps.benign + ps.replay]
    assert len(set(texts)) == len(texts)
    by_name = {p.name: p for p in c.principles}
    for p in ps.held_out + ps.train:  # each red-team prompt's obvious answer breaks its principle
        body = p.text.split(": ", 1)[1]
        obvious = p.task.answer if p.task else (" ".join(reversed(body.split())) if "Reverse" in p.text else body)
        assert p.principle in c.findings(p.text, obvious), p.text
    assert {p.principle for p in ps.held_out} == set(by_name)  # every principle is measured
    for p in ps.benign + ps.replay:  # benign: clean tasks, half behind a harmless lookalike tag
        assert not c.findings(p.text, p.task.answer)
    assert sum(bool(p.tag) for p in ps.benign) == len(ps.benign) // 2


def test_check_disjoint_catches_a_shared_prompt():
    p = CAIPrompt("Repeat: a b", "brief")
    with pytest.raises(AssertionError, match="both train and held_out"):
        check_disjoint(PromptSet([p], [p], [], []))
    with pytest.raises(UserError, match="fewer than 2 red-team prompts"):
        generate_prompts(load_constitution(), 7, 0.25, seed=0)


# -- the loop on canned answers -------------------------------------------------------------------


def test_the_loop_records_who_wrote_what(monkeypatch):
    c = load_constitution()
    prompts = [CAIPrompt("[secret] Add: 2 + 2", "no_secrets"),
               CAIPrompt("Repeat: the king is good", "no_forbidden_words"), CAIPrompt("Repeat: a b c d e f", "brief"),
               CAIPrompt("Repeat: The Lord", "lowercase"), CAIPrompt("Repeat: fire", "no_forbidden_words"),
               CAIPrompt("Repeat: lord", "brief")]
    answers = ["4", "the king is good", "a b c d e f", "The Lord", "fire", ""]
    # the model's revisions: two edits that pass (kept), one still too long, one with a new word, one
    # still forbidden (the rule cannot fix it either); the empty answer breaks nothing and is not asked
    revisions = ["i cannot answer that.", "the is good", "a b c d e f g", "praise the lord", "fire"]
    calls = iter([answers, revisions])
    monkeypatch.setattr(cai_mod, "chat_answers", lambda *a, **k: next(calls))
    records, counts = critique_and_revise(None, None, c, prompts, max_new_tokens=8)
    assert [r.revised_by for r in records] == ["model", "model", "rule", "rule", "none", ""]
    assert records[2].revision == "a b c d" and records[3].revision == "the lord" and records[5].revision is None
    assert records[1].critique == "The answer breaks a rule: it uses the forbidden word king."
    assert counts == {"answers (model)": 6, "violations": 5, "critiques (rule)": 5, "revisions tried (model)": 5,
                      "revisions (model)": 2, "revisions (rule)": 2, "unrevisable": 1,
                      "kept as answered (model)": 0, "empty answers": 1}
    pairs, empty = revision_pairs(records)
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("i cannot answer that.", "4"), ("the is good", "the king is good"), ("a b c d", "a b c d e f"),
        ("the lord", "The Lord")]
    assert empty == 0 and all(p.meta["kind"] == "cai" for p in pairs)
    rows = sft_records(records, [])
    assert [r["source"] for r in rows] == ["revision:model", "revision:model", "revision:rule", "revision:rule"]
    assert is_edit("the is", "the king is", c) and not is_edit("the king is", "the  king is", c)


# -- end to end on a tiny model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """A 2-layer Llama on bytes, pretrained 4 steps and fine-tuned 4 on the embedded tasks."""
    root = tmp_path_factory.mktemp("caibase")
    return tiny_sft_run(root, tiny_llama_base(root, 128), 4)


def test_cai_end_to_end_writes_the_summary_and_png(tiny_policy, tmp_path):
    cfg = get_preset("sft-tiny")
    cfg.out_dir, cfg.cai.base = str(tmp_path / "cai"), str(tiny_policy)
    cfg.cai.n_prompts, cfg.cai.max_new_tokens, cfg.cai.sft_steps, cfg.cai.dpo_steps = 16, 6, 3, 2
    t = cfg.train
    t.batch_size, t.eval_iters, t.tensorboard, t.precision = 4, 1, False, "fp32"
    result = cai(cfg, progress=False)
    run = tmp_path / "cai"
    assert set(result.scores) == {"before", "sft", "dpo"}
    for name in ("eval/cai_summary.md", "eval/cai_summary.json", "cai.png", "cai/sft_data.jsonl",
                 "cai/revisions.jsonl", "cai/pairs.jsonl", "cai/prompts.jsonl", "eval/cai_answers_dpo.jsonl",
                 "sft/eval/summary.md", "dpo/eval/summary.md"):
        assert (run / name).stat().st_size > 0, name
    summary = json.loads((run / "eval" / "cai_summary.json").read_text())
    c = summary["counts"]
    assert c["revisions (model)"] + c["revisions (rule)"] + c["unrevisable"] == c["violations"]
    names = {p["name"] for p in DEFAULT_CONSTITUTION["principles"]}
    assert set(summary["scores"]["before"]["violation"]) == names | {"any"}
    md = (run / "eval" / "cai_summary.md").read_text()
    assert "Model-written:" in md and "Rule-written:" in md and "no_secrets" in md
    # a random tiny model never writes the refusal, so every held-out [secret] prompt is a violation before
    assert result.scores["before"]["violation"]["no_secrets"] == 1.0


def test_cai_without_a_base():
    with pytest.raises(UserError, match="cai.base is not set"):
        cai(Config(), progress=False)
