"""Config: presets, typed overrides, close-match suggestions, JSON round trip."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from scratchlm.config import (
    PRESETS,
    SECTIONS,
    Config,
    DataConfig,
    ModelConfig,
    Range,
    Rule,
    SampleConfig,
    SFTConfig,
    TokenizerConfig,
    TrainConfig,
    apply_overrides,
    get_preset,
    load_config,
)
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


# ----------------------------------------------------------------------------------------------
# validation: every field declares what it accepts, checked once where a config is built

SECTION_CLASSES = [Config, TokenizerConfig, DataConfig, ModelConfig, TrainConfig, SampleConfig, SFTConfig]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    get_preset(name).validate()


@pytest.mark.parametrize("cls", SECTION_CLASSES, ids=lambda c: c.__name__)
def test_every_field_declares_a_range_or_choices(cls):
    free = {(SFTConfig, "base")}  # a path, checked when the stage opens it
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        if dataclasses.is_dataclass(hint) or (cls, name) in free:
            continue
        declared = hint is bool or typing.get_origin(hint) is typing.Literal or (
            typing.get_origin(hint) is typing.Annotated and any(isinstance(m, Rule) for m in hint.__metadata__))
        assert declared, f"{cls.__name__}.{name}: {hint}"
    assert set(SECTIONS) == {n for n, h in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(h)}


def test_choice_sets_match_what_the_code_implements():
    from scratchlm.tokenizer import KINDS
    from scratchlm.train.schedule import SCHEDULES

    hints = {c: typing.get_type_hints(c) for c in (TokenizerConfig, TrainConfig)}
    assert set(typing.get_args(hints[TokenizerConfig]["kind"])) == set(KINDS)
    assert typing.get_args(hints[TrainConfig]["schedule"]) == SCHEDULES


def test_range_reads_as_written():
    half_open = Range("[0, 1)")
    assert half_open.allowed == "in [0, 1)"
    assert [half_open.ok(v) for v in (0, 0.5, 1, -0.1, math.nan)] == [True, True, False, False, False]
    positive = Range("> 0")
    assert positive.allowed == "> 0"
    assert [positive.ok(v) for v in (1e-9, 0, math.inf)] == [True, False, False]
    assert [Range(">= 1").ok(v) for v in (1, 0)] == [True, False]


def test_relations_are_checked_on_the_final_values():
    # lr below the default min_lr is fine once min_lr follows it: validation runs after every override.
    cfg = apply_overrides(Config(), ["--train.lr=1e-5", "--train.min_lr=1e-6"])
    assert (cfg.train.lr, cfg.train.min_lr) == (1e-5, 1e-6)
    with pytest.raises(UserError, match=r"train.min_lr=0.0001 must be <= train.lr=1e-05"):
        apply_overrides(Config(), ["--train.lr=1e-5"])


def test_assigned_values_of_the_wrong_type_are_refused():
    cfg = Config()
    cfg.train.max_steps = 2.5
    with pytest.raises(UserError, match=r"train.max_steps=2.5 is not a valid int"):
        cfg.validate()


def test_a_config_file_out_of_range_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"train": {"lr": -1}}')
    with pytest.raises(UserError, match=r"config.json: train.lr=-1.0 must be > 0"):
        load_config(tmp_path / "config.json")
