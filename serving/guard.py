"""API keys and request limits, checked in the ingress before a request reaches a replica.

* **Keys.** With keys set, every request the application sees needs ``Authorization:
  Bearer <key>``, whatever its path: the OpenAI routes, vLLM's ``/tokenize`` and
  ``/detokenize``, FastAPI's ``/docs`` and ``/openapi.json``, unknown paths. Only Serve's
  liveness routes (``/-/healthz``, ``/-/routes``) stay open: Serve's HTTP proxy answers
  them itself, without calling the application.
* **Route prefix.** Serve passes an application's route prefix as the ASGI ``root_path``
  and keeps it in ``path``; the limits are judged on the path after the prefix
  (:func:`route_path`), so deploying under a prefix changes nothing.
* **Body size.** A body is read up to ``max_request_bytes`` and no further, whether or not
  the request declares a ``Content-Length``; a longer one gets 413.
* **Generation requests** (``/v1/completions``, ``/v1/chat/completions``): the model name,
  ``max_tokens``, ``n``, the log-prob counts, the number of stop strings and of prompts,
  ``min_tokens`` are bounded (:func:`check_body`); a request without ``max_tokens`` is given
  ``default_max_tokens`` (:func:`fill_max_tokens`) instead of the context's remainder.

* **Server errors.** The body of a 5xx answer (Ray's error handler writes the replica's
  traceback, process id and node address into it) goes to the ingress's log under an
  error id, and the client gets an OpenAI-style ``server_error`` naming that id instead.

Every refusal is an OpenAI-style error body (``{"error": {"message", "type", "param",
"code"}}``) with a 4xx status, so clients get a readable message and the replicas never
see the request.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Request limits of an endpoint (the keys of the same names in ``ServeConfig``)."""

    max_request_bytes: int
    max_tokens: int
    """Largest ``max_tokens`` (or ``max_completion_tokens``) a request may ask for."""
    default_max_tokens: int
    """``max_tokens`` of a request that sets none (capped at ``max_tokens``)."""
    max_n: int
    """Largest ``n`` (and ``best_of``)."""
    max_logprobs: int
    """Largest ``logprobs``, ``top_logprobs``, ``prompt_logprobs``; most ``logprob_token_ids``."""
    max_stop: int
    """Most strings in ``stop``."""
    max_prompts: int
    """Most prompts in one completion request."""
    models: tuple[str, ...] = ()
    """Names a request may ask for (empty: not checked here)."""


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An OpenAI-style error response."""
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own HTTP errors (unknown path, wrong method, unknown model) as OpenAI-style bodies."""
    assert isinstance(exc, HTTPException)  # registered for HTTPException only
    response = error(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}")
    response.headers.update(exc.headers or {})
    return response


def check_key(header: str | None, keys: tuple[str, ...]) -> str | None:
    """Why the ``Authorization`` header is refused, or None when it carries one of ``keys`` (or auth is off)."""
    if not keys:
        return None
    if not header or not header.lower().startswith("bearer "):
        return "missing API key: send 'Authorization: Bearer <key>'"
    given = header[len("bearer ") :].strip().encode()
    if any(hmac.compare_digest(given, key.encode()) for key in keys):
        return None
    return "invalid API key"


def route_path(scope: Mapping[str, Any]) -> str:
    """The request's path after the route prefix (``root_path``), as the application's router matches it."""
    path: str = scope["path"]
    prefix: str = scope.get("root_path", "")
    if prefix and path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] in ("", "/"):
        return path[len(prefix) :] or "/"
    return path


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _integer(body: dict[str, Any], field: str, low: int, high: int) -> tuple[str, str] | None:
    """Why ``body[field]`` is refused (not an integer in low..high), or None (also when absent or null)."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{field} must be an integer, got {_short(value)}", field
    if not low <= value <= high:
        return f"{field} must be between {low} and {high} on this endpoint, got {value}", field
    return None


def _prompt_count(prompt: Any) -> int:
    """How many prompts ``prompt`` holds: a string or a list of token ids is one, a list of either is its length."""
    if isinstance(prompt, list) and prompt and not all(isinstance(item, int) for item in prompt):
        return len(prompt)
    return 1


def requested_max_tokens(body: dict[str, Any], limits: Limits) -> int:
    """The ``max_tokens`` a checked request will run with: its own, else the endpoint's default."""
    for field in ("max_completion_tokens", "max_tokens"):  # vLLM's order of precedence
        if body.get(field) is not None:
            requested: int = body[field]  # check_body has refused a body where it is not an integer
            return requested
    return min(limits.default_max_tokens, limits.max_tokens)


