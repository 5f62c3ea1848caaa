"""Settings through the command line: every verb honours --preset and overrides or refuses them by
name, its --help says which; out-of-range settings fail before any work with one line naming
`section.key=value` and what is allowed; a resume cannot change the model it resumes."""

from __future__ import annotations

import argparse

import pytest

from scratchlm.cli import VERB_SECTIONS, build_parser, main

TINY_TRAIN = ["--train.batch_size=2", "--train.max_steps=2", "--train.eval_interval=2", "--train.eval_iters=1",
              "--train.warmup_steps=1", "--train.precision=fp32", "--train.device=cpu", "--train.tensorboard=false",
              "--quiet"]
TINY = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=16", "--model.block_size=16", "--data.workers=1",
        *TINY_TRAIN]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one `scratchlm: error:` line, no traceback."""
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("scratchlm: error:"), (code, out, err)
    return lines[0]


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A 2-step char-level run on text without digits (so the embedded SFT tasks cannot be encoded)."""
    root = tmp_path_factory.mktemp("charrun")
    corpus = root / "c.txt"
    corpus.write_text("the cat sat on the mat and the dog ran off.\n" * 40)
    assert main(["pretrain", str(corpus), "--preset", "char-tiny", "--out", str(root / "run"), *TINY]) == 0
    return root / "run"


# ----------------------------------------------------------------------------------------------
# item 13: every setting is validated once, before any work

