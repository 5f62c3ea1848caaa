"""Text around the engine: prompts in, streamed text out, and `scratchlm sample`.

The engine (`engine.py`) works on token ids; this module is where text meets it: `encode_prompt`
turns a prompt into ids (special tokens written in it count as specials, an empty prompt starts
from the EOS token), `TextStream` writes a continuation as its tokens arrive without ever showing
text it may have to take back (an incomplete UTF-8 character, the start of a stop string), and
`sample_cli` loads a checkpoint (or a base + LoRA adapters), applies --sample.* settings and
prints the samples, streaming row 0 when one sample is asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.config import Config, apply_overrides
from scratchlm.errors import UserError
from scratchlm.infer.engine import Engine
from scratchlm.infer.sample import check_sample_config
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.device import pick_device


class TextStream:
    """Writes one continuation as its tokens arrive, never showing text it may have to take back.

    Text is shown at token boundaries only, holding back a tail that ends in an incomplete UTF-8
    character (decoded as U+FFFD) or that could be the start of a stop string; `close` writes the
    rest of the final, trimmed continuation. What was shown is always a prefix of the final text.
    """

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], object],
                 stop: Sequence[str] = ()) -> None:
        self.decode, self.write, self.stop = decode, write, list(stop)
        self.ids: list[int] = []
        self.shown = ""  # decode(self.ids[:k]) for the k tokens already written
        self.k = 0

    def _safe(self, text: str) -> bool:
        if text.endswith("\ufffd"):
            return False
        # A stop string already complete, or a tail that may still grow into one, stays hidden.
        return not any(s in text or any(text.endswith(s[:j]) for j in range(1, len(s))) for s in self.stop)

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        for k in range(len(self.ids), self.k, -1):
            text = self.decode(self.ids[:k])
            if self._safe(text):
                self.write(text[len(self.shown):])
                self.shown, self.k = text, k
                return

    def close(self, final_ids: list[int]) -> None:
        text = self.decode(final_ids)
        self.write(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text)


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; special tokens written in it (e.g. <|endoftext|>) count as specials.

    An empty prompt starts from the EOS token when the tokenizer has one (the model has seen it
    begin every document), else from a newline, else from token 0.
    """
    if not prompt:
        if tok.eot_id is not None:
            return [tok.eot_id]
        try:
            return tok.encode("\n") or [0]
        except ValueError:
            return [0]
    try:
        return tok.encode(prompt, allowed_special="all")
    except ValueError as e:
        bad = None
        for c in dict.fromkeys(prompt):  # distinct characters, in order
            try:
                tok.encode_ordinary(c)
            except ValueError:
                bad = c
                break
        if bad is None:
            raise UserError(f"the prompt cannot be encoded ({e})") from None
        raise UserError(f"the prompt contains {bad!r}, which is not in this checkpoint's {tok.kind} vocabulary",
                        fix="remove or replace that character in --prompt") from None


SAMPLE_BATCH = 32  # rows decoded together by `scratchlm sample`


def sample_cli(ckpt: str | Path, prompt: str, overrides: list[str], device: str = "auto",
               adapters: str | Path | None = None) -> None:
    """`scratchlm sample`: load a checkpoint (or a base + LoRA `adapters`), apply --sample.* overrides,
    print the samples."""
    wrong = [o for o in overrides if not o.lstrip("-").startswith("sample.")]
    if wrong:
        raise UserError(f"{wrong[0].split('=')[0]}: sample takes only --sample.KEY=VALUE settings",
                        fix="model and training settings come from the checkpoint")
    check_sample_config(apply_overrides(Config(), overrides).sample)  # fail before loading weights
    dev = str(pick_device(device, flag="--device"))
    model, tok, cfg = load_model_for_inference(ckpt, dev, adapters=adapters)
    sc = apply_overrides(cfg, overrides).sample

    ids = encode_prompt(tok, prompt)
    block = model.config.block_size
    if len(ids) > block:
        print(f"scratchlm: warning: the prompt is {len(ids)} tokens; the model sees only the last {block}",
              file=sys.stderr)
        ids = ids[-block:]
    rows = [ids] * sc.num_samples
    engine = Engine(model, tok)
    kwargs = dict(cache=sc.cache, sink_tokens=sc.sink_tokens, window=sc.window)

    if sc.stream and sc.num_samples == 1:
        def write(s: str) -> None:
            sys.stdout.write(s)
            sys.stdout.flush()

        stream = TextStream(tok.decode, write, sc.stop)
        write(prompt)
        outs = engine.generate(rows, sc, on_token=lambda row, t: stream.push(t), **kwargs)
        stream.close(outs[0])
        write("\n")
        return
    for start in range(0, len(rows), SAMPLE_BATCH):  # bounded memory; each batch is printed as it finishes
        outs = engine.generate(rows[start : start + SAMPLE_BATCH], sc, **kwargs)
        for i, out in enumerate(outs, start):
            if i:
                print("-" * 40)
            print(prompt + tok.decode(out), flush=True)
