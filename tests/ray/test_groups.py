"""Role actor groups on the embedded Ray cluster: process groups, ZeRO-3 training, colocation, failures.

Every failure mode must surface as a GroupError naming role, rank and method within the
call's timeout (plus a little scheduling slack on this 2-core machine), never as a hang.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster.group_errors import GroupError
from cluster.groups import ActorGroup
from cluster.placement import Placement
from cluster.rank_worker import RankWorker

# a call's deadline is exact; what the slack covers is the driver noticing it on a busy machine
SLACK_S = 3.0


class ProbeWorker(RankWorker):
    """Small methods that exercise the group's process group and its failure paths."""

    def all_reduce(self, value: float) -> float:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(value)])
        dist.all_reduce(tensor)
        return tensor.item()

    def process_group(self) -> dict:
        import torch.distributed as dist

        return {
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "port": os.environ["MASTER_PORT"],
        }

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def fail_if(self, should_fail: bool) -> int:
        if should_fail:
            raise ValueError(f"rank {self.rank} refuses this shard\nsecond line of detail")
        return self.rank


class BrokenWorker(RankWorker):
    def __init__(self) -> None:
        raise RuntimeError("no model here\nsecond line of detail")


class TinyPolicyWorker(RankWorker):
    """A trainable policy rank: the tiny model in a ZeRO-3 TrainingEngine."""

    def build(self, model_dir: str) -> int:
        from rlhf.engine import EngineConfig, TrainingEngine
        from rlhf.models.config import ModelConfig
        from rlhf.models.loading import load_causal_lm

        model = load_causal_lm(ModelConfig(name_or_path=model_dir))
        config = EngineConfig(
            zero_stage=3, precision="fp32", micro_batch_size=2, learning_rate=1e-3, lr_scheduler="constant"
        )
        self.engine = TrainingEngine(model, config, total_steps=1)
        return sum(p.ds_tensor.numel() for p in self.engine.module.parameters())  # this rank's partition

    def train_on(self, input_ids: list[list[int]]) -> dict:
        """One optimizer step on the same batch on every rank; losses before and after, and the weight change."""
        import deepspeed
        import torch

        ids = torch.tensor(input_ids)
        weight = self.engine.module.model.embed_tokens.weight
        with deepspeed.zero.GatheredParameters([weight]):
            before = weight.detach().clone()
        self.engine.train()
        loss = self.engine(input_ids=ids, labels=ids).loss
        self.engine.backward(loss / self.world_size)  # every rank holds the whole batch: its share is 1/world
        stats = self.engine.step()
        with torch.no_grad():
            loss_after = self.engine(input_ids=ids, labels=ids).loss
        with deepspeed.zero.GatheredParameters([weight]):
            change = (weight.detach() - before).abs().max().item()
        return {"loss": loss.item(), "loss_after": loss_after.item(), "weight_change": change, **(stats or {})}


def _free_cpus_per_bundle(placement: Placement) -> list[float]:
    """Unused CPUs of each bundle, from Ray's per-bundle resources (CPU_group_<index>_<placement group id>)."""
    import ray

    available = ray.available_resources()
    return [available.get(f"CPU_group_{i}_{placement.group.id.hex()}", 0.0) for i in range(placement.num_bundles)]


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Ray's resource view lags the scheduler by a moment."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def probes(ray_cluster) -> Iterator[ActorGroup]:
    group = ActorGroup("probe", ProbeWorker, num_actors=2, num_cpus_per_actor=0.5, setup_timeout_s=120)
    yield group
    group.kill()


def test_two_ranks_all_reduce_in_their_own_process_group(probes: ActorGroup) -> None:
    assert probes.call(ProbeWorker.all_reduce, 1.5, timeout_s=60) == [3.0, 3.0]
    assert probes.call_sharded(ProbeWorker.all_reduce, [1.0, 2.0], timeout_s=60) == [3.0, 3.0]
    groups = probes.call(ProbeWorker.process_group, timeout_s=60)
    assert [(g["rank"], g["world_size"], g["backend"]) for g in groups] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert len(set(probes.pids)) == 2
    assert probes.call(ProbeWorker.pid, timeout_s=60) == probes.pids


def test_zero3_policy_group_with_two_ranks_trains(ray_cluster, tiny_model_dir: Path) -> None:
    with ActorGroup("policy", TinyPolicyWorker, num_actors=2, num_cpus_per_actor=1, setup_timeout_s=120) as policy:
        partitions = policy.call(TinyPolicyWorker.build, str(tiny_model_dir), timeout_s=240)
        batch = [[(7 * row + 3 * col) % 400 + 2 for col in range(16)] for row in range(2)]
        first, second = policy.call(TinyPolicyWorker.train_on, batch, timeout_s=120)
    # ZeRO-3 split the weights: each rank holds about half of them
    assert abs(partitions[0] - partitions[1]) <= 0.01 * partitions[0]
    # both ranks see the same partitioned model, take the same step, and it lowers the loss
    assert first["loss"] == pytest.approx(second["loss"], abs=1e-6)
    assert first["loss_after"] == pytest.approx(second["loss_after"], abs=1e-6)
    assert first["loss_after"] < first["loss"] - 1e-3
    assert first["weight_change"] > 1e-5
    assert first["weight_change"] == pytest.approx(second["weight_change"])


