"""A head on a pretrained transformer: the GPT / Llama / MoE body with its LM head dropped and a linear
head on the last real token (`PooledLM`): K class logits for the classifier (`scratchlm classify`, the
stage in scratchlm/sft/classify.py), one score for the reward model (`reward.py`, which may keep the
dropped LM head beside for its likelihood term).

- pooling = the last real token (GPT-1/2-style classifiers, HF's *ForSequenceClassification on
  decoders): with causal attention position t only sees tokens <= t, so the last position is the
  only one whose hidden state has read the whole text.
- padding: input rows are right-padded with `PAD` (-1, never a real id; scratchlm/data/labelled.py).
  forward finds each row's length from it and feeds the pads as id 0; causal attention keeps pads
  (after the text) from changing any real position, so padding cannot change a row's logits. The
  shared loop's `model(x, y)` carries no lengths, so they travel inside x.
- the base LM head is replaced by an identity, so the body's own forward returns the final normed
  hidden states (B, T, C) for every architecture; with tied embeddings the token table stays as the
  input embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.data.labelled import PAD
from scratchlm.errors import UserError
from scratchlm.model.base import LanguageModel
from scratchlm.model.gpt import GPT
from scratchlm.model.layers import DocumentMask
from scratchlm.model.llama import Llama


class PooledLM(LanguageModel):
    """A pretrained GPT / Llama / MoE body with its LM head dropped and a linear head of `n_out` outputs
    on the last real token (the classifier's K classes, the reward model's one score). `pooled(idx)`
    gives the last real token's hidden state (B, C) for idx (B, T) right-padded with -1."""

    def __init__(self, body: nn.Module, n_out: int) -> None:
        super().__init__()
        if not isinstance(body, GPT | Llama):
            raise UserError(f"model.arch={body.config.arch!r} has no transformer body to put a head on",
                            fix="start from a gpt, llama or moe checkpoint")
        # The LM head becomes the identity: body(idx) then returns ln_f / norm of the last layer,
        # (B, T, C), through each architecture's own forward (positions, RoPE, MoE routing). The head
        # is the model surface's `unembedding`, found by identity wherever the family keeps it.
        head = body.unembedding
        body.set_submodule(next(n for n, m in body.named_modules() if m is head), nn.Identity())
        self.body = body
        self.config = body.config
        self.drop = nn.Dropout(body.config.dropout)
        self.head = nn.Linear(body.config.n_embd, n_out)
        nn.init.normal_(self.head.weight, 0.0, 0.02)  # the body's init scale: outputs start near 0
        nn.init.zeros_(self.head.bias)

    def pooled(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, C): the final hidden state at each row's last real token; idx (B, T) right-padded with PAD."""
        return self.last(self.hidden(idx), idx)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T, C): the body's final (normed) hidden states of idx (B, T) right-padded with PAD."""
        real = idx != PAD  # (B, T)
        if bool((real[:, 1:] & ~real[:, :-1]).any()):
            raise ValueError("ids must be right-padded: a real token follows padding")
        if bool((~real[:, 0]).any()):
            raise ValueError("a row is all padding")
        h, _ = self.body(idx.masked_fill(~real, 0))  # pads read id 0, seen by no real token
        return h

    def last(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(B, C): h (B, T, C) at each row's last real token of idx (B, T) right-padded with PAD."""
        lengths = (idx != PAD).sum(1)  # (B,)
        return self.drop(h[torch.arange(len(h), device=idx.device), lengths - 1])

    def aux_loss(self) -> torch.Tensor | float:
        """An MoE body's load-balancing and z losses, as its own forward adds them to the LM loss
        (the training loop reads this to average them per micro-batch)."""
        return self.body.aux_loss()

    # -- what the shared loop reads (the classifier and the reward model alike) -------------------------
    def num_params(self, non_embedding: bool = True) -> int:
        return self.body.num_params(non_embedding) + sum(p.numel() for p in self.head.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """The body's 6N + attention, less 6x the token table (a lookup here: no LM-head matmul reads
        it), plus the head's 6·C·K (charged per token, though it runs once per text: an upper bound)."""
        head = sum(p.numel() for p in self.head.parameters())
        return self.body.flops_per_token(seq_len) - 6 * self.body.embedding.weight.numel() + 6 * head

    def after_optimizer_step(self) -> None:
        self.body.after_optimizer_step()  # MoE: the sigmoid router's balancing bias

    def routing_metrics(self) -> dict[str, float]:
        return self.body.routing_metrics()

    # The token table and blocks are the body's; the vocabulary head is dropped from the body
    # (`unembedding` stays None; a RewardModel with the likelihood term keeps it beside, as `lm_head`).
    @property
    def embedding(self) -> nn.Embedding:
        return self.body.embedding

    @property
    def blocks(self) -> nn.ModuleList:
        return self.body.blocks


class ClassifierLM(PooledLM):
    """forward(idx (B, T) right-padded with -1, targets (B,) or (B, 1) class ids)
    -> (logits (B, 1, K), mean cross-entropy or None)."""

    def __init__(self, body: nn.Module, n_classes: int) -> None:
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        super().__init__(body, n_classes)
        self.n_classes = n_classes

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None,
                doc_mask: DocumentMask | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cache is not None or doc_mask is not None:
            raise ValueError("a classifier reads whole texts: no KV cache or document mask")
        logits = self.head(self.pooled(idx))[:, None]  # (B, 1, K): a one-"token" sequence for the loop
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits[:, 0].float(), targets.reshape(-1), ignore_index=-1)
            loss = loss + self.aux_loss()
        return logits, loss
