"""Preference data: pairs of a prompt with a chosen and a rejected response, read from files or built
from the embedded task families, tokenized with the chat template, and split by prompt.

Accepted formats (detected per file from its first record, every record validated; errors name the
file, line and field):
- prompt:         `{"prompt": str, "chosen": str, "rejected": str}`;
- alpaca:         `{"instruction", "input", "chosen", "rejected"}` (as `instruction-data-with-preference.json`;
                  the user turn is instruction + "\\n\\n" + input, input optional, as the SFT alpaca format;
                  other fields such as `output` are ignored);
- conversational: `{"chosen": [messages], "rejected": [messages]}`, each a whole conversation (messages as in
                  SFT: role system/user/assistant and a string content) sharing every message but the last,
                  which is the assistant's response; or, as TRL writes it, with the shared part in
                  `"prompt": [messages]` and only the responses in `chosen`/`rejected`;
- hh:             Anthropic-HH transcripts, `{"chosen": "\\n\\nHuman: …\\n\\nAssistant: …", "rejected": "…"}`: the
                  prompt is what the two share up to their last common "\\n\\nAssistant:", split off automatically;
                  earlier Human/Assistant turns become user/assistant turns (each turn's text stripped).
Any record may carry a number `margin` (kept in meta, for a margin in the reward model's loss).
The same pairs written in any format load as the same `PreferencePair`s, hence the same token ids.

Refused, one line each: missing fields, wrong types, an empty response, a prompt that does not end
with a user turn, conversations whose shared part differs, HH transcripts with no common
"Assistant:" turn or a response that goes on into further turns. Identical chosen and rejected
(equal up to spacing) are an error, or dropped and counted with `identical="drop"`: the public
`instruction-data-with-preference.json` has 6 such records among its 1100.

Tokens (`tokenize_pair`): prompt + response rendered with the chat template
(`scratchlm.tokenizer.chat.render`); labels are -1 on the whole prompt (earlier assistant turns
included) and equal the ids on the response and its closing <|end|>, as SFT trains them. Each
sequence is at most block_size tokens, so the reward model reads all of it (its score sits on the
closing <|end|>) and DPO reads ids[:-1] against labels[1:]. A longer pair loses prompt tokens from
the LEFT, the same number on both sides so both keep the same prompt, and keeps both responses
whole: the response is what is judged. A response that cannot fit beside the <|assistant|> token
is an error (`ResponseTooLong`) for one pair; `tokenize_pairs` drops and counts such pairs by default.

Embedded pairs (`corrupted_pairs`): a task's right answer against a corruption of the same form
(`scratchlm.tasks.families.corrupt`). Held-out data is split by prompt (`split_pairs_by_prompt`), as SFT does.

Left out here: on-policy pairs (sampled through the Engine by the stage that has a model), and
deduplication of repeated pairs.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchlm.data.sources import read_records
from scratchlm.errors import UserError
from scratchlm.sft.data import ROLES
from scratchlm.tasks.families import corrupt, generate_tasks
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.chat import render

FORMATS = ("prompt", "alpaca", "conversational", "hh")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class PreferencePair:
    prompt: list[tuple[str, str]]  # (role, content) chat turns, ending with a user turn
    chosen: str  # the preferred assistant response
    rejected: str
    source: str  # file:line, or tasks:i for embedded pairs
    meta: dict[str, Any] = field(default_factory=dict)  # kind (file/corrupted/on_policy), family, margin, ...


# -- reading --------------------------------------------------------------------------------------


def detect_format(record: Any) -> str:
    if isinstance(record, dict):
        if "instruction" in record:
            return "alpaca"
        if isinstance(record.get("chosen"), list) or isinstance(record.get("prompt"), list):
            return "conversational"
        if "prompt" in record:
            return "prompt"
        if "chosen" in record:
            return "hh"
    return "unknown"


def _need(rec: dict, key: str, where: str, kind: type) -> Any:
    if key not in rec:
        raise UserError(f"{where}: missing field {key!r} (has: {', '.join(sorted(rec))})")
    if not isinstance(rec[key], kind):
        want = "a string" if kind is str else "a list of messages"
        raise UserError(f"{where}: field {key!r} is {type(rec[key]).__name__}, not {want}")
    return rec[key]


def _messages(rec: dict, key: str, where: str) -> list[tuple[str, str]]:
    msgs = _need(rec, key, where, list)
    if not msgs:
        raise UserError(f"{where}: field {key!r} is an empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: {key}[{i}] needs a role ({'/'.join(ROLES)}) and a string content")
    return [(m["role"], m["content"]) for m in msgs]


def _check_prompt(turns: list[tuple[str, str]], where: str, key: str) -> None:
    if not turns:
        raise UserError(f"{where}: field {key!r}: no prompt before the response", fix="start with a user turn")
    for i, (role, _) in enumerate(turns):
        if role == "system" and i != 0:
            raise UserError(f"{where}: field {key!r}: a system turn may only come first")
    if turns[-1][0] != "user":
        raise UserError(f"{where}: field {key!r}: the prompt's last turn is the {turns[-1][0]}'s, not the user's",
                        fix="the response must answer a user turn")


def _conversational(rec: dict, where: str) -> tuple[list[tuple[str, str]], str, str]:
    prompt = _messages(rec, "prompt", where) if "prompt" in rec else []
    sides = {key: prompt + _messages(rec, key, where) for key in ("chosen", "rejected")}
    for key, conv in sides.items():
        if conv[-1][0] != "assistant":
            raise UserError(f"{where}: field {key!r}: the last message is the {conv[-1][0]}'s, not the assistant's "
                            "response")
    chosen, rejected = sides["chosen"], sides["rejected"]
    if chosen[:-1] != rejected[:-1]:
        i = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)) - 1)
        raise UserError(f"{where}: fields 'chosen' and 'rejected' differ at message {i}, before their last message",
                        fix="both must share the conversation up to the response")
    _check_prompt(chosen[:-1], where, "prompt" if prompt else "chosen")
    return chosen[:-1], chosen[-1][1], rejected[-1][1]


def _hh_turns(text: str, where: str, key: str) -> list[tuple[str, str]]:
    parts = _HH_TURN.split(text)  # [before the first turn, role, text, role, text, ...]
    if parts[0].strip():
        raise UserError(f"{where}: field {key!r}: text before the first '\\n\\nHuman:' turn",
                        fix="HH transcripts are '\\n\\nHuman: …\\n\\nAssistant: …'")
    return [("user" if role == "Human" else "assistant", content.strip())
            for role, content in zip(parts[1::2], parts[2::2])]


def _hh(rec: dict, where: str) -> tuple[list[tuple[str, str]], str, str]:
    chosen, rejected = (_need(rec, key, where, str) for key in ("chosen", "rejected"))
    chosen, rejected = (t if not t.startswith("Human:") else "\n\n" + t for t in (chosen, rejected))
    shared = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(_HH_ASSISTANT, 0, shared)  # the last assistant turn both transcripts open
    if cut < 0:
        raise UserError(f"{where}: fields 'chosen' and 'rejected' share no '\\n\\nAssistant:' turn",
                        fix="write HH transcripts ('\\n\\nHuman: …\\n\\nAssistant: …') or add a 'prompt' field")
    responses = []
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        response = text[cut + len(_HH_ASSISTANT):]
        if _HH_TURN.search(response):
            raise UserError(f"{where}: field {key!r}: the response goes on into further turns after the one where "
                            "the pair differs", fix="a pair may differ only in its last assistant response")
        responses.append(response.strip())
    prompt = _hh_turns(chosen[:cut], where, "chosen")
    _check_prompt(prompt, where, "chosen")
    return prompt, responses[0], responses[1]


def to_pair(rec: Any, fmt: str, where: str) -> PreferencePair:
    """One record of a file in format `fmt` as a pair; `where` (file:line) prefixes every error."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if fmt == "prompt":
        prompt_text = _need(rec, "prompt", where, str)
        if not prompt_text.strip():
            raise UserError(f"{where}: field 'prompt' is empty")
        prompt = [("user", prompt_text)]
        chosen, rejected = (_need(rec, key, where, str) for key in ("chosen", "rejected"))
    elif fmt == "alpaca":
        instruction = _need(rec, "instruction", where, str)
        extra = rec.get("input", "") or ""
        if not isinstance(extra, str):
            raise UserError(f"{where}: field 'input' is {type(extra).__name__}, not a string")
        if not (instruction + extra).strip():
            raise UserError(f"{where}: fields 'instruction' and 'input' are empty")
        user = instruction + (f"\n\n{extra}" if extra else "")  # as the SFT alpaca format builds it
        prompt = [("user", user)]
        chosen, rejected = (_need(rec, key, where, str) for key in ("chosen", "rejected"))
    elif fmt == "conversational":
        prompt, chosen, rejected = _conversational(rec, where)
    elif fmt == "hh":
        prompt, chosen, rejected = _hh(rec, where)
    else:
        raise UserError(f"{where}: unknown preference format (keys: {', '.join(sorted(rec))})",
                        fix="use prompt/chosen/rejected, instruction/input/chosen/rejected, message lists in "
                            "chosen/rejected, or HH transcripts in chosen/rejected")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise UserError(f"{where}: field {key!r}: the response is empty", fix="a pair needs two answers")
    meta: dict[str, Any] = {"kind": "file"}
    if "margin" in rec:
        if isinstance(rec["margin"], bool) or not isinstance(rec["margin"], (int, float)):
            raise UserError(f"{where}: field 'margin' is {type(rec['margin']).__name__}, not a number")
        meta["margin"] = float(rec["margin"])
    return PreferencePair(prompt, chosen, rejected, where, meta)


