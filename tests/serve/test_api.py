"""The server through the official `openai` client (and raw HTTP where the client hides what is sent):
completions and chat, streaming and not, usage, stop strings, echoed log-probabilities, and the safety
limits (API key, body size, prompt and max_tokens bounds, a full queue, unsupported fields)."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest
import torch
import torch.nn.functional as F

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.config import SampleConfig
from scratchlm.infer.engine import Engine
from scratchlm.tokenizer.chat import render
from tests.serve.server import BLOCK, app_for, chat_checkpoint, http, running, slow_down


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def reference(ckpt):
    model, tok, _ = load_model_for_inference(ckpt)
    return Engine(model, tok), tok


@pytest.fixture(scope="module")
def server(ckpt):
    app = app_for(ckpt, max_body=20_000, max_batch=4, max_queue=8)
    delay = [0.0]
    slow_down(app, delay)
    with running(app) as url:
        yield url, app, delay


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_text(reference, prompt_ids: list[int], n: int, eos: int | None = None) -> str:
    engine, tok = reference
    out = engine.generate([prompt_ids], SampleConfig(temperature=0.0, max_new_tokens=n), eos_id=eos)[0]
    return tok.decode(out)


def test_completions_match_the_engine_streamed_or_not(client, reference):
    engine, tok = reference
    want = greedy_text(reference, tok.encode("abc. "), 30)
    r = client.completions.create(model="tiny", prompt="abc. ", max_tokens=30, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.model == "tiny"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 30, 35)
    chunks = list(client.completions.create(model="tiny", prompt="abc. ", max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len(chunks) > 5  # streamed piece by piece
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    ids = client.completions.create(model="tiny", prompt=tok.encode("abc. "), max_tokens=30, temperature=0)
    assert ids.choices[0].text == want  # a token-id prompt is the same prompt


def test_the_stream_is_openai_sse_ending_in_done(server):
    url = server[0]
    r = http("POST", url + "/v1/chat/completions", json_body={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert {"id", "created", "model"} <= set(first)


def test_chat_uses_the_template_and_streams_what_it_returns(client, reference):
    engine, tok = reference
    msgs = [{"role": "system", "content": "be kind."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi."}, {"role": "user", "content": "go on"}]
    ids, _ = render(tok, [(m["role"], m["content"]) for m in msgs], add_generation_prompt=True)
    want = greedy_text(reference, ids, 40, eos=tok.special_tokens["<|end|>"])
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.object == "chat.completion"
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def test_stop_strings_cut_the_text_and_n_seed_sample_reproducibly(client, reference):
    engine, tok = reference
    full = greedy_text(reference, tok.encode("hello"), 40)
    stop = full[8:10]
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="hello", max_tokens=40, temperature=0, stop=stop, stream=True))
    assert streamed == full[: full.find(stop)]
    a = client.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=1.0, seed=5, n=3)
    b = client.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=1.0, seed=5, n=3)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1 and [c.index for c in a.choices] == [0, 1, 2]


def test_echo_logprobs_are_the_models_log_probabilities(client, reference):
    """What lm-eval's local-completions asks: token-id prompts, max_tokens 1, echo, logprobs 1."""
    engine, tok = reference
    prompts = [tok.encode("abc dab."), tok.encode("hello hello")]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0)
    for p, choice in zip(prompts, r.choices):
        with torch.no_grad():
            logits, _ = engine.model(torch.tensor([p]))
        lp = F.log_softmax(logits[0, :, : tok.vocab_size].float(), dim=-1)  # (P, V)
        got = choice.logprobs
        assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
        assert len(got.token_logprobs) == len(p) + 1  # the prompt, then the generated token
        for i in range(1, len(p)):
            assert got.token_logprobs[i] == pytest.approx(float(lp[i - 1, p[i]]), abs=1e-5)
            (best, value), = got.top_logprobs[i].items()
            assert best == tok.decode([int(lp[i - 1].argmax())]) and value == pytest.approx(float(lp[i - 1].max()))
        assert got.token_logprobs[-1] == max(got.top_logprobs[-1].values())  # greedy: the top one, exactly
        assert choice.text.startswith(tok.decode(p))


