"""The `scratchlm` command: one verb per pipeline stage.

    scratchlm tokenizer train|encode|decode|compare|export ...
    scratchlm data prepare ...
    scratchlm demo

Settings: a verb that builds something from a config takes `--preset NAME` and
`--section.key=value` overrides of the sections it reads (`VERB_SECTIONS`), and writes the resolved
configuration as JSON beside what it makes; `sample` and `chat` take only `--sample.key=value` on
top of the checkpoint's own settings; every other verb takes none. A verb refuses a setting it would
ignore, and its `--help` says which it takes. A verb never replaces what it did
not create in this run unless `--overwrite` says so (`scratchlm.rundir`). A `UserError` or a
filesystem error (`OSError`: a full disk, a read-only folder) prints one line and exits with status
2, never a traceback; a training run stopped by SIGTERM or Ctrl-C saves a checkpoint and exits
with 143 or 130.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from scratchlm.config import PRESETS, SECTIONS, Config, ModelConfig, apply_overrides, get_preset
from scratchlm.errors import Interrupted, UserError
from scratchlm.rundir import check_output_path, claim_run_dir

# The config sections each verb reads: it takes --preset NAME and overrides of these sections. A verb
# not listed takes no settings. sample and chat read the checkpoint's settings (no --preset), with
# --sample.* overrides on top. pretrain and sft keep the sample section as the checkpoint's sampling
# defaults; sft and classify take the model from their base checkpoint.
VERB_SECTIONS: dict[str, tuple[str, ...]] = {
    "tokenizer train": ("tokenizer",),
    "tokenizer compare": ("tokenizer",),
    "data prepare": ("data",),
    "pretrain": ("tokenizer", "data", "model", "train", "sample"),
    "sft": ("train", "sample", "sft"),
    "classify": ("train", "sft"),  # classify train; classify predict reads its checkpoint's config
    "experiment norms": ("tokenizer", "data", "model", "train"),
    "demo": ("tokenizer", "data", "model", "train", "sample", "sft"),
    "sample": ("sample",),
    "chat": ("sample",),
}
FROM_CHECKPOINT = ("sample", "chat")
ADAPTERS_HELP = ("LoRA adapters to apply: an sft run's adapters.safetensors (or the run folder); --ckpt is then "
                 "the base they were trained from")


def settings_help(verb: str, default_preset: str | None = None) -> str:
    """What `verb` takes, for its --help and for the error that refuses anything else."""
    sections = VERB_SECTIONS.get(verb, ())
    if not sections:
        return f"{verb} takes no settings: no --preset, no --section.key=value overrides"
    overrides = (f"--{sections[0]}.KEY=VALUE overrides" if len(sections) == 1 else
                 f"--SECTION.KEY=VALUE overrides of the sections {', '.join(sections)}")
    if verb in FROM_CHECKPOINT:
        return f"{verb} takes {overrides} on top of the checkpoint's settings, and no --preset"
    default = f" (default {default_preset})" if default_preset else ""
    predict = " (classify predict takes none)" if verb == "classify" else ""
    return (f"{verb} takes --preset NAME{default}, then {overrides}{predict}; each key's allowed values are "
            "declared in scratchlm/config.py")


def check_settings(args: argparse.Namespace, overrides: list[str]) -> None:
    """Refuse a --preset or an override the verb would ignore, saying what it takes; fill in the
    verb's default preset."""
    verb = args.settings_verb
    if verb == "classify" and args.action == "predict":
        verb = "classify predict"  # reads the classifier's own config: no settings
    sections = VERB_SECTIONS.get(verb, ())
    takes_preset = bool(sections) and verb not in FROM_CHECKPOINT
    if args.preset is not None and not takes_preset:
        raise UserError(f"{verb}: --preset {args.preset} is not accepted", fix=settings_help(verb))
    for item in overrides:
        section = item.lstrip("-").split(".", 1)[0]
        # An unknown section, in a verb that reads some, is left to apply_overrides, which suggests one.
        if not sections or (section in SECTIONS and section not in sections):
            raise UserError(f"{verb}: {item.split('=', 1)[0]} is not a setting this verb reads",
                            fix=settings_help(verb))
    if takes_preset and args.preset is None:
        args.preset = args.default_preset


