"""The web chat page (dsv4/serve/static/index.html) in a real headless browser — Debian's chromium driven by playwright
(`make browser` installs it) — against a real `dsv4 serve` of a tiny random model: the answer streams in, Stop keeps
the partial answer, conversations survive a reload, the thinking block, server errors, a phone-sized layout, and
markdown that renders code blocks and escapes HTML."""

import shutil

import httpx
import pytest
from playwright import sync_api

from tests.serve_util import API_KEY, MODEL, live_server, server_ckpt  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    assert chromium, "these tests need Debian's chromium: `make browser` (part of `make test`) installs it"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_page(browser, url, viewport=DESKTOP, **settings):
    """A fresh profile (empty localStorage) on the page, with the API key typed in and the model listed."""
    page = browser.new_context(viewport=viewport).new_page()
    page.set_default_timeout(10_000)
    page.goto(url)
    phone = page.locator("#menu").is_visible()
    if phone:
        page.click("#menu")  # settings live in the sidebar, which a phone opens from the menu button
    page.click("#settings summary")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")  # the change event lists the models again, now authorized
    for field, value in settings.items():
        page.fill(f"#{field}", value)
    if phone:
        page.keyboard.press("Escape")
    sync_api.expect(page.locator("#model")).to_have_text(MODEL)
    sync_api.expect(page.locator("#error")).to_be_empty()
    return page


def answer_length(page, selector=".msg.assistant .answer") -> int:
    return page.locator(selector).last.evaluate("el => el.textContent.length")


def wait_growing(page, selector=".msg.assistant .answer"):
    """Waits for streamed text to appear, then to grow (more than one chunk arrived)."""
    page.wait_for_function("s => [...document.querySelectorAll(s)].at(-1)?.textContent.length > 0", arg=selector)
    n = answer_length(page, selector)
    page.wait_for_function("([s, n]) => [...document.querySelectorAll(s)].at(-1).textContent.length > n",
                           arg=[selector, n])


def test_stream_stop_and_conversations(browser, live_server):
    # max tokens left empty: the answer may run to the end of the context, so it is still going at Stop; greedy, so
    # the tiny random model gives the same long answer every time (a sampled one may end after a few tokens)
    page = open_page(browser, live_server, temperature="0")
    page.fill("#prompt", "Hello there")
    page.press("#prompt", "Enter")
    sync_api.expect(page.locator(".msg.user")).to_have_text("Hello there")
    sync_api.expect(page.locator("#prompt")).to_have_value("")
    wait_growing(page)
    sync_api.expect(page.locator("#send")).to_be_disabled()
    page.click("#new-chat")  # away and back while it streams: the answer keeps growing in its place
    sync_api.expect(page.locator("#messages .msg")).to_have_count(0)
    page.click("#conversations .open")
    wait_growing(page)

    page.click("#stop")
    answer = page.locator(".msg.assistant").last
    sync_api.expect(answer).to_have_attribute("data-state", "stopped")
    sync_api.expect(page.locator("#send")).to_be_enabled()
    sync_api.expect(page.locator("#stop")).to_be_hidden()
    partial = answer.locator(".answer").inner_text()
    page.wait_for_timeout(300)
    assert partial and answer.locator(".answer").inner_text() == partial  # kept, and no longer growing

    page.reload()
    sync_api.expect(page.locator("#conversations li")).to_have_count(1)
    sync_api.expect(page.locator("#conversations li.current .open")).to_have_text("Hello there")
    sync_api.expect(page.locator(".msg.user")).to_have_text("Hello there")
    assert page.locator(".msg.assistant .answer").inner_text() == partial

    page.click("#new-chat")  # an empty chat; the old one stays listed until deleted
    sync_api.expect(page.locator("#messages .msg")).to_have_count(0)
    page.click("#conversations .open")
    sync_api.expect(page.locator("#messages .msg")).to_have_count(2)
    page.click("#conversations .delete")
    sync_api.expect(page.locator("#conversations li")).to_have_count(0)
    sync_api.expect(page.locator("#messages .msg")).to_have_count(0)
    page.context.close()


