"""The report card: one self-contained HTML page about a run, or two runs side by side.

Self-contained means the file is all there is: pictures are embedded as base64 `data:` PNGs, the
style sheet is inline, there is no script and nothing is fetched, so the page opens the same from
a laptop, a CI artifact or an e-mail. Every piece of text read from the run is escaped.

One run: its settings (the run's config.json by section, each stage's differences from it), the
tokenizer comparison, the data, the loss curves of every stage in one picture drawn here from the
metrics.jsonl files, a table of each stage's training numbers, one section per stage (its prose
from report.md, its summary tables, its own pictures), the evaluation scores, and the timings.
Two runs: the same sections, each with a column per run; settings as the keys that differ, the
curves drawn over each other, and numbers, scores and timings as one table with a column per run.

A card carries `<meta name="generator" content="scratchlm report">` (`is_card`). Like every verb, the
report replaces an existing file at its output path, an earlier card included, only with --overwrite.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scratchlm.io import write_text
from scratchlm.report import markdown as md
from scratchlm.report.runs import Run, Stage, all_row, curve, read_run, training_numbers
from scratchlm.rundir import check_output_path

GENERATOR = '<meta name="generator" content="scratchlm report">'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT_SECTIONS = ("tokenizer", "data", "model", "train")
# The config sections a stage reads (mirrors the verbs' settings in scratchlm/cli).
STAGE_SECTIONS = {"pretrain": ROOT_SECTIONS, "sft": ("train", "sft"), "classify": ("train", "sft"),
                  "rm": ("train", "pref", "rm"), "dpo": ("train", "pref", "dpo"), "cai": ("pref", "dpo", "cai"),
                  "grpo": ("train", "rl"), "ppo": ("train", "rl"), "rft": ("train", "rl")}
COLOURS = ("tab:blue", "tab:orange")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;
 padding:16px 24px;color:#1d2330;background:#fff;line-height:1.4}
h1{font-size:26px;margin:8px 0 2px}
h2{font-size:20px;border-bottom:2px solid #d5dbe6;padding-bottom:3px;margin:28px 0 10px}
h3{font-size:16px;margin:14px 0 6px}
h4{font-size:14px;margin:10px 0 4px}
.sub{color:#5a6375;margin:0 0 6px}
nav a{margin-right:12px;color:#2b5cab;text-decoration:none;font-size:14px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d5dbe6;padding:3px 8px;vertical-align:top}
th{background:#eef2f8;text-align:left}
tbody tr:nth-child(even){background:#f7f9fc}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.cfg{font-family:ui-monospace,monospace;font-size:12px}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
code{background:#f1f3f7;padding:0 3px;border-radius:3px;white-space:pre-wrap}
pre{background:#f6f8fa;padding:8px;overflow-x:auto}
img{max-width:100%;height:auto;border:1px solid #e3e7ee;box-sizing:border-box}
figure{margin:4px 0}
figcaption{font-size:12px}
.pics{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.pics figure{flex:1 1 440px;max-width:100%}
.pics figure.wide{flex-basis:100%}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:18px}
.pair>div{min-width:0;overflow-x:auto}
.pair .pics figure{flex-basis:100%}
.pair table{font-size:12px}
.run{font-weight:600;color:#2b5cab}
.none{color:#8a93a5;font-style:italic}
.notes{color:#8a4b00;font-size:13px}
"""


def is_card(path: str | os.PathLike) -> bool:
    """Whether `path` is a card written here."""
    try:
        with open(path, "rb") as f:
            return GENERATOR.encode() in f.read(4096)
    except OSError:
        return False


def default_output(run: str | os.PathLike, other: str | os.PathLike | None = None) -> Path:
    """RUN/report.html for one run; RUN_A/compare-<name of RUN_B>.html for two."""
    if other is None:
        return Path(run) / "report.html"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(other).resolve().name) or "other"
    return Path(run) / f"compare-{name}.html"


