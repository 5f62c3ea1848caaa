"""Sampling: from next-token logits to text (`scratchlm sample`).

The filters are pure functions on a (B, V) batch of next-token logits, each returning new logits
with the dropped tokens set to -inf, so they compose and are reused by later inference code:

- `repetition_penalty`: CTRL's (Keskar et al. 2019) penalty on tokens already in the context:
  a positive logit is divided by the penalty, a negative one multiplied, so both move down;
- `apply_temperature`: logits / T; T < 1 sharpens the distribution, T > 1 flattens it;
- `top_k_filter`: keep the k largest logits;
- `top_p_filter`: nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely
  tokens whose probability reaches p;
- `min_p_filter`: drop tokens less likely than min_p x the most likely token's probability.

`sample_next` chains them in this order: mask the padded ids (>= the tokenizer's vocabulary,
rows the model has only for matmul speed), repetition penalty (on the raw logits, as CTRL and HF
do), then greedy argmax if the temperature is 0, else temperature, top-k, top-p, min-p (so the
truncations see the tempered distribution), softmax, and one draw from a `torch.Generator`.

`generate` keeps its signature for existing callers but runs on the inference engine
(`engine.py`): one prefill of the (left-padded) prompts into a KV cache, then one token per row
per step; a batch gives the same tokens as generating each prompt alone. A row stops at the EOS
token or when its decoded continuation contains a stop string. `sample_cli` uses the engine
directly, streaming row 0's text through `TextStream`.

Left out: beam search, speculative decoding, and bit-identical draws across devices (a seed
reproduces a run on the same device and torch build only).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.config import Config, SampleConfig, apply_overrides
from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.device import pick_device

# A set whose probability equals p up to float32 rounding counts as reaching p in `top_p_filter`
# (e.g. 0.5 + 0.3 summed in float32 may land just under 0.8).
TOP_P_TOLERANCE = 1e-5

Context = torch.Tensor | Sequence[Sequence[int]]


# ----------------------------------------------------------------------------------------------
# filters: (B, V) logits in, (B, V) logits out, dropped tokens at -inf


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T. T must be > 0 (T = 0 means greedy: `sample_next` takes the argmax instead)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to scale logits, got {temperature}")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits of each row (ties at the k-th broken by `torch.topk`);
    k <= 0 or k >= V keeps everything."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    keep_idx = torch.topk(logits, k, dim=-1).indices  # (B, k)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, keep_idx, True)  # (B, V)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose total probability reaches p.

    A token is kept when the tokens more likely than it hold less than p (minus `TOP_P_TOLERANCE`)
    of the probability, so the most likely token is always kept. p >= 1 keeps everything.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V), most likely first
    probs = F.softmax(sorted_logits.float(), dim=-1)
    # Exclusive cumulative sum: the probability of the tokens strictly before each one. Shifting
    # the inclusive sum (rather than subtracting probs from it) keeps exact zeros and sums.
    before = torch.cumsum(probs, dim=-1)[..., :-1]
    before = torch.cat([torch.zeros_like(probs[..., :1]), before], dim=-1)  # (B, V)
    drop_sorted = before >= p - TOP_P_TOLERANCE
    drop_sorted[..., 0] = False
    # Back from sorted order to vocabulary order: drop[b, order[b, j]] = drop_sorted[b, j].
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens with probability < min_p x the top token's; min_p <= 0 keeps everything.

    Worked in log space: p_i / p_max = exp(logit_i - logit_max), so no softmax is needed.
    """
    if min_p <= 0.0:
        return logits
    top = logits.max(dim=-1, keepdim=True).values  # (B, 1)
    drop = (logits - top) < math.log(min_p)
    return logits.masked_fill(drop, float("-inf"))


