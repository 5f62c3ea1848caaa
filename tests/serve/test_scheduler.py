"""The continuous-batching loop, driven step by step (no thread, no HTTP): a request's output does not
depend on its batch-mates or on when it joined, stop strings are held back and cut, cancelled rows
leave at once, the queue is bounded, and echoed log-probabilities are the model's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import SampleConfig
from scratchlm.infer.engine import Engine
from scratchlm.serve import scheduler as sched
from scratchlm.serve.scheduler import Event, Params, QueueFull, Request, Scheduler
from tests.helpers import char_tokenizer, prompts_of, tiny_model

BLOCK = 32


@pytest.fixture(scope="module")
def model64():
    return tiny_model(seed=3, block_size=BLOCK).double()  # float64: batch shape cannot flip a near tie


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


class Collect:
    """A request's events, as the API layer would receive them."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events for t in e.tokens]

    @property
    def finish(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None


def request(prompt, **params) -> tuple[Request, Collect]:
    c = Collect()
    params.setdefault("temperature", 0.0)
    return Request(prompt, Params(**params), c), c


def run_until_done(s: Scheduler, collects: list[Collect], limit: int = 500) -> None:
    for _ in range(limit):
        if all(c.finish for c in collects):
            return
        s.step()
    raise AssertionError("the requests did not finish")


def sixteen(tok) -> tuple[list[list[int]], list[int]]:
    prompts = prompts_of([3 + (i * 5) % 11 for i in range(16)], vocab=tok.vocab_size, seed=4)
    max_tokens = [BLOCK - len(p) - (i % 3) * 4 for i, p in enumerate(prompts)]  # up to the whole context
    return prompts, max_tokens


def test_greedy_output_is_the_same_alone_and_among_fifteen_others_joining_at_staggered_steps(
        model64, tok, monkeypatch):
    prompts, max_tokens = sixteen(tok)
    eot = tok.eot_id
    alone = []
    for p, m in zip(prompts, max_tokens):
        s = Scheduler(Engine(model64, tok), tok)
        r, c = request(p, max_tokens=m)
        s.submit([r])
        run_until_done(s, [c])
        alone.append(c.tokens)
        # ... which is what the engine's own generate makes (EOS ends both)
        ref = Engine(model64, tok).generate([p], SampleConfig(temperature=0.0, max_new_tokens=m), eos_id=eot)[0]
        assert c.tokens == ref
    assert sum(len(t) for t in alone) > 16 * 8  # long enough replies for the batch to overlap

    compactions = []
    real = sched.compact

    def counted(cache) -> None:
        compactions.append(cache.len)
        real(cache)

    monkeypatch.setattr(sched, "compact", counted)
    s = Scheduler(Engine(model64, tok), tok, max_batch=16, prefill_requests=2)
    collects = []
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        r, c = request(p, max_tokens=m)
        s.submit([r])
        collects.append(c)
        for _ in range(i % 4):  # newcomers arrive 0-3 steps apart, into a batch already running
            s.step()
    run_until_done(s, collects)
    assert [c.tokens for c in collects] == alone
    assert s.metrics.joins > 8 and s.metrics.peak_batch >= 8
    assert compactions, "the cache never filled: the test no longer covers compaction"
    assert s.rows == [] and s.cache is None


def test_seeded_sampling_draws_the_same_tokens_whatever_the_batch(model64, tok):
    prompts, _ = sixteen(tok)
    p = prompts[0]
    s = Scheduler(Engine(model64, tok), tok)
    r, alone = request(p, max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    s.submit([r])
    run_until_done(s, [alone])
    s = Scheduler(Engine(model64, tok), tok)
    others = [request(q, max_tokens=20, temperature=1.0, seed=i) for i, q in enumerate(prompts[1:6])]
    r, mixed = request(p, max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    s.submit([o[0] for o in others[:3]])
    s.step()
    s.submit([r] + [o[0] for o in others[3:]])
    run_until_done(s, [mixed] + [o[1] for o in others])
    assert mixed.tokens == alone.tokens
    assert [o[1].tokens for o in others] != [mixed.tokens] * 5


def test_stop_strings_are_held_back_and_cut(model64, tok):
    prompt = prompts_of([5], vocab=tok.vocab_size, seed=9)[0]
    s = Scheduler(Engine(model64, tok), tok)
    r, full = request(prompt, max_tokens=BLOCK - 5)
    s.submit([r])
    run_until_done(s, [full])
    text = full.text
    assert len(text) >= 8, text
    stop = text[5:7]  # a two-character string first seen at character 5 or before
    cut = text.find(stop)
    s = Scheduler(Engine(model64, tok), tok)
    r, c = request(prompt, max_tokens=BLOCK - 5, stop=[stop, "never seen"])
    s.submit([r])
    run_until_done(s, [c])
    assert c.text == text[:cut] and c.finish == "stop"
    for i in range(1, len(c.events) + 1):  # nothing streamed is ever taken back, nor shows the stop
        assert stop not in "".join(e.text for e in c.events[:i])


def test_a_cancelled_request_leaves_the_batch_at_the_next_step(model64, tok):
    s = Scheduler(Engine(model64, tok), tok)
    (a, ca), (b, cb) = request([1, 2, 3], max_tokens=20), request([4, 5], max_tokens=20)
    s.submit([a, b])
    s.step()
    s.step()
    assert s.cache.batch == 2
    a.cancel()
    n = len(ca.events)
    s.step()
    assert s.rows == [b] and s.cache.batch == 1 and len(ca.events) == n
    m = len(cb.events)
    s.step()
    assert len(cb.events) == m + 1  # the other row keeps streaming
    assert s.metrics.requests["cancelled"] == 1


def test_the_queue_is_bounded_and_max_batch_caps_the_batch(model64, tok):
    s = Scheduler(Engine(model64, tok), tok, max_batch=2, max_queue=3)
    s.submit([request([1], max_tokens=5)[0] for _ in range(3)])
    with pytest.raises(QueueFull):
        s.submit([request([1], max_tokens=5)[0]])
    s.step()
    assert len(s.rows) == 2 and len(s.waiting) == 1 and s.metrics.queue_depth == 1


def test_echoed_prompt_logprobs_are_the_models_own(model64, tok):
    prompt = prompts_of([9], vocab=tok.vocab_size, seed=5)[0]
    s = Scheduler(Engine(model64, tok), tok)
    r, c = request(prompt, max_tokens=1, logprobs=2, echo=True)
    s.submit([r])
    run_until_done(s, [c])
    with torch.no_grad():
        logits, _ = model64(torch.tensor([prompt]))
    lp = F.log_softmax(logits[0, :, : tok.vocab_size], dim=-1)  # (P, V): the padded ids are never sampled
    got = c.events[0].prompt_logprobs
    assert got[0] is None and len(got) == len(prompt)
    for i in range(1, len(prompt)):
        assert got[i].token == prompt[i]
        assert got[i].logprob == pytest.approx(float(lp[i - 1, prompt[i]]), abs=1e-6)
        assert [t for t, _ in got[i].top] == lp[i - 1].topk(2).indices.tolist()
    gen = c.events[-1]
    assert c.finish == "length" and gen.completion_tokens == 1
    assert len(c.tokens) == 1 and c.events[0].logprobs[0].logprob == pytest.approx(float(lp[-1].max()), abs=1e-6)
