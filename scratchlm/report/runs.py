"""A run folder read back from its files: which stages it holds, their settings, curves, summaries,
pictures and timings, without importing a single stage.

A run is either one stage's folder (`scratchlm pretrain`, `sft`, `rm train`, `dpo`, `rl`, ...) or a
folder of stage folders (`scratchlm demo`: pretrain/, sft/, rm/, dpo/, grpo/, ppo/ beside the
tokenizer, data/ and report.md). A stage is recognised by what it wrote, not by its folder's name:
an RL summary names its algorithm, a DPO summary its beta, the reward model writes rm_summary.json,
SFT the base model's answers, CAI cai_summary.json, classification labels.json; a folder with only
metrics.jsonl or checkpoints is a pretraining run. An evaluation (`scratchlm eval`) is a
`summary.json` whose "format" is "scratchlm.eval", in `evaluation/` (the verb's default), `evaluation/<model>/`
(the demo's) or `eval/`, beside the stage it scored or in the run itself.

A file that cannot be read is skipped and named in `Run.problems`, so one torn file costs a line on
the card, not the card. Timings are what the files record (report.md's total, an evaluation's
seconds) and, for each stage, the span from its config.json to the last file it wrote (file
modification times: a copy made without keeping them shows the time of the copy).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError
from scratchlm.report import markdown as md

EVAL_FORMAT = "scratchlm.eval"
TITLES = {
    "pretrain": "Pretraining", "sft": "Supervised fine-tuning", "classify": "Classification fine-tuning",
    "rm": "Reward model", "dpo": "Direct preference optimisation", "cai": "Constitutional AI",
    "grpo": "Online RL: GRPO", "ppo": "Online RL: PPO", "rft": "Online RL: rejection-sampling fine-tuning",
}
RL_KINDS = ("grpo", "ppo", "rft")
# The curve each kind's panel draws: (training key, validation key or None, y label).
CURVES = {kind: ("reward", None, "mean reward") for kind in RL_KINDS}
DEFAULT_CURVE = ("loss", "val_loss", "loss")
TOKENIZER_HEADER = "kind vocab bytes/token train s encode MB/s example"  # experiments/tokenizers.format_table


@dataclass
class Stage:
    kind: str  # a key of TITLES (an RL run: its algorithm)
    path: Path
    rel: str  # the folder relative to the run, "." for the run itself
    key: str = ""  # what pairs it with the other run's stage when two runs are compared
    config: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[tuple[str, str]] = field(default_factory=list)  # (file under the stage, markdown)
    images: list[Path] = field(default_factory=list)
    description: list[md.Block] = field(default_factory=list)  # its prose in the run's report.md
    seconds: float | None = None  # config.json to the last file written

    @property
    def title(self) -> str:
        title = TITLES.get(self.kind, self.kind)
        return title if self.rel == "." else f"{title} ({self.rel}/)"


@dataclass
class EvalResult:
    rel: str  # the stage (or evaluation/<model>) folder it belongs to, relative to the run
    model: str
    seconds: float | None
    rows: list[dict[str, Any]]
    file: str = "summary.json"  # the summary itself, relative to the run


@dataclass
class Run:
    path: Path
    name: str
    config: dict[str, Any] | None = None
    stages: list[Stage] = field(default_factory=list)
    evals: list[EvalResult] = field(default_factory=list)
    tokenizer_table: md.Table | None = None
    tokenizer_text: list[md.Block] = field(default_factory=list)
    tokenizer_png: Path | None = None
    tokenizer: dict[str, Any] | None = None  # kind and vocabulary of RUN/tokenizer.json
    manifest: dict[str, Any] | None = None  # data/manifest.json
    # report.md's other sections, before and after its first stage; (title, None) marks the tokenizers' place
    sections_before: list[tuple[str, list[md.Block] | None]] = field(default_factory=list)
    sections_after: list[tuple[str, list[md.Block]]] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)  # pictures of the run folder no section shows
    total_seconds: float | None = None  # recorded in report.md
    problems: list[str] = field(default_factory=list)


def read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path}: not readable as JSON ({str(e).splitlines()[0]})")
        return None


def read_metrics(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; lines that are not JSON records (a torn last line) are counted."""
    records, bad = [], 0
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path}: not readable ({e})")
        return []
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            r = None
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            records.append(r)
        elif line.strip():
            bad += 1
    if bad:
        problems.append(f"{path}: {bad} line(s) that are not JSON records were skipped")
    return records


