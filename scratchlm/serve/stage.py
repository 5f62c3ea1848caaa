"""`scratchlm serve`: load a checkpoint, start the scheduler's loop, and serve the API with uvicorn.

Binds 127.0.0.1 unless told otherwise; a server reachable from other machines without an API key is
allowed (a private network may want it) but warned about.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.errors import UserError
from scratchlm.infer.engine import Engine
from scratchlm.infer.speculative import SpeculativeDecoder
from scratchlm.serve.api import Settings, create_app
from scratchlm.serve.scheduler import Scheduler

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_app(ckpt: str | Path, settings: Settings, *, device: str = "cpu", adapters: str | None = None,
              max_batch: int = 16, max_queue: int = 64, prefill_tokens: int = 2048,
              generator: Callable[..., Engine | SpeculativeDecoder] = Engine) -> FastAPI:
    """The app over a checkpoint; its scheduler starts with the app (uvicorn's lifespan). `generator(model,
    tok)` makes what the scheduler generates with: the Engine, or a SpeculativeDecoder (`serve --draft`:
    then one request at a time)."""
    for name, v in (("--max-batch", max_batch), ("--max-queue", max_queue), ("--prefill-tokens", prefill_tokens)):
        if v < 1:
            raise UserError(f"{name}={v} must be >= 1")
    model, tok, _ = load_model_for_inference(ckpt, device, adapters=adapters)
    scheduler = Scheduler(generator(model, tok), tok, max_batch=max_batch, max_queue=max_queue,
                          prefill_tokens=prefill_tokens)
    app = create_app(scheduler, tok, settings)
    app.state.scheduler = scheduler
    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, sock: socket.socket | None = None,
          log_level: str = "info") -> None:
    """Run the app until Ctrl-C / SIGTERM (uvicorn's own handling)."""
    if host not in LOOPBACK and app.state.settings.api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level)
    server = uvicorn.Server(config)
    server.run(sockets=[sock] if sock is not None else None)


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve the app on a free port of `host` from a thread of this process (the demo, tests, benchmarks);
    yields the base URL; the server stops when the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
