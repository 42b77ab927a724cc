"""The server with a release checkpoint's tokenizer: requests reach dsv4.tokenizers.release_chat as structured
messages (tools, earlier calls, results, reasoning, effort) and come out as DeepSeek's own worked example, token for
token; completions in the release's DSML come back as OpenAI reasoning_content, content and tool_calls, streamed or
not. Our own tokenizers keep the V3.1 markup (tests/test_serve_helpers.py)."""

import json
import random

import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer as RustTokenizer

from dsv4.engine.engine import Engine
from dsv4.engine.request import Delta
from dsv4.serve import protocol as api
from dsv4.serve import tools
from dsv4.serve.app import create_app
from dsv4.serve.errors import APIError
from dsv4.serve.prompts import chat_messages, chat_prompt
from dsv4.serve.responses import chat_choice, chat_deltas
from dsv4.serve.tools import OutputParser, ReleaseOutputParser, output_parser
from dsv4.tokenizers.release_chat import EFFORT_MAX, render, render_calls
from dsv4.tokenizers.text import ASSISTANT, EOS, THINK, Tokenizer
from tests.helpers import RELEASE_EXAMPLES, random_model, release_tokenizer

CASES = {c["name"]: c for c in json.loads(RELEASE_EXAMPLES.read_text(encoding="utf-8"))["cases"]}
WITH_TOOLS = CASES["1_thinking_with_tools"]  # system + tools, a call with reasoning, its result, the final answer
OPENER = ASSISTANT + THINK


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    return release_tokenizer(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def tok(release_dir):
    tok = Tokenizer.from_file(release_dir / "tokenizer.json")
    assert tok.release
    return tok


@pytest.fixture(scope="module")
def raw(release_dir):
    """The release's tokenizer as the release uses it: the whole prompt string at once."""
    return RustTokenizer.from_file(str(release_dir / "tokenizer.json"))


def request(messages: list[dict], **fields) -> api.ChatCompletionRequest:
    """An OpenAI request for release_chat's messages: the tools of the system message go to the request's `tools`."""
    tools = [t for m in messages for t in m.get("tools", [])]
    plain = [{k: v for k, v in m.items() if k != "tools"} for m in messages]
    return api.ChatCompletionRequest(model="m", messages=plain, tools=tools or None, **fields)


# ---- prompts ----
def test_chat_prompt_is_deepseeks_example_token_for_token(tok, raw):
    """DeepSeek's example 1 up to its last answer, sent as an OpenAI request with thinking on: the prompt is the
    release's string (cut at the generation prompt) tokenized whole, and release_chat's rendering of the messages."""
    history = WITH_TOOLS["messages"][:-1]
    body = request(history, thinking={"type": "enabled"})
    expected = WITH_TOOLS["expected"][:WITH_TOOLS["expected"].rindex(OPENER) + len(OPENER)]
    ids = chat_prompt(tok, body)
    assert ids == raw.encode(expected, add_special_tokens=False).ids
    assert ids == raw.encode(render(history, thinking=True), add_special_tokens=False).ids
    assert "<｜tool▁calls▁begin｜>" not in tok.decode(ids)  # nothing of our V3.1 markup


def test_calls_results_developer_text_and_effort_pass_through(tok, raw):
    """Chat mode: two calls answered out of order, a developer message (OpenAI's system), tool_choice "required"
    (the release has no words for it); "max" effort only shows with thinking on."""
    calls = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
             for i, n, a in (("c1", "get_weather", '{"city": "Oslo", "days": 2}'), ("c2", "search", '{"q": "x"}'))]
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in ("get_weather", "search")]
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Checking.", "reasoning_content": "r", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c2", "content": "found"},
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "rain"}]},
                {"role": "user", "content": "And tomorrow?"}]
    body = api.ChatCompletionRequest(model="m", messages=[{"role": "developer", "content": "Be brief."}, *messages],
                                     tools=tools, tool_choice="required", reasoning_effort="max")
    same = [{"role": "system", "content": "Be brief.", "tools": tools},
            *({**m, "content": "rain"} if m.get("tool_call_id") == "c1" else m for m in messages)]
    assert tok.decode(chat_prompt(tok, body)) == render(same)
    assert chat_prompt(tok, body) == raw.encode(render(same), add_special_tokens=False).ids
    prompt = render(same)
    assert render_calls(calls) in prompt and prompt.index("<tool_result>rain") < prompt.index("<tool_result>found")
    thinking = body.model_copy(update={"thinking": api.Thinking(type="enabled")})
    assert tok.decode(chat_prompt(tok, thinking)) == render(same, thinking=True, reasoning_effort="max")
    assert EFFORT_MAX in tok.decode(chat_prompt(tok, thinking))
    none = body.model_copy(update={"tool_choice": "none"})
    assert "## Tools" not in tok.decode(chat_prompt(tok, none))