def repetition_penalty(logits: torch.Tensor, context_ids: Context, penalty: float) -> torch.Tensor:
    """CTRL-style: for every token present in a row's context, divide a positive logit by the
    penalty and multiply a negative one, so a penalty > 1 always makes the token less likely.
    Each token is penalised once however often it occurs. context_ids: a (B, T) tensor or one
    list of ids per row (rows may differ in length). penalty == 1 changes nothing."""
    if penalty == 1.0:
        return logits
    B, V = logits.shape
    present = torch.zeros(B, V, dtype=torch.bool, device=logits.device)  # (B, V): token in row's context
    if torch.is_tensor(context_ids):
        present.scatter_(-1, context_ids.to(logits.device).long(), True)
    else:
        for b, ids in enumerate(context_ids):
            if len(ids):
                present[b, torch.as_tensor(list(ids), dtype=torch.long, device=logits.device)] = True
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(present, penalised, logits)


def mask_padding(logits: torch.Tensor, valid_vocab: int | None) -> torch.Tensor:
    """Set the logits of ids >= valid_vocab (the padded embedding rows) to -inf."""
    if valid_vocab is None or valid_vocab >= logits.size(-1):
        return logits
    if valid_vocab < 1:
        raise ValueError(f"valid_vocab must be >= 1, got {valid_vocab}")
    out = logits.clone()
    out[..., valid_vocab:] = float("-inf")
    return out


def check_sample_config(cfg: SampleConfig) -> None:
    """Refuse settings that would sample nonsense silently, naming the setting (the ranges are
    declared on `SampleConfig`'s fields)."""
    cfg.validate()


def sample_next(
    logits: torch.Tensor,
    context_ids: Context,
    cfg: SampleConfig,
    generator: torch.Generator | None = None,
    valid_vocab: int | None = None,
) -> torch.Tensor:
    """One next token per row. logits: (B, V) next-token logits; context_ids: each row's tokens
    so far (for the repetition penalty). Order: padding mask, repetition penalty, then argmax if
    cfg.temperature == 0, else temperature, top-k, top-p, min-p and a draw. Returns (B,) int64.

    Called once per decode step, so `cfg` is not checked here: the entry points (`Engine.generate`,
    hence `generate`, and the CLI verbs) refuse a bad one with `check_sample_config` first."""
    logits = mask_padding(logits.float(), valid_vocab)  # float32: bf16 logits are too coarse to filter
    logits = repetition_penalty(logits, context_ids, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits, cfg.temperature)
    logits = top_k_filter(logits, cfg.top_k)
    logits = top_p_filter(logits, cfg.top_p)
    logits = min_p_filter(logits, cfg.min_p)
    probs = F.softmax(logits, dim=-1)  # (B, V); filtered tokens get exactly 0
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# generate: the earlier entry point, now a thin wrapper over the engine


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt_ids: list[list[int]],
    cfg: SampleConfig,
    *,
    valid_vocab: int | None = None,
    eos_id: int | None = None,
    decode: Callable[[list[int]], str] | None = None,
    on_token: Callable[[int], None] | None = None,
    generator: torch.Generator | None = None,
    cache: str = "kv",
    sink_tokens: int = 4,
    window: int = 0,
) -> list[list[int]]:
    """Continue each prompt by up to cfg.max_new_tokens tokens; returns the new tokens per row.

    Each row of prompt_ids is one sample (the caller repeats a prompt for cfg.num_samples). A row
    stops at eos_id (not included in its output) or once `decode` of its continuation contains
    one of cfg.stop (the output is trimmed to before the stop string; `decode` is required when
    cfg.stop is set). `on_token(id)` is called for every token row 0 keeps, as it is sampled, for
    streaming. Without a generator, one seeded with cfg.seed is made on the model's device.
    A prompt longer than block_size is cropped from the left, with a warning. cache, sink_tokens
    and window choose the engine's cache (`Engine.generate`).
    """
    # Imported here: the engine imports this module's filters.
    from scratchlm.infer.engine import Engine

    row0 = None if on_token is None else (lambda row, t: on_token(t) if row == 0 else None)
    return Engine(model).generate(prompt_ids, cfg, eos_id=eos_id, valid_vocab=valid_vocab, decode=decode,
                                  on_token=row0, generator=generator, cache=cache, sink_tokens=sink_tokens,
                                  window=window)


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


# ----------------------------------------------------------------------------------------------
# the CLI verb


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
    from scratchlm.infer.engine import Engine

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
