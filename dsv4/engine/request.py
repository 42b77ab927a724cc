"""A request's life in the engine, and what it hands back.

    Request      one prompt being served: its settings, its cache slot and position, the tokens generated so far,
                 its stop matcher and UTF-8 stream decoder, its random stream and penalty counts
    Delta        what one request produced in one engine step (streamed to callbacks, returned by `step`)
    Completion   a finished request (what `Engine.generate` returns)

A request's output ends at the first of: a stop token (not shown), a stop string (the text ends just before it),
max_new_tokens, or the end of the context ("length"); or when it is cancelled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from dsv4.engine.sampling import SamplingParams
from dsv4.engine.stops import StopMatcher


@dataclass
class Delta:
    """What one request produced in one engine step."""
    request_id: int
    text: str  # new text (valid UTF-8; stop strings and stop tokens excluded)
    token_ids: list[int]
    logprobs: list[dict] | None = None  # per token: {"token": id, "logprob": float, "top": [(id, logprob), ...]}
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the request's last delta


@dataclass
class Completion:
    request_id: int
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[dict] | None = None


def token_logprobs(logp: torch.Tensor, token: int, top: int) -> dict:
    """A token's entry in Delta.logprobs from the log-probabilities [V] it was drawn from, with the `top` most likely
    alternatives (none for top=0)."""
    best = logp.topk(top) if top else None
    return {"token": token, "logprob": float(logp[token]),
            "top": [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))}


class LogitsProcessor(Protocol):
    """What constrained decoding asks of a request's processor."""
    done: bool

    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...

    def advance(self, token: int) -> None: ...


@dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    logprobs: int | None
    callback: Callable[[Delta], None] | None
    matcher: StopMatcher
    decoder: object
    generator: torch.Generator | None
    slot: int | None = None
    pos: int = 0  # tokens committed to the cache
    written: int = 0  # positions written to the cache: pos, or pos + 1 after a rejected draft (dsv4.model.cache)
    cached: int = 0  # prompt tokens restored from the prefix cache instead of prefilled (dsv4.engine.prefix)
    snapshot: object = None  # the prefix-cache snapshot this sequence continues from, and the position it did so
    snapshot_at: int = 0
    sought: int = -1  # the prefix cache's count of saved snapshots when this request last looked (-1: never)
    pending: int | None = None  # the last sampled token, not yet run through the model
    output: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None  # [V] generated-token counts (only when a penalty is set)
    finish_reason: str | None = None
    # speculation: main streams of positions the MTP module has not seen yet (their next tokens are known)
    mtp_rows: list[torch.Tensor] = field(default_factory=list)
    # constrained decoding: masks the logits each token is sampled from, and is told the token sampled (e.g.
    # dsv4.tokenizers.multimodal.SpanConstraint); once `done`, the request samples freely again
    processor: LogitsProcessor | None = None
    # classifier-free guidance (dsv4.engine.guidance): the unconditional row that guides this request, or the request
    # this row guides; logits held while the other row of the pair is still prefilling
    twin: Request | None = None
    guides: Request | None = None
    guide_scale: float = 1.0
    held: torch.Tensor | None = None

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.prompt)

    def uses_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0

    def append(self, token: int, vocab_size: int, device: torch.device) -> str:
        """Take a generated (non-stop) token: count it for the penalties -> the text that can be shown now (held
        back while it may be the start of a stop string or of a multi-byte character)."""
        self.output.append(token)
        if self.counts is None and self.uses_penalties():
            self.counts = torch.zeros(vocab_size, device=device)
        if self.counts is not None:
            self.counts[token] += 1
        return self.matcher.push(self.decoder.push(token))

    def ended(self, max_len: int) -> str | None:
        """Why the request ends after its last token ("stop" for a stop string, "length"), or None."""
        if self.matcher.stopped:
            return "stop"
        if len(self.output) >= self.max_new_tokens or len(self.prompt) + len(self.output) >= max_len:
            return "length"
        return None

    def final_text(self) -> str:
        """At the end: the text held back (an incomplete character, a possible stop prefix), unless a stop string
        ended it."""
        return "" if self.matcher.stopped else self.matcher.push(self.decoder.flush()) + self.matcher.flush()
