"""The chat template travels with an exported chat model: HF's `apply_chat_template` on the export
gives exactly the ids of our `render`, and generation stops at <|end|>."""

from __future__ import annotations

import json

import pytest

from scratchlm.convert import export_hf
from scratchlm.convert.chat_template import CHAT_TEMPLATE
from scratchlm.tokenizer.chat import render
from tests.convert.common import chat_bpe, checkpoint_with
from tests.helpers import TEXT, our_checkpoint

transformers = pytest.importorskip("transformers")

CONVERSATIONS = {
    "one-user-turn": [("user", "The quick brown fox?")],
    "system-and-turns": [("system", "You are terse. It can't be 32.5 feet."),
                         ("user", "The quick brown fox jumps"), ("assistant", " over the lazy dog.\n"),
                         ("user", "naïvely!  spaces\n\nand ünïcödé 🙂"), ("assistant", TEXT[:90])],
    "empty-contents": [("system", ""), ("user", ""), ("assistant", "")],
}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    run, _, tok = checkpoint_with(tmp, chat_bpe(), arch="llama", bias=False)
    return export_hf(run, tmp / "hf"), tok


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True], ids=["no-prompt", "generation-prompt"])
def test_apply_chat_template_gives_our_ids(export, name, gen):
    out, tok = export
    auto = transformers.AutoTokenizer.from_pretrained(out)
    turns = CONVERSATIONS[name]
    want, _ = render(tok, turns, add_generation_prompt=gen)
    messages = [{"role": r, "content": c} for r, c in turns]
    got = auto.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
    assert got == want
    assert (want[-1] == tok.special_tokens["<|assistant|>"]) == gen  # the generation prompt is really there


def test_export_names_end_as_eos_and_refuses_unknown_roles(export):
    out, tok = export
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto.eos_token_id == tok.special_tokens["<|end|>"]
    assert auto.bos_token_id == tok.eot_id
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.special_tokens["<|end|>"], tok.eot_id]
    with pytest.raises(Exception, match="roles system, user and assistant"):
        auto.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_a_model_without_chat_tokens_gets_no_template(tmp_path):
    run, _, _ = our_checkpoint(tmp_path, arch="llama", bias=False)
    cfg = json.loads((export_hf(run, tmp_path / "hf") / "tokenizer_config.json").read_text())
    assert "chat_template" not in cfg and cfg["eos_token"] == "<|endoftext|>"
