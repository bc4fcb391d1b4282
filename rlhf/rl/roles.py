"""The role groups of an RL run, typed: what the driver asks of the policy, reference, value and reward ranks.

Each group wraps a :class:`~cluster.groups.ActorGroup` of one worker class of
:mod:`rlhf.rl.workers` and calls its methods by reference (``PolicyWorker.logprobs``, never a
name string). Its methods hide the sharding over ranks and the gathering of their answers
(:mod:`rlhf.rl.batching`): ``policy.logprobs(batch, t).result()`` is one ``[B, T-1]`` tensor,
``policy.update(experience, ...)`` the step's combined metrics. Calls that run side by side
(the experience passes) return a pending object whose ``result()`` waits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from rlhf.rl.batching import UpdateSchedule, combine, gather, mini_batches, shard
from rlhf.rl.experience import Experience, split_rows
from rlhf.rl.workers import PolicyWorker, ReferenceWorker, RewardWorker, ValueWorker

if TYPE_CHECKING:
    from cluster.groups import ActorGroup, PendingCall
    from cluster.placement import Placement
    from rlhf.algos.objective import PolicyObjective
    from rlhf.engine import EngineConfig
    from rlhf.models.config import ModelConfig
    from rlhf.rl.config import PPOConfig, Role
    from serving.weight_transfer import ReplicaWeightSync

REWARD_GRACE_S = 30.0
"""How much longer than ``reward_timeout_s`` the driver waits for the reward ranks (which enforce that deadline
themselves), so that the reward's own timeout is the one told."""


@dataclass
class PendingRows:
    """A sharded pass in flight; :meth:`result` gathers the ranks' per-row tensors into one ``[B, width]``."""

    call: PendingCall
    width: int

    def result(self) -> torch.Tensor:
        """The rows in order, zero-padded to ``width``."""
        return gather(self.call.result(), self.width)


class _RoleGroup:
    """One role's actor group."""

    worker: ClassVar[type]

    def __init__(self, group: ActorGroup, micro_batch_size: int = 1) -> None:
        if group.worker_cls is not self.worker:
            raise TypeError(f"{type(self).__name__} needs a group of {self.worker.__name__}, got {group.worker_cls}")
        self.group = group
        self.micro_batch_size = micro_batch_size

    @property
    def role(self) -> str:
        """The role's name (``policy``, ...): its checkpoint part's directory, its errors' subject."""
        return self.group.role

    @property
    def world_size(self) -> int:
        """The number of ranks."""
        return self.group.world_size

    def kill(self) -> None:
        """Kill the ranks (at once, even mid-call)."""
        self.group.kill()

    def _pass(self, method: Any, batch: Experience, *args: Any) -> PendingRows:
        shards, _ = shard(batch, self.world_size, self.micro_batch_size)
        return PendingRows(self.group.submit_sharded(method, shards, *args), batch.response_mask.shape[1])


class _TrainableGroup(_RoleGroup):
    """A role with an optimizer: checkpoints and an update over the PPO epochs' mini-batches."""

    worker: ClassVar[type[PolicyWorker] | type[ValueWorker]]
    loss_name: ClassVar[str]

    def save(self, directory: Path, timeout_s: float) -> PendingCall:
        """Start writing every rank's part of a resumable checkpoint into ``directory``."""
        return self.group.submit(self.worker.save_checkpoint, str(directory), timeout_s=timeout_s)

    def restore(self, directory: Path, timeout_s: float) -> PendingCall:
        """Start loading a checkpoint written by :meth:`save`."""
        return self.group.submit(self.worker.load_checkpoint, str(directory), timeout_s=timeout_s)

    def _update(self, experience: Experience, schedule: UpdateSchedule, step: int, *args: Any) -> dict[str, float]:
        shards, denominators = mini_batches(experience, self.world_size, self.micro_batch_size, schedule, step)
        results = self.group.call_sharded(self.worker.train, shards, denominators, *args)
        metrics = combine(results, extensive=(self.loss_name,))
        metrics[self.loss_name] /= len(denominators)  # the mean over the optimizer steps
        return metrics