def test_tools_without_a_system_message_get_one():
    body = api.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                     tools=WITH_TOOLS["messages"][0]["tools"][:1])
    head = chat_messages(body, release=True)[0]
    assert head == {"role": "system", "content": "", "tools": [t.model_dump(exclude_none=True) for t in body.tools]}


@pytest.mark.parametrize("asked, level", [("low", None), ("medium", None), ("high", None), ("xhigh", "max"),
                                          ("max", "max")])
def test_reasoning_effort_maps_as_deepseeks_api(tok, asked, level):
    """low and medium are high (no prefix), xhigh is max; also from chat_template_kwargs."""
    messages = [{"role": "user", "content": "Q"}]
    want = tok.encode_chat(messages, add_generation_prompt=True, thinking=True, reasoning_effort=level)[0]
    for fields in ({"reasoning_effort": asked}, {"chat_template_kwargs": {"reasoning_effort": asked}}):
        body = api.ChatCompletionRequest(model="m", messages=messages, thinking={"type": "enabled"}, **fields)
        assert chat_prompt(tok, body) == want


def test_an_unknown_effort_is_a_400_for_the_release_only(tok, tmp_path):
    body = api.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Q"}],
                                     reasoning_effort="minimal")
    with pytest.raises(APIError) as e:
        chat_prompt(tok, body)
    assert e.value.status == 400 and e.value.detail.param == "reasoning_effort"
    ours = Tokenizer.train(["hello world"] * 4, vocab_size=300, n_vis=2)
    assert chat_prompt(ours, body) == chat_prompt(ours, body.model_copy(update={"reasoning_effort": None}))


# ---- completions ----
def answers() -> list[str]:
    """The assistant turns of example 1 as the engine hands them over: after the generation prompt, up to the
    end-of-sentence, which the engine leaves out of the text (a stop token)."""
    return [part[:part.index(EOS)] for part in WITH_TOOLS["expected"].split(OPENER)[1:]]


def message_of(text: str, tok, finish_reason: str = "stop", thinking: bool = True) -> api.ChatChoice:
    deltas = [Delta(0, text, [1]), Delta(0, "", [], finish_reason=finish_reason)]
    return chat_choice(0, deltas, output_parser(tok, thinking, tools=True), tok, logprobs=False)


def test_output_parser_follows_the_tokenizer(tok):
    assert type(output_parser(tok, True, True)) is ReleaseOutputParser
    ours = Tokenizer.train(["hello world"] * 4, vocab_size=300, n_vis=2)
    assert type(output_parser(ours, True, True)) is OutputParser


def test_dsml_calls_become_openai_tool_calls(tok):
    call, final = answers()
    choice = message_of(call, tok)
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == ("The user wants to know the weather in Beijing. "
                                                "I should use the get_weather tool.")
    (c,) = choice.message.tool_calls
    assert (c.type, c.function.name, c.function.arguments) == (
        "function", "get_weather", '{"location": "Beijing", "unit": "celsius"}')
    assert c.id.startswith("call_")
    choice = message_of(final, tok)
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert choice.message.reasoning_content == "Got the weather data. Let me format a nice response."
    assert choice.message.content.startswith("The weather in Beijing is currently sunny")


