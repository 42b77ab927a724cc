"""`dsv4 serve` on loopback, driven by the official `openai` client and by raw HTTP: answers equal the engine's,
streaming equals non-streaming, bad input gets OpenAI-style errors, disconnects and SIGTERM are handled."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dsv4
from dsv4.engine.engine import Engine
from dsv4.engine.sampling import SamplingParams
from dsv4.serve.tools import CALLS_BEGIN, CALLS_END, OutputParser, render_call
from dsv4.tokenizers.text import END_THINK, Tokenizer
from tests.serve_util import (  # live_server, server_ckpt: fixtures
    API_KEY,
    MODEL,
    WEATHER_CALL,
    WEATHER_QUESTION,
    WEATHER_TOOL,
    Server,
    live_server,
    server_ckpt,
    tool_calling_checkpoint,
)

PROMPTS = ["def foo(x):\n    return", "import os\n", "class A:\n", "x = [", "for i in range(10):\n"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def local(server_ckpt):
    """The same checkpoint in an in-process engine: what each answer must equal."""
    model = dsv4.from_pretrained(server_ckpt)
    tok = Tokenizer.from_file(server_ckpt / "tokenizer.json")
    return Engine(model, tok, max_batch=1, max_len=2048), tok


def chat_ids(tok, content: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": content}], add_generation_prompt=True)[0]


def alone(local, ids: list[int], n: int) -> str:
    engine, _ = local
    return engine.generate([ids], SamplingParams(temperature=0), max_new_tokens=n)[0].text


def test_models_and_health(client, live_server):
    [card] = client.models.list().data
    assert card.id == MODEL and card.max_model_len == 2048
    health = httpx.get(live_server + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_chat_equals_the_engine_streaming_or_not(client, local):
    _, tok = local
    for prompt in PROMPTS[:3]:
        want = alone(local, chat_ids(tok, prompt), 12)
        messages = [{"role": "user", "content": prompt}]
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want
        assert r.usage.prompt_tokens == len(chat_ids(tok, prompt)) and r.usage.completion_tokens <= 12
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_a_chats_next_turn_starts_from_the_prefix_cache(client, local, live_server):
    """The server keeps served prompts and answers (--prefix-cache-gb, on by default): the next turn of a chat
    prefills only what is new, reports the rest as cached_tokens, answers as a fresh engine does, and /metrics counts
    the hit."""
    _, tok = local
    first = [{"role": "user", "content": "def fib(n):\n    " * 3}]
    r = client.chat.completions.create(model=MODEL, messages=first, max_tokens=12, temperature=0)
    turn = first + [{"role": "assistant", "content": r.choices[0].message.content},
                    {"role": "user", "content": "and again"}]
    before = prefix_metric(live_server, "tokens_reused")
    r2 = client.chat.completions.create(model=MODEL, messages=turn, max_tokens=12, temperature=0)
    ids = tok.encode_chat(turn, add_generation_prompt=True)[0]
    assert r2.choices[0].message.content == alone(local, ids, 12)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert len(chat_ids(tok, first[0]["content"])) <= cached < r2.usage.prompt_tokens == len(ids)
    assert prefix_metric(live_server, "tokens_reused") - before == cached
    assert prefix_metric(live_server, "hits") >= 1


def prefix_metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return float(next(line for line in text.splitlines() if line.startswith(f"dsv4_prefix_cache_{name} ")).split()[-1])


def test_completions_n_seed_stop_and_logprobs(client, local):
    _, tok = local
    want = alone(local, tok.encode(PROMPTS[0]), 10)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0, logprobs=2)
    assert r.choices[0].text == want
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == r.usage.completion_tokens and all(len(t) <= 2 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == want
    # n choices with a seed: reproducible, and each choice its own stream
    a = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=3, seed=7)
    b = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=3, seed=7)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1
    # a stop string cuts the text before it
    cut = want[2:5]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0, stop=[cut])
    assert r.choices[0].text == want[: want.index(cut)] and r.choices[0].finish_reason == "stop"


def test_vllm_sampling_fields_reach_the_engine(client, local):
    """top_k, min_p and repetition_penalty, the extra body fields vLLM accepts: top_k=1 or min_p=1 keep only the most
    probable token (the greedy answer at any temperature); a repetition penalty gives the engine's own answer."""
    engine, tok = local
    greedy = alone(local, tok.encode(PROMPTS[0]), 10)
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=1.5, seed=3,
                                      extra_body=extra)
        assert r.choices[0].text == greedy, extra
    want = engine.generate([tok.encode(PROMPTS[4])], SamplingParams(temperature=0, repetition_penalty=5.0),
                           max_new_tokens=12)[0].text
    assert want != alone(local, tok.encode(PROMPTS[4]), 12)  # (the penalty changes this answer)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=12, temperature=0,
                                  extra_body={"repetition_penalty": 5.0})
    assert r.choices[0].text == want


