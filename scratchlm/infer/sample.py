"""Sampling: from a batch of next-token logits to next tokens (the filters and `sample_next`).

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

Everything that generates goes through the inference engine (`engine.py`: `Engine.generate`), which
calls `sample_next` once per decode step; text around it (prompt encoding, streaming, the `sample`
verb) is in `text.py`.

Left out: beam search, speculative decoding, and bit-identical draws across devices (a seed
reproduces a run on the same device and torch build only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from scratchlm.config import SampleConfig

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

    Called once per decode step, so `cfg` is not checked here: the entry points (`Engine.generate`
    and the CLI verbs) refuse a bad one with `check_sample_config` first."""
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