def check_body(path: str, raw: bytes, limits: Limits) -> tuple[str, str | None] | None:
    """Why a generation request body is refused, as (message, param), or None when it is acceptable.

    Checks what the engine would otherwise reject late, not at all, or without an
    OpenAI-style body, and what would let one request take a replica's time: a JSON
    object, a known ``model``, ``max_tokens``/``max_completion_tokens`` in 1..limit,
    ``n``/``best_of``, ``logprobs``/``top_logprobs``/``prompt_logprobs``, the numbers of
    ``logprob_token_ids``, ``stop`` strings and prompts, ``min_tokens`` up to the request's
    ``max_tokens``, a non-empty ``messages`` list for chat and a non-empty ``prompt`` for
    completions. Types beyond these are left to the request models (400 from the app);
    the context length is checked by the engine.
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits, too deep
        return f"request body is not valid JSON: {str(exc)[:120]}", None
    if not isinstance(body, dict):
        return "request body must be a JSON object", None
    model = body.get("model")
    if limits.models and model is not None and model not in limits.models:
        return f"model {_short(model)} does not exist; this endpoint serves {', '.join(limits.models)}", "model"
    chat = path.endswith("/chat/completions")
    for field, (low, high) in _integer_bounds(limits, chat).items():
        if refused := _integer(body, field, low, high):
            return refused
    if refused := _integer(body, "min_tokens", 0, requested_max_tokens(body, limits)):
        return f"{refused[0]} (min_tokens may not exceed the request's max_tokens)", "min_tokens"
    counted = {
        "logprob_token_ids": (body.get("logprob_token_ids"), limits.max_logprobs),
        "stop": (body.get("stop"), limits.max_stop),
    }
    for field, (value, most) in counted.items():
        if isinstance(value, list) and len(value) > most:
            return f"{field} may hold at most {most} items on this endpoint, got {len(value)}", field
    # vLLM's request model reads it with .get while validating it: anything but an object was a 500
    if body.get("structured_outputs") is not None and not isinstance(body["structured_outputs"], dict):
        return "structured_outputs must be an object", "structured_outputs"
    if chat:
        return _check_messages(body.get("messages"))
    return _check_prompt(body.get("prompt"), limits)


def _integer_bounds(limits: Limits, chat: bool) -> dict[str, tuple[int, int]]:
    """The (low, high) bounds of the integer fields of a generation request (``logprobs`` for completions only)."""
    bounds = {
        "max_tokens": (1, limits.max_tokens),
        "max_completion_tokens": (1, limits.max_tokens),
        "n": (1, limits.max_n),
        "best_of": (1, limits.max_n),
        "top_logprobs": (0, limits.max_logprobs),
        "prompt_logprobs": (0, limits.max_logprobs),
    }
    if not chat:  # a chat request's logprobs is a boolean
        bounds["logprobs"] = (0, limits.max_logprobs)
    return bounds


def _check_messages(messages: Any) -> tuple[str, str] | None:
    """Why a chat request's ``messages`` is refused (not a non-empty list of objects with a role), or None."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list", "messages"
    for index, message in enumerate(messages):  # vLLM reads message["role"] unchecked: a KeyError, a 500
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"messages[{index}] must be an object with a string role", "messages"
    return None


def _check_prompt(prompt: Any, limits: Limits) -> tuple[str, str] | None:
    """Why a completion request's ``prompt`` is refused (empty, or more prompts than the limit), or None."""
    if prompt in (None, "", []):
        return "prompt must be a non-empty string or list", "prompt"
    if (count := _prompt_count(prompt)) > limits.max_prompts:
        return f"prompt may hold at most {limits.max_prompts} prompts on this endpoint, got {count}", "prompt"
    return None


def fill_max_tokens(raw: bytes, limits: Limits) -> bytes:
    """``raw`` (a body :func:`check_body` accepted) with the default ``max_tokens`` when it sets neither field.

    Without it vLLM gives a chat request the whole rest of the context.
    """
    body = json.loads(raw)
    if body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None:
        return raw
    return json.dumps({**body, "max_tokens": requested_max_tokens(body, limits)}).encode()


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, read from the ASGI ``receive`` up to ``limit`` bytes; None as soon as it exceeds that."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def hide_server_errors(send: Send) -> Send:
    """An ASGI ``send`` that replaces the body of a 5xx response with a generic error naming an id, and logs the
    original body under that id (it may hold a traceback, process ids and node addresses)."""
    held: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def send_hiding(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 500:
            held["start"] = message
            return
        if "start" not in held:
            return await send(message)
        if message["type"] != "http.response.body":
            return None
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return None
        start, error_id = held["start"], uuid.uuid4().hex[:12]
        log.error("HTTP %d answered as server error %s: %s", start["status"], error_id, b"".join(chunks)[:4000])
        body = json.dumps(
            {
                "error": {
                    "message": f"internal server error {error_id}; the server's log has the details",
                    "type": "server_error",
                    "param": None,
                    "code": "internal_error",
                }
            }
        ).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return None

    return send_hiding


def _replay(raw: bytes, receive: Receive) -> Receive:
    """An ASGI ``receive`` that gives ``raw`` as the whole body, then what ``receive`` gives (a disconnect)."""
    pending: list[Message] = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive_again() -> Message:
        return pending.pop() if pending else await receive()

    return receive_again


class Guard:
    """ASGI middleware: the API key on every request, the body size cap, the limits of generation requests."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], limits: Limits) -> None:
        self.app = app
        self.keys = keys
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse or pass on one request (lifespan events pass through)."""
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if why := check_key(headers.get("authorization"), self.keys):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008, "reason": why})
            return await error(401, why, code="invalid_api_key")(scope, receive, send)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        send = hide_server_errors(send)
        refusal, raw = await self._screen(scope, receive, headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, _replay(raw, receive), send)

    async def _screen(self, scope: Scope, receive: Receive, headers: Headers) -> tuple[JSONResponse | None, bytes]:
        """(a refusal, or None and the body to pass on) for one HTTP request."""
        cap = self.limits.max_request_bytes
        too_large = error(413, f"request body exceeds {cap} bytes", code="too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            return too_large, b""
        try:
            raw = await read_body(receive, cap)
        except ClientDisconnect:
            return error(400, "the client disconnected before sending the whole body"), b""
        if raw is None:
            return too_large, b""
        if scope["method"] != "POST" or route_path(scope) not in GENERATION_ROUTES:
            return None, raw
        if refused := check_body(route_path(scope), raw, self.limits):
            message, param = refused
            if param == "model":
                return error(404, message, param=param, code="model_not_found"), b""
            return error(400, message, param=param, code="invalid_request"), b""
        filled = fill_max_tokens(raw, self.limits)
        if filled is not raw:  # the body changed length: so must the header the app reads
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope["headers"].append((b"content-length", str(len(filled)).encode()))
        return None, filled
