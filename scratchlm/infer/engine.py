"""The inference engine: token ids in, token ids out, with a KV cache.

Sampling, chat, evaluation, RL rollouts and serving all generate through one `Engine`, so a
speed-up or a fix lands everywhere. It works on ids; text is the caller's (or the tokenizer's).

    prefill:  the prompts, left-padded to one (B, P) batch, run through the model once,
              filling a cache; returns each row's next-token logits (B, V)
    decode:   one token per row through the model, reading the cache; (B, V) logits
    generate: prefill, then sample / decode until max_new_tokens, EOS or a stop string

Choices:
- Prompts of different lengths share one batch by left padding (`KVCache(pad=...)`): every row's
  last token sits in the last column, each row's positions start at 0 after its padding, and
  padding slots are never attended to, so a row generates what it would alone (tested greedy).
- Sampling is `sample.sample_next` (padding mask, repetition penalty, temperature, top-k, top-p,
  min-p), the same pure filters the plain loop used.
- A row that meets EOS or a stop string stops contributing output and leaves the batch: the cache
  keeps only the running rows (`select_rows`), so long-running rows do not pay for finished ones.
- Past the context with the KV cache: we slide rather than stop. When the cache is full, each
  row whose text reached the context keeps its last half-context of tokens and the batch is
  re-prefilled (rows still inside the context recompute exactly what they had). Half a block is
  the trade-off: the model always sees at least half its context, and a re-prefill (one batched
  forward of half a block) is paid once per half block of new tokens, not once per token as
  keeping the last block - 1 tokens would cost. Within the context, cached ≡ uncached exactly.
- `cache="sink"` is `SinkCache` (StreamingLLM's attention sinks + rolling window, fixed memory,
  no slides, RoPE models only). It has no padding mask, so rows are run in one batch per prompt
  length. `cache="none"` (and any model without the cache protocol, e.g. the bigram) recomputes
  the full forward over each row's last `block_size` tokens every step, as the plain loop did.

The caches follow one protocol (`cache.py`): besides what a forward needs, rows leave (`select_rows`),
join a running batch (`join`) and roll back (`truncate`), and a layer may keep a recurrent state; the
serving, speculative-decoding and SSM stages build on those.

Left out: a scheduler that admits new requests into a running batch (continuous batching; the caches
can `join`, `generate` does not yet), paged KV memory, prefix sharing, beam search, and torch.compile /
CUDA graphs for the decode step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from scratchlm.config import SampleConfig
from scratchlm.errors import UserError
from scratchlm.infer.cache import Cache
from scratchlm.infer.kv_cache import KVCache
from scratchlm.infer.sample import check_sample_config, sample_next
from scratchlm.infer.sink_cache import SinkCache, check_sink_settings
from scratchlm.model.base import LanguageModel

CACHE_KINDS = ("kv", "sink", "none")
SLIDE_KEEP = 0.5  # fraction of the context a row keeps when the KV cache is full (see the module docstring)


def first_stop(text: str, stop: Sequence[str]) -> int:
    """The index where the earliest stop string starts in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


def trim_at(ids: list[int], cut: int, decode: Callable[[list[int]], str]) -> list[int]:
    """The longest token prefix whose text ends at or before character `cut`. A token whose text
    straddles the cut is dropped whole (ids cannot hold part of a token)."""
    n = len(ids)
    while n > 0 and len(decode(ids[:n])) > cut:
        n -= 1
    return ids[:n]


@dataclass
class _Job:
    """The settings of one `generate` call, shared by its batches."""

    cfg: SampleConfig
    eos_id: int | None
    valid_vocab: int | None
    decode: Callable[[list[int]], str] | None
    on_token: Callable[[int, int], None] | None
    on_logits: Callable[[list[int], torch.Tensor], None] | None
    generator: torch.Generator
    context: int
    cache: str
    sink_tokens: int
    window: int


