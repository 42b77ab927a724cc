"""`dsv4 serve`: an OpenAI-compatible HTTP API (FastAPI) over the inference engine, plus the web chat page.

    GET  /v1/models            the one model served
    POST /v1/completions       plain-text continuation (streaming with SSE or not)
    POST /v1/chat/completions  chat with the model's template; tools; thinking (reasoning_content)
    GET  /health               liveness and load
    GET  /metrics              Prometheus text: requests, tokens, queue depth, latencies
    GET  /                     the web chat page (dsv4/serve/static/index.html)

Every body is a pydantic model (dsv4/serve/protocol.py), so /openapi.json describes what is accepted and bad input
is refused with an OpenAI-style error naming the field, before it reaches the engine. One thread drives the engine
(dsv4/serve/runner.py; `dsv4 serve` uses the main thread); a client that disconnects cancels its requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv4.engine.engine import Delta, Engine
from dsv4.engine.sampling import SamplingParams
from dsv4.serve import protocol as api
from dsv4.serve.runner import EngineError, EngineRunner, ShuttingDown
from dsv4.serve.tools import OutputParser, render_calls, render_output, tools_prompt

log = logging.getLogger("dsv4.serve")
STATIC = Path(__file__).parent / "static"
MAX_CHOICES = 64  # engine requests one API call may start


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.detail = status, api.ErrorDetail(message=message, type=type, param=param, code=code)


def error_response(status: int, detail: api.ErrorDetail) -> JSONResponse:
    return JSONResponse(api.ErrorResponse(error=detail).model_dump(), status_code=status)


ERRORS = {400: {"model": api.ErrorResponse}, 401: {"model": api.ErrorResponse}}


class Metrics:
    def __init__(self, runner: EngineRunner):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dsv4_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "prompt tokens submitted", registry=r)
        self.generated_tokens = Counter("dsv4_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "request arrival to its first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.latency = Histogram("dsv4_request_seconds", "request arrival to its last token", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        Gauge("dsv4_queue_depth", "requests waiting for a cache slot", registry=r).set_function(
            lambda: runner.queue_depth)
        Gauge("dsv4_running", "requests holding a cache slot", registry=r).set_function(lambda: runner.running)
        Gauge("dsv4_engine_busy_seconds", "time spent in engine steps", registry=r).set_function(
            lambda: runner.step_seconds)


def create_app(engine: Engine, model_name: str, api_key: str | None = None, shutdown_timeout: float = 10.0,
               runner: EngineRunner | None = None) -> FastAPI:
    """The app over `engine`. Without a `runner`, the app starts one on its own thread; with one, whoever made it
    drives it (`dsv4 serve` runs it on the main thread) and the app only stops it at shutdown."""
    own = runner is None
    runner = runner or EngineRunner(engine)
    tokenizer = engine.tokenizer
    metrics = Metrics(runner)
    created = api.now()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if own:
            runner.start()
        yield
        await asyncio.to_thread(runner.stop, shutdown_timeout)

    app = FastAPI(title="dsv4", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for a DeepSeek-V4 model served by dsv4")
    app.state.runner = runner

    # ---- errors in the OpenAI format ----
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.detail)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        where = []
        for part in err.get("loc", ())[1:]:  # after "body"; a union's member tag ("str", "list[str]") ends the path
            if isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or "-" in part):
                break
            where.append(str(part))
        if err.get("type") == "json_invalid" or not where:
            message = "the request body must be a JSON object (malformed JSON, or not an object)"
        else:
            message = f"{'.'.join(where) or 'body'}: {err.get('msg')}"
        return error_response(400, api.ErrorDetail(message=message, type="invalid_request_error",
                                                   param=".".join(where) or None, code=err.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, api.ErrorDetail(message=str(e.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error")
        return error_response(500, api.ErrorDetail(message="internal error", type="server_error"))

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path if request.url.path.startswith("/v1/") else "other",
                                str(response.status_code)).inc()
        return response

    async def authorize(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != api_key:
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

    def check_model(name: str):
        if name != model_name:
            raise APIError(400, f"unknown model {name!r}; this server serves {model_name!r}", param="model",
                           code="model_not_found")

    def budget(prompt_len: int, asked: int | None) -> int:
        """New tokens a request may generate, or a 400 saying the limits."""
        room = engine.max_len - prompt_len
        if room < 1 or (asked is not None and asked > room):
            raise APIError(400, f"this model's context holds {engine.max_len} tokens (prompt + completion); the "
                                f"request has {prompt_len} prompt tokens and asks for "
                                f"{asked if asked is not None else 'at least 1'} more", param="messages",
                           code="context_length_exceeded")
        return asked if asked is not None else room

    # ---- endpoints ----
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": runner.running, "waiting": runner.queue_depth}

    @app.get("/metrics", dependencies=[Depends(authorize)], response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/v1/models", dependencies=[Depends(authorize)], response_model=api.ModelList, responses=ERRORS)
    async def models():
        return api.ModelList(data=[api.ModelCard(id=model_name, created=created, max_model_len=engine.max_len)])

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], response_model=api.ChatCompletion,
              responses=ERRORS)
    async def chat(body: api.ChatCompletionRequest):
        check_model(body.model)
        prompt = chat_prompt(tokenizer, body)
        max_new = budget(len(prompt), body.max_completion_tokens or body.max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        tools = bool(body.tools) and body.tool_choice != "none"
        run = Run(runner, metrics, [prompt] * body.n, sampling(body, body.n), max_new, body.stops(), logprobs)
        parsers = [OutputParser(body.wants_thinking(), tools) for _ in range(body.n)]
        if body.stream:
            return sse(chat_chunks(run, body, parsers))
        return await chat_response(run, body, parsers)

    @app.post("/v1/completions", dependencies=[Depends(authorize)], response_model=api.Completion,
              responses=ERRORS)
    async def complete(body: api.CompletionRequest):
        check_model(body.model)
        prompts = completion_prompts(tokenizer, body.prompt)
        max_new = min(budget(len(p), body.max_tokens) for p in prompts)
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} completions per request (prompts x n), got "
                                f"{len(prompts)} x {body.n}", param="prompt")
        each = [p for p in prompts for _ in range(body.n)]
        run = Run(runner, metrics, each, sampling(body, len(each)), max_new, body.stops(), body.logprobs)
        if body.stream:
            return sse(completion_chunks(run, body, each))
        return await completion_response(run, body, each)

    # ---- chat ----
    async def chat_response(run: Run, body, parsers) -> api.ChatCompletion:
        outs = await run.collect()
        choices = []
        for i, (deltas, parser) in enumerate(zip(outs, parsers)):
            events = parser.push("".join(d.text for d in deltas)) + parser.flush()
            text = {k: "".join(v for kind, v in events if kind == k) for k in ("content", "reasoning")}
            calls = [v for kind, v in events if kind == "tool_call"]
            message = api.AssistantMessage(
                content=text["content"] if text["content"] or not calls else None,
                reasoning_content=text["reasoning"] or None,
                tool_calls=[tool_call(c) for c in calls] or None)
            choices.append(api.ChatChoice(index=i, message=message, finish_reason=finish(deltas[-1], calls),
                                          logprobs=chat_logprobs(deltas) if run.logprobs is not None else None))
        return api.ChatCompletion(id=api.new_id("chatcmpl"), created=api.now(), model=model_name, choices=choices,
                                  usage=run.usage())

    async def chat_chunks(run: Run, body, parsers) -> AsyncIterator[str]:
        cid, t = api.new_id("chatcmpl"), api.now()

        def chunk(index, delta: api.ChatDelta, reason=None, logprobs=None) -> str:
            return api.ChatCompletionChunk(id=cid, created=t, model=model_name, choices=[api.ChatChunkChoice(
                index=index, delta=delta, finish_reason=reason, logprobs=logprobs)]).model_dump_json(
                exclude_none=True)

        calls: list[list] = [[] for _ in parsers]
        for i in range(len(parsers)):
            yield chunk(i, api.ChatDelta(role="assistant", content=""))
        async for i, delta in run.stream():
            parser = parsers[i]
            events = parser.push(delta.text) + (parser.flush() if delta.finish_reason else [])
            logprobs = chat_logprobs([delta]) if run.logprobs is not None and delta.token_ids else None
            for kind, value in events:
                if kind == "tool_call":
                    calls[i].append(value)
                    yield chunk(i, api.ChatDelta(tool_calls=[api.ToolCallDelta(
                        index=value.index, id=value.id, type="function",
                        function={"name": value.name, "arguments": value.arguments})]))
                else:
                    field = "content" if kind == "content" else "reasoning_content"
                    yield chunk(i, api.ChatDelta(**{field: value}), logprobs=logprobs)
                    logprobs = None
            if logprobs is not None:  # tokens whose text is held back still report their log-probabilities
                yield chunk(i, api.ChatDelta(), logprobs=logprobs)
            if delta.finish_reason:
                yield chunk(i, api.ChatDelta(), reason=finish(delta, calls[i]))
        if body.stream_options and body.stream_options.include_usage:
            yield api.ChatCompletionChunk(id=cid, created=t, model=model_name, choices=[],
                                          usage=run.usage()).model_dump_json(exclude_none=True)

    def tool_call(c) -> api.ToolCall:
        return api.ToolCall(id=c.id, function=api.FunctionCall(name=c.name, arguments=c.arguments))

    def chat_logprobs(deltas: list[Delta]) -> api.ChoiceLogprobs:
        content = []
        for d in deltas:
            for lp in d.logprobs or []:
                top = [api.TopLogprob(**token_text(i), logprob=v) for i, v in lp["top"]]
                content.append(api.TokenLogprob(**token_text(lp["token"]), logprob=lp["logprob"], top_logprobs=top))
        return api.ChoiceLogprobs(content=content)

    def token_text(token_id: int) -> dict:
        raw = tokenizer.decode([token_id]).encode("utf-8", "surrogateescape")
        return {"token": raw.decode("utf-8", "replace"), "bytes": list(raw)}

    # ---- completions ----
    async def completion_response(run: Run, body, prompts) -> api.Completion:
        outs = await run.collect()
        choices = []
        for i, deltas in enumerate(outs):
            text = "".join(d.text for d in deltas)
            if body.echo:
                text = shown(tokenizer.decode(prompts[i])) + text
            choices.append(api.CompletionChoice(index=i, text=text, finish_reason=finish(deltas[-1], []),
                                                logprobs=completion_logprobs(deltas) if body.logprobs is not None
                                                else None))
        return api.Completion(id=api.new_id("cmpl"), created=api.now(), model=model_name, choices=choices,
                              usage=run.usage())

    async def completion_chunks(run: Run, body, prompts) -> AsyncIterator[str]:
        cid, t = api.new_id("cmpl"), api.now()

        def chunk(index, text, reason=None, logprobs=None) -> str:
            return api.Completion(id=cid, created=t, model=model_name, choices=[api.CompletionChoice(
                index=index, text=text, finish_reason=reason, logprobs=logprobs)]).model_dump_json(exclude_none=True)

        if body.echo:
            for i, p in enumerate(prompts):
                yield chunk(i, shown(tokenizer.decode(p)))
        async for i, delta in run.stream():
            logprobs = completion_logprobs([delta]) if body.logprobs is not None else None
            if delta.text or logprobs is not None:
                yield chunk(i, delta.text, logprobs=logprobs)
            if delta.finish_reason:
                yield chunk(i, "", reason=finish(delta, []))
        if body.stream_options and body.stream_options.include_usage:
            yield api.Completion(id=cid, created=t, model=model_name, choices=[],
                                 usage=run.usage()).model_dump_json(exclude_none=True)

    def completion_logprobs(deltas: list[Delta], offset: int = 0) -> api.CompletionLogprobs:
        out = api.CompletionLogprobs()
        for d in deltas:
            for lp in d.logprobs or []:
                out.text_offset.append(offset)
                out.tokens.append(token_text(lp["token"])["token"])
                offset += len(out.tokens[-1])
                out.token_logprobs.append(lp["logprob"])
                out.top_logprobs.append({token_text(i)["token"]: v for i, v in lp["top"]})
        return out

    return app


class Run:
    """The engine requests behind one API call (n choices, or several prompts): submitted at once (a refused one
    -> 400, the others cancelled), read as a stream or collected, and cancelled if the caller stops listening."""

    def __init__(self, runner: EngineRunner, metrics: Metrics, prompts: list[list[int]], params: list[SamplingParams],
                 max_new: int, stops: list[str], logprobs: int | None):
        self.runner, self.metrics, self.logprobs = runner, metrics, logprobs
        self.start = time.perf_counter()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        self.ids: list[int] = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                self.ids.append(runner.submit(p, self.queue, i, params=sp, max_new_tokens=max_new, stop=stops,
                                              logprobs=logprobs))
        except ShuttingDown as e:
            self.cancel()
            raise APIError(503, str(e), type="server_error", code="shutting_down") from e
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e)) from e
        metrics.prompt_tokens.inc(self.prompt_tokens)

    async def stream(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta) until every request finished; cancels the unfinished ones if abandoned."""
        left, first = len(self.ids), True
        try:
            while left:
                i, delta = await self.queue.get()
                if isinstance(delta, EngineError):
                    raise delta
                if first and delta.token_ids:
                    self.metrics.ttft.observe(time.perf_counter() - self.start)
                    first = False
                self.completion_tokens += len(delta.token_ids)
                self.metrics.generated_tokens.inc(len(delta.token_ids))
                if delta.finish_reason is not None:
                    self.runner.finished(self.ids[i])
                    left -= 1
                yield i, delta
            self.metrics.latency.observe(time.perf_counter() - self.start)
        finally:
            self.cancel()

    async def collect(self) -> list[list[Delta]]:
        outs: list[list[Delta]] = [[] for _ in self.ids]
        try:
            async for i, delta in self.stream():
                outs[i].append(delta)
        except EngineError as e:
            raise APIError(500, str(e), type="server_error") from e
        return outs

    def cancel(self):
        for rid in self.ids:
            self.runner.cancel(rid)

    def usage(self) -> api.Usage:
        return api.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                         total_tokens=self.prompt_tokens + self.completion_tokens)


def sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    async def events():
        try:
            async for data in chunks:
                yield f"data: {data}\n\n"
        except EngineError as e:  # the status line is sent already: report in the stream, as OpenAI does
            detail = api.ErrorDetail(message=str(e), type="server_error")
            yield f"data: {api.ErrorResponse(error=detail).model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def finish(last: Delta, calls: list) -> str:
    if last.finish_reason == "stop" and calls:
        return "tool_calls"
    return last.finish_reason or "stop"


def shown(text: str) -> str:
    """Tokenizer text as a client sees it: bytes that never form a character become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def sampling(body: api.Sampling, count: int) -> list[SamplingParams]:
    """One SamplingParams per engine request; with a seed, request i draws from seed + i (reproducible choices)."""
    return [SamplingParams(temperature=body.temperature, top_p=body.top_p, presence_penalty=body.presence_penalty,
                           frequency_penalty=body.frequency_penalty,
                           seed=None if body.seed is None else (body.seed + i) % 2 ** 63) for i in range(count)]


def chat_prompt(tokenizer, body: api.ChatCompletionRequest) -> list[int]:
    """The conversation in the chat template: system/developer text first (with the tools section), tool calls and
    their results written in DeepSeek's markup, the generation prompt (with <think> when thinking is on)."""
    system = [m.text() for m in body.messages if m.role in ("system", "developer")]
    if body.tools and body.tool_choice != "none":
        choice = body.tool_choice.function.name if isinstance(body.tool_choice, api.NamedToolChoice) \
            else body.tool_choice
        system.append(tools_prompt([t.model_dump(exclude_none=True) for t in body.tools], choice))
    messages = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    for m in body.messages:
        if m.role == "assistant":
            text = m.text()
            if m.tool_calls:
                text += render_calls([(c.function.name, c.function.arguments) for c in m.tool_calls])
            messages.append({"role": "assistant", "content": text})
        elif m.role == "tool":
            messages.append({"role": "user", "content": render_output(m.text())})
        elif m.role == "user":
            messages.append({"role": "user", "content": m.text()})
    ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True, thinking=body.wants_thinking())
    return ids


def completion_prompts(tokenizer, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    else:
        prompts = prompt
    if all(isinstance(p, str) for p in prompts):
        out = [tokenizer.encode(p) for p in prompts]
    else:
        out = [list(p) for p in prompts]
    if any(not p for p in out):
        raise APIError(400, "the prompt is empty", param="prompt")
    return out
