"""The two simplest tokenizers: bytes and characters.

`ByteTokenizer` maps each UTF-8 byte to its own id (256 ids, plus specials after them): no
training, no unknowns, but about 4× more tokens than a BPE on English. `CharTokenizer` maps each
distinct character of the training text to an id, as in the classic shakespeare_char benchmark;
a character never seen in training cannot be encoded and raises an error that names it.
"""

from __future__ import annotations

from typing import Any

from scratchlm.config import TokenizerConfig
from scratchlm.tokenizer.base import Tokenizer, register


@register
class ByteTokenizer(Tokenizer):
    kind = "byte"

    def __init__(self, special_tokens: dict[str, int] | None = None) -> None:
        super().__init__(special_tokens)
        self._id_to_special = {i: s for s, i in self.special_tokens.items()}

    @classmethod
    def train(cls, texts: list[str], cfg: TokenizerConfig, progress: bool = True) -> ByteTokenizer:
        return cls({s: 256 + i for i, s in enumerate(cfg.special_tokens)})

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
            else:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(self._id_to_special[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return self._id_to_special.get(i) or repr(bytes([i]))[2:-1]

    def _state(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _from_state(cls, d: dict[str, Any], special_tokens: dict[str, int]) -> ByteTokenizer:
        return cls(special_tokens)


@register
class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: list[str], special_tokens: dict[str, int] | None = None) -> None:
        super().__init__(special_tokens)
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self._itos = list(chars) + [""] * len(self.special_tokens)
        for s, i in self.special_tokens.items():
            self._itos[i] = s

    @classmethod
    def train(cls, texts: list[str], cfg: TokenizerConfig, progress: bool = True) -> CharTokenizer:
        chars = sorted(set().union(*map(set, texts)))
        return cls(chars, {s: len(chars) + i for i, s in enumerate(cfg.special_tokens)})

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.special_tokens)

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in this character vocabulary ({len(self.chars)} characters); "
                "train the tokenizer on text that contains it, or use a byte or BPE tokenizer"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self._itos[i] for i in ids)

    def id_to_piece(self, i: int) -> str:
        return self._itos[i]

    def _state(self) -> dict[str, Any]:
        return {"chars": self.chars}

    @classmethod
    def _from_state(cls, d: dict[str, Any], special_tokens: dict[str, int]) -> CharTokenizer:
        return cls(list(d["chars"]), special_tokens)
