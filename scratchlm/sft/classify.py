"""`scratchlm classify`: classification fine-tuning, a class head on a pretrained LM (the stage).

The head is `scratchlm.model.classifier.ClassifierLM`; reading, splitting, encoding and batching
the labelled texts is `scratchlm.data.labelled`; this module trains, evaluates (confusion matrix,
accuracy, per-class scores, the heatmap) and predicts.

    text -> [EOT] ids [EOT] -> pretrained transformer body -> hidden state of the LAST real token
         -> Linear(C -> K) -> class logits

Choices:
- pooling = the last real token (GPT-1/2-style classifiers, HF's *ForSequenceClassification on
  decoders): with causal attention position t only sees tokens <= t, so the last position is the
  only one whose hidden state has read the whole text. Mean pooling would mix in states that
  never saw the end, and the first token sees nothing but itself.
- framing: when the tokenizer has `<|endoftext|>`, a text is `EOT text EOT`: the leading one is
  how every pretraining document began (the separator goes before each document), the trailing
  one is a fixed "read it all" position to pool at (GPT-1's extract token), whatever the text's
  last word.
- padding: batches are right-padded with -1, never a real id. `ClassifierLM.forward` finds each
  row's length from it (the last index with id >= 0) and feeds the pads as id 0; causal attention
  keeps pads (after the text) from changing any real position, so padding cannot change a row's
  logits. The loop's `model(x, y)` carries no lengths, so they travel inside x; no pad token is
  needed, and -1 is already the repository's "ignore" value.
- the shared loop runs unchanged: forward returns logits (B, 1, K) and y is (B, 1), so
  `train_model`'s `evaluate` (cross-entropy over logits.flatten(0, 1) vs y.flatten()) computes
  the mean per-example loss. Its "bits/byte" column indexes the token byte table with class ids
  and means nothing here (K must stay below the vocabulary, checked); accuracy and the confusion
  matrix on the validation split are written to RUN/eval/ after training. Its tokens/s and MFU
  count block_size tokens per row, while batches are padded only to their longest text.
- the base LM head is dropped (replaced by an identity, so the body's own forward returns the
  final normed hidden states (B, T, C) for every architecture); with tied embeddings the token
  table stays as the input embedding.
- data: JSONL (or a JSON list) of {"text": str, "label": str | int}, or CSV with a header naming
  `text` and `label` columns; labels are sorted strings mapped to ids 0..K-1 and saved as
  RUN/labels.json (beside the checkpoints; predict finds it from a run or checkpoint folder).
  The validation split (`--sft.val_fraction`) is stratified and seeded; texts longer than the
  context follow `--sft.overlong` (truncate keeps the start, drop skips them).
- full fine-tuning by default; `--sft.lora_r=8` trains LoRA adapters on the body plus the head.

Left out: multi-label targets, class weighting for imbalanced data, pair inputs (premise /
hypothesis) beyond what a single text holds, and resuming an interrupted classify run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from scratchlm import checkpoint as ckpt_io
from scratchlm.config import Config
from scratchlm.data.labelled import ClassifyLoader, collate, encode_text, label_names, read_labelled, stratified_split
from scratchlm.errors import UserError
from scratchlm.io import atomic_open, write_json, write_text
from scratchlm.model import build_model
from scratchlm.model.classifier import ClassifierLM
from scratchlm.model.lora import adapt_model
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.device import pick_device
from scratchlm.train.loop import Batches, RunResult, train_model

LABELS_FILE = "labels.json"
LABELS_FORMAT = "scratchlm.classifier"


# -- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def class_probs(model: ClassifierLM, rows: list[list[int]], batch: int = 64) -> torch.Tensor:
    """(N, K) class probabilities for encoded texts, in eval mode, on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch):
        x, _ = collate(rows[i : i + batch], device=device)
        logits, _ = model(x)
        out.append(logits[:, 0].float().softmax(-1).cpu())
    model.train(was_training)
    return torch.cat(out)