def same_text(a: str, b: str) -> bool:
    """Equal up to spacing: such a pair prefers nothing."""
    return a.split() == b.split()


def read_pairs(paths: list[str], fmt: str = "auto", *, identical: str = "error"
               ) -> tuple[list[PreferencePair], dict[str, int]]:
    """Every pair in the files, in order, and counts ({"identical": pairs dropped}). `fmt` is one of
    FORMATS or "auto" (each file's first record decides); identical="error" refuses a pair whose chosen
    and rejected are the same text, "drop" skips it."""
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"preference format {fmt!r} is unknown", fix=f"use auto or one of: {', '.join(FORMATS)}")
    if identical not in ("error", "drop"):
        raise UserError(f"identical={identical!r} is unknown", fix="use error or drop")
    pairs, counts = [], {"identical": 0}
    for p in paths:
        path = Path(p)
        records = read_records(path)
        if not records:
            raise UserError(f"{path}: no preference pairs (an empty list)", fix="pass a file with pairs")
        file_fmt = fmt if fmt != "auto" else detect_format(records[0][1])
        for lineno, rec in records:
            pair = to_pair(rec, file_fmt, f"{path}:{lineno}")
            if same_text(pair.chosen, pair.rejected):
                if identical == "error":
                    raise UserError(f"{pair.source}: fields 'chosen' and 'rejected' are the same text",
                                    fix="make them differ, remove the pair, or drop such pairs")
                counts["identical"] += 1
                continue
            pairs.append(pair)
    if not pairs:
        raise UserError("no preference pairs left in " + ", ".join(paths))
    return pairs, counts


