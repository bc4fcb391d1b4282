"""Auth of the serving endpoint without a live cluster: a key on every route, behind a route prefix too, and
fail-closed configs (an endpoint other machines reach is refused without keys unless allowed on purpose)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.config import ServeConfig
from serving.guard import Guard, route_path
from tests.unit.guard_limits import LIMITS
from tests.vllm_routes import concrete, vllm_app, walk

KEY = "k"


def test_every_route_the_app_registers_needs_a_key() -> None:
    """Before, the guard checked keys only under /v1: /tokenize, /detokenize, /docs, /redoc and /openapi.json
    answered anyone (and vLLM's tokenizer routes reached the replicas). Every route vLLM's app registers is walked,
    so a route a later vLLM adds is walked too; only the endpoint's own routes answer with the key."""
    from serving.ingress import MODEL_ROUTE, ROUTES, guard_app

    registered = walk(vllm_app())
    app = guard_app(vllm_app(), (KEY,), LIMITS)
    # what vLLM registers today and the endpoint must not serve: other generation routes would skip the limits
    assert {("POST", "/v1/responses"), ("POST", "/scale_elastic_ep"), ("GET", "/metrics")} <= set(registered)
    assert set(walk(app)) == ROUTES | {("GET", MODEL_ROUTE)}
    client = TestClient(app, raise_server_exceptions=False)
    for method, path in [*registered, ("GET", MODEL_ROUTE), ("GET", "/no/such/path")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = client.request(method, concrete(path), json={}, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["error"]["type"] == "authentication_error"
    auth = {"Authorization": f"Bearer {KEY}"}
    assert client.get("/openapi.json", headers=auth).status_code == 200
    published = {path for path in client.get("/openapi.json", headers=auth).json()["paths"]}
    assert published == {path for _, path in ROUTES if not path.startswith(("/docs", "/redoc", "/openapi"))} | {
        "/v1/models/{model}"
    }
    for method, path in [(m, p) for m, p in registered if (m, p) not in ROUTES] + [("GET", "/no/such/path")]:
        unknown = client.request(method, concrete(path), json={}, headers=auth)
        assert unknown.status_code in (404, 405), (method, path, unknown.text)
        assert unknown.json()["error"]["code"] == f"http_{unknown.status_code}", unknown.text


def _echo_app() -> Starlette:
    async def echo(request):
        return JSONResponse({"path": request.url.path, "body": (await request.body()).decode()})

    routes = [Route("/v1/completions", echo, methods=["POST"]), Route("/v1/models", echo)]
    return Starlette(routes=routes)


@pytest.mark.parametrize("keys", [(KEY,), ()], ids=["keys", "no-keys"])
def test_the_guard_judges_the_path_after_the_route_prefix(keys: tuple[str, ...]) -> None:
    """Before, the guard read the full path: under a route prefix (Serve passes it as root_path and keeps it in
    the path) nothing started with /v1, so keys and limits were both skipped."""
    app = _echo_app()
    app.add_middleware(Guard, keys=keys, limits=LIMITS)
    client = TestClient(app, root_path="/llm")
    auth = {"Authorization": f"Bearer {KEY}"}
    if keys:
        assert client.get("/llm/v1/models").status_code == 401
        assert client.post("/llm/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
    too_many = client.post(
        "/llm/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 999}, headers=auth
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"
    ok = client.post("/llm/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4}, headers=auth)
    assert ok.status_code == 200 and ok.json()["path"] == "/llm/v1/completions"


def test_route_path_strips_only_a_whole_prefix() -> None:
    assert route_path({"path": "/v1/models", "root_path": ""}) == "/v1/models"
    assert route_path({"path": "/llm/v1/models", "root_path": "/llm"}) == "/v1/models"
    assert route_path({"path": "/llm", "root_path": "/llm"}) == "/"
    assert route_path({"path": "/llmx/v1/models", "root_path": "/llm"}) == "/llmx/v1/models"
    assert route_path({"path": "/v1/models", "root_path": "/llm"}) == "/v1/models"  # a server that strips it


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "serving.example.com"])
def test_an_endpoint_others_reach_needs_keys_or_allow_unauthenticated(
    host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, any host started with no key: an endpoint on 0.0.0.0 served anyone on the network."""
    from serving.app import ServeError, validate

    monkeypatch.delenv("RLHF_API_KEYS", raising=False)
    with pytest.raises(ServeError, match=rf"host={re.escape(host)} .*api_keys.*allow_unauthenticated"):
        validate(ServeConfig(host=host))
    validate(ServeConfig(host=host, api_keys=("k",)))
    validate(ServeConfig(host=host, allow_unauthenticated=True))
    monkeypatch.setenv("RLHF_API_KEYS", "from-env")
    validate(ServeConfig(host=host))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_a_loopback_endpoint_may_run_without_keys(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.app import validate

    monkeypatch.delenv("RLHF_API_KEYS", raising=False)
    validate(ServeConfig(host=host))


def test_export_and_the_cluster_builder_refuse_an_endpoint_without_keys(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cluster_context: None
) -> None:
    """Before, ``--export`` wrote a config listening on 0.0.0.0 with no key anywhere, and ``app_builder`` built it
    on the cluster with auth off."""
    from ray.serve.deployment import Application

    from serving.app import ServeError, app_builder
    from serving.server import export

    monkeypatch.delenv("RLHF_API_KEYS", raising=False)
    out = tmp_path / "serve.yaml"
    with pytest.raises(ServeError, match="0.0.0.0:8000 .*api_keys.*allow_unauthenticated"):
        export(ServeConfig(model=str(tiny_model_dir)), out)
    assert not out.exists()
    args = yaml.safe_load(export(ServeConfig(model=str(tiny_model_dir), api_keys=("k",)), out).read_text())
    args = args["applications"][0]["args"]
    assert args["allow_unauthenticated"] is False and "api_keys" not in args
    with pytest.raises(ServeError, match="app_builder.*RLHF_API_KEYS.*allow_unauthenticated"):
        app_builder(args)  # the cluster has no key
    monkeypatch.setenv("RLHF_API_KEYS", "cluster-key")
    assert isinstance(app_builder(args), Application)
    monkeypatch.delenv("RLHF_API_KEYS")
    assert isinstance(app_builder({**args, "allow_unauthenticated": True}), Application)


def test_rlhf_serve_on_a_public_host_without_a_key_stops_before_starting(tmp_path: Path) -> None:
    """The CLI names the fix in one line, before any cluster starts; --allow-unauthenticated is the way out.

    (The model does not exist, so a CLI that let the endpoint start fails soon after and stops its cluster.)"""
    env = {name: value for name, value in os.environ.items() if name != "RLHF_API_KEYS"}
    refused = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "serve", "--host", "0.0.0.0", "--model", str(tmp_path / "no-model")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "--allow-unauthenticated" in refused.stderr and "--api-key" in refused.stderr
    assert "Traceback" not in refused.stderr
    out = tmp_path / "serve.yaml"
    allowed = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "serve", "--allow-unauthenticated", "--export", str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert yaml.safe_load(out.read_text())["applications"][0]["args"]["allow_unauthenticated"] is True
