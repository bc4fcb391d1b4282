"""The data-parallel jobs without Ray: every rank runs :func:`rlhf.jobs.loop.train_rank`, the loop each Ray Train
worker of ``rlhf sft``/``rm``/``dpo`` runs, as a process of its own on gloo.

What Ray Train adds around that loop (placement, the metrics sink, checkpoints, restarts, storage) is tested on a
real cluster in tests/ray; what only the loop decides (the objectives, ZeRO stages, accumulation, adapters,
export) is tested here, without the ~25 s a Ray Train job spends starting its actors.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

JOBS = {"sft": ("SFTConfig", "sft.yaml"), "rm": ("RMConfig", "rm.yaml"), "dpo": ("DPOConfig", "dpo.yaml")}

Run = tuple[str, list[str]]
"""A job name and its config overrides (``train.output_dir`` among them)."""


def job_config(job: str, overrides: list[str], world_size: int = 1) -> Any:
    """The typed config of ``job`` from its example file, ``overrides`` and ``cluster.num_workers=world_size``."""
    from cluster import configtree
    from rlhf import config as configs
    from rlhf.jobs.registry import EXAMPLES_DIR

    name, example = JOBS[job]
    overrides = [*overrides, f"cluster.num_workers={world_size}"]
    return configtree.load(getattr(configs, name), EXAMPLES_DIR / example, overrides)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(job: str, overrides: list[str], rank: int, world_size: int) -> list[dict[str, Any]]:
    """One job on this rank, as its Ray Train worker would run it (the data tokenized here, as the driver does)."""
    from rlhf.jobs.loop import RankIO, prepare_data, total_steps, train_rank
    from rlhf.models.loading import load_tokenizer

    config = job_config(job, overrides, world_size)
    make_objective = importlib.import_module(f"rlhf.jobs.{job}").make_objective
    tokenizer = load_tokenizer(config.model)
    train, evaluation = prepare_data(config, tokenizer, make_objective(config, tokenizer).data_kind)
    records: list[dict[str, Any]] = []
    io = RankIO(
        log=records.append if rank == 0 else lambda record: None,
        flush=lambda: True,
        restore=lambda engine: 0,
        save=lambda engine, step, is_main: None,  # nothing resumes here: checkpoints are tests/ray's
    )
    train_rank(config, make_objective, train, evaluation, total_steps(config, len(train)), io)
    return records


def _rank_main(rank: int, world_size: int, port: int, runs: list[Run], out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import torch.distributed as dist

    dist.init_process_group("gloo")  # as Ray Train does before its workers' loop starts
    results = [_run(job, overrides, rank, world_size) for job, overrides in runs]
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    # leave without interpreter shutdown (see tests/distributed/test_engine.py: a gloo thread may abort it)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(world_size: int, runs: list[Run], out: Path) -> list[list[dict[str, Any]]]:
    """Run ``runs`` one after the other on ``world_size`` ranks; each run's metric records (rank 0's), in order."""
    mp.start_processes(
        _rank_main,
        args=(world_size, _free_port(), runs, str(out)),
        nprocs=world_size,
        start_method="spawn",
        join=True,
    )
    return json.loads(out.read_text())
