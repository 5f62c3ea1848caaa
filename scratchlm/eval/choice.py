"""Multiple choice by log-likelihood, with lm-eval's `acc` and `acc_norm`.

Each option is scored as the continuation `delimiter + choice` after the context (`loglik.pair_rows`).
`acc`: the option with the highest log-likelihood is the label. `acc_norm`: the same after dividing each
log-likelihood by the option's length in characters (the choice without the delimiter), lm-eval's
definition. Ties go to the first option, as numpy's argmax gives them.

Encoding follows lm-eval's: trailing whitespace of the context moves to the front of the continuation;
the continuation's ids are those of encode(context + continuation) after encode(context)'s, so a token
that straddles the boundary is scored as the model would see it; an empty context is the end-of-text id.

File format (JSONL), one item per line: {"context": str, "choices": [str, ...] (>= 2), "label": int}.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from scratchlm.data.sources import read_records
from scratchlm.errors import UserError
from scratchlm.eval.loglik import pair_rows, score_tails
from scratchlm.tokenizer import Tokenizer


@dataclass
class ChoiceItem:
    context: str
    choices: list[str]
    label: int
    where: str = ""


def read_choice_items(path: str | Path) -> list[ChoiceItem]:
    items = []
    fix = 'write one {"context": str, "choices": [str, str, ...], "label": int} object per line'
    for lineno, rec in read_records(Path(path)):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: not a JSON object", fix=fix)
        for key in ("context", "choices", "label"):
            if key not in rec:
                raise UserError(f"{where}: no field {key!r}", fix=fix)
        context, choices, label = rec["context"], rec["choices"], rec["label"]
        if not isinstance(context, str):
            raise UserError(f"{where}: field 'context' is {type(context).__name__}, not a string", fix=fix)
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise UserError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings", fix=fix)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise UserError(f"{where}: field 'label' must be an index into choices (0..{len(choices) - 1})", fix=fix)
        items.append(ChoiceItem(context, list(choices), label, where))
    if not items:
        raise UserError(f"{path}: no items", fix=fix)
    return items


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by lm-eval's rule (see the module doc)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode_ordinary(context + continuation)
    ctx = tok.encode_ordinary(context) if context else []
    cont = whole[len(ctx) :]
    if not ctx:
        if tok.eot_id is None:
            raise UserError("an empty context needs the tokenizer's <|endoftext|> as its prefix",
                            fix="give every item a context")
        ctx = [tok.eot_id]
    return ctx, cont


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_choices(model: nn.Module, tok: Tokenizer, items: Sequence[ChoiceItem], *, delimiter: str = " ",
                  batch_tokens: int = 8192, progress: str | None = None) -> list[dict]:
    """Per item: each option's log-likelihood and greedy flag, the picks, and acc / acc_norm (0 or 1)."""
    pairs, owner = [], []
    for i, item in enumerate(items):
        for choice in item.choices:
            pairs.append(encode_pair(tok, item.context, delimiter + choice))
            owner.append(i)
    scored = score_tails(model, pair_rows(pairs, model.config.block_size), batch_tokens=batch_tokens,
                         progress=progress)
    out = [{"context": it.context, "choices": it.choices, "label": it.label, "loglik": [], "greedy": []}
           for it in items]
    for i, (logp, greedy) in zip(owner, scored):
        out[i]["loglik"].append(logp)
        out[i]["greedy"].append(greedy)
    for row in out:
        row["pred"] = _argmax(row["loglik"])
        row["pred_norm"] = _argmax([ll / len(c) for ll, c in zip(row["loglik"], row["choices"])])
        row["acc"] = float(row["pred"] == row["label"])
        row["acc_norm"] = float(row["pred_norm"] == row["label"])
    return out
