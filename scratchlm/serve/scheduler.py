"""Continuous batching: one loop owns the `Engine` and serves every request through one running batch.

Each `step` of the loop:

    1. drops the rows whose client went away (`cancel`) or whose time ran out;
    2. admits waiting requests, bounded (at most `prefill_requests` requests and `prefill_tokens`
       prompt tokens a step, one at least), so the streams already running get a token every step
       however long a newcomer's prompt: the newcomers are prefilled together (left-padded) and
       their cache is `join`ed after the running rows';
    3. samples one token for every row, each with its own settings (greedy rows in one argmax, the
       others one `sample_next` each with the request's own `torch.Generator`, so a seeded request
       draws the same tokens whatever its batch-mates), and streams it;
    4. retires finished rows (`select_rows`) and runs one decode for all the rest.

Choices:
- One `KVCache` holds the batch, every row right-aligned (its newest token in the last filled slot):
  a newcomer gains left padding. Rows leaving do not give their slots back, so when the cache is
  full the columns every row has as padding are dropped (`compact`); a request's prompt plus its
  max_tokens must fit the context, so that always makes room.
- Greedy output does not depend on the batch: padding is masked, positions start after it, and a
  row is never re-prefilled, so a request alone and among others computes the same numbers up to
  summation order (exactly the same tokens for a float64 model; tested).
- Text is streamed through `TextStream`'s hold-back (an incomplete UTF-8 character, a tail that
  could grow into a stop string), so nothing shown is ever taken back.
- Echoed prompt log-probabilities (the completions API's `echo` + `logprobs`) come from one plain
  forward over the prompt, run in this loop like a prefill.
- With a draft (`scratchlm serve --draft`), the scheduler is given a `SpeculativeDecoder` in place of
  the Engine and serves one request at a time, first come first served: speculative decoding runs one
  row at a time (see infer/speculative.py), and pays at batch 1. Each `step` then runs one request to
  its end through `SpeculativeDecoder.generate`, whose `on_token` feeds the same `_advance` (stop
  tokens, stop strings, max_tokens, the TextStream hold-back) and checks cancellation and the time
  limit between tokens. Greedy output is the same as without a draft (float64: tested); a seeded
  sampled request draws from the same distribution, but not the same tokens. Log-probabilities are
  not available (the API refuses them with a 400).

Left out: chunked prefill of one long prompt across steps (a prompt is prefilled whole, in one step),
paged KV memory, prefix sharing, preemption, the sink cache, models without a KV cache, and batching
with a draft.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from scratchlm.config import SampleConfig
from scratchlm.errors import UserError
from scratchlm.infer.engine import Engine, first_stop
from scratchlm.infer.kv_cache import KVCache
from scratchlm.infer.sample import mask_padding, sample_next
from scratchlm.infer.speculative import SpeculativeDecoder
from scratchlm.infer.text import TextStream
from scratchlm.tokenizer import Tokenizer

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW = 10.0  # seconds of steps the tokens/s gauge averages over


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already."""


class _Leave(Exception):
    """Raised from the speculative decoder's on_token to end its request between two tokens."""


@dataclass
class Params:
    """One request's generation settings (the OpenAI fields, checked by the API layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # alternatives per token; None = no log-probabilities at all
    echo: bool = False  # with logprobs: also score the prompt's tokens
    stop_ids: tuple[int, ...] = ()  # tokens that end the reply (EOS, <|end|>); not part of the output
    timeout: float | None = None  # seconds from submission


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the `logprobs` most likely tokens, most likely first


@dataclass
class Event:
    """What a request's stream receives: new text (and the tokens behind it), or its end."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo: first event only; None for token 0
    finish_reason: str | None = None  # stop | length | timeout | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


class Request:
    """A prompt (token ids), its settings, and `emit`, called from the loop's thread with each Event."""

    def __init__(self, prompt: list[int], params: Params, emit: Callable[[Event], object]) -> None:
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        self.prompt, self.params, self.emit = list(prompt), params, emit
        self.submitted = time.monotonic()
        self.deadline = self.submitted + params.timeout if params.timeout else math.inf
        self.cancelled = False
        self.out: list[int] = []  # tokens kept (stop tokens excluded)
        self.sampled = 0  # tokens drawn, stop tokens included
        self.sent = ""  # text emitted so far
        self.tokens_sent = 0  # tokens of `out` reported in events so far
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None
        self.cfg = SampleConfig(max_new_tokens=params.max_tokens, temperature=params.temperature,
                                top_p=params.top_p, top_k=params.top_k, min_p=params.min_p, stop=list(params.stop))
        self.generator: torch.Generator | None = None
        self.stream: TextStream | None = None
        self.pending_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    def cancel(self) -> None:
        """The client went away: the loop frees this request's row at its next step."""
        self.cancelled = True