def confusion_matrix(gold: list[int], pred: list[int], n_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    cm = torch.zeros(n_classes, n_classes, dtype=torch.long)
    for g, p in zip(gold, pred):
        cm[g, p] += 1
    return cm


def class_scores(cm: torch.Tensor) -> dict[str, Any]:
    """Accuracy, the majority-class baseline, and per-class precision / recall / F1 from a confusion matrix."""
    n = int(cm.sum())
    tp = cm.diag().double()
    precision = (tp / cm.sum(0).clamp_min(1)).tolist()  # of what was predicted as c, the share that is c
    recall = (tp / cm.sum(1).clamp_min(1)).tolist()  # of what is c, the share found
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
    return {"n": n, "accuracy": float(tp.sum()) / max(n, 1), "majority_baseline": int(cm.sum(1).max()) / max(n, 1),
            "macro_f1": sum(f1) / len(f1), "precision": precision, "recall": recall, "f1": f1}


def format_confusion(cm: torch.Tensor, labels: list[str], scores: dict[str, Any]) -> str:
    """A markdown table: rows true labels, columns predicted, then recall per row."""
    head = f"accuracy {scores['accuracy']:.3f} on {scores['n']} validation examples " \
           f"(majority class {scores['majority_baseline']:.3f}, macro F1 {scores['macro_f1']:.3f})\n\n"
    lines = ["| true \\ predicted | " + " | ".join(labels) + " | recall |",
             "|---|" + "---:|" * (len(labels) + 1)]
    for i, name in enumerate(labels):
        lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in cm[i]) + f" | {scores['recall'][i]:.2f} |")
    return head + "\n".join(lines)


def plot_confusion(cm: torch.Tensor, labels: list[str], accuracy: float, out: Path) -> None:
    """The confusion matrix as a heatmap PNG (counts written in the cells up to 20 classes), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = len(labels)
    size = min(3 + 0.45 * K, 16)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm.numpy(), cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(K), labels, rotation=45 if K > 4 else 0, ha="right" if K > 4 else "center")
    ax.set_yticks(range(K), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"validation accuracy {accuracy:.3f} (n={int(cm.sum())})")
    if K <= 20:
        top = max(int(cm.max()), 1)
        for i in range(K):
            for j in range(K):
                v = int(cm[i, j])
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# -- labels.json and loading ----------------------------------------------------------------------


def find_labels(path: str | Path, ckpt: Path) -> Path:
    """labels.json in the checkpoint folder, or the run folder above it (RUN/ckpt/step_N -> RUN)."""
    for folder in (Path(path), ckpt, ckpt.parent, ckpt.parent.parent):
        if (folder / LABELS_FILE).is_file():
            return folder / LABELS_FILE
    raise UserError(f"{path}: no {LABELS_FILE} beside the checkpoint: not a classifier run",
                    fix="pass the folder `scratchlm classify train --out` wrote")


def read_labels(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if meta.get("format") != LABELS_FORMAT or not isinstance(labels, list) or len(labels) < 2 or \
            not all(isinstance(x, str) for x in labels):
        raise UserError(f"{file}: not a classifier's labels file (needs format {LABELS_FORMAT!r} and 2+ labels)")
    return meta


def load_classifier(path: str | Path, device: str = "cpu") -> tuple[ClassifierLM, Tokenizer, Config, list[str]]:
    """A trained classifier from a run or checkpoint folder: the base architecture from config.json,
    the head's size from labels.json, then the weights. Returns (model in eval mode, tok, cfg, labels)."""
    ckpt = ckpt_io.find_checkpoint(path)
    labels = read_labels(find_labels(path, ckpt))["labels"]
    cfg, tok = ckpt_io.load_config_and_tokenizer(ckpt)
    model = ClassifierLM(build_model(cfg.model), len(labels))
    _adapt(model, cfg)
    ckpt_io.load_weights(model, ckpt)
    return model.to(device).eval(), tok, cfg, labels


def _adapt(model: ClassifierLM, cfg: Config) -> list[str]:
    """LoRA (QLoRA) on the body when sft.lora_r > 0; the head, outside the body, stays trainable."""
    return adapt_model(model.body, cfg)


# -- the stage ------------------------------------------------------------------------------------


@dataclass
class ClassifyResult:
    run: RunResult
    labels: list[str]
    confusion: torch.Tensor  # (K, K), row = true, column = predicted
    scores: dict[str, Any]
    table: str


