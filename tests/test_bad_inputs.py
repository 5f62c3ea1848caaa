"""A catalogue of bad inputs across the verbs: each gives one clear line, exit 2, and loses nothing.

Every case runs `scratchlm.cli.main(argv)` in-process (an exception escaping `main` is what a
user would see as a traceback) and asserts:
- exit status 2 (argparse's own usage errors excluded: they are not these cases);
- stderr is exactly one line, `scratchlm: error: ...`, naming the file, field or setting (the
  case's `names`), and no "Traceback" anywhere in the output;
- no data loss: every file that existed before the call (the shared fixture run, the case's
  own inputs) is still there, byte for byte.

Cases are grouped by kind (missing, empty, binary, malformed, wrong types, corrupt or truncated
safetensors, another architecture's checkpoint, out-of-range settings, unusable output paths)
and each names, in a comment, the area whose code must give the error (H2..H7 are the helpers
fixing issue 10's section 2; "inputs" are the readers of user files nobody else owns).

"Read-only" output folders: the tests run as root, for whom chmod does not stop a write, so
those cases write under /sys (sysfs refuses new entries even to root: EPERM, or EROFS where it
is mounted read-only) and under a path whose parent is a regular file (ENOTDIR for anyone).

One tiny BPE checkpoint (1 layer, 32 dims, 2 steps) is trained once for the session and reused;
cases that damage a checkpoint damage a copy in their own tmp_path.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from scratchlm.cli import main
from scratchlm.config import load_config, switch_arch

TINY_MODEL = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32"]
TINY_TRAIN = ["--train.batch_size=2", "--train.max_steps=2", "--train.eval_interval=2", "--train.eval_iters=1",
              "--train.warmup_steps=1", "--train.precision=fp32", "--train.device=cpu", "--train.tensorboard=false",
              "--train.log_interval=1"]
TINY_PRETRAIN = ["--preset", "tiny", "--quiet", "--tokenizer.vocab_size=300", "--data.workers=1",
                 *TINY_MODEL, *TINY_TRAIN]
TINY_SFT = ["--quiet", *TINY_TRAIN, "--sft.eval_max_new_tokens=2", "--sft.n_tasks=60"]
WORDS = "the cat sat on a mat while a dog ran over the log and a fox jumped high".split()


@dataclass
class World:
    """What the session builds once: a corpus, a tokenizer, a trained run and its checkpoint."""

    root: Path
    corpus: Path  # JSONL, 40 documents
    text: Path  # plain text
    tok: Path
    run: Path
    ckpt: Path  # RUN/ckpt/step_N
    sft_data: Path  # alpaca JSONL, valid
    cls_data: Path  # CSV text,label, valid


def _doc(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(60)) + f" {i}."


@pytest.fixture(scope="session")  # session, not module: a shuffled run (random order) would rebuild it per visit
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(40)))
    text = root / "text.txt"
    text.write_text("\n".join(_doc(i) for i in range(40)) + "\n")
    tok = root / "tok.json"
    assert main(["tokenizer", "train", str(text), "--out", str(tok), "--quiet", "--tokenizer.vocab_size=300"]) == 0
    run = root / "run"
    assert main(["pretrain", str(corpus), "--out", str(run), *TINY_PRETRAIN]) == 0
    ckpt = run / "ckpt" / (run / "ckpt" / "latest").read_text().strip()
    sft_data = root / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"instruction": f"say {w} {i}", "input": "", "output": w}) + "\n"
                                for i, w in enumerate(WORDS * 2)))
    cls_data = root / "cls.csv"
    cls_data.write_text("text,label\n" + "".join(f"{_doc(i)[:40]},{'pos' if i % 2 else 'neg'}\n" for i in range(30)))
    return World(root, corpus, text, tok, run, ckpt, sft_data, cls_data)


# -- the catalogue ----------------------------------------------------------------------------------

Setup = Callable[[World, Path], tuple[list[str], list[str]]]  # (argv, names the error line must contain)
CASES: dict[str, tuple[str, Setup]] = {}


def case(name: str, area: str) -> Callable[[Setup], Setup]:
    def register(fn: Setup) -> Setup:
        assert name not in CASES, name
        CASES[name] = (area, fn)
        return fn
    return register


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _binary(path: Path) -> Path:
    """Random bytes (seeded) that are neither UTF-8 nor JSON."""
    return _write(path, b"\x89PNG\r\n\x1a\n\x00\x00" + random.Random(0).randbytes(2000))


def _ckpt_copy(w: World, tmp: Path) -> Path:
    dst = tmp / "ckpt_copy"
    shutil.copytree(w.ckpt, dst)
    return dst


def _corrupt(w: World, tmp: Path) -> Path:
    ck = _ckpt_copy(w, tmp)
    size = (ck / "model.safetensors").stat().st_size
    _write(ck / "model.safetensors", random.Random(1).randbytes(size))
    return ck


def _truncated(w: World, tmp: Path) -> Path:
    ck = _ckpt_copy(w, tmp)
    data = (ck / "model.safetensors").read_bytes()
    _write(ck / "model.safetensors", data[: len(data) // 2])
    return ck


def _other_arch(w: World, tmp: Path) -> Path:
    """config.json says llama (RMSNorm, RoPE, SwiGLU); the weights are the GPT's."""
    ck = _ckpt_copy(w, tmp)
    cfg = load_config(ck / "config.json")
    cfg.model = switch_arch(cfg.model, "llama")
    _write(ck / "config.json", json.dumps(cfg.to_dict()))
    return ck


