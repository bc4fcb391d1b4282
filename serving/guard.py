"""API keys and request limits, checked in the ingress before a request reaches a replica.

Every refusal is an OpenAI-style error body (``{"error": {"message", "type", "param",
"code"}}``) with a 4xx status, so clients get a readable message and the replicas never
see the request.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class Limits:
    """Request limits of an endpoint."""

    max_request_bytes: int
    max_tokens: int
    models: tuple[str, ...] = ()
    """Names a request may ask for (empty: not checked here)."""


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An OpenAI-style error response."""
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


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


def check_body(path: str, raw: bytes, limits: Limits) -> tuple[str, str | None] | None:
    """Why a generation request body is refused, as (message, param), or None when it is acceptable.

    Checks what the engine would otherwise reject late, not at all, or without an
    OpenAI-style body: a valid JSON object, a known ``model``, ``max_tokens`` (or
    ``max_completion_tokens``) in 1..limit, a non-empty ``messages`` list for chat and a
    non-empty ``prompt`` for completions. The context length is checked by the engine.
    """
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"request body is not valid JSON: {exc}", None
    if not isinstance(body, dict):
        return "request body must be a JSON object", None
    model = body.get("model")
    if limits.models and model is not None and model not in limits.models:
        return f"model {model!r} does not exist; this endpoint serves {', '.join(limits.models)}", "model"
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{field} must be an integer, got {value!r}", field
        if not 1 <= value <= limits.max_tokens:
            return f"{field} must be between 1 and {limits.max_tokens} on this endpoint, got {value}", field
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages must be a non-empty list", "messages"
    elif "prompt" not in body or body["prompt"] in ("", []):
        return "prompt must be a non-empty string or list", "prompt"
    return None


class Guard(BaseHTTPMiddleware):
    """Starlette middleware applying :func:`check_key` to ``/v1`` routes and the limits to generation routes."""

    def __init__(self, app: Any, keys: tuple[str, ...], limits: Limits) -> None:
        super().__init__(app)
        self.keys = keys
        self.limits = limits

    async def dispatch(self, request: Request, call_next: Any) -> Response:
        """Refuse or pass on one request."""
        path = request.url.path
        if path.startswith("/v1") and (why := check_key(request.headers.get("authorization"), self.keys)):
            return error(401, why, code="invalid_api_key")
        if request.method == "POST" and path in GENERATION_ROUTES:
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.limits.max_request_bytes:
                return error(413, f"request body exceeds {self.limits.max_request_bytes} bytes", code="too_large")
            raw = await request.body()
            if len(raw) > self.limits.max_request_bytes:
                return error(413, f"request body exceeds {self.limits.max_request_bytes} bytes", code="too_large")
            if refused := check_body(path, raw, self.limits):
                message, param = refused
                if param == "model":
                    return error(404, message, param=param, code="model_not_found")
                return error(400, message, param=param, code="invalid_request")
        return await call_next(request)
