"""Serving with a draft (`scratchlm serve --draft`): requests run one at a time through the speculative
decoder, and greedy replies (plain, streamed, cut at a stop string or a stop token) are the batched
server's own, in float64 so the wider verify forward cannot flip a near tie; cancellation and the time
limit end a request between tokens; log-probabilities are a 400 naming the fix; bad input is one line."""

from __future__ import annotations

import openai
import pytest
import torch

from scratchlm.checkpoint import load_model_for_inference, save_checkpoint
from scratchlm.cli import main
from scratchlm.infer.eagle import load_draft
from scratchlm.infer.engine import Engine
from scratchlm.infer.speculative import ModelDraft, SpeculativeDecoder
from scratchlm.serve.api import Settings
from scratchlm.serve.scheduler import Params, Request, Scheduler
from scratchlm.serve.stage import build_app
from tests.helpers import char_tokenizer, prompts_of, tiny_model
from tests.serve.server import chat_checkpoint, http, running
from tests.serve.test_scheduler import Collect, request, run_until_done

BLOCK = 32


def noisy(model: torch.nn.Module, scale: float = 0.03, seed: int = 7) -> None:
    """Add noise to a copy's weights: a draft that agrees with the target often but not always."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture(scope="module")
def model64():
    return tiny_model(seed=3, block_size=BLOCK).double()


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def speculative(model64, k: int = 3) -> SpeculativeDecoder:
    draft = tiny_model(seed=3, block_size=BLOCK).double()
    noisy(draft)
    return SpeculativeDecoder(Engine(model64), ModelDraft(draft), k)


def test_scheduler_with_a_draft_runs_requests_one_at_a_time_with_the_batched_greedy_output(model64, tok):
    prompts = prompts_of([3, 7, 12, 5, 9, 4], vocab=tok.vocab_size, seed=4)
    plain = Scheduler(Engine(model64, tok), tok)
    first = [request(p, max_tokens=BLOCK - len(p)) for p in prompts]
    plain.submit([r for r, _ in first])
    run_until_done(plain, [c for _, c in first])
    full = [c for _, c in first]
    assert all(c.finish == "length" and len(c.text) > 10 for c in full)
    # the same requests, cut by a stop token (drawn, not shown) or a stop string, or not at all
    settings = [{}, {"stop_ids": (full[1].tokens[4],)}, {"stop": [full[2].text[6:8]]}, {},
                {"stop_ids": (full[4].tokens[2],), "stop": [full[4].text[7:9]]}, {"max_tokens": 3}]
    runs = []
    for sched in (Scheduler(Engine(model64, tok), tok), Scheduler(speculative(model64), tok)):
        reqs = [request(p, **{"max_tokens": BLOCK - len(p), **kw}) for p, kw in zip(prompts, settings)]
        sched.submit([r for r, _ in reqs])
        runs.append([c for _, c in reqs])
        if sched.speculative is not None:  # one step runs the oldest request to its end, alone
            sched.step()
            assert runs[-1][0].finish == "length" and not runs[-1][1].events and len(sched.waiting) == 5
        run_until_done(sched, runs[-1])
    for want, got in zip(*runs):
        assert (got.text, got.tokens, got.finish) == (want.text, want.tokens, want.finish)
        assert got.events[-1].completion_tokens == want.events[-1].completion_tokens
    assert [c.finish for c in runs[1]] == ["length", "stop", "stop", "length", "stop", "length"]
    assert runs[1][1].events[-1].completion_tokens == 5  # the stop token is counted, not shown
    st = sched.speculative.stats
    assert 0 < st.accepted < st.drafted  # drafts accepted and rejected: the rollbacks ran
    assert sched.metrics.generated_tokens == sum(c.events[-1].completion_tokens for c in runs[1])


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_with_a_draft_a_cancelled_or_late_request_stops_between_tokens(model64, tok, how):
    s = Scheduler(speculative(model64), tok)
    c = Collect()

    def emit(ev) -> None:
        c(ev)
        if len(c.events) == 2:
            if how == "cancel":
                r.cancel()
            else:
                r.deadline = 0.0

    r = Request([1, 2, 3], Params(max_tokens=20, temperature=0.0), emit)
    nxt, after = request([4, 5], max_tokens=4)
    s.submit([r, nxt])
    s.step()
    assert r.sampled == 2 and r.finish_reason == ("cancelled" if how == "cancel" else "timeout")
    assert (c.finish == "timeout") == (how == "timeout") and s.metrics.requests[r.finish_reason] == 1
    s.step()
    assert after.finish == "length" and len(after.tokens) == 4  # the next one runs as usual


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The chat checkpoint and a noisy copy of it (the draft: same tokenizer), in separate folders."""
    root = tmp_path_factory.mktemp("spec")
    ckpt = chat_checkpoint(root / "run")
    model, tok, cfg = load_model_for_inference(ckpt)
    noisy(model, 0.02)
    save_checkpoint(root / "draft", 0, model, torch.optim.AdamW(model.parameters()), cfg, tok,
                    {"best_val_loss": None})
    return ckpt, root / "draft"


