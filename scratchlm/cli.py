"""The `scratchlm` command: one verb per pipeline stage.

    scratchlm tokenizer train|encode|decode|compare|export ...
    scratchlm data prepare ...
    scratchlm demo

Every verb takes `--preset NAME` and `--section.key=value` overrides on top of it; the resolved
configuration is written as JSON beside what the verb writes. A `UserError` prints one line and
exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from scratchlm.config import PRESETS, Config, apply_overrides, get_preset
from scratchlm.errors import UserError


def _config(args: argparse.Namespace, overrides: list[str]) -> Config:
    cfg = get_preset(args.preset)
    return apply_overrides(cfg, overrides)


# ----------------------------------------------------------------------------------------------
# tokenizer


def cmd_tokenizer_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.data.sources import read_corpus_text
    from scratchlm.tokenizer import train_tokenizer

    cfg = _config(args, overrides)
    texts = read_corpus_text(args.inputs, cfg.tokenizer.jsonl_field, cfg.tokenizer.max_chars)
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, cfg.tokenizer, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    tok.save(out)
    cfg.save(out.with_name(out.stem + ".config.json"))
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
    try:
        ids = [int(x) for x in " ".join(args.ids).replace(",", " ").split()]
    except ValueError:
        raise UserError("ids must be integers separated by spaces or commas") from None
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
        tok.save_hf(args.out)
        print(f"wrote {Path(args.out) / 'tokenizer.json'} (load with transformers.AutoTokenizer)")
    else:
        tok.save_tiktoken(args.out)
        print(f"wrote {args.out} (tiktoken rank file; pattern: {tok.pattern!r})")


def cmd_tokenizer_compare(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.tokenizer.compare import compare, format_table, plot

    cfg = _config(args, overrides)
    kinds = [k for k in args.kinds.split(",") if k]
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
        cfg = apply_overrides(load_config(run_dir / "config.json"), overrides)
    else:
        cfg = _config(args, overrides)
    if args.out:
        cfg.out_dir = args.out
    pretrain(cfg, data_dir=Path(args.data) if args.data else None, inputs=args.inputs,
             resume=args.resume, progress=not args.quiet)


def cmd_sft(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.sft.train import sft

    cfg = _config(args, overrides)
    if args.base:
        cfg.sft.base = args.base
    if args.inputs:
        cfg.sft.data = args.inputs
    if args.out:
        cfg.out_dir = args.out
    sft(cfg, progress=not args.quiet, resume=args.resume)


def cmd_classify(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.sft.classify import classify_cli

    classify_cli(args.action, args.data, base=args.base, ckpt=args.ckpt, out=args.out, text=args.text,
                 preset=args.preset, overrides=overrides, progress=not args.quiet)


def cmd_chat(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.infer.chat import chat_cli

    chat_cli(args.ckpt, overrides, device=args.device, system=args.system)


def cmd_sample(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.infer.sample import sample_cli

    sample_cli(args.ckpt, args.prompt, overrides, device=args.device)


def cmd_viz_attention(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.viz.attention import attention_cli

    attention_cli(args.ckpt, args.prompt, Path(args.out), layer=args.layer)


def cmd_viz_routing(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.viz.routing import routing_cli

    routing_cli(Path(args.run), Path(args.out))


def cmd_convert(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.convert.hf import convert_cli

    convert_cli(args.src, args.dst, src_format=args.from_, dst_format=args.to, tokenizer=args.tokenizer)


def cmd_experiment_norms(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.experiments.norms import norms_experiment

    cfg = _config(args, overrides)
    norms_experiment(cfg, Path(args.out), inputs=args.inputs, progress=not args.quiet)


def cmd_env(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.env import env_cli

    env_cli(remeasure=args.remeasure)


# ----------------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.demo import run_demo

    cfg = _config(args, overrides)
    run_demo(cfg, Path(args.out) if args.out else None, quick=args.quick, moe=args.moe)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scratchlm", description=__doc__.split("\n")[0],
                                epilog="Settings: --preset NAME, then --section.key=value overrides.")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def with_common(sp: argparse.ArgumentParser, preset: str = "default") -> argparse.ArgumentParser:
        sp.add_argument("--preset", default=preset, help=f"named settings ({', '.join(PRESETS)})")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        return sp

    tok = verbs.add_parser("tokenizer", help="train, use, compare and export tokenizers")
    tv = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = with_common(tv.add_parser("train", help="train a tokenizer on files, folders or JSONL"))
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
    sp = with_common(tv.add_parser("export", help="write a BPE as HF tokenizer.json or a tiktoken rank file"))
    sp.add_argument("--tokenizer", required=True)
    sp.add_argument("--format", choices=["hf", "tiktoken"], default="hf")
    sp.add_argument("--out", required=True, help="a folder (hf) or a file (tiktoken)")
    sp.set_defaults(fn=cmd_tokenizer_export)
    sp = with_common(tv.add_parser("compare", help="vocab, bytes/token, training and encoding speed per kind"))
    sp.add_argument("inputs", nargs="*", help="corpus (default: embedded corpus)")
    sp.add_argument("--kinds", default="byte,char,bpe,wordpiece,unigram")
    sp.add_argument("--sentence", default="The quick brown fox can't jump 32.5 feet, naïvely!")
    sp.add_argument("--plot", help="also write a bar chart PNG here")
    sp.set_defaults(fn=cmd_tokenizer_compare)

    data = verbs.add_parser("data", help="prepare token shards for pretraining")
    dv = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = with_common(dv.add_parser("prepare", help="documents -> filtered, deduplicated token shards"))
    sp.add_argument("inputs", nargs="*", help="text files, folders, .jsonl files (default: embedded corpus)")
    sp.add_argument("--tokenizer", required=True, help="a tokenizer file")
    sp.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    sp.set_defaults(fn=cmd_data_prepare)

    sp = with_common(verbs.add_parser("pretrain", help="train a model with the hand-written loop"), "char-tiny")
    sp.add_argument("inputs", nargs="*", help="text to train on when --data is not given (default: the preset's)")
    sp.add_argument("--data", help="a folder made by `scratchlm data prepare` (its tokenizer is used)")
    sp.add_argument("--out", help="run folder (default: the preset's out_dir)")
    sp.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    sp.set_defaults(fn=cmd_pretrain)

    sp = with_common(verbs.add_parser("sft", help="supervised fine-tuning (full, LoRA or QLoRA) + gold evaluation"),
                     "sft-tiny")
    sp.add_argument("inputs", nargs="*", help="instruction data: alpaca JSON/JSONL, messages JSONL, prompt/completion "
                                              "JSONL (default: the embedded verifiable tasks)")
    sp.add_argument("--base", help="the pretrained run or checkpoint folder to start from")
    sp.add_argument("--out", help="run folder (default: the preset's out_dir)")
    sp.add_argument("--resume", action="store_true")
    sp.set_defaults(fn=cmd_sft)

    sp = with_common(verbs.add_parser("classify", help="classification fine-tuning: a class head on a pretrained LM"),
                     "sft-tiny")
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
    sp.set_defaults(fn=cmd_chat)

    sp = with_common(verbs.add_parser("sample", help="generate text from a checkpoint"))
    sp.add_argument("--ckpt", required=True, help="a run folder or a checkpoint folder")
    sp.add_argument("--prompt", default="", help="text to continue (default: start from the EOS token)")
    sp.add_argument("--device", default="auto")
    sp.set_defaults(fn=cmd_sample)

    viz = verbs.add_parser("viz", help="pictures of a model's insides")
    vv = viz.add_subparsers(dest="action", required=True, metavar="WHAT")
    sp = with_common(vv.add_parser("attention", help="attention-weight heatmaps, one panel per head"))
    sp.add_argument("--ckpt", required=True)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--out", default="attention.png")
    sp.add_argument("--layer", type=int, default=-1, help="which layer (default: all, one row each)")
    sp.set_defaults(fn=cmd_viz_attention)

    sp = with_common(vv.add_parser("routing", help="MoE expert load per layer and expert over training"))
    sp.add_argument("--run", required=True, help="a run folder of an MoE model (its metrics.jsonl)")
    sp.add_argument("--out", default="routing.png")
    sp.set_defaults(fn=cmd_viz_routing)

    sp = with_common(verbs.add_parser("convert", help="HF transformers checkpoints <-> scratchlm checkpoints"))
    sp.add_argument("src", help="an HF model folder (config.json + weights) or a scratchlm run/checkpoint")
    sp.add_argument("dst", help="the folder to write")
    sp.add_argument("--from", dest="from_", choices=["hf", "scratchlm"], required=True)
    sp.add_argument("--to", choices=["hf", "scratchlm"], required=True)
    sp.add_argument("--tokenizer", help="with --from hf: a scratchlm tokenizer file to bundle (default: byte-level "
                                        "GPT-2 files in the HF folder, if present)")
    sp.set_defaults(fn=cmd_convert)

    exp = verbs.add_parser("experiment", help="small controlled experiments that draw a picture")
    ev = exp.add_subparsers(dest="action", required=True, metavar="WHICH")
    sp = with_common(ev.add_parser("norms", help="LayerNorm vs RMSNorm: loss and per-layer gradient norms"), "tiny")
    sp.add_argument("inputs", nargs="*", help="text to train on (default: the embedded corpus)")
    sp.add_argument("--out", default="runs/norms", help="folder for the PNG and the two runs' metrics")
    sp.set_defaults(fn=cmd_experiment_norms)

    sp = with_common(verbs.add_parser("env", help="device, torch build, precisions, measured matmul peaks"))
    sp.add_argument("--remeasure", action="store_true", help="measure the matmul peaks again")
    sp.set_defaults(fn=cmd_env)

    sp = with_common(verbs.add_parser("demo", help="the whole pipeline at tiny scale, ending in a report"), "tiny")
    sp.add_argument("--out", help="output folder (default: the preset's out_dir)")
    sp.add_argument("--quick", action="store_true", help="smallest settings, for tests")
    sp.add_argument("--moe", action="store_true", help="pretrain the mixture-of-experts variant (moe-tiny sizes)")
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [r for r in rest if r.startswith("--") and "." in r.split("=", 1)[0]]
    unknown = [r for r in rest if r not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (settings are --section.key=value)")
    try:
        args.fn(args, overrides)
    except UserError as e:
        print(f"scratchlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scratchlm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
