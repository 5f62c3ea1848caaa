"""The embedded SFT data: small verifiable tasks generated here, so the demo needs no download.

Each task family produces (instruction, answer) pairs in a fixed answer format, with a checker
that says whether a generated answer is right, and a difficulty from 1 (easy) to 3:
- repeat:  "Repeat: the lord is my shepherd" -> "the lord is my shepherd" (copying: the easiest)
- count:   "How many words: a b c d" -> "4"
- reverse: "Reverse the words: one two three" -> "three two one"
- sort:    "Sort: 5 2 9" -> "2 5 9"
- add:     "Add: 23 + 58" -> "81"
Words come from a fixed list of common English words so any tokenizer trained on English covers
them. The generator is seeded: the same seed gives the same data.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

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


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def _repeat(rng: random.Random) -> Task:
    n = rng.randint(2, 6)
    text = " ".join(_words(rng, n))
    return Task("repeat", f"Repeat: {text}", text, 1 if n <= 3 else 2)


def _count(rng: random.Random) -> Task:
    n = rng.randint(1, 9)
    return Task("count", f"How many words: {' '.join(_words(rng, n))}", str(n), 1 if n <= 4 else 2)


def _reverse(rng: random.Random) -> Task:
    n = rng.randint(2, 5)
    w = _words(rng, n)
    return Task("reverse", f"Reverse the words: {' '.join(w)}", " ".join(reversed(w)), 2 if n <= 3 else 3)


def _sort(rng: random.Random) -> Task:
    n = rng.randint(2, 5)
    nums = [rng.randint(0, 9) for _ in range(n)]
    return Task("sort", f"Sort: {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums))), 2 if n <= 3 else 3)


def _add(rng: random.Random) -> Task:
    hi = rng.choice((9, 99))
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    return Task("add", f"Add: {a} + {b}", str(a + b), 2 if hi == 9 else 3)


FAMILIES: dict[str, Callable[[random.Random], Task]] = {
    "repeat": _repeat, "count": _count, "reverse": _reverse, "sort": _sort, "add": _add,
}


def generate_tasks(n: int, seed: int = 0, families: tuple[str, ...] = tuple(FAMILIES)) -> list[Task]:
    """n tasks, cycling through the families so each gets n / len(families)."""
    rng = random.Random(seed)
    return [FAMILIES[families[i % len(families)]](rng) for i in range(n)]


def check(task_family: str, answer: str, generated: str) -> bool:
    """The task-specific checker: exact match after trimming whitespace and a trailing period."""
    return generated.strip().rstrip(".").strip() == answer.strip()
