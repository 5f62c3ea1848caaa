"""The embedded task families: each family's checker judges by meaning, where the string metrics
disagree; every generated task passes its own checker; generation is seeded and gives distinct prompts;
every corruption is a wrong answer of the same form."""

from __future__ import annotations

import random
import re

import pytest

from scratchlm.errors import UserError
from scratchlm.tasks import families as tasks
from scratchlm.tasks.families import FAMILIES, WORDS, Family, Task, check, corrupt, generate_tasks
from scratchlm.tasks.metrics import exact_match

# (family, prompt, gold, answer, checker's verdict): in every row the checker and the report's exact
# match (tasks/metrics.py: lowercase, punctuation and articles removed) disagree.
DISAGREE = [
    ("add", "Add: 23 + 58", "81", "81.0", True),  # the same number; exact match reads "810"
    ("add", "Add: 23 + 58", "81", "8.1", False),  # another number; exact match reads "81"
    ("count", "How many words: the lord is my", "4", "4.0", True),
    ("count", "How many words: the lord is my", "4", "-4", False),  # exact match drops the minus sign
    ("sort", "Sort: 5 2 9 2", "2 2 5 9", "2,2,5,9", True),  # exact match reads "2259"
    ("sort", "Sort: 5 2 9 2", "2 2 5 9", "-2 2 5 9", False),  # a different multiset
    ("repeat", "Repeat: the lord is my king", "the lord is my king", "lord is my king", False),  # article lost
    ("reverse", "Reverse the words: the king is good", "good is king the", "good is king", False),
]


@pytest.mark.parametrize("family, prompt, gold, answer, right", DISAGREE)
def test_checker_judges_by_meaning_where_exact_match_does_not(family, prompt, gold, answer, right):
    assert check(family, prompt, gold)
    assert check(family, prompt, answer) is right
    assert exact_match(answer, gold) == float(not right)


@pytest.mark.parametrize("family, prompt, right, wrong", [
    ("add", "Add: 23 + 58", ["81", " 81.", "81.0", "+81"], ["18", "80", "81 82", "eighty-one", "", "81.5"]),
    ("count", "How many words: a b c", ["3", "3.", " 3 ", "3.00"], ["4", "three", "33", "3 words"]),
    ("sort", "Sort: 5 2 9 2", ["2 2 5 9", "2, 2, 5, 9", " 2 2 5 9.", "2.0 2 5 9"],
     ["2 5 9", "2 2 9 5", "9 5 2 2", "2 2 5 9 9", "2 2 5 x", ""]),
    ("repeat", "Repeat: the lord is my king",
     ["the lord is my king", "The Lord  is my king.", " the lord is my king\n"],
     ["the lord is king my", "the lord is my", "thelord is my king"]),
    ("reverse", "Reverse the words: the king is good", ["good is king the", "Good is king the."],
     ["the king is good", "good is the king", "good is king the the"]),
])
def test_each_family_right_and_wrong_answers(family, prompt, right, wrong):
    assert all(check(family, prompt, a) for a in right), [a for a in right if not check(family, prompt, a)]
    assert not any(check(family, prompt, a) for a in wrong), [a for a in wrong if check(family, prompt, a)]


def test_every_generated_task_passes_its_own_checker_and_a_wrong_answer_fails():
    for t in generate_tasks(300, seed=5):
        assert check(t.family, t, t.answer) and check(t.family, t.instruction, t.answer)
        assert not check(t.family, t, t.answer + " 1"), t


def test_checker_refuses_what_it_cannot_judge():
    with pytest.raises(UserError, match="unknown task family 'multiply'"):
        check("multiply", "Multiply: 2 * 3", "6")
    with pytest.raises(UserError, match="is not a prompt of the add family"):
        check("add", "Sort: 1 2", "3")
    with pytest.raises(UserError, match="add prompt"):
        check("add", "Add: 2 plus 3", "5")


def test_generation_is_seeded_balanced_and_distinct():
    generated = generate_tasks(3000, seed=1337)
    assert generated == generate_tasks(3000, seed=1337) and generated != generate_tasks(3000, seed=1)
    assert len({t.instruction for t in generated}) == 3000  # one-digit sums alone have only 100 prompts
    assert {f: sum(t.family == f for t in generated) for f in FAMILIES} == dict.fromkeys(FAMILIES, 600)


def test_a_family_out_of_prompts_is_an_error(monkeypatch):
    def coin(rng: random.Random) -> Task:
        side = rng.choice(("heads", "tails"))
        return Task("coin", f"Repeat: {side}", side, 1)

    monkeypatch.setitem(FAMILIES, "coin", Family("coin", "Repeat: ", coin, FAMILIES["repeat"].judge))
    assert sorted(t.answer for t in tasks.generate_tasks(2, families=("coin",))) == ["heads", "tails"]
    with pytest.raises(UserError, match="coin family ran out of distinct prompts after 2"):
        tasks.generate_tasks(3, families=("coin",))


def test_every_corruption_is_judged_wrong_and_every_gold_right_over_500_tasks_per_family():
    rng = random.Random(0)
    generated = generate_tasks(500 * len(FAMILIES), seed=11)
    for t in generated:
        wrong = corrupt(t, rng)
        assert check(t.family, t, t.answer) and not check(t.family, t, wrong), (t, wrong)
    assert {f: sum(t.family == f for t in generated) for f in FAMILIES} == dict.fromkeys(FAMILIES, 500)


def test_a_corruption_keeps_the_answers_form():
    rng = random.Random(1)
    for t in generate_tasks(1000, seed=12):
        wrong = corrupt(t, rng)
        if t.family in ("count", "add"):  # a number stays a whole number (count: never 0 words)
            assert re.fullmatch(r"\d+", wrong) and int(wrong) >= (1 if t.family == "count" else 0), (t, wrong)
        else:  # the same number of words, drawn from the task's vocabulary
            assert len(wrong.split()) == len(t.answer.split()), (t, wrong)
            if t.family == "sort":
                assert all(re.fullmatch(r"\d", w) for w in wrong.split()) and wrong != t.answer, (t, wrong)
            else:
                assert set(wrong.split()) <= set(WORDS), (t, wrong)
        if t.family in ("reverse", "sort") and len(set(t.answer.split())) > 1:  # a reordering: the same items
            assert sorted(wrong.split()) == sorted(t.answer.split()), (t, wrong)


def test_corruptions_where_no_reordering_is_wrong_and_their_seeding():
    rng = random.Random(2)
    same = [Task("sort", "Sort: 3 3", "3 3", 2), Task("sort", "Sort: 9 9 9", "9 9 9", 3),
            Task("reverse", "Reverse the words: the the", "the the", 2), Task("count", "How many words: a", "1", 1),
            Task("add", "Add: 0 + 0", "0", 2)]
    for t in same:
        for _ in range(20):
            wrong = corrupt(t, rng)
            assert not check(t.family, t, wrong) and len(wrong.split()) == len(t.answer.split()), (t, wrong)
    tasks_ = generate_tasks(50, seed=3)
    first = [corrupt(t, random.Random(4)) for t in tasks_]
    assert first == [corrupt(t, random.Random(4)) for t in tasks_]


def test_a_family_without_a_corruption_says_so(monkeypatch):
    monkeypatch.setitem(FAMILIES, "coin", Family("coin", "Repeat: ", FAMILIES["repeat"].generate,
                                                 FAMILIES["repeat"].judge))
    with pytest.raises(UserError, match="the coin family has no corruption"):
        corrupt(Task("coin", "Repeat: heads", "heads", 1), random.Random(0))
