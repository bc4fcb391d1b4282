"""Worker-side plumbing shared by the training jobs: rank, seeds, reporting (collectives: cluster.collectives)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkerInfo:
    """This process's place in the data-parallel group."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, which reports metrics and writes outputs."""
        return self.rank == 0


def worker_info() -> WorkerInfo:
    """Rank and world size of the current process (a lone process is rank 0 of 1)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return WorkerInfo(dist.get_rank(), dist.get_world_size())
    return WorkerInfo(0, 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Reporter:
    """Sends metric records from rank 0 to the driver's :class:`~rlhf.jobs.progress.MetricsSink`."""

    def __init__(self, sink: Any, info: WorkerInfo) -> None:
        self.sink = sink
        self.info = info
        self._last: Any = None  # the number of the last record sent, as an ObjectRef

    def announce(self) -> None:
        """Every rank reports its process id and host once per start (restarts announce again)."""
        import os
        import socket

        if self.sink is not None:
            self.sink.put.remote(
                {"kind": "worker", "rank": self.info.rank, "pid": os.getpid(), "host": socket.gethostname()}
            )

    def log(self, record: dict[str, Any]) -> None:
        """Send ``record`` (rank 0 only; other ranks' calls do nothing)."""
        if self.info.is_main and self.sink is not None:
            self._last = self.sink.put.remote(record)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until the driver has written every record sent so far; False if it has not within ``timeout_s``.

        Called before a checkpoint: a run resumed from it then never lacks the metrics of the
        steps before it (the driver may be stopped at any moment).
        """
        import time

        import ray
        from ray.exceptions import GetTimeoutError

        if self._last is None:
            return True
        deadline = time.monotonic() + timeout_s
        try:
            number = ray.get(self._last, timeout=timeout_s)
            while ray.get(self.sink.written.remote(), timeout=max(deadline - time.monotonic(), 0.1)) < number:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
        except GetTimeoutError:
            return False
        return True


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """Move every tensor of ``batch`` to ``device``."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