def test_json_object_mode_writes_json_and_json_schema_is_refused(client, live_server):
    from dsv4.engine.json_mode import START, advance

    messages = [{"role": "user", "content": "the weather as JSON"}]
    for temperature in (0, 1.0):
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=temperature,
                                           seed=1, response_format={"type": "json_object"})
        text = r.choices[0].message.content
        assert text.lstrip().startswith("{") and advance(START, text.encode()) is not None, text
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
    body = {"model": MODEL, "messages": messages, "response_format": {"type": "json_schema", "json_schema": {}}}
    r = httpx.post(live_server + "/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_thinking_goes_to_reasoning_content(client, local):
    """With thinking on, the prompt opens <think> and the answer text before </think> is reasoning_content."""
    _, tok = local
    messages = [{"role": "user", "content": PROMPTS[2]}]
    ids = tok.encode_chat(messages, add_generation_prompt=True, thinking=True)[0]
    want = alone(local, ids, 12)
    reasoning, _, content = want.partition(END_THINK)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                       extra_body={"thinking": {"type": "enabled"}})
    assert (r.choices[0].message.reasoning_content or "") == reasoning
    assert (r.choices[0].message.content or "") == content


def test_tools_request_is_accepted_and_rendered(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    for choice in ("auto", "none", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice=choice,
                                           max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    server = Server(tool_calling_checkpoint(tmp_path_factory.mktemp("tools")))
    yield openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    server.stop()


@pytest.mark.slow
def test_a_models_tool_call_becomes_tool_calls_streaming_or_not(tool_server):
    """A model that answers in DeepSeek's tool-call markup: the client gets OpenAI tool_calls, the same whether
    streamed (the engine's deltas split the markup anywhere; the parser holds partial markers back) or not."""
    ask = dict(model=MODEL, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], max_tokens=300, temperature=0)
    r = tool_server.chat.completions.create(**ask)
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == WEATHER_CALL and call.type == "function"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
    calls, reason, content = {}, None, ""
    for chunk in tool_server.chat.completions.create(**ask, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or []:
            calls.setdefault(c.index, [c.id, c.function.name, ""])[2] += c.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    assert [(name, args) for _, name, args in calls.values()] == [WEATHER_CALL] and reason == "tool_calls"
    assert content == ""
    # the call fed back with its result renders into the next prompt (a well-formed request, whatever comes next)
    follow = WEATHER_QUESTION + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                          "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r = tool_server.chat.completions.create(**{**ask, "messages": follow, "max_tokens": 8})
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")


@st.composite
def outputs(draw):
    """Model output text mixing reasoning, answer, calls and broken markup, cut into random pieces."""
    words = st.sampled_from(["a", " b", "{", '"x": 1', "}", "\n", "<", "｜", END_THINK, CALLS_BEGIN, CALLS_END,
                             render_call("f", '{"a": 1}'), render_call("g_2", "{}"), "<｜tool▁call▁begin｜>h"])
    text = "".join(draw(st.lists(words, max_size=12)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=6)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    return text, pieces, draw(st.booleans()), draw(st.booleans())


def merged(events):
    text = {"reasoning": "", "content": ""}
    calls = []
    for kind, value in events:
        if kind == "tool_call":
            calls.append((value.index, value.name, value.arguments))
        else:
            text[kind] += value
    return text, calls


@settings(max_examples=300, deadline=None)
@given(outputs())
def test_output_parser_is_chunking_invariant(case):
    """Streaming (any pieces) and non-streaming (one piece) parse to the same reasoning, answer and calls."""
    text, pieces, thinking, tools = case
    whole = OutputParser(thinking, tools)
    ref = merged(whole.push(text) + whole.flush())
    streamed = OutputParser(thinking, tools)
    events = [e for p in pieces for e in streamed.push(p)] + streamed.flush()
    assert merged(events) == ref
    if not thinking and not tools:
        assert ref[0]["content"] == text


def test_output_parser_reads_calls_and_thinking():
    parser = OutputParser(thinking=True, tools=True)
    text = ("plan" + END_THINK + "ok" + CALLS_BEGIN + render_call("get", '{"q": 1}') + render_call("put", "{}")
            + CALLS_END)
    text_out, calls = merged(parser.push(text) + parser.flush())
    assert text_out == {"reasoning": "plan", "content": "ok"}
    assert calls == [(0, "get", '{"q": 1}'), (1, "put", "{}")]


BAD = [  # (body or raw bytes, status, words the message must contain, param)
    (b"{not json", 400, "JSON", None),
    (b"[1, 2]", 400, "JSON object", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature",
     "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "less than or equal",
     "temperature"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 400, "unknown model", "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400, "max_tokens",
     "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 12}, 400, "max_tokens",
     "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 1000}, 400, "n", "n"),
    ({"model": MODEL, "messages": []}, 400, "messages", "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role", "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, 400,
     "stop", "stop"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1e-300}, 400,
     "greater than or equal", "repetition_penalty"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "min_p": 1.5}, 400, "min_p", "min_p"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_k": -2}, 400, "top_k", "top_k"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x " * 3000}]}, 400, "context holds 2048", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3000}, 400, "context holds 2048",
     None),
]


