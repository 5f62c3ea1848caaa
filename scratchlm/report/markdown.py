"""The little markdown that scratchlm writes (`report.md`, `eval/summary.md`), read into blocks and
written out as HTML with every piece of text escaped.

Understood: `#` headings, paragraphs (lines joined), `- ` lists, fenced code, pipe tables with a
`|---|` separator row (`---:` right-aligns a column, `\\|` is a pipe inside a cell) and inline
`code`. Left out, because no stage writes them: links, emphasis, nested lists, raw HTML (which is
shown as text, never passed through).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_PIPE = re.compile(r"(?<!\\)\|")


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align: list[str] = field(default_factory=list)  # per column: "left", "right", "center" or ""


@dataclass
class Block:
    kind: str  # "h" (text, level), "p", "ul" (items), "pre", "table"
    text: str = ""
    level: int = 0
    items: list[str] = field(default_factory=list)
    table: Table | None = None


def split_cells(line: str) -> list[str]:
    line = line.strip()
    line = line[1:] if line.startswith("|") else line
    line = line[:-1] if line.endswith("|") and not line.endswith("\\|") else line
    return [c.strip().replace("\\|", "|") for c in _PIPE.split(line)]


def _alignment(cell: str) -> str:
    cell = cell.strip()
    if cell.startswith(":") and cell.endswith(":"):
        return "center"
    return "right" if cell.endswith(":") else "left" if cell.startswith(":") else ""


def parse(text: str) -> list[Block]:
    """The blocks of a markdown text, in order."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            i += 1
        elif stripped.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
            blocks.append(Block("pre", "\n".join(lines[i + 1:end])))
            i = end + 1
        elif m := re.match(r"^(#{1,6})\s+(.*)$", stripped):
            blocks.append(Block("h", m[2].strip(), level=len(m[1])))
            i += 1
        elif stripped.startswith("|") and i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1].strip()):
            header = split_cells(stripped)
            align = [_alignment(c) for c in split_cells(lines[i + 1])]
            j, rows = i + 2, []
            while j < len(lines) and lines[j].strip().startswith("|"):
                cells = split_cells(lines[j])
                rows.append((cells + [""] * len(header))[:len(header)])
                j += 1
            blocks.append(Block("table", table=Table(header, rows, (align + [""] * len(header))[:len(header)])))
            i = j
        elif stripped.startswith("- "):
            items = []
            while i < len(lines) and lines[i].strip().startswith("- "):
                items.append(lines[i].strip()[2:])
                i += 1
            blocks.append(Block("ul", items=items))
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not _starts_block(lines, i):
                para.append(lines[i].strip())
                i += 1
            blocks.append(Block("p", " ".join(para)))
    return blocks


def _starts_block(lines: list[str], i: int) -> bool:
    s = lines[i].strip()
    return (s.startswith(("```", "#", "- ")) or
            (s.startswith("|") and i + 1 < len(lines) and bool(_SEPARATOR.match(lines[i + 1].strip()))))


def sections(text: str) -> list[tuple[str, str]]:
    """(title, body) per `## ` section; text before the first one has the title ""."""
    out: list[tuple[str, list[str]]] = [("", [])]
    in_code = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("## "):
            out.append((line[3:].strip(), []))
        else:
            out[-1][1].append(line)
    return [(t, "\n".join(body).strip()) for t, body in out if t or "\n".join(body).strip()]


def inline(text: str) -> str:
    """Escaped text with `code` spans."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unmatched backtick is text
        parts[-2:] = ["`".join(parts[-2:])]
    return "".join(f"<code>{html.escape(p)}</code>" if k % 2 else html.escape(p) for k, p in enumerate(parts))


def table_html(table: Table, cls: str = "") -> str:
    def cell(tag: str, text: str, align: str) -> str:
        style = f' style="text-align:{align}"' if align else ""
        return f"<{tag}{style}>{inline(text)}</{tag}>"

    align = table.align or [""] * len(table.header)
    head = "".join(cell("th", h, a) for h, a in zip(table.header, align))
    body = "".join("<tr>" + "".join(cell("td", c, a) for c, a in zip(row, align)) + "</tr>\n" for row in table.rows)
    attr = f' class="{html.escape(cls)}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>\n"


def blocks_html(blocks: list[Block], heading_shift: int = 2) -> str:
    out = []
    for b in blocks:
        if b.kind == "h":
            level = min(6, b.level + heading_shift)
            out.append(f"<h{level}>{inline(b.text)}</h{level}>")
        elif b.kind == "p":
            out.append(f"<p>{inline(b.text)}</p>")
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{inline(x)}</li>" for x in b.items) + "</ul>")
        elif b.kind == "pre":
            out.append(f"<pre>{html.escape(b.text)}</pre>")
        elif b.kind == "table" and b.table is not None:
            out.append(table_html(b.table))
    return "\n".join(out) + "\n" if out else ""


def to_html(text: str, heading_shift: int = 2) -> str:
    return blocks_html(parse(text), heading_shift)
