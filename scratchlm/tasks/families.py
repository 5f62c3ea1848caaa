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


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("repeat", "Repeat: ", _repeat, _judge_repeat),
    Family("count", "How many words: ", _count, _judge_count),
    Family("reverse", "Reverse the words: ", _reverse, _judge_reverse),
    Family("sort", "Sort: ", _sort, _judge_sort),
    Family("add", "Add: ", _add, _judge_add),
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


_MAX_REDRAWS = 1000  # consecutive duplicates before a family counts as exhausted


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
