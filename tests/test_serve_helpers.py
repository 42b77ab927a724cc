"""The server's parts without a server process: prompt building (chat template, tools, earlier calls and results;
completion prompts; the room left), finish reasons, the log-probability and chunk builders, validation errors, and
the app in-process (status codes and error bodies of every kind, SSE framing). tests/test_serve.py drives a real
`dsv4 serve` end to end."""

import json

import pytest
from fastapi.testclient import TestClient

from dsv4.engine.engine import Engine
from dsv4.engine.request import Delta
from dsv4.engine.sampling import SamplingParams
from dsv4.serve import protocol as api
from dsv4.serve.app import create_app
from dsv4.serve.errors import APIError, validation_detail
from dsv4.serve.logprobs import chat_logprobs, completion_logprobs, token_text
from dsv4.serve.prompts import budget, chat_messages, chat_prompt, completion_prompts
from dsv4.serve.responses import chat_choice, chat_deltas, finish, shown
from dsv4.serve.run import sampling
from dsv4.serve.tools import (
    CALLS_BEGIN,
    CALLS_END,
    OutputParser,
    render_call,
    render_calls,
    render_output,
    tools_prompt,
)
from dsv4.tokenizers.text import END_THINK, Tokenizer
from tests.helpers import random_model
from tests.test_data import FEW

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train((p.read_text() for p in FEW), vocab_size=512, n_vis=4)


# ---- prompts ----
def test_chat_messages_put_system_text_and_tools_first_and_render_calls_and_results(tok):
    body = api.ChatCompletionRequest(model="m", tools=[TOOL], tool_choice="auto", messages=[
        {"role": "user", "content": "weather?"},
        {"role": "system", "content": "be brief"},
        {"role": "assistant", "content": "let me see", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "rain"}]},
        {"role": "developer", "content": "no emoji"}])
    system = "be brief\n\nno emoji\n\n" + tools_prompt([api.Tool(**TOOL).model_dump(exclude_none=True)], "auto")
    assert chat_messages(body) == [
        {"role": "system", "content": system},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "let me see" + render_calls([("get_weather", '{"city": "Oslo"}')])},
        {"role": "user", "content": render_output("rain")}]
    assert chat_prompt(tok, body) == tok.encode_chat(chat_messages(body), add_generation_prompt=True)[0]


def test_tool_choice_none_leaves_the_tools_out_and_a_named_one_is_required(tok):
    messages = [{"role": "user", "content": "hi"}]
    none = api.ChatCompletionRequest(model="m", messages=messages, tools=[TOOL], tool_choice="none")
    assert chat_messages(none) == messages
    named = api.ChatCompletionRequest(model="m", messages=messages, tools=[TOOL],
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert "You must call the function get_weather." in chat_messages(named)[0]["content"]
    thinking = api.ChatCompletionRequest(model="m", messages=messages, thinking={"type": "enabled"})
    assert chat_prompt(tok, thinking) == tok.encode_chat(messages, add_generation_prompt=True, thinking=True)[0]


def test_completion_prompts_in_every_shape(tok):
    assert completion_prompts(tok, "def f") == [tok.encode("def f")]
    assert completion_prompts(tok, ["a", "b"]) == [tok.encode("a"), tok.encode("b")]
    assert completion_prompts(tok, [5, 6, 7]) == [[5, 6, 7]]
    assert completion_prompts(tok, [[5], [6, 7]]) == [[5], [6, 7]]
    for empty in ("", ["a", ""]):
        with pytest.raises(APIError) as e:
            completion_prompts(tok, empty)
        assert e.value.status == 400 and e.value.detail.param == "prompt" and "empty" in e.value.detail.message


def test_budget_is_the_room_left_or_a_400():
    assert budget(100, 40, None) == 60 and budget(100, 40, 60) == 60 and budget(100, 40, 5) == 5
    for prompt_len, asked, words in ((40, 61, "asks for 61 more"), (100, None, "asks for at least 1 more"),
                                     (120, 1, "has 120 prompt tokens")):
        with pytest.raises(APIError) as e:
            budget(100, prompt_len, asked)
        assert e.value.status == 400 and e.value.detail.code == "context_length_exceeded"
        assert "context holds 100 tokens" in e.value.detail.message and words in e.value.detail.message


def test_sampling_gives_each_choice_its_own_seed():
    body = api.CompletionRequest(model="m", prompt="x", temperature=0.5, top_p=0.9, presence_penalty=1,
                                 frequency_penalty=-1, seed=2 ** 63 - 2)
    params = sampling(body, 3)
    assert [p.seed for p in params] == [2 ** 63 - 2, 2 ** 63 - 1, 0]  # wrapped into the generator's range
    assert params[0] == SamplingParams(temperature=0.5, top_p=0.9, presence_penalty=1, frequency_penalty=-1,
                                       seed=2 ** 63 - 2)
    assert all(p.seed is None for p in sampling(api.CompletionRequest(model="m", prompt="x"), 2))


# ---- responses ----
def test_finish_reasons():
    call = object()
    assert finish(Delta(0, "", [], finish_reason="stop"), [call]) == "tool_calls"
    assert finish(Delta(0, "", [], finish_reason="stop"), []) == "stop"
    assert finish(Delta(0, "", [], finish_reason="length"), [call]) == "length"
    assert finish(Delta(0, "", [], finish_reason="cancelled"), []) == "cancelled"
    assert finish(Delta(0, "", []), []) == "stop"


def test_shown_replaces_bytes_that_form_no_character():
    assert shown("caf\u00e9") == "caf\u00e9"
    assert shown("a\udcc3") == "a\ufffd"  # a lone lead byte, as the tokenizer's surrogateescape text carries it


class PieceTokenizer:
    PIECES = {1: "he", 2: "llo", 3: "\udce2\udc82", 4: " x"}  # 3: two bytes of a three-byte character

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)


