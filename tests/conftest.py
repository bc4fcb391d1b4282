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
# Ray Train's controller polls its workers every 2 s, so it notices a finished run up to 2 s late (measured: 2.4 s
# from a run's last report to its workers' shutdown); the suite runs about 40 fits.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


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


# ---- parallel runs (make test: pytest -n 2) -----------------------------------------------------------------------
# Each test worker is a process of its own with its own embedded Ray cluster. The scheduler below hands out whole
# units of tests. Every tier that starts vLLM or trains the real model is one unit, run in order by one worker:
# SmolLM2's trainer, reference and replica, PPO's role actors and replicas, the serving endpoint's two replicas each
# hold GiBs, and side by side they took the machine (24 GiB) to its memory limit, where Ray's memory monitor killed
# their workers (measured: 22.6 GiB used with the real LoRA case beside the endpoint's replicas). The other
# worker takes the rest module by module (Ray Train jobs of the tiny model, the cluster, the loop on gloo, units).
REPLICA_TIERS = ("real", "rl", "serving", "serving_autoscale", "e2e")
TIER_ORDER = ("real", "rl", "serving", "serving_autoscale", "e2e", "ray", "cluster", "distributed", "unit")


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to (see above): one for every tier that runs replicas, else its module."""
    module = nodeid.split("::")[0]
    parts = module.split("/")
    return "tests/replica-tiers" if len(parts) > 2 and parts[1] in REPLICA_TIERS else module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "PYTEST_XDIST_WORKER" not in os.environ:  # set in xdist's workers, which collect what the scheduler hands out
        return
    order = {tier: i for i, tier in enumerate(TIER_ORDER)}
    items.sort(key=lambda item: order.get(item.nodeid.split("/")[1], len(order)))


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:  # xdist's Producer and Scheduling
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        """xdist's scheduling by scope, with :func:`unit_of` as the scope, in the workers' collection order."""

        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    config.option.loadscopereorder = False  # by number of tests it would put the short unit tier first
    return UnitScheduling(config, log)


# ---- where the suite's time goes ----------------------------------------------------------------------------------
# The suite's budget is 45 minutes on the 2-core CI machine; the end of every run prints the seconds of each tier
# (setup, call and teardown of its tests) and of its five longest modules, so a run's log says where to cut.
_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    module = report.nodeid.split("::")[0]
    _seconds[module] = _seconds.get(module, 0.0) + report.duration


@pytest.hookimpl(trylast=True)  # after the durations: the end of a CI log is what it shows
def pytest_terminal_summary(terminalreporter: object, exitstatus: int, config: pytest.Config) -> None:
    if not _seconds:
        return
    tiers: dict[str, float] = {}
    for module, seconds in _seconds.items():
        parts = module.split("/")
        tier = parts[1] if len(parts) > 2 else module
        tiers[tier] = tiers.get(tier, 0.0) + seconds
    write = terminalreporter.write_line  # type: ignore[attr-defined]
    terminalreporter.section("seconds per tier")  # type: ignore[attr-defined]
    for tier, seconds in sorted(tiers.items(), key=lambda kv: -kv[1]):
        write(f"{seconds:8.1f}  {tier}")
    terminalreporter.section("seconds of the longest modules")  # type: ignore[attr-defined]
    for module, seconds in sorted(_seconds.items(), key=lambda kv: -kv[1])[:12]:
        write(f"{seconds:8.1f}  {module}")