class Engine:
    """Generation from one model; `tokenizer` (optional) supplies decode, EOS and the real vocabulary size.

    `self.cache` is the cache of the batch running now (or run last), for inspection: its memory,
    its size over a long stream.
    """

    def __init__(self, model: LanguageModel, tokenizer=None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.cache: Cache | None = None
        # The bigram and MLP baselines have no cache protocol: they are run uncached.
        self.cacheable = model.attention_shape() is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def context(self, max_len: int | None = None) -> int:
        """Tokens the model may see at once: block_size, or max_len for a RoPE model with
        model.rope.scaling set (a GPT's position table and an unscaled RoPE end at block_size)."""
        c = self.model.config
        if max_len is None or max_len == c.block_size:
            return c.block_size
        if max_len < 1:
            raise UserError(f"max_len={max_len} must be >= 1")
        if max_len > c.block_size and not self.model.can_stretch:
            raise UserError(f"max_len={max_len} is longer than model.block_size={c.block_size}",
                            fix="only a RoPE model with model.rope.scaling set reaches past its block")
        return max_len

    def new_cache(self, batch: int, *, kind: str = "kv", max_len: int | None = None, pad: torch.Tensor | None = None,
                  sink_tokens: int = 4, window: int = 0) -> Cache:
        """An empty cache for `batch` rows: kv holds max_len slots (default block_size), sink holds
        sink_tokens + window (window 0 = the rest of the context)."""
        if kind == "kv":
            return KVCache.for_model(self.model, batch, max_len or self.context(), pad=pad)
        if kind == "sink":
            if pad is not None:
                raise ValueError("the sink cache has no padding mask: give it prompts of one length")
            return SinkCache.for_model(self.model, batch, sink_tokens=sink_tokens, window=window)
        raise UserError(f"sample.cache={kind!r} is unknown", fix="use kv or sink")

    def _forward(self, idx: torch.Tensor, cache: Cache) -> torch.Tensor:
        logits, _ = self.model(idx, cache=cache, last_only=True)  # (B, 1, V)
        return logits[:, -1].float()  # fp32: the filters compare and sum probabilities

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], *, cache: str = "kv", max_len: int | None = None,
                sink_tokens: int = 4, window: int = 0) -> tuple[torch.Tensor, Cache]:
        """Run the prompts through the model into a new cache: (next-token logits (B, V) fp32, cache).

        kv: prompts of any lengths (<= max_len, the cache's slots, default block_size), left-padded.
        sink: prompts of one length; the slots are filled in one forward, the rest of a longer
        prompt goes one token at a time (each evicting the oldest window token, as in a stream).
        The caller puts the model in eval mode (`generate` does)."""
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise ValueError("every prompt needs at least one token")
        B, P = len(prompts), max(lengths)
        if cache == "sink":
            if len(set(lengths)) > 1:
                raise ValueError("the sink cache takes prompts of one length (Engine.generate groups them)")
            c = self.new_cache(B, kind="sink", sink_tokens=sink_tokens, window=window)
            idx = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=self.device)  # (B, P)
            first = min(P, c.room())
            logits = self._forward(idx[:, :first], c)
            for t in range(first, P):
                logits = self._forward(idx[:, t : t + 1], c)
        else:
            slots = max_len or self.context()
            if P > slots:
                raise ValueError(f"a prompt of {P} tokens does not fit a cache of {slots} slots")
            pad = torch.tensor([P - n for n in lengths], device=self.device) if len(set(lengths)) > 1 else None
            c = self.new_cache(B, kind=cache, max_len=slots, pad=pad)
            idx = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], dtype=torch.long, device=self.device)
            logits = self._forward(idx, c)
        self.cache = c
        return logits, c

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int] | torch.Tensor, cache: Cache) -> torch.Tensor:
        """One token per row (B,) through the model, appended to the cache: next-token logits (B, V) fp32."""
        idx = torch.as_tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)  # (B, 1)
        return self._forward(idx, cache)

    @torch.inference_mode()
    def forward_uncached(self, views: Sequence[Sequence[int]]) -> torch.Tensor:
        """Next-token logits (B, V) fp32 by full forwards over each row's tokens, no cache. Rows of one
        length share a (G, T) batch with no padding (the models have no padding mask without a cache)."""
        groups: dict[int, list[int]] = {}
        for pos, view in enumerate(views):
            groups.setdefault(len(view), []).append(pos)
        out = torch.empty(len(views), self.model.config.vocab_size, device=self.device)  # (B, V)
        for rows in groups.values():
            idx = torch.tensor([list(views[r]) for r in rows], dtype=torch.long, device=self.device)
            logits, _ = self.model(idx)  # (G, T, V)
            out[rows] = logits[:, -1].float()
        return out

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
        on_logits: Callable[[list[int], torch.Tensor], None] | None = None,
        generator: torch.Generator | None = None,
        max_len: int | None = None,
        cache: str = "kv",
        sink_tokens: int = 4,
        window: int = 0,
    ) -> list[list[int]]:
        """Continue each prompt by up to cfg.max_new_tokens tokens; returns the new tokens per row.

        A row stops at eos_id (not included in its output) or once `decode` of its continuation
        contains one of cfg.stop (the output is trimmed to before the stop string). decode, eos_id
        and valid_vocab default to the tokenizer's. `on_token(row, id)` sees every kept token as it
        is sampled (streaming); `on_logits(rows, logits)` sees each step's raw next-token logits
        (len(rows), V) of the rows still running. Without a generator, one seeded with cfg.seed is
        made on the model's device. A prompt longer than the context (block_size, or max_len) is
        cropped from the left with a warning. cache: kv | sink | none (see the module docstring);
        sink_tokens and window size the sink cache (window 0 = block_size - sink_tokens).
        """
        check_sample_config(cfg)
        tok = self.tokenizer
        if decode is None and tok is not None:
            decode = tok.decode
        if valid_vocab is None and tok is not None:
            valid_vocab = tok.vocab_size
        if eos_id is None and tok is not None:
            eos_id = tok.eot_id
        if cfg.stop and decode is None:
            raise ValueError("stop strings need a decode function")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (start from the EOS token for an empty prompt)")
        if cache not in CACHE_KINDS:
            raise UserError(f"sample.cache={cache!r} is unknown", fix="use kv, sink or none")
        if cache == "sink":
            check_sink_settings(self.model, sink_tokens, window)  # fail before any work
        if not self.cacheable:
            if cache == "sink":
                raise UserError(f"model.arch={self.model.config.arch} has no KV cache, so no sink cache")
            cache = "none"
        context = self.context(max_len)
        long = [len(p) for p in prompts if len(p) > context]
        if long:
            warnings.warn(f"a prompt of {max(long)} tokens is longer than the context ({context} tokens; "
                          f"model.block_size={self.model.config.block_size}); the model sees only its last "
                          f"{context} tokens", stacklevel=3)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        job = _Job(cfg, eos_id, valid_vocab, decode, on_token, on_logits, generator, context, cache, sink_tokens,
                   window)
        outs: list[list[int]] = [[] for _ in prompts]
        if cfg.max_new_tokens == 0 or not prompts:
            return outs
        if cache == "sink":  # one batch per prompt length: the sink cache has no padding mask
            groups: dict[int, list[int]] = {}
            for r, p in enumerate(prompts):
                groups.setdefault(min(len(p), context), []).append(r)
            batches = list(groups.values())
        else:
            batches = [list(range(len(prompts)))]
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling
        try:
            for rows in batches:
                self._run(rows, prompts, outs, job)
        finally:
            self.model.train(was_training)
        return outs

    def _run(self, rows: list[int], prompts: Sequence[Sequence[int]], outs: list[list[int]], job: _Job) -> None:
        """Generate for one batch of rows (indices into prompts), appending to outs[row]."""
        cfg, n_new, ctx = job.cfg, job.cfg.max_new_tokens, job.context
        seqs = {r: list(prompts[r]) for r in rows}  # the whole text so far: the repetition-penalty context
        views = {r: list(prompts[r][-ctx:]) for r in rows}  # what the model sees (kv: the cache + the new token)
        # No slide can happen if the longest prompt plus its new tokens fit: then allocate only that.
        slots = min(ctx, max(len(v) for v in views.values()) + n_new - 1)
        active = list(rows)
        logits = self._start(active, views, job, slots)
        for step in range(n_new):
            if job.on_logits is not None:
                job.on_logits(list(active), logits)
            next_ids = sample_next(logits, [seqs[r] for r in active], cfg, job.generator, job.valid_vocab).tolist()
            kept = []
            for pos, (r, t) in enumerate(zip(active, next_ids)):
                if t == job.eos_id:
                    continue
                seqs[r].append(t)
                outs[r].append(t)
                views[r].append(t)
                if job.on_token is not None:
                    job.on_token(r, t)
                if cfg.stop:
                    cut = first_stop(job.decode(outs[r]), cfg.stop)
                    if cut >= 0:
                        outs[r][:] = trim_at(outs[r], cut, job.decode)
                        continue
                kept.append(pos)
            if len(kept) < len(active):
                active = [active[p] for p in kept]
                if job.cache != "none" and active:
                    self.cache.select_rows(torch.tensor(kept))
            if not active or step == n_new - 1:  # the last token needs no forward
                break
            logits = self._next(active, views, job, slots)

    def _start(self, active: list[int], views: dict[int, list[int]], job: _Job, slots: int) -> torch.Tensor:
        if job.cache == "none":
            return self.forward_uncached([views[r] for r in active])
        logits, _ = self.prefill([views[r] for r in active], cache=job.cache, max_len=slots,
                                 sink_tokens=job.sink_tokens, window=job.window)
        return logits

    def _next(self, active: list[int], views: dict[int, list[int]], job: _Job, slots: int) -> torch.Tensor:
        """Next-token logits of the active rows, whose views end in the token just sampled."""
        if job.cache == "none":
            for r in active:
                del views[r][:-job.context]
            return self.forward_uncached([views[r] for r in active])
        if self.cache.room() < 1:  # the KV cache is full: slide the rows that reached the context
            keep = max(1, int(job.context * SLIDE_KEEP))
            for r in active:
                if len(views[r]) > job.context:
                    del views[r][:-keep]
            return self._start(active, views, job, slots)
        return self.decode([views[r][-1] for r in active], self.cache)
