"""Answers from a chat model, through the one `Engine`: the gold evaluation every stage reports and
the samples preference data and Constitutional AI are made from.

`chat_answers` renders each prompt (chat turns ending with a user turn) with the chat template and
the assistant marker, keeps its last `block_size - max_new_tokens` tokens so the answer has room,
generates in batches, and stops each answer at <|end|>. `gold_eval` scores greedy answers against
gold ones: exact match, token F1, ROUGE-L and, for the embedded tasks, each family's checker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchlm.config import SampleConfig
from scratchlm.infer.engine import Engine
from scratchlm.io import write_text
from scratchlm.tasks.families import check
from scratchlm.tasks.metrics import exact_match, rouge_l, summarise, token_f1
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.chat import render

Turns = list[tuple[str, str]]


@torch.no_grad()
def chat_answers(model: nn.Module, tok: Tokenizer, prompts: list[Turns], sample: SampleConfig, *, batch: int = 32,
                 generator: torch.Generator | None = None) -> list[str]:
    """One answer per prompt (turns ending with a user turn), decoded, without its closing <|end|>.
    `generator` (default: one seeded with sample.seed) carries the sampling state across batches."""
    end = tok.special_tokens["<|end|>"]
    keep = model.config.block_size - sample.max_new_tokens
    engine = Engine(model, tok)
    if generator is None:
        generator = torch.Generator(device=engine.device).manual_seed(sample.seed)
    out: list[str] = []
    for i in range(0, len(prompts), batch):
        ids = [render(tok, p, add_generation_prompt=True)[0][-keep:] for p in prompts[i : i + batch]]
        outs = engine.generate(ids, sample, valid_vocab=tok.vocab_size, eos_id=end, generator=generator)
        out += [tok.decode(o) for o in outs]
    return out


def gold_eval(model: nn.Module, tok: Tokenizer, prompts: list[Turns], golds: list[str], metas: list[dict[str, Any]],
              max_new_tokens: int, out_jsonl: Path | None = None, batch: int = 32) -> dict[str, dict[str, float]]:
    """Greedy answers scored against the gold answers, per family (meta "family"; "all" without one);
    with a family, also `checked`: the family's checker on the answer. Rows go to out_jsonl."""
    sample = SampleConfig(max_new_tokens=max_new_tokens, temperature=0.0, stream=False)
    preds = chat_answers(model, tok, prompts, sample, batch=batch)
    rows: list[dict[str, Any]] = []
    for turns, gold, meta, pred in zip(prompts, golds, metas, preds):
        row = {"source": meta.get("source", ""), "family": meta.get("family", "all"), "prompt": turns[-1][1],
               "gold": gold, "generated": pred, "exact": exact_match(pred, gold), "f1": token_f1(pred, gold),
               "rouge_l": rouge_l(pred, gold)}
        if "family" in meta:
            row["checked"] = float(check(meta["family"], turns[-1][1], pred))
        rows.append(row)
    if out_jsonl is not None:
        write_text(out_jsonl, "".join(json.dumps(r) + "\n" for r in rows))
    return summarise(rows)
