"""The chat session: template, streaming, history within the context, commands."""

from __future__ import annotations

import pytest
import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.config import GPTConfig, LlamaConfig, SampleConfig
from scratchlm.errors import UserError
from scratchlm.infer.chat import ChatSession, run_chat
from scratchlm.infer.engine import Engine
from scratchlm.model import build_model
from scratchlm.tokenizer import ByteTokenizer
from scratchlm.tokenizer.chat import ensure_chat_specials
from tests.serve.server import chat_checkpoint


@pytest.fixture
def session():
    torch.manual_seed(0)
    tok = ensure_chat_specials(ByteTokenizer({"<|endoftext|>": 256}))[0]
    model = build_model(LlamaConfig(vocab_size=320, block_size=48, n_layer=1, n_head=2, n_embd=16,
                                    bias=False)).eval()
    return ChatSession(Engine(model, tok), tok, SampleConfig(max_new_tokens=4, temperature=0.0, stream=False))


def test_reply_streams_exactly_what_it_returns(session):
    shown = []
    text = session.reply("hi", shown.append)
    assert "".join(shown) == text
    assert session.history == [("user", "hi"), ("assistant", text)]


def test_history_is_trimmed_to_fit_the_context(session):
    for i in range(4):
        session.reply(f"message number {i}")
    assert session.dropped > 0 and len(session.history) < 8
    assert session.history[-2] == ("user", "message number 3")  # the newest exchange is always kept
    session.history.append(("user", "one more"))
    assert len(session.prompt_ids()) <= 48 - 4


def test_commands(session):
    out = []
    run_chat(session, ["hello\n", "/system be kind\n", "/reset\n", "/quit\n", "never read\n"], out.append)
    text = "".join(out)
    assert "(system prompt set; history cleared)" in text and "(history cleared)" in text
    assert session.system == "be kind" and session.history == []


def test_needs_chat_tokens():
    model = build_model(GPTConfig(vocab_size=256, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(UserError, match="no chat tokens"):
        ChatSession(Engine(model), ByteTokenizer(), SampleConfig())


def test_a_line_the_tokenizer_cannot_encode_is_one_message_and_the_chat_goes_on(tmp_path):
    model, tok, _ = load_model_for_inference(chat_checkpoint(tmp_path / "run"))  # a character tokenizer
    session = ChatSession(Engine(model, tok), tok, SampleConfig(max_new_tokens=4, temperature=0.0, stream=False))
    shown = []
    run_chat(session, ["why?\n", "hi\n"], shown.append)
    text = "".join(shown)
    assert "cannot encode that line" in text and "Traceback" not in text
    assert [role for role, _ in session.history] == ["user", "assistant"]  # only the line that could be encoded
