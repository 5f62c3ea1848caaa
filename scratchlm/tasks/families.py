"""The embedded verifiable tasks: small task families generated here, so the demo needs no download.

Each family draws (instruction, answer) pairs in a fixed prompt format, and judges an answer by
what it means, reading the task's inputs back from the prompt (so a checker needs no gold string:
preference pairs, RL rewards and evaluation can all call `check(family, prompt_or_task, answer)`):
- repeat:  "Repeat: the lord is my shepherd" -> "the lord is my shepherd"  (the same words, in order)
- count:   "How many words: a b c d" -> "4"                                (the number's value)
- reverse: "Reverse the words: one two three" -> "three two one"          (the words, reversed)
- sort:    "Sort: 5 2 9" -> "2 5 9"                                        (same multiset, non-decreasing)
- add:     "Add: 23 + 58" -> "81"                                          (the number's value)
Answers are read leniently where the meaning is unchanged: surrounding whitespace, one trailing
period, letter case for words, "81.0" for 81, commas between sorted numbers. The string metrics
of `scratchlm.tasks.metrics` cannot: their exact match fails "81.0" and passes "8.1" (punctuation stripped) for
81, and passes "lord is" for "the lord is" (articles stripped); the checkers do the reverse.

Each family also corrupts an answer (`corrupt`): a wrong answer of the same surface form, for
preference pairs whose rejected side differs from the chosen one in meaning, not in shape:
- repeat:  one word swapped for another word of the list    ("the lord is my king")
- count, add: the number off by a little (1 or 2; add also by 10, a carry lost), never below 1 or 0
- reverse: two adjacent words swapped, or the words in their original order
- sort:    two adjacent unequal numbers swapped, or the original order
Same length in words (a count stays one number), so a scorer that reads only the length or the
format cannot tell the pairs apart. Every corruption is judged wrong by the family's own checker
before it is returned. Where no reordering is wrong (all words or numbers equal: "Sort: 3 3"),
reverse swaps a word and sort moves one number by one.

Difficulty runs from 1 (easy) to 3. Words come from a fixed list of common English words so any
tokenizer trained on English covers them. Generation is seeded (the same seed gives the same
tasks) and gives distinct prompts: several families draw from small spaces (one-digit sums:
100 prompts), and a prompt drawn twice could land in training and in the held-out set at once.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from scratchlm.errors import UserError

_WORD_TEXT = (
    "the and of to in that he for is his they be with not all him was it i shall unto lord god said them "
    "thou thy which my me her have from their will ye are but as this day land people house king son man "
    "come go out up hand earth name heart good great water fire light word city way life"
)
WORDS = _WORD_TEXT.split()


@dataclass(frozen=True)
class Task:
    family: str
    instruction: str
    answer: str
    difficulty: int


@dataclass(frozen=True)
class Family:
    """A task family: its prompt prefix, a generator, and a judge of (prompt body, answer)."""

    name: str
    prefix: str  # every prompt of the family is prefix + body
    generate: Callable[[random.Random], Task]
    judge: Callable[[str, str], bool]  # (body, answer) -> is the answer right
    corruption: Callable[[str, str, random.Random], str] | None = None  # (body, answer, rng) -> a wrong answer


# -- reading answers ------------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")


def _trim(text: str) -> str:
    """Surrounding whitespace and one trailing period off: "81." and " 81" say 81."""
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def _number(text: str) -> Decimal | None:
    """The value of a plain decimal number ("81", "81.0", "-3"), or None for anything else.
    Decimal, not float: equal values compare equal exactly ("81.0" == 81)."""
    return Decimal(text) if _NUMBER.fullmatch(text) else None


def _numbers(text: str) -> list[Decimal] | None:
    """Numbers separated by whitespace or commas ("2 5 9", "2, 5, 9"); None if any part is not one."""
    values = []
    for part in re.split(r"[\s,]+", text.strip()):
        value = _number(part)
        if value is None:
            return None
        values.append(value)
    return values


def _words(text: str) -> list[str]:
    """Words, case-folded, whitespace collapsed: the task words are lowercase and carry no punctuation."""
    return text.casefold().split()


# -- the families: generate, and judge from the prompt --------------------------------------------


def _draw_words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def _repeat(rng: random.Random) -> Task:
    n = rng.randint(2, 6)
    text = " ".join(_draw_words(rng, n))
    return Task("repeat", f"Repeat: {text}", text, 1 if n <= 3 else 2)


def _judge_repeat(body: str, answer: str) -> bool:
    return _words(_trim(answer)) == _words(body)


def _count(rng: random.Random) -> Task:
    n = rng.randint(1, 9)
    return Task("count", f"How many words: {' '.join(_draw_words(rng, n))}", str(n), 1 if n <= 4 else 2)


def _judge_count(body: str, answer: str) -> bool:
    return _number(_trim(answer)) == len(body.split())


def _reverse(rng: random.Random) -> Task:
    n = rng.randint(2, 5)
    w = _draw_words(rng, n)
    return Task("reverse", f"Reverse the words: {' '.join(w)}", " ".join(reversed(w)), 2 if n <= 3 else 3)


def _judge_reverse(body: str, answer: str) -> bool:
    return _words(_trim(answer)) == _words(body)[::-1]


def _sort(rng: random.Random) -> Task:
    n = rng.randint(2, 5)
    nums = [rng.randint(0, 9) for _ in range(n)]
    return Task("sort", f"Sort: {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums))), 2 if n <= 3 else 3)


def _judge_sort(body: str, answer: str) -> bool:
    given, got = _numbers(body), _numbers(_trim(answer))
    if given is None:
        raise UserError(f"sort prompt {body!r}: expected numbers", fix="use the form 'Sort: 5 2 9'")
    return got is not None and Counter(got) == Counter(given) and all(a <= b for a, b in zip(got, got[1:]))


def _add(rng: random.Random) -> Task:
    hi = rng.choice((9, 99))
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    return Task("add", f"Add: {a} + {b}", str(a + b), 2 if hi == 9 else 3)


def _judge_add(body: str, answer: str) -> bool:
    left, plus, right = body.partition("+")
    a, b = _number(left.strip()), _number(right.strip())
    if not plus or a is None or b is None:
        raise UserError(f"add prompt {body!r}: expected two numbers", fix="use the form 'Add: 23 + 58'")
    return _number(_trim(answer)) == a + b


# -- corruptions: a wrong answer of the right form (the checker confirms it is wrong) ---------------


def _swap_word(words: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(words))
    return words[:i] + [rng.choice([w for w in WORDS if w != words[i]])] + words[i + 1:]


def _swap_adjacent(items: list, rng: random.Random) -> list | None:
    """Two neighbours that differ, swapped; None when all items are equal (no swap changes the order)."""
    spots = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
    if not spots:
        return None
    i = rng.choice(spots)
    return items[:i] + [items[i + 1], items[i]] + items[i + 2:]


def _corrupt_repeat(body: str, answer: str, rng: random.Random) -> str:
    return " ".join(_swap_word(answer.split(), rng))


def _off_by(answer: str, rng: random.Random, steps: tuple[int, ...], floor: int) -> str:
    value = int(answer)
    return str(rng.choice([value + s for s in steps if value + s >= floor]))


def _corrupt_count(body: str, answer: str, rng: random.Random) -> str:
    return _off_by(answer, rng, (-2, -1, 1, 2), floor=1)  # no prompt has zero words: "0" would be a giveaway


def _corrupt_add(body: str, answer: str, rng: random.Random) -> str:
    return _off_by(answer, rng, (-10, -2, -1, 1, 2, 10), floor=0)


def _reorder(original: list[str], answer: list[str], rng: random.Random) -> list[str] | None:
    """The original order or two adjacent items of the answer swapped, whichever differs from the answer."""
    options = [o for o in (original, _swap_adjacent(answer, rng)) if o is not None and o != answer]
    return rng.choice(options) if options else None


def _corrupt_reverse(body: str, answer: str, rng: random.Random) -> str:
    words = answer.split()
    return " ".join(_reorder(body.split(), words, rng) or _swap_word(words, rng))


def _corrupt_sort(body: str, answer: str, rng: random.Random) -> str:
    nums = answer.split()
    wrong = _reorder(body.split(), nums, rng)
    if wrong is None:  # every number equal: one of them moved by one, still a digit
        i, v = rng.randrange(len(nums)), int(nums[0])
        wrong = nums[:i] + [str(v + 1 if v < 9 else v - 1)] + nums[i + 1:]
    return " ".join(wrong)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("repeat", "Repeat: ", _repeat, _judge_repeat, _corrupt_repeat),
    Family("count", "How many words: ", _count, _judge_count, _corrupt_count),
    Family("reverse", "Reverse the words: ", _reverse, _judge_reverse, _corrupt_reverse),
    Family("sort", "Sort: ", _sort, _judge_sort, _corrupt_sort),
    Family("add", "Add: ", _add, _judge_add, _corrupt_add),
)}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown task family {name!r}", fix=f"use one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def check(family_name: str, prompt_or_task: str | Task, answer: str) -> bool:
    """Whether `answer` is right for the task: a Task, or the prompt (instruction) it was asked with.
    Judged from the prompt's own inputs by the family's meaning (see the module docstring)."""
    fam = family(family_name)
    prompt = prompt_or_task.instruction if isinstance(prompt_or_task, Task) else prompt_or_task
    if not prompt.startswith(fam.prefix):
        raise UserError(f"{prompt[:60]!r} is not a prompt of the {fam.name} family",
                        fix=f"it should start with {fam.prefix!r}")
    return fam.judge(prompt[len(fam.prefix):], answer)


_MAX_REDRAWS = 1000  # draws before giving up: duplicate prompts in a row, or corruptions judged right


def generate_tasks(n: int, seed: int = 0, families: tuple[str, ...] = tuple(FAMILIES)) -> list[Task]:
    """n tasks with distinct prompts, cycling through the families so each gets n / len(families).
    A prompt drawn before is redrawn; a family with no new prompt left is an error, not a repeat."""
    rng = random.Random(seed)
    seen: set[str] = set()
    tasks = []
    for i in range(n):
        fam = family(families[i % len(families)])
        for _ in range(_MAX_REDRAWS):
            task = fam.generate(rng)
            if task.instruction not in seen:
                break
        else:
            raise UserError(f"sft.n_tasks={n}: the {fam.name} family ran out of distinct prompts after "
                            f"{sum(t.family == fam.name for t in tasks)}", fix="lower --sft.n_tasks")
        seen.add(task.instruction)
        tasks.append(task)
    return tasks


def corrupt(task: Task, rng: random.Random) -> str:
    """A wrong answer to `task` of the same surface form as its answer (see the module docstring),
    redrawn until the family's checker judges it wrong."""
    fam = family(task.family)
    if fam.corruption is None:
        raise UserError(f"the {fam.name} family has no corruption", fix="give its Family a corruption function")
    body = task.instruction[len(fam.prefix):]
    for _ in range(_MAX_REDRAWS):
        wrong = fam.corruption(body, task.answer, rng)
        if not check(fam.name, task, wrong):
            return wrong
    raise AssertionError(f"{task}: no corruption the {fam.name} checker judges wrong in {_MAX_REDRAWS} draws")
