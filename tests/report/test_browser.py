"""The report card in a real browser: headless Chromium (Debian's `chromium`) renders the page, its
DOM holds the tables and pictures, every picture decodes, and a screenshot is not blank.

The card has no script; to ask the browser whether the pictures decoded, a copy of it gets one
appended that writes the count of images with a natural width into the DOM after the page loaded.
Without Chromium the tests skip; in CI (`.ci/run` installs it) a skip is a failure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from scratchlm.report import write_card
from tests.report.fake_runs import demo_run, read_card

COUNT_DECODED = """<script>
window.addEventListener("load", () => {
  const ok = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-decoded", ok + "/" + document.images.length);
});
</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    return exe


def browse(chromium: str, page: Path, profile: Path, *args: str) -> str:
    """Run headless Chromium on a file; its stdout."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
           "--virtual-time-budget=5000", *args, page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    return write_card(demo_run(root / "demo"), root / "card.html")


def test_the_rendered_page_has_the_tables_and_every_picture_decodes(chromium, card, tmp_path):
    source = read_card(card.read_text(encoding="utf-8"))
    dom = browse(chromium, card, tmp_path / "profile", "--dump-dom")
    rendered = read_card(dom)
    assert len(source.images) == 9 and rendered.images == source.images
    assert rendered.h2 == source.h2 and "Eval scores" in rendered.h2
    assert rendered.tables == source.tables and len(rendered.tables) >= 10
    assert any(["heldout-bpb", "perplexity", "bits_per_byte", "1.9300", "59"] in t for t in rendered.tables)
    probe = tmp_path / "probe.html"
    probe.write_text(card.read_text(encoding="utf-8").replace("</body>", COUNT_DECODED + "</body>"), encoding="utf-8")
    dom = browse(chromium, probe, tmp_path / "profile", "--dump-dom")
    assert re.search(r'data-decoded="(\d+)/(\d+)"', dom).groups() == ("9", "9")


def test_a_screenshot_is_not_blank(chromium, card, tmp_path):
    shot = tmp_path / "card.png"
    browse(chromium, card, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2000",
           "--hide-scrollbars")
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1200, 2000)
        pixels = im.convert("RGB")
        colours = pixels.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # text, tables and pictures, not a blank page
    white = sum(n for n, c in colours if min(c) >= 250)
    assert 0.02 < 1 - white / (1200 * 2000) < 0.9