def lp(token, logprob, top=()):
    return {"token": token, "logprob": logprob, "top": list(top)}


def test_token_text_gives_text_and_bytes():
    tok = PieceTokenizer()
    assert token_text(tok, 2) == {"token": "llo", "bytes": list(b"llo")}
    assert token_text(tok, 3) == {"token": "\ufffd", "bytes": [0xE2, 0x82]}  # one incomplete character


def test_chat_logprobs_list_each_token_with_its_alternatives():
    tok = PieceTokenizer()
    deltas = [Delta(0, "he", [1], [lp(1, -0.5, [(1, -0.5), (2, -1.5)])]), Delta(0, "llo", [2], [lp(2, -0.1)]),
              Delta(0, "", [], None, "stop")]
    out = chat_logprobs(tok, deltas)
    assert [(c.token, c.logprob, c.bytes) for c in out.content] == [("he", -0.5, list(b"he")),
                                                                     ("llo", -0.1, list(b"llo"))]
    assert [(t.token, t.logprob) for t in out.content[0].top_logprobs] == [("he", -0.5), ("llo", -1.5)]
    assert out.content[1].top_logprobs == []


def test_completion_logprobs_count_character_offsets():
    tok = PieceTokenizer()
    deltas = [Delta(0, "hello", [1, 2], [lp(1, -1.0, [(4, -2.0)]), lp(2, -0.25)]), Delta(0, " x", [4], [lp(4, 0.0)])]
    out = completion_logprobs(tok, deltas, offset=3)
    assert out.tokens == ["he", "llo", " x"] and out.text_offset == [3, 5, 8]
    assert out.token_logprobs == [-1.0, -0.25, 0.0] and out.top_logprobs == [{" x": -2.0}, {}, {}]


def test_chat_deltas_split_text_calls_logprobs_and_the_finish():
    parser = OutputParser(thinking=False, tools=True)
    calls: list = []
    marks = api.ChoiceLogprobs(content=[])
    out = chat_deltas(parser, Delta(0, "ok" + CALLS_BEGIN + render_call("f", "{}") + CALLS_END, [1]), calls, marks)
    assert [(d.content, d.tool_calls is not None, reason, logprobs is marks) for d, reason, logprobs in out] == [
        ("ok", False, None, True), (None, True, None, False)]
    assert out[1][0].tool_calls[0].function == {"name": "f", "arguments": "{}"} and len(calls) == 1
    end = chat_deltas(parser, Delta(0, "", [], finish_reason="stop"), calls, None)
    assert [(d.model_dump(exclude_none=True), reason) for d, reason, _ in end] == [({}, "tool_calls")]
    # text the parser holds back (a possible marker) still sends the tokens' log-probabilities, in a chunk of
    # their own
    held = chat_deltas(OutputParser(thinking=False, tools=True), Delta(0, CALLS_BEGIN[:3], [2]), [], marks)
    assert [(d.model_dump(exclude_none=True), logprobs is marks) for d, _, logprobs in held] == [({}, True)]


