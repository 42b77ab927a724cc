"""Engine deltas -> OpenAI response bodies: a whole chat.completion / text_completion once every choice finished, or
their chunks as server-sent events while they are generated.

Chat text goes through each choice's OutputParser (dsv4.serve.tools), so reasoning, answer and tool calls come out
the same streamed or not. A stream starts with one role chunk per choice, ends each choice with a chunk carrying its
finish_reason (and, when asked, one chunk with the usage), then `data: [DONE]`. An engine failure after the status
line was sent is reported inside the stream, as OpenAI does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from dsv4.engine.request import Delta
from dsv4.serve import protocol as api
from dsv4.serve.logprobs import chat_logprobs, completion_logprobs
from dsv4.serve.run import Run
from dsv4.serve.runner import EngineError
from dsv4.serve.tools import OutputParser, ToolCallOut


def finish(last: Delta, calls: list) -> str:
    """A choice's finish_reason: the engine's, except that a choice that stopped after calling tools says so."""
    if last.finish_reason == "stop" and calls:
        return "tool_calls"
    return last.finish_reason or "stop"


def shown(text: str) -> str:
    """Tokenizer text as a client sees it: bytes that never form a character become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


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


# ---- chat ----
def tool_call(c: ToolCallOut) -> api.ToolCall:
    return api.ToolCall(id=c.id, function=api.FunctionCall(name=c.name, arguments=c.arguments))


def chat_choice(index: int, deltas: list[Delta], parser: OutputParser, tokenizer, logprobs: bool) -> api.ChatChoice:
    """One finished choice: its whole text parsed into answer, reasoning and tool calls."""
    events = parser.push("".join(d.text for d in deltas)) + parser.flush()
    text = {k: "".join(v for kind, v in events if kind == k) for k in ("content", "reasoning")}
    calls = [v for kind, v in events if kind == "tool_call"]
    message = api.AssistantMessage(content=text["content"] if text["content"] or not calls else None,
                                   reasoning_content=text["reasoning"] or None,
                                   tool_calls=[tool_call(c) for c in calls] or None)
    return api.ChatChoice(index=index, message=message, finish_reason=finish(deltas[-1], calls),
                          logprobs=chat_logprobs(tokenizer, deltas) if logprobs else None)


async def chat_response(run: Run, parsers: list[OutputParser], model: str, tokenizer) -> api.ChatCompletion:
    outs = await run.collect()
    choices = [chat_choice(i, deltas, parser, tokenizer, run.logprobs is not None)
               for i, (deltas, parser) in enumerate(zip(outs, parsers))]
    return api.ChatCompletion(id=api.new_id("chatcmpl"), created=api.now(), model=model, choices=choices,
                              usage=run.usage())


def chat_deltas(parser: OutputParser, delta: Delta, calls: list,
                logprobs: api.ChoiceLogprobs | None) -> list[tuple[api.ChatDelta, str | None, object]]:
    """One engine delta of a choice -> its chunks' (delta, finish_reason, logprobs): text as content or reasoning,
    each tool call whole (appended to `calls`), the delta's logprobs on its first text chunk (or on a chunk of their
    own while the parser holds the text back), and the finish_reason on a last empty chunk."""
    out: list[tuple[api.ChatDelta, str | None, object]] = []
    for kind, value in parser.push(delta.text) + (parser.flush() if delta.finish_reason else []):
        if kind == "tool_call":
            calls.append(value)
            function = {"name": value.name, "arguments": value.arguments}
            out.append((api.ChatDelta(tool_calls=[api.ToolCallDelta(index=value.index, id=value.id, type="function",
                                                                     function=function)]), None, None))
        else:
            field = "content" if kind == "content" else "reasoning_content"
            out.append((api.ChatDelta(**{field: value}), None, logprobs))
            logprobs = None
    if logprobs is not None:  # tokens whose text is held back still report their log-probabilities
        out.append((api.ChatDelta(), None, logprobs))
    if delta.finish_reason:
        out.append((api.ChatDelta(), finish(delta, calls), None))
    return out


async def chat_chunks(run: Run, body: api.ChatCompletionRequest, parsers: list[OutputParser], model: str,
                      tokenizer) -> AsyncIterator[str]:
    cid, t = api.new_id("chatcmpl"), api.now()

    def chunk(index: int, delta: api.ChatDelta, reason: str | None = None, logprobs=None) -> str:
        choice = api.ChatChunkChoice(index=index, delta=delta, finish_reason=reason, logprobs=logprobs)
        return api.ChatCompletionChunk(id=cid, created=t, model=model, choices=[choice]).model_dump_json(
            exclude_none=True)

    calls: list[list] = [[] for _ in parsers]
    for i in range(len(parsers)):
        yield chunk(i, api.ChatDelta(role="assistant", content=""))
    async for i, delta in run.stream():
        logprobs = chat_logprobs(tokenizer, [delta]) if run.logprobs is not None and delta.token_ids else None
        for d, reason, lp in chat_deltas(parsers[i], delta, calls[i], logprobs):
            yield chunk(i, d, reason, lp)
    if body.stream_options and body.stream_options.include_usage:
        yield api.ChatCompletionChunk(id=cid, created=t, model=model, choices=[],
                                      usage=run.usage()).model_dump_json(exclude_none=True)


# ---- completions ----
async def completion_response(run: Run, body: api.CompletionRequest, prompts: list[list[int]], model: str,
                              tokenizer) -> api.Completion:
    outs = await run.collect()
    choices = []
    for i, deltas in enumerate(outs):
        text = "".join(d.text for d in deltas)
        if body.echo:
            text = shown(tokenizer.decode(prompts[i])) + text
        logprobs = completion_logprobs(tokenizer, deltas) if body.logprobs is not None else None
        choices.append(api.CompletionChoice(index=i, text=text, finish_reason=finish(deltas[-1], []),
                                            logprobs=logprobs))
    return api.Completion(id=api.new_id("cmpl"), created=api.now(), model=model, choices=choices, usage=run.usage())


async def completion_chunks(run: Run, body: api.CompletionRequest, prompts: list[list[int]], model: str,
                            tokenizer) -> AsyncIterator[str]:
    cid, t = api.new_id("cmpl"), api.now()

    def chunk(index: int, text: str, reason: str | None = None, logprobs=None) -> str:
        choice = api.CompletionChoice(index=index, text=text, finish_reason=reason, logprobs=logprobs)
        return api.Completion(id=cid, created=t, model=model, choices=[choice]).model_dump_json(exclude_none=True)

    if body.echo:
        for i, p in enumerate(prompts):
            yield chunk(i, shown(tokenizer.decode(p)))
    async for i, delta in run.stream():
        logprobs = completion_logprobs(tokenizer, [delta]) if body.logprobs is not None else None
        if delta.text or logprobs is not None:
            yield chunk(i, delta.text, logprobs=logprobs)
        if delta.finish_reason:
            yield chunk(i, "", reason=finish(delta, []))
    if body.stream_options and body.stream_options.include_usage:
        yield api.Completion(id=cid, created=t, model=model, choices=[],
                             usage=run.usage()).model_dump_json(exclude_none=True)