def test_non_string_arguments_and_several_calls(tok):
    calls = [{"name": "f", "arguments": {"n": 3, "flags": [True, None], "s": "a\nb"}}, {"name": "g", "arguments": {}}]
    choice = message_of("Sure." + render_calls(calls), tok, thinking=False)
    assert choice.message.content == "Sure." and choice.finish_reason == "tool_calls"
    got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert got == [("f", {"n": 3, "flags": [True, None], "s": "a\nb"}), ("g", {})]


def merged(parser, pieces: list[str]) -> tuple[dict, list]:
    """What a stream of chat_deltas adds up to: text per field, calls as (index, name, arguments), finish reasons."""
    text, calls, reasons, seen = {"content": "", "reasoning_content": ""}, [], [], []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        for d, reason, _ in chat_deltas(parser, Delta(0, piece, [1], finish_reason="stop" if last else None), seen,
                                        None):
            text["content"] += d.content or ""
            text["reasoning_content"] += d.reasoning_content or ""
            calls += [(t.index, t.function["name"], t.function["arguments"]) for t in d.tool_calls or []]
            reasons += [reason] if reason else []
    return text, calls, reasons


@pytest.mark.parametrize("which", [0, 1])
def test_streaming_agrees_with_the_whole_answer(tok, which):
    text = answers()[which]
    whole = merged(output_parser(tok, True, True), [text])
    rng = random.Random(which)
    for cuts in ([*range(len(text) + 1)], sorted(rng.sample(range(1, len(text)), 12)), [5, 77, 140]):
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert merged(output_parser(tok, True, True), pieces) == whole
    choice = message_of(text, tok)
    assert whole[0]["reasoning_content"] == choice.message.reasoning_content
    assert whole[2] == [choice.finish_reason]


BLOCK = "ok\n\n<｜DSML｜tool_calls>\n"


@pytest.mark.parametrize("text, content", [
    (BLOCK + '<｜DSML｜invoke name="f">\noops\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
     'ok<｜DSML｜invoke name="f">\noops\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'),
    (BLOCK + "not an invoke", "oknot an invoke"),
    (BLOCK + '<｜DSML｜invoke name="f">\n', 'ok\n<｜DSML｜invoke name="f">\n'),  # cut short (max_tokens)
])
def test_malformed_or_unfinished_calls_stay_text(tok, text, content):
    """As with our markup: the rest of the answer after the block's opening, as text."""
    choice = message_of(text, tok, thinking=False)
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content == content


def test_without_tools_dsml_is_text(tok):
    text = "x" + render_calls([{"name": "f", "arguments": "{}"}])
    deltas = [Delta(0, text, [1]), Delta(0, "", [], finish_reason="stop")]
    choice = chat_choice(0, deltas, output_parser(tok, False, tools=False), tok, logprobs=False)
    assert choice.message.content == text and choice.message.tool_calls is None


# ---- the app in-process ----
def test_the_app_serves_a_release_tokenizer(tok, monkeypatch):
    """Through the routes: the prompt is the release's, its output goes through the release's parser, a bad effort is
    a 400."""
    made = []

    class Recorded(ReleaseOutputParser):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(args)

    monkeypatch.setattr(tools, "ReleaseOutputParser", Recorded)
    engine = Engine(random_model(0, vocab_size=tok.vocab_size), tok, max_batch=1, max_len=1024, compile_scan=False)
    body = request(WITH_TOOLS["messages"][:-1], thinking={"type": "enabled"}, max_tokens=3, temperature=0)
    with TestClient(create_app(engine, "m", shutdown_timeout=1)) as client:
        r = client.post("/v1/chat/completions", json=body.model_dump(exclude_none=True))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(chat_prompt(tok, body))
        assert made == [(True, True)]  # thinking, tools
        bad = client.post("/v1/chat/completions", json={**body.model_dump(exclude_none=True),
                                                        "reasoning_effort": "minimal"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_effort"