BAD_PRETRAIN = [
    ("--train.grad_accum=0", "train.grad_accum=0 must be >= 1"),
    ("--train.max_steps=0", "train.max_steps=0 must be >= 1"),
    ("--train.max_steps=-3", "train.max_steps=-3 must be >= 1"),
    ("--train.eval_interval=0", "train.eval_interval=0 must be >= 1"),
    ("--train.eval_iters=0", "train.eval_iters=0 must be >= 1"),
    ("--train.log_interval=0", "train.log_interval=0 must be >= 1"),
    ("--train.batch_size=0", "train.batch_size=0 must be >= 1"),
    ("--train.lr=-1", "train.lr=-1.0 must be > 0"),
    ("--train.lr=0", "train.lr=0.0 must be > 0"),
    ("--train.lr=nan", "train.lr=nan must be finite and > 0"),
    ("--train.lr=inf", "train.lr=inf must be finite and > 0"),
    ("--train.min_lr=0.5", "train.min_lr=0.5 must be <= train.lr="),
    ("--train.beta2=1", "train.beta2=1.0 must be in [0, 1)"),
    ("--train.weight_decay=-0.1", "train.weight_decay=-0.1 must be >= 0"),
    ("--train.grad_clip=-1", "train.grad_clip=-1.0 must be >= 0"),
    ("--train.warmup_steps=-1", "train.warmup_steps=-1 must be >= 0"),
    ("--train.decay_frac=2", "train.decay_frac=2.0 must be in [0, 1]"),
    ("--train.ckpt_interval=-5", "train.ckpt_interval=-5 must be >= 0 (0 = only at the end)"),
    ("--train.keep_last=-1", "train.keep_last=-1 must be >= 0"),
    ("--train.on_nan=ignore", "train.on_nan='ignore' must be one of stop, skip"),
    ("--train.on_nan=skp", "did you mean skip?"),
    ("--train.schedule=linear", "train.schedule='linear' must be one of cosine, wsd, constant"),
    ("--train.precision=fp8", "train.precision='fp8' must be one of auto, fp32, bf16, fp16"),
    ("--train.device=gpu", "train.device='gpu' must be auto, cpu, cuda, cuda:N or mps"),
    ("--train.profile_steps=-2", "train.profile_steps=-2 must be >= 0"),
    ("--model.dropout=1.5", "model.dropout=1.5 must be in [0, 1)"),
    ("--model.dropout=1", "model.dropout=1.0 must be in [0, 1)"),
    ("--model.vocab_size=1e10", "model.vocab_size=10000000000 must be in [0, 16777216]"),
    ("--model.block_size=0", "model.block_size=0 must be in [1, 1048576]"),
    ("--model.n_layer=0", "model.n_layer=0 must be >= 1"),
    ("--model.n_head=3", "model.n_embd=16 must be a multiple of model.n_head=3"),
    ("--model.arch=transformer", "model.arch='transformer' must be one of gpt, llama, moe, bigram, mlp"),
    ("--model.pos_emb=rope", "model.pos_emb='rope' must be one of learned, sinusoidal"),
    ("--model.arch=llama --model.norm_eps=0", "model.norm_eps=0.0 must be > 0"),
    ("--model.arch=llama --model.rope.scaling=dynamic",
     "model.rope.scaling='dynamic' must be one of none, linear, ntk, yarn"),
    ("--model.arch=llama --model.rope.factor=0.5", "model.rope.factor=0.5 must be >= 1"),
    ("--model.sliding_window=-1", "model.sliding_window=-1 must be >= 0"),
    ("--model.aux_loss_coef=-1 --model.arch=moe", "model.aux_loss_coef=-1.0 must be >= 0"),
    ("--model.arch=moe --model.capacity_factor=0", "model.capacity_factor=0.0 must be > 0"),
    # (later families are listed after these)
    ("--model.qk_norm=true", "model.qk_norm is not a setting of model.arch=gpt: only arch=llama, moe"),
    ("--model.rope_scaling=yarn", "model.rope_scaling is now model.rope.scaling"),
    ("--tokenizer.kind=sentencepiece", "tokenizer.kind='sentencepiece' must be one of bpe, wordpiece"),
    ("--tokenizer.vocab_size=0", "tokenizer.vocab_size=0 must be in [1, 16777216]"),
    ("--tokenizer.pattern=(", "tokenizer.pattern='(' must be gpt2, gpt4 or a regular expression"),
    ("--tokenizer.special_tokens=<|a|>,<|a|>", "must be a list of distinct non-empty strings"),
    ("--data.val_fraction=1", "data.val_fraction=1.0 must be in [0, 1)"),
    ("--data.workers=-1", "data.workers=-1 must be >= 0"),
    ("--data.seed=-1", "data.seed=-1 must be in [0, 4294967295]"),
    ("--data.max_repeated_line_ratio=1.5", "data.max_repeated_line_ratio=1.5 must be in [0, 1]"),
    ("--sample.top_p=0", "sample.top_p=0.0 must be in (0, 1]"),
    ("--sample.temperature=-1", "sample.temperature=-1.0 must be >= 0"),
]


@pytest.mark.parametrize("override, fragment", BAD_PRETRAIN, ids=[o for o, _ in BAD_PRETRAIN])
def test_bad_pretrain_setting_fails_before_any_work(capsys, tmp_path, override, fragment):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text to train on\n" * 20)
    line = one_line_error(capsys, ["pretrain", str(corpus), "--out", str(tmp_path / "run"), *TINY, *override.split()])
    assert fragment in line, line
    assert not (tmp_path / "run").exists()  # refused before any data, model or folder was made


def test_moe_and_llama_relations(capsys, tmp_path):
    out = ["--out", str(tmp_path / "run")]
    line = one_line_error(capsys, ["pretrain", "--preset", "llama-tiny", *out, "--model.n_kv_head=3"])
    assert "model.n_kv_head=3 must divide model.n_head=4" in line
    line = one_line_error(capsys, ["pretrain", "--preset", "moe-tiny", *out, "--model.n_active_experts=9"])
    assert "model.n_active_experts=9 must be <= model.n_experts=8" in line
    line = one_line_error(capsys, ["pretrain", "--preset", "tiny", *out, "--tokenizer.vocab_size=100"])
    assert "tokenizer.vocab_size=100 must be >= 262 for kind=bpe" in line and "--tokenizer.vocab_size=262" in line
    assert not (tmp_path / "run").exists()


