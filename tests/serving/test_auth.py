"""Auth on the live endpoint: every route vLLM's app can register needs a key, and an application deployed under
a route prefix keeps its keys and limits."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.serving.conftest import API_KEY, LIMITS, Endpoint
from tests.vllm_routes import concrete, vllm_app, walk

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_every_route_needs_a_key(endpoint: Endpoint) -> None:
    """Before, only /v1 routes needed a key: /tokenize, /detokenize, /docs, /redoc and /openapi.json answered
    anyone."""
    routes = walk(vllm_app())  # every route vLLM's app registers: the endpoint's and those it removes
    assert {("POST", "/tokenize"), ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/v1/responses")} <= set(routes)
    opened = []
    for method, path in [*routes, ("GET", "/v1/models/tiny"), ("GET", "/no/such/path")]:
        path = concrete(path)
        for headers in ({}, {"Authorization": "Bearer wrong-key"}):
            response = httpx.request(method, f"{endpoint.url}{path}", json={}, headers=headers, timeout=30)
            if response.status_code != 401 or response.json()["error"]["type"] != "authentication_error":
                opened.append((method, path, bool(headers), response.status_code))
    assert opened == []
    # Serve's proxy answers its liveness routes itself, keys or not
    assert httpx.get(f"{endpoint.url}/-/healthz", timeout=30).status_code == 200
    assert httpx.get(f"{endpoint.url}/openapi.json", headers=AUTH, timeout=30).status_code == 200


@pytest.fixture
def prefixed(endpoint: Endpoint):
    """The endpoint's application deployed again under the route prefix /llm (as an edited export would), with one
    replica of its own."""
    import dataclasses

    from ray import serve

    from serving.app import build_app

    config = dataclasses.replace(endpoint.config, adapters={}, min_replicas=1, max_replicas=1)
    serve.run(build_app(config, gpu=False), name="prefixed", route_prefix="/llm", blocking=False)
    url = f"{endpoint.url}/llm"
    deadline = time.monotonic() + 300
    while httpx.get(f"{url}/v1/models", headers=AUTH, timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the prefixed application did not start"
        time.sleep(1)
    yield url
    serve.delete("prefixed")


def test_a_route_prefix_keeps_keys_and_limits(prefixed: str) -> None:
    """Before, the guard judged the full path: under a route prefix nothing started with /v1, so the key and every
    limit were skipped."""
    assert httpx.get(f"{prefixed}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{prefixed}/docs", timeout=30).status_code == 401
    body = {"model": "tiny", "prompt": "x", "n": LIMITS["max_n"] + 1}
    refused = httpx.post(f"{prefixed}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "n", refused.text
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    answer = httpx.post(f"{prefixed}/v1/chat/completions", json=chat, headers=AUTH, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == LIMITS["default_max_tokens"]
