"""The chat page at / driven in headless Chromium with Selenium: a typed message gets a reply that streams
in piece by piece, the conversation is kept (the second request carries the first exchange), and the
stop button ends a long reply (the server frees its row)."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.helpers import in_ci
from tests.serve.server import app_for, chat_checkpoint, running, slow_down

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        reason = "chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver)"
        if in_ci():
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = chromium
    b = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
    yield b
    b.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = app_for(chat_checkpoint(tmp_path_factory.mktemp("page") / "run"), max_batch=4)
    delay = [0.02]  # 50 tokens a second: slow enough to watch the reply grow
    slow_down(app, delay)
    with running(app) as url:
        yield url, app


def send(browser, text: str) -> None:
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def set_temperature(browser, value: str) -> None:
    slider = browser.find_element(By.ID, "temperature")
    browser.execute_script(f"arguments[0].value = '{value}'; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert browser.find_element(By.ID, "temperature-value").text == value


def last_reply(browser):
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def test_a_reply_streams_in_and_the_conversation_is_kept(browser, server):
    url, app = server
    browser.get(url + "/")
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "model").text == "tiny")
    browser.execute_script("document.getElementById('max-tokens').value = '40'")
    set_temperature(browser, "0")  # greedy: the special tokens' zero logits are never the largest
    send(browser, "hello")
    lengths = set()
    deadline = time.monotonic() + 30
    while last_reply(browser).get_attribute("data-state") == "streaming" and time.monotonic() < deadline:
        lengths.add(len(last_reply(browser).text))
        time.sleep(0.01)
    reply = last_reply(browser)
    assert reply.get_attribute("data-state") == "done"
    assert len(reply.text) > 10
    assert len(lengths - {0}) >= 3, "the reply did not arrive piece by piece"
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user")[0].text == "hello"
    before = app.state.scheduler.metrics.prompt_tokens
    send(browser, "go on")
    WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2 and
                                     last_reply(b).get_attribute("data-state") in ("done", "error"))
    assert last_reply(browser).get_attribute("data-state") == "done", last_reply(browser).text
    # The second prompt held the whole conversation: both user turns, the first reply and the template's tokens.
    added = app.state.scheduler.metrics.prompt_tokens - before
    assert added >= len("hello") + len(reply.text) + len("go on")


def test_the_stop_button_ends_a_long_reply(browser, server):
    url, app = server
    browser.get(url + "/")
    browser.execute_script("document.getElementById('max-tokens').value = '240'")
    set_temperature(browser, "0")
    send(browser, "hello")
    WebDriverWait(browser, 30).until(lambda b: len(last_reply(b).text) >= 5)
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 10).until(lambda b: last_reply(b).get_attribute("data-state") == "stopped")
    shown = last_reply(browser).text
    assert 5 <= len(shown) < 240
    time.sleep(0.3)
    assert last_reply(browser).text == shown  # nothing more arrives
    scheduler = app.state.scheduler
    deadline = time.monotonic() + 10
    while scheduler.rows and time.monotonic() < deadline:  # the server let go of the row
        time.sleep(0.02)
    assert scheduler.rows == [] and scheduler.metrics.requests["cancelled"] >= 1
    assert not browser.find_element(By.ID, "send").get_property("disabled")