def _nan_weights(w: World, tmp: Path) -> Path:
    ck = _ckpt_copy(w, tmp)
    sd = load_file(str(ck / "model.safetensors"))
    name = sorted(sd)[0]
    sd[name][..., 0] = float("nan")
    save_file(sd, str(ck / "model.safetensors"))
    return ck


def _sample(ck: Path, *extra: str) -> list[str]:
    return ["sample", "--ckpt", str(ck), "--prompt", "the cat", "--quiet", "--sample.max_new_tokens=2", *extra]


def _chat(ck: Path, *extra: str) -> list[str]:
    return ["chat", "--ckpt", str(ck), "--quiet", "--sample.max_new_tokens=2", *extra]


def _sft(data: Path | None, base: Path, tmp: Path, *extra: str) -> list[str]:
    return ["sft", *([str(data)] if data else []), "--base", str(base), "--out", str(tmp / "sft"), *TINY_SFT, *extra]


def _classify(data: Path, base: Path, tmp: Path, *extra: str) -> list[str]:
    return ["classify", "train", str(data), "--base", str(base), "--out", str(tmp / "cls"), *TINY_SFT, *extra]


def _pretrain(inputs: Path, tmp: Path, *extra: str) -> list[str]:
    return ["pretrain", str(inputs), "--out", str(tmp / "run"), *TINY_PRETRAIN, *extra]


def _tok_train(inputs: Path, out: Path) -> list[str]:
    return ["tokenizer", "train", str(inputs), "--out", str(out), "--quiet", "--tokenizer.vocab_size=300"]


def _prepare(inputs: Path, w: World, out: Path) -> list[str]:
    return ["data", "prepare", str(inputs), "--tokenizer", str(w.tok), "--out", str(out), "--quiet",
            "--data.workers=1"]


# missing files ------------------------------------------------------------------------------------
case("missing/tokenizer-train", "inputs")(lambda w, t: (_tok_train(t / "gone.txt", t / "tok.json"), ["gone.txt"]))
case("missing/data-prepare", "inputs")(lambda w, t: (_prepare(t / "gone.txt", w, t / "d"), ["gone.txt"]))
case("missing/pretrain", "inputs")(lambda w, t: (_pretrain(t / "gone.txt", t), ["gone.txt"]))
case("missing/sft", "inputs")(lambda w, t: (_sft(t / "gone.jsonl", w.run, t), ["gone.jsonl"]))
case("missing/classify", "inputs")(lambda w, t: (_classify(t / "gone.csv", w.run, t), ["gone.csv"]))
case("missing/encode-file", "inputs")(lambda w, t: (
    ["tokenizer", "encode", "--tokenizer", str(w.tok), "--file", str(t / "gone.txt")], ["gone.txt"]))
case("missing/encode-tokenizer", "inputs")(lambda w, t: (
    ["tokenizer", "encode", "--tokenizer", str(t / "gone.json"), "x"], ["gone.json"]))
case("missing/decode-tokenizer", "inputs")(lambda w, t: (
    ["tokenizer", "decode", "--tokenizer", str(t / "gone.json"), "1"], ["gone.json"]))
case("missing/prepare-tokenizer", "inputs")(lambda w, t: (
    ["data", "prepare", str(w.text), "--tokenizer", str(t / "gone.json"), "--out", str(t / "d")], ["gone.json"]))
case("missing/sample-ckpt", "inputs")(lambda w, t: (_sample(t / "no_run"), ["no_run"]))
case("missing/chat-ckpt", "inputs")(lambda w, t: (_chat(t / "no_run"), ["no_run"]))
case("missing/sft-base", "inputs")(lambda w, t: (_sft(w.sft_data, t / "no_run", t), ["no_run"]))
case("missing/classify-predict", "inputs")(lambda w, t: (
    ["classify", "predict", "--ckpt", str(t / "no_run"), "--text", "hi"], ["no_run"]))
case("missing/convert-from-hf", "inputs")(lambda w, t: (
    ["convert", str(t / "no_hf"), str(t / "out"), "--from", "hf", "--to", "scratchlm"], ["no_hf"]))
case("missing/convert-from-scratchlm", "inputs")(lambda w, t: (
    ["convert", str(t / "no_run"), str(t / "out"), "--from", "scratchlm", "--to", "hf"], ["no_run"]))
case("missing/viz-attention", "inputs")(lambda w, t: (
    ["viz", "attention", "--ckpt", str(t / "no_run"), "--prompt", "hi", "--out", str(t / "a.png")], ["no_run"]))
case("missing/viz-routing", "inputs")(lambda w, t: (
    ["viz", "routing", "--run", str(t / "no_run"), "--out", str(t / "r.png")], ["no_run"]))
case("missing/compare", "inputs")(lambda w, t: (
    ["tokenizer", "compare", str(t / "gone.txt"), "--kinds", "byte", "--quiet"], ["gone.txt"]))
case("missing/experiment-norms", "inputs")(lambda w, t: (
    ["experiment", "norms", str(t / "gone.txt"), "--out", str(t / "norms"), "--quiet"], ["gone.txt"]))
case("missing/pretrain-data-folder", "inputs")(lambda w, t: (
    ["pretrain", "--data", str(t / "no_data"), "--out", str(t / "run"), *TINY_PRETRAIN], ["no_data"]))
case("missing/pretrain-data-manifest", "inputs")(lambda w, t: (
    ["pretrain", "--data", str(_folder(t / "shards")), "--out", str(t / "run"), *TINY_PRETRAIN], ["shards"]))
