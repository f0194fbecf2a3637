"""The web page at GET / in a real browser: Debian's chromium driven by playwright, against a real server.

Needs /usr/bin/chromium (apt-get install chromium; .ci/run installs it) and the playwright package
(the dev extra); never `playwright install`. Skipped, with the reason, when either is missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]  # a chromium and a trained run: out of the quick loop

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from test_serve import PROMPT, WAIT_S, Served, scrape, wait_for  # noqa: E402

from helpers import train_tiny  # noqa: E402

from pocketgpt.serve.api import Limits  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser test needs playwright (pip install playwright; the dev extra has it)")
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip(f"the browser test needs {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    return train_tiny(tmp_path_factory.mktemp("page") / "tiny", data_dir, max_iters=20, block_size=64)


@pytest.fixture(scope="module")
def served(run_dir) -> Iterator[Served]:
    s = Served(run_dir, limits=Limits(max_tokens=50_000, timeout_s=60), api_key="pagekey")
    yield s
    s.close()


def _set_range(page: Any, name: str, value: float) -> None:
    page.eval_on_selector(f"#{name}", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)


def test_page_streams_stops_and_keeps_history(browser, served, tmp_path):
    auth = {"Authorization": "Bearer pagekey"}
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(served.url + "/")
    assert page.is_visible("#api-key")  # the server has a key: the page asks for it
    page.fill("#api-key", "pagekey")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model-info').textContent.includes('tiny')", timeout=WAIT_S * 1000)
    assert "context 64" in page.text_content("#model-info")

    page.fill("#prompt", PROMPT)
    _set_range(page, "max_tokens", 50_000)  # ~25 s of text: it is still streaming when Stop is clicked
    _set_range(page, "temperature", 0.9)
    page.fill("#seed", "7")
    page.check("#show-tokens")
    page.check("#show-probs")
    page.click("#generate")
    chunks = "document.querySelectorAll('#output .tok').length"
    page.wait_for_function(f"{chunks} >= 5", timeout=WAIT_S * 1000)
    grown = page.evaluate(chunks)
    page.wait_for_function(f"{chunks} > {grown + 20}", timeout=WAIT_S * 1000)  # it keeps growing: a stream
    assert scrape(served.url, **auth)["pocketgpt_active_streams"] == 1
    assert page.is_disabled("#generate") and page.is_enabled("#stop")
    page.screenshot(path=str(tmp_path / "streaming.png"))
    probs = page.evaluate("[...document.querySelectorAll('#output .tok[data-p]')].map(s => +s.dataset.p)")
    assert len(probs) >= 20 and all(0 < p <= 1 for p in probs)  # one span per token, with its probability
    assert "p = " in page.get_attribute("#output .tok[data-p] >> nth=3", "title")

    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('stopped')", timeout=WAIT_S * 1000)
    wait_for(lambda: scrape(served.url, **auth)["pocketgpt_active_streams"] == 0, "the server to drop the stream")
    stopped = page.evaluate(chunks)
    page.wait_for_timeout(300)
    assert page.evaluate(chunks) == stopped  # nothing more arrives
    text = page.evaluate("[...document.querySelectorAll('#output .tok')].map(s => s.textContent).join('')")
    assert len(text) >= stopped > grown
    assert page.is_enabled("#generate") and page.is_disabled("#stop")
    page.screenshot(path=str(tmp_path / "stopped.png"))

    saved = page.evaluate("JSON.parse(localStorage.getItem('pocketgpt-history'))")
    assert saved[0]["prompt"] == PROMPT and saved[0]["finish"] == "stopped" and saved[0]["text"] == text
    assert saved[0]["settings"]["seed"] == 7 and saved[0]["settings"]["max_tokens"] == 50_000

    _set_range(page, "max_tokens", 30)  # a short one runs to its end and joins the history
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=WAIT_S * 1000)
    assert "30 tokens" in page.text_content("#status") and page.locator("#history li").count() == 2
    page.reload()  # the history lives in the browser
    page.wait_for_selector("#history li")
    assert page.locator("#history li").count() == 2
    page.click("#history li >> nth=0")  # an entry back from the history, token boundaries shown
    assert page.input_value("#max_tokens") == "30" and page.input_value("#seed") == "7"
    page.check("#show-tokens")
    page.screenshot(path=str(tmp_path / "history.png"))
    assert not errors, errors
    page.close()


def test_a_model_with_a_chat_template_opens_on_the_chat_view(browser, tmp_path):
    """Turns kept and sent whole (the system prompt first), the reply streamed into its bubble, New chat
    forgets the turns; the completion view is one click away."""
    pytest.importorskip("transformers")
    from test_chat import TEMPLATE, with_template
    from test_pretrained_tokenizer import byte_level_tokenizer, llama_folder

    served = Served(with_template(llama_folder(tmp_path / "m", byte_level_tokenizer(bos=True)), TEMPLATE))
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors: list[str] = []
    sent: list[dict] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    try:
        page.goto(served.url + "/")
        page.wait_for_function("!document.getElementById('chat-view').hidden", timeout=WAIT_S * 1000)
        assert page.is_hidden("#complete-view") and page.is_enabled("#mode-chat")
        page.fill("#system", "Be brief.")
        _set_range(page, "max_tokens", 8)
        page.fill("#seed", "3")
        for k, text in enumerate(["Hello there", "And again"]):
            page.fill("#message", text)
            page.press("#message", "Enter")
            page.wait_for_function(f"document.getElementById('chat-status').textContent.startsWith('done') && "
                                   f"document.querySelectorAll('.turn').length == {2 * (k + 1)}",
                                   timeout=WAIT_S * 1000)
        turns = page.evaluate("[...document.querySelectorAll('.turn')].map(t => [t.className, t.textContent])")
        assert [c for c, _ in turns] == ["turn user", "turn assistant"] * 2 and turns[2][1] == "And again"
        assert [m["role"] for m in sent[1]["messages"]] == ["system", "user", "assistant", "user"]
        assert sent[1]["messages"][0]["content"] == "Be brief." and sent[1]["messages"][2]["content"] == turns[1][1]
        assert sent[1]["stream"] is True and sent[1]["max_tokens"] == 8 and sent[1]["seed"] == 3
        page.screenshot(path=str(tmp_path / "chat.png"))
        page.click("#new-chat")
        assert page.locator(".turn").count() == 0
        page.fill("#message", "Fresh")
        page.click("#send")
        page.wait_for_function("document.getElementById('chat-status').textContent.startsWith('done')",
                               timeout=WAIT_S * 1000)
        assert [m["role"] for m in sent[2]["messages"]] == ["system", "user"]
        page.click("#mode-complete")
        assert page.is_visible("#prompt") and page.is_hidden("#chat-view")
        assert not errors, errors
    finally:
        page.close()
        served.close()
