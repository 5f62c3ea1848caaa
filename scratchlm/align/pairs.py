"""On-policy preference pairs: the SFT model's own answers, a right one preferred to a wrong one.

For each embedded task prompt the model answers `samples` times through the `Engine` (temperature
`temperature`, the unfiltered distribution); the family's checker judges each answer. A prompt
where some answers are right and some wrong gives one pair: the first right answer is chosen, the
first wrong one rejected (first in sampling order, so the pair does not favour short or long
answers). Prompts the model always gets right, or always wrong, give no pair; their counts are
returned, since they say how much signal the model's own samples carry.
"""

from __future__ import annotations

from torch import nn

from scratchlm.align.data import PreferencePair
from scratchlm.config import SampleConfig
from scratchlm.tasks.answers import chat_answers
from scratchlm.tasks.families import Task, check
from scratchlm.tokenizer import Tokenizer


def on_policy_pairs(model: nn.Module, tok: Tokenizer, tasks: list[Task], *, samples: int = 8,
                    temperature: float = 1.0, max_new_tokens: int = 24, seed: int = 0
                    ) -> tuple[list[PreferencePair], dict[str, int]]:
    """(pairs, counts): counts "pairs", "all_right", "all_wrong" (prompts), "samples" (answers drawn)."""
    sample = SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stream=False)
    prompts = [[("user", t.instruction)] for t in tasks for _ in range(samples)]
    answers = chat_answers(model, tok, prompts, sample, batch=64)
    pairs: list[PreferencePair] = []
    counts = {"pairs": 0, "all_right": 0, "all_wrong": 0, "samples": len(answers)}
    for i, task in enumerate(tasks):
        drawn = answers[i * samples : (i + 1) * samples]
        right = [a for a in drawn if check(task.family, task, a)]
        wrong = [a for a in drawn if a not in right and a.strip()]
        if not right:
            counts["all_wrong"] += 1
        elif not wrong:
            counts["all_right"] += 1
        else:
            pairs.append(PreferencePair([("user", task.instruction)], right[0], wrong[0], f"on_policy:{i}",
                                        {"kind": "on_policy", "family": task.family, "difficulty": task.difficulty}))
    counts["pairs"] = len(pairs)
    return pairs, counts