def test_chat_choice_separates_reasoning_answer_and_calls():
    tok = PieceTokenizer()
    deltas = [Delta(0, "think" + END_THINK + "answer", [1], [lp(1, -1.0)]), Delta(0, "", [], [], "length")]
    choice = chat_choice(2, deltas, OutputParser(thinking=True, tools=False), tok, logprobs=True)
    assert choice.index == 2 and choice.finish_reason == "length"
    assert (choice.message.reasoning_content, choice.message.content) == ("think", "answer")
    assert [c.token for c in choice.logprobs.content] == ["he"]
    only_call = [Delta(0, CALLS_BEGIN + render_call("f", '{"a": 1}') + CALLS_END, [1]),
                 Delta(0, "", [], None, "stop")]
    choice = chat_choice(0, only_call, OutputParser(thinking=False, tools=True), tok, logprobs=False)
    assert choice.message.content is None and choice.finish_reason == "tool_calls" and choice.logprobs is None
    assert choice.message.tool_calls[0].function.arguments == '{"a": 1}'


# ---- errors ----
def test_validation_errors_name_the_field():
    detail = validation_detail({"loc": ("body", "messages", 0, "role"), "msg": "bad role", "type": "literal_error"})
    assert (detail.param, detail.message, detail.code) == ("messages.0.role", "messages.0.role: bad role",
                                                           "literal_error")
    union = validation_detail({"loc": ("body", "prompt", "list[int]", 0), "msg": "not an int", "type": "int_type"})
    assert union.param == "prompt"  # the union's member tag ends the path
    for err in ({"loc": ("body",), "msg": "x", "type": "model_attributes_type"},
                {"loc": ("body", 3), "msg": "x", "type": "json_invalid"}):
        detail = validation_detail(err)
        assert "must be a JSON object" in detail.message and detail.type == "invalid_request_error"


# ---- the app in-process ----
@pytest.fixture(scope="module")
def client(tok):
    with TestClient(create_app(app_engine(tok), "m", api_key="k", shutdown_timeout=1)) as client:
        yield client


def app_engine(tok) -> Engine:
    return Engine(random_model(0), tok, max_batch=2, max_len=64, compile_scan=False)


AUTH = {"Authorization": "Bearer k"}


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    return r.json()["error"]


def test_every_kind_of_error_is_an_openai_error_body(client):
    assert error_of(client.get("/nowhere"), 404)["message"] == "Not Found"
    assert error_of(client.get("/v1/completions", headers=AUTH), 405)["type"] == "invalid_request_error"
    assert error_of(client.get("/v1/models"), 401)["code"] == "invalid_api_key"
    assert error_of(client.get("/metrics", headers={"Authorization": "Basic k"}), 401)["type"] == \
        "authentication_error"
    bad = error_of(client.post("/v1/completions", headers=AUTH, content=b"{", ), 400)
    assert "JSON object" in bad["message"]
    unknown = error_of(client.post("/v1/completions", headers=AUTH, json={"model": "x", "prompt": "a"}), 400)
    assert unknown["code"] == "model_not_found" and unknown["param"] == "model"
    long = error_of(client.post("/v1/completions", headers=AUTH, json={"model": "m", "prompt": [1] * 64}), 400)
    assert long["code"] == "context_length_exceeded"
    assert client.get("/health").json() == {"status": "ok", "model": "m", "running": 0, "waiting": 0}


def test_completion_and_its_stream_agree_and_the_stream_is_framed(client, tok):
    body = {"model": "m", "prompt": "def f", "max_tokens": 5, "temperature": 0}
    r = client.post("/v1/completions", headers=AUTH, json=body)
    assert r.status_code == 200
    text = r.json()["choices"][0]["text"]
    # (a twin engine: the server's own is stepped by its runner thread, which would race a second driver)
    want = app_engine(tok).generate(["def f"], SamplingParams(temperature=0), max_new_tokens=5)[0].text
    assert text == want and r.json()["usage"]["completion_tokens"] <= 5
    r = client.post("/v1/completions", headers=AUTH, json={**body, "stream": True,
                                                           "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
    reasons = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    assert reasons[-1] in ("length", "stop") and not any(reasons[:-1])  # on the last chunk only
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5
    metrics = client.get("/metrics", headers=AUTH).text
    assert 'dsv4_requests_total{endpoint="/v1/completions",status="200"} 2.0' in metrics
