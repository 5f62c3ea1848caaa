"""The first language models of the course, trainable through the same loop as the GPT.

- `BigramLM`: next-token logits read straight from a (V, V) table indexed by the current token;
  the model knows one token of context.
- `MLPLM` (Bengio et al. 2003, as in makemore): embed the previous `mlp_context` tokens,
  concatenate, one tanh hidden layer, logits. The context is padded at the start of a sequence
  with a dedicated "no token" row, so the first positions are predicted too.

Both take (B, T) ids and return (logits (B, T, V), loss), like the GPT. Neither has a token embedding,
blocks or output head in `LanguageModel`'s sense (its defaults: None, none, None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import BigramConfig, MLPConfig
from scratchlm.model.base import LanguageModel
from scratchlm.model.layers import DocumentMask


def _loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    if targets is None:
        return None
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


class BigramLM(LanguageModel):
    def __init__(self, cfg: BigramConfig) -> None:
        super().__init__()
        self.config = cfg
        self.table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)  # row i: logits of the token after i
        nn.init.zeros_(self.table.weight)  # start from the uniform distribution

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                doc_mask: DocumentMask | None = None):
        """`doc_mask` changes nothing: a prediction reads one token, so no document sees another."""
        logits = self.table(idx)  # (B, T, V)
        return logits, _loss(logits, targets)

    def num_params(self, non_embedding: bool = True) -> int:
        return self.table.weight.numel()

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return 6.0 * self.config.vocab_size  # a lookup, but the backward touches a row of V


class MLPLM(LanguageModel):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.config, self.k = cfg, cfg.mlp_context
        self.emb = nn.Embedding(cfg.vocab_size + 1, cfg.n_embd)  # the extra last row is "no token"
        self.hidden = nn.Linear(self.k * cfg.n_embd, cfg.mlp_hidden)
        self.out = nn.Linear(cfg.mlp_hidden, cfg.vocab_size)
        nn.init.normal_(self.emb.weight, 0.0, 0.02)
        nn.init.normal_(self.hidden.weight, 0.0, (5 / 3) / (self.k * cfg.n_embd) ** 0.5)  # Kaiming for tanh
        nn.init.zeros_(self.hidden.bias)
        nn.init.normal_(self.out.weight, 0.0, 0.01)  # small: start near uniform predictions
        nn.init.zeros_(self.out.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                doc_mask: DocumentMask | None = None):
        """With a `doc_mask` (packed documents), context from before a token's document reads "no token",
        as at the start of a sequence, so each document is predicted as if alone."""
        B, T = idx.shape
        padded = F.pad(idx, (self.k - 1, 0), value=self.config.vocab_size)  # (B, T + k - 1)
        ctx = padded.unfold(1, self.k, 1)  # (B, T, k): the k tokens ending at each position
        if doc_mask is not None:
            back = torch.arange(self.k - 1, -1, -1, device=idx.device)  # slot j holds the token k-1-j back
            ctx = ctx.masked_fill(back > doc_mask.positions(T)[..., None], self.config.vocab_size)
        x = self.emb(ctx).view(B, T, -1)  # (B, T, k*C)
        logits = self.out(torch.tanh(self.hidden(x)))  # (B, T, V)
        return logits, _loss(logits, targets)

    def num_params(self, non_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return 6.0 * (self.hidden.weight.numel() + self.out.weight.numel())
