"""One table for a model's whole post-training: each stage's policy (SFT, DPO, GRPO, PPO, ...) on the
same held-out task prompts, which no stage trained on (asserted): greedy checker accuracy per
family, the reward model's mean score of those answers, and the KL to the SFT policy (nats per
answer, sampled at temperature 1 from the stage's policy).
"""

from __future__ import annotations

from pathlib import Path

import torch

from scratchlm import checkpoint as ckpt_io
from scratchlm.align.data import PreferencePair, tokenize_pair
from scratchlm.align.reward import reward_of_rows
from scratchlm.config import SampleConfig
from scratchlm.rl.stage import checker_scores, kl_to_reference, sft_prompts
from scratchlm.tasks.answers import chat_answers
from scratchlm.tasks.families import Task, generate_tasks


def unseen_tasks(runs: list[str | Path], n: int, seed: int) -> list[Task]:
    """n embedded tasks none of the runs (nor the runs they started from) trained on."""
    seen: set[str] = set()
    for run in runs:
        seen |= sft_prompts(run)
    tasks = [t for t in generate_tasks(len(seen) + n + 1000, seed) if t.instruction not in seen][:n]
    assert not {t.instruction for t in tasks} & seen, "held-out prompts overlap a stage's training prompts"
    return tasks


@torch.no_grad()
def stage_table(stages: dict[str, str | Path], sft: str | Path, rm: str | Path | None, tasks: list[Task],
                max_new_tokens: int = 24, seed: int = 0) -> tuple[str, dict[str, dict]]:
    """(markdown table, numbers) for each named stage run on `tasks`."""
    reference, tok, _ = ckpt_io.load_policy(sft)
    reference.eval()
    reward_model = ckpt_io.load_reward_model(rm)[0] if rm else None
    numbers: dict[str, dict] = {}
    families = sorted({t.family for t in tasks})
    for name, run in stages.items():
        policy = reference if Path(run) == Path(sft) else ckpt_io.load_policy(run)[0].eval()
        scores = checker_scores(policy, tok, tasks, max_new_tokens)
        row = {f: scores[f]["checked"] for f in families + ["all"]}
        if reward_model is not None:
            sample = SampleConfig(max_new_tokens=max_new_tokens, temperature=0.0, stream=False)
            answers = chat_answers(policy, tok, [[("user", t.instruction)] for t in tasks], sample, batch=256)
            rows = [tokenize_pair(PreferencePair([("user", t.instruction)], a or " ", a or " ", "eval"), tok,
                                  reward_model.config.block_size)[0] for t, a in zip(tasks, answers)]
            row["rm"] = sum(reward_of_rows(reward_model, rows)) / len(rows)
        row["kl"] = 0.0 if policy is reference else kl_to_reference(policy, reference, tok, tasks, max_new_tokens,
                                                                      seed)
        numbers[name] = row
    head = ["stage", *families, "all"] + (["RM score"] if reward_model is not None else []) + ["KL to SFT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in numbers.items():
        cells = [name] + [f"{row[f]:.1%}" for f in families + ["all"]]
        cells += [f"{row['rm']:+.2f}"] if "rm" in row else []
        lines.append("| " + " | ".join(cells + [f"{row['kl']:.2f}"]) + " |")
    return "\n".join(lines), numbers
