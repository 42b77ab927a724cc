"""The engine's per-token log-probabilities (Delta.logprobs: {"token": id, "logprob": float, "top": [(id, logprob)]})
in the two shapes OpenAI's API has: the chat one (a list of tokens with their text bytes and top alternatives) and the
legacy completions one (parallel lists, with each token's character offset in the text)."""

from __future__ import annotations

from dsv4.engine.request import Delta
from dsv4.serve import protocol as api


def token_text(tokenizer, token_id: int) -> dict:
    """{"token": the token's text (bytes that form no character as U+FFFD), "bytes": its UTF-8 bytes}."""
    raw = tokenizer.decode([token_id]).encode("utf-8", "surrogateescape")
    return {"token": raw.decode("utf-8", "replace"), "bytes": list(raw)}


def chat_logprobs(tokenizer, deltas: list[Delta]) -> api.ChoiceLogprobs:
    content = []
    for d in deltas:
        for lp in d.logprobs or []:
            top = [api.TopLogprob(**token_text(tokenizer, i), logprob=v) for i, v in lp["top"]]
            content.append(api.TokenLogprob(**token_text(tokenizer, lp["token"]), logprob=lp["logprob"],
                                            top_logprobs=top))
    return api.ChoiceLogprobs(content=content)


def completion_logprobs(tokenizer, deltas: list[Delta], offset: int = 0) -> api.CompletionLogprobs:
    out = api.CompletionLogprobs()
    for d in deltas:
        for lp in d.logprobs or []:
            out.text_offset.append(offset)
            out.tokens.append(token_text(tokenizer, lp["token"])["token"])
            offset += len(out.tokens[-1])
            out.token_logprobs.append(lp["logprob"])
            out.top_logprobs.append({token_text(tokenizer, i)["token"]: v for i, v in lp["top"]})
    return out