def _config(args: argparse.Namespace, overrides: list[str]) -> Config:
    cfg = get_preset(args.preset)
    return apply_overrides(cfg, overrides)


# ----------------------------------------------------------------------------------------------
# tokenizer


def cmd_tokenizer_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.data.sources import read_corpus_text
    from scratchlm.tokenizer import train_tokenizer

    cfg = _config(args, overrides)
    out = Path(args.out)
    settings = out.with_name(out.stem + ".config.json")
    for path in (out, settings):
        check_output_path(path, overwrite=args.overwrite, inputs=args.inputs)
    texts = read_corpus_text(args.inputs, cfg.tokenizer.jsonl_field, cfg.tokenizer.max_chars)
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, cfg.tokenizer, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    tok.save(out)
    cfg.save(settings)
    chars = sum(map(len, texts))
    print(f"trained {tok.kind} tokenizer: vocab {tok.vocab_size} on {chars:,} characters in {seconds:.2f}s -> {out}")


def cmd_tokenizer_encode(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.data.sources import read_text_file
    from scratchlm.tokenizer import SpecialTokenError, load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = read_text_file(args.file) if args.file else args.text
    if text is None:
        raise UserError("nothing to encode", fix="pass TEXT or --file PATH")
    allowed = "all" if args.specials == "allow" else ()
    disallowed = "all" if args.specials == "raise" else ()
    try:
        ids = tok.encode(text, allowed_special=allowed, disallowed_special=disallowed)
    except SpecialTokenError as e:
        token = str(e).split("'")[1]
        raise UserError(f"the text contains the special token {token!r}",
                        fix="pass --specials allow to encode it as a special, or --specials text") from None
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.show:
        print(" | ".join(tok.id_to_piece(i) for i in ids))
    print(" ".join(map(str, ids)))


def cmd_tokenizer_decode(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    words = " ".join(args.ids).replace(",", " ").split()
    not_ints = [w for w in words if not w.lstrip("-").isdigit()]
    if not_ints:
        raise UserError(f"id {not_ints[0]!r} is not an integer", fix="pass ids separated by spaces or commas")
    ids = [int(x) for x in words]
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise UserError(f"id {bad[0]} is outside this tokenizer's vocabulary (0..{tok.vocab_size - 1})")
    print(tok.decode(ids))


def cmd_tokenizer_export(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.tokenizer import BPETokenizer, load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    if not isinstance(tok, BPETokenizer):
        raise UserError(f"{args.tokenizer}: export is for BPE tokenizers; this one is {tok.kind!r}")
    if args.format == "hf":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            check_output_path(Path(args.out) / name, overwrite=args.overwrite, inputs=[args.tokenizer])
        tok.save_hf(args.out)
        print(f"wrote {Path(args.out) / 'tokenizer.json'} (load with transformers.AutoTokenizer)")
    else:
        check_output_path(args.out, overwrite=args.overwrite, inputs=[args.tokenizer])
        tok.save_tiktoken(args.out)
        print(f"wrote {args.out} (tiktoken rank file; pattern: {tok.pattern!r})")


def cmd_tokenizer_compare(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.experiments.tokenizers import compare, format_table, plot

    cfg = _config(args, overrides)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds:
        raise UserError("--kinds: no tokenizer kinds given", fix="e.g. --kinds byte,char,bpe,wordpiece,unigram")
    if args.plot:  # before the minutes of training, not after
        check_output_path(args.plot, overwrite=args.overwrite, inputs=args.inputs)
    rows = compare(args.inputs, cfg, kinds=kinds, sentence=args.sentence, progress=not args.quiet)
    print(format_table(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


# ----------------------------------------------------------------------------------------------
# data


def cmd_data_prepare(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.data.prepare import prepare
    from scratchlm.tokenizer import load_tokenizer

    cfg = _config(args, overrides)
    check_output_path(args.out, overwrite=args.overwrite, inputs=[*args.inputs, args.tokenizer], folder=True)
    tok = load_tokenizer(args.tokenizer)
    manifest = prepare(args.inputs, tok, cfg, Path(args.out), progress=not args.quiet)
    print(json.dumps({k: manifest[k] for k in ("tokens", "documents", "filtered")}, indent=2))


# ----------------------------------------------------------------------------------------------
# model: pretrain, sample, look inside


def cmd_pretrain(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.train.pretrain import pretrain

    if args.resume:
        # Continue with the run's own settings; overrides (e.g. more steps) still apply on top.
        from scratchlm.config import load_config

        run_dir = Path(args.out or get_preset(args.preset).out_dir)
        run_cfg = load_config(run_dir / "config.json")
        cfg = apply_overrides(copy.deepcopy(run_cfg), overrides)
        changed = [f.name for f in dataclasses.fields(ModelConfig)
                   if getattr(cfg.model, f.name) != getattr(run_cfg.model, f.name)]
        if changed:  # pretrain() rebuilds the checkpoint's model: a model override would be ignored
            name = changed[0]
            raise UserError(f"pretrain --resume: --model.{name}={getattr(cfg.model, name)} cannot change the model, "
                            f"which comes from the checkpoint (model.{name}={getattr(run_cfg.model, name)})",
                            fix="drop the --model.* override, or start a new run with another --out")
    else:
        cfg = _config(args, overrides)
    if args.out:
        cfg.out_dir = args.out
    with claim_run_dir(cfg.out_dir, resume=args.resume, overwrite=args.overwrite,
                       inputs=[*args.inputs, *([args.data] if args.data else [])]):
        pretrain(cfg, data_dir=Path(args.data) if args.data else None, inputs=args.inputs,
                 resume=args.resume, progress=not args.quiet)


def cmd_sft(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.sft.train import sft

    if args.resume:
        # Continue with the run's own settings, as pretrain --resume does; overrides still apply on top.
        from scratchlm.config import load_config

        run_dir = Path(args.out or get_preset(args.preset).out_dir)
        if not (run_dir / "config.json").is_file():
            raise UserError(f"sft --resume: {run_dir} holds no run to resume (no config.json)",
                            fix="pass the run's folder as --out, or start it without --resume")
        cfg = apply_overrides(load_config(run_dir / "config.json"), overrides)
    else:
        cfg = _config(args, overrides)
    if args.base:
        cfg.sft.base = args.base
    if args.inputs:
        cfg.sft.data = args.inputs
    if args.out:
        cfg.out_dir = args.out
    with claim_run_dir(cfg.out_dir, resume=args.resume, overwrite=args.overwrite,
                       inputs=[x for x in (cfg.sft.base, *cfg.sft.data) if x]):
        sft(cfg, progress=not args.quiet, resume=args.resume)


def cmd_classify(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.sft.classify import classify_cli

    classify_cli(args.action, args.data, base=args.base, ckpt=args.ckpt, out=args.out, text=args.text,
                 preset=args.preset, overrides=overrides, progress=not args.quiet, overwrite=args.overwrite)


def cmd_chat(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.infer.chat import chat_cli

    chat_cli(args.ckpt, overrides, device=args.device, system=args.system, adapters=args.adapters)


def cmd_sample(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.infer.text import sample_cli

    sample_cli(args.ckpt, args.prompt, overrides, device=args.device, adapters=args.adapters)


def cmd_viz_attention(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.viz.attention import attention_cli

    check_output_path(args.out, overwrite=args.overwrite, inputs=[args.ckpt])
    attention_cli(args.ckpt, args.prompt, Path(args.out), layer=args.layer)


def cmd_viz_routing(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.viz.routing import routing_cli

    check_output_path(args.out, overwrite=args.overwrite, inputs=[args.run])
    routing_cli(Path(args.run), Path(args.out))


def cmd_convert(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.convert.hf import convert_cli

    check_output_path(args.dst, overwrite=args.overwrite, inputs=[args.src, *filter(None, [args.adapters])],
                      folder=True)
    convert_cli(args.src, args.dst, src_format=args.from_, dst_format=args.to, tokenizer=args.tokenizer,
                adapters=args.adapters)


def cmd_merge(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.checkpoint import merge_adapters

    check_output_path(args.out, overwrite=args.overwrite, inputs=[args.base, args.adapters], folder=True)
    merge_adapters(args.base, args.adapters, args.out)


def cmd_experiment_norms(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.experiments.norms import norms_experiment

    cfg = _config(args, overrides)
    with claim_run_dir(args.out, overwrite=args.overwrite, inputs=args.inputs):
        norms_experiment(cfg, Path(args.out), inputs=args.inputs, progress=not args.quiet)


def cmd_env(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.env import env_cli
    from scratchlm.train.device import pick_threads

    env_cli(remeasure=args.remeasure, threads=pick_threads())


# ----------------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.demo import run_demo

    cfg = _config(args, overrides)
    out = Path(args.out or cfg.out_dir)
    with claim_run_dir(out, overwrite=args.overwrite):
        run_demo(cfg, out, quick=args.quick, moe=args.moe)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scratchlm", description=__doc__.split("\n")[0],
                                epilog="Settings: each verb's --help says which it takes (--preset NAME and "
                                       "--section.key=value overrides, --sample.key=value only, or none).")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def with_common(sp: argparse.ArgumentParser, preset: str = "default") -> argparse.ArgumentParser:
        verb = sp.prog.split(" ", 1)[1]
        takes_preset = verb in VERB_SECTIONS and verb not in FROM_CHECKPOINT
        # --preset is parsed for every verb (default None), so one that takes none refuses it by name.
        sp.add_argument("--preset", help=f"named settings: {', '.join(PRESETS)} (default {preset})"
                        if takes_preset else argparse.SUPPRESS)
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.set_defaults(settings_verb=verb, default_preset=preset)
        sp.epilog = "Settings: " + settings_help(verb, preset if takes_preset else None) + "."
        return sp

    def writes(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (a run folder: its run artefacts only)")
        return sp

    tok = verbs.add_parser("tokenizer", help="train, use, compare and export tokenizers")
    tv = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = writes(with_common(tv.add_parser("train", help="train a tokenizer on files, folders or JSONL")))
    sp.add_argument("inputs", nargs="*", help="text files, folders, .jsonl files (default: embedded corpus)")
    sp.add_argument("--out", default="runs/tokenizer.json", help="where to write the tokenizer")
    sp.set_defaults(fn=cmd_tokenizer_train)
    sp = with_common(tv.add_parser("encode", help="text to ids"))
    sp.add_argument("text", nargs="?")
    sp.add_argument("--tokenizer", required=True, help="a tokenizer file")
    sp.add_argument("--file", help="encode this file instead of TEXT")
    sp.add_argument("--specials", choices=["raise", "allow", "text"], default="raise",
                    help="special tokens in the text: raise an error, encode as specials, or encode as text")
    sp.add_argument("--show", action="store_true", help="also print the tokens")
    sp.set_defaults(fn=cmd_tokenizer_encode)
    sp = with_common(tv.add_parser("decode", help="ids to text"))
    sp.add_argument("ids", nargs="+")
    sp.add_argument("--tokenizer", required=True)
    sp.set_defaults(fn=cmd_tokenizer_decode)
    sp = writes(with_common(tv.add_parser("export", help="write a BPE as HF tokenizer.json or a tiktoken rank file")))
    sp.add_argument("--tokenizer", required=True)
    sp.add_argument("--format", choices=["hf", "tiktoken"], default="hf")
    sp.add_argument("--out", required=True, help="a folder (hf) or a file (tiktoken)")
    sp.set_defaults(fn=cmd_tokenizer_export)
    sp = writes(with_common(tv.add_parser("compare", help="vocab, bytes/token, training and encoding speed per kind")))
    sp.add_argument("inputs", nargs="*", help="corpus (default: embedded corpus)")
    sp.add_argument("--kinds", default="byte,char,bpe,wordpiece,unigram")
    sp.add_argument("--sentence", default="The quick brown fox can't jump 32.5 feet, naïvely!")
    sp.add_argument("--plot", help="also write a bar chart PNG here")
    sp.set_defaults(fn=cmd_tokenizer_compare)

    data = verbs.add_parser("data", help="prepare token shards for pretraining")
    dv = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = writes(with_common(dv.add_parser("prepare", help="documents -> filtered, deduplicated token shards")))
    sp.add_argument("inputs", nargs="*", help="text files, folders, .jsonl files (default: embedded corpus)")
    sp.add_argument("--tokenizer", required=True, help="a tokenizer file")
    sp.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    sp.set_defaults(fn=cmd_data_prepare)

    sp = writes(with_common(verbs.add_parser("pretrain", help="train a model with the hand-written loop"), "char-tiny"))
    sp.add_argument("inputs", nargs="*", help="text to train on when --data is not given (default: the preset's)")
    sp.add_argument("--data", help="a folder made by `scratchlm data prepare` (its tokenizer is used)")
    sp.add_argument("--out", help="run folder (default: the preset's out_dir)")
    sp.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    sp.set_defaults(fn=cmd_pretrain)

    sp = writes(with_common(verbs.add_parser("sft", help="supervised fine-tuning (full, LoRA or QLoRA) + gold "
                                                         "evaluation"), "sft-tiny"))
    sp.add_argument("inputs", nargs="*", help="instruction data: alpaca JSON/JSONL, messages JSONL, prompt/completion "
                                              "JSONL (default: the embedded verifiable tasks)")
    sp.add_argument("--base", help="the pretrained run or checkpoint folder to start from")
    sp.add_argument("--out", help="run folder (default: the preset's out_dir)")
    sp.add_argument("--resume", action="store_true")
    sp.set_defaults(fn=cmd_sft)

    sp = writes(with_common(verbs.add_parser("classify", help="classification fine-tuning: a class head on a "
                                                              "pretrained LM"), "sft-tiny"))
    sp.add_argument("action", choices=["train", "predict"])
    sp.add_argument("data", nargs="?", help="train: labelled JSONL or CSV (text, label)")
    sp.add_argument("--base", help="train: the pretrained run or checkpoint")
    sp.add_argument("--ckpt", help="predict: a classifier run folder")
    sp.add_argument("--out", help="train: run folder")
    sp.add_argument("--text", help="predict: the text to classify")
    sp.set_defaults(fn=cmd_classify)

    sp = with_common(verbs.add_parser("chat", help="interactive chat with a fine-tuned checkpoint"))
    sp.add_argument("--ckpt", required=True, help="a run folder or a checkpoint folder (an SFT model)")
    sp.add_argument("--system", default="", help="a system prompt")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--adapters", help=ADAPTERS_HELP)
    sp.set_defaults(fn=cmd_chat)

    sp = with_common(verbs.add_parser("sample", help="generate text from a checkpoint"))
    sp.add_argument("--ckpt", required=True, help="a run folder or a checkpoint folder")
    sp.add_argument("--prompt", default="", help="text to continue (default: start from the EOS token)")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--adapters", help=ADAPTERS_HELP)
    sp.set_defaults(fn=cmd_sample)

    viz = verbs.add_parser("viz", help="pictures of a model's insides")
    vv = viz.add_subparsers(dest="action", required=True, metavar="WHAT")
    sp = writes(with_common(vv.add_parser("attention", help="attention-weight heatmaps, one panel per head")))
    sp.add_argument("--ckpt", required=True)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--out", default="attention.png")
    sp.add_argument("--layer", type=int, default=-1, help="which layer (default: all, one row each)")
    sp.set_defaults(fn=cmd_viz_attention)

    sp = writes(with_common(vv.add_parser("routing", help="MoE expert load per layer and expert over training")))
    sp.add_argument("--run", required=True, help="a run folder of an MoE model (its metrics.jsonl)")
    sp.add_argument("--out", default="routing.png")
    sp.set_defaults(fn=cmd_viz_routing)

    sp = writes(with_common(verbs.add_parser("convert", help="HF transformers checkpoints <-> scratchlm checkpoints")))
    sp.add_argument("src", help="an HF model folder (config.json + weights) or a scratchlm run/checkpoint")
    sp.add_argument("dst", help="the folder to write")
    sp.add_argument("--from", dest="from_", choices=["hf", "scratchlm"], required=True)
    sp.add_argument("--to", choices=["hf", "scratchlm"], required=True)
    sp.add_argument("--tokenizer", help="with --from hf: a scratchlm tokenizer file to bundle (default: byte-level "
                                        "GPT-2 files in the HF folder, if present)")
    sp.add_argument("--adapters", help="with --from scratchlm: " + ADAPTERS_HELP + " (exported merged)")
    sp.set_defaults(fn=cmd_convert)

    sp = writes(with_common(verbs.add_parser("merge", help="a base checkpoint + LoRA adapters -> one plain "
                                                           "checkpoint")))
    sp.add_argument("--base", required=True, help="the base run or checkpoint the adapters were trained from")
    sp.add_argument("--adapters", required=True, help="an sft run's adapters.safetensors (or the run folder)")
    sp.add_argument("--out", required=True, help="the checkpoint folder to write")
    sp.set_defaults(fn=cmd_merge)

    exp = verbs.add_parser("experiment", help="small controlled experiments that draw a picture")
    ev = exp.add_subparsers(dest="action", required=True, metavar="WHICH")
    sp = writes(with_common(ev.add_parser("norms", help="LayerNorm vs RMSNorm: loss and per-layer gradient norms"),
                            "tiny"))
    sp.add_argument("inputs", nargs="*", help="text to train on (default: the embedded corpus)")
    sp.add_argument("--out", default="runs/norms", help="folder for the PNG and the two runs' metrics")
    sp.set_defaults(fn=cmd_experiment_norms)

    sp = with_common(verbs.add_parser("env", help="device, torch build, precisions, measured matmul peaks"))
    sp.add_argument("--remeasure", action="store_true",
                    help="measure the matmul peaks again, and forget the fp32/bf16 timings behind precision=auto")
    sp.set_defaults(fn=cmd_env)

    sp = writes(with_common(verbs.add_parser("demo", help="the whole pipeline at tiny scale, ending in a report"),
                            "tiny"))
    sp.add_argument("--out", help="output folder (default: the preset's out_dir)")
    sp.add_argument("--quick", action="store_true", help="smallest settings, for tests")
    sp.add_argument("--moe", action="store_true", help="pretrain the mixture-of-experts variant (moe-tiny sizes)")
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads spin on their core by default: with another process on one of two cores,
    # two spinning threads made training ~18x slower; sleeping costs little when the cores are free.
    # libgomp reads this once, when torch loads, so it is set before any verb imports torch (a
    # user's own setting wins). The thread count itself is chosen in scratchlm/train/device.py.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [r for r in rest if r.startswith("--") and "." in r.split("=", 1)[0]]
    unknown = [r for r in rest if r not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (settings are --section.key=value)")
    try:
        check_settings(args, overrides)
        args.fn(args, overrides)
    except UserError as e:
        print(f"scratchlm: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"scratchlm: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a full disk, a read-only folder, a path that changed under us
        where = "".join(f"{f}: " for f in (e.filename, e.filename2) if f)
        print(f"scratchlm: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scratchlm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
