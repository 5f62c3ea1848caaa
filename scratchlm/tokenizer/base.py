"""The interface every tokenizer shares, its file format, and the special-token policy.

File format (JSON, one file): `{"format": "scratchlm.tokenizer", "version": 1, "kind": ...,
"special_tokens": {token: id}, ...}` plus the fields of that kind (see each class's `to_dict`).
A file from a newer format version is refused with a message to upgrade, never half-read.

Special tokens in input text follow tiktoken's policy: `allowed_special` lists the specials that
encode to their own id; `disallowed_special` (default: every special not allowed) makes `encode`
raise if one appears; a special in neither set is encoded as ordinary text.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from scratchlm.errors import UserError
from scratchlm.io import write_json

FORMAT = "scratchlm.tokenizer"
FORMAT_VERSION = 1

SpecialSet = Literal["all"] | Collection[str]


class SpecialTokenError(ValueError):
    """Input text contains a special token that the caller did not allow."""


class Tokenizer(ABC):
    kind: ClassVar[str]

    def __init__(self, special_tokens: dict[str, int] | None = None) -> None:
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        self._special_re: re.Pattern | None = None

    # -- what every kind implements ---------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text with no special-token handling at all."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def id_to_piece(self, i: int) -> str:
        """A readable form of one token, for displays such as `tokenizer compare`."""

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """The kind-specific fields of the file format."""

    @classmethod
    @abstractmethod
    def _from_state(cls, d: dict[str, Any], special_tokens: dict[str, int]) -> Tokenizer: ...

    # -- shared ---------------------------------------------------------------------------------
    @property
    def eot_id(self) -> int | None:
        """The document separator id, if this tokenizer has one."""
        return self.special_tokens.get("<|endoftext|>")

    def split_special(
        self, text: str, allowed_special: SpecialSet = (), disallowed_special: SpecialSet = "all"
    ) -> Iterator[tuple[str, int | None]]:
        """Cut text into (segment, None) ordinary pieces and (token, id) allowed specials."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed:
            for tok in disallowed:
                if tok in text:
                    raise SpecialTokenError(
                        f"text contains the special token {tok!r}; pass allowed_special={{{tok!r}}} to encode "
                        "it as a special, or disallowed_special=() to encode it as ordinary text"
                    )
        if not allowed:
            yield text, None
            return
        pattern = re.compile("|".join(re.escape(t) for t in sorted(allowed, key=len, reverse=True)))
        start = 0
        for m in pattern.finditer(text):
            if m.start() > start:
                yield text[start : m.start()], None
            yield m.group(), self.special_tokens[m.group()]
            start = m.end()
        if start < len(text):
            yield text[start:], None

    def encode(
        self, text: str, *, allowed_special: SpecialSet = (), disallowed_special: SpecialSet = "all"
    ) -> list[int]:
        ids: list[int] = []
        for segment, special in self.split_special(text, allowed_special, disallowed_special):
            if special is None:
                ids.extend(self.encode_ordinary(segment))
            else:
                ids.append(special)
        return ids

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "special_tokens": self.special_tokens,
            **self._state(),
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def fingerprint(self) -> str:
        """A short hash of the vocabulary and rules: data shards record it to catch mismatches."""
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, specials={len(self.special_tokens)})"


KINDS: dict[str, type[Tokenizer]] = {}


def register(cls: type[Tokenizer]) -> type[Tokenizer]:
    KINDS[cls.kind] = cls
    return cls


def tokenizer_from_dict(d: Any, source: str = "tokenizer") -> Tokenizer:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UserError(f"{source}: not a scratchlm tokenizer file", fix="train one with `scratchlm tokenizer train`")
    version = d.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{source}: tokenizer format version {version} is newer than this scratchlm reads ({FORMAT_VERSION})",
            fix="upgrade scratchlm",
        )
    kind = d.get("kind")
    if kind not in KINDS:
        raise UserError(f"{source}: unknown tokenizer kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    try:
        return KINDS[kind]._from_state(d, {str(k): int(v) for k, v in d.get("special_tokens", {}).items()})
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{source}: corrupt {kind} tokenizer file ({type(e).__name__}: {e})",
                        fix="re-train or re-export it") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer file written by `Tokenizer.save` (a folder holding tokenizer.json works too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such tokenizer file", fix="train one with `scratchlm tokenizer train`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt tokenizer file (not JSON: {e})", fix="re-train it") from None
    return tokenizer_from_dict(d, str(path))


def with_specials(tok: Tokenizer, names: list[str]) -> Tokenizer:
    """A copy of `tok` with the special tokens it lacks appended after its vocabulary (ids
    vocab_size, vocab_size + 1, ...). Kinds that keep specials before the vocabulary (WordPiece,
    Unigram) cannot grow this way and raise UserError."""
    missing = [s for s in names if s not in tok.special_tokens]
    if not missing:
        return tok
    d = tok.to_dict()
    d["special_tokens"] = {**tok.special_tokens, **{s: tok.vocab_size + i for i, s in enumerate(missing)}}
    try:
        return tokenizer_from_dict(d)
    except UserError:
        raise UserError(f"a {tok.kind} tokenizer cannot gain the special tokens {', '.join(missing)}",
                        fix="retrain it with --tokenizer.special_tokens including them") from None
