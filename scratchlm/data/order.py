"""The order in which a fine-tuning loader visits its examples: one resumable piece for every loader
of whole examples (classification texts, preference pairs).

`EpochOrder(n)` hands out example indices a batch at a time: a fresh permutation each epoch, seeded
by (seed, epoch), or 0..n-1 in order without shuffling. `fill=True` wraps into the next epoch so every
batch is full (training); `fill=False` ends an epoch with a short batch, so one pass reads each
example exactly once (validation). Its state is two ints, so a resumed loader continues with exactly
the batches an uninterrupted one would have drawn.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from scratchlm.errors import UserError


def torch_permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def python_permutation(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


class EpochOrder:
    def __init__(self, n: int, *, shuffle: bool = True, fill: bool = True, seed: int = 0,
                 permutation: Callable[[int, int], list[int]] = torch_permutation) -> None:
        self.n, self.shuffle, self.fill, self.seed, self.permutation = n, shuffle, fill, seed, permutation
        self.epoch, self.pos = 0, 0
        self._order = self._make()

    def _make(self) -> list[int]:
        return self.permutation(self.n, self.seed * 1000 + self.epoch) if self.shuffle else list(range(self.n))

    def _next_epoch(self) -> None:
        self.epoch, self.pos = self.epoch + 1, 0
        self._order = self._make()

    def take(self, k: int) -> list[int]:
        """The next k indices (fewer at the end of an epoch when not filling)."""
        if self.pos >= self.n:
            self._next_epoch()
        picks: list[int] = []
        while len(picks) < k:
            if self.pos >= self.n:
                if not self.fill:
                    break
                self._next_epoch()
            picks.append(self._order[self.pos])
            self.pos += 1
        return picks

    def state_dict(self, count_key: str) -> dict[str, int]:
        """The position, and the number of examples under `count_key` (a resume checks it)."""
        return {"epoch": self.epoch, "pos": self.pos, count_key: self.n}

    def load_state_dict(self, state: dict[str, int], count_key: str, what: str, fix: str) -> None:
        """Continue from `state`; refused when it counted a different number of `what` (the data changed)."""
        if state.get(count_key) != self.n:
            raise UserError(f"cannot resume: the {what} changed since the checkpoint", fix=fix)
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._make()
