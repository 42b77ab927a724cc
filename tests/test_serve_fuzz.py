"""Schema fuzzing: schemathesis generates requests from the server's own /openapi.json (valid ones and invalid ones)
and none may get a 5xx, hang, or leave the server unhealthy."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.serve_util import API_KEY, MODEL, Server, server_ckpt  # noqa: F401  (fixture)

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def fuzz_server(server_ckpt):
    # a short context bounds how long any generated request can generate for
    server = Server(server_ckpt, "--max-len", "128", "--max-batch", "4")
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_request_makes_a_server_error(fuzz_server, mode):
    """Every operation in the schema, 40 generated requests each (valid bodies, or bodies that break the schema);
    at least the three API endpoints are in it."""
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/models", "/v1/completions", "/v1/chat/completions"}
    for op in operations:
        if mode == schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # nothing to break in a request without parameters or body
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(op.as_strategy(generation_mode=mode))
        def call(case):
            if isinstance(case.body, dict):  # the served model's name: otherwise every request is a 400 at once
                case.body["model"] = MODEL
            response = case.call(base_url=fuzz_server.url, headers=AUTH, timeout=60)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                assert response.json()["error"]["message"]

        call()


def test_the_server_survives_the_fuzzing(fuzz_server):
    assert httpx.get(fuzz_server.url + "/health").json()["status"] == "ok"
    assert "Traceback" not in fuzz_server.output()
