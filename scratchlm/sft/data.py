"""Instruction data for supervised fine-tuning: formats, masked labels, packing.

Accepted formats (each record validated; errors name the file, line and field):
- alpaca: `{"instruction", "input", "output"}` in a JSON list or JSONL (`input` may be empty);
- messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` JSONL,
  multi-turn, an optional leading system turn, at least one assistant turn;
- prompt_completion: `{"prompt", "completion"}` JSONL.
All become a list of chat turns.

Held-out data: exact duplicates are dropped, and the split is by prompt (`split_by_prompt`):
every conversation asking the same thing lands on the same side, so the gold evaluation never
scores a prompt the model was trained on.

The chat template (`scratchlm.tokenizer.chat.render`) uses our reserved special tokens (ids, never text):

    [<|system|> system <|end|>] <|user|> question <|end|> <|assistant|> answer <|end|> ...

Labels: only the assistant's tokens and the <|end|> closing each assistant turn are trained on
(-1 elsewhere, ignored by the loss), so the model learns to answer and to stop, never to
imitate the user. A tokenizer missing these specials gets them added (`scratchlm.tokenizer.chat.ensure_chat_specials`),
and the model's embedding grows to match (`scratchlm.model.resize_embeddings`: new rows are the mean of
the existing ones).

Packing concatenates examples into sequences of block_size + 1 tokens with a document id per
token; the loop trains them with `DocumentMask`, so each example attends only to itself and its
positions restart at 0: a packed batch trains exactly like the same examples one by one, with
no padding wasted. Curriculum: examples can be ordered by length or by a difficulty field.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scratchlm.data.sources import read_records
from scratchlm.errors import UserError
from scratchlm.tasks.families import generate_tasks
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.chat import render

ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    turns: list[tuple[str, str]]  # (role, content)
    source: str  # file:line, for messages
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. family, difficulty, gold answer


# -- reading --------------------------------------------------------------------------------------


def detect_format(record: Any) -> str:
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "instruction" in record:
            return "alpaca"
        if "prompt" in record:
            return "prompt_completion"
    return "unknown"


def _need_str(rec: dict, key: str, where: str) -> str:
    if key not in rec:
        raise UserError(f"{where}: missing field {key!r} (has: {', '.join(sorted(rec))})")
    if not isinstance(rec[key], str):
        raise UserError(f"{where}: field {key!r} is {type(rec[key]).__name__}, not a string")
    return rec[key]


def to_conversation(rec: Any, fmt: str, where: str) -> Conversation:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if fmt == "alpaca":
        instruction, extra = _need_str(rec, "instruction", where), rec.get("input", "") or ""
        if not isinstance(extra, str):
            raise UserError(f"{where}: field 'input' is {type(extra).__name__}, not a string")
        user = instruction + (f"\n\n{extra}" if extra else "")
        return Conversation([("user", user), ("assistant", _need_str(rec, "output", where))], where,
                            {"gold": rec["output"]})
    if fmt == "prompt_completion":
        return Conversation([("user", _need_str(rec, "prompt", where)),
                             ("assistant", _need_str(rec, "completion", where))], where, {"gold": rec["completion"]})
    if fmt == "messages":
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: field 'messages' must be a non-empty list")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: messages[{i}] needs a role ({'/'.join(ROLES)}) and a string content")
            if m["role"] == "system" and i != 0:
                raise UserError(f"{where}: messages[{i}]: a system turn may only come first")
            turns.append((m["role"], m["content"]))
        if not any(r == "assistant" for r, _ in turns):
            raise UserError(f"{where}: conversation has no assistant turn", fix="add the answer to train on")
        return Conversation(turns, where)
    raise UserError(f"{where}: unknown record format (keys: {', '.join(sorted(rec))})",
                    fix="use alpaca (instruction/input/output), messages, or prompt/completion fields")


def read_conversations(paths: list[str], fmt: str = "auto") -> list[Conversation]:
    convs: list[Conversation] = []
    for p in paths:
        path = Path(p)
        records = read_records(path)
        if not records:
            raise UserError(f"{path}: no SFT examples (an empty list)", fix="pass a file with examples")
        file_fmt = fmt if fmt != "auto" else detect_format(records[0][1])
        for lineno, rec in records:
            convs.append(to_conversation(rec, file_fmt, f"{path}:{lineno}"))
    if not convs:
        raise UserError("no SFT examples in " + ", ".join(paths))
    return convs


def task_conversations(n: int, seed: int) -> list[Conversation]:
    """The embedded verifiable tasks as conversations (meta: family, difficulty, gold answer); distinct prompts."""
    return [Conversation([("user", t.instruction), ("assistant", t.answer)], f"tasks:{i}",
                         {"family": t.family, "difficulty": t.difficulty, "gold": t.answer})
            for i, t in enumerate(generate_tasks(n, seed))]


def prompt_key(conv: Conversation) -> tuple[tuple[str, str], ...]:
    """What the model is asked: every turn before the final answer, whitespace collapsed, so prompts
    that differ only in spacing count as the same prompt."""
    return tuple((role, " ".join(content.split())) for role, content in conv.turns[:-1])


def drop_duplicates(convs: list[Conversation]) -> tuple[list[Conversation], int]:
    """Conversations with the first of each identical (prompt, answer) kept, in order; and how many were dropped.
    Same prompt with a different answer is kept: both are data (the split keeps them on one side)."""
    seen: set[tuple] = set()
    kept = []
    for c in convs:
        key = (prompt_key(c), c.turns[-1])
        if key not in seen:
            seen.add(key)
            kept.append(c)
    return kept, len(convs) - len(kept)


def split_by_prompt(convs: list[Conversation], fraction: float, seed: int
                    ) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held out): `fraction` of the distinct prompts held out, every conversation of a held-out
    prompt with them, so no held-out prompt is ever trained on. Both keep the input order."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(convs):
        groups.setdefault(prompt_key(c), []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    n_val = max(1, round(fraction * len(keys)))
    if n_val >= len(keys):
        raise UserError(f"only {len(keys)} distinct SFT prompts: nothing left to train on after holding out {n_val}",
                        fix="add examples or lower --sft.val_fraction")
    held = {i for k in keys[:n_val] for i in groups[k]}
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


@dataclass
class Example:
    ids: list[int]  # the rendered conversation
    labels: list[int]  # what each position should predict next is labels[t + 1]
    meta: dict[str, Any]


def build_examples(convs: list[Conversation], tok: Tokenizer, block_size: int, overlong: str = "truncate"
                   ) -> tuple[list[Example], dict[str, int]]:
    """Render every conversation; handle ones longer than block_size + 1 tokens. Returns counts."""
    if overlong not in ("truncate", "drop"):
        raise UserError(f"sft.overlong={overlong!r} is unknown", fix="use truncate or drop")
    out, counts = [], {"truncated": 0, "dropped": 0}
    for c in convs:
        try:
            ids, labels = render(tok, c.turns)
        except ValueError as e:  # a character the base's tokenizer has no token for (char kind)
            raise UserError(f"{c.source}: the base's {tok.kind} tokenizer cannot encode this example ({e})") from None
        if len(ids) > block_size + 1:
            if overlong == "drop":
                counts["dropped"] += 1
                continue
            counts["truncated"] += 1
            ids, labels = ids[: block_size + 1], labels[: block_size + 1]
        if all(lab < 0 for lab in labels[1:]):
            counts["dropped"] += 1  # nothing left to learn from (the answer was cut off)
            continue
        out.append(Example(ids, labels, {"source": c.source, **c.meta}))
    if not out:
        raise UserError(f"no SFT example fits: all {len(convs)} are longer than the context ({block_size} tokens)",
                        fix="raise --model.block_size or shorten the examples")
    return out, counts


def order_examples(examples: list[Example], curriculum: str, seed: int) -> list[Example]:
    """Shuffle (none), or easy-to-hard by token length or the `difficulty` field (ties shuffled)."""
    rng = random.Random(seed)
    shuffled = examples[:]
    rng.shuffle(shuffled)
    if curriculum == "none":
        return shuffled
    if curriculum == "length":
        return sorted(shuffled, key=lambda e: len(e.ids))
    if curriculum == "difficulty":
        return sorted(shuffled, key=lambda e: e.meta.get("difficulty", 0))
    raise UserError(f"sft.curriculum={curriculum!r} is unknown", fix="use none, length or difficulty")


def pack(examples: list[Example], block_size: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedy in-order packing into rows of block_size + 1 tokens: (ids, labels, doc ids) per row.
    A row is closed when the next example does not fit; its tail is padding (doc -1, label -1)."""
    rows, ids, labels, docs = [], [], [], []
    n = block_size + 1
    for d, ex in enumerate(examples):
        if len(ids) + len(ex.ids) > n and ids:
            rows.append((ids, labels, docs))
            ids, labels, docs = [], [], []
        ids, labels, docs = ids + ex.ids, labels + ex.labels, docs + [d] * len(ex.ids)
    if ids:
        rows.append((ids, labels, docs))
    return [(i + [0] * (n - len(i)), lab + [-1] * (n - len(lab)), doc + [-1] * (n - len(doc)))
            for i, lab, doc in rows]


