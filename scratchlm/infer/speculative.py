"""Speculative decoding: a cheap draft proposes k tokens, the target checks them in one forward.

Decoding one token per forward reads every weight of the target for one token. A draft (a smaller
model sharing the tokenizer, or a one-layer head on the target's own features: `eagle.py`) guesses
the next k tokens cheaply; the target scores the token it has not seen yet plus the k guesses in ONE
cached forward, which costs about one decode step while the weights are the bottleneck (on a GPU;
on a 2-core AVX2 CPU a matmul of 2-8 rows reads the weights more slowly than a one-row one, and the
forward costs 1.6 steps at 30M parameters, 2.1 at 100M: `bench/specdec.py`). From those
k + 1 next-token distributions, rejection sampling (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model
Decoding with Speculative Sampling") keeps a prefix of the guesses and adds one token of its own:

    for each drafted d_j, drawn from the draft's q_j:  accept with probability min(1, p_j(d_j) / q_j(d_j))
    first rejection at j:  draw the token from norm(max(0, p_j - q_j)) and stop
    all k accepted:        draw a bonus token from p_{k+1}

Each kept token is then distributed exactly as the target's p, whatever the draft proposes: the
draft changes only the speed. Greedy (temperature 0) is the special case where p and q put all
their mass on their argmax: keep drafted tokens while they equal the target's argmax, then add the
target's argmax. Both p and q are the distributions `sample.sample_next` would draw from (padding
mask, repetition penalty on each position's own context, temperature, top-k, top-p, min-p), so
the output follows the target's FILTERED distribution, as `Engine.generate` samples it.

The caches: the target's KV cache holds every token of the row but the newest (not yet fed); a
verify forward appends the newest + the k drafted tokens, and `Cache.truncate` rolls it back to
the accepted ones (the rejected slots are re-written by the next forward). A draft keeps its own
cache and rolls it back itself to the longest prefix that still matches the row.

Past the context the target slides exactly as the engine does (keeps the last half-block and
re-prefills when its cache is full), and a verify forward never crosses that point (k shrinks near
it), so greedy output equals `Engine.generate`'s token for token at any length.

Left out: batched rows (each row runs alone: per-row accepted lengths would need ragged rollbacks
each step; `Cache.truncate` supports them), trees of candidates (EAGLE-2, Medusa), and the sink
cache (a rolling window cannot regrow evicted slots).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from scratchlm.config import SampleConfig
from scratchlm.errors import UserError
from scratchlm.infer.engine import SLIDE_KEEP, Engine, first_stop, trim_at
from scratchlm.infer.kv_cache import KVCache
from scratchlm.infer.sample import (
    apply_temperature,
    check_sample_config,
    mask_padding,
    min_p_filter,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
)
from scratchlm.model.base import LanguageModel

# pick(logits (1, V), context) -> (token, its filtered distribution (V,) or None when greedy)
Pick = Callable[[torch.Tensor, Sequence[int]], tuple[int, torch.Tensor | None]]


@dataclass
class SpecStats:
    """Counts over a `generate` call: tokens drafted and accepted, target forwards, tokens kept."""

    drafted: int = 0
    accepted: int = 0
    forwards: int = 0  # target forwards (verify steps)
    produced: int = 0  # tokens the verify steps produced (accepted + one of the target's own each)

    @property
    def acceptance(self) -> float:
        """Fraction of drafted tokens accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens per target forward (accepted drafts + the target's own token): 1.0 = no gain."""
        return self.produced / self.forwards if self.forwards else 0.0


def filtered_logits(logits: torch.Tensor, contexts: Sequence[Sequence[int]], cfg: SampleConfig,
                    valid_vocab: int | None) -> torch.Tensor:
    """`sample_next`'s filters without the draw: (n, V) logits, one context per row -> (n, V) fp32
    logits whose softmax is the distribution sampled from (or whose argmax is taken, temperature 0)."""
    logits = mask_padding(logits.float(), valid_vocab)
    logits = repetition_penalty(logits, contexts, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits
    logits = apply_temperature(logits, cfg.temperature)
    logits = top_k_filter(logits, cfg.top_k)
    logits = top_p_filter(logits, cfg.top_p)
    return min_p_filter(logits, cfg.min_p)


def fit_vocab(logits: torch.Tensor, V: int) -> torch.Tensor:
    """(n, V') logits of a draft over the target's V ids: the two share a tokenizer and differ only in
    padding rows (never sampled: `mask_padding`), so extra columns go and missing ones are -inf."""
    if logits.size(-1) >= V:
        return logits[..., :V]
    return F.pad(logits, (0, V - logits.size(-1)), value=float("-inf"))


class Draft(Protocol):
    """What the decoder asks of a draft. `features` is the target's final hidden state (the input of
    its LM head) at each position of `view` but the last, (len(view) - 1, C), for drafts that read
    them (`needs_features`); others get None."""

    needs_features: bool
    module: torch.nn.Module  # the draft's weights (put in eval mode while generating)

    def reset(self) -> None:
        """Forget everything (a new row, or the target slid past its context)."""

    def propose(self, view: list[int], features: torch.Tensor | None, k: int, pick: Pick,
                ) -> tuple[list[int], list[torch.Tensor | None]]:
        """Up to k tokens continuing `view`, each with the distribution it was drawn from (None when greedy)."""


class ModelDraft:
    """A small language model sharing the target's tokenizer, with its own KV cache.

    The cache holds `self.fed` (tokens of the row from `self.base` on); each `propose` first rolls it
    back to the longest prefix still matching the row, feeds the rest in one forward, then one token
    per drafted token. Past its context it restarts on the row's last tokens."""

    needs_features = False

    def __init__(self, model: LanguageModel, vocab_size: int | None = None) -> None:
        """vocab_size: the target's (padded) vocabulary, when the draft's padding differs from it."""
        if model.attention_shape() is None:
            raise ValueError(f"a draft needs a KV cache; model.arch={model.config.arch} has none")
        self.engine, self.module = Engine(model), model
        self.vocab_size = vocab_size or model.config.vocab_size
        self.context = self.engine.context()
        self.reset()

    def reset(self) -> None:
        self.cache: KVCache | None = None
        self.base, self.fed = 0, []

    def propose(self, view: list[int], features: torch.Tensor | None, k: int, pick: Pick,
                ) -> tuple[list[int], list[torch.Tensor | None]]:
        model = self.engine.model
        held = self.fed
        tail = view[self.base:]
        m = 0
        while m < min(len(held), len(tail)) and held[m] == tail[m]:
            m += 1
        m = min(m, len(tail) - 1)  # the newest token is fed again: its logits are the first proposal
        if self.cache is None or self.cache.max_len - m < len(tail) - m + k - 1:
            self.base = max(0, len(view) - (self.context - k + 1))  # room for the tail + k - 1 drafts
            self.cache = KVCache.for_model(model, 1, self.context)
            tail, m = view[self.base:], 0
        else:
            self.cache.truncate([m])
        self.fed = tail[:]
        device = self.engine.device
        logits, _ = model(torch.tensor([tail[m:]], device=device), cache=self.cache, last_only=True)
        tokens, dists = [], []
        context = list(view)
        for j in range(k):
            t, q = pick(fit_vocab(logits[:, -1], self.vocab_size), context)
            tokens.append(t)
            dists.append(q)
            context.append(t)
            if j < k - 1:
                self.fed.append(t)
                logits, _ = model(torch.tensor([[t]], device=device), cache=self.cache, last_only=True)
        return tokens, dists


class LastHidden:
    """The input of a model's LM head (its final normed hidden states (B, T, C)), kept by a hook."""

    def __init__(self, model: LanguageModel) -> None:
        self.value: torch.Tensor | None = None
        self.hook = model.unembedding.register_forward_pre_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.value = args[0]


class SpeculativeDecoder:
    """Generation from `target` (an Engine) with `draft` proposing up to k tokens per target forward.
    `stats` counts over every `generate` call since it was made (or last replaced)."""

    def __init__(self, target: Engine, draft: Draft, k: int = 4) -> None:
        if k < 1:
            raise ValueError(f"k={k}: a draft proposes at least one token")
        if not target.cacheable:
            raise ValueError(f"model.arch={target.model.config.arch} has no KV cache to verify drafts with")
        for role, model in (("target", target.model), ("draft", getattr(draft, "module", None))):
            if getattr(model, "recurrent", False):
                raise UserError(f"speculative decoding rolls the caches back past rejected tokens, and the {role} "
                                f"model.arch={model.config.arch} keeps a recurrent state that cannot roll back",
                                fix="generate without --draft, or use an attention-only model")
        self.target, self.draft, self.k = target, draft, k
        self.stats = SpecStats()

    @property
    def model(self):
        """The target model, as `Engine.model` (a chat session reads its context length)."""
        return self.target.model

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: SampleConfig,
        *,
        eos_id: int | None = None,
        valid_vocab: int | None = None,
        decode: Callable[[list[int]], str] | None = None,
        on_token: Callable[[int, int], None] | None = None,
        generator: torch.Generator | None = None,
        cache: str = "kv",
        sink_tokens: int = 4,
        window: int = 0,
    ) -> list[list[int]]:
        """As `Engine.generate`, whose place it takes (`sample`, chat): each prompt continued by up to
        cfg.max_new_tokens tokens, stopping at eos_id (not kept) or a stop string (trimmed); the tokenizer
        supplies the defaults. Only the KV cache can roll back: sink_tokens and window are unused."""
        check_sample_config(cfg)
        if cache != "kv":
            raise UserError(f"sample.cache={cache} cannot roll back rejected drafts",
                            fix="use sample.cache=kv with a draft")
        tok = self.target.tokenizer
        decode = decode or (tok.decode if tok is not None else None)
        valid_vocab = valid_vocab if valid_vocab is not None else (tok.vocab_size if tok is not None else None)
        eos_id = eos_id if eos_id is not None else (tok.eot_id if tok is not None else None)
        if cfg.stop and decode is None:
            raise ValueError("stop strings need a decode function")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (start from the EOS token for an empty prompt)")
        if generator is None:
            generator = torch.Generator(device=self.target.device).manual_seed(cfg.seed)
        modules = [self.target.model, self.draft.module]
        was = [m.training for m in modules]
        for m in modules:
            m.eval()  # no dropout while sampling
        hidden = LastHidden(self.target.model) if self.draft.needs_features else None
        try:
            return [self._run(list(p), r, cfg, eos_id, valid_vocab, decode, on_token, generator, hidden)
                    for r, p in enumerate(prompts)]
        finally:
            if hidden is not None:
                hidden.hook.remove()
            for m, w in zip(modules, was):
                m.train(w)

    def _run(self, prompt: list[int], row: int, cfg: SampleConfig, eos_id: int | None, valid_vocab: int | None,
             decode, on_token, generator: torch.Generator, hidden: LastHidden | None) -> list[int]:
        engine, n_new, greedy = self.target, cfg.max_new_tokens, cfg.temperature == 0
        ctx = engine.context()
        if len(prompt) > ctx:
            warnings.warn(f"a prompt of {len(prompt)} tokens is longer than the context ({ctx} tokens); the model "
                          f"sees only its last {ctx} tokens", stacklevel=4)
        seq, view, out = list(prompt), list(prompt[-ctx:]), []  # whole text; what the target sees; new tokens
        if n_new == 0:
            return out
        device = engine.device

        def pick(logits: torch.Tensor, context: Sequence[int]) -> tuple[int, torch.Tensor | None]:
            z = filtered_logits(logits, [context], cfg, valid_vocab)[0]
            if greedy:
                return int(z.argmax()), None
            q = F.softmax(z, dim=-1)
            return int(torch.multinomial(q, 1, generator=generator)), q

        cache = KVCache.for_model(engine.model, 1, min(ctx, len(view) + n_new + self.k))
        feats: torch.Tensor | None = None  # the target's features at view[:held], (held, C), for drafts that read them
        held = 0  # tokens of view in the target's cache: all but the newest
        self.draft.reset()
        while True:
            pending = view[held:]
            if cache.room() < len(pending):  # full: slide as the engine does, then re-prefill
                view = view[-max(1, int(ctx * SLIDE_KEEP)):]
                cache = KVCache.for_model(engine.model, 1, ctx)
                held, pending, feats = 0, view[:], None
                self.draft.reset()
            k = min(self.k, cache.room() - len(pending), n_new - len(out) - 1)
            drafts, qs = [], []
            if k > 0 and (not self.draft.needs_features or held == len(view) - 1):
                drafts, qs = self.draft.propose(view, feats, k, pick)
            idx = torch.tensor([pending + drafts], device=device)
            logits, _ = engine.model(idx, cache=cache)  # (1, P + k, V)
            logits = logits[0, len(pending) - 1:]  # (k + 1, V): next-token logits after the newest, d_1, ..., d_k
            z = filtered_logits(logits, [seq + drafts[:j] for j in range(len(drafts) + 1)], cfg, valid_vocab)
            a, token = self._verify(z, drafts, qs, greedy, generator)
            self.stats.forwards += 1
            self.stats.drafted += len(drafts)
            self.stats.accepted += a
            self.stats.produced += a + 1
            held += len(pending) + a
            cache.truncate([held])
            if hidden is not None:
                new = hidden.value[0, : len(pending) + a]  # (P + a, C)
                feats = new if feats is None else torch.cat([feats, new])
            for t in drafts[:a] + [token]:
                if t == eos_id:
                    return out
                seq.append(t)
                view.append(t)
                out.append(t)
                if on_token is not None:
                    on_token(row, t)
                if cfg.stop:
                    cut = first_stop(decode(out), cfg.stop)
                    if cut >= 0:
                        return trim_at(out, cut, decode)
                if len(out) == n_new:
                    return out

    def _verify(self, z: torch.Tensor, drafts: list[int], qs: list[torch.Tensor | None], greedy: bool,
                generator: torch.Generator) -> tuple[int, int]:
        """z: (k + 1, V) filtered target logits. Returns (drafted tokens accepted, the target's own token)."""
        if greedy:
            best = z.argmax(dim=-1).tolist()
            a = 0
            while a < len(drafts) and drafts[a] == best[a]:
                a += 1
            return a, best[a]
        p = F.softmax(z, dim=-1)  # (k + 1, V)
        for j, (d, q) in enumerate(zip(drafts, qs)):
            u = torch.rand((), generator=generator, device=p.device)
            if u * q[d] < p[j, d]:  # accept with probability min(1, p/q); q[d] > 0 as d was drawn from q
                continue
            residual = (p[j] - q).clamp(min=0)
            if not residual.sum() > 0:  # p == q up to rounding: then a rejection cannot happen, but be safe
                residual = p[j]
            return j, int(torch.multinomial(residual, 1, generator=generator))
        return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))