# -- embedded pairs -------------------------------------------------------------------------------


def corrupted_pairs(n: int, seed: int) -> list[PreferencePair]:
    """n embedded tasks (distinct prompts, the families in turn), each its right answer against a
    corruption of the same form that the family's checker judges wrong."""
    rng = random.Random(f"corrupt:{seed}")  # its own stream: the tasks are those of generate_tasks(n, seed)
    return [PreferencePair([("user", t.instruction)], t.answer, corrupt(t, rng), f"tasks:{i}",
                           {"kind": "corrupted", "family": t.family, "difficulty": t.difficulty})
            for i, t in enumerate(generate_tasks(n, seed))]


# -- tokens ---------------------------------------------------------------------------------------


class ResponseTooLong(UserError):
    """A response that does not fit the context even with the whole prompt cut away."""


def tokenize_pair(pair: PreferencePair, tok: Tokenizer, block_size: int
                  ) -> tuple[list[int], list[int], list[int], list[int], bool]:
    """(chosen ids, chosen labels, rejected ids, rejected labels, whether the prompt was truncated).
    Each side is prompt + response in the chat template, at most block_size tokens; labels are -1 on
    the prompt and the token itself on the response and its closing <|end|>."""
    try:
        prompt_ids, _ = render(tok, pair.prompt, add_generation_prompt=True)
        sides = [render(tok, pair.prompt + [("assistant", text)]) for text in (pair.chosen, pair.rejected)]
    except ValueError as e:  # a character the tokenizer has no token for (char kind)
        raise UserError(f"{pair.source}: the {tok.kind} tokenizer cannot encode this pair ({e})") from None
    n_prompt = len(prompt_ids)  # ends with <|assistant|>; render shares it between both sides
    longest = max(len(ids) for ids, _ in sides) - n_prompt  # response tokens and the closing <|end|>
    room = block_size - longest  # prompt tokens that fit beside the longer response
    if room < 1:
        raise ResponseTooLong(f"{pair.source}: a response of {longest} tokens leaves no room for the prompt in a "
                              f"context of {block_size}", fix="raise --model.block_size or shorten the response")
    cut = max(0, n_prompt - room)  # from the left: the end of the prompt (and its <|assistant|>) stays
    out: list[list[int]] = []
    for ids, labels in sides:
        out += [ids[cut:], [-1] * (n_prompt - cut) + labels[n_prompt:]]
    return out[0], out[1], out[2], out[3], cut > 0