class PolicyGroup(_TrainableGroup):
    """The trainable policy; rank 0 also sends its weights to the rollout replicas."""

    worker = PolicyWorker
    loss_name = "policy_loss"

    def build(
        self, model: ModelConfig, engine: EngineConfig, optimizer_steps: int, seed: int, disable_dropout: bool
    ) -> PendingCall:
        """Start loading the policy into the training engine on every rank."""
        return self.group.submit(PolicyWorker.build, model, engine, optimizer_steps, seed, disable_dropout)

    def logprobs(self, batch: Experience, temperature: float) -> PendingRows:
        """Start the ``[B, T-1]`` log-probs of ``batch`` under the current weights."""
        return self._pass(PolicyWorker.logprobs, batch, temperature)

    def update(
        self,
        experience: Experience,
        schedule: UpdateSchedule,
        step: int,
        objective: PolicyObjective,
        temperature: float,
    ) -> dict[str, float]:
        """One optimizer step per mini-batch on ``objective``; the step's combined metrics."""
        return self._update(experience, schedule, step, objective, temperature)

    def export(self, directory: Path, timeout_s: float) -> None:
        """Write the full model in Hugging Face format into ``directory`` (rank 0 writes)."""
        self.group.call(PolicyWorker.export, str(directory), timeout_s=timeout_s)

    def open_weight_transfer(self, sync: ReplicaWeightSync, backend: str, timeout_s: float, wait_s: float) -> None:
        """Open the weight transfer to the replicas of ``sync`` over ``backend``."""
        self.group.call(PolicyWorker.open_weight_transfer, sync, backend, timeout_s, timeout_s=wait_s)

    def send_weights(self, wait_s: float) -> None:
        """Push the current weights into every replica of the open transfer."""
        self.group.call(PolicyWorker.send_weights, timeout_s=wait_s)


class ValueGroup(_TrainableGroup):
    """The trainable critic (ppo only)."""

    worker = ValueWorker
    loss_name = "value_loss"

    def build(
        self, model: ModelConfig, engine: EngineConfig, optimizer_steps: int, seed: int, disable_dropout: bool
    ) -> PendingCall:
        """Start loading the value model into the training engine on every rank."""
        return self.group.submit(ValueWorker.build, model, engine, optimizer_steps, seed, disable_dropout)

    def values(self, batch: Experience) -> PendingRows:
        """Start the ``[B, T-1]`` values of ``batch``."""
        return self._pass(ValueWorker.values, batch)

    def update(
        self, experience: Experience, schedule: UpdateSchedule, step: int, clip_range: float | None
    ) -> dict[str, float]:
        """One optimizer step per mini-batch on the clipped value loss; the step's combined metrics."""
        return self._update(experience.keep("values", "returns"), schedule, step, clip_range)


class ReferenceGroup(_RoleGroup):
    """The frozen reference policy."""

    worker = ReferenceWorker

    def build(self, model: ModelConfig) -> PendingCall:
        """Start loading the reference model on every rank."""
        return self.group.submit(ReferenceWorker.build, model)

    def logprobs(self, batch: Experience, temperature: float) -> PendingRows:
        """Start the ``[B, T-1]`` log-probs of ``batch`` under the reference model."""
        return self._pass(ReferenceWorker.logprobs, batch, temperature)


