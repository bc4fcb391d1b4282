"""Shared fixtures: a stable cache, the tiny local model, offline hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("RLHF_CACHE", str(ROOT / ".cache" / "rlhf"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM on x86 CPUs keeps one core for its scheduler process by default, so on a 2-core machine each replica decodes
# with one thread; with none reserved it uses both (SmolLM2, 32 prompts x 64 tokens: 15.3 s -> 11.1 s measured).
# The replicas inherit this from the test process through the embedded Ray cluster.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny local model (built once per cache)."""
    from rlhf.models.loading import resolve

    return Path(resolve("tiny"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct from its packaged GGUF file, converted once per cache (about 30-60 s the first time)."""
    from rlhf.models.loading import resolve

    return Path(resolve("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray cluster for the session (8 logical CPUs: workers, actors and Serve replicas fit)."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# ---- parallel runs (make test: pytest -n 2 --dist loadgroup) ----------------------------------------------------
# Each test worker is a process of its own with its own embedded Ray cluster. A tier whose fixtures are shared by
# its whole package (a trained policy and a rollout replica, the real model's replica, the serving endpoint) runs
# on one worker; any other module runs on one worker. The longest tiers are handed out first, so that no long one
# is left for the end while the other worker idles.
PACKAGE_TIERS = ("real", "rl", "serving")
TIER_ORDER = ("real", "rl", "ray", "serving", "cluster", "serving_autoscale", "distributed", "e2e", "unit")
TESTS = Path(__file__).resolve().parent


def _tier(item: pytest.Item) -> str:
    return Path(str(item.path)).resolve().relative_to(TESTS).parts[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not getattr(config.option, "numprocesses", None):
        return
    for item in items:
        tier = _tier(item)
        item.add_marker(pytest.mark.xdist_group(tier if tier in PACKAGE_TIERS else item.nodeid.split("::")[0]))
    order = {tier: i for i, tier in enumerate(TIER_ORDER)}
    items.sort(key=lambda item: order.get(_tier(item), len(order)))
