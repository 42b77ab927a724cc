"""Images and clips over HTTP, for a multimodal checkpoint (`dsv4 multimodal`), in the OpenAI images API's shape.

    POST /v1/images/generations   {"prompt": "a red circle in the top left", "n": 2, "size": "128x128"}
                                  -> {"created": ..., "data": [{"b64_json": <PNG>}, ...], "output_format": "png"}
    POST /v1/videos/generations   the same shape, {"output_format": "gif" | "mp4"}; with "image" (a base64 PNG/JPEG or
                                  a data: URL) the clip starts from that picture and the prompt names its motion

The samples are the engine's requests like any other (`dsv4.engine.visual.VisualJob`: constrained spans, guided rows),
batched with the text requests being served. `size` is the written picture's side, a multiple of the model's
(each generated pixel becomes a square block). Beyond OpenAI's fields: seed, cfg_scale, temperature, top_p, top_k,
and for clips steps and fps.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from typing import Annotated, Literal

from fastapi import Depends
from pydantic import BaseModel, Field

from dsv4.engine.media import encode_media, read_image_bytes
from dsv4.engine.sampling import SamplingParams
from dsv4.engine.visual import CFG_SCALE, TEMPERATURE, VisualJob, VisualModel, clip_job, image_job
from dsv4.serve.errors import APIError
from dsv4.serve.protocol import Body, Seed, Temperature, TopP, now
from dsv4.serve.routes import Served, served
from dsv4.serve.run import Run

MAX_IMAGES = 10  # as OpenAI's images API
MAX_SIDE = 1024


class ImageRequest(Body):
    prompt: Annotated[str, Field(min_length=1, max_length=1000)]
    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    size: Annotated[str, Field(pattern=r"^\d{1,4}x\d{1,4}$")] | None = None  # default: 4 x the model's side
    response_format: Literal["b64_json"] = "b64_json"  # no hosted files: the bytes come back in the body
    output_format: Literal["png"] = "png"
    seed: Seed | None = None
    cfg_scale: Annotated[float, Field(ge=0, le=30)] = CFG_SCALE  # classifier-free guidance; 1 = none
    temperature: Temperature = TEMPERATURE
    top_p: TopP = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0


class VideoRequest(ImageRequest):
    n: Annotated[int, Field(ge=1, le=4)] = 1
    output_format: Literal["gif", "mp4"] = "gif"
    image: str | None = None  # animate this picture: base64 bytes or a data: URL
    steps: Annotated[int, Field(ge=2, le=4)] = 3  # latent steps: 1 + 4 (steps - 1) frames
    fps: Annotated[int, Field(ge=1, le=30)] = 6


class MediaData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class MediaResponse(BaseModel):
    created: int
    data: list[MediaData]
    output_format: str
    size: str


def visual_model(s: Served, body: ImageRequest) -> VisualModel:
    """The served model's visual side, once the request names it (or no model) and it has one."""
    if body.model is not None:
        s.check_model(body.model)
    if s.visual is None:
        raise APIError(400, f"{s.model_name!r} generates text only: images and clips need a checkpoint trained by "
                            "`dsv4 multimodal`", param="model", code="model_not_multimodal")
    return s.visual


def scale_of(size: str | None, side: int) -> int:
    if size is None:
        return 4
    w, h = map(int, size.split("x"))
    if w != h or w % side or not side <= w <= MAX_SIDE:
        raise APIError(400, f"size must be a square whose side is a multiple of {side} up to {MAX_SIDE} (e.g. "
                            f"{4 * side}x{4 * side}), got {size}", param="size")
    return w // side


def read_image_field(data: str, side: int):
    try:
        raw = base64.b64decode(re.sub(r"^data:[^,]*,", "", data), validate=True)
        return read_image_bytes(raw, side)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"image must be a base64 PNG or JPEG (or a data: URL of one): {e}", param="image") from e


async def generate(s: Served, vm: VisualModel, job: VisualJob, body: ImageRequest, fmt: str, fps: int = 6):
    scale = scale_of(body.size, vm.size)
    if job.max_len(vm.vocab) > s.engine.max_len:
        raise APIError(400, f"the sample needs {job.max_len(vm.vocab)} positions; the server's context holds "
                            f"{s.engine.max_len}", param="prompt")
    params = SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k)
    run = Run(s.runner, s.metrics, job.requests(vm, body.n, params, body.cfg_scale, body.seed))
    outs = await run.collect()
    pixels = await asyncio.to_thread(job.decode, vm, [[t for d in o for t in d.token_ids] for o in outs])
    data = [MediaData(b64_json=base64.b64encode(encode_media(x, fmt, scale, fps)).decode()) for x in pixels]
    side = vm.size * scale
    return MediaResponse(created=now(), data=data, output_format=fmt, size=f"{side}x{side}")


async def images(body: ImageRequest, s: Served = Depends(served)):
    vm = visual_model(s, body)
    return await generate(s, vm, image_job(vm, body.prompt), body, body.output_format)


async def videos(body: VideoRequest, s: Served = Depends(served)):
    vm = visual_model(s, body)
    image = None if body.image is None else read_image_field(body.image, vm.size)
    job = await asyncio.to_thread(clip_job, vm, body.prompt, body.steps, image)
    return await generate(s, vm, job, body, body.output_format, body.fps)


def add_media_routes(app, dependencies, responses):
    app.post("/v1/images/generations", dependencies=dependencies, response_model=MediaResponse,
             responses=responses)(images)
    app.post("/v1/videos/generations", dependencies=dependencies, response_model=MediaResponse,
             responses=responses)(videos)
