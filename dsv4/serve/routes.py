"""The endpoints (see dsv4.serve.app for the list). Each handler reads what it serves from `app.state.served`, checks
the request (key, model name, room in the context), starts a Run and hands it to a response builder."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse

from dsv4.engine.engine import Engine
from dsv4.engine.json_mode import JsonVocab
from dsv4.engine.visual import VisualModel
from dsv4.serve import protocol as api
from dsv4.serve.errors import ERRORS, APIError
from dsv4.serve.metrics import Metrics
from dsv4.serve.prompts import budget, chat_prompt, completion_prompts
from dsv4.serve.responses import chat_chunks, chat_response, completion_chunks, completion_response, sse
from dsv4.serve.run import Run, text_requests
from dsv4.serve.runner import EngineRunner
from dsv4.serve.tools import output_parser
from dsv4.tokenizers.multimodal import TextOnly

STATIC = Path(__file__).parent / "static"
MAX_CHOICES = 64  # engine requests one API call may start


@dataclass
class Served:
    """What the app serves: the engine and the thread that drives it, the model's public name, the API key (None:
    open), the metrics, when it started (the model card's `created`) and, for a multimodal checkpoint, its visual
    side (vocabulary and pixel tokenizer)."""
    engine: Engine
    runner: EngineRunner
    metrics: Metrics
    model_name: str
    api_key: str | None
    created: int
    visual: VisualModel | None = None  # a multimodal checkpoint's: the image and video endpoints

    @property
    def text_only(self):
        """For a multimodal model, a factory of the processor that keeps text requests to text ids, else None."""
        if self.visual is None:
            return None
        return functools.partial(TextOnly, self.visual.vocab.text_size)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @functools.cached_property
    def json_vocab(self) -> JsonVocab:
        """The tokens JSON mode allows in each state, shared by every request that asks for it."""
        return JsonVocab(self.tokenizer)

    def processor(self, response_format: api.ResponseFormat | None):
        """A factory of each request's logits processor: one JSON object for `response_format` json_object (its
        tokens are ordinary text tokens, so a multimodal model's visual codes are out too), else `text_only`."""
        kind = response_format.type if response_format is not None else "text"
        if kind == "json_schema":
            raise APIError(400, "response_format json_schema is not supported; use {\"type\": \"json_object\"} and "
                                "describe the schema in the prompt", param="response_format")
        return self.json_vocab.processor if kind == "json_object" else self.text_only

    def check_model(self, name: str):
        if name != self.model_name:
            raise APIError(400, f"unknown model {name!r}; this server serves {self.model_name!r}", param="model",
                           code="model_not_found")


def served(request: Request) -> Served:
    return request.app.state.served


async def authorize(request: Request):
    """With an API key set, /v1/* and /metrics need `Authorization: Bearer KEY` (a 401 otherwise)."""
    api_key = served(request).api_key
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token.strip() != api_key:
        raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                       type="authentication_error", code="invalid_api_key")


async def health(s: Served = Depends(served)):
    return {"status": "ok", "model": s.model_name, "running": s.runner.running, "waiting": s.runner.queue_depth}


async def prometheus(s: Served = Depends(served)):
    return PlainTextResponse(s.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def page():
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))


async def models(s: Served = Depends(served)):
    modalities = ["text", "image", "video"] if s.visual is not None else ["text"]
    return api.ModelList(data=[api.ModelCard(id=s.model_name, created=s.created, max_model_len=s.engine.max_len,
                                             modalities=modalities)])


async def chat(body: api.ChatCompletionRequest, s: Served = Depends(served)):
    s.check_model(body.model)
    prompt = chat_prompt(s.tokenizer, body)
    max_new = budget(s.engine.max_len, len(prompt), body.max_completion_tokens or body.max_tokens)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    tools = bool(body.tools) and body.tool_choice != "none"
    run = Run(s.runner, s.metrics, text_requests([prompt] * body.n, body, max_new, logprobs,
                                                 s.processor(body.response_format)))
    parsers = [output_parser(s.tokenizer, body.wants_thinking(), tools) for _ in range(body.n)]
    if body.stream:
        return sse(chat_chunks(run, body, parsers, s.model_name, s.tokenizer))
    return await chat_response(run, parsers, s.model_name, s.tokenizer)


async def complete(body: api.CompletionRequest, s: Served = Depends(served)):
    s.check_model(body.model)
    prompts = completion_prompts(s.tokenizer, body.prompt)
    max_new = min(budget(s.engine.max_len, len(p), body.max_tokens) for p in prompts)
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"at most {MAX_CHOICES} completions per request (prompts x n), got "
                            f"{len(prompts)} x {body.n}", param="prompt")
    each = [p for p in prompts for _ in range(body.n)]
    run = Run(s.runner, s.metrics, text_requests(each, body, max_new, body.logprobs, s.text_only))
    if body.stream:
        return sse(completion_chunks(run, body, each, s.model_name, s.tokenizer))
    return await completion_response(run, body, each, s.model_name, s.tokenizer)


def add_routes(app: FastAPI):
    key = [Depends(authorize)]
    app.get("/health")(health)
    app.get("/metrics", dependencies=key, response_class=PlainTextResponse)(prometheus)
    app.get("/", response_class=HTMLResponse, include_in_schema=False)(page)
    app.get("/v1/models", dependencies=key, response_model=api.ModelList, responses=ERRORS)(models)
    app.post("/v1/chat/completions", dependencies=key, response_model=api.ChatCompletion, responses=ERRORS)(chat)
    app.post("/v1/completions", dependencies=key, response_model=api.Completion, responses=ERRORS)(complete)
    from dsv4.serve.media import add_media_routes  # it builds on this module's Served

    add_media_routes(app, key, ERRORS)
