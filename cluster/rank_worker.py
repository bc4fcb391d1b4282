"""The base class of the role workers of an actor group (:mod:`cluster.groups`): one rank of its process group.

:class:`~cluster.groups.ActorGroup` creates the actors, finds rank 0's address and a free
port with :meth:`RankWorker.node_ip_and_free_port`, then has every rank join the group's
default ``torch.distributed`` process group with :meth:`RankWorker.setup_distributed`.
"""

from __future__ import annotations

import os


class RankWorker:
    """Base class of the role workers: one rank of its group's ``torch.distributed`` process group.

    Subclasses add the role's methods (build the engine, compute log-probs, train a step)
    and keep them thin: the math lives in ``rlhf.algos``. The process group exists only
    after :meth:`setup_distributed`, which :class:`ActorGroup` calls right after creating
    the actors, so build models and engines in a method, not in ``__init__``.
    """

    rank: int = 0
    world_size: int = 1

    def node_ip_and_free_port(self) -> tuple[str, int]:
        """This node's IP address and a TCP port free on it (for rank 0's rendezvous)."""
        import ray

        from cluster.connect import free_port

        return ray.util.get_node_ip_address(), free_port("")

    def setup_distributed(
        self,
        master_addr: str,
        master_port: int,
        rank: int,
        world_size: int,
        timeout_s: float,
        local_rank: int = 0,
        local_world_size: int = 1,
    ) -> None:
        """Join the group's default process group as ``rank`` of ``world_size`` (all ranks call it together).

        ``local_rank`` is this rank's index among the group's ranks on its node. An actor
        given GPUs by Ray sees only those (``CUDA_VISIBLE_DEVICES``), so its device is 0.
        """
        import ray

        from cluster.process_group import init_process_group

        gpu_ids = ray.get_gpu_ids()
        if gpu_ids:
            # Ray restricts CUDA_VISIBLE_DEVICES to this actor's GPUs unless told not to
            noset = os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES")
            device_rank = int(gpu_ids[0]) if noset else 0
        else:
            device_rank = local_rank
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(device_rank),
            LOCAL_WORLD_SIZE=str(local_world_size),
        )
        init_process_group(timeout_s)
        self.rank, self.world_size = rank, world_size

    def pid(self) -> int:
        """This actor's process id."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this actor runs on (several nodes may share one IP address)."""
        import ray

        return ray.get_runtime_context().get_node_id()
