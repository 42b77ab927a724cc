"""The engine requests behind one API call: n choices of one prompt, or several prompts times n."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from dsv4.engine.request import Delta
from dsv4.engine.sampling import SamplingParams
from dsv4.serve import protocol as api
from dsv4.serve.errors import APIError
from dsv4.serve.metrics import Metrics
from dsv4.serve.runner import EngineError, EngineRunner, ShuttingDown


def sampling(body: api.Sampling, count: int) -> list[SamplingParams]:
    """One SamplingParams per engine request; with a seed, request i draws from seed + i (reproducible choices)."""
    return [SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                           min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                           presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                           seed=None if body.seed is None else (body.seed + i) % 2 ** 63) for i in range(count)]


def text_requests(prompts: list[list[int]], body: api.Sampling, max_new: int, logprobs: int | None,
                  processor=None) -> list[dict]:
    """The engine requests of a completion or chat call (see `Run`), one per prompt, sampled as `body` asks.
    `processor`: a factory of each request's logits processor (a multimodal model's text requests keep to text ids)."""
    return [dict(prompt=p, params=sp, max_new_tokens=max_new, stop=body.stops(), logprobs=logprobs,
                 ignore_eos=body.ignore_eos, processor=processor() if processor else None)
            for p, sp in zip(prompts, sampling(body, len(prompts)))]


class Run:
    """The requests of one API call, each a dict of `Engine.submit` keywords with its "prompt": submitted at once (a
    refused one -> 400, or 503 while shutting down, and the others cancelled), read as a stream or collected, and
    cancelled if the caller stops listening."""

    def __init__(self, runner: EngineRunner, metrics: Metrics, requests: list[dict]):
        self.runner, self.metrics = runner, metrics
        self.logprobs = requests[0].get("logprobs") if requests else None
        self.start = time.perf_counter()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = sum(len(r["prompt"]) for r in requests)
        self.completion_tokens = 0
        self.ids: list[int] = []
        self.requests: list = []
        try:
            for i, r in enumerate(requests):
                submit = dict(r)
                self.requests.append(runner.submit(submit.pop("prompt"), self.queue, i, **submit))
                self.ids.append(self.requests[-1].id)
        except ShuttingDown as e:
            self.cancel()
            raise APIError(503, str(e), type="server_error", code="shutting_down") from e
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e)) from e
        metrics.prompt_tokens.inc(self.prompt_tokens)

    async def stream(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta) until every request finished; cancels the unfinished ones if abandoned."""
        left, first = len(self.ids), True
        try:
            while left:
                i, delta = await self.queue.get()
                if isinstance(delta, EngineError):
                    raise delta
                if first and delta.token_ids:
                    self.metrics.ttft.observe(time.perf_counter() - self.start)
                    first = False
                self.completion_tokens += len(delta.token_ids)
                self.metrics.generated_tokens.inc(len(delta.token_ids))
                if delta.finish_reason is not None:
                    self.runner.finished(self.ids[i])
                    left -= 1
                yield i, delta
            self.metrics.latency.observe(time.perf_counter() - self.start)
        finally:
            self.cancel()

    async def collect(self) -> list[list[Delta]]:
        """Every choice's deltas once all finished (a failed engine step: a 500)."""
        outs: list[list[Delta]] = [[] for _ in self.ids]
        try:
            async for i, delta in self.stream():
                outs[i].append(delta)
        except EngineError as e:
            raise APIError(500, str(e), type="server_error") from e
        return outs

    def cancel(self):
        for rid in self.ids:
            self.runner.cancel(rid)

    def usage(self) -> api.Usage:
        """Tokens in and out; prompt_tokens_details.cached_tokens: those restored from the prefix cache."""
        return api.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                         total_tokens=self.prompt_tokens + self.completion_tokens,
                         prompt_tokens_details=api.PromptTokensDetails(
                             cached_tokens=sum(r.cached for r in self.requests)))
