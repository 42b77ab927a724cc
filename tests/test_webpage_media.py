"""The web page with a multimodal model (tests/test_webpage.py has the chat): in the real headless browser, the
page offers Image and Video only when the model makes them, shows generated pictures, GIF and MP4 clips inline (each
decoded by the browser to its real size), animates an attached picture, keeps media turns across a reload and out
of the chat's context."""

import json

import pytest
from playwright import sync_api

from dsv4.engine.media import encode_media
from tests.serve_util import live_server, mm_ckpt, mm_server, server_ckpt  # noqa: F401  (fixtures)
from tests.test_webpage import browser, open_page  # noqa: F401  (browser: a fixture)

pytestmark = pytest.mark.slow
LOADED = "els => els.length > 0 && els.every(e => e.tagName === 'VIDEO' ? e.videoWidth > 0 : e.naturalWidth > 0)"


def generate(page, mode: str, prompt: str, count: int):
    page.select_option("#mode", mode)
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    media = page.locator(".msg.assistant").last.locator(".media > *")
    sync_api.expect(media).to_have_count(count, timeout=120_000)
    page.wait_for_function(f"() => ({LOADED})(Array.from([...document.querySelectorAll('.msg.assistant')].at(-1)"
                           ".querySelectorAll('.media > *')))", timeout=30_000)
    sync_api.expect(page.locator("#send")).to_be_enabled()
    return media


def sizes(media) -> list:
    return media.evaluate_all("els => els.map(e => [e.tagName, e.videoWidth ?? e.naturalWidth, "
                              "e.videoHeight ?? e.naturalHeight])")


def test_a_text_model_offers_chat_only(browser, live_server):
    page = open_page(browser, live_server)
    assert page.locator("#mode").is_hidden() and page.locator("#attach-label").is_hidden()
    page.context.close()


def test_pictures_and_clips_show_inline(browser, mm_server, tmp_path):
    page = open_page(browser, mm_server, **{"max-tokens": "8"})
    sync_api.expect(page.locator("#mode")).to_be_visible()
    assert page.locator("#attach-label").is_hidden()  # only a clip starts from a picture
    images = generate(page, "image", "a red circle in the top left", 4)
    assert sizes(images) == [["IMG", 128, 128]] * 4

    gif = generate(page, "video", "a blue square moving down", 1)
    assert sizes(gif) == [["IMG", 128, 128]]
    assert gif.get_attribute("src").startswith("data:image/gif;base64,")

    page.select_option("#video-format", "mp4")  # the settings are open (open_page typed the key there)
    mp4 = generate(page, "video", "the digit 3 moving right", 1)
    assert sizes(mp4) == [["VIDEO", 128, 128]]  # Chromium decoded the H.264
    assert mp4.evaluate("v => v.loop && v.muted && !v.paused")

    picture = tmp_path / "start.png"
    import torch

    picture.write_bytes(encode_media(torch.full((32, 32, 3), 200, dtype=torch.uint8), "png"))
    page.select_option("#video-format", "gif")
    page.select_option("#mode", "video")
    page.set_input_files("#attach", str(picture))
    sync_api.expect(page.locator("#attached img")).to_have_count(1)
    sync_api.expect(page.locator("#attached")).to_contain_text("start.png")
    animated = generate(page, "video", "moving left", 1)
    assert sizes(animated) == [["IMG", 128, 128]]
    sync_api.expect(page.locator(".msg.user").last.locator("img.attached")).to_have_count(1)
    sync_api.expect(page.locator("#attached")).to_be_hidden()  # sent: the attachment is cleared
    page.screenshot(path=str(tmp_path / "media.png"), full_page=True)

    page.reload()  # kept with the conversation
    sync_api.expect(page.locator(".msg.assistant .media > *")).to_have_count(7)
    stored = json.loads(page.evaluate("localStorage.getItem('dsv4.conversations')"))[0]["messages"]
    assert [m.get("kind") for m in stored] == ["image"] * 2 + ["video"] * 6

    # a chat turn afterwards sends only the chat: the generation turns stay out of its context
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    page.select_option("#mode", "chat")
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    sync_api.expect(page.locator(".msg.assistant").last).not_to_have_attribute("data-state", "streaming",
                                                                                timeout=60_000)
    assert [m["content"] for m in sent[0]["messages"]] == ["hello"]
    page.context.close()
