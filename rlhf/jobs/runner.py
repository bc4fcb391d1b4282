"""Driver side of a training job: validate, connect, run a Ray Train ``TorchTrainer``, report.

The driver tokenizes the data once (so bad data is refused before any worker starts)
and puts the examples in the object store; each worker takes its shard. Metrics come
back through a small actor and land in ``<output_dir>/metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf import configtree

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """A job that could not start or did not finish; the message says why."""


def prepare_output_dir(output_dir: str) -> Path:
    """Create ``output_dir`` and check it is writable, before anything is launched."""
    path = Path(output_dir).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise JobError(f"train.output_dir {output_dir!r} is not writable: {exc.strerror or exc}") from None
    return path


def write_config(config: Any, output_dir: Path) -> None:
    """Save the resolved config tree as ``config.yaml`` in the run directory."""
    import yaml

    (output_dir / "config.yaml").write_text(yaml.safe_dump(configtree.to_dict(config), sort_keys=False))


def run_training(
    worker_fn: Callable[[dict[str, Any]], None],
    config: Any,
    output_dir: Path,
    payload: dict[str, Any],
    name: str,
    total_steps: int | None,
) -> list[dict[str, Any]]:
    """Run ``worker_fn`` on ``config.cluster.num_workers`` Ray Train workers; return the metric records.

    The caller has connected to Ray and checked ``output_dir`` (:func:`prepare_output_dir`).
    ``payload`` holds object refs (the tokenized data) each worker reads; the config
    travels as plain data and is rebuilt, typed, on every worker.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rlhf.jobs.progress import MetricsSink, ProgressMonitor

    write_config(config, output_dir)
    sink = ray.remote(MetricsSink).options(num_cpus=0).remote()
    cluster = config.cluster
    use_gpu = cluster.gpus_per_worker > 0
    resources = {"CPU": cluster.cpus_per_worker} | ({"GPU": cluster.gpus_per_worker} if use_gpu else {})
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={"config": configtree.to_dict(config), "sink": sink, **payload},
        torch_config=TorchConfig(
            backend="nccl" if use_gpu else "gloo", timeout_s=int(config.engine.collective_timeout_s)
        ),
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(output_dir / "ray"),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
        ),
    )
    metrics_path = output_dir / "metrics.jsonl"
    if latest_checkpoint_step(output_dir, name) is None:  # a fresh run; a resumed one appends
        metrics_path.unlink(missing_ok=True)
    with ProgressMonitor(sink, output_dir, total_steps, name) as monitor:
        try:
            trainer.fit()
        except Exception as exc:
            raise JobError(f"{name} failed: {_root_cause(exc)}") from exc
    return monitor.records


def checkpoint_root(output_dir: Path, name: str) -> Path:
    """Where Ray Train keeps the checkpoints of job ``name`` in ``output_dir``."""
    return output_dir / "ray" / name


def latest_checkpoint_step(output_dir: Path, name: str) -> int | None:
    """The optimizer step of the newest checkpoint of job ``name`` in ``output_dir``, or None."""
    steps = []
    for progress in checkpoint_root(output_dir, name).glob("checkpoint_*/progress.json"):
        try:
            steps.append(int(json.loads(progress.read_text())["step"]))
        except (ValueError, KeyError, OSError):
            continue  # a checkpoint being written, or a foreign file
    return max(steps) if steps else None


def check_resume(config: Any, name: str, total_steps: int) -> int | None:
    """Apply ``train.resume`` to an output_dir that already has checkpoints; return the step resumed from.

    Refuses (JobError) with ``resume=never``, and when the checkpoint already reached
    ``total_steps``, so a re-run never silently restarts from zero or trains zero steps.
    """
    output_dir = Path(config.train.output_dir).expanduser().resolve()
    step = latest_checkpoint_step(output_dir, name)
    if step is None:
        return None
    where = checkpoint_root(output_dir, name)
    if config.train.resume == "never":
        raise JobError(
            f"train.output_dir {output_dir} already has a checkpoint at step {step} ({where}) and train.resume=never; "
            "use another output_dir, delete it, or set train.resume=auto to continue"
        )
    if step >= total_steps:
        raise JobError(
            f"train.output_dir {output_dir} already holds a run trained for {step} steps of {total_steps}; "
            "raise train.max_steps to train further, or use another output_dir"
        )
    log.info("resuming %s from its checkpoint at step %d of %d", name, step, total_steps)
    return step


def _root_cause(exc: BaseException) -> str:
    """The innermost error's type and first line, for a message without a library traceback."""
    seen = exc
    while seen.__cause__ is not None or getattr(seen, "cause", None) is not None:
        seen = seen.__cause__ or seen.cause
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"
