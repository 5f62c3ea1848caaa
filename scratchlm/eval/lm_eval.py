"""EleutherAI's lm-evaluation-harness on scratchlm checkpoints: a model class for it, an offline task folder,
and an entry point that hands over to lm-eval's own command line.

`ScratchLM` is an lm-eval `TemplateLM` (registered as `--model scratchlm`) computed straight from the
model's forward, so it checks `scratchlm eval` rather than repeating it:
- `loglikelihood`: lm-eval's own request encoding (`TemplateLM._encode_pair`: trailing context whitespace
  moves into the continuation; an empty context is the prefix id, end-of-text), then its causal
  convention: the input is (context + continuation)[-(L+1):][:-1] and the continuation's tokens are scored.
- `loglikelihood_rolling`: lm-eval's `get_rolling_token_windows` + `make_disjoint_window` (the first token
  conditioned on end-of-text, disjoint windows of the model's length L, the last one reaching back for a
  full context), each window scored as a loglikelihood request and summed per document.
- `generate_until`: greedy through the `Engine`, the context left-truncated to L - max_gen_toks as lm-eval's HF
  model does; the text is cut before the first `until` string (end-of-text always stops).
Scoring batches rows through `loglik.score_tails` (log-softmax over the model's whole, padded output in fp32,
as HF transformers does on our export). Text is encoded with `encode_ordinary`: a literal "<|endoftext|>" in a
document is text, as `scratchlm eval` reads it (an HF tokenizer would read it as the special token).

The task folder (`write_task_folder`, or `python -m scratchlm.eval.lm_eval tasks`): one YAML per task and
its documents as local JSON lines, loaded by lm-eval with `dataset_path: json` and `--include_path DIR`
(paths in the YAML are absolute; the datasets cache lives in the folder, so nothing goes to ~/.cache):
- a rolling task (`output_type: loglikelihood_rolling`: bits_per_byte, byte and word perplexity) over
  documents, e.g. the held-out split of a prepared data folder, as `scratchlm eval` scores it;
- a multiple-choice task over `ChoiceItem`s (doc_to_text: context, doc_to_choice: choices, doc_to_target:
  label, target delimiter " "; acc and acc_norm), e.g. the cloze task `scratchlm eval` builds.
Every task carries the tag `scratchlm_suite`, so `--tasks scratchlm_suite` runs the whole folder.

    python -m scratchlm.eval.lm_eval tasks --data runs/tiny/data --out runs/lm_eval_tasks
    python -m scratchlm.eval.lm_eval --model scratchlm --model_args ckpt=runs/tiny \\
        --tasks scratchlm_suite --include_path runs/lm_eval_tasks
    python -m scratchlm.eval.lm_eval --model hf --model_args pretrained=runs/tiny-hf,dtype=float32 \\
        --tasks scratchlm_suite --include_path runs/lm_eval_tasks      # the same tasks on `scratchlm convert --to hf`
(lm-eval's --device, default cuda:0, falls back to the CPU without CUDA; a device in --model_args clashes with it.)

lm-eval is optional: only this module imports it, and without it the import fails with one line naming the
pip command. The entry point sets HF_DATASETS_OFFLINE / HF_HUB_OFFLINE (unless already set): nothing it runs
reaches the network. Left out: sampled generation (refused), chat templates, data parallelism across processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.config import SampleConfig
from scratchlm.data.sources import iter_documents
from scratchlm.errors import UserError
from scratchlm.eval.choice import ChoiceItem, read_choice_items
from scratchlm.eval.cloze import build_cloze, ngram_set
from scratchlm.eval.loglik import score_tails
from scratchlm.eval.suite import heldout_texts
from scratchlm.infer.engine import Engine, first_stop
from scratchlm.io import atomic_dir, write_text
from scratchlm.rundir import check_output_path
from scratchlm.tokenizer import Tokenizer

PIP = 'pip install "lm-eval[hf]==0.4.13"'
try:
    # lm_eval.models fills lm-eval's model registry with its own models (lazily, by name). It must come before our
    # registration: lm-eval fills the registry only when it finds it empty, so registering first would hide
    # `--model hf` and every other built-in model.
    import lm_eval.models  # noqa: F401
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    if __name__ == "__main__":
        print(f"scratchlm: error: lm-eval is not installed ({PIP})", file=sys.stderr)
        sys.exit(2)
    raise UserError("scratchlm.eval.lm_eval needs EleutherAI's lm-evaluation-harness, which is not installed",
                    fix=PIP) from None

MODEL_NAME = "scratchlm"  # --model scratchlm
TAG = "scratchlm_suite"  # --tasks scratchlm_suite: every task of a folder written here
MAX_GEN_TOKS = 256  # lm-eval's default for generate_until, as its HF model


@register_model(MODEL_NAME)
class ScratchLM(TemplateLM):
    """A scratchlm checkpoint (`ckpt`: a run or checkpoint folder), or a loaded `model` and `tokenizer`, for lm-eval.

    model_args on lm-eval's command line: ckpt, batch_tokens (padded positions per forward), max_gen_toks; and its
    --device (a cuda device without CUDA falls back to the CPU, as lm-eval's HF model does). lm-eval's own
    batch_size / max_batch_size are accepted and change no result: batches are sized in tokens (`batch_tokens`)."""

    def __init__(self, ckpt: str | None = None, *, model: nn.Module | None = None, tokenizer: Tokenizer | None = None,
                 device: str | None = None, batch_tokens: int = 8192, max_gen_toks: int = MAX_GEN_TOKS,
                 batch_size: int | str | None = None, max_batch_size: int | None = None) -> None:
        super().__init__()
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI passes cuda:0 unless told; as HF's
        if (ckpt is None) == (model is None) or (model is None) != (tokenizer is None):
            raise UserError("ScratchLM needs either ckpt=RUN or both model and tokenizer",
                            fix="pass --model_args ckpt=RUN_OR_CHECKPOINT_FOLDER")
        if ckpt is not None:
            model, tokenizer, _ = load_model_for_inference(ckpt, device=device)
        if tokenizer.eot_id is None:
            raise UserError(f"the {tokenizer.kind} tokenizer has no <|endoftext|>, lm-eval's prefix for a document's "
                            "first token and for an empty context", fix="evaluate a model whose tokenizer has it")
        self.model, self.tok = model.eval(), tokenizer
        self.batch_tokens, self.max_gen_toks = int(batch_tokens), int(max_gen_toks)
        self._device = next(model.parameters()).device

    # -- what TemplateLM asks for ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode_ordinary(string)  # our tokenizers add no BOS: add_special_tokens changes nothing

    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(log p(continuation), continuation is greedy) per (request, context ids, continuation ids)."""
        L, rows, where = self.max_length, [], []
        out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)  # an empty continuation: log 1, greedy
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                continue
            if len(continuation) > L:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the context of {L}")
            # a whitespace-only context encodes to nothing after _encode_pair: condition on the prefix id
            whole = (list(context or [self.prefix_token_id]) + list(continuation))[-(L + 1):]
            rows.append((whole[:-1], list(continuation)))
            where.append(i)
        scored = score_tails(self.model, rows, batch_tokens=self.batch_tokens,
                             progress=None if disable_tqdm else "lm-eval loglikelihood")
        for i, result in zip(where, scored):
            out[i] = result
        return out

    # -- the three request types -----------------------------------------------------------------
    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(document) per request (args: (text,)), every token scored once (lm-eval's windows)."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logp
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Per request (args: (context, gen_kwargs)): the continuation up to (without) the first `until` string or
        end-of-text, at most max_gen_toks tokens. Requests with the same gen_kwargs run as one batch."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        engine = Engine(self.model, self.tok)
        for rows in groups.values():
            cfg = self._sample_config(requests[rows[0]].args[1])
            prompts = [self._prompt(requests[i].args[0], cfg.max_new_tokens) for i in rows]
            # Every sampled token, before the engine trims a stop string's token away: the text is cut at the stop
            # string itself, as lm-eval cuts its HF model's text.
            raw: list[list[int]] = [[] for _ in rows]
            engine.generate(prompts, cfg, on_token=lambda r, t, raw=raw: raw[r].append(t))
            for r, i in enumerate(rows):
                text = self.tok.decode(raw[r])
                cut = first_stop(text, cfg.stop)
                out[i] = text if cut < 0 else text[:cut]
        return out

    def _sample_config(self, gen_kwargs: dict[str, Any]) -> SampleConfig:
        """lm-eval's gen_kwargs as a greedy SampleConfig: until -> stop (end-of-text always stops), max_gen_toks (or
        its alias max_new_tokens) -> max_new_tokens. Sampling is refused: lm-eval's scores assume greedy answers."""
        kw = dict(gen_kwargs or {})
        if kw.get("do_sample") and float(kw.get("temperature") or 0.0) > 0:
            raise UserError("the scratchlm model for lm-eval generates greedily; this task asks for sampling "
                            f"({kw})", fix="pass --gen_kwargs do_sample=False")
        until = kw.get("until") or []
        stop = [s for s in ([until] if isinstance(until, str) else list(until)) if s]
        n = next((kw[k] for k in ("max_gen_toks", "max_new_tokens") if kw.get(k) is not None), self.max_gen_toks)
        return SampleConfig(temperature=0.0, max_new_tokens=int(n), stop=stop, stream=False)

    def _prompt(self, context: str, max_new: int) -> list[int]:
        """The context's ids, left-truncated to L - max_new (lm-eval's HF rule, so the text never slides past the
        context); when max_new >= L, to L, and the engine slides. An empty context is the end-of-text id."""
        L = self.max_length
        ids = self.tok_encode(context) or [self.prefix_token_id]
        return ids[-(L - max_new if max_new < L else L):]


# -- the offline task folder -------------------------------------------------------------------------
def _yaml(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON scalar is a YAML flow scalar


def _task_yaml(out: Path, name: str, body: list[str]) -> str:
    data = (out / f"{name}.jsonl").resolve()
    return "\n".join([
        f"task: {name}",
        f"tag: {TAG}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {_yaml(str(data))}",
        f"  cache_dir: {_yaml(str((out / '.cache').resolve()))}",
        "test_split: test",
        *body,
        "metadata:",
        "  version: 1.0",
        "",
    ])


def write_rolling_task(folder: Path, out: Path, name: str, texts: Sequence[str]) -> None:
    """A bits-per-byte task over the texts: `name.yaml` + `name.jsonl` ({"text"} per line) in `folder`, which will
    be at `out` (the YAML names its final path)."""
    write_text(folder / f"{name}.jsonl", "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    write_text(folder / f"{name}.yaml", _task_yaml(out, name, [
        "output_type: loglikelihood_rolling",
        'doc_to_text: ""',
        "doc_to_target: text",
        "metric_list:",
        *(f"  - metric: {m}" for m in ("bits_per_byte", "byte_perplexity", "word_perplexity")),
    ]))


