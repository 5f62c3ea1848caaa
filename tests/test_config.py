"""Config: presets, typed overrides, close-match suggestions, JSON round trip."""

from __future__ import annotations

import pytest

from scratchlm.config import PRESETS, Config, apply_overrides, get_preset, load_config
from scratchlm.errors import UserError


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["--tokenizer.vocab_size=8192", "--data.dedup=false",
                                     "--data.val_fraction=0.1", "--tokenizer.special_tokens=<|a|>,<|b|>",
                                     "--name=x"])
    assert cfg.tokenizer.vocab_size == 8192 and cfg.data.dedup is False and cfg.data.val_fraction == 0.1
    assert cfg.tokenizer.special_tokens == ["<|a|>", "<|b|>"] and cfg.name == "x"


@pytest.mark.parametrize("override, message", [
    ("--tokenizer.vocab_sise=3", "did you mean vocab_size"),
    ("--tokeniser.kind=bpe", "did you mean tokenizer"),
    ("--tokenizer.vocab_size=abc", "not a valid int"),
    ("--data.dedup=maybe", "not a valid bool"),
    ("--tokenizer.vocab_size", "has no value"),
    ("--tokenizer=3", "is a section"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(UserError, match=message):
        apply_overrides(Config(), [override])


def test_unknown_preset_suggests():
    with pytest.raises(UserError, match="did you mean tiny"):
        get_preset("tiney")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name, tmp_path):
    cfg = get_preset(name)
    cfg.save(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg


def test_corrupt_config_file(tmp_path):
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"tokenizer": {"vocab": 3}}')
    with pytest.raises(UserError, match="unknown key"):
        load_config(tmp_path / "config.json")
