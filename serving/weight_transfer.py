"""New policy weights pushed from the trainer's memory into every rollout replica, through vLLM's weight-transfer API.

The file path (:meth:`serving.rollout.RolloutClient.sync_weights`) writes safetensors and
makes each replica reload them. This path sends the tensors instead, with vLLM's
weight-transfer API: on GPUs over NCCL (vLLM's ``"nccl"`` backend), on CPUs over gloo
(:mod:`serving.gloo_transfer`, registered as ``"gloo"``). The replicas must be deployed
with the backend in their engine arguments (``serving.deploy.deploy(...,
weight_transfer=True)``); the trainer's rank 0 then opens one process group with every
worker of every replica and, after each update, broadcasts the weights into it.

:class:`ReplicaWeightSync` is the control plane vLLM's trainer engines drive (its
``VLLMWeightSyncClient`` protocol), mapped onto the Serve replicas: each call is a
``collective_rpc`` on every replica with one deadline, and a replica that fails or does not
answer is named. Around the transfer it pauses the replicas (requests in flight finish
first; their KV and prefix caches are dropped, so nothing computed with the old weights is
reused) and resumes them after it. It is picklable, so the
driver hands it to the trainer's actors. :func:`open_trainer` is called on every rank of
the trainer with the same client.

Each replica's workers take consecutive ranks after the trainer (rank 0): replica ``i``'s
start at ``1 + i * workers_per_replica``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Any

from serving.replicas import ReplicaSet, RolloutError

log = logging.getLogger(__name__)

NOT_CONFIGURED = "Weight transfer not configured"  # vLLM's message from a replica deployed without a backend


def register() -> None:
    """Register the gloo backend with vLLM's weight-transfer factories (a ``vllm.general_plugins`` entry point).

    vLLM loads its general plugins in every one of its processes, some more than once;
    a second registration is a no-op.
    """
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, name in (
        (WeightTransferEngineFactory, "GlooWeightTransferEngine"),
        (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine"),
    ):
        with contextlib.suppress(ValueError):  # registered in this process already
            factory.register_engine("gloo", "serving.gloo_transfer", name)


@dataclass(frozen=True)
class ReplicaWeightSync:
    """vLLM's weight-sync control plane (``VLLMWeightSyncClient``) over the replicas of a Serve deployment."""

    replicas: ReplicaSet
    workers_per_replica: int = 1

    @property
    def num_workers(self) -> int:
        """The inference workers that join the transfer group (every worker of every replica)."""
        return len(self.replicas.replicas) * self.workers_per_replica

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """Have every replica's workers join the trainer's group, each replica at its own rank offset."""
        first = int(init_info.get("rank_offset", 1))
        per_replica = [
            {"init_info": {**init_info, "rank_offset": first + i * self.workers_per_replica}}
            for i in range(len(self.replicas.replicas))
        ]
        try:
            self.replicas.rpc_each("init_weight_transfer_engine", per_replica)
        except RolloutError as exc:
            if NOT_CONFIGURED in str(exc):
                raise RolloutError(
                    f"{exc}. The application was deployed without a weight-transfer backend (a running one is "
                    "reused as it is): redeploy it from rlhf ppo, or set rollout.weight_sync=files"
                ) from None
            raise

    def start_weight_update(self) -> None:
        """Pause every replica (in-flight requests finish, caches dropped), then start the update."""
        self.replicas.call_each("pause", {"mode": "wait", "clear_cache": True})
        try:
            self.replicas.rpc_each("start_weight_update")
        except BaseException:
            self.replicas.resume_quietly()
            raise

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Every worker receives the round's weights (returns when they are loaded)."""
        self.replicas.rpc_each("update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        """Finish the update on every replica and resume them (also when finishing fails)."""
        try:
            self.replicas.rpc_each("finish_weight_update")
        finally:
            self.replicas.resume(self.replicas.deadline())

    def shutdown_weight_transfer_engine(self) -> None:
        """Every replica leaves the trainer's group."""
        self.replicas.rpc_each("shutdown_weight_transfer_engine")


def open_trainer(sync: ReplicaWeightSync, source: Any, rank: int, backend_name: str, timeout_s: float) -> Any:
    """This trainer rank's side of the transfer: a vLLM ``TrainerWeightTransferEngine``, ready to ``send_weights``.

    Call it on every rank of the trainer together with the same ``sync``; rank 0 opens the
    group with the replicas' workers (``source`` yields the full parameters, gathering
    them when they are sharded), the others only take part in gathering.
    """
    import ray
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    register()
    address = ray.util.get_node_ip_address()
    world_size = 1 + sync.num_workers
    if backend_name == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        from cluster.connect import free_port

        info: Any = NCCLTrainerInitInfo(
            master_address=address, master_port=free_port("") if rank == 0 else 0, world_size=world_size, rank=rank
        )
    elif backend_name == "gloo":
        from serving.gloo_transfer import GlooTrainerInitInfo

        listen = None
        port = 0
        if rank == 0:
            listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listen.bind((address, 0))
            listen.listen()
            port = listen.getsockname()[1]
        info = GlooTrainerInitInfo(address, port, world_size, timeout_s, rank=rank, listen_socket=listen)
    else:
        raise ValueError(f"unknown weight-transfer backend {backend_name!r} (nccl or gloo)")
    return WeightTransferTrainerFactory.trainer_init(info, client=sync, source=source)