def test_colocated_groups_share_bundles_and_keep_separate_process_groups(ray_cluster) -> None:
    placement = Placement.create(num_bundles=2, cpus_per_bundle=1, timeout_s=60)
    groups: list[ActorGroup] = []
    try:
        # each group takes half of each bundle, rank i on bundle i
        policy = ActorGroup("policy", ProbeWorker, placement, num_cpus_per_actor=0.5, setup_timeout_s=120)
        groups.append(policy)
        _wait_for(lambda: _free_cpus_per_bundle(placement) == [0.5, 0.5])
        reference = ActorGroup("reference", ProbeWorker, placement, num_cpus_per_actor=0.5, setup_timeout_s=120)
        groups.append(reference)
        _wait_for(lambda: _free_cpus_per_bundle(placement) == [0.0, 0.0])
        assert policy.bundle_indices == reference.bundle_indices == [0, 1]
        # both collectives in flight at once: each sums only its own group's values
        policy_sum = policy.submit_sharded(ProbeWorker.all_reduce, [1.0, 2.0], timeout_s=60)
        reference_sum = reference.submit_sharded(ProbeWorker.all_reduce, [10.0, 20.0], timeout_s=60)
        assert policy_sum.result() == [3.0, 3.0]
        assert reference_sum.result() == [30.0, 30.0]
        ports = {g.call(ProbeWorker.process_group, timeout_s=60)[0]["port"] for g in groups}
        assert len(ports) == 2
    finally:
        for group in groups:
            group.kill()
        placement.remove()


def test_a_call_past_its_timeout_raises_naming_role_rank_and_method(ray_cluster) -> None:
    group = ActorGroup("value", ProbeWorker, num_actors=2, num_cpus_per_actor=0.5, setup_timeout_s=120)
    try:
        start = time.monotonic()
        with pytest.raises(GroupError) as caught:
            group.call_sharded(ProbeWorker.sleep, [0.0, 60.0], timeout_s=2)
        elapsed = time.monotonic() - start
        assert 2 <= elapsed < 2 + SLACK_S
        error = caught.value
        assert (error.role, error.method, error.ranks, error.kind) == ("value", "sleep", [1], "timeout")
        assert str(error).startswith("value rank 1 (pid ")
        assert "sleep did not finish within 2 s" in str(error)
        # rank 1 is still sleeping: the group refuses calls at once rather than queueing behind it
        with pytest.raises(GroupError, match="unusable"):
            group.call(ProbeWorker.pid, timeout_s=60)
    finally:
        group.kill()


def test_an_actor_killed_by_pid_fails_the_next_call_naming_the_dead_rank(ray_cluster) -> None:
    group = ActorGroup("reward", ProbeWorker, num_actors=2, num_cpus_per_actor=0.5, setup_timeout_s=120)
    try:
        pids = group.call(ProbeWorker.pid, timeout_s=60)
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        # a collective: the live rank 0 would wait for rank 1 until the collective timeout
        with pytest.raises(GroupError) as caught:
            group.call(ProbeWorker.all_reduce, 1.0, timeout_s=30)
        assert time.monotonic() - start < 30
        error = caught.value
        assert (error.role, error.method, error.ranks, error.kind) == ("reward", "all_reduce", [1], "died")
        assert str(error).startswith(f"reward rank 1 (pid {pids[1]} on ")
        assert "actor died during all_reduce" in str(error)
        assert "Some common causes" not in str(error)
    finally:
        group.kill()


def test_an_exception_in_a_method_surfaces_with_its_message(probes: ActorGroup) -> None:
    with pytest.raises(GroupError) as caught:
        probes.call_sharded(ProbeWorker.fail_if, [False, True], timeout_s=60)
    error = caught.value
    assert (error.role, error.method, error.ranks, error.kind) == ("probe", "fail_if", [1], "error")
    assert error.cause == "ValueError: rank 1 refuses this shard"
    assert str(error).endswith("fail_if raised ValueError: rank 1 refuses this shard")
    assert "Traceback" not in str(error) and "second line" not in str(error)
    # the exception itself reaches the caller, whole, so its type can be told apart from a broken actor's
    assert isinstance(error.exception, ValueError)
    assert str(error.exception) == "rank 1 refuses this shard\nsecond line of detail"
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.cause, str(copy.exception)) == (str(error), error.cause, str(error.exception))
    # a method that raised leaves the actors healthy
    assert probes.call(ProbeWorker.fail_if, False, timeout_s=60) == [0, 1]


