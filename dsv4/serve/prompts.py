"""Requests -> the engine's prompts: a chat in the model's template (system text, tools, earlier calls and their
results, the generation prompt), completion prompts as text or token ids, and the room left for the completion."""

from __future__ import annotations

from dsv4.serve import protocol as api
from dsv4.serve.errors import APIError
from dsv4.serve.tools import render_calls, render_output, tools_prompt


def chat_messages(body: api.ChatCompletionRequest) -> list[dict]:
    """The template's messages: system/developer text first (with the tools section), tool calls and their results
    written in DeepSeek's markup (a result goes in as a user turn)."""
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
    return messages


def chat_prompt(tokenizer, body: api.ChatCompletionRequest) -> list[int]:
    """The conversation in the chat template, ending in the generation prompt (with <think> when thinking is on)."""
    ids, _ = tokenizer.encode_chat(chat_messages(body), add_generation_prompt=True, thinking=body.wants_thinking())
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
