"""The weight-transfer control plane: backends by device, rank offsets per replica, and the NCCL trainer's handshake.

The gloo path runs end to end in ``tests/rl`` (and over real gloo in ``test_gloo_transfer``). NCCL needs
GPUs: here its communicator is replaced by a stand-in, so what is checked is everything around it (the
engine chosen, the world size, the ranks the replicas are told), not the transfer itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from serving.backends import backend
from serving.config import ServeConfig
from serving.replicas import Replica, ReplicaSet, RolloutError
from serving.weight_transfer import ReplicaWeightSync, open_trainer


def test_replicas_get_the_transfer_backend_of_their_device() -> None:
    from serving.app import llm_config

    config = ServeConfig(model="tiny", max_model_len=256, max_tokens_limit=128)
    assert llm_config(config, gpu=True, weight_transfer=True).engine_kwargs["weight_transfer_config"] == {
        "backend": "nccl"
    }
    assert llm_config(config, gpu=False, weight_transfer=True).engine_kwargs["weight_transfer_config"] == {
        "backend": "gloo"
    }
    assert "weight_transfer_config" not in llm_config(config, gpu=False).engine_kwargs
    assert (backend(True), backend(False)) == ("nccl", "gloo")


def test_the_gloo_backend_is_registered_with_vllm_by_its_plugin_entry_point() -> None:
    from importlib.metadata import entry_points

    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.value == "serving.weight_transfer:register"]
    plugin.load()()
    plugin.load()()  # vLLM loads plugins more than once per process
    assert WeightTransferEngineFactory._registry["gloo"]().__name__ == "GlooWeightTransferEngine"
    assert WeightTransferTrainerFactory._registry["gloo"]().__name__ == "GlooTrainerWeightTransferEngine"


@dataclass(frozen=True)
class _RecordedReplicas(ReplicaSet):
    """The replica fan-out with the Ray calls recorded instead of sent."""

    sent: list = field(default_factory=list, compare=False)
    fail_with: str | None = None

    def rpc_each(self, method: str, kwargs_per_replica: list[dict] | dict | None = None) -> None:
        self.sent.append((method, kwargs_per_replica))
        if self.fail_with:
            raise RolloutError(self.fail_with)

    def call_each(self, method: str, kwargs: dict, deadline: float | None = None, timeout_s: float | None = None):
        self.sent.append((method, kwargs))
        return {}

    def resume(self, deadline: float) -> None:
        self.sent.append(("resume", {}))


def _replicas(count: int, **extra: Any) -> _RecordedReplicas:
    replicas = tuple(Replica(f"r{i}", f"actor{i}") for i in range(count))
    return _RecordedReplicas("app", "deployment d of application 'app'", replicas, 30.0, **extra)


def test_each_replica_joins_at_its_own_rank_offset() -> None:
    replicas = _replicas(3)
    sync = ReplicaWeightSync(replicas, workers_per_replica=2)
    assert sync.num_workers == 6
    sync.init_weight_transfer_engine({"master_address": "10.0.0.1", "master_port": 1234, "rank_offset": 1})
    ((method, per_replica),) = replicas.sent
    assert method == "init_weight_transfer_engine"
    assert [kwargs["init_info"]["rank_offset"] for kwargs in per_replica] == [1, 3, 5]
    assert all(kwargs["init_info"]["master_port"] == 1234 for kwargs in per_replica)


def test_an_update_pauses_the_replicas_first_and_resumes_them_last() -> None:
    replicas = _replicas(2)
    sync = ReplicaWeightSync(replicas)
    sync.start_weight_update()
    sync.update_weights({"names": ["w"]})
    sync.finish_weight_update()
    assert [method for method, _ in replicas.sent] == [
        "pause",
        "start_weight_update",
        "update_weights",
        "finish_weight_update",
        "resume",
    ]


def test_a_replica_deployed_without_the_backend_is_named_with_the_fix() -> None:
    message = "init_weight_transfer_engine failed on 1 of 1 replicas: Weight transfer not configured. Please set"
    sync = ReplicaWeightSync(_replicas(1, fail_with=message))
    with pytest.raises(RolloutError, match="deployed without a weight-transfer backend.*rollout.weight_sync=files"):
        sync.init_weight_transfer_engine({"rank_offset": 1})


class _Client:
    num_workers = 2

    def __init__(self) -> None:
        self.init_infos: list[dict] = []

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.init_infos.append(init_info)

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: Any) -> None: ...

    def finish_weight_update(self, weight_version: str | None = None) -> None: ...


def test_on_gpus_the_trainer_opens_vllms_nccl_engine_with_every_replica_worker(monkeypatch) -> None:
    """NCCL itself is stood in for: the communicator the trainer would open is recorded instead."""
    import torch
    from vllm.distributed.weight_transfer import nccl_engine
    from vllm.distributed.weight_transfer.base import ModuleSource

    opened = []
    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", lambda info: opened.append(info) or "communicator")
    client = _Client()
    source = ModuleSource(torch.nn.Linear(2, 2))
    engine = open_trainer(client, source, rank=0, backend_name="nccl", timeout_s=30)
    assert isinstance(engine, nccl_engine.NCCLTrainerWeightTransferEngine)
    assert engine.model_update_group == "communicator" and engine.is_sender
    (info,) = opened
    assert info.world_size == 3 and info.master_port > 0  # the trainer and the replicas' two workers
    (worker_info,) = client.init_infos
    assert worker_info["rank_offset"] == 1 and worker_info["world_size"] == 3
    assert worker_info["master_port"] == info.master_port

    follower = open_trainer(client, source, rank=1, backend_name="nccl", timeout_s=30)
    assert not follower.is_sender and len(opened) == 1 and len(client.init_infos) == 1  # only rank 0 connects


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown weight-transfer backend 'rdma'"):
        open_trainer(_Client(), None, rank=0, backend_name="rdma", timeout_s=1)
