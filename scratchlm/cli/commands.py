"""The `scratchlm` verbs: one `cmd_*` function per verb, `(args, overrides) -> None`.

Each is the glue between argparse and the library: it builds the config from --preset and the
overrides, refuses outputs it may not replace (`scratchlm.rundir`), calls the stage's plain
functions, and prints what they return. The library is imported inside each function: `main` sets
the OpenMP wait policy before torch loads, and a verb pays only for the modules it uses.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

from scratchlm.config import Config, apply_overrides, flatten, get_preset
from scratchlm.errors import UserError
from scratchlm.rundir import check_output_path, claim_run_dir


def _config(args: argparse.Namespace, overrides: list[str]) -> Config:
    cfg = get_preset(args.preset)
    return apply_overrides(cfg, overrides)


def run_config(args: argparse.Namespace, overrides: list[str], verb: str) -> Config:
    """--preset + overrides; with --resume, the run's own config.json (as pretrain --resume continues with
    its settings), the overrides still applied on top."""
    if not getattr(args, "resume", False):
        return _config(args, overrides)
    from scratchlm.config import load_config

    run_dir = Path(args.out or get_preset(args.preset).out_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{verb} --resume: {run_dir} holds no run to resume (no config.json)",
                        fix="pass the run's folder as --out, or start it without --resume")
    return apply_overrides(load_config(run_dir / "config.json"), overrides)


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
    from scratchlm.data.parts import merge_parts, parse_part, prepare_part
    from scratchlm.data.prepare import prepare
    from scratchlm.tokenizer import load_tokenizer

    if args.merge and (args.inputs or args.part):
        raise UserError(f"--merge takes part folders only, not {'inputs' if args.inputs else '--part'}: the parts "
                        "recorded their inputs and slices", fix="drop them, or run without --merge")
    part = parse_part(args.part) if args.part else None
    if not args.merge and not args.tokenizer:
        raise UserError("data prepare: --tokenizer is required",
                        fix="pass the file `scratchlm tokenizer train` wrote (only --merge takes the parts' own)")
    cfg = _config(args, overrides)
    tokenizer = [args.tokenizer] if args.tokenizer else []
    check_output_path(args.out, overwrite=args.overwrite, inputs=[*args.inputs, *(args.merge or []), *tokenizer],
                      folder=True)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.merge:
        manifest = merge_parts(args.merge, cfg, Path(args.out), tokenizer=tok, progress=not args.quiet)
    elif part:
        m = prepare_part(args.inputs, tok, cfg, Path(args.out), part, progress=not args.quiet)
        print(json.dumps({k: m[k] for k in ("part", "documents", "tokens")}, indent=2))
        return
    else:
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
        new, old = (flatten(dataclasses.asdict(c.model)) for c in (cfg, run_cfg))  # "rope.theta": ...
        changed = [name for name in {**new, **old} if new.get(name) != old.get(name)]
        if changed:  # pretrain() rebuilds the checkpoint's model: a model override would be ignored
            name = changed[0]
            raise UserError(f"pretrain --resume: --model.{name}={new.get(name)} cannot change the model, "
                            f"which comes from the checkpoint (model.{name}={old.get(name)})",
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

    cfg = run_config(args, overrides, "sft")
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
    from scratchlm.sft.classify import predict, train_classifier

    if args.action == "train":
        cfg = _config(args, overrides)
        if not args.data:
            raise UserError("classify train needs a labelled data file",
                            fix="scratchlm classify train DATA.jsonl --base RUN --out DIR")
        cfg.out_dir = args.out or str(Path(cfg.out_dir).parent / "classify")  # never the preset's sft run folder
        cfg.sft.base = args.base or cfg.sft.base
        cfg.sft.data = [str(args.data)]
        with claim_run_dir(cfg.out_dir, overwrite=args.overwrite, inputs=[x for x in (cfg.sft.base, args.data) if x]):
            train_classifier(cfg, args.data, progress=not args.quiet)
        return
    if not args.ckpt:
        raise UserError("classify predict needs --ckpt", fix="pass the folder `classify train --out` wrote")
    labels, probs = predict(args.ckpt, [args.text or ""])
    p = probs[0]
    order = p.argsort(descending=True).tolist()
    width = max(len(x) for x in labels)
    print(f"label: {labels[order[0]]}")
    for i in order:
        print(f"  {labels[i]:<{width}}  {float(p[i]):.4f}")


def _write(s: str) -> None:
    sys.stdout.write(s)
    sys.stdout.flush()


def cmd_chat(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.checkpoint import load_model_for_inference
    from scratchlm.infer.chat import ChatSession, run_chat
    from scratchlm.infer.sample import check_sample_config
    from scratchlm.train.device import pick_device

    wrong = [o for o in overrides if not o.lstrip("-").startswith("sample.")]
    if wrong:
        raise UserError(f"{wrong[0].split('=')[0]}: chat takes only --sample.KEY=VALUE settings")
    _check_draft_k(args)
    model, tok, cfg = load_model_for_inference(args.ckpt, str(pick_device(args.device, flag="--device")),
                                               adapters=args.adapters)
    sample = apply_overrides(cfg, overrides).sample
    check_sample_config(sample)
    engine = _generator(args, model, tok)
    try:
        run_chat(ChatSession(engine, tok, sample, args.system), sys.stdin, _write)
    except KeyboardInterrupt:
        _write("\n")
    _draft_stats(args, engine)


def _check_draft_k(args: argparse.Namespace) -> None:
    if args.draft is not None and args.draft_k < 1:
        raise UserError(f"--draft-k {args.draft_k} must be >= 1", fix="the draft proposes at least one token")


def _generator(args: argparse.Namespace, model, tok):
    """The Engine, or with --draft the speculative decoder that takes its place (same generate)."""
    from scratchlm.infer.engine import Engine

    if args.draft is None:
        return Engine(model, tok)
    from scratchlm.infer.eagle import load_draft
    from scratchlm.infer.speculative import SpeculativeDecoder

    draft = load_draft(args.draft, model, tok, str(next(model.parameters()).device))
    return SpeculativeDecoder(Engine(model, tok), draft, args.draft_k)


def _draft_stats(args: argparse.Namespace, engine) -> None:
    if args.draft is None:
        return
    st = engine.stats
    print(f"scratchlm: speculative decoding, k={args.draft_k}: {st.produced} tokens from {st.forwards} target "
          f"forwards, mean accepted length {st.mean_accepted:.2f} ({st.accepted}/{st.drafted} drafted tokens "
          "accepted)", file=sys.stderr)


def cmd_sample(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.checkpoint import load_model_for_inference
    from scratchlm.infer.sample import check_sample_config
    from scratchlm.infer.text import encode_prompt, sample_text
    from scratchlm.train.device import pick_device

    wrong = [o for o in overrides if not o.lstrip("-").startswith("sample.")]
    if wrong:
        raise UserError(f"{wrong[0].split('=')[0]}: sample takes only --sample.KEY=VALUE settings",
                        fix="model and training settings come from the checkpoint")
    check_sample_config(apply_overrides(Config(), overrides).sample)  # fail before loading weights
    _check_draft_k(args)
    model, tok, cfg = load_model_for_inference(args.ckpt, str(pick_device(args.device, flag="--device")),
                                               adapters=args.adapters)
    sc = apply_overrides(cfg, overrides).sample
    ids = encode_prompt(tok, args.prompt)
    block = model.config.block_size
    if len(ids) > block:
        print(f"scratchlm: warning: the prompt is {len(ids)} tokens; the model sees only the last {block}",
              file=sys.stderr)
        ids = ids[-block:]
    engine = _generator(args, model, tok)
    sample_text(engine, tok, args.prompt, ids, sc, _write)
    _draft_stats(args, engine)


def cmd_viz_attention(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.viz.attention import draw_attention

    check_output_path(args.out, overwrite=args.overwrite, inputs=[args.ckpt])
    n_prompt, n_shown = draw_attention(args.ckpt, args.prompt, Path(args.out), layer=args.layer)
    if n_shown < n_prompt:
        print(f"scratchlm: warning: the prompt is {n_prompt} tokens; showing its last {n_shown}", file=sys.stderr)
    print(Path(args.out))


def cmd_viz_diff(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.viz.diff_attn import draw_differential

    check_output_path(args.out, overwrite=args.overwrite, inputs=[args.ckpt])
    n_prompt, n_shown = draw_differential(args.ckpt, args.prompt, Path(args.out), layer=args.layer, pair=args.pair)
    if n_shown < n_prompt:
        print(f"scratchlm: warning: the prompt is {n_prompt} tokens; showing its last {n_shown}", file=sys.stderr)
    print(Path(args.out))


def cmd_viz_nsa(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.viz.nsa import draw_nsa

    check_output_path(args.out, overwrite=args.overwrite, inputs=[args.ckpt])
    n_prompt, n_shown = draw_nsa(args.ckpt, args.prompt, Path(args.out), layer=args.layer, head=args.head)
    if n_shown < n_prompt:
        print(f"scratchlm: warning: the prompt is {n_prompt} tokens; showing its last {n_shown}", file=sys.stderr)
    print(Path(args.out))


def cmd_viz_cache(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.viz.cache import draw_cache

    check_output_path(args.out, overwrite=args.overwrite, inputs=args.ckpt)
    for line in draw_cache(args.ckpt, Path(args.out), max_blocks=args.max_blocks):
        print(line)
    print(Path(args.out))


def cmd_viz_routing(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.viz.routing import draw_routing

    check_output_path(args.out, overwrite=args.overwrite, inputs=[args.run])
    draw_routing(Path(args.run), Path(args.out))
    print(Path(args.out))


def cmd_convert(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.convert import convert

    check_output_path(args.dst, overwrite=args.overwrite, inputs=[args.src, *filter(None, [args.adapters])],
                      folder=args.to != "gguf")  # GGUF is one file
    convert(args.src, args.dst, src_format=args.from_, dst_format=args.to, tokenizer=args.tokenizer,
            adapters=args.adapters, dtype=args.dtype)


def cmd_merge(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.checkpoint import merge_adapters

    check_output_path(args.out, overwrite=args.overwrite, inputs=[args.base, args.adapters], folder=True)
    merge_adapters(args.base, args.adapters, args.out)


def cmd_experiment_norms(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.experiments.norms import norms_experiment

    cfg = _config(args, overrides)
    with claim_run_dir(args.out, overwrite=args.overwrite, inputs=args.inputs):
        norms_experiment(cfg, Path(args.out), inputs=args.inputs, progress=not args.quiet)


def cmd_experiment_arch(args: argparse.Namespace, overrides: list[str]) -> None:
    from dataclasses import replace

    from scratchlm.experiments.arch import DEFAULT_SETTINGS, QUICK_SETTINGS, parse_archs, parse_budget, run_arch

    s = QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS
    chosen = {k: getattr(args, k) for k in ("seeds", "threads", "device") if getattr(args, k) is not None}
    if chosen.get("threads", 0) < 0:
        raise UserError(f"--threads {args.threads} is out of range", fix="use a whole number >= 0 (0 = auto)")
    if args.budget is not None:
        chosen["budget"] = parse_budget(args.budget)
    if args.archs is not None:
        chosen["archs"] = parse_archs(args.archs)
    run_arch(args.out, replace(s, **chosen), resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)


def cmd_experiment_pipeline(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.experiments.pipeline import Costs, pipeline_experiment

    costs = Costs(args.F, args.B, args.W, args.FB)
    check_output_path(args.out, overwrite=args.overwrite, folder=True)
    pipeline_experiment(args.stages, args.micro_batches, costs, Path(args.out))


def cmd_env(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.env import env_lines
    from scratchlm.train.device import pick_threads

    for line in env_lines(remeasure=args.remeasure, threads=pick_threads()):
        print(line, flush=True)  # line by line: the peaks may take a second to measure


# ----------------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.demo import run_demo

    cfg = _config(args, overrides)
    out = Path(args.out or cfg.out_dir)
    with claim_run_dir(out, overwrite=args.overwrite):
        run_demo(cfg, out, quick=args.quick, moe=args.moe, progress=not args.quiet)
