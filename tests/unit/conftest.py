"""The unit tier runs without a Ray cluster, and leaves none behind.

Before: two tests that build the serving application (``serving.app.app_builder``, as Serve's controller runs it on
a cluster) started a local Ray instance in the test process as a side effect (Ray's ``build_llm_deployment`` reads
``ray.get_runtime_context()``, which starts one where none is connected) and left it running, so the session
fixture of a Ray tier collected after them failed in its ``ray.init``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import SimpleNamespace

import pytest


@pytest.fixture(autouse=True)
def no_ray_left_running() -> Iterator[None]:
    """Fail the unit test that starts Ray in this process and leaves it running (a Ray tier's session cluster, up
    before the test, is left alone)."""
    ray = sys.modules.get("ray")
    running_before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if not running_before and ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this unit test started Ray in the test process and left it running")


@pytest.fixture
def cluster_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Ray runtime context that Ray's LLM builders read, as a Serve controller on a cluster has it (an empty
    runtime environment), without starting a Ray instance here."""
    import ray

    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(runtime_env={}))
