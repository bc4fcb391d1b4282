"""Shared by the RLHF tests: a policy fine-tuned on the toy world's mixed-sentiment data, and one rollout
application (a vLLM replica on Ray Serve) that every run reuses, re-syncing its weights at the start.

The SFT policy writes the response template with positive and negative adjectives at random, so the
rule-based reward starts near 0 and RL has room to raise it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

APP_NAME = "rlhf-rollout-tests"
MAX_MODEL_LEN = 256


@pytest.fixture(scope="package")
def sft_policy(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after 60 SFT steps on bundled:sft_mixed (one Ray Train worker)."""
    from cluster import configtree
    from rlhf.config import SFTConfig
    from rlhf.jobs.registry import EXAMPLES_DIR
    from rlhf.jobs.sft import run

    out = tmp_path_factory.mktemp("sft")
    config = configtree.load(
        SFTConfig,
        EXAMPLES_DIR / "sft.yaml",
        [
            "data.path=bundled:sft_mixed",
            "data.eval_split=null",
            f"train.output_dir={out}",
            "train.max_steps=60",
            "cluster.num_workers=1",
        ],
    )
    return Path(run(config)["final_model"])


@pytest.fixture(scope="package")
def rollout_app(ray_cluster, sft_policy: Path):
    """One rollout replica of the SFT policy, deployed once; the runs find it running and reuse it."""
    from ray import serve

    from serving.config import ServeConfig
    from serving.deploy import deploy

    config = ServeConfig(
        model=str(sft_policy), model_name="policy", max_model_len=MAX_MODEL_LEN, max_tokens_limit=MAX_MODEL_LEN
    )
    # with vLLM's weight-transfer backend, as rlhf ppo deploys it, so the runs can push weights into it
    assert deploy(config, APP_NAME, timeout_s=600, weight_transfer=True).how in ("started", "deployed")
    yield APP_NAME
    serve.shutdown()
