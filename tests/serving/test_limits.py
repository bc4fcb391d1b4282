"""Request limits on the live endpoint: each bound gets a 4xx with an OpenAI error body and the server keeps
serving; a request without max_tokens gets the configured default; a body without Content-Length is capped."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serving.conftest import API_KEY, LIMITS, Endpoint

AUTH = {"Authorization": f"Bearer {API_KEY}"}
COMPLETION = {"model": "tiny", "prompt": "the cat", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

OVER_THE_LIMITS = {
    # name: (route, body, the refused field)
    "n": ("/v1/completions", {**COMPLETION, "n": LIMITS["max_n"] + 1}, "n"),
    "best_of": ("/v1/completions", {**COMPLETION, "best_of": 100}, "best_of"),
    "logprobs": ("/v1/completions", {**COMPLETION, "logprobs": LIMITS["max_logprobs"] + 1}, "logprobs"),
    "logprobs of the whole vocabulary": ("/v1/completions", {**COMPLETION, "logprobs": -1}, "logprobs"),
    "top_logprobs": ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    "prompt_logprobs": ("/v1/completions", {**COMPLETION, "prompt_logprobs": -1}, "prompt_logprobs"),
    "stop strings": ("/v1/completions", {**COMPLETION, "stop": ["a", "b", "c"]}, "stop"),
    "prompts": ("/v1/completions", {**COMPLETION, "prompt": ["a"] * (LIMITS["max_prompts"] + 1)}, "prompt"),
    "min_tokens": ("/v1/chat/completions", {**CHAT, "max_tokens": None, "min_tokens": 200}, "min_tokens"),
    "max_tokens": ("/v1/chat/completions", {**CHAT, "max_tokens": 10**6}, "max_tokens"),
}


@pytest.mark.parametrize("name", list(OVER_THE_LIMITS))
def test_each_limit_gets_a_400_with_an_openai_error_body(endpoint: Endpoint, name: str) -> None:
    """Before, only max_tokens was bounded: n, best_of, the log-prob counts, stop strings, prompts and min_tokens
    reached the replicas as sent."""
    route, body, field = OVER_THE_LIMITS[name]
    response = httpx.post(f"{endpoint.url}{route}", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error", error
    # the server keeps serving
    assert httpx.post(f"{endpoint.url}/v1/completions", json=COMPLETION, headers=AUTH, timeout=120).status_code == 200


def test_a_chat_request_without_max_tokens_gets_the_default(endpoint: Endpoint) -> None:
    """Before, vLLM gave a chat request without max_tokens the rest of the context (here ~240 tokens)."""
    client = openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model=endpoint.base_model, messages=[{"role": "user", "content": "hi"}], extra_body={"ignore_eos": True}
    )
    assert answer.usage.completion_tokens == LIMITS["default_max_tokens"]
    completion = client.completions.create(model=endpoint.base_model, prompt="the", extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == LIMITS["default_max_tokens"]


@pytest.mark.parametrize("route", ["/v1/completions", "/tokenize"])
def test_a_body_without_content_length_over_the_cap_gets_413(endpoint: Endpoint, route: str) -> None:
    def chunks():  # sent chunked: no Content-Length to refuse it by
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(2000):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(f"{endpoint.url}{route}", content=chunks(), headers=AUTH, timeout=120)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "too_large"
    assert httpx.post(f"{endpoint.url}/v1/completions", json=COMPLETION, headers=AUTH, timeout=120).status_code == 200
