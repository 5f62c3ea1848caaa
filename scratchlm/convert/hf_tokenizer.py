"""Read the tokenizer of an HF model folder into our byte-level `BPETokenizer`.

Two layouts are understood, tried in this order:
- `tokenizer.json` whose model is byte-level BPE (GPT-2, Llama 3, Qwen2/3): `model.vocab` gives
  the ids, `model.merges` the merges, `added_tokens` the specials, and the pre-tokenizer the split
  regex (GPT-2's `ByteLevel(use_regex)`, or a `Split` regex followed by a regex-less `ByteLevel`).
- GPT-2's `vocab.json` + `merges.txt` (the same formats as OpenAI's encoder.json + vocab.bpe).

Our encoder applies tiktoken's rule (merge the adjacent pair whose result has the lowest id), which
equals HF's "merge in listed order" when merges are listed in the order of the ids they make, as
in every tokenizer converted from tiktoken or trained by BPE; a file that breaks the order is
loaded with a warning. Left out: SentencePiece-style BPE (Llama 2, Mistral v1: "▁" word marks and
byte fallback), WordPiece and Unigram models, and normalizers other than NFC (NFC is dropped
with a note: it changes only text that is not already NFC). Such folders need `--tokenizer FILE`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError
from scratchlm.tokenizer.bpe import PATTERNS, BPETokenizer, str_to_token

FIX = "pass --tokenizer FILE with a scratchlm tokenizer file whose ids match the model"


class Unsupported(Exception):
    """This tokenizer.json is valid but not byte-level BPE; the message says which part."""


def load_hf_tokenizer(folder: Path) -> BPETokenizer:
    """The BPE of an HF model folder, or a UserError that asks for --tokenizer."""
    tj, vocab_json, merges_txt = folder / "tokenizer.json", folder / "vocab.json", folder / "merges.txt"
    gpt2_files = vocab_json.is_file() and merges_txt.is_file()
    if tj.is_file():
        try:
            return from_tokenizer_json(tj)
        except Unsupported as e:
            if not gpt2_files:
                raise UserError(f"{tj}: {e}; scratchlm reads byte-level BPE only", fix=FIX) from None
    if gpt2_files:
        return BPETokenizer.from_gpt2_files(vocab_json, merges_txt)
    raise UserError(f"{folder}: no tokenizer.json or vocab.json + merges.txt", fix=FIX)


def from_tokenizer_json(path: Path) -> BPETokenizer:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})", fix=FIX) from None
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        raise Unsupported(f"model.type={model.get('type')!r} is not BPE")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise Unsupported("a SentencePiece-style BPE (byte_fallback / subword prefix or suffix)")
    normalizer = d.get("normalizer")
    if normalizer is not None:
        if normalizer.get("type") != "NFC":
            raise Unsupported(f"normalizer {normalizer.get('type')!r}")
        print(f"note: {path.name}: the NFC normalizer is not applied (it only changes text that is not NFC)")
    pattern = _pattern(d.get("pre_tokenizer"))

    specials = {t["content"]: int(t["id"]) for t in d.get("added_tokens", [])}
    by_id: dict[int, bytes] = {}
    for tok, i in model.get("vocab", {}).items():
        if tok in specials:
            continue  # GPT-2 lists <|endoftext|> in both places
        try:
            by_id[int(i)] = str_to_token(tok)
        except KeyError:
            raise Unsupported(f"token {tok!r} (id {i}) is not in GPT-2's byte alphabet") from None
    n = len(by_id)
    if sorted(by_id) != list(range(n)):
        raise UserError(f"{path}: model.vocab ids are not 0..{n - 1} (besides the added tokens)", fix=FIX)
    vocab = [by_id[i] for i in range(n)]
    ids = {t: i for i, t in enumerate(vocab)}

    merges: list[tuple[int, int]] = []
    made = -1
    out_of_order = 0
    for m in model.get("merges", []):
        a, b = m.split(" ") if isinstance(m, str) else m  # "a b" in older files, [a, b] in newer
        try:
            left, right, result = ids[str_to_token(a)], ids[str_to_token(b)], ids[str_to_token(a + b)]
        except KeyError:
            raise UserError(f"{path}: merge {a!r} + {b!r} refers to a token missing from model.vocab", fix=FIX) \
                from None
        out_of_order += result < made
        made = max(made, result)
        merges.append((left, right))
    if out_of_order:
        warnings.warn(f"{path}: {out_of_order} merges are listed out of id order; our encoder (lowest id first) "
                      "may split some words differently from HF's", stacklevel=2)
    name = next((k for k, v in PATTERNS.items() if v == pattern), pattern)
    try:
        return BPETokenizer(vocab, merges, name, specials)
    except ValueError as e:  # e.g. a special token placed among the ordinary ids
        raise UserError(f"{path}: {e}", fix=FIX) from None


def _pattern(pre: dict[str, Any] | None) -> str:
    """The split regex of a byte-level pre-tokenizer."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0] and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        if steps[0].get("add_prefix_space"):
            raise Unsupported("pre_tokenizer.add_prefix_space=true")
        return PATTERNS["gpt2"]  # ByteLevel's built-in regex is GPT-2's
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")
            and "Regex" in steps[0].get("pattern", {}) and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert")):
        return steps[0]["pattern"]["Regex"]
    raise Unsupported("the pre_tokenizer is not a regex split followed by ByteLevel")
