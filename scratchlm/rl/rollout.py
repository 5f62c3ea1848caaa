"""Rollouts: the policy answers task prompts through the one `Engine`, and the answers become
training rows whose response tokens (and only those) are scored and trained.

- sampling: temperature 1 from the unfiltered distribution (no top-k, top-p, min-p or repetition
  penalty), since the log-probabilities the RL losses use are those of the policy itself; a
  filtered or tempered sample is not drawn from it. Each answer stops at <|end|> or after
  `max_new_tokens`; an answer that stopped keeps its <|end|> as its last trained token (the
  policy learns when to stop), one cut off has none.
- rows: prompt (chat template + assistant marker) + answer, one per sample; x = row[:-1] and
  targets = row[1:] with -1 wherever the target is a prompt token, so prompt tokens never get a
  gradient. Rows are right-padded to the rollout's longest row (x with id 0, targets with -1):
  causal attention keeps padding after a row's text from changing anything before it.
- log-probabilities (`token_logprobs`) come from the training forward (the same module, the same
  micro-batches and the same precision as the update), not from the sampler: that is what makes
  the first update's probability ratio exactly 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import SampleConfig
from scratchlm.infer.engine import Engine
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.chat import render


@dataclass
class Rollout:
    """N sampled answers as training rows (see the module docstring)."""

    x: torch.Tensor  # (N, T) long: prompt + answer, less the last token, right-padded with 0
    targets: torch.Tensor  # (N, T) long: the next token where it is an answer token, else -1
    answers: list[list[int]]  # each answer's tokens, without <|end|>
    ended: list[bool]  # the answer stopped at <|end|> (else it was cut at max_new_tokens)
    prompt_lengths: list[int]

    @property
    def mask(self) -> torch.Tensor:
        """(N, T) float: 1 on answer tokens."""
        return (self.targets != -1).float()


def prompt_ids(tok: Tokenizer, prompts: Sequence[str], block_size: int, max_new_tokens: int
               ) -> tuple[list[list[int]], int]:
    """The chat-rendered ids of each user prompt, ready for the answer, cut from the left to leave
    `max_new_tokens` of room in the context; and how many were cut."""
    keep = block_size - max_new_tokens
    rows = [render(tok, [("user", p)], add_generation_prompt=True)[0] for p in prompts]
    return [r[-keep:] for r in rows], sum(len(r) > keep for r in rows)


@torch.no_grad()
def sample_answers(model: nn.Module, tok: Tokenizer, prompts: list[list[int]], max_new_tokens: int,
                   generator: torch.Generator, temperature: float = 1.0) -> tuple[list[list[int]], list[bool]]:
    """One answer per prompt row (repeat a prompt for several), sampled through the engine from the
    unfiltered distribution; (answers without <|end|>, whether each stopped at <|end|>)."""
    end = tok.special_tokens["<|end|>"]
    sample = SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0, min_p=0.0,
                          repetition_penalty=1.0, stream=False)
    outs = Engine(model, tok).generate(prompts, sample, eos_id=end, valid_vocab=tok.vocab_size, generator=generator)
    # generate drops the EOS it stopped at: an answer shorter than the limit stopped there (no stop strings here)
    return outs, [len(o) < max_new_tokens for o in outs]


def build_rollout(prompts: list[list[int]], answers: list[list[int]], ended: list[bool], end_id: int) -> Rollout:
    rows = [p + a + ([end_id] if e else []) for p, a, e in zip(prompts, answers, ended)]
    T = max(len(r) for r in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, prompts)):
        n = len(row) - 1
        x[i, :n] = torch.tensor(row[:-1])
        targets[i, len(p) - 1 : n] = torch.tensor(row[len(p):])  # position t predicts row[t + 1]
    return Rollout(x, targets, answers, ended, [len(p) for p in prompts])


def sampled_logits(logits: torch.Tensor, valid_vocab: int | None = None) -> torch.Tensor:
    """fp32 logits of the distribution the engine samples from: ids past the tokenizer's vocabulary
    (the model's padded rows, `valid_vocab` and up) get a logit far below any other, so they carry no
    probability, as the sampler's `mask_padding` gives them none (finite, so entropies stay defined)."""
    logits = logits.float()
    if valid_vocab is not None and valid_vocab < logits.shape[-1]:
        logits = logits.clone()
        logits[..., valid_vocab:] = -1e9
    return logits


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, valid_vocab: int | None = None) -> torch.Tensor:
    """logits (B, T, V), targets (B, T) with -1 off the answers -> (B, T) fp32 log p(target), 0 off them;
    p over the first `valid_vocab` ids (`sampled_logits`)."""
    logp = F.log_softmax(sampled_logits(logits, valid_vocab), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return picked.masked_fill(targets == -1, 0.0)


class HiddenStates:
    """Captures the final normed hidden states (B, T, C) a language model's forward feeds its LM head
    (`unembedding`), so one forward gives both the logits and what a value head reads."""

    def __init__(self, model: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self._hook = model.unembedding.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.value = args[0]

    def take(self) -> torch.Tensor:
        h, self.value = self.value, None
        if h is None:
            raise RuntimeError("no hidden states captured: the model's forward did not reach its LM head")
        return h

    def remove(self) -> None:
        self._hook.remove()