def number(value: Any) -> float | None:
    """A finite float, or None (strings, NaN, bools)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _eval_summary(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    s = read_json(path, problems)
    return s if isinstance(s, dict) and s.get("format") == EVAL_FORMAT else None


def stage_kind(folder: Path) -> str | None:
    """What stage wrote `folder`, from its files; None when it is no stage's folder."""
    ev = folder / "eval"
    summary = None
    if (ev / "summary.json").is_file():
        try:
            summary = json.loads((ev / "summary.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            summary = None
    if isinstance(summary, dict) and summary.get("format") != EVAL_FORMAT:
        if str(summary.get("algo", "")) in RL_KINDS:
            return str(summary["algo"])
        if "beta" in summary:
            return "dpo"
    if (ev / "rm_summary.json").is_file() or (ev / "rm_summary.md").is_file():
        return "rm"
    if (ev / "cai_summary.json").is_file() or (ev / "cai_summary.md").is_file():
        return "cai"
    if (folder / "labels.json").is_file():
        return "classify"
    if (ev / "answers_base.jsonl").is_file():
        return "sft"
    if (folder / "metrics.jsonl").is_file() or (folder / "ckpt").is_dir():
        return "pretrain"
    return None


def _pictures(folder: Path) -> list[Path]:
    """The PNGs of a folder and its eval/, the stage's own before its loss.png (the card draws losses too)."""
    return [p for where in (folder, folder / "eval") if where.is_dir()
            for p in sorted(where.glob("*.png"), key=lambda p: (p.name == "loss.png", p.name))
            if not p.name.startswith(".")]


def file_span(folder: Path) -> float | None:
    """Seconds from folder/config.json's modification to the newest file's under `folder`."""
    try:
        start = (folder / "config.json").stat().st_mtime
    except OSError:
        return None
    end = start
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                end = max(end, os.stat(os.path.join(root, f)).st_mtime)
            except OSError:
                continue
    return end - start


def read_stage(folder: Path, kind: str, rel: str, problems: list[str]) -> Stage:
    stage = Stage(kind, folder, rel)
    if (folder / "config.json").is_file():
        cfg = read_json(folder / "config.json", problems)
        stage.config = cfg if isinstance(cfg, dict) else None
    if (folder / "metrics.jsonl").is_file():
        stage.metrics = read_metrics(folder / "metrics.jsonl", problems)
    for p in sorted((folder / "eval").glob("*.md")) if (folder / "eval").is_dir() else []:
        try:
            stage.summaries.append((f"eval/{p.name}", p.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{p}: not readable ({e})")
    stage.images = _pictures(folder)
    stage.seconds = file_span(folder)
    return stage


def read_run(path: str | os.PathLike) -> Run:
    """Everything the card shows of the run folder `path`; a UserError when it holds no run."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a folder",
                        fix="pass a run folder: a demo's, or one stage's such as runs/sft-tiny")
    run = Run(path, path.resolve().name or str(path))
    p = run.problems
    if (path / "config.json").is_file():
        cfg = read_json(path / "config.json", p)
        run.config = cfg if isinstance(cfg, dict) else None

    own = stage_kind(path)
    if own:
        run.stages.append(read_stage(path, own, ".", p))
    else:
        for child in sorted(c for c in path.iterdir() if c.is_dir() and not c.name.startswith(".")):
            kind = stage_kind(child)
            if kind:
                run.stages.append(read_stage(child, kind, child.name, p))
    order = list(TITLES)
    run.stages.sort(key=lambda s: (order.index(s.kind) if s.kind in order else len(order), s.rel))
    kinds = [s.kind for s in run.stages]
    for s in run.stages:
        s.key = s.kind if kinds.count(s.kind) == 1 else f"{s.kind}:{s.rel}"

    found = [(rel, where) for rel, folder in [(".", path)] + [(s.rel, s.path) for s in run.stages if s.rel != "."]
             for where in (folder / "eval" / "summary.json", folder / "evaluation" / "summary.json",
                           folder / "summary.json")]
    # the demo's evaluation/<model>/ folders, one per model it scored
    found += [(f"evaluation/{w.parent.name}", w) for w in sorted((path / "evaluation").glob("*/summary.json"))]
    for rel, where in found:
        summary = _eval_summary(where, p)
        if summary is not None:
            rows = summary.get("rows")
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                p.append(f"{where}: \"rows\" is not a list of records")
                rows = []
            run.evals.append(EvalResult(rel, str(summary.get("model", "")), number(summary.get("seconds")), rows,
                                        where.relative_to(path).as_posix()))

    if (path / "tokenizer.json").is_file():
        tok = read_json(path / "tokenizer.json", p)
        if isinstance(tok, dict):
            vocab = len(tok.get("tokens", [])) if isinstance(tok.get("tokens"), list) else None
            run.tokenizer = {"kind": tok.get("kind"), "vocab": vocab}
    if (path / "data" / "manifest.json").is_file():
        manifest = read_json(path / "data" / "manifest.json", p)
        run.manifest = manifest if isinstance(manifest, dict) else None
    if (path / "tokenizers.png").is_file():
        run.tokenizer_png = path / "tokenizers.png"
    if (path / "report.md").is_file():
        try:
            _read_report(run, (path / "report.md").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            p.append(f"{path / 'report.md'}: not readable ({e})")
    if own is None:
        shown = {run.tokenizer_png}
        run.images = [x for x in _pictures(path) if x not in shown]
    if not (run.config or run.stages or run.evals or run.tokenizer_png or run.manifest
            or run.sections_before or run.sections_after or run.tokenizer_table):
        raise UserError(f"{path}: holds no run scratchlm recognises (no config.json, metrics.jsonl, report.md, "
                        "eval/summary.json or stage folders)", fix="pass a folder that a scratchlm verb wrote")
    return run


def _read_report(run: Run, text: str) -> None:
    """report.md (the demo's): the tokenizer comparison, each stage's prose, the other sections."""
    m = re.search(r"Total time: ([0-9.]+)\s*s", text)
    run.total_seconds = float(m[1]) if m else None
    seen_stage = False
    for title, body in md.sections(text):
        if not title:
            continue
        blocks = [b for b in md.parse(body) if not (b.kind == "p" and b.text.startswith("Total time:"))]
        stage = next((s for s in run.stages if s.rel != "." and f"`{s.rel}/" in body), None)
        if stage is not None:
            # Its prose, less the lines its own summary files hold (the card shows those with them).
            summaries = " ".join(" ".join(text.split()) for _, text in stage.summaries)
            stage.description = [b for b in blocks if b.kind == "ul" or b.kind == "p" and b.text not in summaries]
            seen_stage = True
        elif title.lower().startswith("tokenizer"):
            run.sections_before.append((title, None))  # where the card's tokenizer section goes
            for b in blocks:
                table = parse_tokenizer_table(b.text) if b.kind == "pre" else None
                if table and run.tokenizer_table is None:
                    run.tokenizer_table = table
                else:
                    run.tokenizer_text.append(b)
        elif blocks:
            (run.sections_after if seen_stage else run.sections_before).append((title, blocks))


def parse_tokenizer_table(text: str) -> md.Table | None:
    """The fixed-width table of `scratchlm tokenizer compare` as a Table; None if it is not one."""
    lines = [x for x in text.splitlines() if x.strip()]
    if len(lines) < 3 or " ".join(lines[0].split()) != TOKENIZER_HEADER or set(lines[1].strip()) != {"-"}:
        return None
    rows = []
    for line in lines[2:]:
        cells = line.split(None, 5)
        if len(cells) < 5:
            return None
        rows.append((cells + [""])[:6])
    return md.Table(["kind", "vocab", "bytes/token", "train s", "encode MB/s", "example"], rows,
                    ["left", "right", "right", "right", "right", "left"])


def all_row(summary: str) -> dict[str, str]:
    """The `all` row of the first table of a stage summary: its headline numbers."""
    table = next((b.table for b in md.parse(summary) if b.kind == "table"), None)
    if table is None:
        return {}
    row = next((r for r in table.rows if r and r[0].strip().lower() == "all"), None)
    return {h: c for h, c in zip(table.header[1:], row[1:])} if row else {}


def training_numbers(stage: Stage) -> dict[str, float]:
    """Steps, the last train and validation loss, the best validation loss, bits/byte, tokens/s."""
    train_key = CURVES.get(stage.kind, DEFAULT_CURVE)[0]
    out: dict[str, float] = {}
    steps = [r["step"] for r in stage.metrics]
    if steps:
        out["steps"] = float(max(steps))
    for key in dict.fromkeys(("loss", train_key)):
        train = [v for r in stage.metrics if (v := number(r.get(key))) is not None and "val_loss" not in r]
        if train:
            out[f"last {key}"] = train[-1]
    val = [v for r in stage.metrics if (v := number(r.get("val_loss"))) is not None]
    if val:
        out["last val_loss"], out["best val_loss"] = val[-1], min(val)
    bpb = [v for r in stage.metrics if (v := number(r.get("val_bpb"))) is not None]
    if bpb:
        out["val bits/byte"] = bpb[-1]
    tps = [v for r in stage.metrics if (v := number(r.get("tokens_per_s"))) is not None]
    if tps:
        out["tokens/s"] = sum(tps) / len(tps)
    return out


def curve(stage: Stage) -> tuple[str, list[tuple[int, float]], list[tuple[int, float]]]:
    """(y label, training points, validation points) of the stage's panel."""
    train_key, val_key, label = CURVES.get(stage.kind, DEFAULT_CURVE)
    train = [(r["step"], v) for r in stage.metrics
             if (v := number(r.get(train_key))) is not None and "val_loss" not in r]
    val = [(r["step"], v) for r in stage.metrics if val_key and (v := number(r.get(val_key))) is not None]
    return label, train, val
