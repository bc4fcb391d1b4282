"""Autoscaling between min_replicas and max_replicas: load on a 1..2 replica endpoint makes Serve start the second.

In a package of its own so that it runs after the serving package's endpoint has released its CPUs.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

LOAD_CLIENTS = 16
DEADLINE_S = 240


def model_replicas(state: str | None = "RUNNING") -> int:
    """The model deployment's replicas in ``state`` (None: in any state, those starting included)."""
    from ray import serve

    deployments = serve.status().applications["rlhf"].deployments
    (name,) = [name for name in deployments if name.startswith("LLMServer")]
    states = deployments[name].replica_states
    return sum(states.values()) if state is None else states.get(state, 0)


async def load_until(url: str, done, deadline: float) -> dict[str, int]:
    """LOAD_CLIENTS clients sending completions back to back until ``done()`` or the deadline; counts by outcome."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    counts = {"ok": 0, "4xx": 0, "5xx": 0}

    async def one_client(i: int) -> None:
        while not done() and time.monotonic() < deadline:
            try:
                await client.completions.create(
                    model="tiny",
                    prompt=f"Describe the cat {i}.",
                    max_tokens=48,
                    temperature=0,
                    extra_body={"min_tokens": 48},
                )
                counts["ok"] += 1
            except openai.APIStatusError as exc:
                counts["5xx" if exc.status_code >= 500 else "4xx"] += 1

    await asyncio.gather(*(one_client(i) for i in range(LOAD_CLIENTS)))
    await client.close()
    return counts


def test_load_scales_the_replicas_from_min_towards_max(ray_cluster, tiny_model_dir: Path) -> None:
    from ray import serve

    from cluster.connect import free_port
    from serving.config import ServeConfig
    from serving.server import start

    config = ServeConfig(
        model=str(tiny_model_dir),
        model_name="tiny",
        port=free_port(),
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=2,
        upscale_delay_s=1,
        max_model_len=256,
        max_tokens_limit=64,
    )
    url = start(config, timeout_s=600)
    try:
        assert model_replicas() == 1
        started = time.monotonic()
        # the load stops once Serve has decided on a second replica; it then starts on an idle machine
        counts = asyncio.run(load_until(url, lambda: model_replicas(None) >= 2, started + DEADLINE_S))
        decided = time.monotonic() - started
        while model_replicas() < 2 and time.monotonic() < started + DEADLINE_S:
            time.sleep(1)
        seconds = time.monotonic() - started
        print(f"\nscale-up decided after {decided:.0f} s of load, 2 replicas running after {seconds:.0f} s; {counts}")
        assert model_replicas() == 2, f"no second replica running within {DEADLINE_S} s"
        assert counts["5xx"] == 0 and counts["4xx"] == 0 and counts["ok"] > 0
    finally:
        serve.shutdown()
