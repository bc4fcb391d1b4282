"""Auth on the live endpoint: every route the ingress can register needs a key, and an application deployed under
a route prefix keeps its keys and limits."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.serving.conftest import API_KEY, LIMITS, Endpoint

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def registered_routes() -> list[tuple[str, str]]:
    """(method, path) of every route Ray's OpenAI ingress registers, FastAPI's docs routes included.

    Built from Ray's own factory with all of its routes, a superset of what :mod:`serving.app`
    deploys, so a route Ray adds in a later release is walked too.
    """
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    from serving.ray_internals import openai_fastapi_app

    app = openai_fastapi_app()
    make_fastapi_ingress(OpenAiIngress, app=app)
    routes = []
    for route in app.routes:
        path = re.sub(r"\{[^}]+\}", "tiny", route.path)
        routes += [(method, path) for method in sorted(getattr(route, "methods", None) or {"GET"}) if method != "HEAD"]
    return routes


def test_every_route_needs_a_key(endpoint: Endpoint) -> None:
    """Before, only /v1 routes needed a key: /tokenize, /detokenize, /docs, /redoc and /openapi.json answered
    anyone."""
    routes = registered_routes()
    assert {("POST", "/tokenize"), ("GET", "/docs"), ("GET", "/openapi.json")} <= set(routes), routes
    opened = []
    for method, path in [*routes, ("GET", "/no/such/path")]:
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
    """The endpoint's guarded ingress deployed again under the route prefix /llm (as an edited export would),
    sending to the endpoint's running replicas: no new vLLM replica is started."""
    from ray import serve

    from serving.app import ingress, llm_config
    from serving.ray_internals import model_card

    config = endpoint.config
    base = endpoint.base_model
    replicas = next(name for name in serve.status().applications["rlhf"].deployments if name.startswith("LLMServer"))
    _, ingress_cls = ingress(config, base)
    app = serve.deployment(ingress_cls, name="PrefixedIngress").bind(
        llm_deployments={base: serve.get_deployment_handle(replicas, app_name="rlhf")},
        model_cards={base: model_card(base, llm_config(config, gpu=False))},
        adapters={},
    )
    serve.run(app, name="prefixed", route_prefix="/llm", blocking=False)
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