def write_card(run: str | os.PathLike, out: str | os.PathLike | None = None, *,
               other: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write the card of `run` (beside `other` when given) to `out` (default: `default_output`);
    an existing file, an earlier card included, is replaced only with `overwrite`."""
    runs = [read_run(run)] + ([read_run(other)] if other is not None else [])
    out = Path(out) if out is not None else default_output(run, other)
    check_output_path(out, overwrite=overwrite)
    write_text(out, render(runs))
    return out


def build_card(run: str | os.PathLike, other: str | os.PathLike | None = None) -> str:
    """The card's HTML, for one run or two."""
    return render([read_run(run)] + ([read_run(other)] if other is not None else []))


def render(runs: list[Run]) -> str:
    if len(runs) == 2 and runs[0].name == runs[1].name:  # two runs/x/demo: tell them apart by the parent too
        for r in runs:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    sections = _single_sections(runs[0]) if len(runs) == 1 else _compare_sections(runs[0], runs[1])
    sections = [(sid, title, body) for sid, title, body in sections if body]
    what = "report card" if len(runs) == 1 else "comparison"
    title = f"scratchlm {what}: " + " vs ".join(r.name for r in runs)
    folders = " vs ".join(f"<code>{html.escape(str(r.path))}</code>" for r in runs)
    nav = "".join(f'<a href="#{sid}">{html.escape(t)}</a>' for sid, t, _ in sections)
    body = "\n".join(f'<section id="{sid}"><h2>{html.escape(t)}</h2>\n{b}</section>' for sid, t, b in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            f"<header><h1>{html.escape(title)}</h1><p class=\"sub\">run folder: {folders}</p>"
            f"<nav>{nav}</nav></header>\n{body}\n</body></html>\n")


# ---------------------------------------------------------------------------------------------
# Pieces


def fmt(value: Any) -> str:
    """A number for a table: integers whole, others to 4 significant digits; anything else as text."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "" if value is None else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"[+\-–]?[0-9.,]+%?|–", text.strip()))


def table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """An HTML table of escaped cells; numbers formatted and right-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = []
    for row in rows:
        cells = []
        for v in row:
            text = fmt(v)
            kind = cls or ("num" if _looks_numeric(text) else "")
            cells.append(f'<td class="{kind}">{html.escape(text)}</td>' if kind else f"<td>{html.escape(text)}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(lines) + "\n</tbody></table>\n"


def image(data: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode("ascii")}">')


def picture(path: Path, run: Run, alt: str | None = None) -> str:
    """A PNG file embedded; one that is not a PNG is named in the run's notes instead."""
    try:
        data = path.read_bytes()
    except OSError as e:
        run.problems.append(f"{path}: not readable ({e.strerror or e})")
        return ""
    if not data.startswith(PNG_MAGIC):
        run.problems.append(f"{path}: not a PNG file; left out")
        return ""
    rel = path.relative_to(run.path) if path.is_relative_to(run.path) else path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # the IHDR chunk
    # Several panels (a row of them, or rows of three) get the whole width; a single plot half of it.
    wide = ' class="wide"' if width >= 1200 or height and width / height >= 2.2 else ""
    return f"<figure{wide}>{image(data, alt or str(rel))}<figcaption><code>{html.escape(str(rel))}</code>" \
           "</figcaption></figure>"


def pair(runs: list[Run], cell: Callable[[Run], str]) -> str:
    """Two columns, one per run; empty when neither run has anything here."""
    cells = [cell(r) for r in runs]
    if not any(c.strip() for c in cells):
        return ""
    return '<div class="pair">' + "".join(
        f'<div><p class="run">{html.escape(r.name)}</p>{c or "<p class=none>not in this run</p>"}</div>'
        for r, c in zip(runs, cells)) + "</div>\n"


def config_value(v: Any, limit: int = 60) -> str:
    """A setting as text; a long one keeps its start and end (where two paths tend to differ)."""
    text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit // 2 - 2] + " ... " + text[-(limit // 2 - 3):]


def flat(cfg: dict[str, Any] | None, sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """{"section.key": value} of a config (top-level scalars under their own names)."""
    out: dict[str, Any] = {}
    for k, v in (cfg or {}).items():
        if isinstance(v, dict):
            if sections is None or k in sections:
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        elif sections is None:
            out[k] = v
    return out


def plot_curves(panels: list[tuple[str, str, list[tuple[str, list, list]]]]) -> bytes | None:
    """One panel per (title, y label, [(run label, train points, validation points)]), three a row."""
    panels = [p for p in panels if any(t or v for _, t, v in p[2])]
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.8 * cols, 2.7 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, ylabel, lines) in zip(axes, panels):
        several = len(lines) > 1
        for i, (label, train, val) in enumerate(lines):
            prefix = f"{label}: " if several else ""
            if train:
                ax.plot(*zip(*train), color=COLOURS[i % 2], lw=1.4, label=f"{prefix}train")
            if val:
                ax.plot(*zip(*val), "o--" if several else "o-", color=COLOURS[i % 2] if several else "tab:red",
                        ms=3.5, lw=1, label=f"{prefix}validation")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _panel(stage: Stage) -> tuple[str, str, list[tuple[str, list, list]]]:
    label, train, val = curve(stage)
    return stage.title, label, [("", train, val)]


# ---------------------------------------------------------------------------------------------
# One run


def settings_html(run: Run) -> str:
    own = run.stages[0] if len(run.stages) == 1 and run.stages[0].rel == "." else None
    cfg = run.config if run.config is not None else (own.config if own else None)
    parts = []
    if cfg:
        scalars = ", ".join(f"{k} {config_value(v)}" for k, v in cfg.items() if not isinstance(v, dict))
        parts.append(f"<p>{html.escape(scalars)}</p>")
        names = STAGE_SECTIONS.get(own.kind, ROOT_SECTIONS) if own else ROOT_SECTIONS
        rows = [[s, ", ".join(f"{k}={config_value(v)}" for k, v in cfg[s].items())]
                for s in names if isinstance(cfg.get(s), dict)]
        parts.append(table(["section", "settings"], rows, "cfg"))
    staged = [s for s in run.stages if s.rel != "." and s.config]
    if staged:
        base = flat(cfg)
        rows = []
        for s in staged:
            diff = {k: v for k, v in flat(s.config).items() if k != "name" and base.get(k, object()) != v}
            rows.append([f"{s.rel}/", str(s.config.get("name", "")),
                         ", ".join(f"{k}={config_value(v)}" for k, v in diff.items()) or "(same)"])
        parts.append("<h3>Each stage, where it differs from the run's config.json</h3>"
                     + table(["stage", "preset", "settings"], rows, "cfg"))
    if cfg:
        parts.append("<details><summary>the whole config.json</summary><pre>"
                     f"{html.escape(json.dumps(cfg, indent=1, ensure_ascii=False))}</pre></details>")
    return "\n".join(parts)


def tokenizers_html(run: Run) -> str:
    parts = []
    if run.tokenizer and not run.tokenizer_text:
        parts.append(f"<p>The run's tokenizer: {html.escape(str(run.tokenizer['kind']))}, "
                     f"vocabulary {html.escape(fmt(run.tokenizer['vocab']))}.</p>")
    parts.append(md.blocks_html(run.tokenizer_text) if run.tokenizer_text else "")
    if run.tokenizer_table:
        parts.append(md.table_html(run.tokenizer_table))
    if run.tokenizer_png:
        parts.append(picture(run.tokenizer_png, run))
    return "".join(parts) if (run.tokenizer_table or run.tokenizer_png or run.tokenizer) else ""


def data_html(run: Run) -> str:
    m = run.manifest
    if not m:
        return ""
    docs = m.get("documents", {}) if isinstance(m.get("documents"), dict) else {}
    tokens = m.get("tokens", {}) if isinstance(m.get("tokens"), dict) else {}
    rows = [[split, docs.get(split, ""), n] for split, n in tokens.items()]
    filtered = m.get("filtered", {}) if isinstance(m.get("filtered"), dict) else {}
    note = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in filtered.items())
    return (table(["split", "documents", "tokens"], rows)
            + (f"<p>Documents removed by the filters: {html.escape(note)}.</p>" if note else ""))


def stage_numbers(stage: Stage) -> dict[str, Any]:
    """Training numbers, then the `all` row of each summary table (its headline)."""
    out: dict[str, Any] = dict(training_numbers(stage))
    for name, text in stage.summaries:
        for k, v in all_row(text).items():
            if k.strip() != "n":
                out[k if k not in out else f"{k} ({name})"] = v
    return out


def training_html(run: Run) -> str:
    numbers = {s.title: n for s in run.stages if (n := training_numbers(s))}
    cols = [c for c in ("steps", "last loss", "last val_loss", "best val_loss", "val bits/byte", "last reward",
                        "tokens/s") if any(c in n for n in numbers.values())]
    return table(["stage"] + cols, [[t] + [n.get(c) for c in cols] for t, n in numbers.items()]) if numbers else ""


def stage_html(stage: Stage | None, run: Run) -> str:
    if stage is None:
        return ""
    parts = [md.blocks_html(stage.description)]
    for name, text in stage.summaries:
        parts.append(f"<h4><code>{html.escape(name)}</code></h4>" + md.to_html(text, heading_shift=3))
    pics = "".join(picture(p, run) for p in stage.images)
    parts.append(f'<div class="pics">{pics}</div>' if pics else "")
    return "".join(parts) or "<p class=none>no summary or pictures in this folder</p>"


def eval_rows(run: Run) -> list[tuple[str, str, str, str, Any, Any]]:
    """(where, task, kind, metric, value, n) per evaluation row."""
    return [(e.rel, str(r.get("task", "")), str(r.get("kind", "")), str(r.get("metric", "")),
             r.get("value"), r.get("n")) for e in run.evals for r in e.rows]


def eval_value(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else fmt(v)


def eval_html(run: Run) -> str:
    if not run.evals:
        return ""
    parts = []
    for e in run.evals:
        took = f", {e.seconds:.1f}s" if e.seconds is not None else ""
        parts.append(f"<p>Scored by <code>scratchlm eval</code> ({html.escape(e.file)}): "
                     f"model <code>{html.escape(e.model)}</code>{html.escape(took)}.</p>")
        parts.append(table(["task", "kind", "metric", "value", "n"],
                           [[str(r.get("task", "")), str(r.get("kind", "")), str(r.get("metric", "")),
                             eval_value(r.get("value")), r.get("n")] for r in e.rows]))
    return "".join(parts)


def timings(run: Run) -> dict[str, tuple[float, str]]:
    """{what: (seconds, how it was measured)}."""
    out = {s.title: (s.seconds, "file times") for s in run.stages if s.seconds is not None}
    for e in run.evals:
        if e.seconds is not None:
            out[f"evaluation ({e.rel}/)" if e.rel != "." else "evaluation"] = (e.seconds, e.file)
    if run.total_seconds is not None:
        out["whole run"] = (run.total_seconds, "report.md")
    return out


def timings_html(run: Run) -> str:
    t = timings(run)
    if not t:
        return ""
    return (table(["what", "seconds", "measured by"], [[k, round(v, 1), how] for k, (v, how) in t.items()])
            + "<p class=sub>file times: from the stage's config.json to the last file it wrote.</p>")


def pictures_html(run: Run) -> str:
    pics = "".join(picture(p, run) for p in run.images)
    return f'<div class="pics">{pics}</div>' if pics else ""


def notes_html(runs: list[Run]) -> str:
    lines = [f"{r.name}: {p}" if len(runs) > 1 else p for r in runs for p in dict.fromkeys(r.problems)]
    return "<ul class=notes>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>" if lines else ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _single_sections(run: Run) -> list[tuple[str, str, str]]:
    out = [("settings", "Settings", settings_html(run))]
    before = run.sections_before if any(b is None for _, b in run.sections_before) else \
        [("Tokenizers", None), *run.sections_before]
    data = data_html(run)
    into = next((t for t, b in before if b is not None and "data" in t.lower()), None)  # the manifest joins it
    for t, b in before:
        if b is None:
            out.append(("tokenizers", "Tokenizers", tokenizers_html(run)))
        else:
            out.append((f"r-{_slug(t)}", t, md.blocks_html(b) + (data if t == into else "")))
    if into is None:
        out.append(("data", "Data", data))
    png = plot_curves([_panel(s) for s in run.stages])
    curves = image(png, "loss curves of every stage") if png else ""
    out += [("curves", "Loss curves", curves), ("training", "Training numbers", training_html(run))]
    out += [(f"s-{_slug(s.key)}", s.title, stage_html(s, run)) for s in run.stages]
    out += [(f"r-{_slug(t)}", t, md.blocks_html(b)) for t, b in run.sections_after]
    out += [("eval", "Eval scores", eval_html(run)), ("timings", "Timings", timings_html(run)),
            ("pictures", "Other pictures", pictures_html(run))]
    out.append(("notes", "Notes", notes_html([run])))  # last: pictures above may add to the notes
    return out


# ---------------------------------------------------------------------------------------------
# Two runs


def _merged(keys_a: dict, keys_b: dict) -> list:
    return list(dict.fromkeys([*keys_a, *keys_b]))


def settings_diff_html(a: Run, b: Run) -> str:
    rows = []
    pairs = [("run", a.config or (a.stages[0].config if len(a.stages) == 1 else None),
              b.config or (b.stages[0].config if len(b.stages) == 1 else None))]
    sb = {s.key: s for s in b.stages}
    pairs += [(f"{s.title}", s.config, sb[s.key].config) for s in a.stages
              if s.key in sb and s.rel != "." and sb[s.key].rel != "."]
    for where, ca, cb in pairs:
        fa, fb = flat(ca), flat(cb)
        for k in _merged(fa, fb):
            if fa.get(k, "(absent)") != fb.get(k, "(absent)"):
                rows.append([where, k, config_value(fa.get(k, "(absent)"), 400),
                             config_value(fb.get(k, "(absent)"), 400)])
    if not rows:
        return "<p>The settings are the same.</p>"
    return "<p>Only the settings that differ.</p>" + table(["where", "key", a.name, b.name], rows, "cfg")


def _two_columns(header: str, a: Run, b: Run, ra: dict, rb: dict, delta: bool = False,
                 show: Callable[[Any], str] = fmt) -> str:
    rows = []
    for key in _merged(ra, rb):
        va, vb = ra.get(key), rb.get(key)
        row = [*key, show(va) if va is not None else "", show(vb) if vb is not None else ""]
        if delta:
            both = isinstance(va, int | float) and isinstance(vb, int | float)
            row.append(f"{vb - va:+.4f}" if both and math.isfinite(vb - va) else "")
        rows.append(row)
    if not rows:
        return ""
    return table(header.split("|") + [a.name, b.name] + (["B - A"] if delta else []), rows)


def _compare_sections(a: Run, b: Run) -> list[tuple[str, str, str]]:
    runs = [a, b]
    out = [("settings", "Settings", settings_diff_html(a, b)),
           ("tokenizers", "Tokenizers", pair(runs, tokenizers_html)),
           ("data", "Data", pair(runs, data_html))]
    before = [t for t, b in [*a.sections_before, *b.sections_before] if b is not None]
    out += [(f"r-{_slug(t)}", t, pair(runs, lambda r, t=t: md.blocks_html(dict(r.sections_before).get(t) or [])))
            for t in dict.fromkeys(before)]
    keys = _merged({s.key: s for s in a.stages}, {s.key: s for s in b.stages})
    stages = {r.name: {s.key: s for s in r.stages} for r in runs}
    panels = []
    for key in keys:
        found = [(r.name, stages[r.name].get(key)) for r in runs]
        first = next(s for _, s in found if s is not None)
        lines = [(name, *curve(s)[1:]) for name, s in found if s is not None]
        panels.append((first.title, curve(first)[0], lines))
    png = plot_curves(panels)
    out.append(("curves", "Loss curves", image(png, "loss curves, both runs") if png else ""))
    for key in keys:
        title = next(s.title for r in runs if (s := stages[r.name].get(key)))
        numbers = {r.name: stage_numbers(s) for r in runs if (s := stages[r.name].get(key))}
        cols = list(dict.fromkeys(c for n in numbers.values() for c in n))
        head = table(["run"] + cols, [[name] + [n.get(c) for c in cols] for name, n in numbers.items()]) if cols else ""
        out.append((f"s-{_slug(key)}", title,
                    head + pair(runs, lambda r, k=key: stage_html(stages[r.name].get(k), r))))
    after = _merged(dict(a.sections_after), dict(b.sections_after))
    out += [(f"r-{_slug(t)}", t, pair(runs, lambda r, t=t: md.blocks_html(dict(r.sections_after).get(t, []))))
            for t in after]
    one_each = len(a.evals) == 1 and len(b.evals) == 1

    def scores(r: Run) -> dict:
        return {((w,) if not one_each else ()) + (task, kind, metric): v
                for w, task, kind, metric, v, _ in eval_rows(r)}

    header = "task|kind|metric" if one_each else "where|task|kind|metric"
    out.append(("eval", "Eval scores", _two_columns(header, a, b, scores(a), scores(b), delta=True, show=eval_value)))
    ta = {(k,): round(v, 1) for k, (v, _) in timings(a).items()}
    tb = {(k,): round(v, 1) for k, (v, _) in timings(b).items()}
    out.append(("timings", "Timings (seconds)", _two_columns("what", a, b, ta, tb)))
    out.append(("pictures", "Other pictures", pair(runs, pictures_html)))
    out.append(("notes", "Notes", notes_html(runs)))
    return out