def test_thinking_block(browser, live_server):
    page = open_page(browser, live_server, temperature="0")  # greedy: this prompt thinks for hundreds of tokens
    page.check("#thinking")
    page.fill("#prompt", "Think step by step")
    page.click("#send")
    wait_growing(page, ".msg.assistant .thinking .body")
    thinking = page.locator(".msg.assistant .thinking")
    assert thinking.evaluate("el => el.open") and thinking.locator("summary").inner_text() == "Thinking"
    page.click("#stop")
    sync_api.expect(page.locator("#send")).to_be_enabled()
    assert not thinking.evaluate("el => el.open") and thinking.is_visible()  # folded, still there to open
    page.context.close()


def test_server_error_is_shown(browser, live_server):
    too_many = 1_000_000  # more than the context holds
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": too_many}
    refused = httpx.post(f"{live_server}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert refused.status_code == 400
    page = open_page(browser, live_server, **{"max-tokens": str(too_many)})
    page.fill("#prompt", "Hi")
    page.click("#send")
    sync_api.expect(page.locator("#error")).to_have_text(refused.json()["error"]["message"])
    sync_api.expect(page.locator("#send")).to_be_enabled()
    sync_api.expect(page.locator(".msg.assistant")).to_have_count(0)  # no empty answer is kept
    page.context.close()


def test_phone_layout(browser, live_server):
    page = open_page(browser, live_server, viewport=PHONE)
    # a stored conversation with a long code line and a long word must not widen the page
    long = {"id": "x", "title": "wide", "messages": [
        {"role": "user", "content": "w" * 300},
        {"role": "assistant", "content": "```\n" + "x = 1; " * 80 + "\n```\n\n" + "y" * 300}]}
    page.evaluate("c => { localStorage.setItem('dsv4.conversations', JSON.stringify([c]));"
                  " localStorage.setItem('dsv4.current', c.id); }", long)
    page.reload()
    sync_api.expect(page.locator("#messages pre code")).to_have_count(1)
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")

    prompt = page.locator("#prompt").bounding_box()
    assert page.locator("#prompt").is_visible() and 0 <= prompt["x"] and prompt["x"] + prompt["width"] <= PHONE["width"]
    assert prompt["y"] + prompt["height"] <= PHONE["height"]
    assert page.locator("#send").bounding_box()["x"] + page.locator("#send").bounding_box()["width"] <= PHONE["width"]

    # the sidebar waits off-screen behind the menu button
    assert page.locator("#new-chat").bounding_box()["x"] < 0
    page.click("#menu")
    page.wait_for_function("document.getElementById('new-chat').getBoundingClientRect().x >= 0")
    page.click("#backdrop", position={"x": PHONE["width"] - 10, "y": 400})
    page.wait_for_function("document.getElementById('new-chat').getBoundingClientRect().right <= 0")
    page.context.close()


def test_markdown(browser, live_server):
    page = browser.new_context().new_page()
    page.goto(live_server)
    code = "if a < b:\n    print('<script>alert(1)</script>')"
    text = f"Run `x<y` **now**:\n\n```python\n{code}\n```\n\n<img src=x onerror=alert(1)>\nsecond line\n\n```\nopen"
    html = page.evaluate("renderMarkdown", text)
    assert '<pre><code class="language-python">' in html
    assert "<script" not in html and "<img" not in html and "&lt;img src=x" in html
    assert "<code>x&lt;y</code>" in html and "<strong>now</strong>" in html and "<br>second line" in html

    # parsed back by the browser: the code reads as it was written, nothing became an element
    parsed = page.evaluate("""html => {
        const div = document.createElement('div');
        div.innerHTML = html;
        return {code: [...div.querySelectorAll('pre > code')].map(c => c.textContent),
                tags: [...div.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
                paragraphs: div.querySelectorAll('p').length};
    }""", html)
    assert parsed["code"] == [code, "open"]  # an unclosed fence (still streaming) is code too
    assert set(parsed["tags"]) == {"p", "code", "strong", "pre", "br"} and parsed["paragraphs"] == 2
    page.context.close()
