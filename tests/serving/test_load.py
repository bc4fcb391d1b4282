"""Bounded load on the live endpoint, and a replica killed under load.

Both run through the official async ``openai`` client with retries off, so every failure
the server produces is counted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from dataclasses import dataclass

import openai
import pytest

from tests.serving.conftest import API_KEY, Endpoint


@dataclass
class Outcome:
    started: float
    finished: float
    status: int  # 200, or the HTTP status of the error (0: connection failure)


async def _client_loop(client: openai.AsyncOpenAI, model: str, until: float, budget: list[int], out: list) -> None:
    while time.monotonic() < until and budget[0] > 0:
        budget[0] -= 1
        started = time.monotonic()
        try:
            await client.completions.create(model=model, prompt="describe the cat", max_tokens=16)
            status = 200
        except openai.APIStatusError as exc:
            status = exc.status_code
        except openai.APIConnectionError:
            status = 0
        out.append(Outcome(started, time.monotonic(), status))


async def _load(endpoint: Endpoint, clients: int, seconds: float, max_requests: int, during=None) -> list[Outcome]:
    """``clients`` concurrent clients for ``seconds`` (at most ``max_requests`` in all); ``during`` runs alongside."""
    client = openai.AsyncOpenAI(base_url=f"{endpoint.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    outcomes: list[Outcome] = []
    budget = [max_requests]
    until = time.monotonic() + seconds
    tasks = [_client_loop(client, endpoint.base_model, until, budget, outcomes) for _ in range(clients)]
    if during is not None:
        tasks.append(during())
    await asyncio.gather(*tasks)
    await client.close()
    return outcomes


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def test_32_clients_for_20_seconds_get_no_5xx(endpoint: Endpoint) -> None:
    started = time.monotonic()
    outcomes = asyncio.run(_load(endpoint, clients=32, seconds=20, max_requests=5000))
    wall = time.monotonic() - started
    ok = [o for o in outcomes if o.status == 200]
    latencies = sorted(o.finished - o.started for o in ok)
    p50, p99 = _percentile(latencies, 50), _percentile(latencies, 99)
    print(
        f"\nload: 32 clients, {len(outcomes)} requests in {wall:.1f} s, {len(ok) / wall:.1f} req/s, "
        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
    )
    assert [o.status for o in outcomes if o.status != 200] == []
    assert len(ok) >= 32


def _llm_replica_pids() -> list[int]:
    """PIDs of the live LLMServer replica processes (Serve names its replica actors in the "serve" namespace)."""
    import ray

    from serving.ray_internals import run_on_replica_actor

    pids = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == "serve" and "LLMServer" in entry["name"]:
            ref = run_on_replica_actor(entry["name"], lambda self: os.getpid())
            try:
                pids.append(ray.get(ref, timeout=30))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue  # dead or not yet started
    return sorted(pids)


def _healthy_llm_replicas() -> int:
    from ray import serve

    app = serve.status().applications["rlhf"]
    deployment = next(d for name, d in app.deployments.items() if name.startswith("LLMServer"))
    return deployment.replica_states.get("RUNNING", 0)


def test_a_killed_replica_is_replaced_while_the_other_keeps_serving(endpoint: Endpoint) -> None:
    pids = _llm_replica_pids()
    assert len(pids) == 2, pids
    killed_at: list[float] = []

    async def kill_one() -> None:
        await asyncio.sleep(4)
        killed_at.append(time.monotonic())
        os.kill(pids[0], signal.SIGKILL)

    clients = 8
    outcomes = asyncio.run(_load(endpoint, clients=clients, seconds=25, max_requests=3000, during=kill_one))
    kill = killed_at[0]
    failed = [o for o in outcomes if o.status != 200]
    after = [o for o in outcomes if o.started > kill + 1 and o.status == 200]
    print(f"\nreplica kill: {len(outcomes)} requests, {len(failed)} failed, {len(after)} served after the kill")
    # only requests already in flight when the replica died may fail: at most one per client
    assert all(o.started <= kill for o in failed), [(o.started - kill, o.status) for o in failed]
    assert len(failed) <= clients
    assert len(after) >= 10, "the surviving replica stopped answering"

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (_healthy_llm_replicas() == 2 and pids[0] not in _llm_replica_pids()):
        time.sleep(2)
    assert _healthy_llm_replicas() == 2, "the killed replica was not replaced"
    assert len(_llm_replica_pids()) == 2


@pytest.mark.parametrize("model_attr", ["base_model", "adapter"])
def test_the_endpoint_answers_after_the_replacement(endpoint: Endpoint, model_attr: str) -> None:
    client = openai.OpenAI(base_url=f"{endpoint.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    for _ in range(4):  # reaches both replicas, including the new one
        response = client.completions.create(model=getattr(endpoint, model_attr), prompt="the dog", max_tokens=4)
        assert response.choices[0].text is not None