def test_an_exception_in_a_constructor_fails_group_creation(ray_cluster) -> None:
    with pytest.raises(GroupError) as caught:
        ActorGroup("reward", BrokenWorker, num_actors=2, num_cpus_per_actor=0.5, setup_timeout_s=120)
    assert caught.value.kind == "died"
    assert "constructor raised RuntimeError: no model here" in str(caught.value)
    assert re.match(r"reward rank [01] \(pid unknown\): actor died during ", str(caught.value))
    assert "second line" not in str(caught.value)


def test_placement_that_cannot_be_granted_fails_in_time(ray_cluster) -> None:
    start = time.monotonic()
    with pytest.raises(GroupError, match=r"placement of 2 x \{'CPU': 64\.0\} \(PACK\) not granted within 1 s"):
        Placement.create(num_bundles=2, cpus_per_bundle=64.0, timeout_s=1)
    assert time.monotonic() - start < 1 + SLACK_S


def test_calls_are_checked_before_anything_runs(probes: ActorGroup) -> None:
    with pytest.raises(TypeError, match=r"call a worker method by reference \(ProbeWorker.train_step\), not by name"):
        probes.call("train_step", timeout_s=60)  # type: ignore[arg-type]
    with pytest.raises(AttributeError, match="'TinyPolicyWorker.build' is not a public method of ProbeWorker"):
        probes.call(TinyPolicyWorker.build, timeout_s=60)
    with pytest.raises(ValueError, match="3 shards for 2 ranks"):
        probes.call_sharded(ProbeWorker.all_reduce, [1.0, 2.0, 3.0], timeout_s=60)
    placement = Placement.create(num_bundles=1, cpus_per_bundle=1, timeout_s=60)
    try:
        with pytest.raises(ValueError, match=r"2 actors x 1 CPU do not fit bundle 0"):
            ActorGroup("policy", ProbeWorker, placement, num_actors=2, num_cpus_per_actor=1)
    finally:
        placement.remove()


def test_a_group_that_finds_its_bundles_full_fails_in_time(probes: ActorGroup) -> None:
    start = time.monotonic()
    with pytest.raises(GroupError, match=r"did not finish within 2 s; the actors did not start") as caught:
        ActorGroup("value", ProbeWorker, probes.placement, num_cpus_per_actor=0.5, setup_timeout_s=2)
    assert time.monotonic() - start < 2 + SLACK_S
    assert caught.value.ranks == [0, 1]
    assert probes.call(ProbeWorker.pid, timeout_s=60) == probes.pids  # the owner of the bundles is untouched


def reward_that_logs_its_rank(response: str, answer: str, log: str) -> float:
    """A function reward that takes a while per row and notes which process scored the row, and when."""
    started = time.time()
    time.sleep(0.4)
    with open(log, "a") as sink:
        sink.write(f"{os.getpid()} {response} {started} {time.time()}\n")
    return float(response == answer)


def test_a_function_reward_scores_its_batch_on_every_reward_rank_at_once(ray_cluster, tmp_path: Path) -> None:
    """``roles.reward_workers=2``: each reward rank (a Ray actor, off the driver) scores its half of the batch with
    the rows' own columns, the two halves at the same time, and the scores come back in row order."""
    from rlhf.rl.roles import RewardGroup
    from rlhf.rl.workers import RewardWorker

    spec = f"{__name__}:reward_that_logs_its_rank"
    log = tmp_path / "scored.txt"
    responses = [str(row) for row in range(8)]
    answers = [str(row) if row % 3 else "no" for row in range(8)]
    group = ActorGroup("reward", RewardWorker, num_actors=2, num_cpus_per_actor=0.5, setup_timeout_s=120)
    try:
        reward = RewardGroup(group, spec)
        reward.build(spec).result()
        columns = {"answer": answers, "log": [str(log)] * 8}
        scores, components = reward.score(["q"] * 8, responses, columns, timeout_s=60).result()
    finally:
        group.kill()
    assert scores.tolist() == [float(row % 3 != 0) for row in range(8)] and components == {}
    rows = [line.split() for line in log.read_text().splitlines()]
    by_pid: dict[str, list[tuple[int, float, float]]] = {}
    for pid, response, started, ended in rows:
        by_pid.setdefault(pid, []).append((int(response), float(started), float(ended)))
    assert sorted(by_pid) == sorted(str(pid) for pid in group.pids)  # two reward actors, none the driver
    halves = sorted(sorted(row for row, _, _ in scored) for scored in by_pid.values())
    assert halves == [[0, 1, 2, 3], [4, 5, 6, 7]]
    (first_start, first_end), (second_start, second_end) = (
        (min(s for _, s, _ in scored), max(e for _, _, e in scored)) for scored in by_pid.values()
    )
    assert first_start < second_end and second_start < first_end, "the two halves were scored one after the other"
