"""`scratchlm eval`: one checkpoint scored on the embedded suite and on the user's own files.

The embedded suite (`suite=True`), so the demo needs no download:
- `heldout-bpb`: bits per byte of the validation documents of a prepared data folder (a model's pretraining
  data: `--data`, or the run's own `data/`). The documents are decoded with the data's tokenizer and
  re-encoded with the model's, so any model can be scored on the same text. No validation document's text
  is also a training document (asserted; `prepare` splits by document after deduplication).
- `cloze`: multiple choice made from those validation documents only, none sharing a 13-gram with the
  training split (`cloze.py`); acc and acc_norm, chance = 1 / options.
- `tasks:FAMILY`: for a chat model (an SFT, preference or RL run), greedy answers to embedded task prompts it
  never trained on (followed back through the runs it started from), each family's checker.
The user's files: `texts` (files, folders or JSONL, scored per document), `choice_files` (`choice.py`'s
JSONL) and `gen_files` (JSONL {"prompt", "answer"}: greedy chat answers, exact / token F1 / ROUGE-L).

Written to the output folder (built aside and swapped in whole): `summary.json` (format
"scratchlm.eval": one row per task and metric, what the report card reads), `eval.md` (the table),
`documents.jsonl` (per-document bits per byte), `choices.jsonl` (per-item log-likelihoods and picks),
`answers-*.jsonl` (generated answers) and `eval.png`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from scratchlm.checkpoint import find_checkpoint, load_model_for_inference
from scratchlm.config import Config, load_config
from scratchlm.data.loader import TokenShards
from scratchlm.data.sources import iter_documents, read_records
from scratchlm.errors import UserError
from scratchlm.eval.choice import ChoiceItem, read_choice_items, score_choices
from scratchlm.eval.cloze import build_cloze, ngram_set
from scratchlm.eval.perplexity import DocScore, overall, score_documents
from scratchlm.io import atomic_dir, write_json, write_text
from scratchlm.rl.compare import unseen_tasks
from scratchlm.tasks.answers import gold_eval
from scratchlm.tokenizer import Tokenizer

FORMAT, VERSION = "scratchlm.eval", 1


@dataclass
class EvalResult:
    out: Path
    rows: list[dict[str, Any]]
    table: str
    seconds: float
    documents: dict[str, list[DocScore]] = field(default_factory=dict)


def heldout_texts(data: str | Path) -> tuple[list[str], list[str]]:
    """(validation texts, training texts) of a prepared data folder, decoded with its own tokenizer."""
    shards = TokenShards(data)
    if "val" not in shards.splits or not shards.tokens("val"):
        raise UserError(f"{data}: has no validation split", fix="prepare it with --data.val_fraction > 0")
    tok = shards.tokenizer()
    val, train = ([tok.decode(d.tolist()) for d in shards.documents(split)] for split in ("val", "train"))
    if shards.manifest.get("split", {}).get("by") == "documents":
        assert not set(val) & set(train), f"{data}: a validation document is also a training document"
    return val, train


def read_gen_items(path: str | Path) -> list[tuple[str, str]]:
    fix = 'write one {"prompt": str, "answer": str} object per line'
    items = []
    for lineno, rec in read_records(Path(path)):
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("prompt", "answer")):
            raise UserError(f"{path}:{lineno}: needs string fields 'prompt' and 'answer'", fix=fix)
        items.append((rec["prompt"], rec["answer"]))
    if not items:
        raise UserError(f"{path}: no items", fix=fix)
    return items


def _acc_row(task: str, metric: str, values: list[float], **extra: Any) -> dict[str, Any]:
    n = len(values)
    p = sum(values) / n
    stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")  # lm-eval's sample standard error
    return {"task": task, "kind": extra.pop("kind", "choice"), "metric": metric, "value": p, "stderr": stderr,
            "n": n, **extra}


def _bpb_row(task: str, scores: list[DocScore]) -> dict[str, Any]:
    o = overall(scores)
    return {"task": task, "kind": "perplexity", "metric": "bits_per_byte", "value": o["bits_per_byte"],
            "n": o["documents"], "perplexity": o["perplexity"], "tokens": o["tokens"], "bytes": o["bytes"]}


def is_chat_model(cfg: Config, tok: Tokenizer) -> bool:
    """A fine-tuned chat policy: started from another run (SFT, preference or RL stage) with chat tokens."""
    return bool(cfg.sft.base or cfg.pref.base or cfg.rl.base) and "<|end|>" in tok.special_tokens


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | metric | value | n |", "|---|---|---|---|"]
    for r in rows:
        value = f"{r['value']:.4f}" if r["metric"] == "bits_per_byte" else f"{r['value']:.1%}"
        if r.get("stderr") is not None and math.isfinite(r["stderr"]):
            value += f" ± {r['stderr']:.1%}"
        if "chance" in r:
            value += f" (chance {r['chance']:.0%})"
        lines.append(f"| {r['task']} | {r['metric']} | {value} | {r['n']} |")
    return "\n".join(lines)


def side_by_side(results: dict[str, list[dict[str, Any]]]) -> str:
    """One markdown table of several models' rows (a column per model; a dash where one has no such row)."""
    keys = list(dict.fromkeys((r["task"], r["metric"]) for rows in results.values() for r in rows))
    found = {name: {(r["task"], r["metric"]): r for r in rows} for name, rows in results.items()}
    lines = ["| task | metric | " + " | ".join(results) + " |", "|---|---|" + "---|" * len(results)]
    for task, metric in keys:
        cells = []
        for name in results:
            r = found[name].get((task, metric))
            value = "-" if r is None else f"{r['value']:.4f}" if metric == "bits_per_byte" else f"{r['value']:.1%}"
            cells.append(value)
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_eval(documents: dict[str, list[DocScore]], rows: list[dict[str, Any]], out: Path) -> None:
    """Per-document bits per byte (a histogram per corpus) beside every accuracy (a bar, chance dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accs = [r for r in rows if r["metric"] != "bits_per_byte"]
    panels = int(bool(documents)) + int(bool(accs))
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    ax_iter = iter(axes.flat)
    if documents:
        ax = next(ax_iter)
        for name, scores in documents.items():
            ax.hist([s.bits_per_byte for s in scores], bins=20, alpha=0.6, label=f"{name} ({len(scores)} docs)")
        ax.set_xlabel("bits per byte")
        ax.set_ylabel("documents")
        ax.set_title("bits per byte per document")
        ax.legend(fontsize=8)
    if accs:
        ax = next(ax_iter)
        labels = [f"{r['task']}\n{r['metric']}" for r in accs]
        ax.bar(range(len(accs)), [r["value"] for r in accs], yerr=[r.get("stderr") or 0 for r in accs], color="C0")
        for i, r in enumerate(accs):
            if "chance" in r:
                ax.hlines(r["chance"], i - 0.4, i + 0.4, colors="k", linestyles="dashed")
        ax.set_xticks(range(len(accs)), labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title("accuracy (dashed: chance)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_eval(ckpt: str | Path, out: str | Path, *, data: str | Path | None = None, texts: list[str] = (),
             choice_files: list[str] = (), gen_files: list[str] = (), suite: bool = True, cloze_items: int = 200,
             task_prompts: int = 200, stride: int | None = None, batch_tokens: int = 8192, max_new_tokens: int = 24,
             seed: int = 0, model: nn.Module | None = None, tok: Tokenizer | None = None, progress: bool = True,
             log=print) -> EvalResult:
    """Score the checkpoint (or the given model and tokenizer, loaded from it) and write the output folder."""
    t0 = time.perf_counter()
    cfg = load_config(find_checkpoint(ckpt) / "config.json")
    if model is None or tok is None:
        model, tok, _ = load_model_for_inference(ckpt)
    model.eval()

    def bar(label: str) -> str | None:
        return label if progress else None

    if data is None and suite and (Path(ckpt) / "data" / "manifest.json").exists():
        data = Path(ckpt) / "data"
    rows: list[dict[str, Any]] = []
    documents: dict[str, list[DocScore]] = {}
    choice_rows: list[dict[str, Any]] = []
    with atomic_dir(out) as tmp:
        if suite and data is not None:
            val, train = heldout_texts(data)
            documents["heldout"] = score_documents(model, tok, [(f"val:{i}", t) for i, t in enumerate(val)],
                                                   stride=stride, batch_tokens=batch_tokens, progress=bar("held-out"))
            rows.append(_bpb_row("heldout", documents["heldout"]))
            log(f"held-out bits per byte: {rows[-1]['value']:.4f} over {len(val)} documents of {data}")
            items = build_cloze(val, ngram_set(train), cloze_items, seed=seed)
            if items:
                scored = score_choices(model, tok, items, batch_tokens=batch_tokens, progress=bar("cloze"))
                choice_rows += [{"task": "cloze", **r} for r in scored]
                for metric in ("acc", "acc_norm"):
                    rows.append(_acc_row("cloze", metric, [r[metric] for r in scored],
                                         chance=1 / len(items[0].choices)))
                log(f"cloze ({len(items)} items from held-out documents, no 13-gram in training): "
                    f"acc {rows[-2]['value']:.1%}, acc_norm {rows[-1]['value']:.1%}")
            else:
                log("cloze: skipped (the held-out documents have no sentence of 10 words or more)")
        elif suite:
            log("held-out bits per byte and cloze: skipped (no prepared data folder: pass --data DIR)")
        for path in texts:
            docs = [(d.source, d.text) for d in iter_documents([path])]
            documents[Path(path).name] = score_documents(model, tok, docs, stride=stride, batch_tokens=batch_tokens,
                                                         progress=bar(Path(path).name))
            rows.append(_bpb_row(Path(path).name, documents[Path(path).name]))
            log(f"{path}: bits per byte {rows[-1]['value']:.4f} over {rows[-1]['n']} documents")
        for path in choice_files:
            items: list[ChoiceItem] = read_choice_items(path)
            scored = score_choices(model, tok, items, batch_tokens=batch_tokens, progress=bar(Path(path).stem))
            choice_rows += [{"task": Path(path).stem, **r} for r in scored]
            for metric in ("acc", "acc_norm"):
                rows.append(_acc_row(Path(path).stem, metric, [r[metric] for r in scored]))
            log(f"{path}: acc {rows[-2]['value']:.1%}, acc_norm {rows[-1]['value']:.1%} over {len(items)} items")
        chat = is_chat_model(cfg, tok)
        if gen_files and not chat:
            raise UserError(f"{ckpt}: generation tasks need a chat model (an sft, preference or rl run)",
                            fix="evaluate an sft run, or leave out --gen")
        if suite and chat:
            tasks = unseen_tasks([ckpt], task_prompts, seed + 7)
            summary = gold_eval(model, tok, [[("user", t.instruction)] for t in tasks], [t.answer for t in tasks],
                                [{"family": t.family} for t in tasks], max_new_tokens, tmp / "answers-tasks.jsonl")
            for fam, scores in summary.items():
                rows.append({"task": f"tasks:{fam}", "kind": "generation", "metric": "checked",
                             "value": scores["checked"], "n": sum(fam in ("all", t.family) for t in tasks)})
            log(f"embedded task families ({len(tasks)} unseen prompts, greedy): checked "
                f"{summary['all']['checked']:.1%}")
        for path in gen_files:
            items_g = read_gen_items(path)
            name = Path(path).stem
            summary = gold_eval(model, tok, [[("user", p)] for p, _ in items_g], [a for _, a in items_g],
                                [{"source": name} for _ in items_g], max_new_tokens, tmp / f"answers-{name}.jsonl")
            for metric in ("exact", "f1", "rouge_l"):
                rows.append({"task": name, "kind": "generation", "metric": metric, "value": summary["all"][metric],
                             "n": len(items_g)})
            log(f"{path}: exact {summary['all']['exact']:.1%}, F1 {summary['all']['f1']:.1%} over {len(items_g)}")
        if not rows:
            raise UserError(f"{ckpt}: nothing to evaluate", fix="pass --data DIR, --text, --choice or --gen files")
        seconds = time.perf_counter() - t0
        table = format_rows(rows)
        write_json(tmp / "summary.json", {"format": FORMAT, "version": VERSION, "model": str(ckpt),
                                          "seconds": seconds, "rows": rows})
        write_text(tmp / "eval.md", table + "\n")
        write_text(tmp / "documents.jsonl", "".join(
            json.dumps({"corpus": c, "name": s.name, "nll": s.nll, "tokens": s.tokens, "bytes": s.bytes,
                        "bits_per_byte": s.bits_per_byte}) + "\n" for c, scores in documents.items() for s in scores))
        if choice_rows:
            write_text(tmp / "choices.jsonl", "".join(json.dumps(r) + "\n" for r in choice_rows))
        plot_eval(documents, rows, tmp / "eval.png")
    return EvalResult(Path(out), rows, table, seconds, documents)
