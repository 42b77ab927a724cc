"""`dsv4 serve`: an OpenAI-compatible HTTP API (FastAPI) over the inference engine, plus the web chat page.

    GET  /v1/models            the one model served
    POST /v1/completions       plain-text continuation (streaming with SSE or not)
    POST /v1/chat/completions  chat with the model's template; tools; thinking (reasoning_content)
    POST /v1/images/generations, /v1/videos/generations
                               text -> image, text -> clip, image -> clip (a multimodal checkpoint; dsv4/serve/media.py)
    GET  /health               liveness and load
    GET  /metrics              Prometheus text: requests, tokens, queue depth, latencies
    GET  /                     the web page: chat, and images and clips inline (dsv4/serve/static/index.html)

Every body is a pydantic model (dsv4/serve/protocol.py), so /openapi.json describes what is accepted and bad input
is refused with an OpenAI-style error naming the field, before it reaches the engine. One thread drives the engine
(dsv4/serve/runner.py; `dsv4 serve` uses the main thread); a client that disconnects cancels its requests.

The package by role: routes (the endpoints), media (the image and video endpoints), errors (OpenAI error bodies),
prompts (requests -> token ids), run (the engine requests of one call), responses and logprobs (deltas -> bodies and
SSE chunks), metrics, tools (tool-call markup), lifecycle (`dsv4 serve`: uvicorn, signals, draining).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from dsv4.engine.engine import Engine
from dsv4.engine.visual import VisualModel
from dsv4.serve import protocol as api
from dsv4.serve.errors import add_error_handlers
from dsv4.serve.metrics import Metrics
from dsv4.serve.routes import Served, add_routes
from dsv4.serve.runner import EngineRunner


def create_app(engine: Engine, model_name: str, api_key: str | None = None, shutdown_timeout: float = 10.0,
               runner: EngineRunner | None = None, visual: VisualModel | None = None) -> FastAPI:
    """The app over `engine`. Without a `runner`, the app starts one on its own thread; with one, whoever made it
    drives it (`dsv4 serve` runs it on the main thread) and the app only stops it at shutdown. `visual`: the
    engine's model as a multimodal one (`visual_side`), which turns on the image and video endpoints."""
    own = runner is None
    runner = runner or EngineRunner(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if own:
            runner.start()
        yield
        await asyncio.to_thread(runner.stop, shutdown_timeout)

    app = FastAPI(title="dsv4", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for a DeepSeek-V4 model served by dsv4")
    app.state.runner = runner
    app.state.served = Served(engine, runner, Metrics(runner), model_name, api_key, api.now(), visual)
    add_error_handlers(app)
    app.middleware("http")(app.state.served.metrics.count)
    add_routes(app)
    return app
