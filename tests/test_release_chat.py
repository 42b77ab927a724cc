"""The released V4 chat format (dsv4.tokenizers.release_chat): DeepSeek's own worked examples reproduced to the byte,
the rules its README documents, parsing completions back, and a release tokenizer.json used as is with that format."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer

from dsv4.tokenizers.release_chat import LATEST_REMINDER, TASKS, parse_completion, render, render_calls
from dsv4.tokenizers.text import ASSISTANT, BOS, END_THINK, EOS, THINK, USER, Tokenizer
from tests.helpers import release_chat_tokens, release_tokenizer

EXAMPLES = json.loads((Path(__file__).parent / "data" / "release_chat_examples.json").read_text(encoding="utf-8"))
CASES = {c["name"]: c for c in EXAMPLES["cases"]}
U, A = USER, ASSISTANT
SYSTEM = [{"role": "system", "content": "You are a helpful assistant."}]


# ---- DeepSeek's examples (encoding/tests) ----
@pytest.mark.parametrize("name", sorted(CASES))
def test_release_examples_render_to_the_byte(name):
    case = CASES[name]
    assert render(case["messages"], thinking=case["thinking"]) == case["expected"]


def assistant_turns(prompt: str, opener: str = f"{A}{THINK}") -> list[str]:
    """The model's parts of a thinking-mode prompt: after each `<｜Assistant｜><think>`, up to the next user turn."""
    return [part.split(U)[0] for part in prompt.split(opener)[1:]]


def test_release_examples_parse_back():
    """encoding/test_encoding_dsv4.py's checks: the assistant turns cut from the rendered prompts parse back."""
    call, final = assistant_turns(CASES["1_thinking_with_tools"]["expected"])
    parsed = parse_completion(call, thinking=True)
    assert parsed["reasoning_content"] == ("The user wants to know the weather in Beijing. "
                                           "I should use the get_weather tool.")
    assert parsed["content"] == ""
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == ["get_weather"]
    assert parsed["tool_calls"][0]["function"]["arguments"] == '{"location": "Beijing", "unit": "celsius"}'
    parsed = parse_completion(final, thinking=True)
    assert parsed["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in parsed["content"] and parsed["tool_calls"] == []

    prompt = CASES["2_thinking_drops_earlier_reasoning"]["expected"]
    assert "The user said hello" not in prompt  # the first turn's reasoning is dropped
    parsed = parse_completion(assistant_turns(prompt)[-1], thinking=True)
    assert parsed == {"role": "assistant", "content": "The capital of France is Paris.",
                      "reasoning_content": "The user asks about the capital of France. It is Paris.", "tool_calls": []}


# ---- the rules of encoding/README.md ----
def test_readme_quick_start():
    messages = SYSTEM + [{"role": "user", "content": "What is 2+2?"}]
    assert render(messages, thinking=True) == f"{BOS}You are a helpful assistant.{U}What is 2+2?{A}{THINK}"
    assert parse_completion(f"Simple arithmetic.{END_THINK}2 + 2 = 4.{EOS}", thinking=True) == {
        "role": "assistant", "reasoning_content": "Simple arithmetic.", "content": "2 + 2 = 4.", "tool_calls": []}


def test_chat_mode_closes_the_reasoning_and_ignores_it():
    """Basic chat: `</think>` right after `<｜Assistant｜>`; reasoning_content is not rendered."""
    messages = CASES["2_thinking_drops_earlier_reasoning"]["messages"]
    assert render(messages) == (f"{BOS}You are a helpful assistant.{U}Hello{A}{END_THINK}Hi there! How can I help "
                                f"you?{EOS}{U}What is the capital of France?{A}{END_THINK}The capital of France is "
                                f"Paris.{EOS}")
    assert render(messages[:-1]).endswith(f"{U}What is the capital of France?{A}{END_THINK}")
    assert render(messages[:-1], thinking=True).endswith(f"{U}What is the capital of France?{A}{THINK}")


def test_tools_keep_every_turns_reasoning():
    """With tools on the system message, drop_thinking is off: a turn before the last user message keeps it."""
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x", "reasoning_content": "r1"},
             {"role": "user", "content": "b"}]
    assert render(SYSTEM + turns, thinking=True).endswith(f"{U}a{A}{END_THINK}x{EOS}{U}b{A}{THINK}")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with_tools = render([{**SYSTEM[0], "tools": tools}] + turns, thinking=True)
    assert with_tools.endswith(f"{U}a{A}{THINK}r1{END_THINK}x{EOS}{U}b{A}{THINK}")
    assert render(SYSTEM + turns, thinking=True, drop_thinking=False) == with_tools.replace(
        with_tools[len(BOS) + len(SYSTEM[0]["content"]):with_tools.index(U)], "")