def write_choice_task(folder: Path, out: Path, name: str, items: Sequence[ChoiceItem]) -> None:
    """A multiple-choice task over the items (`name.yaml` + `name.jsonl` of {"context", "choices", "label"})."""
    write_text(folder / f"{name}.jsonl", "".join(
        json.dumps({"context": it.context, "choices": it.choices, "label": it.label}, ensure_ascii=False) + "\n"
        for it in items))
    write_text(folder / f"{name}.yaml", _task_yaml(out, name, [
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: label",
        'target_delimiter: " "',
        "metric_list:",
        *(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true" for m in ("acc", "acc_norm")),
    ]))


def write_task_folder(out: str | Path, *, data: str | Path | None = None, texts: Sequence[str] = (),
                      choice_files: Sequence[str] = (), cloze_items: int = 200, seed: int = 0) -> list[str]:
    """The task folder at `out` (built aside and swapped in whole); returns its task names.

    data: a prepared data folder -> `scratchlm_heldout` (its validation documents) and `scratchlm_cloze` (the cloze
    items `scratchlm eval --cloze-items N --seed S` scores); texts: files, folders or JSONL -> one rolling task each
    (`scratchlm_text_STEM`); choice_files: choice JSONL -> one multiple-choice task each (`scratchlm_choice_STEM`)."""
    out = Path(out)
    names: list[str] = []
    with atomic_dir(out) as tmp:
        if data is not None:
            val, train = heldout_texts(data)
            write_rolling_task(tmp, out, "scratchlm_heldout", val)
            names.append("scratchlm_heldout")
            items = build_cloze(val, ngram_set(train), cloze_items, seed=seed)
            if items:
                write_choice_task(tmp, out, "scratchlm_cloze", items)
                names.append("scratchlm_cloze")
        for path in texts:
            name = f"scratchlm_text_{Path(path).stem}"
            write_rolling_task(tmp, out, name, [d.text for d in iter_documents([path])])
            names.append(name)
        for path in choice_files:
            name = f"scratchlm_choice_{Path(path).stem}"
            write_choice_task(tmp, out, name, read_choice_items(path))
            names.append(name)
        if not names:
            raise UserError("no tasks to write", fix="pass --data DIR, --text FILE or --choice FILE.jsonl")
        if len(set(names)) < len(names):
            raise UserError(f"two inputs give one task name ({', '.join(names)})", fix="rename one of the files")
    return names


# -- the entry point ---------------------------------------------------------------------------------
def _tasks_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m scratchlm.eval.lm_eval tasks",
                                description="Write an offline lm-eval task folder (YAML + local JSON lines).")
    p.add_argument("--data", help="prepared data folder: its held-out documents and the cloze task made from them")
    p.add_argument("--text", nargs="+", default=[], metavar="FILE", help="files, folders or JSONL: a rolling task each")
    p.add_argument("--choice", nargs="+", default=[], metavar="FILE",
                   help='choice JSONL ({"context", "choices", "label"}): a multiple-choice task each')
    p.add_argument("--cloze-items", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the task folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = p.parse_args(argv)
    if args.cloze_items < 1:
        raise UserError("--cloze-items must be positive")
    inputs = [*args.text, *args.choice] + ([args.data] if args.data else [])
    check_output_path(args.out, overwrite=args.overwrite, inputs=inputs, folder=True)
    names = write_task_folder(args.out, data=args.data, texts=args.text, choice_files=args.choice,
                              cloze_items=args.cloze_items, seed=args.seed)
    print(f"wrote {args.out}: tasks {', '.join(names)} (tag {TAG}); run them with --include_path {args.out} "
          f"--tasks {TAG}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`tasks ...`: write a task folder; anything else goes to lm-eval's command line, with --model scratchlm."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is imported, which lm-eval does later
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if argv[:1] == ["tasks"]:
            return _tasks_command(argv[1:])
        sys.argv = ["lm-eval", *argv]
        cli_evaluate()
    except UserError as e:
        print(f"scratchlm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
