"""The default ``torch.distributed`` process group of a process: the one place that creates it.

A Ray Train worker already has one (Ray Train sets it up); a role actor joins its group's
(:meth:`cluster.rank_worker.RankWorker.setup_distributed`); a plain process gets a group of one rank.
"""

from __future__ import annotations

import os
from datetime import timedelta


def init_process_group(timeout_s: float = 600.0) -> None:
    """Join (or, in a lone process, create) the default process group: gloo on CPU, nccl on GPU.

    Ray Train workers already have one; a plain process gets a single-rank group.
    """
    import deepspeed
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        from cluster.connect import free_port

        port = free_port()
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
