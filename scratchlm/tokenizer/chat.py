"""The chat special tokens, on the tokenizer layer: the SFT stage, the LoRA adapters (which train
these tokens' embedding rows) and every loader of a fine-tune need them, below any stage.

A tokenizer trained without them gets them appended after its vocabulary (`ensure_chat_specials`);
the model's embedding grows to match (`scratchlm.model.resize_embeddings`).
"""

from __future__ import annotations

from scratchlm.tokenizer.base import Tokenizer, with_specials

CHAT_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def ensure_chat_specials(tok: Tokenizer) -> tuple[Tokenizer, list[str]]:
    """The tokenizer with the chat specials it lacks added after its vocabulary, and those added."""
    missing = [s for s in CHAT_SPECIALS if s not in tok.special_tokens]
    return with_specials(tok, list(CHAT_SPECIALS)), missing
