"""Objectives other than next-token cross-entropy, run by the same loop (the reward model, DPO).

The loop (`loop.py`) trains `model(x, y) -> (output, mean loss)`. For a language model the loss is
the mean over the batch's valid target tokens, and the loop weights each micro-batch by its count
of them, so gradient accumulation gives the mean over the whole step. A pairwise objective averages
over pairs, not tokens: an `Objective` wraps the network it trains and tells the loop

- `count(y)`: how many examples this micro-batch's mean is over (pairs), for that weighting;
- `metrics()`: the means of what it measured since the last call (reward margins, accuracy, the
  chosen and rejected log-probabilities), logged beside the loss and averaged over validation;
- `network`: the module whose weights are the run's checkpoint (a frozen reference model held by
  the objective is never saved).

The hooks every model offers the loop (aux loss, after_optimizer_step, routing metrics, parameter
and FLOP counts) are forwarded to the network, so a MoE trains the same way under any objective.
Validation reports the objective's mean loss; bits per byte mean nothing here and are NaN.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from scratchlm.model.base import LanguageModel


class Objective(nn.Module):
    def __init__(self, network: LanguageModel) -> None:
        super().__init__()
        self.network = network
        self.config = network.config
        self._sums: dict[bool, dict[str, float]] = {True: defaultdict(float), False: defaultdict(float)}
        self._n = {True: 0, False: 0}  # by training mode: validation's means apart from training's

    def count(self, y: torch.Tensor) -> int:
        """Examples in this micro-batch (the loss is their mean)."""
        raise NotImplementedError

    def record(self, n: int, **values: torch.Tensor | float) -> None:
        """Add this micro-batch's means (over its n examples) to what `metrics` reports next."""
        for k, v in values.items():
            self._sums[self.training][k] += float(v) * n
        self._n[self.training] += n

    def metrics(self, training: bool = True) -> dict[str, float]:
        """The example-weighted means recorded in training (or in eval mode) since the last call; then
        starts afresh."""
        n, sums = self._n[training], self._sums[training]
        self._sums[training], self._n[training] = defaultdict(float), 0
        return {k: v / n for k, v in sums.items()} if n else {}

    # -- the model hooks, forwarded to the network ----------------------------------------------------
    def aux_loss(self) -> torch.Tensor | float:
        return self.network.aux_loss()

    def after_optimizer_step(self) -> None:
        self.network.after_optimizer_step()

    def routing_metrics(self) -> dict[str, float]:
        return self.network.routing_metrics()

    def num_params(self, non_embedding: bool = True) -> int:
        return self.network.num_params(non_embedding)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.network.flops_per_token(seq_len)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.network.blocks


def network_of(model: nn.Module) -> nn.Module:
    """What a run saves: the network an objective trains, or the model itself."""
    return model.network if isinstance(model, Objective) else model


def count_examples(model: nn.Module, y: torch.Tensor) -> int:
    """What a micro-batch's mean loss is over: the objective's examples, else the valid target tokens."""
    return model.count(y) if isinstance(model, Objective) else int(y.ne(-1).sum())
