"""DeepSeek-V4's released chat format: OpenAI-style messages -> the exact prompt the released weights were trained on,
and a completion -> its reasoning, answer and tool calls.

The release ships no Jinja chat template; its `encoding/encoding_dsv4.py` (with `encoding/README.md` and the worked
examples `encoding/tests/test_input_{1..4}.json` -> `test_output_{1..4}.txt`) is the definition. Followed here:
deepseek-ai/DeepSeek-V4-Flash `encoding/encoding_dsv4.py` and `encoding/README.md`, read in copies (the script in
supermy/ds4rs `encoding/encoding_dsv4.py`, as released plus Chinese comments; where the examples came from is noted
in tests/data/release_chat_examples.json). That is the first V4 release: `reasoning_effort="max"` is the only level
that adds a prefix (DeepSeek-V4-Flash-0731 later moved EFFORT_MAX's text to "high" and gave "max" a stronger one).

A conversation, with the release's single tokens in angle brackets (`｜` is U+FF5C, `▁` U+2581):

    <｜begin▁of▁sentence｜>[effort prefix]{system}[\\n\\n## Tools ...]
    <｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{answer}[\\n\\n<｜DSML｜tool_calls>...]<｜end▁of▁sentence｜>
    <｜User｜><tool_result>{result}</tool_result>[\\n\\n<tool_result>...]<｜Assistant｜><think>...

- The generation prompt belongs to the message before it: a user turn ends in `<｜Assistant｜><think>` in thinking
  mode and `<｜Assistant｜></think>` in chat mode (the reasoning is closed before it starts).
- Thinking mode drops the reasoning of turns before the last user message (their prompt shows `</think>` instead),
  unless any message carries `tools`: then every turn keeps its reasoning. Dropping also drops earlier `developer`
  messages, as the release does.
- Tool results (role "tool") join the user turn that follows an assistant's calls, ordered like the calls; tool
  calls are written in DSML, string arguments as is (`string="true"`), anything else as JSON.
- Also as released: `latest_reminder` (date, place) and `developer` roles, `response_format`, a `task` on a message
  (`<｜action｜>` etc.: the release's quick-instruction classifiers) and `wo_eos` (an unfinished assistant turn).
- The release tokenizes the prompt as one string, so a token's spelling inside a message is that token; the ids of
  `Tokenizer.encode_chat` are the same (strip such spellings from untrusted text first if that matters).

Our extensions, none of which change a prompt the release can render: `add_generation_prompt=False` leaves out what
the last message adds for the next turn; tool-call arguments may be a dict; content may be a list of text parts.
"""

from __future__ import annotations

import json
import re
from typing import Any

from dsv4.tokenizers.text import ASSISTANT, BOS, END_THINK, EOS, THINK, USER

LATEST_REMINDER = "<｜latest_reminder｜>"
DSML = "｜DSML｜"
TASKS = {t: f"<｜{t}｜>" for t in ("action", "query", "authority", "domain", "title", "read_url")}
EFFORTS = (None, "high", "max")
CALLS_OPEN, CALLS_CLOSE = f"\n\n<{DSML}tool_calls>", f"</{DSML}tool_calls>"

# The prompt texts are data the weights were trained on, so they are the release's to the byte.
EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")
RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
TOOLS_SECTION = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
    f'writing a "<{DSML}tool_calls>" block like the following:\n\n'
    f"<{DSML}tool_calls>\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
    f"...\n</{DSML}invoke>\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    f"...\n</{DSML}invoke>\n"
    f"</{DSML}tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, '
    'arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK}), you MUST output your complete reasoning inside "
    f"{THINK}...{END_THINK} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {END_THINK} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n{schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n")

