"""Our chat template (`scratchlm.tokenizer.chat.render`) as Jinja, for the files other tools read.

HF's `apply_chat_template`, vLLM, llama.cpp (`--jinja`) and Ollama format a conversation by
rendering the model's Jinja template to text and tokenizing that text with special tokens
parsed. Our `render` works on ids instead:

    [<|system|> system <|end|>] <|user|> question <|end|> <|assistant|> answer <|end|> ... [<|assistant|>]

Rendered as text, `<|user|>question<|end|>` splits on the special tokens into the same pieces,
and each content is encoded on its own by the same BPE, so the ids agree (tested against HF's
tokenizer). No BOS is added: our chat models never saw one.

The one difference: a special token *typed inside* a message (the literal text "<|end|>") is
ordinary text to `render` but a special token to a text-based template; no template can say
otherwise. Such content is rare and is a prompt-injection risk in those tools, not here.

Where a chat model (a tokenizer with all four chat specials) is exported, it stops at `<|end|>`:
that is its end-of-sequence token in `tokenizer_config.json` (and in GGUF), while the
document separator `<|endoftext|>` stays its BOS, as in pretraining.
"""

from __future__ import annotations

from typing import Any

from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.chat import CHAT_SPECIALS

# Whitespace control (`{%-`, `-%}`) everywhere: HF renders with trim_blocks/lstrip_blocks, other
# engines do not, and the output must be the same text in all of them.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('this model knows the roles system, user and assistant, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def is_chat_tokenizer(tok: Tokenizer) -> bool:
    """Whether the tokenizer has every chat special (an SFT model's, or one trained with them)."""
    return all(s in tok.special_tokens for s in CHAT_SPECIALS)


def end_token(tok: Tokenizer) -> str | None:
    """The token generation stops at: <|end|> for a chat model, else <|endoftext|> (if any)."""
    if is_chat_tokenizer(tok):
        return "<|end|>"
    return "<|endoftext|>" if "<|endoftext|>" in tok.special_tokens else None


def hf_tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    """The fields of a chat model's `tokenizer_config.json` beyond `BPETokenizer.save_hf`'s:
    the template and <|end|> as EOS. Empty for a model without the chat specials."""
    if not is_chat_tokenizer(tok):
        return {}
    return {"chat_template": CHAT_TEMPLATE, "eos_token": end_token(tok)}
