"""Driver side of a training job: validate, connect, run a Ray Train ``TorchTrainer``, report.

The driver tokenizes the data once (so bad data is refused before any worker starts)
and puts the examples in the object store; each worker takes its shard. Metrics come
back through a small actor and land in ``<output_dir>/metrics.jsonl``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster import configtree
from cluster.errors import UserError
from rlhf.jobs.rundir import RunDirectoryInUse, lock_run_directory, scrub, unlock_run_directory, write_atomic
from rlhf.jobs.storage import RunStorage, redact

log = logging.getLogger(__name__)


class JobError(UserError, RuntimeError):
    """A job that could not start or did not finish; the message says why."""


def prepare_output_dir(output_dir: str) -> RunStorage:
    """Create ``output_dir`` (a path or a storage URI), check it is writable and take its run lock, before anything
    is launched.

    The lock (:func:`rlhf.jobs.rundir.lock_run_directory`; of the local staging directory for a
    URI) is this process's until :func:`release_output_dir` or its end; a directory another run
    holds is refused naming that run.
    """
    storage = RunStorage(output_dir)
    try:
        storage.check_writable()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[-1]
        raise JobError(f"train.output_dir {redact(output_dir)!r} is not writable: {reason}") from None
    try:
        lock_run_directory(storage.staging)
    except RunDirectoryInUse as exc:
        raise JobError(f"train.output_dir: {exc}") from None
    return storage


def release_output_dir(storage: RunStorage) -> None:
    """Release the run lock :func:`prepare_output_dir` took."""
    unlock_run_directory(storage.staging)


def write_config(config: Any, output_dir: Path) -> None:
    """Save the resolved config tree as ``config.yaml`` in the run directory, whole, with credentials masked.

    URLs keep everything but their user/password and secret query values (``REDACTED``,
    :func:`rlhf.jobs.rundir.scrub`): the file records the run; nothing reads it back.
    """
    import yaml

    write_atomic(output_dir / "config.yaml", yaml.safe_dump(scrub(configtree.to_dict(config)), sort_keys=False))


def run_training(
    worker_fn: Callable[[dict[str, Any]], None],
    config: Any,
    storage: RunStorage,
    payload: dict[str, Any],
    name: str,
    total_steps: int | None,
) -> list[dict[str, Any]]:
    """Run ``worker_fn`` on ``config.cluster.num_workers`` Ray Train workers; return the metric records.

    The caller has connected to Ray and checked the output location (:func:`prepare_output_dir`); its run
    lock is released when this returns or raises.
    ``payload`` holds object refs (the tokenized data) each worker reads; the config
    travels as plain data and is rebuilt, typed, on every worker.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rlhf.jobs.progress import MetricsSink, ProgressMonitor

    output_dir = storage.staging
    try:
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
            scaling_config=ScalingConfig(
                num_workers=cluster.num_workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage.child("ray"),
                failure_config=FailureConfig(max_failures=config.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            ),
        )
        _prepare_metrics(storage, output_dir, name)
        try:
            with ProgressMonitor(sink, output_dir, total_steps, name) as monitor:
                try:
                    trainer.fit()
                except Exception as exc:
                    raise JobError(f"{name} failed: {_root_cause(exc)}") from exc
        finally:
            _upload_artefacts(storage, output_dir)
    finally:
        release_output_dir(storage)
    return monitor.records


def _prepare_metrics(storage: RunStorage, output_dir: Path, name: str) -> None:
    """Delete a fresh run's old ``metrics.jsonl``, or download the remote one a resumed run appends to."""
    metrics_path = output_dir / "metrics.jsonl"
    if storage.latest_checkpoint_step(name) is None:  # a fresh run; a resumed one appends
        metrics_path.unlink(missing_ok=True)
    elif storage.remote:
        storage.download(metrics_path, "metrics.jsonl")


def _upload_artefacts(storage: RunStorage, output_dir: Path) -> None:
    """Upload the run's config, metrics, curves and TensorBoard logs from ``output_dir`` when the storage is remote."""
    if storage.remote:
        for artefact in ("config.yaml", "metrics.jsonl", "curves.png", "tensorboard"):
            if (output_dir / artefact).exists():
                storage.upload(output_dir / artefact, artefact)


def check_resume(config: Any, name: str, total_steps: int) -> int | None:
    """Apply ``train.resume`` to an output_dir that already has checkpoints; return the step resumed from.

    Refuses (JobError) with ``resume=never``, and when the checkpoint already reached
    ``total_steps``, so a re-run never silently restarts from zero or trains zero steps.
    """
    storage = RunStorage(config.train.output_dir)
    output_dir = str(storage)
    step = storage.latest_checkpoint_step(name)
    if step is None:
        return None
    where = redact(storage.child("ray", name))
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
    while (cause := seen.__cause__ or getattr(seen, "cause", None)) is not None:
        seen = cause
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"
