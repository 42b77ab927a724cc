"""Requests -> the engine's prompts: a chat in the model's template (system text, tools, earlier calls and their
results, the generation prompt), completion prompts as text or token ids, and the room left for the completion.

Our tokenizers get tools, calls and results written in DeepSeek's V3.1 markup (dsv4.serve.tools). A release
checkpoint's tokenizer (`Tokenizer.release`) gets them as structured messages, written by the release's own renderer
(dsv4.tokenizers.release_chat), so released weights see the prompts they were trained on: tools on the system
message, calls and reasoning_content on assistant turns, tool results as they are, and reasoning_effort.
"""

from __future__ import annotations

from dsv4.serve import protocol as api
from dsv4.serve.errors import APIError
from dsv4.serve.tools import render_calls, render_output, tools_prompt

# OpenAI's reasoning_effort -> the release's levels, as DeepSeek's API maps them (low and medium are high, xhigh max)
EFFORTS = {"low": "high", "medium": "high", "high": "high", "xhigh": "max", "max": "max"}


def chat_messages(body: api.ChatCompletionRequest, release: bool = False) -> list[dict]:
    """The template's messages: system/developer text first (with the tools), then the conversation. Ours: tool
    calls and their results written in DeepSeek's markup (a result goes in as a user turn). The release's
    (`release=True`): the tools, calls, results and earlier reasoning passed on for release_chat to write."""
    system = [m.text() for m in body.messages if m.role in ("system", "developer")]
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and body.tool_choice != "none" else []
    head: dict = {"role": "system"}
    if tools and release:  # release_chat writes its own tools section; it has no words for tool_choice
        head["tools"] = tools
    elif tools:
        choice = body.tool_choice.function.name if isinstance(body.tool_choice, api.NamedToolChoice) \
            else body.tool_choice
        system.append(tools_prompt(tools, choice))
    messages = [{**head, "content": "\n\n".join(system)}] if system or tools else []
    for m in body.messages:
        if m.role == "assistant" and release:
            messages.append({"role": "assistant", "content": m.text(), "reasoning_content": m.reasoning_content,
                             "tool_calls": [c.model_dump() for c in m.tool_calls or []]})
        elif m.role == "assistant":
            text = m.text()
            if m.tool_calls:
                text += render_calls([(c.function.name, c.function.arguments) for c in m.tool_calls])
            messages.append({"role": "assistant", "content": text})
        elif m.role == "tool" and release:
            messages.append({"role": "tool", "tool_call_id": m.tool_call_id or "", "content": m.text()})
        elif m.role == "tool":
            messages.append({"role": "user", "content": render_output(m.text())})
        elif m.role == "user":
            messages.append({"role": "user", "content": m.text()})
    return messages


def reasoning_effort(body: api.ChatCompletionRequest) -> str | None:
    """The release's reasoning effort for a request (`reasoning_effort`, or chat_template_kwargs' one), or a 400."""
    asked = body.reasoning_effort or (body.chat_template_kwargs or {}).get("reasoning_effort")
    if asked is None:
        return None
    if asked not in EFFORTS:
        raise APIError(400, f"reasoning_effort must be one of {sorted(EFFORTS)}, not {asked!r}",
                       param="reasoning_effort")
    return EFFORTS[asked]


def chat_prompt(tokenizer, body: api.ChatCompletionRequest) -> list[int]:
    """The conversation in the chat template, ending in the generation prompt (with <think> when thinking is on)."""
    release = tokenizer.release
    ids, _ = tokenizer.encode_chat(chat_messages(body, release), add_generation_prompt=True,
                                   thinking=body.wants_thinking(),
                                   reasoning_effort=reasoning_effort(body) if release else None)
    return ids


def completion_prompts(tokenizer, prompt: str | list) -> list[list[int]]:
    """A completion request's prompt (a string, strings, token ids, or lists of them) -> one list of ids per prompt;
    an empty one is a 400."""
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


def budget(max_len: int, prompt_len: int, asked: int | None) -> int:
    """New tokens a request may generate in a context of `max_len` (all that is left if it asked for no number), or
    a 400 saying the limits."""
    room = max_len - prompt_len
    if room < 1 or (asked is not None and asked > room):
        raise APIError(400, f"this model's context holds {max_len} tokens (prompt + completion); the request has "
                            f"{prompt_len} prompt tokens and asks for {asked if asked is not None else 'at least 1'} "
                            "more", param="messages", code="context_length_exceeded")
    return asked if asked is not None else room
