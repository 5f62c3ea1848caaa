"""A cloze multiple-choice task made from held-out documents only, and the 13-gram check that keeps it
held out.

An item is one sentence of a validation document with its last `tail` words cut off: the context is the
sentence before it (when there is one) and the sentence's opening, the right option those `tail` words, and
the wrong options the closing `tail` words of other validation sentences. Items are drawn in a seeded
order; any item whose text (context + each option) shares a word 13-gram with the training split is
dropped, the decontamination rule lm-eval and the GPT-3 paper use, and `build_cloze` asserts that none is left.
Words are compared lower-cased with punctuation stripped, so "LORD," and "lord" are one word.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

from scratchlm.eval.choice import ChoiceItem

NGRAM = 13
_SENTENCE_END = re.compile(r"(?<=[.?!;:])\s+")
_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def ngram_set(texts: Iterable[str], n: int = NGRAM) -> set[int]:
    """Hashes of every word n-gram of the texts (hashes keep a corpus's set in memory)."""
    out: set[int] = set()
    for text in texts:
        w = words(text)
        out.update(hash(tuple(w[i : i + n])) for i in range(len(w) - n + 1))
    return out


def item_texts(item: ChoiceItem) -> list[str]:
    """What an item shows a model: its context followed by each option."""
    return [f"{item.context} {choice}" for choice in item.choices]


def overlaps(item: ChoiceItem, train_grams: set[int], n: int = NGRAM) -> bool:
    return any(hash(g) in train_grams for text in item_texts(item) for g in ngrams(text, n))


def build_cloze(val_texts: Sequence[str], train_grams: set[int], n_items: int, *, seed: int = 0, tail: int = 4,
                n_choices: int = 4, min_words: int = 10) -> list[ChoiceItem]:
    """Up to n_items cloze items from the validation texts, none sharing a 13-gram with `train_grams`
    (`ngram_set` of the training split's texts)."""
    sentences = []  # (previous sentence or "", sentence)
    for text in val_texts:
        parts = [p.strip() for p in _SENTENCE_END.split(text) if p.strip()]
        sentences += [(parts[i - 1] if i else "", s) for i, s in enumerate(parts) if len(s.split()) >= min_words]
    endings = sorted({" ".join(s.split()[-tail:]) for _, s in sentences})
    rng = random.Random(seed)
    order = list(range(len(sentences)))
    rng.shuffle(order)
    items: list[ChoiceItem] = []
    for i in order:
        if len(items) == n_items:
            break
        before, sentence = sentences[i]
        w = sentence.split()
        right = " ".join(w[-tail:])
        context = (before + " " if before else "") + " ".join(w[:-tail])
        wrong = rng.sample([e for e in endings if e != right], min(n_choices - 1, len(endings) - 1))
        if len(wrong) < n_choices - 1:
            break
        label = rng.randrange(n_choices)
        choices = wrong[:label] + [right] + wrong[label:]
        item = ChoiceItem(context, choices, label, f"cloze:{len(items)}")
        if not overlaps(item, train_grams):
            items.append(item)
    assert not any(overlaps(it, train_grams) for it in items), "a cloze item shares a 13-gram with training"
    return items