def test_readme_tool_call_block():
    block = ("<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"function_name\">\n"
             "<｜DSML｜parameter name=\"param\" string=\"true\">string_value</｜DSML｜parameter>\n"
             "<｜DSML｜parameter name=\"count\" string=\"false\">5</｜DSML｜parameter>\n"
             "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
    call = {"name": "function_name", "arguments": '{"param": "string_value", "count": 5}'}
    assert render_calls([call]) == "\n\n" + block
    assert render_calls([{"function": {**call, "arguments": {"param": "string_value", "count": 5}}}]) == "\n\n" + block
    parsed = parse_completion("\n\n" + block + EOS, thinking=False)
    assert parsed["content"] == "" and parsed["tool_calls"] == [{"type": "function", "function": {
        "name": "function_name", "arguments": '{"param": "string_value", "count": 5}'}}]
    assert parse_completion("\n\n" + block, thinking=False)["tool_calls"] == parsed["tool_calls"]  # EOS optional here


def test_tool_results_join_one_user_turn_in_call_order():
    """Results in the order of the calls they answer (by id), a blank line apart, with a following user text."""
    def call(i, name):
        return {"id": i, "type": "function", "function": {"name": name, "arguments": "{}"}}
    messages = [{"role": "user", "content": "Q"},
                {"role": "assistant", "content": "", "tool_calls": [call("a", "f"), call("b", "g")]},
                {"role": "tool", "tool_call_id": "b", "content": "B"},
                {"role": "tool", "tool_call_id": "a", "content": "A"},
                {"role": "user", "content": "thanks"}]
    calls = ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n\n</｜DSML｜invoke>\n"
             "<｜DSML｜invoke name=\"g\">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
    assert render(messages) == (f"{BOS}{U}Q{A}{END_THINK}{calls}{EOS}"
                                f"{U}<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>\n\nthanks{A}{END_THINK}")
    parsed = parse_completion(calls + EOS, thinking=False)
    named = [(c["function"]["name"], c["function"]["arguments"]) for c in parsed["tool_calls"]]
    assert named == [("f", "{}"), ("g", "{}")]


EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")


def test_reasoning_effort_max_prefixes_thinking_prompts_only():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert render(messages, thinking=True, reasoning_effort="max") == f"{BOS}{EFFORT_MAX}S{U}Q{A}{THINK}"
    assert render(messages, thinking=True, reasoning_effort="high") == f"{BOS}S{U}Q{A}{THINK}"
    assert render(messages, reasoning_effort="max") == f"{BOS}S{U}Q{A}{END_THINK}"
    with pytest.raises(ValueError, match="reasoning_effort"):
        render(messages, reasoning_effort="low")


def test_quick_instruction_tokens():
    q = {"role": "user", "content": "Q"}
    assert render([{**q, "task": "query"}]) == f"{BOS}{U}Q{TASKS['query']}"
    assert render([{**q, "task": "action"}], thinking=True) == f"{BOS}{U}Q{A}{THINK}{TASKS['action']}"
    titled = [q, {"role": "assistant", "content": "R", "reasoning_content": "r", "task": "title"},
              {"role": "assistant", "content": "T", "reasoning_content": "never shown"}]
    assert render(titled, thinking=True) == f"{BOS}{U}Q{A}{THINK}r{END_THINK}R{EOS}{TASKS['title']}T{EOS}"
    with pytest.raises(ValueError, match="unknown task"):
        render([{**q, "task": "summary"}])


def test_reminder_developer_and_unfinished_turns():
    reminder = {"role": "latest_reminder", "content": "2026-02-21"}
    assert render([reminder, {"role": "user", "content": "Q"}]) == f"{BOS}{LATEST_REMINDER}2026-02-21{U}Q{A}{END_THINK}"
    developer = [{"role": "developer", "content": "D"}, {"role": "assistant", "content": "x"},
                 {"role": "user", "content": "Q"}]
    assert render(developer) == f"{BOS}{U}D{A}{END_THINK}x{EOS}{U}Q{A}{END_THINK}"
    assert "D" not in render(developer, thinking=True)  # dropped with the earlier reasoning, as released
    partial = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Hal", "wo_eos": True}]
    assert render(partial) == f"{BOS}{U}Q{A}{END_THINK}Hal"
    assert render(partial[:1], add_generation_prompt=False) == f"{BOS}{U}Q"


@pytest.mark.parametrize("text", [
    f"no closing tag{EOS}",  # thinking mode needs </think>
    f"r{END_THINK}answer",  # no end-of-sentence
    f"r{END_THINK}answer{EOS}more",  # text after it
    f"r{END_THINK}a{THINK}b{EOS}",  # a stray token in the answer
    f"r{END_THINK}\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\noops\n</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>",  # a parameter that is not DSML
])
def test_malformed_completions_are_refused(text):
    with pytest.raises(ValueError):
        parse_completion(text, thinking=True)


# ---- a release tokenizer.json is used as is, with the release's format ----
CHAT_TOKENS = release_chat_tokens()


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    """A tiny tokenizer laid out as DeepSeek's: BOS, EOS and pad at 0-2, then the BPE merges, then the chat tokens."""
    return release_tokenizer(tmp_path_factory.mktemp("release"))


def test_release_tokenizer_is_used_as_is(release_dir):
    raw = RustTokenizer.from_file(str(release_dir / "tokenizer.json"))
    tok = Tokenizer.from_file(release_dir / "tokenizer.json")
    assert tok.release
    assert tok.tok.to_str() == raw.to_str()
    named = [BOS, EOS, *CHAT_TOKENS]
    assert [tok.token_id(t) for t in named] == [raw.token_to_id(t) for t in named]
    assert tok.token_id(USER) > 255  # after the merges: nothing was renumbered to our layout
    assert (tok.bos_id, tok.eos_id) == (0, 1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_release_tokenizer_chats_in_the_release_format(release_dir, name):
    """chat_template is the release's prompt; encode_chat's ids are those of the release tokenizing that whole string,
    and its mask covers exactly what the assistant wrote."""
    raw = RustTokenizer.from_file(str(release_dir / "tokenizer.json"))
    tok = Tokenizer.from_file(release_dir / "tokenizer.json")
    case = CASES[name]
    assert tok.chat_template(case["messages"], thinking=case["thinking"]) == case["expected"]
    ids, mask = tok.encode_chat(case["messages"], thinking=case["thinking"])
    assert ids == raw.encode(case["expected"], add_special_tokens=False).ids
    answers = tok.decode([i for i, m in zip(ids, mask) if m])
    replies = [m for m in case["messages"] if m["role"] == "assistant"]
    assert answers.count(EOS) == len(replies) and U not in answers and A not in answers
    assert all(m["content"] in answers for m in replies)


def test_our_tokenizer_keeps_its_format(tmp_path):
    tok = Tokenizer.train(["hello world, the capital of France"] * 4, vocab_size=300, path=tmp_path / "tokenizer.json",
                          n_vis=2)
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "R", "reasoning_content": "r"}]
    assert not tok.release
    assert tok.chat_template(messages, add_generation_prompt=False) == f"{BOS}{U}Q{A}R{EOS}"
