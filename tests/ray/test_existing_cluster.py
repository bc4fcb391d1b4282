"""The same ``rlhf sft`` command runs on an existing cluster when ``cluster.address`` (or ``RAY_ADDRESS``) names it.

The session's cluster stands in for a remote one: the command runs in a separate process
that connects to it instead of starting its own, and its job shows up in that cluster's
job table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rlhf.jobs.registry import EXAMPLES_DIR


def _drivers_of(out: Path) -> list[dict]:
    """The jobs in the session cluster's job table whose driver trained into ``out`` (Ray has no public
    job listing without its dashboard, which the test cluster does not run)."""
    import ray._private.state

    return [job for job in ray._private.state.state.job_table() if str(out) in job.get("Entrypoint", "")]


def test_sft_runs_on_the_cluster_named_by_the_address(ray_cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    """``cluster.address`` names the cluster, and it wins over a ``RAY_ADDRESS`` that names none (the environment
    variable alone is how the PPO drivers of tests/rl/test_isolation.py and the jobs of tests/cluster reach theirs;
    a case of its own here cost a second run of about 37 s)."""
    import ray

    from cluster.connect import free_port

    address = ray.get_runtime_context().gcs_address
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "rlhf.cli", "sft", "--config", str(EXAMPLES_DIR / "sft.yaml"),
        f"model.name_or_path={tiny_model_dir}", f"train.output_dir={out}", "train.max_steps=2",
        "train.eval_every=100", "cluster.num_workers=1", f"cluster.address={address}",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}  # nothing listens there
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"connecting to the Ray cluster at {address}" in result.stderr
    assert "starting an embedded local Ray cluster" not in result.stderr
    drivers = _drivers_of(out)
    assert len(drivers) == 1 and drivers[0]["IsDead"], drivers  # its driver ran on this cluster, and finished
    assert (out / "final" / "model.safetensors").is_file()
