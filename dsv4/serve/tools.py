"""Tool calls and thinking in the chat format: how tools and earlier calls are written into the prompt, and how the
model's output text is split into reasoning, answer and tool calls.

DeepSeek's markup (V3.1 and later) for a turn that calls tools (one line in the output, wrapped here):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{"json": "arguments"}<｜tool▁call▁end｜>...
    <｜tool▁calls▁end｜>

and for the results fed back: <｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>. With thinking on, the generation
prompt ends in `<think>\\n` and the model writes its reasoning up to `</think>`.

`OutputParser` is incremental: text goes in as the engine streams it, events come out, and a marker split across
pieces is held back until it is complete. Whatever the chunking, the events add up to the same reasoning, answer and
calls (tested), so streaming and non-streaming responses agree.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

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
                self._until(CALLS_BEGIN, "content", "calls", events)
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
        """Inside <｜tool▁calls▁begin｜>: emit each complete call; stop at the block's end."""
        text = self.buffer.lstrip()
        if text.startswith(CALLS_END):
            self.buffer = ""
            self.state = "after"
            return
        if not text.startswith(CALL_BEGIN):
            if len(text) >= len(CALL_BEGIN) or not (CALL_BEGIN.startswith(text) or CALLS_END.startswith(text)):
                # not a call: the model broke the format; the rest is kept as answer text
                self.state = "raw"
                events.append(("content", text))
                self.buffer = ""
            return
        end = text.find(CALL_END)
        if end < 0:
            return
        body = text[len(CALL_BEGIN): end]
        name, _, arguments = body.partition(SEP)
        events.append(("tool_call", ToolCallOut(self.calls, f"call_{uuid.uuid4().hex[:24]}", name.strip(),
                                                arguments.strip())))
        self.calls += 1
        self.buffer = text[end + len(CALL_END):]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