@pytest.mark.parametrize("body,status,words,param", BAD)
def test_bad_input_gets_an_openai_error(live_server, body, status, words, param):
    kw = {"content": body, "headers": {**AUTH, "Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": AUTH}
    r = httpx.post(live_server + "/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_too_many_completions_in_one_request(live_server):
    body = {"model": MODEL, "prompt": ["a"] * 20, "n": 4, "max_tokens": 1}
    r = httpx.post(live_server + "/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 400 and "at most 64 completions per request" in r.json()["error"]["message"]


def test_api_key_is_required(live_server):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(live_server + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(live_server + "/v1/models").status_code == 401
    assert httpx.get(live_server + "/health").status_code == 200  # liveness stays open
    assert httpx.get(live_server + "/openapi.json").json()["paths"]["/v1/chat/completions"]


def wait_idle(url: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(url + "/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the server is still busy: {health}")


def test_ignore_eos_generates_max_tokens(client):
    """The random model samples its end-of-text token now and then (these four choices stop after 856 tokens in all
    without it); with vLLM's `ignore_eos` every choice runs to max_tokens."""
    out = client.completions.create(model=MODEL, prompt="a", max_tokens=300, n=4, temperature=1.0, seed=3,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4 * 300
    assert [c.finish_reason for c in out.choices] == ["length"] * 4


def test_disconnect_cancels_the_generation(live_server):
    # ignore_eos: a sampled end-of-text token must not end the request before the client hangs up
    body = {"model": MODEL, "prompt": "a", "max_tokens": 400, "stream": True, "temperature": 1.0, "ignore_eos": True}
    with httpx.stream("POST", live_server + "/v1/completions", json=body, headers=AUTH) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert httpx.get(live_server + "/health").json()["running"] == 1
    assert any(line.startswith("data: {") for line in got)
    wait_idle(live_server, timeout=10)  # the closed stream cancelled it long before 400 tokens
    metrics = httpx.get(live_server + "/metrics", headers=AUTH).text
    assert "dsv4_queue_depth 0.0" in metrics
    generated = [line for line in metrics.splitlines() if line.startswith("dsv4_generated_tokens_total")]
    assert float(generated[0].split()[-1]) < 200 * 8  # nothing ran to its full length while nobody listened


@pytest.mark.slow
def test_32_concurrent_streams_equal_their_answers_alone(live_server, local):
    """32 clients stream at once through 8 cache slots: all complete, each greedy answer as the engine gives it
    alone, nothing lost."""
    _, tok = local
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}{i}" for i in range(32)]
    want = [alone(local, chat_ids(tok, p), 10) for p in prompts]

    async def one(aclient, prompt):
        stream = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                       max_tokens=10, temperature=0, stream=True)
        parts, reason = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
        return "".join(parts), reason

    async def run():
        aclient = openai.AsyncOpenAI(base_url=live_server + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*(one(aclient, p) for p in prompts))

    results = asyncio.run(run())
    assert [text for text, _ in results] == want
    assert all(reason in ("length", "stop") for _, reason in results)
    metrics = httpx.get(live_server + "/metrics", headers=AUTH).text
    assert 'dsv4_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics


@pytest.mark.parametrize("drain, finish", [("60", "length"), ("0.5", "cancelled")])
def test_sigterm_finishes_or_cancels_in_flight_requests(server_ckpt, drain, finish):
    """SIGTERM lets a running stream finish within --drain-timeout, or cancels it: either way the stream ends with
    its last chunk and [DONE], and nothing in the log is a traceback (uvicorn's own cancel prints one)."""
    server = Server(server_ckpt, "--max-batch", "2", "--drain-timeout", drain, api_key=None)
    seen, done = [], threading.Event()
    max_tokens = 40 if finish == "length" else 1500

    def consume():
        body = {"model": MODEL, "prompt": "a", "max_tokens": max_tokens, "stream": True,
                "temperature": 0}  # greedy: the same tokens every run (this prompt meets no end-of-text)
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    seen.append(line)
        except httpx.HTTPError as e:
            seen.append(f"error: {e!r}")
        done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    while len(seen) < 3:
        time.sleep(0.02)
    server.stop()  # SIGTERM
    assert done.wait(30)
    log = server.output()
    assert "Traceback" not in log, log
    seen = [line for line in seen if line]
    assert seen[-1] == "data: [DONE]", seen[-3:]
    assert server.proc.returncode in (0, -15)
    chunks = [json.loads(line[6:]) for line in seen if line.startswith("data: {")]
    assert chunks and all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == finish
