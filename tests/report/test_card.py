"""The report card from run folders written file by file: which sections appear, the tables read
from markdown and from the tokenizer comparison, the embedded pictures, escaping, two runs side by
side, and the verb's refusals (one line, exit 2)."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from PIL import Image

from scratchlm.cli import main
from scratchlm.report import build_card, is_card, read_run
from scratchlm.report import markdown as md
from tests.report.fake_runs import (
    SCRIPT,
    config,
    demo_run,
    find_table,
    png,
    read_card,
    training_stage,
    write,
)


def decoded_sizes(images: list[bytes]) -> list[tuple[int, int]]:
    """Each embedded picture opened as a PNG (PIL reads it all, so a truncated one fails)."""
    sizes = []
    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG"
            im.load()
            sizes.append(im.size)
    return sizes


def test_markdown_tables_lists_code_and_escaping():
    text = ("# Title\n\nsome `a<b` text\nand more\n\n| name | n |\n|:---|---:|\n| x \\| y | 3 |\n| <b>z</b> |\n\n"
            "- one\n- `two`\n\n```\n<raw> | not a table\n```\n")
    blocks = md.parse(text)
    assert [b.kind for b in blocks] == ["h", "p", "table", "ul", "pre"]
    assert blocks[1].text == "some `a<b` text and more"
    t = blocks[2].table
    assert t.header == ["name", "n"] and t.align == ["left", "right"]
    assert t.rows == [["x | y", "3"], ["<b>z</b>", ""]]  # an escaped pipe is text; a short row is padded
    out = md.blocks_html(blocks)
    assert "<h3>Title</h3>" in out and "<p>some <code>a&lt;b</code> text and more</p>" in out
    assert '<td style="text-align:right">3</td>' in out
    assert '<td style="text-align:left">&lt;b&gt;z&lt;/b&gt;</td>' in out
    assert "<li><code>two</code></li>" in out and "<pre>&lt;raw&gt; | not a table</pre>" in out
    assert "<b>" not in out
    assert md.sections("intro\n## A\nx\n```\n## not a heading\n```\n## B\ny") == [
        ("", "intro"), ("A", "x\n```\n## not a heading\n```"), ("B", "y")]


def test_one_stage_card_shows_only_what_the_folder_holds(tmp_path):
    run = training_stage(tmp_path / "char", config("char-tiny", train={"device": SCRIPT}))
    html = build_card(run)
    card = read_card(html)
    assert card.h2 == ["Settings", "Loss curves", "Training numbers", "Pretraining", "Timings", "Notes"]
    # Escaped everywhere, and no script of its own: the config value shows as text.
    assert SCRIPT not in html and "<script" not in html and card.scripts == 0
    assert "alert(&#x27;x&#x27;)" in html and any(SCRIPT in "".join(r[1:]) for t in card.tables for r in t)
    train = find_table(card, "section", "settings")
    assert [r[0] for r in train[1:]] == ["tokenizer", "data", "model", "train"]  # what pretraining reads, no sft
    numbers = find_table(card, "stage", "steps", "last loss", "last val_loss", "best val_loss", "val bits/byte")
    assert numbers[1][:6] == ["Pretraining", "31", "5.6", "5.7", "5.7", "2.475"]
    # The loss picture drawn here from metrics.jsonl, then the run's own loss.png (60 x 35).
    sizes = decoded_sizes(card.images)
    assert len(sizes) == 2 and sizes[1] == (60, 35) and sizes[0][0] > 300
    assert "1 line(s) that are not JSON records were skipped" in html  # the torn last line, noted


def test_demo_card_has_every_section_in_order(tmp_path):
    run = demo_run(tmp_path / "demo")
    html = build_card(run)
    card = read_card(html)
    assert card.h2 == ["Settings", "Corpus", "Tokenizers", "Data", "Loss curves", "Training numbers",
                       "Pretraining (pretrain/)", "Supervised fine-tuning (sft/)", "Reward model (rm/)",
                       "Direct preference optimisation (dpo/)", "Online RL: GRPO (grpo/)",
                       "Every stage on the same held-out prompts", "Eval scores", "Timings", "Notes"]
    stages = find_table(card, "stage", "preset", "settings")
    assert [r[:2] for r in stages[1:]] == [["pretrain/", "tiny"], ["sft/", "sft-tiny"], ["rm/", "rm-tiny"],
                                          ["dpo/", "dpo-tiny"], ["grpo/", "grpo-tiny"]]
    assert "sft.base=" in stages[2][2] and "train.lr" not in stages[2][2]  # only what differs from the run
    tok = find_table(card, "kind", "vocab", "bytes/token", "train s", "encode MB/s", "example")
    assert tok[1:] == [["byte", "262", "1.00", "0.00", "322.93", "I|n| |t|h|e"],
                       ["bpe", "2048", "3.97", "0.08", "6.45", "I|n| the| beginning"]]
    assert find_table(card, "split", "documents", "tokens")[1] == ["train", "1,130", "1,169,995"]
    assert find_table(card, "pairs", "n", "reward model")[1:] == [["all", "6", "66.7%"], ["family | odd", "1", "0.0%"]]
    assert find_table(card, "family", "n", "sft checked", "rl checked")[2] == ["all", "20", "5.0%", "45.0%"]
    assert find_table(card, "stage", "all", "KL to SFT")[2] == ["GRPO", "50.0%", "0.02"]
    assert find_table(card, "task", "kind", "metric", "value", "n")[1:] == [
        ["heldout-bpb", "perplexity", "bits_per_byte", "1.9300", "59"], ["cloze", "choice", "acc", "0.4100", "200"]]
    numbers = find_table(card, "stage", "steps", "last loss")
    grpo = next(r for r in numbers if r[0].startswith("Online RL"))
    assert numbers[0][-2:] == ["last reward", "tokens/s"] and grpo[-2] == "0.25"
    timings = {r[0]: r[1:] for r in find_table(card, "what", "seconds", "measured by")[1:]}
    assert timings["whole run"] == ["36.7", "report.md"] and timings["evaluation"] == ["12.3", "eval/summary.json"]
    assert timings["Reward model (rm/)"][1] == "file times"
    # A line of report.md that the stage's own summary holds is shown once; the stage's prose is kept.
    assert html.count("grpo, 4 steps, reward checker") == 1
    assert "GRPO from the SFT model" in html and "<code>And God said,oll</code>" in html
    # tokenizers.png, the curves, loss.png of 5 stages, rm_checks.png and rl.png: all PNGs.
    sizes = decoded_sizes(card.images)
    assert len(sizes) == 9 and sizes[0] == (90, 35) and (120, 40) in sizes and (150, 50) in sizes


def test_unreadable_files_are_noted_not_fatal(tmp_path):
    run = demo_run(tmp_path / "demo")
    write(run / "rm" / "config.json", "{torn")
    write(run / "grpo" / "rl.png", b"GIF89a not a png")
    html = build_card(run)
    card = read_card(html)
    assert "rm/config.json: not readable as JSON" in html
    assert "grpo/rl.png: not a PNG file; left out" in html
    assert "Reward model (rm/)" in card.h2 and len(card.images) == 8


def test_two_runs_side_by_side(tmp_path):
    a = demo_run(tmp_path / "a" / "demo")
    b = demo_run(tmp_path / "b" / "demo", lr=0.001, eval_values=(1.80, 0.5), with_dpo=False)
    html = build_card(a, b)
    card = read_card(html)
    assert card.h2[0] == "Settings" and "Direct preference optimisation (dpo/)" in card.h2
    assert "<title>scratchlm comparison: a/demo vs b/demo</title>" in html  # the same names: their parents tell
    diff = find_table(card, "where", "key", "a/demo", "b/demo")
    assert ["run", "train.lr", "0.002", "0.001"] in diff
    assert ["Pretraining (pretrain/)", "train.lr", "0.002", "0.001"] in diff
    assert all(r[2] != r[3] for r in diff[1:])  # only differences
    scores = find_table(card, "task", "kind", "metric", "a/demo", "b/demo", "B - A")
    assert scores[1:] == [["heldout-bpb", "perplexity", "bits_per_byte", "1.9300", "1.8000", "-0.1300"],
                          ["cloze", "choice", "acc", "0.4100", "0.5000", "+0.0900"]]
    sft = find_table(card, "run", "steps", "last loss")
    assert [r[0] for r in sft[1:]] == ["a/demo", "b/demo"]
    assert html.count("not in this run") == 1  # b has no DPO stage
    assert html.count('class="pair"') >= 6
    decoded_sizes(card.images)


def test_cli_writes_a_card_and_replaces_nothing_without_overwrite(tmp_path, capsys):
    run = demo_run(tmp_path / "demo")
    card = run / "report.html"
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(card)
    assert is_card(card) and not list(run.glob(".*tmp*"))
    for earlier in (None, "my notes"):  # an earlier card, like any other file, stays without --overwrite
        if earlier:
            card.write_text(earlier)
        before = card.read_text()
        assert main(["report", str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"scratchlm: error: {card}: already exists (pass --overwrite to replace it, or choose another " \
                      "--out)"
        assert card.read_text() == before
    assert main(["report", str(run), "--overwrite"]) == 0 and is_card(card)
    capsys.readouterr()
    other = training_stage(tmp_path / "other run", config())
    assert main(["report", str(run), str(other)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "compare-other_run.html")
    out = tmp_path / "cards" / "x.html"
    assert main(["report", str(other), "--out", str(out)]) == 0 and is_card(out)


@pytest.mark.parametrize("case", ["missing", "file", "empty", "unrelated"])
def test_cli_refuses_what_is_no_run_in_one_line(tmp_path, capsys, case):
    target = tmp_path / "x"
    if case == "file":
        write(target, "text")
    elif case == "empty":
        target.mkdir()
    elif case == "unrelated":
        write(target / "notes.txt", "hello")
        write(target / "sub" / "picture.png", png())
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (f"{target}: not a folder" if case in ("missing", "file") else f"{target}: holds no run") in err
    assert not (target / "report.html").exists()


def test_second_run_is_checked_too(tmp_path, capsys):
    run = training_stage(tmp_path / "a", config())
    assert main(["report", str(run), str(tmp_path / "nope")]) == 2
    assert "nope: not a folder" in capsys.readouterr().err
    assert not list(run.glob("compare-*"))


def test_stage_kinds_are_read_from_the_files(tmp_path):
    demo = demo_run(tmp_path / "demo")
    for name in ("sft", "rm", "dpo", "grpo"):  # one stage's folder, renamed: recognised by its files
        shutil.copytree(demo / name, tmp_path / f"copy-{name}")
        assert [(s.kind, s.rel) for s in read_run(tmp_path / f"copy-{name}").stages] == [(name, ".")]
    write(tmp_path / "ev" / "eval" / "summary.json", json.loads((demo / "eval" / "summary.json").read_text()))
    only_eval = read_run(tmp_path / "ev")
    assert only_eval.stages == [] and [r["task"] for r in only_eval.evals[0].rows] == ["heldout-bpb", "cloze"]
