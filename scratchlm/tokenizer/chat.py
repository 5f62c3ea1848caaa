"""The chat special tokens and the chat template, on the tokenizer layer: the SFT stage, the LoRA
adapters (which train these tokens' embedding rows), the chat session and every loader of a fine-tune
need them, below any stage (as nanochat keeps `render_conversation` with its tokenizer).

The template uses the reserved special tokens (ids, never text):

    [<|system|> system <|end|>] <|user|> question <|end|> <|assistant|> answer <|end|> ...

Labels: only the assistant's tokens and the <|end|> closing each assistant turn are trained on
(-1 elsewhere, ignored by the loss).

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


def render(tok: Tokenizer, turns: list[tuple[str, str]], *, add_generation_prompt: bool = False
           ) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and their labels (-1 = not trained on)."""
    sp = tok.special_tokens
    ids: list[int] = []
    labels: list[int] = []
    for role, content in turns:
        body = tok.encode(content, disallowed_special=())  # specials typed in content stay text
        ids.append(sp[f"<|{role}|>"])
        labels.append(-1)
        ids.extend(body)
        ids.append(sp["<|end|>"])
        trained = role == "assistant"
        labels.extend(body if trained else [-1] * len(body))
        labels.append(sp["<|end|>"] if trained else -1)
    if add_generation_prompt:
        ids.append(sp["<|assistant|>"])
        labels.append(-1)
    return ids, labels
