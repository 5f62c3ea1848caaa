"""A tiny chat checkpoint and a real server on a free loopback port, for the API and browser tests
(not a test module)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn

from scratchlm.checkpoint import save_checkpoint
from scratchlm.config import Config, LlamaConfig, TokenizerConfig
from scratchlm.model import build_model, padded_vocab
from scratchlm.serve.api import Settings
from scratchlm.serve.stage import build_app
from scratchlm.tokenizer.chat import ensure_chat_specials
from tests.helpers import char_tokenizer, randomize

BLOCK = 256


def chat_checkpoint(root: Path) -> Path:
    """A random 2-layer Llama on characters with the chat tokens. The output rows of the special tokens are
    zero, so their logit is 0 while some of the ~20 others is almost surely above it: replies are plain text
    (a page can send them back) and run to max_tokens (a stop button has something to stop)."""
    tok, _ = ensure_chat_specials(char_tokenizer())
    cfg = Config(name="t", out_dir=str(root))
    cfg.tokenizer = TokenizerConfig(kind=tok.kind, vocab_size=tok.vocab_size, special_tokens=list(tok.special_tokens))
    cfg.model = LlamaConfig(block_size=BLOCK, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, bias=False)
    cfg.model.vocab_size = padded_vocab(cfg.model, tok.vocab_size)
    torch.manual_seed(0)
    model = randomize(build_model(cfg.model), 0)
    with torch.no_grad():
        for i in tok.special_tokens.values():
            model.output.weight[i] = 0.0
    save_checkpoint(root, 0, model, torch.optim.AdamW(model.parameters()), cfg, tok, {"best_val_loss": None})
    return root


def slow_down(app, seconds: list[float]) -> None:
    """Each decode step of the app's scheduler sleeps seconds[0] first (a test sets it to watch streams live)."""
    engine = app.state.scheduler.engine
    decode = engine.decode

    def slow(tokens, cache):
        if seconds[0]:
            time.sleep(seconds[0])
        return decode(tokens, cache)

    engine.decode = slow


@contextmanager
def running(app):
    """Serve the app on 127.0.0.1 at a free port in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def app_for(ckpt: Path, **settings):
    batch = {k: settings.pop(k) for k in ("max_batch", "max_queue") if k in settings}
    return build_app(ckpt, Settings(model_name="tiny", **settings), **batch)


class Reply:
    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status_code, self.headers, self.content = status, headers, body
        self.text = body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


def http(method: str, url: str, *, json_body=None, content: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> Reply:
    """A plain HTTP request with the standard library (to send what a client library would refuse to)."""
    data = content if json_body is None else json.dumps(json_body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.headers, e.read())