case("missing/ckpt-tokenizer", "inputs")(lambda w, t: (_sample(_without(w, t, "tokenizer.json")), ["tokenizer.json"]))
case("missing/hf-weights", "inputs")(lambda w, t: (
    ["convert", str(_hf_folder(t, b'{"architectures": ["GPT2LMHeadModel"], "n_layer": 1}')), str(t / "out"),
     "--from", "hf", "--to", "scratchlm"], ["hf"]))
case("missing/classify-predict-not-classifier", "inputs")(lambda w, t: (
    ["classify", "predict", "--ckpt", str(w.run), "--text", "hi"], ["labels"]))
case("missing/viz-routing-not-moe", "inputs")(lambda w, t: (
    ["viz", "routing", "--run", str(w.run), "--out", str(t / "r.png")], ["metrics.jsonl"]))
case("missing/resume", "H4")(lambda w, t: (_pretrain(w.corpus, t, "--resume"), [str(t / "run")]))

case("folder/sft-input", "inputs")(lambda w, t: (_sft(_folder(t / "examples"), w.run, t), ["examples"]))
case("folder/classify-input", "inputs")(lambda w, t: (_classify(_folder(t / "examples"), w.run, t), ["examples"]))
case("folder/tokenizer-file", "inputs")(lambda w, t: (
    ["tokenizer", "encode", "--tokenizer", str(_folder(t / "toks")), "x"], ["toks"]))
case("folder/encode-file", "inputs")(lambda w, t: (
    ["tokenizer", "encode", "--tokenizer", str(w.tok), "--file", str(_folder(t / "texts"))], ["texts"]))
case("file/sample-ckpt", "inputs")(lambda w, t: (_sample(_write(t / "model.bin", "mine\n")), ["model.bin"]))
case("file/pretrain-data", "inputs")(lambda w, t: (
    ["pretrain", "--data", str(w.text), "--out", str(t / "run"), *TINY_PRETRAIN], ["text.txt"]))


def _without(w: World, tmp: Path, name: str) -> Path:
    ck = _ckpt_copy(w, tmp)
    (ck / name).unlink()
    return ck


# empty files --------------------------------------------------------------------------------------
case("empty/tokenizer-train", "inputs")(lambda w, t: (_tok_train(_write(t / "e.txt", ""), t / "tok.json"), ["e.txt"]))
case("empty/tokenizer-train-jsonl", "inputs")(lambda w, t: (
    _tok_train(_write(t / "e.jsonl", "\n\n"), t / "tok.json"), ["e.jsonl"]))
case("empty/data-prepare", "inputs")(lambda w, t: (_prepare(_write(t / "e.txt", " \n"), w, t / "d"), ["e.txt"]))
case("empty/pretrain", "inputs")(lambda w, t: (_pretrain(_write(t / "e.txt", ""), t), ["e.txt"]))
case("empty/sft", "inputs")(lambda w, t: (_sft(_write(t / "e.jsonl", ""), w.run, t), ["e.jsonl"]))
case("empty/sft-list", "inputs")(lambda w, t: (_sft(_write(t / "e.json", "[]"), w.run, t), ["e.json"]))
case("empty/classify", "inputs")(lambda w, t: (_classify(_write(t / "e.csv", ""), w.run, t), ["e.csv"]))
case("empty/classify-header-only", "inputs")(lambda w, t: (
    _classify(_write(t / "h.csv", "text,label\n"), w.run, t), ["h.csv"]))
case("empty/tokenizer-file", "inputs")(lambda w, t: (
    ["tokenizer", "encode", "--tokenizer", str(_write(t / "e.json", "")), "x"], ["e.json"]))

# binary files -------------------------------------------------------------------------------------
case("binary/tokenizer-train", "inputs")(lambda w, t: (_tok_train(_binary(t / "b.txt"), t / "tok.json"), ["b.txt"]))
case("binary/tokenizer-train-jsonl", "inputs")(lambda w, t: (
    _tok_train(_binary(t / "b.jsonl"), t / "tok.json"), ["b.jsonl"]))
case("binary/data-prepare", "inputs")(lambda w, t: (_prepare(_binary(t / "b.txt"), w, t / "d"), ["b.txt"]))
case("binary/pretrain", "inputs")(lambda w, t: (_pretrain(_binary(t / "b.txt"), t), ["b.txt"]))
case("binary/sft-jsonl", "inputs")(lambda w, t: (_sft(_binary(t / "b.jsonl"), w.run, t), ["b.jsonl"]))
case("binary/classify-jsonl", "inputs")(lambda w, t: (_classify(_binary(t / "b.jsonl"), w.run, t), ["b.jsonl"]))
case("binary/classify-csv", "inputs")(lambda w, t: (_classify(_binary(t / "b.csv"), w.run, t), ["b.csv"]))
case("binary/tokenizer-file", "inputs")(lambda w, t: (
    ["tokenizer", "decode", "--tokenizer", str(_binary(t / "b.json")), "1"], ["b.json"]))
case("binary/encode-file", "inputs")(lambda w, t: (
    ["tokenizer", "encode", "--tokenizer", str(w.tok), "--file", str(_binary(t / "b.txt"))], ["b.txt"]))
case("binary/hf-config", "inputs")(lambda w, t: (
    ["convert", str(_hf_folder(t, _binary(t / "config.json").read_bytes())), str(t / "out"), "--from", "hf",
     "--to", "scratchlm"], ["config.json"]))

