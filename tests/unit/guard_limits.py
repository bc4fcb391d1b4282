"""The small request limits the guard's unit tests run under (one place, so the tests agree on them)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from serving.guard import Limits

LIMITS = Limits(
    max_request_bytes=4096,
    max_tokens=64,
    default_max_tokens=16,
    max_n=4,
    max_logprobs=5,
    max_stop=2,
    max_prompts=4,
    models=("tiny",),
)


def limits(**changes: Any) -> Limits:
    """:data:`LIMITS` with ``changes``."""
    return replace(LIMITS, **changes)
