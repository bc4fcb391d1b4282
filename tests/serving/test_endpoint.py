"""The live endpoint through the official ``openai`` client: the API surface, adapters, bad requests, auth."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.serving.conftest import API_KEY, MAX_MODEL_LEN, MAX_TOKENS_LIMIT, Endpoint


@pytest.fixture(scope="module")
def client(endpoint: Endpoint) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_models_lists_the_base_model_and_its_adapter(client: openai.OpenAI, endpoint: Endpoint) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [endpoint.base_model, endpoint.adapter]
    assert client.models.retrieve(endpoint.adapter).id == endpoint.adapter


def test_chat_completion(client: openai.OpenAI, endpoint: Endpoint) -> None:
    response = client.chat.completions.create(
        model=endpoint.base_model, messages=[{"role": "user", "content": "describe the cat"}], max_tokens=8
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert response.usage.completion_tokens <= 8
    assert response.model == endpoint.base_model


def test_completion_with_n_logprobs_and_seed(client: openai.OpenAI, endpoint: Endpoint) -> None:
    def sample(seed: int) -> openai.types.Completion:
        return client.completions.create(
            model=endpoint.base_model, prompt="describe the dog", max_tokens=6, n=3, seed=seed, logprobs=2
        )

    first, again, other = sample(1), sample(1), sample(2)
    assert len(first.choices) == 3
    assert [c.text for c in first.choices] == [c.text for c in again.choices], "the same seed must reproduce"
    assert [c.text for c in first.choices] != [c.text for c in other.choices]
    logprobs = first.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) > 0
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) >= 1 for top in logprobs.top_logprobs)


def test_stop_sequences_end_the_text(client: openai.OpenAI, endpoint: Endpoint) -> None:
    free = client.completions.create(model=endpoint.base_model, prompt="the cat is", max_tokens=16, temperature=0)
    text = free.choices[0].text
    assert len(text) > 2
    stop = text[1:3]  # a sequence the greedy output is known to contain
    stopped = client.completions.create(
        model=endpoint.base_model, prompt="the cat is", max_tokens=16, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_streaming_chat_arrives_in_chunks(client: openai.OpenAI, endpoint: Endpoint) -> None:
    stream = client.chat.completions.create(
        model=endpoint.base_model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len(chunks) >= 3
    assert "".join(deltas)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_adapter_by_name_generates_what_peft_generates(client: openai.OpenAI, endpoint: Endpoint) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "describe the bird"
    served = client.completions.create(model=endpoint.adapter, prompt=prompt, max_tokens=6, temperature=0)
    base = client.completions.create(model=endpoint.base_model, prompt=prompt, max_tokens=6, temperature=0)
    assert served.model == endpoint.adapter
    assert served.choices[0].text != base.choices[0].text

    tokenizer = AutoTokenizer.from_pretrained(endpoint.model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(endpoint.model_dir), endpoint.adapter_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert served.choices[0].text == tokenizer.decode(out[0, ids.shape[1] :])


BAD_REQUESTS = {
    # name: (route, raw body, expected status, a fragment of the message)
    "invalid JSON": ("/v1/completions", '{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    "unknown model": (
        "/v1/completions",
        {"model": "nope", "prompt": "x", "max_tokens": 4},
        404,
        "'nope' does not exist",
    ),
    "negative max_tokens": ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    "huge max_tokens": (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
        400,
        f"between 1 and {MAX_TOKENS_LIMIT}",
    ),
    "empty messages": ("/v1/chat/completions", {"model": "tiny", "messages": [], "max_tokens": 4}, 400, "messages"),
    "prompt longer than the context": (
        "/v1/completions",
        {"model": "tiny", "prompt": "cat " * (MAX_MODEL_LEN + 10), "max_tokens": 4},
        400,
        "maximum context length",
    ),
    "body too large": ("/v1/completions", {"model": "tiny", "prompt": "x" * 2_000_000}, 413, "exceeds"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_with_an_openai_error_body(endpoint: Endpoint, name: str) -> None:
    route, body, status, fragment = BAD_REQUESTS[name]
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{endpoint.url}{route}", content=content, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"], error
    assert {"message", "type", "code"} <= set(error)


def test_the_client_raises_its_own_error_types(client: openai.OpenAI, endpoint: Endpoint) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing-adapter", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=endpoint.base_model, prompt="x", max_tokens=0)
    # and the server kept serving
    assert client.completions.create(model=endpoint.base_model, prompt="x", max_tokens=2).choices


def test_auth_401_without_a_valid_key_200_with_it(endpoint: Endpoint) -> None:
    for key in (None, "wrong-key"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for route, method in (("/v1/models", "GET"), ("/v1/completions", "POST")):
            body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
            response = httpx.request(method, f"{endpoint.url}{route}", json=body, headers=headers, timeout=30)
            assert response.status_code == 401, (key, route, response.text)
            assert response.json()["error"]["type"] == "authentication_error"
    unauthenticated = openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        unauthenticated.models.list()
    ok = httpx.get(f"{endpoint.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert ok.status_code == 200


def test_the_proxy_sends_requests_straight_to_the_model_replicas(endpoint: Endpoint) -> None:
    """Before, every request went proxy -> an ingress deployment's replica -> a model replica: a process and a hop
    more than the proxy -> model replica path here, on the CPU cores the engine computes on."""
    from ray import serve

    from serving.server import APP_NAME

    application = serve.status().applications[APP_NAME]
    assert list(application.deployments) == ["LLMServer:tiny"]
    assert application.deployments["LLMServer:tiny"].replica_states == {"RUNNING": 2}
