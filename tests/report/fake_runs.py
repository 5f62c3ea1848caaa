"""Run folders written file by file, as the stages write them (no training), and a reader that
takes a card apart: its section titles, tables and embedded pictures. Not a test module."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

SCRIPT = "<script>alert('x')</script>"


def png(width: int = 40, height: int = 20, rgb: tuple[int, int, int] = (30, 120, 200)) -> bytes:
    """A small solid-colour PNG, built by hand (8-bit RGB, no filter)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes(rgb) * width
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


def write(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content, indent=2), encoding="utf-8")
    return path


def config(name: str = "tiny", **sections: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": name, "out_dir": "runs/x", "seed": 1337,
        "tokenizer": {"kind": "bpe", "vocab_size": 2048},
        "data": {"val_fraction": 0.05, "dedup": True},
        "model": {"arch": "gpt", "n_layer": 4, "n_embd": 128},
        "train": {"max_steps": 30, "lr": 0.002, "batch_size": 16},
        "sft": {"base": "", "n_tasks": 3000}, "pref": {"base": ""}, "dpo": {"beta": 0.1}, "rl": {"algo": "grpo"},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def training_stage(folder: Path, cfg: dict[str, Any], losses=(6.4, 5.9, 5.6), val=(6.0, 5.7),
                   extra: dict[str, float] | None = None) -> Path:
    """config.json, metrics.jsonl (train records every 10 steps, validation at the middle and end,
    a skipped batch, a torn last line), loss.png and a checkpoint folder."""
    write(folder / "config.json", cfg)
    lines = [json.dumps({"step": 10 * (i + 1), "loss": v, "tokens_per_s": 8000.0 + i, **(extra or {})})
             for i, v in enumerate(losses)]
    lines.insert(1, json.dumps({"step": 15, "val_loss": val[0], "val_bpb": float("nan")}))
    lines.append(json.dumps({"step": 10 * len(losses), "val_loss": val[1], "val_bpb": 2.475}))
    lines.append(json.dumps({"step": 31, "skipped": 1, "loss": "nan"}))
    write(folder / "metrics.jsonl", "\n".join(lines) + '\n{"step": 32, "lo')
    write(folder / "loss.png", png(60, 35))
    (folder / "ckpt" / "best").mkdir(parents=True)
    return folder


def family_table(before: str = "base", after: str = "sft") -> str:
    """A stage summary's table: checker accuracy per task family before and after the stage."""
    return (f"| family | n | {before} checked | {after} checked |\n|---|---:|---:|---:|\n"
            "| add | 4 | 0.0% | 25.0% |\n| all | 20 | 5.0% | 45.0% |")

TOKENIZER_BLOCK = """```
kind         vocab bytes/token  train s encode MB/s  example
------------------------------------------------------------
byte           262        1.00     0.00      322.93  I|n| |t|h|e
bpe           2048        3.97     0.08        6.45  I|n| the| beginning
```"""


def eval_summary(values: tuple[float, float] = (1.93, 0.41)) -> dict[str, Any]:
    return {"format": "scratchlm.eval", "version": 1, "model": "runs/demo/sft/ckpt/best", "seconds": 12.3,
            "rows": [{"task": "heldout-bpb", "kind": "perplexity", "metric": "bits_per_byte", "value": values[0],
                      "n": 59},
                     {"task": "cloze", "kind": "choice", "metric": "acc", "value": values[1], "n": 200}]}


def demo_run(root: Path, lr: float = 0.002, eval_values: tuple[float, float] = (1.93, 0.41),
             with_dpo: bool = True) -> Path:
    """A demo's folder: settings, tokenizers, data, report.md and pretrain, sft, rm, dpo, grpo and eval."""
    write(root / "config.json", config(train={"lr": lr}))
    write(root / "tokenizer.json", {"format": "scratchlm.tokenizer", "kind": "bpe", "tokens": ["a", "b", "c"]})
    write(root / "tokenizers.png", png(90, 35, (200, 100, 30)))
    write(root / "data" / "manifest.json", {"format": "scratchlm.shards", "documents": {"train": 1130, "val": 59},
                                            "tokens": {"train": 1169995, "val": 65385},
                                            "filtered": {"duplicate": 2, "too_short": 0}})
    training_stage(root / "pretrain", config(train={"lr": lr}))
    sft = training_stage(root / "sft", config("sft-tiny", sft={"base": str(root / "pretrain")}), (2.0, 1.5, 1.2),
                         (1.8, 1.4))
    write(sft / "eval" / "answers_base.jsonl", "")
    write(sft / "eval" / "summary.md", family_table() + "\n")
    rm = training_stage(root / "rm", config("rm-tiny"), (0.69, 0.66, 0.63), (0.70, 0.68))
    write(rm / "eval" / "rm_summary.json", {"n_held_out": 6})
    write(rm / "eval" / "rm_summary.md", "held-out pairwise accuracy on 6 pairs\n\n| pairs | n | reward model |\n"
                                         "|---|---:|---:|\n| all | 6 | 66.7% |\n| family \\| odd | 1 | 0.0% |\n")
    write(rm / "rm_checks.png", png(120, 40, (20, 160, 60)))
    if with_dpo:
        dpo = training_stage(root / "dpo", config("dpo-tiny"), (6.1, 6.0, 5.9), (5.95, 5.87))
        write(dpo / "eval" / "summary.json", {"beta": 0.1, "steps": 30})
        write(dpo / "eval" / "summary.md", family_table("sft", "dpo") + "\n\nheld-out implicit-reward accuracy 33.3% "
              "on 6 pairs\n")
    grpo = training_stage(root / "grpo", config("grpo-tiny"), (0.0, 0.0, 0.0), (0.0, 0.0), {"reward": 0.25})
    write(grpo / "eval" / "summary.json", {"algo": "grpo", "steps": 4})
    write(grpo / "eval" / "summary.md", family_table("sft", "rl") + "\n\ngrpo, 4 steps, reward checker\n")
    write(grpo / "rl.png", png(150, 50, (120, 30, 160)))
    write(root / "eval" / "summary.json", eval_summary(eval_values))
    write(root / "report.md", f"""# scratchlm demo report

Run folder: `{root}`; preset `tiny`.

## Corpus

King James Bible (public domain): 76 chapters.

## Tokenizers

Our bpe tokenizer: vocab 2048.

All kinds on a sample of the corpus (chart: `tokenizers.png`):

{TOKENIZER_BLOCK}

## Pretraining

A 4-layer GPT trained 30 steps. Loss curve: `pretrain/loss.png`.

- before training: `And God said,oll`
- after training:  `And God said, and`

## Supervised fine-tuning

Held-out answers (answers in `sft/eval/`):

{family_table()}

## Online RL: GRPO

GRPO from the SFT model (curves: `grpo/rl.png`).

grpo, 4 steps, reward checker

## Every stage on the same held-out prompts

| stage | all | KL to SFT |
|---|---|---|
| SFT | 45.0% | 0.00 |
| GRPO | 50.0% | 0.02 |


Total time: 36.7s.
""")
    return root


@dataclass
class Card:
    h2: list[str] = field(default_factory=list)
    tables: list[list[list[str]]] = field(default_factory=list)  # rows of cell texts, header row first
    images: list[bytes] = field(default_factory=list)
    scripts: int = 0


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.card, self.text, self.cell, self.in_h2 = Card(), [], None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "h2":
            self.in_h2, self.text = True, []
        elif tag == "table":
            self.card.tables.append([])
        elif tag == "tr":
            self.card.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "img":
            src = a.get("src", "")
            assert src.startswith("data:image/png;base64,"), src[:40]
            self.card.images.append(base64.b64decode(src.split(",", 1)[1], validate=True))
        elif tag == "script":
            self.card.scripts += 1

    def handle_endtag(self, tag):
        if tag == "h2":
            self.card.h2.append("".join(self.text).strip())
            self.in_h2 = False
        elif tag in ("td", "th") and self.cell is not None:
            self.card.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.in_h2:
            self.text.append(data)
        if self.cell is not None:
            self.cell.append(data)


def read_card(html_text: str) -> Card:
    reader = _Reader()
    reader.feed(html_text)
    reader.close()
    return reader.card


def find_table(card: Card, *header: str) -> list[list[str]]:
    """The first table whose header row starts with `header`."""
    found = next((t for t in card.tables if t and t[0][:len(header)] == list(header)), None)
    assert found is not None, f"no table with header {header}: {[t[0] for t in card.tables if t]}"
    return found
