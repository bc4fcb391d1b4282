"""A bounded property-based fuzz of the live endpoint, from its own OpenAPI schema (schemathesis + hypothesis).

Every operation the app publishes is called with bodies and path parameters generated from the schema: valid
ones (half of them completed with a known model and a prompt, so they reach the engine with the other fields
random) and schema-violating ones, with the key; and valid ones without a key. Bounded in count (a fixed
number of examples per operation, no shrinking: about 1,200 requests, at least 1,000 asserted) and in time
(``TIME_LIMIT_S``; 70 to 120 s here on 2 cores). One seed, so a run is repeatable; the requests it found
problems with are kept below as regression cases. Requests go to 127.0.0.1 only.

What must hold: no 5xx, every 4xx an OpenAI error body, every request without a key a 401, and the same
replicas alive at the end (none crashed and replaced).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.serving.conftest import API_KEY, Endpoint

FUZZ_SEED = 20261202
EXAMPLES_WITH_KEY = 120  # per operation and generation mode (valid, schema-violating)
EXAMPLES_WITHOUT_KEY = 25  # per operation
MIN_REQUESTS = 1000
TIME_LIMIT_S = 900
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CORE = {  # what makes a generated body reach the engine
    "/v1/completions": {"model": "tiny", "prompt": "the cat"},
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
    "/tokenize": {"model": "tiny", "prompt": "the cat"},
    "/detokenize": {"model": "tiny", "tokens": [1, 2]},
}


def replica_names() -> set[str]:
    """The named actors of the live Serve replicas (a crashed replica comes back under a new name)."""
    import ray

    return {e["name"] for e in ray.util.list_named_actors(all_namespaces=True) if e["namespace"] == "serve"}


def openai_error(response: httpx.Response | Any) -> bool:
    """Whether ``response`` carries an OpenAI error body: ``{"error": {"message": str, "type": str, "code"}}``."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error.get("message"), str) and isinstance(error.get("type"), str) and "code" in error


def fuzz(operation: Any, mode: Any, examples: int, call: Any) -> None:
    """``call`` on ``examples`` cases of ``operation`` generated in ``mode`` (no shrinking: a bounded count)."""
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable

    @seed(FUZZ_SEED)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), complete=st.booleans())
    def run(case: Any, complete: bool) -> None:
        if complete and isinstance(case.body, dict):
            for key, value in CORE.get(operation.path, {}).items():
                case.body.setdefault(key, value)
        call(case)

    with contextlib.suppress(Unsatisfiable):  # an operation with nothing to violate (GET /v1/models) has none
        run()


@pytest.mark.timeout(TIME_LIMIT_S)
def test_fuzzing_every_operation_gives_no_5xx_and_only_openai_errors(endpoint: Endpoint) -> None:
    import requests
    import schemathesis
    from schemathesis import GenerationMode

    assert endpoint.url.startswith("http://127.0.0.1:")
    spec = httpx.get(f"{endpoint.url}/openapi.json", headers=AUTH, timeout=30).json()
    operations = [result.ok() for result in schemathesis.openapi.from_dict(spec).get_all_operations()]
    before = replica_names()
    session = requests.Session()
    counts: Counter = Counter()
    problems: list[tuple] = []
    started = time.monotonic()

    def with_key(case: Any) -> None:
        response = case.call(base_url=endpoint.url, session=session, headers=AUTH, timeout=120)
        counts[response.status_code] += 1
        refused = 400 <= response.status_code < 500
        if response.status_code >= 500 or (refused and not openai_error(response)):
            problems.append((case.operation.label, response.status_code, case.body, response.text[:500]))

    def without_key(case: Any) -> None:
        response = case.call(base_url=endpoint.url, session=session, timeout=120)
        counts["no key"] += 1
        if response.status_code != 401 or not openai_error(response):
            problems.append((case.operation.label, "no key", response.status_code, response.text[:500]))

    for operation in operations:
        fuzz(operation, GenerationMode.POSITIVE, EXAMPLES_WITH_KEY, with_key)
        fuzz(operation, GenerationMode.NEGATIVE, EXAMPLES_WITH_KEY, with_key)
        fuzz(operation, GenerationMode.POSITIVE, EXAMPLES_WITHOUT_KEY, without_key)
    seconds = time.monotonic() - started
    total = sum(counts.values())
    print(f"\nfuzz: {total} requests to {len(operations)} operations in {seconds:.0f} s, by status: {dict(counts)}")
    assert problems == []
    assert total >= MIN_REQUESTS
    assert counts[200] > 0, "no generated request was served: the fuzz never reached the engine"
    assert replica_names() == before, "a replica crashed (and was replaced) during the fuzz"
    body = {**CORE["/v1/completions"], "max_tokens": 2}
    served = httpx.post(f"{endpoint.url}/v1/completions", json=body, headers=AUTH, timeout=120)
    assert served.status_code == 200


FOUND_BY_THE_FUZZ = {
    # name: (route, body); each answered 500 (a traceback) before, from the seed above
    "embeddings with chat messages": (  # the request could not be pickled to the replica; the route is gone
        "/v1/embeddings",
        {"model": "tiny", "messages": [{"role": "developer", "content": []}]},
    ),
    "a message without a role": (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"author": {"role": "tool"}}]},
    ),
    "a message content of unknown parts": (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "tool", "tool_call_id": "", "content": [{"x": [1]}]}]},
    ),
}


@pytest.mark.parametrize("name", list(FOUND_BY_THE_FUZZ))
def test_what_the_fuzz_found_gets_a_4xx(endpoint: Endpoint, name: str) -> None:
    route, body = FOUND_BY_THE_FUZZ[name]
    response = httpx.post(f"{endpoint.url}{route}", json={**body, "max_tokens": 2}, headers=AUTH, timeout=120)
    assert 400 <= response.status_code < 500, response.text
    assert openai_error(response), response.text