class SFTLoader:
    """Batches of packed rows (or one example per row, right-padded) for the shared training loop.

    next_batch() -> (x, y, doc_ids): x (B, T) ids, y (B, T) targets with -1 where not trained,
    doc_ids (B, T) for DocumentMask. Deterministic order by (seed, epoch); resumable. Under data
    parallelism the ranks read one global stream of rows in turns (rank r's k-th batch is global
    batch k * world_size + r, as `BatchLoader` does), so the position is global and a run resumes
    under another world size."""

    def __init__(self, examples: list[Example], block_size: int, batch_size: int, *, packing: bool = True,
                 shuffle: bool = True, seed: int = 0, device: str | torch.device = "cpu",
                 rank: int = 0, world_size: int = 1) -> None:
        rows = pack(examples, block_size) if packing else pack_each(examples, block_size)
        self.ids = torch.tensor([r[0] for r in rows])  # (R, T + 1)
        self.labels = torch.tensor([r[1] for r in rows])
        self.docs = torch.tensor([r[2] for r in rows])
        self.batch_size, self.shuffle, self.seed, self.device = batch_size, shuffle, seed, device
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.ids))
        return torch.randperm(len(self.ids), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        picks = []
        B = self.batch_size
        while len(picks) < B * self.world_size:  # this turn's rows for all ranks; this rank keeps its own
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            picks.append(int(self._order[self.pos]))
            self.pos += 1
        idx = torch.tensor(picks[self.rank * B : (self.rank + 1) * B])
        ids, labels, docs = self.ids[idx], self.labels[idx], self.docs[idx]
        x, y, d = ids[:, :-1], labels[:, 1:], docs[:, :-1]
        d = torch.where(d < 0, torch.full_like(d, -2), d)  # padding attends only to padding
        return x.to(self.device), y.to(self.device), d.to(self.device)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "rows": len(self.ids)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("rows") != len(self.ids):
            raise UserError("cannot resume: the SFT data changed since the checkpoint", fix="use the same data")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._make_order()


def pack_each(examples: list[Example], block_size: int) -> list[tuple[list[int], list[int], list[int]]]:
    """One example per row, right-padded (packing off)."""
    n = block_size + 1
    return [(e.ids + [0] * (n - len(e.ids)), e.labels + [-1] * (n - len(e.labels)), [0] * len(e.ids) +
             [-1] * (n - len(e.ids))) for e in examples]
