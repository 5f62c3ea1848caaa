"""A tiny chat checkpoint and a real server on a free loopback port, for the API and browser tests
(not a test module)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from scratchlm.checkpoint import save_checkpoint
from scratchlm.config import Config, LlamaConfig, TokenizerConfig
from scratchlm.model import build_model, padded_vocab
from scratchlm.serve.api import Settings
from scratchlm.serve.stage import build_app, serve_in_thread
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


running = serve_in_thread  # the stage's own: 127.0.0.1, a free port, a thread


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
