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


def running_model_replicas() -> int:
    from ray import serve

    deployments = serve.status().applications["rlhf"].deployments
    (name,) = [name for name in deployments if name.startswith("LLMServer")]
    return deployments[name].replica_states.get("RUNNING", 0)


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
    from rlhf.config import ServeConfig
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
        assert running_model_replicas() == 1
        started = time.monotonic()
        counts = asyncio.run(load_until(url, lambda: running_model_replicas() >= 2, started + DEADLINE_S))
        seconds = time.monotonic() - started
        print(f"\nscaled to {running_model_replicas()} replicas after {seconds:.0f} s of load; requests {counts}")
        assert running_model_replicas() == 2, f"no second replica within {DEADLINE_S} s of load"
        assert counts["5xx"] == 0 and counts["4xx"] == 0 and counts["ok"] > 0
    finally:
        serve.shutdown()
