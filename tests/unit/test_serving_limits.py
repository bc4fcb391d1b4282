"""The request limits of the serving endpoint without a live cluster: each bounded field, the default
``max_tokens``, and a body read up to the cap only."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.guard import Guard, check_body, fill_max_tokens
from tests.unit.guard_limits import LIMITS, limits

COMPLETION = {"model": "tiny", "prompt": "x"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}

OVER_THE_LIMITS = {
    # name: (route, body, the refused field)
    "n": ("completions", {**COMPLETION, "n": 5}, "n"),
    "n in chat": ("chat/completions", {**CHAT, "n": 1000}, "n"),
    "n as a string": ("completions", {**COMPLETION, "n": "1000"}, "n"),
    "best_of": ("completions", {**COMPLETION, "best_of": 50}, "best_of"),
    "logprobs": ("completions", {**COMPLETION, "logprobs": 6}, "logprobs"),
    "logprobs of the whole vocabulary": ("completions", {**COMPLETION, "logprobs": -1}, "logprobs"),
    "top_logprobs": ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    "prompt_logprobs": ("completions", {**COMPLETION, "prompt_logprobs": 6}, "prompt_logprobs"),
    "prompt_logprobs of the whole vocabulary": ("chat/completions", {**CHAT, "prompt_logprobs": -1}, "prompt_logprobs"),
    "logprob_token_ids": ("completions", {**COMPLETION, "logprob_token_ids": list(range(6))}, "logprob_token_ids"),
    "stop strings": ("completions", {**COMPLETION, "stop": ["a", "b", "c"]}, "stop"),
    "prompts": ("completions", {**COMPLETION, "prompt": ["a", "b", "c", "d", "e"]}, "prompt"),
    "prompts as token ids": ("completions", {**COMPLETION, "prompt": [[1], [2], [3], [4], [5]]}, "prompt"),
    "min_tokens over max_tokens": ("completions", {**COMPLETION, "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    "min_tokens over the default": ("chat/completions", {**CHAT, "min_tokens": 17}, "min_tokens"),
    "negative min_tokens": ("completions", {**COMPLETION, "min_tokens": -1}, "min_tokens"),
    "max_completion_tokens": ("chat/completions", {**CHAT, "max_completion_tokens": 65}, "max_completion_tokens"),
}


@pytest.mark.parametrize("name", list(OVER_THE_LIMITS))
def test_each_limit_is_enforced(name: str) -> None:
    """Before, only max_tokens was bounded: n, best_of, the log-prob counts, stop strings, prompts and min_tokens
    went to the engine as sent."""
    route, body, field = OVER_THE_LIMITS[name]
    refused = check_body(f"/v1/{route}", json.dumps(body).encode(), LIMITS)
    assert refused is not None and refused[1] == field, refused


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("completions", {**COMPLETION, "n": 4, "logprobs": 5, "prompt_logprobs": 5, "stop": ["a", "b"]}),
        ("completions", {**COMPLETION, "prompt": ["a", "b", "c", "d"], "min_tokens": 16}),
        ("completions", {**COMPLETION, "prompt": [1, 2, 3, 4, 5, 6]}),  # one tokenized prompt
        ("completions", {**COMPLETION, "stop": "one string", "max_tokens": 64, "min_tokens": 64}),
        ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 5, "n": 1, "best_of": 4}),
        ("chat/completions", {**CHAT, "max_completion_tokens": 64, "min_tokens": 30, "logprob_token_ids": [1, 2]}),
    ],
)
def test_requests_within_the_limits_pass(route: str, body: dict) -> None:
    assert check_body(f"/v1/{route}", json.dumps(body).encode(), LIMITS) is None


def test_a_request_without_max_tokens_gets_the_default_never_more_than_the_limit() -> None:
    """Before, a chat request without max_tokens ran to the end of the context (vLLM's default)."""
    filled = json.loads(fill_max_tokens(json.dumps(CHAT).encode(), LIMITS))
    assert filled == {**CHAT, "max_tokens": 16}
    assert json.loads(fill_max_tokens(json.dumps({**CHAT, "max_tokens": None}).encode(), LIMITS))["max_tokens"] == 16
    low = limits(max_tokens=8)
    assert json.loads(fill_max_tokens(json.dumps(COMPLETION).encode(), low))["max_tokens"] == 8
    given = json.dumps({**CHAT, "max_completion_tokens": 40}).encode()
    assert fill_max_tokens(given, LIMITS) is given


def test_deeply_nested_json_is_a_400_not_a_crash() -> None:
    refused = check_body("/v1/completions", b"[" * 100_000 + b"]" * 100_000, LIMITS)
    assert refused is not None and "not valid JSON" in refused[0]


def _echo_app() -> Starlette:
    async def echo(request):
        body = await request.body()
        return JSONResponse({"body": json.loads(body), "content_length": request.headers.get("content-length")})

    return Starlette(routes=[Route("/v1/chat/completions", echo, methods=["POST"])])


def test_the_app_receives_the_default_max_tokens_and_a_matching_content_length() -> None:
    app = _echo_app()
    app.add_middleware(Guard, keys=(), limits=LIMITS)
    seen = TestClient(app).post("/v1/chat/completions", json=CHAT).json()
    assert seen["body"]["max_tokens"] == 16
    assert int(seen["content_length"]) == len(json.dumps(seen["body"]).encode())


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize", "/anything"])
def test_a_body_without_content_length_is_read_only_up_to_the_cap(route: str) -> None:
    """Before, a chunked body (no Content-Length) was read whole before its size was checked (an endless one
    held the request, and its memory, forever; here the body ends after 20 MB so the old code ends too)."""
    received = []
    sent: list[dict] = []
    chunk = b"x" * 1000

    async def long_body() -> dict:
        await asyncio.sleep(0)  # a real server yields to the event loop between chunks
        received.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": len(received) < 20_000}

    async def send(message: dict) -> None:
        sent.append(message)

    async def never_reached(scope, receive, send) -> None:
        raise AssertionError("the app was reached")

    scope = {"type": "http", "method": "POST", "path": route, "root_path": "", "headers": [], "query_string": b""}
    guard = Guard(never_reached, keys=(), limits=LIMITS)
    asyncio.run(asyncio.wait_for(guard(scope, long_body, send), timeout=60))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "too_large"
    assert sum(received) <= LIMITS.max_request_bytes + len(chunk)


@pytest.mark.parametrize("value", [5, "regex", [1, 2]])
def test_structured_outputs_that_are_not_an_object_are_a_400_naming_the_field(value: object) -> None:
    """Before: vLLM's request model reads ``structured_outputs`` with ``.get`` while validating it, so a number or a
    string there raised AttributeError inside the validator and the endpoint answered 500 (found by the fuzz test:
    5 of 1209 requests)."""
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "structured_outputs": value}
    refused = check_body("/v1/completions", json.dumps(body).encode(), limits())
    assert refused is not None and refused[1] == "structured_outputs", refused
    del body["structured_outputs"]
    assert check_body("/v1/completions", json.dumps(body).encode(), limits()) is None
