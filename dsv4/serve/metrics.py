"""What /metrics reports (Prometheus text): requests by endpoint and status, prompt and generated tokens, time to
first token and to the last, and the engine's queue depth, running requests and busy time."""

from __future__ import annotations

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dsv4.serve.runner import EngineRunner


class Metrics:
    def __init__(self, runner: EngineRunner):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dsv4_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "prompt tokens submitted", registry=r)
        self.generated_tokens = Counter("dsv4_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "request arrival to its first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.latency = Histogram("dsv4_request_seconds", "request arrival to its last token", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        Gauge("dsv4_queue_depth", "requests waiting for a cache slot", registry=r).set_function(
            lambda: runner.queue_depth)
        Gauge("dsv4_running", "requests holding a cache slot", registry=r).set_function(lambda: runner.running)
        Gauge("dsv4_engine_busy_seconds", "time spent in engine steps", registry=r).set_function(
            lambda: runner.step_seconds)
        prefix = runner.engine.prefix
        if prefix is not None:  # (gauges read from the cache's own counters, which only grow)
            for name, what in (("lookups", "requests that looked for a cached prefix"),
                               ("hits", "requests started from a cached prefix"),
                               ("tokens_reused", "prompt tokens restored from the prefix cache instead of prefilled"),
                               ("saved", "prefix snapshots kept"), ("evicted", "prefix snapshots evicted")):
                Gauge(f"dsv4_prefix_cache_{name}", f"{what} (cumulative)", registry=r).set_function(
                    lambda name=name: getattr(prefix.stats, name))
            Gauge("dsv4_prefix_cache_bytes", "bytes the prefix cache holds", registry=r).set_function(
                lambda: prefix.nbytes)
            Gauge("dsv4_prefix_cache_budget_bytes", "the prefix cache's budget", registry=r).set_function(
                lambda: prefix.budget)

    async def count(self, request: Request, call_next):
        """HTTP middleware: one count per response, by endpoint (/v1/* by path, the rest as "other") and status."""
        response = await call_next(request)
        self.requests.labels(request.url.path if request.url.path.startswith("/v1/") else "other",
                             str(response.status_code)).inc()
        return response

    def text(self) -> str:
        return generate_latest(self.registry).decode()
