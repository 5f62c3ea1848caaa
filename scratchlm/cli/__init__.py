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

This package is the CLI layer, the top of the package with `demo.py`: the parser, the settings
check and `main` here, one `cmd_*` per verb in `commands.py`; everything below it takes explicit
arguments and returns results.
"""

from __future__ import annotations

import argparse
import os
import sys

from scratchlm.cli.align import add_parsers as add_align_parsers
from scratchlm.cli.commands import (
    cmd_chat,
    cmd_classify,
    cmd_convert,
    cmd_data_prepare,
    cmd_demo,
    cmd_env,
    cmd_experiment_arch,
    cmd_experiment_norms,
    cmd_experiment_pipeline,
    cmd_merge,
    cmd_pretrain,
    cmd_sample,
    cmd_sft,
    cmd_tokenizer_compare,
    cmd_tokenizer_decode,
    cmd_tokenizer_encode,
    cmd_tokenizer_export,
    cmd_tokenizer_train,
    cmd_viz_attention,
    cmd_viz_cache,
    cmd_viz_diff,
    cmd_viz_nsa,
    cmd_viz_routing,
)
from scratchlm.cli.draft import add_parsers as add_draft_parsers
from scratchlm.cli.eval import add_parsers as add_eval_parsers
from scratchlm.cli.quantize import add_parsers as add_quantize_parsers
from scratchlm.cli.report import add_parsers as add_report_parsers
from scratchlm.cli.rl import add_parsers as add_rl_parsers
from scratchlm.cli.scaling import add_parsers as add_scaling_parsers
from scratchlm.cli.serve import add_parsers as add_serve_parsers
from scratchlm.config import MODEL_FAMILIES, PRESETS, SECTIONS, ModelConfig, family_keys
from scratchlm.errors import Interrupted, UserError

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
    "rm train": ("train", "pref", "rm", "sft"),  # sft: its LoRA settings (lora_r > 0: adapters on the trunk)
    "dpo": ("train", "sample", "pref", "dpo", "sft"),
    "cai": ("train", "sample", "pref", "dpo", "cai", "sft"),
    "rl": ("train", "rl", "sft"),  # sft: its LoRA settings
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
            "declared in scratchlm/config/")


def model_keys_help() -> str:
    """The model keys each family takes (a family built on another lists what it adds), for the --help
    of a verb that reads the model section."""
    parts = []
    for arch, cls in MODEL_FAMILIES.items():
        parent = next((a for a, c in MODEL_FAMILIES.items() if c is cls.__mro__[1]), None)
        inherited = family_keys(MODEL_FAMILIES[parent] if parent else ModelConfig)
        own = ", ".join(k for k in family_keys(cls) if k not in inherited) or "nothing more"
        parts.append(f"{arch}: " + (f"{parent}'s + " if parent else "") + own)
    return (f"--model.arch=NAME picks the model family (switching keeps the keys both have); every family takes "
            f"{', '.join(family_keys(ModelConfig))}, and each its own: " + "; ".join(parts))


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
        model = f"; {model_keys_help()}" if "model" in VERB_SECTIONS.get(verb, ()) else ""
        sp.epilog = "Settings: " + settings_help(verb, preset if takes_preset else None) + model + "."
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
    sp = writes(with_common(dv.add_parser(
        "prepare", help="documents -> filtered, deduplicated token shards",
        description="Sharded runs: run `--part K/N` once per K in 0..N-1 (each writes a part folder), then "
                    "`--merge PART_DIR... --out DIR` with the same settings; the result is what one run writes.")))
    sp.add_argument("inputs", nargs="*", help="text files, folders, .jsonl files (default: embedded corpus)")
    sp.add_argument("--tokenizer", help="a tokenizer file (required, except with --merge, which uses the parts')")
    sp.add_argument("--out", required=True, help="output folder for shards + manifest.json (with --part: the part "
                                                 "folder)")
    sp.add_argument("--part", metavar="K/N", help="process only documents i with i %% N == K, into a part folder")
    sp.add_argument("--merge", nargs="+", metavar="PART_DIR", help="merge the part folders of all N parts into "
                                                                   "prepared data, deduplicating across them")
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

    add_align_parsers(verbs, with_common, writes)
    add_rl_parsers(verbs, with_common, writes)
    add_eval_parsers(verbs, with_common, writes)
    add_draft_parsers(verbs, with_common, writes)
    add_quantize_parsers(verbs, with_common, writes)
    add_report_parsers(verbs, with_common, writes)
    add_serve_parsers(verbs, with_common, writes)
    add_scaling_parsers(verbs, with_common, writes)

    sp = writes(with_common(verbs.add_parser("classify", help="classification fine-tuning: a class head on a "
                                                              "pretrained LM"), "sft-tiny"))
    sp.add_argument("action", choices=["train", "predict"])
    sp.add_argument("data", nargs="?", help="train: labelled JSONL or CSV (text, label)")
    sp.add_argument("--base", help="train: the pretrained run or checkpoint")
    sp.add_argument("--ckpt", help="predict: a classifier run folder")
    sp.add_argument("--out", help="train: run folder")
    sp.add_argument("--text", help="predict: the text to classify")
    sp.set_defaults(fn=cmd_classify)

    def generating(sp: argparse.ArgumentParser, ckpt_help: str) -> argparse.ArgumentParser:
        """The options of a verb that loads a model to generate with (chat, sample)."""
        sp.add_argument("--ckpt", required=True, help=ckpt_help)
        sp.add_argument("--device", default="auto")
        sp.add_argument("--adapters", help=ADAPTERS_HELP)
        sp.add_argument("--draft", help="speculative decoding: a draft head folder (scratchlm train-draft) or a "
                                        "smaller checkpoint with the same tokenizer, or mtp (the model's own "
                                        "multi-token prediction modules); prints the mean accepted length")
        sp.add_argument("--draft-k", type=int, default=4, help="tokens the draft proposes per target forward")
        return sp

    sp = generating(with_common(verbs.add_parser("chat", help="interactive chat with a fine-tuned checkpoint")),
                    "a run folder or a checkpoint folder (an SFT model)")
    sp.add_argument("--system", default="", help="a system prompt")
    sp.set_defaults(fn=cmd_chat)

    sp = generating(with_common(verbs.add_parser("sample", help="generate text from a checkpoint")),
                    "a run folder or a checkpoint folder")
    sp.add_argument("--prompt", default="", help="text to continue (default: start from the EOS token)")
    sp.set_defaults(fn=cmd_sample)

    viz = verbs.add_parser("viz", help="pictures of a model's insides")
    vv = viz.add_subparsers(dest="action", required=True, metavar="WHAT")
    sp = writes(with_common(vv.add_parser("attention", help="attention-weight heatmaps, one panel per head")))
    sp.add_argument("--ckpt", required=True)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--out", default="attention.png")
    sp.add_argument("--layer", type=int, default=-1, help="which layer (default: all, one row each)")
    sp.set_defaults(fn=cmd_viz_attention)

    sp = writes(with_common(vv.add_parser("diff", help="differential attention (arch=diff): a head pair's two "
                                                       "softmax maps and their difference")))
    sp.add_argument("--ckpt", required=True)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--out", default="diff_attention.png")
    sp.add_argument("--layer", type=int, default=-1, help="which layer (default: all, one row each)")
    sp.add_argument("--pair", type=int, default=0, help="which head pair (0 .. n_head/2 - 1)")
    sp.set_defaults(fn=cmd_viz_diff)

    sp = writes(with_common(vv.add_parser("nsa", help="native sparse attention (arch=nsa): the key blocks each "
                                                      "query selected, the window, the branches' gates")))
    sp.add_argument("--ckpt", required=True)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--out", default="nsa.png")
    sp.add_argument("--layer", type=int, default=-1, help="which layer (default: all, one column each)")
    sp.add_argument("--head", type=int, default=0, help="which query head (0 .. n_head - 1); its key/value "
                                                        "group's selection")
    sp.set_defaults(fn=cmd_viz_nsa)

    sp = writes(with_common(vv.add_parser("cache", help="inference cache bytes per token and in total against "
                                                        "context length, for several models")))
    sp.add_argument("--ckpt", action="append", default=[], help="a run or checkpoint (repeat for several; "
                                                                "default: llama-tiny, mla-tiny and jamba-tiny "
                                                                "built untrained)")
    sp.add_argument("--out", default="cache.png")
    sp.add_argument("--max-blocks", type=int, default=10, help="contexts up to this many block_sizes")
    sp.set_defaults(fn=cmd_viz_cache)

    sp = writes(with_common(vv.add_parser("routing", help="MoE expert load per layer and expert over training")))
    sp.add_argument("--run", required=True, help="a run folder of an MoE model (its metrics.jsonl)")
    sp.add_argument("--out", default="routing.png")
    sp.set_defaults(fn=cmd_viz_routing)

    sp = writes(with_common(verbs.add_parser("convert", help="HF transformers checkpoints <-> scratchlm checkpoints; "
                                                             "scratchlm -> GGUF (llama.cpp)")))
    sp.add_argument("src", help="an HF model folder (config.json + weights) or a scratchlm run/checkpoint")
    sp.add_argument("dst", help="the folder to write (with --to gguf: the .gguf file)")
    sp.add_argument("--from", dest="from_", choices=["hf", "scratchlm"], required=True)
    sp.add_argument("--to", choices=["hf", "scratchlm", "gguf"], required=True)
    sp.add_argument("--dtype", choices=["f32", "f16", "q8_0"],
                    help="with --to gguf: the matrices' type (default f32; norms stay f32)")
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
    sp = writes(with_common(ev.add_parser("pipeline", help="1F1B, ZB1P and DualPipe pipeline schedules simulated: "
                                                         "bubbles, activation memory, a timeline PNG")))
    sp.add_argument("--stages", type=int, default=4, help="pipeline stages = devices (P)")
    sp.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step (M)")
    sp.add_argument("--F", type=float, default=1.0, help="time of one stage's forward")
    sp.add_argument("--B", type=float, default=2.0, help="time of one stage's full backward")
    sp.add_argument("--W", type=float, default=1.0, help="the weight-gradient part of B")
    sp.add_argument("--FB", type=float, help="time of a forward and a backward overlapped (default F + B)")
    sp.add_argument("--out", default="runs/pipeline", help="folder for the PNG, the table and its JSON")
    sp.set_defaults(fn=cmd_experiment_pipeline)
    sp = writes(with_common(ev.add_parser(
        "arch", help="the frontier architectures against the Llama baseline: one token budget, matched parameters",
        description="Trains llama-tiny at --seeds seeds and each architecture's preset once, its FFN widths set so "
                    "its non-embedding parameters match the baseline's (MoE ones: also its active parameters), all "
                    "on the same tokens in the same order; draws validation loss against tokens and wall time "
                    "(arch.png) and writes results.json and summary.md with KV-cache bytes/token and decode "
                    "tokens/s. The default: 12 runs of 409,600 tokens, about 14 minutes on one CPU core.")))
    sp.add_argument("--budget", help="training tokens per run, whole steps of 16 x 64 (default 409600; "
                                     "--quick: 1536 of 4 x 32)")
    sp.add_argument("--archs", help="comma-separated, from llama,mla,mtp,diff,nsa,jamba (default all; the llama "
                                    "baseline is always trained)")
    sp.add_argument("--seeds", type=int, help="baseline seeds (default 3)")
    sp.add_argument("--threads", type=int, help="torch threads per run (default 1; 0 = auto)")
    sp.add_argument("--device", help="auto, cpu, cuda, ... (default auto; bf16 on a GPU, fp32 on a CPU)")
    sp.add_argument("--quick", action="store_true", help="a tiny budget for tests (seconds)")
    sp.add_argument("--out", required=True, help="the comparison's folder: data, one run folder per run, results")
    sp.add_argument("--resume", action="store_true", help="finish the comparison in --out: finished runs are kept, "
                                                          "an interrupted one resumes; architectures may be added")
    sp.set_defaults(fn=cmd_experiment_arch)

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


def _leave_process_group() -> None:
    """A run torchrun started leaves its process group cleanly (after a barrier) once the verb is done."""
    if "torch.distributed" in sys.modules:  # nothing to leave when the verb never loaded it
        from scratchlm.train.distributed import shutdown

        shutdown()


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
        _leave_process_group()
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
