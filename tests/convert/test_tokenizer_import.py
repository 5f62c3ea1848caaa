"""Reading HF tokenizers: GPT-2's vocab.json + merges.txt and tokenizer.json, a Llama-3-style
tokenizer.json (regex Split + ByteLevel, specials after the vocabulary), and the refusals."""

from __future__ import annotations

import shutil

import pytest

from scratchlm.convert.hf_tokenizer import load_hf_tokenizer
from scratchlm.errors import UserError
from scratchlm.tokenizer.bpe import PATTERNS
from tests.helpers import TEXT, shared_file

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

SENTENCES = ["Hello world, it's 2024!", "The quick brown fox can't jump 32.5 feet, naïvely!",
             "  leading spaces\n\n\ttabs and ünïcödé 🙂 mixed123numbers", TEXT[:300]]


def test_gpt2_vocab_json_merges_txt_and_tokenizer_json(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    shutil.copy(shared_file("gpt2-encoder.json"), files / "vocab.json")  # the same format under HF's names
    shutil.copy(shared_file("gpt2-vocab.bpe"), files / "merges.txt")
    hf = transformers.GPT2Tokenizer.from_pretrained(files)
    hf.save_pretrained(tmp_path / "json")  # writes HF's tokenizer.json
    assert not (tmp_path / "json" / "vocab.json").exists()
    for folder in (files, tmp_path / "json"):
        ours = load_hf_tokenizer(folder)
        assert ours.vocab_size == 50257 and ours.eot_id == 50256 and ours.pattern == PATTERNS["gpt2"]
        for s in SENTENCES:
            assert ours.encode(s) == hf.encode(s, add_special_tokens=False), (folder.name, s)


def test_split_regex_tokenizer_json_with_trailing_specials(tmp_path):
    """The layout of Llama 3 / Qwen2: a regex Split, a regex-less ByteLevel, added tokens after the vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS["gpt4"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT, "hello world " * 20], trainer)
    tok.add_special_tokens(["<|begin_of_text|>", "<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))

    ours = load_hf_tokenizer(tmp_path)
    assert ours.pattern_name == "gpt4"
    n = tok.get_vocab_size(with_added_tokens=False)
    assert ours.special_tokens == {"<|begin_of_text|>": n, "<|endoftext|>": n + 1} == {
        s: tok.token_to_id(s) for s in ("<|begin_of_text|>", "<|endoftext|>")}
    for s in SENTENCES:
        assert ours.encode(s) == tok.encode(s).ids, s
        assert ours.decode(tok.encode(s).ids) == s


def test_non_bpe_tokenizer_asks_for_tokenizer_flag(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match=r"model.type='WordPiece' is not BPE.*--tokenizer FILE"):
        load_hf_tokenizer(tmp_path)


def test_sentencepiece_style_bpe_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    bpe = models.BPE({"▁a": 0, "<0x41>": 1}, [], byte_fallback=True)
    Tokenizer(bpe).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="SentencePiece-style"):
        load_hf_tokenizer(tmp_path)
