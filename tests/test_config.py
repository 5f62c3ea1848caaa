"""Config: presets, typed overrides, close-match suggestions, JSON round trip."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from scratchlm.config import (
    MODEL_FAMILIES,
    PRESETS,
    SECTIONS,
    BigramConfig,
    Config,
    DataConfig,
    GPTConfig,
    LlamaConfig,
    MLPConfig,
    ModelConfig,
    MoEConfig,
    Range,
    RopeConfig,
    Rule,
    SampleConfig,
    SFTConfig,
    TokenizerConfig,
    TrainConfig,
    TransformerConfig,
    apply_overrides,
    get_preset,
    load_config,
    migrate_flat_model,
    model_config,
    switch_arch,
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

SECTION_CLASSES = [Config, TokenizerConfig, DataConfig, ModelConfig, TrainConfig, SampleConfig, SFTConfig,
                   TransformerConfig, GPTConfig, LlamaConfig, RopeConfig, MoEConfig, BigramConfig, MLPConfig]


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


# ----------------------------------------------------------------------------------------------
# the model section: one config class per family


@pytest.mark.parametrize("arch, bad, message", [
    ("gpt", dict(block_size=0), r"model.block_size=0 must be in \[1, 1048576\]"),  # the base's field
    ("gpt", dict(n_layer=0), "model.n_layer=0 must be >= 1"),  # the transformer's field
    ("gpt", dict(n_embd=30), "model.n_embd=30 must be a multiple of model.n_head=4"),  # the transformer's rule
    ("gpt", dict(pos_emb="rope"), "model.pos_emb='rope' must be one of learned, sinusoidal"),
    ("llama", dict(n_embd=30), "model.n_embd=30 must be a multiple of model.n_head=4"),  # the parent's rule
    ("llama", dict(norm_eps=0.0), "model.norm_eps=0.0 must be > 0"),
    ("llama", dict(n_kv_head=3), "model.n_kv_head=3 must divide model.n_head=4"),
    ("llama", dict(n_embd=12, n_head=4), "must give an even head dim"),
    ("llama", dict(rope=RopeConfig(factor=0.5)), "model.rope.factor=0.5 must be >= 1"),  # the nested section
    ("moe", dict(rope=RopeConfig(scaling="dyn")), "model.rope.scaling='dyn' must be one of none, linear"),
    ("moe", dict(n_kv_head=3), "model.n_kv_head=3 must divide"),  # Llama's rule, on an MoE
    ("moe", dict(n_active_experts=9), "model.n_active_experts=9 must be <= model.n_experts=8"),
    ("moe", dict(moe_first_dense=4), "model.moe_first_dense=4 must be < model.n_layer=4"),
    ("moe", dict(router="hash"), "model.router='hash' must be one of softmax, sigmoid"),
    ("bigram", dict(vocab_size=-1), "model.vocab_size=-1 must be in"),
    ("mlp", dict(mlp_context=0), "model.mlp_context=0 must be >= 1"),
    ("mlp", dict(pad_vocab_to=0), "model.pad_vocab_to=0 must be >= 1"),
])
def test_each_family_validates_its_fields_and_rules_after_its_parents(arch, bad, message):
    model_config(arch).validate()  # the defaults pass
    with pytest.raises(UserError, match=message):
        model_config(arch, **bad).validate()


def test_families_build_by_name_and_fix_their_arch():
    assert {arch: type(model_config(arch)) for arch in MODEL_FAMILIES} == MODEL_FAMILIES
    assert all(cls().arch == arch for arch, cls in MODEL_FAMILIES.items())
    assert isinstance(MoEConfig(), LlamaConfig) and isinstance(LlamaConfig(), TransformerConfig)
    assert model_config("llama", n_kv_head=2).n_kv_head == 2
    with pytest.raises(UserError, match="model.arch='lama' must be one of gpt, llama, moe, bigram, mlp"):
        model_config("lama")
    cfg = Config()
    cfg.model.arch = "llama"  # assigned, not switched: the GPTConfig holds no Llama settings
    with pytest.raises(UserError, match="model.arch=llama does not match the GPTConfig"):
        cfg.validate()


@pytest.mark.parametrize("arch, key, owners", [
    ("gpt", "qk_norm", "llama, moe"),
    ("gpt", "rope", "llama, moe"),
    ("llama", "n_experts", "moe"),
    ("bigram", "n_layer", "gpt, llama, moe"),
    ("mlp", "dropout", "gpt, llama, moe"),
    ("moe", "pos_emb", "gpt"),
    ("gpt", "mlp_context", "mlp"),
])
def test_a_field_of_another_family_is_refused_naming_the_archs_that_have_it(arch, key, owners):
    # (a regex: the families added later, listed after these, may have the field too)
    message = f"model.{key} is not a setting of model.arch={arch}: only arch={owners}(, [a-z]+)* have it"
    with pytest.raises(UserError, match=message):
        model_config(arch, **{key: 1})
    cfg = apply_overrides(Config(), [f"--model.arch={arch}"])
    with pytest.raises(UserError, match=f"--model.{key}: {message}"):
        apply_overrides(cfg, [f"--model.{key}=1"])


def test_unknown_and_renamed_model_keys_suggest():
    with pytest.raises(UserError, match="unknown key 'model.n_layr' in model .did you mean n_layer"):
        apply_overrides(Config(), ["--model.n_layr=2"])
    with pytest.raises(UserError, match="unknown key 'model.rope.thta' in model.rope .did you mean theta"):
        apply_overrides(get_preset("llama-tiny"), ["--model.rope.thta=2"])
    with pytest.raises(UserError, match="model.rope_theta is now model.rope.theta"):
        apply_overrides(get_preset("llama-tiny"), ["--model.rope_theta=2"])
    with pytest.raises(UserError, match="'model.rope' is a section"):
        apply_overrides(get_preset("llama-tiny"), ["--model.rope=2"])


def test_switching_arch_carries_over_the_fields_both_families_have():
    cfg = apply_overrides(get_preset("tiny"), ["--model.bias=false", "--model.n_embd=64", "--model.arch=llama"])
    m = cfg.model
    assert type(m) is LlamaConfig and m.arch == "llama"
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.bias) == (4, 4, 64, 64, False)  # the GPT's, carried over
    assert (m.n_kv_head, m.rope) == (0, RopeConfig())  # the Llama's own: its defaults
    moe = switch_arch(LlamaConfig(n_kv_head=2, rope=RopeConfig(theta=5e5)), "moe")
    assert type(moe) is MoEConfig and (moe.n_kv_head, moe.rope.theta, moe.n_experts) == (2, 5e5, 8)
    back = switch_arch(moe, "gpt")
    assert type(back) is GPTConfig and back.n_layer == moe.n_layer and not hasattr(back, "n_kv_head")
    bigram = switch_arch(GPTConfig(vocab_size=99, block_size=8), "bigram")
    assert dataclasses.asdict(bigram) == {"arch": "bigram", "vocab_size": 99, "pad_vocab_to": 64, "block_size": 8}
    mlp = switch_arch(GPTConfig(n_embd=48), "mlp")
    assert type(mlp) is MLPConfig and mlp.n_embd == 48
    same = LlamaConfig()
    assert switch_arch(same, "llama") is same
    assert switch_arch(moe, "llama").rope is not moe.rope  # copied, not shared


def test_arch_overrides_apply_first_and_nested_keys_set():
    cfg = apply_overrides(Config(), ["--model.n_kv_head=2", "--model.rope.scaling=yarn", "--model.rope.factor=4",
                                     "--model.arch=llama", "--model.qk_norm=true"])
    m = cfg.model
    assert (m.n_kv_head, m.qk_norm, m.rope.scaling, m.rope.factor) == (2, True, "yarn", 4.0)
    cfg = apply_overrides(Config(), ["--model.n_experts=4", "--model.arch=llama", "--model.arch=moe"])
    assert type(cfg.model) is MoEConfig and cfg.model.n_experts == 4  # several: in their order, before the rest
    with pytest.raises(UserError, match="model.arch='transformer' must be one of gpt, llama, moe, bigram, mlp"):
        apply_overrides(Config(), ["--model.arch=transformer"])


def test_nested_sections_round_trip_through_json(tmp_path):
    cfg = apply_overrides(get_preset("moe-tiny"), ["--model.rope.theta=500000", "--model.rope.scaling=ntk"])
    d = cfg.to_dict()
    assert d["model"]["rope"] == {"theta": 5e5, "scaling": "ntk", "factor": 1.0, "original_context": 0}
    assert "rope_theta" not in d["model"] and "pos_emb" not in d["model"]
    cfg.save(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg
    (tmp_path / "config.json").write_text('{"model": {"arch": "llama", "rope": {"theta": 3, "beta": 1}}}')
    with pytest.raises(UserError, match="unknown key 'model.rope.beta' in model.rope"):
        load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"model": {"arch": "gpt", "n_kv_head": 2}}')  # today's layout: strict
    with pytest.raises(UserError, match="model.n_kv_head is not a setting of model.arch=gpt"):
        load_config(tmp_path / "config.json")


def test_the_flat_model_section_of_old_is_migrated():
    old = {"arch": "llama", "n_layer": 2, "n_kv_head": 1, "pos_emb": "sinusoidal", "n_experts": 3, "mlp_hidden": 9,
           "rope_theta": 5e5, "rope_scaling": "linear", "rope_factor": 2.0, "rope_original_context": 0, "spare": 1}
    assert migrate_flat_model(old) == {
        "arch": "llama", "n_layer": 2, "n_kv_head": 1, "spare": 1,  # a name no family has stays, to fail by name
        "rope": {"theta": 5e5, "scaling": "linear", "factor": 2.0, "original_context": 0}}
    gpt = {"arch": "gpt", "n_layer": 2, "qk_norm": True, "rope_theta": 1.0, "mlp_context": 4}
    assert migrate_flat_model(gpt) == {"arch": "gpt", "n_layer": 2}
    today = {"arch": "gpt", "n_kv_head": 1}
    assert migrate_flat_model(today) is today  # no rope_* key: today's layout, checked strictly
    cfg = Config.from_dict({"model": {k: v for k, v in old.items() if k != "spare"}})
    assert cfg.model == LlamaConfig(n_layer=2, n_kv_head=1, rope=RopeConfig(theta=5e5, scaling="linear", factor=2.0))
