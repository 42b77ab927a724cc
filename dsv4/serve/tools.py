"""Tool calls and thinking in the chat format: how tools and earlier calls are written into the prompt, and how the
model's output text is split into reasoning, answer and tool calls.

DeepSeek's markup (V3.1 and later) for a turn that calls tools (one line in the output, wrapped here):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{"json": "arguments"}<｜tool▁call▁end｜>...
    <｜tool▁calls▁end｜>

and for the results fed back: <｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>. With thinking on, the generation
prompt ends in `<think>\\n` and the model writes its reasoning up to `</think>`.

A release checkpoint's tokenizer (`Tokenizer.release`) gets the release's own format instead: dsv4.serve.prompts
hands it the messages as they are and dsv4.tokenizers.release_chat writes the tools, calls and results; the model
calls tools in a DSML block (`\\n\\n<｜DSML｜tool_calls>` ... `</｜DSML｜tool_calls>`), which `ReleaseOutputParser`
reads one invoke at a time with release_chat's own parser. `output_parser` picks the parser for a tokenizer.

`OutputParser` is incremental: text goes in as the engine streams it, events come out, and a marker split across
pieces is held back until it is complete. Whatever the chunking, the events add up to the same reasoning, answer and
calls (tested), so streaming and non-streaming responses agree.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from dsv4.tokenizers import release_chat
from dsv4.tokenizers.text import END_THINK

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"


def render_call(name: str, arguments: str) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{arguments}{CALL_END}"


def render_calls(calls: list[tuple[str, str]]) -> str:
    return CALLS_BEGIN + "".join(render_call(n, a) for n, a in calls) + CALLS_END


def render_output(result: str) -> str:
    return f"{OUTPUT_BEGIN}{result}{OUTPUT_END}"


def tools_prompt(tools: list[dict], choice: str | None) -> str:
    """The system-prompt section that describes the tools (OpenAI function specs) and how to call them."""
    lines = ["## Tools", "You can call these functions. To call them, answer with",
             render_calls([("NAME", '{"argument": "value"}')]),
             "(one <｜tool▁call▁begin｜>...<｜tool▁call▁end｜> per call), and nothing after it.", "", "Functions:"]
    lines += [json.dumps(t, ensure_ascii=False) for t in tools]
    if choice == "required":
        lines.append("You must call at least one function.")
    elif choice not in (None, "auto", "none"):
        lines.append(f"You must call the function {choice}.")
    return "\n".join(lines)


@dataclass
class ToolCallOut:
    index: int
    id: str
    name: str
    arguments: str


class OutputParser:
    """Text in, ("reasoning" | "content", text) and ("tool_call", ToolCallOut) events out."""
    calls_begin, calls_end, call_begin, call_end = CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END

    def __init__(self, thinking: bool, tools: bool):
        self.state = "reasoning" if thinking else "content"
        self.tools = tools
        self.buffer = ""
        self.calls = 0

    def push(self, text: str) -> list[tuple[str, object]]:
        self.buffer += text
        events: list[tuple[str, object]] = []
        while True:
            before = (self.state, len(self.buffer))
            if self.state == "reasoning":
                self._until(END_THINK, "reasoning", "content", events)
            elif self.state == "content" and self.tools:
                self._until(self.calls_begin, "content", "calls", events)
            elif self.state in ("content", "raw"):  # raw: answer text that no longer looks for calls
                events.append(("content", self.buffer))
                self.buffer = ""
            elif self.state == "calls":
                self._calls(events)
            else:  # "after": text following the calls block is not part of the answer
                self.buffer = ""
            if (self.state, len(self.buffer)) == before:
                break
        return [(kind, value) for kind, value in events if value != ""]

    def flush(self) -> list[tuple[str, object]]:
        """The end of the output: held-back text is what it is (an unfinished call stays text, as written)."""
        events = self.push("")
        if self.buffer:
            kind = "reasoning" if self.state == "reasoning" else "content"
            events.append((kind, self.buffer))
            self.buffer = ""
        return events

    def _until(self, marker: str, kind: str, next_state: str, events: list):
        """Emit the buffer as `kind` up to `marker` (then switch state), holding back a possible marker prefix."""
        at = self.buffer.find(marker)
        if at >= 0:
            events.append((kind, self.buffer[:at]))
            self.buffer = self.buffer[at + len(marker):]
            self.state = next_state
            return
        keep = _partial_suffix(self.buffer, marker)
        events.append((kind, self.buffer[: len(self.buffer) - keep]))
        self.buffer = self.buffer[len(self.buffer) - keep:]

    def _calls(self, events: list):
        """Inside the calls block: emit each complete call; stop at the block's end."""
        text = self.buffer.lstrip()
        if text.startswith(self.calls_end):
            self.buffer = ""
            self.state = "after"
            return
        begin = self.call_begin
        if not text.startswith(begin):
            if len(text) >= len(begin) or not (begin.startswith(text) or self.calls_end.startswith(text)):
                self._raw(text, events)
            return
        end = text.find(self.call_end)
        if end < 0:
            return
        call = self._call(text[: end + len(self.call_end)])
        if call is None:
            self._raw(text, events)
            return
        events.append(("tool_call", ToolCallOut(self.calls, f"call_{uuid.uuid4().hex[:24]}", *call)))
        self.calls += 1
        self.buffer = text[end + len(self.call_end):]

    def _raw(self, text: str, events: list):
        """Not a call: the model broke the format; the rest is kept as answer text."""
        self.state = "raw"
        events.append(("content", text))
        self.buffer = ""

    def _call(self, text: str) -> tuple[str, str] | None:
        """One whole call, from its opening marker to its closing one -> (name, arguments), or None if malformed."""
        name, _, arguments = text[len(self.call_begin): -len(self.call_end)].partition(SEP)
        return name.strip(), arguments.strip()


class ReleaseOutputParser(OutputParser):
    """The release's DSML calls (dsv4.tokenizers.release_chat): each `<｜DSML｜invoke ...>...</｜DSML｜invoke>` is
    read by `release_chat.parse_completion`, so string parameters come back JSON-quoted and the rest as written."""
    calls_begin, calls_end = release_chat.CALLS_OPEN, release_chat.CALLS_CLOSE
    call_begin, call_end = f"<{release_chat.DSML}invoke name=", f"</{release_chat.DSML}invoke>"

    def _call(self, text: str) -> tuple[str, str] | None:
        block = f"{release_chat.CALLS_OPEN}\n{text}\n{release_chat.CALLS_CLOSE}"
        try:
            (call,) = release_chat.parse_completion(block, thinking=False)["tool_calls"]
        except ValueError:  # also a block that is not exactly one call
            return None
        return call["function"]["name"], call["function"]["arguments"]


def output_parser(tokenizer, thinking: bool, tools: bool) -> OutputParser:
    """The parser of a tokenizer's chat format: the release's for a release checkpoint's, ours otherwise."""
    return (ReleaseOutputParser if tokenizer.release else OutputParser)(thinking, tools)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
