"""Text around the engine: prompts in, streamed text out, and `scratchlm sample`.

The engine (`engine.py`) works on token ids; this module is where text meets it: `encode_prompt`
turns a prompt into ids (special tokens written in it count as specials, an empty prompt starts
from the EOS token), `TextStream` writes a continuation as its tokens arrive without ever showing
text it may have to take back (an incomplete UTF-8 character, the start of a stop string), and
`sample_text` writes a prompt's samples (`scratchlm sample`), streaming row 0 when one sample is
asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from scratchlm.config import SampleConfig
from scratchlm.errors import UserError
from scratchlm.infer.engine import Engine
from scratchlm.tokenizer import Tokenizer


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


def sample_text(engine: Engine, tok: Tokenizer, prompt: str, ids: list[int], sc: SampleConfig,
                write: Callable[[str], object]) -> None:
    """Write `sc.num_samples` continuations of `prompt` (encoded as `ids`), each as prompt + text and a
    newline, separated by a line of dashes: streamed token by token when one sample is asked for and
    `sc.stream` is on, else in batches of SAMPLE_BATCH rows (bounded memory), each written as it finishes."""
    rows = [ids] * sc.num_samples
    kwargs = dict(cache=sc.cache, sink_tokens=sc.sink_tokens, window=sc.window)
    if sc.stream and sc.num_samples == 1:
        stream = TextStream(tok.decode, write, sc.stop)
        write(prompt)
        outs = engine.generate(rows, sc, on_token=lambda row, t: stream.push(t), **kwargs)
        stream.close(outs[0])
        write("\n")
        return
    for start in range(0, len(rows), SAMPLE_BATCH):
        outs = engine.generate(rows[start : start + SAMPLE_BATCH], sc, **kwargs)
        for i, out in enumerate(outs, start):
            if i:
                write("-" * 40 + "\n")
            write(prompt + tok.decode(out) + "\n")
