"""A server error reaches the client as a generic OpenAI error body, never as the replica's traceback.

Before: Ray's error handler answered an unexpected failure with a 500 whose ``error.message`` held the replica's
whole traceback, its process id and its node's address, and the guard passed it on to whoever asked.
"""

from __future__ import annotations

import logging

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.guard import Guard
from tests.unit.guard_limits import LIMITS

LEAK = "Traceback (most recent call last): ... pid=4242, ip=10.0.0.7 RayTaskError(KeyError)"


def _app() -> Starlette:
    async def failing(request: object) -> JSONResponse:
        return JSONResponse({"error": {"message": LEAK, "type": "InternalServerError", "code": 500}}, 500)

    async def streaming(request: object) -> StreamingResponse:
        return StreamingResponse(iter([b"data: 1\n\n", b"data: 2\n\n"]), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/fail", failing), Route("/v1/stream", streaming)])
    app.add_middleware(Guard, keys=("k",), limits=LIMITS)
    return app


def test_a_server_error_body_is_logged_and_replaced(caplog: pytest.LogCaptureFixture) -> None:
    client = TestClient(_app())
    with caplog.at_level(logging.ERROR, logger="serving.guard"):
        response = client.get("/v1/fail", headers={"Authorization": "Bearer k"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "Traceback" not in response.text and "4242" not in response.text and "10.0.0.7" not in response.text
    error_id = error["message"].split()[3].rstrip(";")
    assert any(error_id in record.getMessage() and "4242" in record.getMessage() for record in caplog.records)


def test_other_answers_pass_unchanged() -> None:
    client = TestClient(_app())
    response = client.get("/v1/stream", headers={"Authorization": "Bearer k"})
    assert response.status_code == 200 and response.text == "data: 1\n\ndata: 2\n\n"
    assert client.get("/v1/fail").status_code == 401  # no key: refused before anything runs