Piece = tuple[str, bool]  # (text, is the assistant's own output)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _text_of(content: Any) -> str:
    """A message's content as text: None -> "", a list of parts -> their texts, a blank line apart."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n\n".join(p.get("text", "") if p.get("type") == "text" else f"[Unsupported {p.get('type')}]"
                       for p in content)


# ---- messages -> pieces of the prompt ----
def merge_tool_results(messages: list[dict]) -> list[dict]:
    """The release has no tool role: results become `tool_result` blocks of a user turn, and a user message right
    after results (or after another user message) joins the same turn. Results are then put in the order of the
    calls of the assistant turn before them (by call id)."""
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        prev = out[-1] if out and out[-1].get("role") == "user" and "blocks" in out[-1] else None
        if role == "tool":
            block = {"type": "tool_result", "id": m.get("tool_call_id", ""), "content": m.get("content", "")}
            if prev is not None:
                prev["blocks"].append(block)
            else:
                out.append({"role": "user", "blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": m.get("content", "")}
            if prev is not None and prev.get("task") is None:
                prev["blocks"].append(block)
            else:
                keep = {k: m[k] for k in ("task", "wo_eos") if k in m}
                out.append({"role": "user", "blocks": [block], **keep})
        else:
            out.append(dict(m))
    order: dict[str, int] = {}
    for m in out:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            order = {c.get("id") or c.get("function", {}).get("id", ""): i for i, c in enumerate(m["tool_calls"])}
            order.pop("", None)
        elif m.get("role") == "user" and order and sum(b["type"] == "tool_result" for b in m["blocks"]) > 1:
            ranked = iter(sorted((b for b in m["blocks"] if b["type"] == "tool_result"),
                                 key=lambda b: order.get(b["id"], 0)))
            m["blocks"] = [next(ranked) if b["type"] == "tool_result" else b for b in m["blocks"]]
    return out


def _last_user(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)


def _drop_earlier(messages: list[dict]) -> list[dict]:
    """Thinking mode, no tools: before the last user turn, assistant turns lose their reasoning (at rendering) and
    anything but system, user, reminder and assistant messages (that is, `developer` ones) goes."""
    last = _last_user(messages)
    return [m for i, m in enumerate(messages)
            if i >= last or m.get("role") in ("system", "user", "latest_reminder", "assistant")]


def _with_tools(text: str, m: dict) -> str:
    """System or developer text with the tools section and the response format it carries."""
    if m.get("tools"):
        schemas = "\n".join(_json(t.get("function", t)) for t in m["tools"])
        text += "\n\n" + TOOLS_SECTION.replace("{schemas}", schemas)
    if m.get("response_format"):
        text += "\n\n" + RESPONSE_FORMAT + _json(m["response_format"])
    return text


def _arguments(args: Any) -> dict:
    """A call's arguments as a dict: a JSON object string, or a dict; anything else is one "arguments" string."""
    if isinstance(args, dict):
        return args
    try:
        parsed = json.loads(args)
    except (TypeError, ValueError):
        parsed = None
    return parsed if isinstance(parsed, dict) else {"arguments": args}


