"""The `serve` verb: an OpenAI-compatible server (and chat page) over a checkpoint.

    scratchlm serve --ckpt RUN [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch 16] [--max-queue 64]
                    [--draft DRAFT [--draft-k 4]]

Glue only: the options, then the stage's `build_app` and `serve`. With --draft the model is loaded as
`sample` and `chat` load it (`commands._generator`), and requests are served one at a time.
"""

from __future__ import annotations

import argparse
import os
import sys

from scratchlm.errors import UserError

KEY_VAR = "SCRATCHLM_API_KEY"


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.cli.commands import _check_draft_k, _generator
    from scratchlm.serve.api import Settings
    from scratchlm.serve.stage import build_app, serve
    from scratchlm.train.device import pick_device

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number", fix="use 0-65535")
    for name in ("max_body", "timeout"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be > 0")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens} must be >= 1")
    _check_draft_k(args)
    key = args.api_key or os.environ.get(KEY_VAR) or None
    settings = Settings(model_name=args.name or os.path.basename(os.path.normpath(args.ckpt)), api_key=key,
                        max_body=args.max_body, max_tokens=args.max_tokens, timeout=args.timeout,
                        max_n=args.max_batch)
    app = build_app(args.ckpt, settings, device=str(pick_device(args.device, flag="--device")),
                    adapters=args.adapters, max_batch=args.max_batch, max_queue=args.max_queue,
                    prefill_tokens=args.prefill_tokens, generator=lambda model, tok: _generator(args, model, tok))
    if args.draft is not None:
        print(f"scratchlm: speculative decoding with --draft {args.draft}, k={args.draft_k}: requests are served "
              "one at a time (no log-probabilities)", file=sys.stderr)
    serve(app, args.host, args.port, log_level="warning" if args.quiet else "info")


def add_parsers(verbs: argparse._SubParsersAction, with_common, writes) -> None:
    """The serve verb on the `scratchlm` parser (`with_common`, `writes`: the parser's helpers)."""
    sp = with_common(verbs.add_parser("serve", help="an OpenAI-compatible API server with continuous batching, "
                                                    "and a chat page at /"))
    sp.add_argument("--ckpt", required=True, help="a run folder or a checkpoint folder")
    sp.add_argument("--adapters", help="LoRA adapters to apply (an sft run's adapters.safetensors or run folder); "
                                       "--ckpt is then their base")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${KEY_VAR}, if set)")
    sp.add_argument("--name", help="the model id in /v1/models and responses (default: the --ckpt folder's name)")
    sp.add_argument("--max-batch", type=int, default=16, help="rows decoded together")
    sp.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch (then 429)")
    sp.add_argument("--prefill-tokens", type=int, default=2048,
                    help="prompt tokens admitted per step (more newcomers wait a step, so streams keep flowing)")
    sp.add_argument("--max-tokens", type=int, help="the largest max_tokens a request may ask (default: the context)")
    sp.add_argument("--max-body", type=int, default=1 << 20, help="request body limit in bytes (then 413)")
    sp.add_argument("--draft", help="speculative decoding, as in sample and chat: a draft head folder (scratchlm "
                                    "train-draft), a smaller checkpoint with the same tokenizer, or mtp; requests "
                                    "are then served one at a time, first come first served, and "
                                    "log-probabilities are refused")
    sp.add_argument("--draft-k", type=int, default=4, help="tokens the draft proposes per target forward")
    sp.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queueing included")
    sp.set_defaults(fn=cmd_serve)
