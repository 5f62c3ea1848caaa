"""The target's own multi-token prediction modules (DeepSeek-V3, model/mla.py) as a speculative draft.

An MTP model carries D modules trained to predict further ahead: module k, at position i, reads the
previous depth's hidden state h^{k-1}_i (depth 0: the target's final normed hidden state, the input of
its head) and the embedding of token t_{i+k}, and predicts t_{i+k+1}. With the target's features at
every position of the row but the newest (n tokens, features at 0 .. n-2), module 1 at position n-2
reads t_{n-1} and guesses t_n, the token the target will produce next; module 2 at n-2 reads h^1_{n-2}
and that guess and guesses t_{n+1}; and so on. So one proposal is up to D tokens, one short forward of
each module (the speculative decoder verifies them: greedy output stays the target's).

Each module keeps its own latent cache (one layer). Its items at positions i <= n-1-k read only tokens
of the row, so they are final and kept ("true"); the newer ones read drafted tokens and are rolled back
before the next proposal, as EAGLE's head does (eagle.py). The true outputs of module k are kept too:
they are module k+1's input. Positions in the modules' caches count from `base`, the first position the
draft keeps (0 until the row outgrows the context; then it restarts on the row's last tokens).

Left out: proposing past D tokens (reusing the last module on its own output) and trees of candidates.
"""

from __future__ import annotations

import torch

from scratchlm.errors import UserError
from scratchlm.infer.kv_cache import KVCache
from scratchlm.infer.speculative import Pick
from scratchlm.model.base import LanguageModel


class MTPDraft:
    """A `Draft` (speculative.py) from `target.mtp`, the MTP modules of an arch=mla model."""

    needs_features = True

    def __init__(self, target: LanguageModel) -> None:
        if not getattr(target, "mtp", None):
            raise UserError(f"model.arch={target.config.arch} has no multi-token prediction modules to draft with",
                            fix="train with model.arch=mla and model.mtp_depth >= 1 (preset mtp-tiny)")
        self.target, self.module = target, target.mtp
        self.context = target.config.block_size
        self.reset()

    def reset(self) -> None:
        depth = len(self.target.mtp)
        self.base = 0
        self.caches: list[KVCache | None] = [None] * depth
        self.true = [0] * depth  # items of each module's cache that read only tokens of the row
        self.outs: list[torch.Tensor | None] = [None] * depth  # their outputs h^k (true[k], C)

    def propose(self, view: list[int], features: torch.Tensor | None, k: int, pick: Pick,
                ) -> tuple[list[int], list[torch.Tensor | None]]:
        n = len(view)
        if features is None or n < 2 or features.size(0) != n - 1:
            return [], []
        if self.caches[0] is None or n - 1 - self.base > self.context:
            self.reset()
            self.base = max(0, n - 1 - self.context)
            self.caches = [KVCache.for_model(m, 1, self.context) for m in self.target.mtp]
        target, embed = self.target, self.target.embedding
        device = features.device
        tokens, dists = list(view), []
        prev = features[self.base : n - 1]  # h^0 at positions base .. n-2
        for d, module in enumerate(self.target.mtp[: min(k, len(self.target.mtp))]):
            depth = d + 1
            cache = self.caches[d]
            cache.truncate([self.true[d]])  # drop the items that read drafted tokens
            start = self.base + self.true[d]  # first position not in the cache
            if start > n - 2:
                break
            ids = torch.tensor([tokens[start + depth : n - 1 + depth]], device=device)  # t_{i+k}, i = start .. n-2
            out = module(prev[None, start - self.base :], embed(ids), target.rope, cache)[0]  # (n-1-start, C)
            full = out if self.outs[d] is None else torch.cat([self.outs[d], out])  # h^k at base .. n-2
            self.true[d] = max(self.true[d], n - depth - self.base)  # positions <= n-1-k read only the row
            self.outs[d] = full[: self.true[d]]
            t, q = pick(target.unembedding(module.norm(full[-1:])), tokens)
            tokens.append(t)
            dists.append(q)
            prev = full
        return tokens[n:], dists
