"""The OpenAI-compatible HTTP API over the scheduler, and the chat page.

    GET  /                      the chat page (static/index.html)
    GET  /health                {"status": "ok"}
    GET  /metrics               Prometheus text: requests, tokens, queue depth, batch size, TTFT, tokens/s
    GET  /v1/models             the one model served
    POST /v1/completions        prompt: text, token ids, or a list of either; echo + logprobs score the prompt
    POST /v1/chat/completions   messages rendered with the model's chat template, ending at <|end|>

Both POST endpoints take max_tokens, temperature, top_p, stop, seed, n, logprobs and stream (server-sent
events in OpenAI's chunk format, a usage chunk when stream_options.include_usage, then `data: [DONE]`),
plus top_k and min_p as extensions. Choice j of a request with a seed samples with seed + j.

Choices:
- Requests are checked by hand, field by field, so every refusal is a 400 in OpenAI's error shape naming
  the field, and a field we do not implement (tools, response_format, a non-zero penalty, ...) is
  refused rather than ignored. Any other failure is a 500 in the same shape, never a traceback.
- Safety: with an API key every /v1 request needs `Authorization: Bearer KEY` (constant-time compare);
  bodies over max_body bytes get 413 (read in pieces, so a huge body is never held); prompt length and
  max_tokens are bounded by the context; a full queue is a 429; each request has a time limit (504).
- A client that disconnects cancels its requests: the scheduler frees their rows at its next step.
- With a draft (`scratchlm serve --draft`) requests run one at a time through speculative decoding,
  which gives no log-probabilities: a request for them (logprobs, echo + logprobs) is a 400 saying so.

Left out: tools / function calling, JSON mode, best_of > n, presence and frequency penalties, logit bias,
embeddings, and more than one model per server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scratchlm.errors import UserError
from scratchlm.infer.text import encode_prompt
from scratchlm.serve.scheduler import Event, Params, QueueFull, Scheduler, TokenLogprob
from scratchlm.serve.scheduler import Request as Job
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.chat import CHAT_SPECIALS, render

STATIC = Path(__file__).resolve().parent / "static"
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "n", "stream",
          "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "user", "logprobs"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of"}
CHAT_FIELDS = COMMON | {"messages", "top_logprobs", "max_completion_tokens", "metadata", "store"}
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "suffix", "audio",
               "modalities", "prediction", "parallel_tool_calls", "web_search_options", "reasoning_effort")
MAX_STOP, MAX_LOGPROBS = 16, 20


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code


def error_body(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code or str(status)}}


@dataclass
class Settings:
    model_name: str = "scratchlm"
    api_key: str | None = None
    max_body: int = 1 << 20  # bytes
    max_tokens: int | None = None  # per choice; None = the context
    timeout: float = 600.0  # seconds per request, queueing included
    max_n: int = 16


# -- checking a request body ---------------------------------------------------------------------------


def _number(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise APIError(400, f"{name} must be a number, got {json.dumps(v)}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise APIError(400, f"{name}={v} is out of range: it must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]",
                       name)
    return float(v)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"{name} must be an integer, got {json.dumps(v)}", name)
    if v < lo or (hi is not None and v > hi):
        raise APIError(400, f"{name}={v} is out of range: it must be >= {lo}" + (f" and <= {hi}" if hi is not None
                                                                                 else ""), name)
    return v


def check_fields(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise APIError(400, f"{name} is not supported by this server", name, code="unsupported_field")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported by this server (only 0)", name, code="unsupported_field")
    if body.get("logit_bias"):
        raise APIError(400, "logit_bias is not supported by this server", "logit_bias", code="unsupported_field")
    unknown = sorted(set(body) - allowed - set(UNSUPPORTED))
    if unknown:
        raise APIError(400, f"unknown field {unknown[0]!r}", unknown[0])
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise APIError(400, "model must be a string", "model")
    return body


def sampling(body: dict, context_left: int, default_max: int, settings: Settings) -> Params:
    """The generation settings shared by both endpoints; context_left = context - prompt length."""
    limit = min(settings.max_tokens or context_left, context_left)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, None, 0)
    if max_tokens is None:
        max_tokens = min(default_max, limit)
    elif max_tokens > limit:
        why = (f"the prompt leaves {context_left} of the model's context" if limit == context_left
               else f"this server allows at most {limit}")
        raise APIError(400, f"{name}={max_tokens} is too large: {why}", name)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return Params(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                  top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=_integer(body, "top_k", 0, 0),
                  min_p=_number(body, "min_p", 0.0, 0.0, 1.0), stop=stop, seed=_integer(body, "seed", None, 0),
                  timeout=settings.timeout)


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(400, f"{name} must be true or false", name)
    return v


def stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise APIError(400, "stream_options takes only include_usage", "stream_options")
    return _flag(opts, "include_usage")


def completion_prompts(body: dict, tok: Tokenizer) -> list[list[int]]:
    """`prompt` as a string, a list of token ids, or a list of either: one id list per prompt."""
    p = body.get("prompt")
    bad = APIError(400, "prompt must be a string, a list of token ids, or a list of strings or token-id lists",
                   "prompt")
    if isinstance(p, str):
        items: list = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        items = [p]
    elif isinstance(p, list) and p:
        items = p
    else:
        raise bad
    out = []
    for item in items:
        if isinstance(item, str):
            try:
                out.append(encode_prompt(tok, item))
            except UserError as e:
                raise APIError(400, str(e).replace("--prompt", "the prompt"), "prompt") from None
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            if any(t < 0 or t >= tok.vocab_size for t in item):
                raise APIError(400, f"prompt holds a token id outside 0..{tok.vocab_size - 1}", "prompt")
            out.append(list(item))
        else:
            raise bad
    return out


def chat_prompt(body: dict, tok: Tokenizer) -> list[int]:
    if any(s not in tok.special_tokens for s in CHAT_SPECIALS):
        raise APIError(400, "this model has no chat template (its tokenizer lacks the chat tokens): use "
                            "/v1/completions, or serve a run of `scratchlm sft`", "messages")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list", "messages")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role and a content", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role={m['role']!r} is not supported (system, user, assistant)",
                           "messages")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise APIError(400, f"messages[{i}].{sorted(extra)[0]} is not supported by this server", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", "messages")
        turns.append((role, content))
    try:
        return render(tok, turns, add_generation_prompt=True)[0]
    except ValueError as e:
        raise APIError(400, f"messages cannot be encoded: {e}", "messages") from None


# -- the app ---------------------------------------------------------------------------------------------


def create_app(scheduler: Scheduler, tok: Tokenizer, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app over a scheduler (started and stopped with the app)."""
    settings = settings or Settings()
    context = scheduler.context
    http_counts: dict[tuple[str, int], int] = {}

    async def lifespan(app: FastAPI):
        if scheduler.thread is None:
            scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="scratchlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        key = (request.url.path if request.url.path in PATHS else "other", response.status_code)
        http_counts[key] = http_counts.get(key, 0) + 1
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.status, e.message, e.param, e.type, e.code), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}", type_="server_error"),
                            status_code=500)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {settings.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           type_="authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> Any:
        authorize(request)
        declared = request.headers.get("content-length")
        too_big = APIError(413, f"the request body is larger than {settings.max_body} bytes", code="413")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body:
            raise too_big
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > settings.max_body:
                raise too_big
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def check_prompt(ids: list[int], field: str) -> None:
        if len(ids) > context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is {context} tokens",
                           field, code="context_length_exceeded")

    def refuse_with_draft(field: str) -> None:
        if scheduler.speculative is not None:
            raise APIError(400, f"{field} is not available from this server: it decodes speculatively (started "
                                f"with --draft), which gives no log-probabilities; restart the server without "
                                f"--draft to get them", field, code="unsupported_field")

    def submit(jobs: list[Job]) -> None:
        try:
            scheduler.submit(jobs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", type_="rate_limit_error",
                           code="rate_limit_exceeded") from None

    def make_jobs(prompts: list[list[int]], params: list[Params], n: int,
                  q: asyncio.Queue) -> list[Job]:
        loop = asyncio.get_running_loop()
        jobs = []
        for i, (p, base) in enumerate(zip(prompts, params)):
            for j in range(n):
                choice = i * n + j
                seed = None if base.seed is None else base.seed + j
                job_params = Params(**{**base.__dict__, "seed": seed})
                jobs.append(Job(p, job_params, lambda ev, c=choice: loop.call_soon_threadsafe(q.put_nowait, (c, ev))))
        return jobs

    async def events(request: Request, jobs: list[Job], q: asyncio.Queue):
        """(choice, Event) as they come, until every job has finished; cancels the jobs if left early."""
        left = len(jobs)
        try:
            while left:
                try:
                    choice, ev = await asyncio.wait_for(q.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if ev.finish_reason is not None:
                    left -= 1
                yield choice, ev
        finally:
            for job in jobs:
                if job.finish_reason is None:
                    scheduler.cancel(job)

    def fail(ev: Event) -> APIError:
        if ev.finish_reason == "timeout":
            return APIError(504, f"the request took longer than {settings.timeout:g} s", type_="timeout",
                            code="timeout")
        return APIError(500, f"generation failed: {ev.error}", type_="server_error")

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    def piece(t: int) -> str:
        return tok.decode([t])

    def completion_logprobs(first: int | None, lps: list[TokenLogprob | None]) -> dict:
        """OpenAI's completion logprobs; `first`: the echoed prompt's first token, which has no score."""
        tokens = [] if first is None else [piece(first)]
        token_lps: list[float | None] = [] if first is None else [None]
        tops: list[dict | None] = [] if first is None else [None]
        for lp in lps:
            if lp is not None:
                tokens.append(piece(lp.token))
                token_lps.append(lp.logprob)
                tops.append({piece(t): v for t, v in lp.top})
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(lps: list[TokenLogprob]) -> dict:
        def entry(t: int, v: float) -> dict:
            s = piece(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}
        return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps]}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = scheduler.metrics.prometheus(settings.model_name)
        lines = ["# HELP scratchlm_http_requests_total HTTP requests answered, by path and status.",
                 "# TYPE scratchlm_http_requests_total counter"]
        lines += [f'scratchlm_http_requests_total{{path="{p}",status="{s}"}} {n}'
                  for (p, s), n in sorted(http_counts.items())]
        return PlainTextResponse(text + "\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "scratchlm", "max_model_len": context}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = check_fields(await read_body(request), COMPLETION_FIELDS)
        prompts = completion_prompts(body, tok)
        for p in prompts:
            check_prompt(p, "prompt")
        n = _integer(body, "n", 1, 1, settings.max_n)
        if _integer(body, "best_of", n, n, n) != n:
            raise APIError(400, "best_of other than n is not supported", "best_of")
        echo, stream = _flag(body, "echo"), _flag(body, "stream")
        usage_chunk = stream_options(body, stream)
        k = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
        if k is not None:
            refuse_with_draft("logprobs")
        params = []
        for p in prompts:
            ps = sampling(body, context - len(p), 16, settings)
            ps.logprobs, ps.echo = k, echo
            ps.stop_ids = () if tok.eot_id is None else (tok.eot_id,)
            params.append(ps)
        if stream and echo:
            raise APIError(400, "echo is not supported with stream: true", "echo")
        q: asyncio.Queue = asyncio.Queue()
        jobs = make_jobs(prompts, params, n, q)
        submit(jobs)
        rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), settings.model_name

        def chunk(choices: list, usage: dict | None = None) -> dict:
            out = {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        if stream:
            async def gen():
                usage = {"prompt_tokens": 0, "completion_tokens": 0}
                async for c, ev in events(request, jobs, q):
                    if ev.finish_reason in ("timeout", "error"):
                        e = fail(ev)
                        yield sse(error_body(e.status, e.message, type_=e.type, code=e.code))
                        break
                    lps = completion_logprobs(None, ev.logprobs) if k is not None else None
                    yield sse(chunk([{"index": c, "text": ev.text, "logprobs": lps,
                                      "finish_reason": ev.finish_reason}]))
                    if ev.finish_reason is not None:
                        usage["prompt_tokens"] += ev.prompt_tokens if c % n == 0 else 0
                        usage["completion_tokens"] += ev.completion_tokens
                if usage_chunk:
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    yield sse(chunk([], usage))
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")

        got: dict[int, list[Event]] = {c: [] for c in range(len(jobs))}
        async for c, ev in events(request, jobs, q):
            if ev.finish_reason in ("timeout", "error"):
                raise fail(ev)
            got[c].append(ev)
        if await request.is_disconnected() or any(not evs or evs[-1].finish_reason is None for evs in got.values()):
            return Response(status_code=499)
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for c, evs in got.items():
            prompt = prompts[c // n]
            text = "".join(e.text for e in evs)
            head = tok.decode(prompt) if echo else ""
            lps = None
            if k is not None:
                scored = (evs[0].prompt_logprobs or [None]) if echo else [None]
                lps = completion_logprobs(prompt[0] if echo else None,
                                          scored[1:] + [x for e in evs for x in e.logprobs])
            choices.append({"index": c, "text": head + text, "logprobs": lps, "finish_reason": evs[-1].finish_reason})
            usage["prompt_tokens"] += len(prompt) if c % n == 0 else 0
            usage["completion_tokens"] += evs[-1].completion_tokens
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return JSONResponse(chunk(choices, usage))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = check_fields(await read_body(request), CHAT_FIELDS)
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
        prompt = chat_prompt(body, tok)
        check_prompt(prompt, "messages")
        n = _integer(body, "n", 1, 1, settings.max_n)
        stream = _flag(body, "stream")
        usage_chunk = stream_options(body, stream)
        want_lps = body.get("logprobs") is not None and _flag(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
        if top and not want_lps:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if want_lps:
            refuse_with_draft("logprobs")
        params = sampling(body, context - len(prompt), context, settings)
        sp = tok.special_tokens
        params.stop_ids = tuple(t for t in (sp["<|end|>"], tok.eot_id) if t is not None)
        params.logprobs = top if want_lps else None
        q: asyncio.Queue = asyncio.Queue()
        jobs = make_jobs([prompt], [params], n, q)
        submit(jobs)
        rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), settings.model_name

        def chunk(choices: list, usage: dict | None = None, object_: str = "chat.completion.chunk") -> dict:
            out = {"id": rid, "object": object_, "created": created, "model": name, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        if stream:
            async def gen():
                for c in range(n):
                    yield sse(chunk([{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}]))
                completion = 0
                async for c, ev in events(request, jobs, q):
                    if ev.finish_reason in ("timeout", "error"):
                        e = fail(ev)
                        yield sse(error_body(e.status, e.message, type_=e.type, code=e.code))
                        break
                    delta = {"content": ev.text} if ev.text else {}
                    lps = chat_logprobs(ev.logprobs) if want_lps else None
                    yield sse(chunk([{"index": c, "delta": delta, "logprobs": lps,
                                      "finish_reason": ev.finish_reason}]))
                    completion += ev.completion_tokens
                if usage_chunk:
                    yield sse(chunk([], {"prompt_tokens": len(prompt), "completion_tokens": completion,
                                         "total_tokens": len(prompt) + completion}))
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")

        got: dict[int, list[Event]] = {c: [] for c in range(n)}
        async for c, ev in events(request, jobs, q):
            if ev.finish_reason in ("timeout", "error"):
                raise fail(ev)
            got[c].append(ev)
        if any(not evs or evs[-1].finish_reason is None for evs in got.values()):
            return Response(status_code=499)
        choices, completion = [], 0
        for c, evs in got.items():
            choices.append({"index": c, "message": {"role": "assistant", "content": "".join(e.text for e in evs)},
                            "logprobs": chat_logprobs([x for e in evs for x in e.logprobs]) if want_lps else None,
                            "finish_reason": evs[-1].finish_reason})
            completion += evs[-1].completion_tokens
        return JSONResponse(chunk(choices, {"prompt_tokens": len(prompt), "completion_tokens": completion,
                                            "total_tokens": len(prompt) + completion}, "chat.completion"))

    return app


PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