class Metrics:
    """Counters and gauges for /metrics, written by the loop's thread only."""

    def __init__(self) -> None:
        self.requests = {"stop": 0, "length": 0, "timeout": 0, "error": 0, "cancelled": 0}
        self.prompt_tokens = self.generated_tokens = 0
        self.queue_depth = self.batch_size = self.peak_batch = 0
        self.joins = 0  # admissions into a batch that was already running
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.steps: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_count += 1
        for i, edge in enumerate(TTFT_BUCKETS):
            if seconds <= edge:
                self.ttft_buckets[i] += 1

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        recent = [(t, n) for t, n in list(self.steps) if now - t <= RATE_WINDOW]
        return sum(n for _, n in recent) / RATE_WINDOW if recent else 0.0

    def prometheus(self, model: str) -> str:
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP scratchlm_{name} {help_}", f"# TYPE scratchlm_{name} {kind}"])
            lines.extend(f"scratchlm_{name}{labels} {value:g}" for labels, value in samples)

        label = f'model="{model}"'
        metric("requests_total", "counter", "Requests finished, by reason.",
               [(f'{{{label},reason="{r}"}}', n) for r, n in self.requests.items()])
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [(f"{{{label}}}", self.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Tokens generated.", [(f"{{{label}}}", self.generated_tokens)])
        metric("queue_depth", "gauge", "Requests waiting to join the batch.", [(f"{{{label}}}", self.queue_depth)])
        metric("batch_size", "gauge", "Rows in the running batch.", [(f"{{{label}}}", self.batch_size)])
        metric("tokens_per_second", "gauge", f"Tokens generated per second over the last {RATE_WINDOW:g} s.",
               [(f"{{{label}}}", self.tokens_per_second())])
        buckets = [(f'_bucket{{{label},le="{edge:g}"}}', n) for edge, n in zip(TTFT_BUCKETS, self.ttft_buckets)]
        buckets.append((f'_bucket{{{label},le="+Inf"}}', self.ttft_count))
        buckets += [(f"_sum{{{label}}}", self.ttft_sum), (f"_count{{{label}}}", self.ttft_count)]
        metric("time_to_first_token_seconds", "histogram", "Seconds from submission to the first token.", buckets)
        return "\n".join(lines) + "\n"


def compact(cache: KVCache) -> None:
    """Drop the leading slots that every row holds as padding (rows that left made them so)."""
    if cache.pad is None or cache.batch == 0:
        return
    shift = int(cache.pad.min())
    if shift == 0:
        return
    n = cache.len - shift
    for t in (cache.k, cache.v):
        t[:, :, :, :n] = t[:, :, :, shift : cache.len].clone()
    cache.pad = cache.pad - shift
    cache.len = n


class Scheduler:
    """The serving loop around one `Engine`, or a `SpeculativeDecoder` in its place (then one request at
    a time; see the module docstring). `start` runs it in a background thread; tests may call `step`
    themselves instead."""

    def __init__(self, engine: Engine | SpeculativeDecoder, tok: Tokenizer, *, max_batch: int = 16,
                 max_queue: int = 64, prefill_requests: int = 4, prefill_tokens: int = 2048) -> None:
        self.speculative = engine if isinstance(engine, SpeculativeDecoder) else None
        if self.speculative is not None:
            engine = self.speculative.target
        if not engine.cacheable:
            raise UserError(f"model.arch={engine.model.config.arch} has no KV cache",
                            fix="serve a GPT, Llama or MoE checkpoint")
        self.engine, self.tok = engine, tok
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_requests, self.prefill_tokens = prefill_requests, prefill_tokens
        self.context = engine.context()
        self.valid_vocab = tok.vocab_size
        self.waiting: deque[Request] = deque()
        self.rows: list[Request] = []  # the running batch, in the cache's row order
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits of the rows, not yet sampled
        self.metrics = Metrics()
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        engine.model.eval()

    # -- from any thread -----------------------------------------------------------------------------

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all or none); QueueFull when the queue cannot take them all."""
        if self.speculative is not None and any(r.params.logprobs is not None for r in requests):
            raise ValueError("log-probabilities are not available with a draft")
        with self.wake:
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the queue holds {self.max_queue})")
            self.waiting.extend(requests)
            self.metrics.queue_depth = len(self.waiting)
            self.wake.notify()

    def cancel(self, request: Request) -> None:
        request.cancel()
        with self.wake:
            self.wake.notify()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="scratchlm-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self.waiting and not self.rows:
                    self.wake.wait()
                if self.stopping:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a failed step ends its requests, never the loop
                self._fail_all(f"{type(e).__name__}: {e}")

    # -- the loop ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One round: drop cancelled and late rows, admit newcomers, sample, retire, decode (with a draft:
        run the oldest waiting request to its end)."""
        now = time.monotonic()
        self._drop_waiting(now)
        if self.speculative is not None:
            with self.wake:
                oldest = self.waiting.popleft() if self.waiting else None
                self.metrics.queue_depth = len(self.waiting)
            if oldest is not None:
                self._run_alone(oldest)
            return
        gone = [i for i, r in enumerate(self.rows) if r.cancelled or now > r.deadline]
        for i in gone:
            self._end(self.rows[i], "cancelled" if self.rows[i].cancelled else "timeout")
        self._retire(gone)
        self._admit(self._take())
        if not self.rows:
            return
        finished = self._sample()
        self._retire(finished)
        if self.rows:
            if self.cache.room() < 1:
                compact(self.cache)
            self.logits = self.engine.decode([r.out[-1] for r in self.rows], self.cache)
        self.metrics.batch_size = len(self.rows)

    def _drop_waiting(self, now: float) -> None:
        with self.wake:
            late = [r for r in self.waiting if r.cancelled or now > r.deadline]
            for r in late:
                self.waiting.remove(r)
            self.metrics.queue_depth = len(self.waiting)
        for r in late:
            self._end(r, "cancelled" if r.cancelled else "timeout")

    def _take(self) -> list[Request]:
        """The waiting requests admitted this step: bounded in number and prompt tokens, one at least."""
        taken: list[Request] = []
        tokens = 0
        with self.wake:
            while self.waiting and len(taken) < self.prefill_requests and len(self.rows) + len(taken) < self.max_batch:
                n = len(self.waiting[0].prompt)
                if taken and tokens + n > self.prefill_tokens:
                    break
                taken.append(self.waiting.popleft())
                tokens += n
            self.metrics.queue_depth = len(self.waiting)
        return taken

    def _admit(self, newcomers: list[Request]) -> None:
        gen = []
        for r in newcomers:
            self.metrics.prompt_tokens += len(r.prompt)
            if r.params.echo and r.params.logprobs is not None:
                r.prompt_logprobs = self._score(r.prompt, r.params.logprobs)
            if r.params.max_tokens == 0:
                self._end(r, "length")
                continue
            self._prepare(r)
            gen.append(r)
        if not gen:
            return
        logits, cache = self.engine.prefill([r.prompt for r in gen], max_len=max(len(r.prompt) for r in gen))
        if self.rows:
            self.metrics.joins += len(gen)
            self.cache.join(cache)
            self.logits = torch.cat([self.logits, logits])
        else:
            self.cache = self.engine.new_cache(0)
            self.cache.join(cache)
            self.logits = logits
        self.rows += gen
        self.metrics.peak_batch = max(self.metrics.peak_batch, len(self.rows))

    def _prepare(self, r: Request) -> None:
        """r's own generator (seeded when asked) and text stream."""
        r.generator = torch.Generator(device=self.engine.device)
        if r.params.seed is None:
            r.generator.seed()
        else:
            r.generator.manual_seed(r.params.seed)
        r.stream = TextStream(self.tok.decode, lambda s: None, r.params.stop)

    def _run_alone(self, r: Request) -> None:
        """With a draft: generate r's reply alone through the speculative decoder. Every token goes
        through `_advance`, which ends r (the decoder's eos_id=-1 and cfg.stop=[] leave stop tokens and
        stop strings to it); on_token raises _Leave to stop the decoder once r has ended, or before a
        token when r was cancelled or ran out of time (or the loop is stopping)."""
        self.metrics.prompt_tokens += len(r.prompt)
        if r.params.max_tokens == 0:
            self._end(r, "length")
            return
        self._prepare(r)
        self.rows = [r]  # for _fail_all, should the decoder raise
        self.metrics.batch_size = 1
        self.metrics.peak_batch = max(self.metrics.peak_batch, 1)

        def on_token(row: int, t: int) -> None:
            now = time.monotonic()
            if r.cancelled or now > r.deadline or self.stopping:
                raise _Leave
            self._drawn(r, now)
            self._count(now, 1)
            if self._advance(r, t):
                raise _Leave

        with contextlib.suppress(_Leave):
            self.speculative.generate([r.prompt], dataclasses.replace(r.cfg, stop=[]), eos_id=-1,
                                      valid_vocab=self.valid_vocab, on_token=on_token, generator=r.generator)
        if r.finish_reason is None and not self.stopping:  # left before a token: gone or late
            self._end(r, "cancelled" if r.cancelled else "timeout")
        self.rows = []
        self.metrics.batch_size = 0

    def _score(self, prompt: list[int], k: int) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first), with the
        k most likely alternatives."""
        logits, _ = self.engine.model(torch.tensor([prompt], device=self.engine.device))  # (1, P, V)
        lp = F.log_softmax(mask_padding(logits[0].float(), self.valid_vocab), dim=-1)  # (P, V)
        out: list[TokenLogprob | None] = [None]
        for i in range(1, len(prompt)):
            out.append(self._logprob(lp[i - 1], prompt[i], k))
        return out

    @staticmethod
    def _logprob(lp: torch.Tensor, token: int, k: int) -> TokenLogprob:
        top = torch.topk(lp, k) if k > 0 else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return TokenLogprob(token, float(lp[token]), pairs)

    def _sample(self) -> list[int]:
        """Sample one token per row, stream it, and return the positions of the rows that finished."""
        logits = self.logits  # (B, V)
        next_ids = [0] * len(self.rows)
        greedy = [i for i, r in enumerate(self.rows) if r.params.temperature == 0]
        if greedy:
            picked = sample_next(logits[greedy], [[]] * len(greedy), self.rows[greedy[0]].cfg, None, self.valid_vocab)
            for i, t in zip(greedy, picked.tolist()):
                next_ids[i] = t
        for i, r in enumerate(self.rows):
            if r.params.temperature != 0:
                next_ids[i] = int(sample_next(logits[i : i + 1], [[]], r.cfg, r.generator, self.valid_vocab)[0])
        now = time.monotonic()
        finished = []
        for i, (r, t) in enumerate(zip(self.rows, next_ids)):
            self._drawn(r, now)
            if r.params.logprobs is not None:  # a stop token's too: the text ends, the scores do not
                lp = F.log_softmax(mask_padding(logits[i : i + 1], self.valid_vocab)[0], dim=-1)
                r.pending_logprobs.append(self._logprob(lp, t, r.params.logprobs))
            if self._advance(r, t):
                finished.append(i)
        self._count(now, len(next_ids))
        return finished

    def _drawn(self, r: Request, now: float) -> None:
        """A token was drawn for r (a stop token included): its time to first token, its count."""
        if r.first_token_at is None:
            r.first_token_at = now
            self.metrics.observe_ttft(now - r.submitted)
        r.sampled += 1

    def _count(self, now: float, n: int) -> None:
        """n tokens generated now, for the totals and the tokens/s window."""
        self.metrics.generated_tokens += n
        self.metrics.steps.append((now, n))
        while self.metrics.steps and now - self.metrics.steps[0][0] > RATE_WINDOW:
            self.metrics.steps.popleft()

    def _advance(self, r: Request, t: int) -> bool:
        """Add token t to r's reply and stream what may be shown; True when r has finished."""
        if t in r.params.stop_ids:
            self._end(r, "stop")
            return True
        r.out.append(t)
        r.stream.push(t)
        if r.params.stop:
            text = self.tok.decode(r.out)
            cut = first_stop(text, r.params.stop)
            if cut >= 0:
                self._end(r, "stop", text[:cut])
                return True
        if r.sampled >= r.params.max_tokens:
            self._end(r, "length")
            return True
        self._emit(r, r.stream.shown)
        return False

    def _emit(self, r: Request, shown: str, **end) -> None:
        delta = shown[len(r.sent):] if shown.startswith(r.sent) else shown
        ev = Event(text=delta, logprobs=r.pending_logprobs, **end)
        if r.prompt_logprobs is not None:
            ev.prompt_logprobs, r.prompt_logprobs = r.prompt_logprobs, None
        if not (delta or ev.logprobs or ev.prompt_logprobs or end):
            return
        ev.tokens, r.tokens_sent = r.out[r.tokens_sent:], len(r.out)
        r.sent, r.pending_logprobs = shown, []
        r.emit(ev)

    def _end(self, r: Request, reason: str, final: str | None = None, error: str = "") -> None:
        """Finish r: emit the rest of its text (trimmed at a stop string) and the finish reason."""
        r.finish_reason = reason
        self.metrics.requests[reason] += 1
        if reason == "cancelled":
            return
        if final is None:
            final = self.tok.decode(r.out) if reason in ("stop", "length") else r.sent
        self._emit(r, final, finish_reason=reason, prompt_tokens=len(r.prompt), completion_tokens=r.sampled,
                   error=error)

    def _retire(self, positions: list[int]) -> None:
        if not positions:
            return
        keep = [i for i in range(len(self.rows)) if i not in set(positions)]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.logits = None, None
            return
        index = torch.tensor(keep, device=self.engine.device)
        self.cache.select_rows(index)
        self.logits = self.logits[index]

    def _fail_all(self, message: str) -> None:
        """A step raised: end every running and waiting request with an error, start afresh."""
        with self.wake:
            waiting, self.waiting = list(self.waiting), deque()
        for r in self.rows + waiting:
            if r.finish_reason is None:
                self._end(r, "error", error=message)
        self.rows, self.cache, self.logits = [], None, None