def test_metrics_health_and_models(server, client):
    url = server[0]
    assert http("GET", url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list()] == ["tiny"]
    client.completions.create(model="tiny", prompt="a", max_tokens=3)
    text = http("GET", url + "/metrics").text
    for name in ("scratchlm_requests_total", "scratchlm_generation_tokens_total", "scratchlm_queue_depth",
                 "scratchlm_batch_size", "scratchlm_time_to_first_token_seconds_count", "scratchlm_tokens_per_second"):
        assert name in text
    done = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("scratchlm_requests_total"))
    assert done >= 1


@pytest.mark.parametrize("body, status, says", [
    ({"prompt": "a", "tools": [{"type": "function"}]}, 400, "tools is not supported"),
    ({"prompt": "a", "response_format": {"type": "json_object"}}, 400, "response_format is not supported"),
    ({"prompt": "a", "max_tokens": BLOCK}, 400, "max_tokens=256 is too large"),
    ({"prompt": "a" * (BLOCK + 1)}, 400, "context is 256 tokens"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature=-1 is out of range"),
    ({"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens must be an integer"),
    ({"prompt": "a", "colour": 1}, 400, "unknown field 'colour'"),
    ({"prompt": "xyz"}, 400, "not in this checkpoint"),
    ({"prompt": [999]}, 400, "token id outside"),
    ({"prompt": "a" * 30_000}, 413, "larger than 20000 bytes"),
])
def test_bad_requests_get_the_openai_error_shape(server, body, status, says):
    r = http("POST", server[0] + "/v1/completions", json_body=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert says in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_invalid_json_and_bad_messages_are_400_not_tracebacks(server):
    url = server[0]
    r = http("POST", url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = http("POST", url + "/v1/chat/completions", json_body={"messages": [{"role": "tool", "content": "x"}]})
    assert r.status_code == 400 and "role='tool'" in r.json()["error"]["message"]
    assert "Traceback" not in r.text
    r = http("POST", url + "/v1/chat/completions", json_body={"messages": [{"role": "user", "content": "xyz"}]})
    assert r.status_code == 400 and "messages cannot be encoded" in r.json()["error"]["message"]


def test_the_api_key_is_required_on_v1(ckpt):
    with running(app_for(ckpt, api_key="s3cret")) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="a", max_tokens=2)
        assert http("GET", url + "/v1/models").status_code == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        # greedy: a sampled reply may draw an end token first and stop at 1
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2,
                                       temperature=0).usage.completion_tokens == 2
        assert http("GET", url + "/health").status_code == 200  # health and the page need no key


def test_a_full_queue_answers_429_and_a_disconnect_frees_the_row(ckpt):
    app = app_for(ckpt, max_batch=1, max_queue=1)
    scheduler = app.state.scheduler
    delay = [0.05]
    slow_down(app, delay)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        # greedy, so the reply runs to max_tokens (a sampled one may end early and free the batch)
        stream = client.completions.create(model="tiny", prompt="a", max_tokens=200, stream=True, temperature=0)
        next(iter(stream))  # running: the batch (of 1) is full
        waiting = threading.Thread(target=lambda: client.completions.create(model="tiny", prompt="b", max_tokens=2))
        waiting.start()
        deadline = time.monotonic() + 10
        while not scheduler.waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError):  # the queue (of 1) is full too
            client.completions.create(model="tiny", prompt="c", max_tokens=2)
        stream.close()  # the client goes away mid-stream
        waiting.join(timeout=30)
        assert not waiting.is_alive()  # the waiting request got the freed row
        assert scheduler.metrics.requests["cancelled"] == 1
        assert scheduler.metrics.generated_tokens < 200 + 2


def test_a_request_past_its_time_limit_gets_504(ckpt):
    app = app_for(ckpt, timeout=0.3)
    slow_down(app, [0.05])
    with running(app) as url:
        # greedy: a sampled reply could draw an end token early and finish inside the limit
        r = http("POST", url + "/v1/completions", json_body={"prompt": "a", "max_tokens": 100, "temperature": 0})
        assert r.status_code == 504 and "longer than 0.3 s" in r.json()["error"]["message"]