def render_calls(tool_calls: list[dict]) -> str:
    """OpenAI tool calls (or bare {"name", "arguments"}) -> the DSML block that follows an assistant's answer."""
    invokes = []
    for call in tool_calls:
        f = call.get("function", call)
        params = [f'<{DSML}parameter name="{k}" string="true">{v}</{DSML}parameter>' if isinstance(v, str) else
                  f'<{DSML}parameter name="{k}" string="false">{_json(v)}</{DSML}parameter>'
                  for k, v in _arguments(f["arguments"]).items()]
        invokes.append(f'<{DSML}invoke name="{f["name"]}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return CALLS_OPEN + "\n" + "\n".join(invokes) + "\n" + CALLS_CLOSE


def _user_text(m: dict) -> str:
    """A user turn's text: its texts and tool results, a blank line apart."""
    return "\n\n".join(_text_of(b["text"]) if b["type"] == "text" else
                       f"<tool_result>{_text_of(b['content'])}</tool_result>" for b in m["blocks"])


def _assistant(i: int, messages: list[dict], thinking: bool, drop: bool) -> list[Piece]:
    """An assistant turn, all of it the model's output: [reasoning</think>] answer [tool calls] <eos>."""
    m, out = messages[i], []
    after_task = i > 0 and messages[i - 1].get("task") is not None  # a classifier's answer has no reasoning
    if thinking and not after_task and (not drop or i > _last_user(messages)):
        out += [(m.get("reasoning_content") or "", True), (END_THINK, True)]
    out.append((_text_of(m.get("content")) + (render_calls(m["tool_calls"]) if m.get("tool_calls") else ""),
                True))
    if not m.get("wo_eos"):
        out.append((EOS, True))
    return out


def _next_turn(i: int, messages: list[dict], thinking: bool, drop: bool) -> list[Piece]:
    """What a message adds for the turn after it: the generation prompt after a user turn (reasoning opened in
    thinking mode, closed in chat mode), or the token of its task. Nothing when a user-side message follows."""
    m = messages[i]
    if i + 1 < len(messages) and messages[i + 1].get("role") not in ("assistant", "latest_reminder"):
        return []
    task = m.get("task")
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; the release knows {sorted(TASKS)}")
        if task != "action":
            return [(TASKS[task], False)]
        return [(ASSISTANT, False), (THINK if thinking else END_THINK, False), (TASKS[task], False)]
    if m.get("role") in ("user", "developer"):
        think = thinking and (not drop or i >= _last_user(messages))
        return [(ASSISTANT, False), (THINK if think else END_THINK, False)]
    return []


def _message(i: int, messages: list[dict], thinking: bool, drop: bool, effort: str | None) -> list[Piece]:
    m, role = messages[i], messages[i].get("role")
    out: list[Piece] = [(EFFORT_MAX, False)] if i == 0 and thinking and effort == "max" else []
    if role == "system":
        out.append((_with_tools(_text_of(m.get("content")), m), False))
    elif role == "developer":  # the release's search-agent instructions: a user turn that may carry tools
        if not m.get("content"):
            raise ValueError("a developer message needs content")
        out += [(USER, False), (_with_tools(_text_of(m["content"]), m), False)]
    elif role == "user":
        out += [(USER, False), (_user_text(m), False)]
    elif role == "latest_reminder":
        out += [(LATEST_REMINDER, False), (_text_of(m.get("content")), False)]
    elif role == "assistant":
        out += _assistant(i, messages, thinking, drop)
    else:
        raise ValueError(f"unknown chat role {role!r}")
    return out


def chat_pieces(messages: list[dict], thinking: bool = False, add_generation_prompt: bool = True,
                drop_thinking: bool = True, reasoning_effort: str | None = None) -> list[tuple[str, bool, bool]]:
    """The prompt as (text, True, is_answer) pieces for `Tokenizer.encode_chat`: the prompt's stretches written by
    the user side and by the model, each to be encoded with its special tokens. The release tokenizes the whole
    string so, spellings of its tokens inside messages included; the pieces meet at single tokens (the assistant's
    output starts after `<think>`, `</think>` or a task token and ends at `<｜end▁of▁sentence｜>`), where its
    tokenizer cuts the text anyway, so the ids are the release's."""
    if reasoning_effort not in EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {EFFORTS}, not {reasoning_effort!r}")
    msgs = merge_tool_results(messages)
    drop = drop_thinking and not any(m.get("tools") for m in msgs)  # tool use keeps every turn's reasoning
    if thinking and drop:
        msgs = _drop_earlier(msgs)
    pieces: list[Piece] = [(BOS, False)]
    for i in range(len(msgs)):
        pieces += _message(i, msgs, thinking, drop, reasoning_effort)
        if add_generation_prompt or i + 1 < len(msgs):
            pieces += _next_turn(i, msgs, thinking, drop)
    out: list[Piece] = []
    for text, answer in pieces:
        if out and out[-1][1] == answer:
            out[-1] = (out[-1][0] + text, answer)
        else:
            out.append((text, answer))
    return [(text, True, answer) for text, answer in out if text]


def render(messages: list[dict], thinking: bool = False, add_generation_prompt: bool = True,
           drop_thinking: bool = True, reasoning_effort: str | None = None) -> str:
    """The prompt string, equal to the release's `encode_messages(messages, "thinking" if thinking else "chat",
    drop_thinking=..., reasoning_effort=...)` (tools go on the system or developer message, as there)."""
    return "".join(t for t, _, _ in chat_pieces(messages, thinking, add_generation_prompt, drop_thinking,
                                                reasoning_effort))


# ---- a completion -> reasoning, answer, tool calls ----
_INVOKE = re.compile(rf'<{DSML}invoke name="(.*?)">\n(.*?)</{DSML}invoke>\n', re.S)
_PARAM = re.compile(rf'<{DSML}parameter name="(.*?)" string="(true|false)">(.*?)</{DSML}parameter>\n', re.S)


def _parse_invoke(name: str, body: str) -> dict:
    """One DSML invoke -> an OpenAI tool call whose arguments are a JSON object (string values re-quoted)."""
    fields: dict[str, str] = {}
    pos = 1 if body == "\n" else 0  # a call without parameters has an empty line for them
    while pos < len(body):
        m = _PARAM.match(body, pos)
        if m is None:
            raise ValueError(f"malformed tool-call parameter: {body[pos:]!r}")
        key, string, value = m.groups()
        if key in fields:
            raise ValueError(f"parameter {key!r} given twice")
        fields[key] = _json(value) if string == "true" else value
        pos = m.end()
    arguments = "{" + ", ".join(f"{_json(k)}: {v}" for k, v in fields.items()) + "}"
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _parse_calls(text: str) -> tuple[list[dict], str]:
    """The DSML block after its opening tag -> (tool calls, the text after the block)."""
    if not text.startswith("\n"):
        raise ValueError(f"malformed tool-calls block: {text[:40]!r}")
    calls, pos = [], 1
    while (m := _INVOKE.match(text, pos)) is not None:
        calls.append(_parse_invoke(*m.groups()))
        pos = m.end()
    if not text.startswith(CALLS_CLOSE, pos):
        raise ValueError(f"malformed tool call: {text[pos:pos + 80]!r}")
    return calls, text[pos + len(CALLS_CLOSE):]


def parse_completion(text: str, thinking: bool) -> dict:
    """What the model wrote after the generation prompt (up to and with its end-of-sentence) -> an assistant
    message {"role", "content", "reasoning_content", "tool_calls"}, as the release's
    `parse_message_from_completion_text`. Well-formed output only: anything else is a ValueError."""
    reasoning = ""
    if thinking:
        reasoning, closed, text = text.partition(END_THINK)
        if not closed:
            raise ValueError("the reasoning is not closed by </think>")
    end, calls_at = text.find(EOS), text.find(CALLS_OPEN)
    if calls_at >= 0 and (end < 0 or calls_at < end):
        content, (calls, rest) = text[:calls_at], _parse_calls(text[calls_at + len(CALLS_OPEN):])
        if rest not in ("", EOS):
            raise ValueError(f"text after the tool calls: {rest[:80]!r}")
    elif end >= 0 and end + len(EOS) == len(text):
        content, calls = text[:end], []
    else:
        raise ValueError("the answer does not end in exactly one end-of-sentence")
    for token in (BOS, EOS, THINK, END_THINK, DSML):
        if token in content or token in reasoning:
            raise ValueError(f"{token!r} inside the reasoning or the answer")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls}
