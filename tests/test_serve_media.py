"""The image and video endpoints of `dsv4 serve` on a (tiny, untrained) multimodal checkpoint, through the official
`openai` client and raw HTTP: samples equal the engine's own for the same seeds, every output format decodes to the
right size and frame count, image->video starts from the given picture, text requests keep to text ids, and bad input
gets an OpenAI-style error naming the field."""

import base64
import io

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from dsv4.engine.media import encode_media, read_clip_bytes
from dsv4.engine.visual import VisualModel, generate_clips, generate_images
from dsv4.tokenizers.pixels import to_uint8, to_unit
from tests.serve_util import (  # live_server, server_ckpt, mm_ckpt, mm_server: fixtures
    API_KEY,
    MODEL,
    live_server,
    mm_ckpt,
    mm_server,
    server_ckpt,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MP4_ERROR = 6  # mean absolute error (of 255) that crf 12 leaves on these clips


@pytest.fixture(scope="module")
def vm(mm_ckpt):
    return VisualModel.load(mm_ckpt, dtype=torch.float32)


def png(b64: str) -> torch.Tensor:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy())


def test_images_through_the_openai_client_equal_the_engines(mm_server, vm):
    client = openai.OpenAI(base_url=mm_server + "/v1", api_key=API_KEY)
    caption = "a red circle in the top left"
    r = client.images.generate(model=MODEL, prompt=caption, n=3, size="64x64", response_format="b64_json",
                               extra_body={"seed": 7, "cfg_scale": 2.0})
    got = [png(d.b64_json) for d in r.data]
    want = generate_images(vm, caption, n=3, cfg_scale=2.0, seed=7)
    assert len(got) == 3 and all(x.shape == (64, 64, 3) for x in got)
    for g, w in zip(got, want):
        assert torch.equal(g[::2, ::2], w)  # size 64x64: each generated pixel a 2 x 2 block
    default = httpx.post(mm_server + "/v1/images/generations", json={"prompt": caption, "seed": 7, "cfg_scale": 2.0},
                         headers=AUTH, timeout=60).json()
    assert default["size"] == "128x128" and default["output_format"] == "png"
    assert torch.equal(png(default["data"][0]["b64_json"])[::4, ::4], want[0])  # model optional, 4x by default


def test_clips_as_gif_and_mp4_and_an_animated_picture(mm_server, vm):
    def post(**body):
        r = httpx.post(mm_server + "/v1/videos/generations", json={"prompt": "a blue square moving down", **body},
                       headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        return [read_clip_bytes(base64.b64decode(d["b64_json"])) for d in r.json()["data"]]

    gif = post(seed=3, n=2)
    want = generate_clips(vm, "a blue square moving down", n=2, seed=3)
    assert [tuple(c.shape) for c in gif] == [(9, 128, 128, 3)] * 2
    for got, w in zip(gif, want):  # the GIF's palette as the local encoding's
        assert torch.equal(got, read_clip_bytes(encode_media(w, "gif")))
    mp4 = post(seed=3, output_format="mp4", steps=2, size="64x64")[0]
    short = generate_clips(vm, "a blue square moving down", steps=2, seed=3)[0]
    assert mp4.shape == (5, 64, 64, 3)  # H.264 is lossy: close to the clip, not equal
    assert (mp4.float() - short.repeat_interleave(2, 1).repeat_interleave(2, 2).float()).abs().mean() < MP4_ERROR
    start = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    image = base64.b64encode(encode_media(start, "png")).decode()
    animated = post(prompt="moving left", image=f"data:image/png;base64,{image}", steps=2, seed=1)[0]
    local = generate_clips(vm, "moving left", steps=2, image=start, seed=1)[0]
    assert torch.equal(animated, read_clip_bytes(encode_media(local, "gif")))
    assert torch.equal(local[0], to_uint8(vm.pixels(to_unit(start)[None, None]))[0, 0])  # frame 0: the picture


def test_text_requests_of_a_multimodal_model_stay_text(mm_server, vm):
    from dsv4.engine.engine import Engine
    from dsv4.engine.sampling import SamplingParams
    from dsv4.tokenizers.multimodal import TextOnly

    prompt = "def f(x):"

    def greedy(processor):
        engine = Engine(vm.model, vm.tok, max_batch=1, max_len=256)
        req = engine.submit(prompt, SamplingParams(temperature=0), max_new_tokens=24, processor=processor)
        while engine.has_work():
            engine.step()
        return req.output

    free, kept = greedy(None), greedy(TextOnly(vm.vocab.text_size))
    assert max(free) >= vm.vocab.text_size  # this random model picks visual ids when let
    assert max(kept) < vm.vocab.text_size
    r = httpx.post(mm_server + "/v1/completions", headers=AUTH, timeout=60,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    def text(ids):  # as the server streams it: undecodable bytes replaced
        return vm.tok.decode(ids).encode("utf-8", "surrogateescape").decode("utf-8", "replace")

    assert r.json()["choices"][0]["text"] == text(kept) != text(free)
    card = httpx.get(mm_server + "/v1/models", headers=AUTH).json()["data"][0]
    assert card["modalities"] == ["text", "image", "video"]


BAD = [  # (endpoint, body, words, param)
    ("images", {"prompt": "x", "size": "100x100"}, "multiple of 32", "size"),
    ("images", {"prompt": "x", "size": "64x32"}, "square", "size"),
    ("images", {"prompt": "x", "response_format": "url"}, "b64_json", "response_format"),
    ("images", {"prompt": "x", "n": 11}, "less than or equal", "n"),
    ("images", {"prompt": ""}, "at least 1", "prompt"),
    ("images", {"prompt": "x", "model": "gpt-image-1"}, "unknown model", "model"),
    ("videos", {"prompt": "x", "output_format": "webm"}, "gif", "output_format"),
    ("videos", {"prompt": "x", "image": "not base64!"}, "base64", "image"),
    ("videos", {"prompt": "x", "image": base64.b64encode(b"plain text").decode()}, "not a readable image", "image"),
    ("videos", {"prompt": "x", "steps": 9}, "less than or equal", "steps"),
]


@pytest.mark.parametrize("endpoint,body,words,param", BAD)
def test_bad_media_requests_get_an_openai_error(mm_server, endpoint, body, words, param):
    r = httpx.post(f"{mm_server}/v1/{endpoint}/generations", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["param"] == param


def test_a_text_only_checkpoint_refuses_images(live_server):
    r = httpx.post(live_server + "/v1/images/generations", json={"prompt": "x"}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_multimodal"