@dataclass
class TokenizedPair:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    meta: dict[str, Any]  # the pair's meta and its source


def tokenize_pairs(pairs: list[PreferencePair], tok: Tokenizer, block_size: int, overlong: str = "drop"
                   ) -> tuple[list[TokenizedPair], dict[str, int]]:
    """Every pair tokenized (`tokenize_pair`), and counts: "truncated" (prompts cut from the left) and
    "dropped" (a response too long for the context; overlong="error" refuses it instead)."""
    if overlong not in ("drop", "error"):
        raise UserError(f"overlong={overlong!r} is unknown", fix="use drop or error")
    out, counts = [], {"truncated": 0, "dropped": 0}
    for pair in pairs:
        try:
            c_ids, c_labels, r_ids, r_labels, truncated = tokenize_pair(pair, tok, block_size)
        except ResponseTooLong:
            if overlong == "error":
                raise
            counts["dropped"] += 1
            continue
        counts["truncated"] += truncated
        out.append(TokenizedPair(c_ids, c_labels, r_ids, r_labels, {"source": pair.source, **pair.meta}))
    if not out:
        raise UserError(f"no preference pair fits: every response of all {len(pairs)} pairs is longer than the "
                        f"context ({block_size} tokens)", fix="raise --model.block_size or shorten the responses")
    return out, counts


# -- held-out split -------------------------------------------------------------------------------


def prompt_key(pair: PreferencePair) -> tuple[tuple[str, str], ...]:
    """What the model is asked, whitespace collapsed (prompts differing only in spacing are one prompt)."""
    return tuple((role, " ".join(content.split())) for role, content in pair.prompt)


def split_pairs_by_prompt(pairs: list[PreferencePair], fraction: float, seed: int
                          ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held out): `fraction` of the distinct prompts held out with every pair asking them, so
    no held-out prompt is ever trained on. Both keep the input order."""
    if not 0 < fraction < 1:
        raise UserError(f"held-out fraction {fraction} is outside (0, 1)", fix="use e.g. 0.1")
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(prompt_key(p), []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    n_held = max(1, round(fraction * len(keys)))
    if n_held >= len(keys):
        raise UserError(f"only {len(keys)} distinct prompts among the preference pairs: nothing left to train on "
                        f"after holding out {n_held}", fix="add pairs or lower the held-out fraction")
    held = {i for k in keys[:n_held] for i in groups[k]}
    train, held_out = [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]
    assert_prompts_disjoint(train, held_out)
    return train, held_out


def assert_prompts_disjoint(train: list[PreferencePair], held_out: list[PreferencePair]) -> None:
    """Raise AssertionError if any held-out pair asks a prompt that a training pair asks."""
    seen = {prompt_key(p) for p in train}
    shared = [p.source for p in held_out if prompt_key(p) in seen]
    if shared:
        raise AssertionError(f"{len(shared)} held-out pairs share a prompt with training (first: {shared[0]})")
