"""Checkpoints and recovery of the Ray Train jobs (SFT here; rm and dpo share the loop).

- A worker process killed by PID mid-run: Ray Train restarts the workers from the latest
  checkpoint; every step is trained, and only steps after that checkpoint are repeated.
- The driver killed mid-run and the same command re-run: it resumes from the checkpoint.
- A finished run re-run, or ``train.resume=never``: refused with a clear message, never a
  silent restart from zero or a run of zero steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from cluster import configtree
from rlhf.config import SFTConfig
from rlhf.jobs.registry import EXAMPLES_DIR
from rlhf.jobs.runner import JobError

SAVE_EVERY = 4


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in _records(out) if r["kind"] == "train"]


def _overrides(model_dir: Path, out: Path, steps: int) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        f"train.save_every={SAVE_EVERY}",
        "engine.gradient_accumulation_steps=6",  # ~0.5 s steps: longer than checkpoint registration and polling
        "data.eval_split=null",
    ]


def _wait_for_step(out: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s >= step for s in _train_steps(out)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {out / 'metrics.jsonl'} after {timeout} s")


def _assert_every_step_once_but_the_replayed(steps: list[int], total: int) -> None:
    counts = Counter(steps)
    assert sorted(counts) == list(range(1, total + 1)), f"lost steps: {sorted(set(range(1, total + 1)) - set(counts))}"
    repeated = [s for s, n in counts.items() if n > 1]
    assert len(repeated) <= SAVE_EVERY, f"more steps repeated than one checkpoint interval: {repeated}"
    assert all(n <= 2 for n in counts.values())


def test_killed_worker_is_recovered_from_the_last_checkpoint(ray_cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    from rlhf.jobs import sft

    total, kill_after = 20, 10
    out = tmp_path / "run"
    config = configtree.load(SFTConfig, EXAMPLES_DIR / "sft.yaml", _overrides(tiny_model_dir, out, total))
    killed: list[int] = []

    def kill_rank_1() -> None:
        _wait_for_step(out, kill_after)
        pid = next(r["pid"] for r in _records(out) if r["kind"] == "worker" and r["rank"] == 1)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    summary = sft.run(config)
    killer.join(timeout=5)

    assert killed, "the worker was never killed"
    starts = [r for r in _records(out) if r["kind"] == "worker" and r["rank"] == 1]
    assert len(starts) >= 2 and starts[-1]["pid"] != killed[0], "rank 1 was not restarted"
    _assert_every_step_once_but_the_replayed(_train_steps(out), total)
    assert summary["last_loss"] < summary["first_loss"]
    assert (Path(summary["final_model"]) / "model.safetensors").is_file()


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (Ray's raylet, GCS and workers) at once."""
    import psutil

    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=30)


def test_rerun_after_the_driver_is_stopped_resumes(
    ray_cluster, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first run is ``rlhf sft`` on an embedded cluster of its own, killed with that cluster as if the machine
    went down; the same config re-run (here, on the session's cluster) resumes from its last checkpoint."""
    import logging

    from rlhf.jobs import sft

    total, stop_after = 14, 6
    out = tmp_path / "run"
    overrides = _overrides(tiny_model_dir, out, total)
    command = [sys.executable, "-m", "rlhf.cli", "sft", "--config", str(EXAMPLES_DIR / "sft.yaml"), *overrides]
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own embedded cluster (with the fast health check of conftest)
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(out, stop_after)
    finally:
        _kill_tree(first.pid)  # the driver with its embedded cluster, as if the machine went down
        first.wait(timeout=60)
    trained_before = max(_train_steps(out))
    assert trained_before < total

    with caplog.at_level(logging.INFO, logger="rlhf.jobs.runner"):
        summary = sft.run(configtree.load(SFTConfig, EXAMPLES_DIR / "sft.yaml", overrides))
    assert "resuming sft from its checkpoint at step" in caplog.text
    assert summary["steps"] < total  # only what the first run had not checkpointed
    _assert_every_step_once_but_the_replayed(_train_steps(out), total)


def test_finished_run_and_resume_never_are_refused(ray_cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    from rlhf.jobs import sft

    out = tmp_path / "run"
    overrides = _overrides(tiny_model_dir, out, SAVE_EVERY)
    sft.run(configtree.load(SFTConfig, EXAMPLES_DIR / "sft.yaml", overrides))
    with pytest.raises(JobError, match=r"already holds a run trained for 4 steps of 4; raise train.max_steps"):
        sft.run(configtree.load(SFTConfig, EXAMPLES_DIR / "sft.yaml", overrides))
    with pytest.raises(JobError, match=r"already has a checkpoint at step 4 .* train.resume=never"):
        sft.run(configtree.load(SFTConfig, EXAMPLES_DIR / "sft.yaml", [*overrides, "train.resume=never"]))
    # asking for more steps continues from the checkpoint: steps 5..8 are added, 1..4 not redone
    summary = sft.run(
        configtree.load(SFTConfig, EXAMPLES_DIR / "sft.yaml", [*overrides[:2], "train.max_steps=8", *overrides[3:]])
    )
    assert _train_steps(out) == list(range(1, 9))
    assert summary["steps"] == 4
