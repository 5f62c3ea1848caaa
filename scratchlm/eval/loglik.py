"""Log-likelihoods from a model's forward: the one primitive perplexity and multiple choice are built on.

`score_tails` runs rows of (input ids, the targets of its last k positions) through the model in
batches and returns, per row, the summed log-probability of those targets and whether each was the
argmax (lm-eval's `is_greedy`). Rows are right-padded to the longest in their batch; a causal model's
positions never see what follows them, so the padding changes nothing that is scored (a mixture of experts
with a capacity limit is the exception: its rows go one at a time). Log-probabilities
are taken over the model's whole output in fp32 (fp64 for a float64 model), as the training loss takes
them (the ids a padded vocabulary adds carry next to no mass once trained).

On top of it:
- `pair_rows`: (context, continuation) pairs, left-truncated to the model's context, lm-eval's
  `loglikelihood` convention: the input is (context + continuation)[-(L+1):][:-1] and the continuation's
  tokens are scored.
- `rolling_windows` / `rolling_rows`: a document scored token by token exactly once, the first token
  conditioned on a prefix id (end-of-text). Windows of the model's length L end at L, L+stride, ...
  and the document's end; each window's input is the L tokens before its end (fewer at the start), and
  it scores only the tokens no earlier window scored. stride = L is lm-eval's `loglikelihood_rolling`
  (disjoint windows; the last one reaches back for a full context); a smaller stride gives every
  scored token at least L - stride tokens of context, at more compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

Row = tuple[list[int], list[int]]  # (input ids, targets of the last len(targets) positions)


def _check_row(inp: Sequence[int], targets: Sequence[int], max_len: int) -> None:
    if not 0 < len(targets) <= len(inp) <= max_len:
        raise ValueError(f"a row needs 1 <= targets ({len(targets)}) <= input ({len(inp)}) <= context ({max_len})")


@torch.inference_mode()
def score_tails(model: nn.Module, rows: Sequence[Row], *, batch_tokens: int = 8192,
                progress: str | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(target), every target the argmax) for each row, in the rows' order. Batches hold at most
    `batch_tokens` padded positions (one row at least); the longest rows go first, so padding stays small.
    `progress`: a bar with this label (on stderr, for runs long enough to show one)."""
    max_len = model.config.block_size
    for inp, targets in rows:
        _check_row(inp, targets, max_len)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    # A mixture of experts with a capacity limit lets the rows of a batch (and its padding) compete for expert
    # slots, so each row's score would depend on its batch-mates: such a model scores one row at a time.
    capped = getattr(model.config, "dropless", True) is False
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    start = 0
    bar = tqdm(total=len(rows), desc=progress, unit="row", disable=progress is None, leave=False)
    while start < len(order):
        width = len(rows[order[start]][0])
        batch = order[start : start + (1 if capped else max(1, batch_tokens // width))]
        start += len(batch)
        idx = torch.zeros(len(batch), width, dtype=torch.long)
        for b, i in enumerate(batch):
            idx[b, : len(rows[i][0])] = torch.tensor(rows[i][0])
        logits, _ = model(idx.to(device))  # (B, width, V)
        for b, i in enumerate(batch):
            inp, targets = rows[i]
            tail = logits[b, len(inp) - len(targets) : len(inp)]  # (k, V)
            tail = tail.to(torch.promote_types(tail.dtype, torch.float32))  # bf16/fp16 -> fp32, fp64 kept
            logp = F.log_softmax(tail, dim=-1)
            want = torch.tensor(targets, device=device)
            total = logp.gather(1, want[:, None]).sum().item()
            out[i] = (total, bool((tail.argmax(dim=-1) == want).all()))
        bar.update(len(batch))
    bar.close()
    return out


def pair_rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int) -> list[Row]:
    """lm-eval's loglikelihood rows: the continuation scored after its context, both left-truncated together to
    the model's context. The context must hold at least one id (an empty one is the prefix id)."""
    rows = []
    for context, continuation in pairs:
        if not context or not continuation:
            raise ValueError("context and continuation must each hold at least one token")
        if len(continuation) > max_len:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the context of {max_len}")
        whole = (list(context) + list(continuation))[-(max_len + 1) :]
        rows.append((whole[:-1], list(continuation)))
    return rows


def rolling_windows(n: int, max_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, end, first scored) per window over a document of n tokens: the window feeds the sequence
    prefix + tokens at positions [start, end) and scores tokens [first scored, end) (document indices;
    token j is predicted from sequence position j, the prefix being position 0)."""
    stride = stride or max_len
    if not 0 < stride <= max_len:
        raise ValueError(f"stride {stride} must be in 1..{max_len} (the model's context)")
    out, done = [], 0
    while done < n:
        end = min(max_len if done == 0 else done + stride, n)
        out.append((max(0, end - max_len), end, done))
        done = end
    return out


def rolling_rows(tokens: Sequence[int], prefix_id: int, max_len: int, stride: int | None = None) -> list[Row]:
    """The rows that score every token of a document exactly once (see `rolling_windows`)."""
    seq = [prefix_id] + list(tokens)
    return [(seq[start:end], list(tokens[first:end])) for start, end, first in rolling_windows(len(tokens), max_len,
                                                                                                stride)]
