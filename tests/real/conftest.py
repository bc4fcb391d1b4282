"""The real tier: SmolLM2-135M-Instruct (converted once from its packaged GGUF file) on a real vLLM replica.

One rollout application of the real model serves the package's tests; it is deployed as ``rlhf ppo``
deploys its replicas (serving.deploy.deploy, the engine defaults of this device). Serve runs with its
HTTP proxy on a free port of 127.0.0.1, so the endpoint tests can add an OpenAI application next to it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

APP_NAME = "rlhf-real-tests"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="package")
def serve_port(ray_cluster) -> int:
    """Serve, started with its proxy on a free loopback port (stopped after the package)."""
    from ray import serve
    from ray.serve.config import HTTPOptions

    from cluster.connect import free_port

    port = free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
    yield port
    serve.shutdown()


@pytest.fixture(scope="package")
def smollm2_app(serve_port: int, smollm2_dir: Path):
    """A replica of SmolLM2 with the weight-transfer backend, as rlhf ppo deploys one; yields its application name."""
    from serving.config import ServeConfig
    from serving.deploy import deploy

    config = ServeConfig(
        model=str(smollm2_dir), model_name="policy", max_model_len=MAX_MODEL_LEN, max_tokens_limit=MAX_MODEL_LEN
    )
    deployment = deploy(config, APP_NAME, timeout_s=600, weight_transfer=True)
    yield APP_NAME
    deployment.release()