@dataclass
class PendingScores:
    """Scoring in flight; :meth:`result` gives ``(scores [N], components by name)``."""

    call: PendingCall
    count: int
    reward: str
    timeout_s: float

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scores of all ranks in order; a reward that did not answer in time is a
        :class:`~rlhf.rl.rewards.RewardTimeoutError` naming it (its ranks are killed with the run's groups)."""
        from cluster.group_errors import GroupError
        from rlhf.rl.rewards import RewardTimeoutError

        try:
            return gather_scores(self.call.result())
        except GroupError as error:
            if error.kind != "timeout":
                raise
            raise RewardTimeoutError(
                f"the reward {self.reward} did not score {self.count} responses within reward_timeout_s="
                f"{self.timeout_s:g} s (+{REWARD_GRACE_S:g} s of grace); the run stops and the reward's actors are "
                "killed"
            ) from None


def gather_scores(
    parts: list[tuple[list[float], dict[str, list[float]]]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scores of all ranks in order, and each reward component's (empty for a single reward)."""
    scores = torch.tensor([x for part, _ in parts for x in part], dtype=torch.float32)
    names = list(dict.fromkeys(name for _, components in parts for name in components))
    components = {
        name: torch.tensor([x for _, c in parts for x in c.get(name, [])], dtype=torch.float32) for name in names
    }
    return scores, components


class RewardGroup(_RoleGroup):
    """The frozen reward: a reward model, a function, an HTTP endpoint, or a weighted sum of them.

    ``reward`` names it (credentials left out) in a timeout's message.
    """

    worker = RewardWorker

    def __init__(self, group: ActorGroup, reward: str = "") -> None:
        super().__init__(group)
        self.reward = reward

    def build(self, spec: str | list[dict[str, Any]]) -> PendingCall:
        """Start building the reward source of ``spec`` on every rank."""
        return self.group.submit(RewardWorker.build, spec)

    def score(
        self, prompts: list[Any], responses: list[str], columns: dict[str, list[Any]], timeout_s: float
    ) -> PendingScores:
        """Start scoring the responses, a slice of rows per rank, within ``timeout_s``."""
        slices = split_rows(len(responses), self.world_size)
        shards = [(prompts[rows], responses[rows], {k: v[rows] for k, v in columns.items()}) for rows in slices]
        call = self.group.submit_sharded(
            RewardWorker.score_parts, shards, timeout_s, timeout_s=timeout_s + REWARD_GRACE_S
        )
        return PendingScores(call, len(responses), self.reward, timeout_s)


# ---- placing and building the groups of a config ------------------------------------------------


@dataclass
class Roles:
    """The role groups of a run and the placements they sit on."""

    policy: PolicyGroup
    reward: RewardGroup
    reference: ReferenceGroup | None = None
    value: ValueGroup | None = None
    placements: list[Placement] = field(default_factory=list)
    transfer_to: tuple[Any, ...] | None = None
    """The replicas the policy's weight transfer is open to (None: not open)."""

    def trainable(self) -> list[_TrainableGroup]:
        """The groups with an optimizer (saved in checkpoints)."""
        return [self.policy] + ([self.value] if self.value is not None else [])

    def kill(self) -> None:
        """Kill every actor and release the placements."""
        for group in (self.policy, self.reference, self.value, self.reward):
            if group is not None:
                group.kill()
        for placement in self.placements:
            placement.remove()
        self.placements = []


def colocation_sets(colocate: str, roles: list[str]) -> list[list[str]]:
    """Which roles share a placement, e.g. ``policy+reference`` -> ``[[policy, reference], [value], [reward]]``."""
    if colocate == "all":
        sets = [roles]
    else:
        pairs = [] if colocate == "none" else [pair.split("+") for pair in colocate.split(",")]
        sets = [[role for role in pair if role in roles] for pair in pairs]
        paired = {role for pair in pairs for role in pair}
        sets += [[role] for role in roles if role not in paired]
    return [group for group in sets if group]


def value_model_config(config: PPOConfig) -> ModelConfig:
    """The value model: ``config.value``, else the reward model when the reward is one, else the policy."""
    from rlhf.models.config import ModelConfig
    from rlhf.rl.config import reward_models

    if config.value is not None:
        return config.value
    models = reward_models(config)
    return ModelConfig(name_or_path=str(models[0][1])) if models else config.policy


def engine_for(engine: EngineConfig, batch: int, workers: int, mini_batches: int) -> EngineConfig:
    """The engine config with gradient accumulation set so that one mini-batch is one optimizer step."""
    rows = batch // (workers * mini_batches)
    return replace(engine, gradient_accumulation_steps=max(1, math.ceil(rows / engine.micro_batch_size)))


def role_counts(config: PPOConfig) -> dict[Role, int]:
    """The ranks of each role the config needs, in placement order."""
    needed: list[Role] = ["policy", "reward"]
    if config.needs_reference:
        needed.append("reference")
    if config.needs_critic:
        needed.append("value")
    return {role: config.roles.workers(role) for role in needed}


WORKERS = {"policy": PolicyWorker, "reference": ReferenceWorker, "value": ValueWorker, "reward": RewardWorker}


def _place(config: PPOConfig, placements: list[Placement]) -> dict[Role, ActorGroup]:
    """Reserve each colocation set's placement (appended to ``placements``) and start its groups' actors."""
    from cluster.groups import ActorGroup
    from cluster.placement import Placement

    r, counts = config.roles, role_counts(config)
    groups: dict[Role, ActorGroup] = {}
    for members in colocation_sets(r.colocate, list(counts)):
        roles = [role for member in members for role in counts if role == member]  # in the order colocate gives
        placement = Placement.create(
            max(counts[m] for m in roles),
            r.cpus_per_worker,
            r.gpus_per_worker,
            strategy=r.strategy(roles[0]),  # a shared placement follows its first role
            timeout_s=r.call_timeout_s,
        )
        placements.append(placement)
        for role in roles:
            groups[role] = ActorGroup(
                role,
                WORKERS[role],
                placement,
                num_actors=counts[role],
                num_cpus_per_actor=r.cpus_per_worker / len(members),
                num_gpus_per_actor=r.gpus_per_worker / len(members),
                setup_timeout_s=r.call_timeout_s,
                collective_timeout_s=r.call_timeout_s,
                call_timeout_s=r.call_timeout_s,
            )
    return groups


def build_roles(config: PPOConfig) -> Roles:
    """Place and start the role groups, then load their models (all groups at once)."""
    from rlhf.jobs.rundir import scrub
    from rlhf.rl.config import reward_terms

    r, algorithm = config.roles, config.algorithm
    placements: list[Placement] = []
    groups: dict[Role, ActorGroup] = {}
    try:
        groups = _place(config, placements)
        mbs = config.engine.micro_batch_size
        reward = RewardGroup(groups["reward"], " + ".join(scrub(t["source"]) for t in reward_terms(config)))
        roles = Roles(PolicyGroup(groups["policy"], mbs), reward, placements=placements)
        if "reference" in groups:
            roles.reference = ReferenceGroup(groups["reference"], mbs)
        if "value" in groups:
            roles.value = ValueGroup(groups["value"], config.value_engine.micro_batch_size)
        batch, seed, dropout_off = config.rows_per_step, config.train.seed, algorithm.disable_dropout
        optimizer_steps = config.steps * algorithm.ppo_epochs * algorithm.mini_batches
        policy_engine = engine_for(config.engine, batch, r.policy_workers, algorithm.mini_batches)
        calls = [
            roles.policy.build(config.policy, policy_engine, optimizer_steps, seed, dropout_off),
            roles.reward.build(reward_terms(config) if config.rewards else config.reward),
        ]
        if roles.reference is not None:
            calls.append(roles.reference.build(config.policy))
        if roles.value is not None:
            value_engine = engine_for(config.value_engine, batch, r.value_workers, algorithm.mini_batches)
            calls.append(
                roles.value.build(value_model_config(config), value_engine, optimizer_steps, seed, dropout_off)
            )
        for call in calls:
            call.result()
    except BaseException:
        for group in groups.values():
            group.kill()
        for placement in placements:
            placement.remove()
        raise
    return roles