def app64(ckpt, draft=None, k: int = 3):
    """The server over the checkpoint in float64, with the draft loaded as `serve --draft` loads it."""
    def generator(model, tok):
        model.double()
        if draft is None:
            return Engine(model, tok)
        return SpeculativeDecoder(Engine(model, tok), load_draft(draft, model, tok), k)

    return build_app(ckpt, Settings(model_name="tiny"), max_batch=4, generator=generator)


def replies(url: str, stop: str | None = None) -> list:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    greedy = {"model": "tiny", "temperature": 0}
    extra = {"stop": [stop]} if stop else {}
    r = client.completions.create(prompt=["abc. ", "hello ", "p"], max_tokens=40, n=2, **greedy, **extra)
    out = [(c.index, c.text, c.finish_reason) for c in r.choices]
    chunks = list(client.completions.create(prompt="abc. ", max_tokens=40, stream=True, **greedy, **extra))
    out.append(("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason, len(chunks)))
    msgs = [{"role": "user", "content": "hi. can he bed a dog."}]
    r = client.chat.completions.create(messages=msgs, max_tokens=30, **greedy, **extra)
    out.append((r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens))
    chunks = list(client.chat.completions.create(messages=msgs, max_tokens=30, stream=True, **greedy, **extra))
    out.append(("".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason))
    return out


def test_a_server_with_a_draft_gives_the_same_greedy_replies_as_without(runs):
    ckpt, draft = runs
    with running(app64(ckpt)) as url:
        want = replies(url)
        stop = want[0][1][10:12]  # a string the first reply holds at character 10 (or before)
        want_stopped = replies(url, stop)
    assert want_stopped[0][2] == "stop" and want_stopped[0][1] == want[0][1][: want[0][1].find(stop)]
    app = app64(ckpt, draft)
    with running(app) as url:
        assert replies(url) == want
        assert replies(url, stop) == want_stopped
    st = app.state.scheduler.speculative.stats
    assert 0 < st.accepted < st.drafted


def test_log_probabilities_with_a_draft_are_a_400_naming_the_fix(runs):
    ckpt, draft = runs
    with running(app64(ckpt, draft)) as url:
        for path, body in (("/v1/completions", {"prompt": "abc", "echo": True, "logprobs": 2, "max_tokens": 1}),
                           ("/v1/completions", {"prompt": "abc", "logprobs": 0}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "logprobs": True, "top_logprobs": 2})):
            r = http("POST", url + path, json_body=body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "logprobs", r.text
            assert "without --draft" in err["message"] and "logprobs" in err["message"]
        r = http("POST", url + "/v1/completions", json_body={"prompt": "abc", "echo": True, "max_tokens": 3,
                                                             "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("abc")  # echo alone is fine


def test_serve_with_a_draft_loads_it_and_says_so_and_bad_input_is_one_line_exit_2(runs, capsys, monkeypatch):
    ckpt, draft = runs
    started = []
    monkeypatch.setattr("scratchlm.serve.stage.serve", lambda app, *a, **kw: started.append(app))
    assert main(["serve", "--ckpt", str(ckpt), "--draft", str(draft), "--draft-k", "5", "--quiet"]) == 0
    err = capsys.readouterr().err
    spec = started[0].state.scheduler.speculative
    assert isinstance(spec, SpeculativeDecoder) and spec.k == 5
    assert f"--draft {draft}, k=5" in err, err
    assert main(["serve", "--ckpt", str(ckpt), "--quiet"]) == 0
    assert started[1].state.scheduler.speculative is None and "draft" not in capsys.readouterr().err
    for argv, named in ((["--draft", str(draft), "--draft-k", "0"], "--draft-k 0"),
                        (["--draft", str(ckpt / "nope")], "nope")):
        code = main(["serve", "--ckpt", str(ckpt), *argv])
        err = capsys.readouterr().err
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert len(started) == 2
