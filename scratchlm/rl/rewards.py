"""Where an RL answer's reward comes from: the task family's checker, a trained reward model, or both.

- checker: 1.0 when the family's own checker judges the answer right from the prompt's inputs, else
  0.0 (exact and rule-checked: it cannot be hacked, only satisfied).
- rm: the reward model's score of prompt + answer (+ <|end|> when the answer stopped), on the very
  token ids the policy sampled; the reward model must share the policy's tokenizer (checked by
  fingerprint), or those ids would mean other text to it.
- both: checker + rm_weight x rm.
Then `format_reward` is added to answers that stopped at <|end|> (not cut at the length limit), and
rewards are clipped to [-reward_clip, reward_clip] when set. The parts are returned beside the total,
so the log can show the checker's accuracy and the reward model's score apart: a reward model's
score rising while the checker's accuracy falls is reward hacking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scratchlm import checkpoint as ckpt_io
from scratchlm.config import RLConfig
from scratchlm.errors import UserError
from scratchlm.model.reward import RewardModel, pad_rows
from scratchlm.tasks.families import Task, check
from scratchlm.tokenizer import Tokenizer


@dataclass
class Scored:
    total: torch.Tensor  # (N,) fp32: what the RL objective maximises
    checker: torch.Tensor  # (N,) 1.0 right / 0.0 wrong, whatever the reward source (the accuracy logged)
    rm: torch.Tensor | None  # (N,) the reward model's scores, when one is used


class RewardSource:
    def __init__(self, cfg: RLConfig, tok: Tokenizer, device: torch.device) -> None:
        self.cfg, self.tok = cfg, tok
        self.rm: RewardModel | None = None
        if cfg.reward in ("rm", "both"):
            self.rm, rm_tok, _ = load_reward_model_for(cfg.reward_model, tok, device)

    @torch.no_grad()
    def score(self, tasks: list[Task], rows: list[list[int]], answers: list[str], ended: list[bool],
              prompt_lengths: list[int], batch: int = 64) -> Scored:
        """tasks[i] was answered with answers[i] (text); rows[i] = its prompt (prompt_lengths[i] ids) +
        answer ids (+ <|end|>). The reward model's likelihood term reads the answer from the prompt's
        length on, so an answer that writes <|assistant|> itself cannot move where it starts."""
        c = self.cfg
        checker = torch.tensor([float(check(t.family, t, a)) for t, a in zip(tasks, answers)])
        rm = None
        if self.rm is not None:
            device = next(self.rm.parameters()).device
            starts = torch.tensor(prompt_lengths, device=device)
            rm = torch.cat([self.rm(pad_rows(rows[i : i + batch]).to(device), starts=starts[i : i + batch])[0]
                            for i in range(0, len(rows), batch)]).float().cpu()
        total = {"checker": checker, "rm": rm, "both": checker + c.rm_weight * rm if rm is not None else None}[c.reward]
        total = total + c.format_reward * torch.tensor(ended, dtype=torch.float32)
        if c.reward_clip > 0:
            total = total.clamp(-c.reward_clip, c.reward_clip)
        return Scored(total, checker, rm)


def load_reward_model_for(path: str, tok: Tokenizer, device: torch.device) -> tuple[RewardModel, Tokenizer, object]:
    """A reward model (frozen, eval mode) that reads the policy's token ids: its tokenizer must be the policy's."""
    rm, rm_tok, rm_cfg = ckpt_io.load_reward_model(path, str(device))
    if rm_tok.fingerprint() != tok.fingerprint():
        raise UserError(f"{path}: the reward model's tokenizer differs from the policy's (vocab {rm_tok.vocab_size} "
                        f"vs {tok.vocab_size}), so it would read the policy's token ids as other text",
                        fix="train the reward model from this policy's SFT run (scratchlm rm train --base ...)")
    return rm.requires_grad_(False).eval(), rm_tok, rm_cfg
