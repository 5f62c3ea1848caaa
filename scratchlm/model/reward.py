"""The reward model: the SFT policy's own trunk with one scalar head on the last real token.

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
"""

from __future__ import annotations

import torch
from torch import nn

from scratchlm.data.labelled import PAD
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
    """forward(idx (B, T) padded with -1 on either side) -> (rewards (B,) fp32, None)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__(body, 1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None,
                doc_mask: DocumentMask | None = None) -> tuple[torch.Tensor, None]:
        if cache is not None or doc_mask is not None or targets is not None:
            raise ValueError("a reward model scores whole texts: no targets, KV cache or document mask")
        return self.head(self.pooled(right_aligned(idx)))[:, 0].float(), None
