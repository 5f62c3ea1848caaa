"""The reward model: the SFT policy's own trunk with one scalar head on the last real token, and
optionally the response's likelihood under the policy's own LM head (the likelihood term, below).

InstructGPT (Ouyang et al. 2022) grows the reward model from the supervised policy: same network,
the vocabulary head swapped for a linear layer that outputs one number, read at the last token of
prompt + response (with causal attention the only position that has read both). Starting from the
policy means the RM already "reads" the task the way the policy writes it.

- padding: rows are padded with `PAD` (-1, never a real id) on either side; forward moves each row's
  real tokens to the front (right padding, which causal attention ignores), so the score depends on
  neither the padding side nor the pad value: an end-of-text token inside the text is a token like
  any other, never mistaken for padding.
- output: forward returns the rewards (B,) in fp32 and no loss; the pairwise loss (Bradley-Terry) is
  the RM objective's (`scratchlm/align/reward.py`), in `scratchlm.losses`.
- likelihood term (optional, `response_start` = the id of <|assistant|>): the reward adds
  s * mean_t log p(y_t | prompt, y_<t), the mean log-probability of the response's tokens under the
  policy's own LM head. The response starts where the caller says (`starts`: RL passes each row's
  prompt length, so an answer that writes <|assistant|> itself cannot move it), or else after the
  row's last <|assistant|> (chat-rendered pairs, where typed specials are text); its closing <|end|>
  is scored. A row with no response token is refused: its mean would be 0, the best possible. The
  LM head is kept beside the scalar head and trained with it (with LoRA an untied one stays frozen,
  like the body); s is one learned scale (starts at 1). This is
  SimPO's length-normalised implicit reward (Meng et al. 2024) added to InstructGPT's head. Why: a
  scalar read at the last token must learn anew to compare the answer with the prompt position by
  position (is this the prompt's words reversed?), which the policy already does while predicting
  each next token. On the 1M demo policy the head alone stays at 68-75% on corrupted pairs after
  thousands of steps, while the untrained policy's mean log-probability already ranks 88% of them
  right (bench/rm.py). The mean, not the sum, so the term does not favour short answers.
"""

from __future__ import annotations

import torch
from torch import nn

from scratchlm.data.labelled import PAD
from scratchlm.losses import fusable_head, linear_sequence_logprobs, sequence_logprobs
from scratchlm.model.classifier import PooledLM
from scratchlm.model.layers import DocumentMask


def right_aligned(idx: torch.Tensor) -> torch.Tensor:
    """idx (B, T) with PAD before and/or after each row's text -> the same rows right-padded. A PAD
    between real tokens is refused (a row is one contiguous text)."""
    real = idx != PAD
    starts = real & ~torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)  # (B, T) text starts
    if bool((starts.sum(1) > 1).any()):
        raise ValueError("padding inside a row: each row must be one contiguous text with PAD around it")
    order = (~real).to(torch.uint8).argsort(dim=1, stable=True)  # real tokens first, in their order
    return idx.gather(1, order)


def pad_rows(rows: list[list[int]], side: str = "right") -> torch.Tensor:
    """Token lists -> (B, max length) long tensor padded with PAD on `side` (left | right)."""
    T = max(map(len, rows))
    pads = [[PAD] * (T - len(r)) for r in rows]
    return torch.tensor([p + r if side == "left" else r + p for r, p in zip(rows, pads)], dtype=torch.long)


class RewardModel(PooledLM):
    """forward(idx (B, T) padded with -1 on either side, starts=None) -> (rewards (B,), None); the
    rewards are fp32, or fp64 for a float64 model.

    `response_start` (the id of <|assistant|>, or None): add the likelihood term (module docstring);
    the policy's LM head is then kept as `lm_head` (tied to the token table where the body ties them)."""

    def __init__(self, body: nn.Module, response_start: int | None = None) -> None:
        lm_head = body.unembedding
        super().__init__(body, 1)
        self.response_start = response_start
        if response_start is not None:
            if not 0 <= response_start < body.config.vocab_size:
                raise ValueError(f"response_start={response_start} is not a token id "
                                 f"of a {body.config.vocab_size}-id vocabulary")
            self.lm_head = lm_head
            self.likelihood_scale = nn.Parameter(torch.ones(()))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None,
                doc_mask: DocumentMask | None = None, starts: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, None]:
        """starts (B,), optional: each row's first response token, counted from its first real token."""
        if cache is not None or doc_mask is not None or targets is not None:
            raise ValueError("a reward model scores whole texts: no targets, KV cache or document mask")
        idx = right_aligned(idx)
        if self.response_start is None:
            return self.head(self.pooled(idx))[:, 0].float(), None
        h = self.hidden(idx)  # (B, T, C)
        reward = self.head(self.last(h, idx))[:, 0]
        out = reward + self.likelihood_scale * self.mean_logprob(h, idx, starts)
        return out.to(torch.promote_types(out.dtype, torch.float32)), None

    def mean_logprob(self, h: torch.Tensor, idx: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """(B,): each row's mean log-probability of its response tokens (from `starts`, or after its last
        <|assistant|>) under `lm_head`, from the final hidden states h (B, T, C) of right-padded idx.
        Through the shared `sequence_logprobs` (DPO's and RL's), which runs on the scored positions only."""
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device).expand(B, T)
        if starts is None:
            starts = torch.where(idx == self.response_start, pos, -1).amax(1) + 1  # (B,) after the last <|assistant|>
            if bool((starts == 0).any()):
                raise ValueError("a row without <|assistant|>: a reward model with the likelihood term scores "
                                 "chat-rendered prompt + response rows (or pass starts)")
        nxt = idx[:, 1:]  # (B, T-1): position t predicts token t+1
        scored = (pos[:, 1:] >= starts.to(idx.device)[:, None]) & (nxt != PAD)  # response tokens, not padding
        if bool((scored.sum(1) == 0).any()):
            raise ValueError("a row with no response token: the likelihood term has nothing to score")
        targets = nxt.masked_fill(~scored, -1)  # the shared per-row log-probabilities' convention
        if fusable_head(self.lm_head):  # scored positions only, chunked: no (B, T, V) logits
            return linear_sequence_logprobs(h[:, :-1], self.lm_head.weight, targets, average=True)
        return sequence_logprobs(self.lm_head(h[:, :-1]), targets, average=True)

    @property
    def tied(self) -> bool:
        """Whether the likelihood term's LM head is the body's token table (as the policy tied them)."""
        return self.response_start is not None and self.lm_head.weight is self.body.embedding.weight

    def drop_likelihood(self) -> RewardModel:
        """The scalar head alone (a PPO critic reads values from the trunk and head at every position,
        and its saved tensors must not hold the LM head twice beside a tied token table)."""
        if self.response_start is not None:
            del self.lm_head, self.likelihood_scale
            self.response_start = None
        return self

    # -- what the shared loop reads: the term's LM head is a real matmul at every position ---------------
    def num_params(self, non_embedding: bool = True) -> int:
        n = super().num_params(non_embedding)
        if self.response_start is not None:
            n += 1 + (0 if self.tied else self.lm_head.weight.numel())
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        extra = 6 * self.lm_head.weight.numel() if self.response_start is not None else 0
        return super().flops_per_token(seq_len) + extra