def train_classifier(cfg: Config, data: str | Path, *, progress: bool = True) -> ClassifyResult:
    """Fine-tune `cfg.sft.base` with a class head on a labelled file; everything lands in cfg.out_dir."""
    run_dir = Path(cfg.out_dir)
    if not cfg.sft.base:
        raise UserError("no base model", fix="pass --base RUN, a pretrained run or checkpoint folder")
    base = ckpt_io.find_checkpoint(cfg.sft.base)
    base_cfg, tok = ckpt_io.load_config_and_tokenizer(base)
    cfg.model = replace(base_cfg.model)
    if cfg.sft.overlong not in ("truncate", "drop"):
        raise UserError(f"sft.overlong={cfg.sft.overlong!r} is unknown", fix="use truncate or drop")

    examples = read_labelled(data)
    labels = label_names(examples, str(data))
    if len(labels) > cfg.model.vocab_size:  # the loop's bits-per-byte meter indexes its (V,) byte table by target
        raise UserError(f"{data}: {len(labels)} labels, more than the base model's vocabulary "
                        f"({cfg.model.vocab_size})")
    index = {name: i for i, name in enumerate(labels)}
    block = cfg.model.block_size
    encoded, truncated, dropped = [], 0, 0  # (ids, class id, example)
    for e in examples:
        ids, cut = encode_text(tok, e.text, block, cfg.sft.overlong)
        truncated, dropped = truncated + (cut and ids is not None), dropped + (ids is None)
        if ids is not None:
            encoded.append((ids, index[e.label], e))
    if not encoded:
        raise UserError(f"{data}: every text is longer than the context ({block} tokens)",
                        fix="use --sft.overlong=truncate")
    if truncated or dropped:
        print(f"texts longer than the context ({block} tokens): {truncated} truncated, {dropped} dropped "
              "(--sft.overlong)")
    train_idx, val_idx = stratified_split([y for _, y, _ in encoded], cfg.sft.val_fraction, cfg.seed)
    train_rows, val_rows = [encoded[i] for i in train_idx], [encoded[i] for i in val_idx]
    counts = {name: sum(y == i for _, y, _ in encoded) for i, name in enumerate(labels)}
    print(f"{len(encoded)} examples, {len(labels)} labels ({', '.join(f'{k}: {v}' for k, v in counts.items())}); "
          f"{len(train_rows)} train, {len(val_rows)} validation")

    torch.manual_seed(cfg.seed)
    body = build_model(replace(base_cfg.model))
    ckpt_io.load_weights(body, base)
    model = ClassifierLM(body, len(labels))
    wrapped = _adapt(model, cfg)
    if wrapped:
        print(f"LoRA r={cfg.sft.lora_r} on {len(wrapped)} layers (+ the class head)")
    write_json(run_dir / LABELS_FILE, {"format": LABELS_FORMAT, "version": 1, "labels": labels,
                                       "pooling": "last_token", "eot_framing": tok.eot_id is not None,
                                       "base": str(base), "data": str(data)})

    t = cfg.train
    # Validation sees each held-out text once: no more batches than it takes to cover them.
    t.eval_iters = max(1, min(t.eval_iters, math.ceil(len(val_rows) / t.batch_size)))
    device = pick_device(t.device)  # where train_model will put the model
    batches = Batches(
        train=ClassifyLoader([r[0] for r in train_rows], [r[1] for r in train_rows], t.batch_size, shuffle=True,
                             seed=cfg.seed, device=device),
        make_val=lambda: ClassifyLoader([r[0] for r in val_rows], [r[1] for r in val_rows], t.batch_size,
                                        shuffle=False, fill=False, device=device),
    )
    result = train_model(cfg, model.train(), tok, batches, progress=progress, desc="classify")

    probs = class_probs(model, [r[0] for r in val_rows])  # (N_val, K)
    pred = probs.argmax(-1).tolist()
    gold = [r[1] for r in val_rows]
    cm = confusion_matrix(gold, pred, len(labels))
    scores = class_scores(cm)
    table = format_confusion(cm, labels, scores)
    eval_dir = run_dir / "eval"
    write_text(eval_dir / "confusion.md", table + "\n")
    write_json(eval_dir / "metrics.json", {**scores, "labels": labels, "confusion": cm.tolist(), "step": result.steps})
    write_text(eval_dir / "predictions.jsonl", "".join(
        json.dumps({"source": e.where, "text": e.text, "gold": e.label, "predicted": labels[p],
                    "prob": round(float(probs[i, p]), 6)}) + "\n"
        for i, ((_, _, e), p) in enumerate(zip(val_rows, pred))))
    plot_confusion(cm, labels, scores["accuracy"], eval_dir / "confusion.png")
    print(table)
    print(f"-> {eval_dir}")
    return ClassifyResult(result, labels, cm, scores, table)


def predict(path: str | Path, texts: list[str], device: str = "cpu") -> tuple[list[str], torch.Tensor]:
    """(labels, (N, K) probabilities) for texts, from a classifier run or checkpoint folder."""
    if not texts or any(not t.strip() for t in texts):
        raise UserError("nothing to classify", fix='pass --text "..."')
    model, tok, cfg, labels = load_classifier(path, device)
    rows = [encode_text(tok, t, cfg.model.block_size, "truncate")[0] or [] for t in texts]  # truncate: never None
    return labels, class_probs(model, rows)