BAD_SFT = [
    ("--sft.lora_r=-4", "sft.lora_r=-4 must be >= 0 (0 = full fine-tuning)"),
    ("--sft.quant_bits=4", "sft.quant_bits=4 needs LoRA"),
    ("--sft.quant_bits=3", "sft.quant_bits=3 must be one of 0, 4, 8"),
    ("--sft.val_fraction=0", "sft.val_fraction=0.0 must be in (0, 1)"),
    ("--sft.val_fraction=1.5", "sft.val_fraction=1.5 must be in (0, 1)"),
    ("--sft.lora_alpha=0", "sft.lora_alpha=0.0 must be > 0"),
    ("--sft.lora_dropout=1", "sft.lora_dropout=1.0 must be in [0, 1)"),
    ("--sft.format=csv", "sft.format='csv' must be one of auto, alpaca, messages, prompt_completion"),
    ("--sft.overlong=cut", "sft.overlong='cut' must be one of truncate, drop"),
    ("--sft.curriculum=random", "sft.curriculum='random' must be one of none, length, difficulty"),
    ("--sft.n_tasks=0", "sft.n_tasks=0 must be >= 1"),
    ("--sft.eval_max_new_tokens=0", "sft.eval_max_new_tokens=0 must be >= 1"),
    ("--train.grad_accum=0", "train.grad_accum=0 must be >= 1"),
]


@pytest.mark.parametrize("override, fragment", BAD_SFT, ids=[o for o, _ in BAD_SFT])
def test_bad_sft_setting_fails_before_opening_the_base(capsys, tmp_path, override, fragment):
    # The base does not exist: a settings error must come first, before anything is read.
    line = one_line_error(capsys, ["sft", "--base", str(tmp_path / "nobase"), "--out", str(tmp_path / "sft"),
                                   "--quiet", override])
    assert fragment in line, line
    assert not (tmp_path / "sft").exists()


def test_resume_refuses_a_model_override_but_takes_more_steps(capsys, char_run, tmp_path):
    line = one_line_error(capsys, ["pretrain", "--resume", "--out", str(char_run), "--model.n_layer=8"])
    assert "--model.n_layer=8" in line and "model.n_layer=1" in line and "checkpoint" in line
    # The run's own model settings repeated (as a script that resumes with its first command line does) are fine.
    assert main(["pretrain", "--resume", "--out", str(char_run), "--train.max_steps=3", "--model.n_layer=1",
                 "--quiet"]) == 0
    out, _ = capsys.readouterr()
    assert "done: 1 steps" in out and (char_run / "ckpt" / "latest").read_text().strip() == "step_0000003"


def test_sft_on_a_char_tokenizer_base_names_the_example(capsys, char_run, tmp_path):
    line = one_line_error(capsys, ["sft", "--base", str(char_run), "--out", str(tmp_path / "sft"), *TINY_TRAIN,
                                   "--sft.n_tasks=40"])
    assert "tasks:" in line and "char tokenizer cannot encode" in line and "is not in this character vocabulary" in line


# ----------------------------------------------------------------------------------------------
# item 11: a verb honours presets and overrides or refuses them, and its --help says which


def leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every runnable verb ("tokenizer train", "sample", ...) and its parser."""
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(p: argparse.ArgumentParser) -> None:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out[p.prog.split(" ", 1)[1]] = p
        for a in subs:
            for child in dict.fromkeys(a.choices.values()):
                walk(child)

    walk(build_parser())
    return out


def test_every_listed_verb_exists():
    assert set(VERB_SECTIONS) <= set(leaf_parsers())


@pytest.mark.parametrize("verb", sorted(leaf_parsers()))
def test_help_says_which_settings_the_verb_takes(capsys, verb):
    with pytest.raises(SystemExit) as e:
        main([*verb.split(), "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"Settings: {verb} takes" in text
    sections = VERB_SECTIONS.get(verb, ())
    if not sections:
        assert "takes no settings: no --preset, no --section.key=value overrides" in text
        assert "--preset" not in text.split("Settings:")[0]  # not offered among the options
    elif verb in ("sample", "chat"):
        assert "--sample.KEY=VALUE overrides on top of the checkpoint's settings, and no --preset" in text
    else:
        assert "--preset NAME" in text and all(s in text.split("Settings:")[1] for s in sections)


def test_help_lists_the_keys_of_each_model_family(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model.arch=NAME picks the model family" in text and "every family takes vocab_size" in text
    assert "gpt: n_layer" in text and "pos_emb" in text and "rope.scaling" in text
    assert "moe: llama's + n_experts" in text and "bigram: nothing more" in text and "mlp: n_embd, mlp_context" in text


NO_SETTINGS = [
    ["viz", "attention", "--ckpt", "x", "--prompt", "a"],
    ["viz", "routing", "--run", "x"],
    ["convert", "a", "b", "--from", "hf", "--to", "scratchlm"],
    ["env"],
    ["tokenizer", "encode", "--tokenizer", "t.json", "hi"],
    ["tokenizer", "decode", "--tokenizer", "t.json", "1"],
    ["tokenizer", "export", "--tokenizer", "t.json", "--out", "o"],
    ["classify", "predict", "--ckpt", "x", "--text", "hi"],
]


@pytest.mark.parametrize("argv", NO_SETTINGS, ids=[" ".join(a[:2]) for a in NO_SETTINGS])
@pytest.mark.parametrize("extra", [["--model.n_layer=3"], ["--modle.n_layer=3"], ["--preset", "tiny"]],
                         ids=["override", "misspelt-override", "preset"])
def test_a_verb_without_settings_refuses_them(capsys, tmp_path, monkeypatch, argv, extra):
    monkeypatch.chdir(tmp_path)  # nothing named in argv exists: the refusal comes before any file is read
    line = one_line_error(capsys, [*argv, *extra])
    verb = "classify predict" if argv[0] == "classify" else " ".join(argv[:2]) if argv[0] in (
        "viz", "tokenizer") else argv[0]
    assert f"{verb}: {extra[0].split('=')[0]}" in line and "takes no settings" in line
    assert list(tmp_path.iterdir()) == []


def test_sample_and_chat_refuse_a_preset_and_other_sections(capsys, tmp_path):
    line = one_line_error(capsys, ["sample", "--ckpt", str(tmp_path), "--preset", "nonexistent-preset"])
    assert "sample: --preset nonexistent-preset is not accepted" in line and "--sample.KEY=VALUE" in line
    line = one_line_error(capsys, ["chat", "--ckpt", str(tmp_path), "--train.lr=1"])
    assert "chat: --train.lr is not a setting this verb reads" in line


@pytest.mark.parametrize("argv, override", [
    (["data", "prepare", "--tokenizer", "t.json", "--out", "d"], "--train.lr=1"),
    (["tokenizer", "train", "--out", "t.json"], "--model.n_layer=2"),
    (["tokenizer", "compare"], "--data.seed=3"),
    (["sft", "--base", "b"], "--model.n_layer=2"),  # the model is the base's
    (["classify", "train", "d.jsonl", "--base", "b"], "--sample.top_k=3"),
    (["experiment", "norms"], "--sft.lora_r=4"),
], ids=["data-prepare", "tokenizer-train", "tokenizer-compare", "sft", "classify", "experiment"])
def test_a_verb_refuses_sections_it_does_not_read(capsys, tmp_path, monkeypatch, argv, override):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, [*argv, override])
    assert f"{override.split('=')[0]} is not a setting this verb reads" in line and "--preset NAME" in line
    assert list(tmp_path.iterdir()) == []


def test_misspelt_section_in_a_config_verb_suggests(capsys, tmp_path):
    line = one_line_error(capsys, ["pretrain", "--out", str(tmp_path / "r"), "--trian.lr=1"])
    assert "did you mean train?" in line
