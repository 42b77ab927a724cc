"""Schema fuzzing: schemathesis generates requests from the server's own /openapi.json (valid ones and invalid ones).
Every response must be below 500 (an OpenAI error body for a 4xx), no request may hang, and afterwards the server
must be idle, healthy, free of tracebacks, have counted every request, and answer as it did before."""

import re
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.serve_util import API_KEY, MODEL, Server, server_ckpt  # noqa: F401  (fixture)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
API = {"/v1/models", "/v1/completions", "/v1/chat/completions"}
PROBE = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 6, "temperature": 0}


def start(ckpt, max_len: int = 128) -> Server:
    return Server(ckpt, "--max-len", str(max_len), "--max-batch", "4")  # a short context bounds every generation


@pytest.fixture(scope="module")
def fuzz_server(server_ckpt):
    server = start(server_ckpt)
    yield server
    server.stop()


def fuzz(server: Server, mode, examples: int) -> list[tuple[str, int]]:
    """`examples` generated requests for every operation of the schema (GETs only with valid input: they have no
    parameters to break) -> (path, status) of each; each must be below 500, a 4xx with an error message."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= API
    seen = []
    for op in operations:
        if mode == schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(op.as_strategy(generation_mode=mode))
        def call(case):
            if isinstance(case.body, dict):  # the served model's name: otherwise every request is a 400 at once
                case.body["model"] = MODEL
            response = case.call(base_url=server.url, headers=AUTH, timeout=180)  # n=8 x 128 tokens, a loaded CPU
            seen.append((case.path, response.status_code))
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                assert response.json()["error"]["message"]

        call()
    return seen


def counted(server: Server) -> dict[str, int]:
    """Responses /metrics counted per /v1/ endpoint (all statuses)."""
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    out: dict[str, int] = {}
    for path, n in re.findall(r'^dsv4_requests_total\{endpoint="(/v1/[^"]+)",status="\d+"\} (\S+)$', text, re.M):
        out[path] = out.get(path, 0) + int(float(n))
    return out


def probe(server: Server) -> str:
    """A greedy completion (the same text every time the server is sound)."""
    r = httpx.post(server.url + "/v1/completions", json=PROBE, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def assert_survived(server: Server, seen: list[tuple[str, int]], before: str):
    """Idle (nothing left running or waiting), healthy, the probe answered as before, no traceback in the log, and
    every request counted (`seen`, plus the two probes)."""
    deadline = time.monotonic() + 30
    while (health := httpx.get(server.url + "/health").json())["running"] or health["waiting"]:
        assert time.monotonic() < deadline, f"requests left behind: {health}"
        time.sleep(0.05)
    assert health["status"] == "ok"
    assert probe(server) == before  # the cache slots and the engine still work
    assert "Traceback" not in server.output(), server.output()[-3000:]
    sent = seen + [("/v1/completions", 200)] * 2
    got = counted(server)
    assert {path: got.get(path, 0) for path in API} == {path: sum(p == path for p, _ in sent) for path in API}


@pytest.mark.slow
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_request_makes_a_server_error(fuzz_server, mode):
    """Every operation in the schema, 40 generated requests each (valid bodies, or bodies that break the schema)."""
    seen = fuzz(fuzz_server, mode, 40)
    statuses = {status for _, status in seen}
    if mode == schemathesis.GenerationMode.POSITIVE:
        assert 200 in statuses  # valid requests were served, not all refused
    else:
        assert 400 in statuses  # broken ones reached the validation
    assert httpx.get(fuzz_server.url + "/health").json()["status"] == "ok"


@pytest.mark.slow
def test_the_server_survives_the_fuzzing(server_ckpt):
    """A server of its own (so its log and counters hold only these requests): a few valid and invalid requests per
    operation, then it must be idle, answer the probe as before, have no traceback and have counted every request."""
    server = start(server_ckpt, max_len=64)
    try:
        before = probe(server)
        seen = fuzz(server, schemathesis.GenerationMode.POSITIVE, 3) + fuzz(
            server, schemathesis.GenerationMode.NEGATIVE, 3)
        statuses = {status for _, status in seen}
        assert 200 in statuses and 400 in statuses and {path for path, _ in seen} >= API
        assert_survived(server, seen, before)
    finally:
        server.stop()