# malformed JSON / JSONL / CSV ------------------------------------------------------------------
case("malformed/sft-json-list", "inputs")(lambda w, t: (
    _sft(_write(t / "m.json", '[{"instruction": "a", "output": "b"},\n{"instruction": '), w.run, t), ["m.json"]))
case("malformed/sft-jsonl", "inputs")(lambda w, t: (
    _sft(_write(t / "m.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"\n'), w.run, t),
    ["m.jsonl:2"]))
case("malformed/sft-jsonl-not-object", "inputs")(lambda w, t: (
    _sft(_write(t / "m.jsonl", '{"instruction": "a", "output": "b"}\n"just text"\n'), w.run, t), ["m.jsonl:2"]))
case("malformed/sft-unknown-format", "inputs")(lambda w, t: (
    _sft(_write(t / "m.jsonl", '{"question": "a", "answer": "b"}\n'), w.run, t), ["m.jsonl:1"]))
case("malformed/classify-jsonl", "inputs")(lambda w, t: (
    _classify(_write(t / "m.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": \n'),
              w.run, t), ["m.jsonl:3"]))
case("malformed/classify-csv-no-label-column", "inputs")(lambda w, t: (
    _classify(_write(t / "m.csv", "text,class\nhello,a\nbye,b\n"), w.run, t), ["m.csv:1", "'label'"]))
case("malformed/classify-csv-short-row", "inputs")(lambda w, t: (
    _classify(_write(t / "m.csv", "text,label\nhello,a\nbye\n"), w.run, t), ["m.csv:3", "label"]))
case("malformed/classify-csv-open-quote", "inputs")(lambda w, t: (
    _classify(_write(t / "m.csv", 'text,label\nhello,a\n"bye,b\n'), w.run, t), ["m.csv", "label"]))
case("malformed/tokenizer-train-jsonl", "inputs")(lambda w, t: (
    _tok_train(_write(t / "m.jsonl", '{"text": "hello there"}\n{"text": "x",}\n'), t / "tok.json"), ["m.jsonl:2"]))
case("malformed/tokenizer-file", "inputs")(lambda w, t: (
    ["tokenizer", "encode", "--tokenizer", str(_write(t / "m.json", w.tok.read_text()[:200])), "x"], ["m.json"]))
case("malformed/tokenizer-file-not-a-tokenizer", "inputs")(lambda w, t: (
    ["tokenizer", "encode", "--tokenizer", str(_write(t / "m.json", '{"hello": [1, 2]}')), "x"], ["m.json"]))
case("malformed/hf-config", "inputs")(lambda w, t: (
    ["convert", str(_hf_folder(t, b'{"architectures": ["GPT2LMHeadModel"], ')), str(t / "out"), "--from", "hf",
     "--to", "scratchlm"], ["config.json"]))
case("malformed/hf-index", "inputs")(lambda w, t: (
    ["convert", str(_hf_index(w, t, '{"weight_map": {"lm_head.weight": 5}}')), str(t / "out"), "--from", "hf",
     "--to", "scratchlm"], ["model.safetensors.index.json"]))
case("malformed/hf-index-list", "inputs")(lambda w, t: (
    ["convert", str(_hf_index(w, t, '{"weight_map": ["model-1.safetensors"]}')), str(t / "out"), "--from", "hf",
     "--to", "scratchlm"], ["model.safetensors.index.json"]))
case("types/hf-config-n-layer", "inputs")(lambda w, t: (
    ["convert", str(_hf_export(w, t, n_layer="two")), str(t / "out"), "--from", "hf", "--to", "scratchlm"],
    ["config.json", "n_layer"]))
case("malformed/ckpt-config", "inputs")(lambda w, t: (
    _sample(_damage(w, t, "config.json", b'{"model": {"arch": ')), ["config.json"]))
case("malformed/ckpt-tokenizer", "inputs")(lambda w, t: (
    _sample(_damage(w, t, "tokenizer.json", b'{"format": "scratchlm.tokenizer", ')), ["tokenizer.json"]))
case("malformed/ckpt-latest", "inputs")(lambda w, t: (_sample(_bad_latest(w, t)), ["step_9999999"]))


def _hf_folder(tmp: Path, config: bytes) -> Path:
    folder = tmp / "hf"
    folder.mkdir()
    _write(folder / "config.json", config)
    return folder


def _hf_export(w: World, tmp: Path, **config: object) -> Path:
    """The fixture checkpoint exported to an HF folder, with `config` changed in its config.json."""
    hf = tmp / "hf_export"
    assert main(["convert", str(w.ckpt), str(hf), "--from", "scratchlm", "--to", "hf"]) == 0
    fields = json.loads((hf / "config.json").read_text())
    _write(hf / "config.json", json.dumps({**fields, **config}))
    return hf


def _hf_index(w: World, tmp: Path, index: str) -> Path:
    """An HF export whose weights are named by a (bad) shard index instead of one file."""
    hf = _hf_export(w, tmp)
    (hf / "model.safetensors").unlink()
    _write(hf / "model.safetensors.index.json", index)
    return hf


def _damage(w: World, tmp: Path, name: str, data: bytes) -> Path:
    ck = _ckpt_copy(w, tmp)
    _write(ck / name, data)
    return ck


def _bad_latest(w: World, tmp: Path) -> Path:
    run = tmp / "run_copy"
    shutil.copytree(w.run, run)
    _write(run / "ckpt" / "latest", "step_9999999\n")
    return run


# wrong field types ------------------------------------------------------------------------------
case("types/sft-alpaca-instruction-int", "inputs")(lambda w, t: (
    _sft(_write(t / "x.jsonl", '{"instruction": 5, "output": "b"}\n'), w.run, t), ["x.jsonl:1", "instruction"]))
case("types/sft-alpaca-input-int", "inputs")(lambda w, t: (
    _sft(_write(t / "x.jsonl", '{"instruction": "a", "input": 7, "output": "b"}\n'), w.run, t), ["x.jsonl:1", "input"]))
case("types/sft-alpaca-output-missing", "inputs")(lambda w, t: (
    _sft(_write(t / "x.jsonl", '{"instruction": "a"}\n'), w.run, t), ["x.jsonl:1", "output"]))
case("types/sft-messages-content-int", "inputs")(lambda w, t: (
    _sft(_write(t / "x.jsonl", '{"messages": [{"role": "user", "content": 5}]}\n'), w.run, t),
    ["x.jsonl:1", "messages[0]"]))
case("types/sft-messages-not-list", "inputs")(lambda w, t: (
    _sft(_write(t / "x.jsonl", '{"messages": "hi"}\n'), w.run, t), ["x.jsonl:1", "messages"]))
case("types/sft-messages-bad-role", "inputs")(lambda w, t: (
    _sft(_write(t / "x.jsonl", '{"messages": [{"role": "bot", "content": "hi"}]}\n'), w.run, t),
    ["x.jsonl:1", "role"]))
case("types/sft-completion-list", "inputs")(lambda w, t: (
    _sft(_write(t / "x.jsonl", '{"prompt": "a", "completion": ["b"]}\n'), w.run, t), ["x.jsonl:1", "completion"]))
case("types/classify-text-int", "inputs")(lambda w, t: (
    _classify(_write(t / "x.jsonl", '{"text": 5, "label": "a"}\n{"text": "b", "label": "c"}\n'), w.run, t),
    ["x.jsonl:1", "text"]))
case("types/classify-label-list", "inputs")(lambda w, t: (
    _classify(_write(t / "x.jsonl", '{"text": "a", "label": ["a"]}\n{"text": "b", "label": "c"}\n'), w.run, t),
    ["x.jsonl:1", "label"]))
case("types/tokenizer-train-jsonl-text-int", "inputs")(lambda w, t: (
    _tok_train(_write(t / "x.jsonl", '{"text": "hello"}\n{"text": 5}\n'), t / "tok.json"), ["x.jsonl:2", "text"]))
case("types/data-prepare-jsonl-field-missing", "inputs")(lambda w, t: (
    _prepare(_write(t / "x.jsonl", '{"body": "hello there, a long enough document"}\n'), w, t / "d"),
    ["x.jsonl:1", "text"]))
case("types/decode-ids-not-numbers", "inputs")(lambda w, t: (
    ["tokenizer", "decode", "--tokenizer", str(w.tok), "12", "abc"], ["'abc'"]))

# corrupt or truncated safetensors ----------------------------------------------------------------
case("corrupt/sample", "inputs")(lambda w, t: (_sample(_corrupt(w, t)), ["model.safetensors"]))
case("corrupt/chat", "inputs")(lambda w, t: (_chat(_corrupt(w, t)), ["model.safetensors"]))
case("corrupt/convert", "inputs")(lambda w, t: (
    ["convert", str(_corrupt(w, t)), str(t / "hf"), "--from", "scratchlm", "--to", "hf"], ["model.safetensors"]))
case("corrupt/sft-base", "inputs")(lambda w, t: (_sft(w.sft_data, _corrupt(w, t), t), ["model.safetensors"]))
case("corrupt/classify-base", "inputs")(lambda w, t: (_classify(w.cls_data, _corrupt(w, t), t), ["model.safetensors"]))
case("corrupt/viz-attention", "inputs")(lambda w, t: (
    ["viz", "attention", "--ckpt", str(_corrupt(w, t)), "--prompt", "the cat", "--out", str(t / "a.png")],
    ["model.safetensors"]))
case("truncated/sample", "inputs")(lambda w, t: (_sample(_truncated(w, t)), ["model.safetensors"]))
case("truncated/chat", "inputs")(lambda w, t: (_chat(_truncated(w, t)), ["model.safetensors"]))
case("truncated/convert", "inputs")(lambda w, t: (
    ["convert", str(_truncated(w, t)), str(t / "hf"), "--from", "scratchlm", "--to", "hf"], ["model.safetensors"]))
case("truncated/sft-base", "inputs")(lambda w, t: (_sft(w.sft_data, _truncated(w, t), t), ["model.safetensors"]))
case("truncated/hf-weights", "inputs")(lambda w, t: (
    ["convert", str(_truncated_hf(w, t)), str(t / "out"), "--from", "hf", "--to", "scratchlm"], ["model.safetensors"]))
case("truncated/resume-optimizer", "H4")(lambda w, t: (
    ["pretrain", str(w.corpus), "--out", str(_run_with(w, t, "optimizer.safetensors")), "--resume", *TINY_PRETRAIN,
     "--train.max_steps=4"], ["optimizer.safetensors"]))
case("nonfinite/sample", "H4")(lambda w, t: (_sample(_nan_weights(w, t)), ["model.safetensors"]))


def _truncated_hf(w: World, tmp: Path) -> Path:
    """An HF export of the fixture checkpoint with its weights cut in half."""
    hf = _hf_export(w, tmp)
    data = (hf / "model.safetensors").read_bytes()
    _write(hf / "model.safetensors", data[: len(data) // 2])
    return hf


def _run_with(w: World, tmp: Path, name: str) -> Path:
    """A copy of the run whose latest checkpoint has `name` cut in half."""
    run = tmp / "run"
    shutil.copytree(w.run, run)
    ck = run / "ckpt" / (run / "ckpt" / "latest").read_text().strip()
    data = (ck / name).read_bytes()
    _write(ck / name, data[: len(data) // 2])
    return run


# a checkpoint of another architecture -------------------------------------------------------------
case("arch/sample", "inputs")(lambda w, t: (_sample(_other_arch(w, t)), ["model.safetensors"]))
case("arch/chat", "inputs")(lambda w, t: (_chat(_other_arch(w, t)), ["model.safetensors"]))
case("arch/convert", "inputs")(lambda w, t: (
    ["convert", str(_other_arch(w, t)), str(t / "hf"), "--from", "scratchlm", "--to", "hf"], ["model.safetensors"]))
case("arch/sft-base", "inputs")(lambda w, t: (_sft(w.sft_data, _other_arch(w, t), t), ["model.safetensors"]))
case("arch/classify-base", "inputs")(lambda w, t: (_classify(w.cls_data, _other_arch(w, t), t), ["model.safetensors"]))

# out-of-range settings ----------------------------------------------------------------------------
case("settings/sample-top-p", "inputs")(lambda w, t: (_sample(w.run, "--sample.top_p=1.5"), ["top_p"]))
case("settings/sample-temperature", "inputs")(lambda w, t: (_sample(w.run, "--sample.temperature=-1"), ["temperature"]))
case("settings/sample-top-k", "inputs")(lambda w, t: (_sample(w.run, "--sample.top_k=-3"), ["top_k"]))
case("settings/sample-max-new-tokens", "inputs")(lambda w, t: (
    _sample(w.run, "--sample.max_new_tokens=-1"), ["max_new_tokens"]))
case("settings/sample-num-samples", "inputs")(lambda w, t: (_sample(w.run, "--sample.num_samples=0"), ["num_samples"]))
case("settings/sample-cache", "inputs")(lambda w, t: (_sample(w.run, "--sample.cache=disk"), ["cache"]))
case("settings/sample-too-many", "inputs")(lambda w, t: (_sample(w.run, "--sample.num_samples=100000000"),
                                                         ["num_samples"]))
case("settings/sample-misspelt", "inputs")(lambda w, t: (_sample(w.run, "--sample.top_pp=0.5"), ["top_pp"]))
case("settings/sample-not-a-number", "inputs")(lambda w, t: (_sample(w.run, "--sample.top_p=high"), ["top_p"]))
case("settings/sample-unknown-preset", "H5")(lambda w, t: (_sample(w.run, "--preset", "nonexistent"), ["nonexistent"]))
case("settings/chat-temperature", "inputs")(lambda w, t: (_chat(w.run, "--sample.temperature=-1"), ["temperature"]))
case("settings/viz-layer", "inputs")(lambda w, t: (
    ["viz", "attention", "--ckpt", str(w.run), "--prompt", "the cat", "--layer", "7", "--out", str(t / "a.png")],
    ["--layer"]))
case("settings/viz-override", "H5")(lambda w, t: (
    ["viz", "attention", "--ckpt", str(w.run), "--prompt", "the", "--out", str(t / "a.png"), "--train.lrr=3"],
    ["train.lrr"]))
case("settings/convert-override", "H5")(lambda w, t: (
    ["convert", str(w.run), str(t / "hf"), "--from", "scratchlm", "--to", "hf", "--model.n_layer=3"],
    ["model.n_layer"]))
case("settings/pretrain-batch-size-0", "H5")(lambda w, t: (_pretrain(w.corpus, t, "--train.batch_size=0"),
                                                            ["batch_size"]))
case("settings/pretrain-grad-accum-0", "H5")(lambda w, t: (_pretrain(w.corpus, t, "--train.grad_accum=0"),
                                                            ["grad_accum"]))
case("settings/pretrain-lr-nan", "H5")(lambda w, t: (_pretrain(w.corpus, t, "--train.lr=nan"), ["lr"]))
case("settings/pretrain-lr-negative", "H5")(lambda w, t: (_pretrain(w.corpus, t, "--train.lr=-1"), ["lr"]))
case("settings/pretrain-max-steps-0", "H5")(lambda w, t: (_pretrain(w.corpus, t, "--train.max_steps=0"),
                                                           ["max_steps"]))
case("settings/pretrain-eval-interval-0", "H5")(lambda w, t: (_pretrain(w.corpus, t, "--train.eval_interval=0"),
                                                               ["eval_interval"]))
case("settings/pretrain-dropout", "H5")(lambda w, t: (_pretrain(w.corpus, t, "--model.dropout=1.5"), ["dropout"]))
case("settings/pretrain-ckpt-interval", "H5")(lambda w, t: (_pretrain(w.corpus, t, "--train.ckpt_interval=-5"),
                                                             ["ckpt_interval"]))
case("settings/pretrain-on-nan", "H5")(lambda w, t: (_pretrain(w.corpus, t, "--train.on_nan=ignore"), ["on_nan"]))
case("settings/pretrain-vocab-size", "H5")(lambda w, t: (_pretrain(w.corpus, t, "--model.vocab_size=1e10"),
                                                          ["vocab_size"]))
case("settings/pretrain-unknown-preset", "inputs")(lambda w, t: (
    ["pretrain", str(w.corpus), "--preset", "nope", "--out", str(t / "run")], ["nope"]))
case("settings/pretrain-precision", "H3")(lambda w, t: (_pretrain(w.corpus, t, "--train.precision=fp8"),
                                                         ["precision"]))
case("settings/sft-lora-r", "H5")(lambda w, t: (_sft(w.sft_data, w.run, t, "--sft.lora_r=-4"), ["lora_r"]))
case("settings/sft-val-fraction", "H5")(lambda w, t: (_sft(w.sft_data, w.run, t, "--sft.val_fraction=1.5"),
                                                       ["val_fraction"]))
case("settings/tokenizer-kind", "H5")(lambda w, t: (
    ["tokenizer", "train", str(w.text), "--out", str(t / "tok.json"), "--tokenizer.kind=sentencepiece"], ["kind"]))
case("settings/env-override", "H5")(lambda w, t: (["env", "--train.lrr=3"], ["train.lrr"]))
case("settings/compare-kinds", "inputs")(lambda w, t: (
    ["tokenizer", "compare", str(w.text), "--kinds", "byte,sentencepiece", "--quiet"], ["sentencepiece"]))
case("settings/compare-no-kinds", "inputs")(lambda w, t: (
    ["tokenizer", "compare", str(w.text), "--kinds", ",", "--quiet"], ["--kinds"]))
case("out/compare-plot-folder", "inputs")(lambda w, t: (
    ["tokenizer", "compare", str(w.text), "--kinds", "byte", "--quiet", "--plot", str(_folder(t / "pics"))], ["pics"]))
case("exists/compare-plot", "inputs")(lambda w, t: (
    ["tokenizer", "compare", str(w.text), "--kinds", "byte", "--quiet", "--plot", str(_write(t / "c.png", "mine\n"))],
    ["c.png"]))
case("settings/export-not-bpe", "inputs")(lambda w, t: (
    ["tokenizer", "export", "--tokenizer", str(_char_tok(t)), "--out", str(t / "hf")], ["char"]))
case("settings/convert-tokenizer-on-export", "inputs")(lambda w, t: (
    ["convert", str(w.run), str(t / "hf"), "--from", "scratchlm", "--to", "hf", "--tokenizer", str(w.tok)],
    ["--tokenizer"]))
case("settings/hf-unsupported-arch", "inputs")(lambda w, t: (
    ["convert", str(_hf_folder(t, b'{"architectures": ["BertModel"]}')), str(t / "out"), "--from", "hf",
     "--to", "scratchlm"], ["BertModel"]))
case("settings/decode-id-out-of-range", "inputs")(lambda w, t: (
    ["tokenizer", "decode", "--tokenizer", str(w.tok), "99999"], ["99999"]))
case("settings/encode-special-token", "inputs")(lambda w, t: (
    ["tokenizer", "encode", "--tokenizer", str(w.tok), "a <|endoftext|>"], ["<|endoftext|>"]))
case("settings/convert-same-format", "inputs")(lambda w, t: (
    ["convert", str(w.run), str(t / "x"), "--from", "hf", "--to", "hf"], ["--from hf --to hf"]))

# unusable output paths ----------------------------------------------------------------------------
SYS_OUT = "/sys/scratchlm-bad-inputs/out"  # sysfs: no new entries, even for root (see the docstring)
case("out/pretrain-readonly", "H4")(lambda w, t: (
    ["pretrain", str(w.corpus), "--out", SYS_OUT, *TINY_PRETRAIN], ["/sys/scratchlm-bad-inputs"]))
case("out/pretrain-file", "H4")(lambda w, t: (
    ["pretrain", str(w.corpus), "--out", str(_write(t / "README.md", "# mine\n")), *TINY_PRETRAIN], ["README.md"]))
case("out/pretrain-under-file", "H4")(lambda w, t: (
    ["pretrain", str(w.corpus), "--out", str(_write(t / "notes.txt", "mine\n") / "run"), *TINY_PRETRAIN],
    ["notes.txt"]))
case("out/pretrain-other-run", "H4")(lambda w, t: (
    ["pretrain", str(w.text), "--out", str(_run_copy(w, t)), *TINY_PRETRAIN], ["run_copy"]))
case("out/tokenizer-train-readonly", "H4")(lambda w, t: (_tok_train(w.text, Path(SYS_OUT) / "tok.json"),
                                                         ["/sys/scratchlm-bad-inputs"]))
case("out/tokenizer-train-folder", "H4")(lambda w, t: (_tok_train(w.text, _folder(t / "docs")), ["docs"]))
case("out/tokenizer-train-own-input", "H4")(lambda w, t: (
    _tok_train(_copy(w.text, t / "c.txt"), t / "c.txt"), ["c.txt"]))
case("out/tokenizer-export-hf-file", "inputs")(lambda w, t: (
    ["tokenizer", "export", "--tokenizer", str(w.tok), "--out", str(_write(t / "hf.txt", "mine\n"))], ["hf.txt"]))
case("out/tokenizer-export-tiktoken-folder", "inputs")(lambda w, t: (
    ["tokenizer", "export", "--tokenizer", str(w.tok), "--format", "tiktoken", "--out", str(_folder(t / "docs"))],
    ["docs"]))
case("out/data-prepare-file", "H4")(lambda w, t: (_prepare(w.text, w, _write(t / "d.txt", "mine\n")), ["d.txt"]))
case("out/data-prepare-readonly", "H4")(lambda w, t: (_prepare(w.text, w, Path(SYS_OUT)),
                                                      ["/sys/scratchlm-bad-inputs"]))
case("out/sft-file", "H4")(lambda w, t: (
    ["sft", str(w.sft_data), "--base", str(w.run), "--out", str(_write(t / "s.txt", "mine\n")), *TINY_SFT], ["s.txt"]))
case("out/sft-into-base", "H4")(lambda w, t: (
    ["sft", str(w.sft_data), "--base", str(b := _run_copy(w, t)), "--out", str(b), *TINY_SFT], ["run_copy"]))
case("out/classify-file", "H4")(lambda w, t: (
    ["classify", "train", str(w.cls_data), "--base", str(w.run), "--out", str(_write(t / "c.txt", "mine\n")),
     *TINY_SFT], ["c.txt"]))
case("out/convert-file", "inputs")(lambda w, t: (
    ["convert", str(w.run), str(_write(t / "hf.txt", "mine\n")), "--from", "scratchlm", "--to", "hf"], ["hf.txt"]))
case("out/convert-readonly", "inputs")(lambda w, t: (
    ["convert", str(w.run), SYS_OUT, "--from", "scratchlm", "--to", "hf"], ["/sys/scratchlm-bad-inputs"]))
case("out/viz-attention-folder", "inputs")(lambda w, t: (
    ["viz", "attention", "--ckpt", str(w.run), "--prompt", "the cat", "--out", str(_folder(t / "pics"))], ["pics"]))
case("out/viz-attention-under-file", "inputs")(lambda w, t: (
    ["viz", "attention", "--ckpt", str(w.run), "--prompt", "the cat",
     "--out", str(_write(t / "notes.txt", "mine\n") / "a.png")], ["notes.txt"]))

# existing outputs the user made: refused without --overwrite, left as they were
case("exists/tokenizer-train", "H4")(lambda w, t: (_tok_train(w.text, _copy(w.tok, t / "tok.json")), ["tok.json"]))
case("exists/tokenizer-export-hf", "inputs")(lambda w, t: (
    ["tokenizer", "export", "--tokenizer", str(w.tok), "--out", str(_folder(t / "hf", "tokenizer.json"))],
    ["tokenizer.json"]))
case("exists/tokenizer-export-tiktoken", "inputs")(lambda w, t: (
    ["tokenizer", "export", "--tokenizer", str(w.tok), "--format", "tiktoken",
     "--out", str(_write(t / "ranks.tiktoken", "mine\n"))], ["ranks.tiktoken"]))
case("exists/data-prepare", "H4")(lambda w, t: (_prepare(w.text, w, _folder(t / "shards")), ["shards"]))
case("exists/convert", "inputs")(lambda w, t: (
    ["convert", str(w.run), str(_folder(t / "hf")), "--from", "scratchlm", "--to", "hf"], ["hf"]))
case("exists/viz-attention", "inputs")(lambda w, t: (
    ["viz", "attention", "--ckpt", str(w.run), "--prompt", "the cat", "--out", str(_write(t / "a.png", "mine\n"))],
    ["a.png"]))
case("exists/viz-routing", "inputs")(lambda w, t: (
    ["viz", "routing", "--run", str(w.run), "--out", str(_write(t / "r.png", "mine\n"))], ["r.png"]))
case("exists/experiment-norms-file", "H4")(lambda w, t: (
    ["experiment", "norms", str(w.text), "--out", str(_write(t / "norms", "mine\n")), "--quiet"], ["norms"]))


def _char_tok(tmp: Path) -> Path:
    text = _write(tmp / "abc.txt", "abc abc cab\n" * 20)
    assert main(["tokenizer", "train", str(text), "--out", str(tmp / "char.json"), "--quiet",
                 "--tokenizer.kind=char"]) == 0
    return tmp / "char.json"


def _folder(path: Path, name: str = "keep.md") -> Path:
    """A folder holding one file of the user's."""
    path.mkdir()
    _write(path / name, "mine\n")
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy2(src, dst)
    return dst


def _run_copy(w: World, tmp: Path) -> Path:
    run = tmp / "run_copy"
    shutil.copytree(w.run, run)
    return run


# -- the check --------------------------------------------------------------------------------------


def _snapshot(*roots: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, world: World, tmp_path: Path, capsys, monkeypatch) -> None:
    area, setup = CASES[name]
    argv, names = setup(world, tmp_path)
    before = _snapshot(world.root, tmp_path)
    monkeypatch.chdir(tmp_path)  # a verb's default output folder (runs/...) lands here
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))  # chat reads its turns from stdin
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    except Exception as e:  # what a user would see as a traceback
        pytest.fail(f"[{area}] traceback: {type(e).__name__}: {e}")
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert "Traceback" not in out + err, f"[{area}] {err}"
    assert code == 2, f"[{area}] exit {code}; stderr: {err.strip()[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("scratchlm: error:"), f"[{area}] not one line: {err}"
    for needle in names:
        assert needle in lines[0], f"[{area}] {needle!r} not named in: {lines[0]}"
    after = _snapshot(world.root, tmp_path)
    lost = sorted(str(p) for p, digest in before.items() if after.get(p) != digest)
    assert not lost, f"[{area}] changed or removed: {lost}"


def test_bad_input_through_the_real_command(world: World, tmp_path: Path) -> None:
    """The same contract through `python -m scratchlm` in a fresh process: what a user's shell sees,
    including anything the in-process runs cannot (warnings printed to stderr, the exit status
    the interpreter returns)."""
    ck = _truncated(world, tmp_path)
    before = _snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "scratchlm", *_sample(ck)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("scratchlm: error:") and "model.safetensors" in lines[0], lines
    assert _snapshot(tmp_path) == before
