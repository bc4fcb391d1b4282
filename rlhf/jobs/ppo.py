"""``rlhf ppo``: RLHF on Ray actors, one short loop for PPO, GRPO, RLOO and REINFORCE++.

Each step reads like the algorithm::

    samples    = generate(...)            # vLLM replicas on Ray Serve sample group_size responses per prompt
    experience = make_experience(...)     # policy, reference and value log-probs/values, rewards: in parallel
    advantages(...)                       # the estimator's math on the whole batch (rlhf.rl.experience)
    train_value(...)                      # ppo only: clipped value loss
    train_policy(...)                     # clipped surrogate (+ entropy, + KL when it is a loss term)
    sync_weights(...)                     # the new policy reaches every replica before the next step
    checkpoint(...)                       # every group, the driver's state and the prompt position

The roles are :class:`~cluster.groups.ActorGroup` s of the workers in
:mod:`rlhf.rl.workers`, placed on Ray placement groups of their own or shared (colocation);
the math is :mod:`rlhf.algos` through :mod:`rlhf.rl.experience`. The critic-free
estimators create no value group; without a KL term (``kl.coefficient=0``) there is no
reference group.

Failures: every group call, generation, reward and weight sync has a deadline and fails
with an error naming what failed. A role actor that dies or hangs is not fatal: the
groups are rebuilt, the last checkpoint is loaded, the replicas are re-synced and the run
goes on (up to ``train.max_failures`` times). Re-running the command resumes from the last
checkpoint too.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rlhf.config import PPOConfig
from rlhf.jobs.rundir import write_json
from rlhf.jobs.runner import JobError
from rlhf.rl.experience import Experience

log = logging.getLogger(__name__)

PANELS = [
    ("train", "reward_mean"),
    ("eval", "eval_reward"),
    ("train", "kl"),
    ("train", "entropy"),
    ("train", "clip_fraction"),
    ("train", "approx_kl"),
    ("train", "value_loss"),
    ("train", "explained_variance"),
    ("train", "response_length"),
    ("train", "tokens_per_second"),
    ("train", "logprob_gap_mean"),
    ("train", "time/step"),
]
STAGES = ("generate", "experience", "train_value", "train_policy", "sync", "checkpoint")
POLICY_MODEL_NAME = "policy"


# ---- set-up ---------------------------------------------------------------------------


def check_config(config: PPOConfig) -> None:
    """Refuse settings that cannot work, naming the config key, before anything starts."""
    from rlhf.algos.estimators import estimator

    rollout, algorithm, roles = config.rollout, config.algorithm, config.roles
    if estimator(algorithm.estimator).grouped and rollout.group_size < 2:
        raise JobError(
            f"rollout.group_size={rollout.group_size}: algorithm.estimator={algorithm.estimator} "
            "compares samples of a prompt and needs at least 2"
        )
    if config.train.max_steps is None:
        raise JobError("train.max_steps: rlhf ppo needs a number of steps")
    batch = config.rows_per_step
    for role, workers in (("policy", roles.policy_workers), ("value", roles.value_workers)):
        if batch % (workers * algorithm.mini_batches):
            raise JobError(
                f"roles.{role}_workers={workers} x algorithm.mini_batches={algorithm.mini_batches} must divide the "
                f"batch of rollout.prompts_per_step x rollout.group_size = {batch} sequences"
            )
    from rlhf.jobs.storage import is_uri

    if is_uri(config.train.output_dir):
        raise JobError(
            f"train.output_dir={config.train.output_dir!r}: rlhf ppo writes to a local or shared-filesystem "
            "directory (the replicas read the synced weights from it)"
        )


def reward_spec(config: PPOConfig) -> str | list[dict]:
    """What a reward rank builds (:meth:`rlhf.rl.workers.RewardWorker.build`): ``reward``, or the terms of
    ``rewards``."""
    from rlhf.config import reward_terms

    return reward_terms(config) if config.rewards else config.reward


def check_reward(config: PPOConfig, row: dict) -> str:
    """Build each reward source once in the driver and score one pair of ``row`` (a training prompt as the data
    holds it, a string or messages, with its other columns, as the reward will get them), so a wrong path, a down
    endpoint or a column the function needs and the data lacks fails now."""
    from rlhf.config import reward_terms
    from rlhf.rl.rewards import RewardError, make_reward, parse_reward, reward_model_config

    key = "rewards" if config.rewards else "reward"
    terms = reward_terms(config)
    described = []
    for term in terms:
        spec = parse_reward(term["source"])
        if spec.is_model:
            reward_model_config(Path(spec.source))  # a reward model: checked without loading it here
            described.append(f"reward model {spec.source}")
            continue
        source = make_reward(spec)
        try:
            columns = {name: [value] for name, value in row.get("columns", {}).items()}
            source.score([row["prompt"]], ["The cat is calm."], config.reward_timeout_s, columns)
        except RewardError as exc:
            raise RewardError(f"config key '{key}': {exc}") from None
        finally:
            getattr(source, "close", lambda: None)()
        described.append(repr(source))
    if not config.rewards:
        return described[0]
    return " + ".join(f"{t['weight']:g} * {d}" for t, d in zip(terms, described, strict=True))


def load_prompts(config: PPOConfig, tokenizer: Any) -> tuple[list[dict], list[dict]]:
    """Encoded training prompts and (when ``data.eval_split`` or ``data.eval_path`` is set) held-out prompts."""
    from rlhf.data.encode import build_examples

    data = config.data
    train = build_examples(data, tokenizer, "prompt")
    evaluation: list[dict] = []
    if data.eval_split or data.eval_path:
        evaluation = build_examples(data, tokenizer, "prompt", split=data.eval_split or data.split, path=data.eval_path)
    return train, evaluation[:64]


def prompts_for_step(num_prompts: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the prompts of ``step`` (0-based): consecutive positions of a fresh shuffle per epoch.

    Position ``p = step * per_step + j`` is prompt ``order(epoch)[p % N]`` with ``epoch = p // N``,
    so the prompt position after ``k`` steps is ``k * per_step`` and resuming needs only the step.
    """
    import random

    indices = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, num_prompts)
        order = list(range(num_prompts))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        indices.append(order[offset])
    return indices


@dataclass
class Roles:
    """The role groups of a run and the placements they sit on."""

    policy: Any
    reward: Any
    reference: Any = None
    value: Any = None
    placements: list[Any] = field(default_factory=list)
    transfer_to: tuple[Any, ...] | None = None
    """The replicas the policy's weight transfer is open to (None: not open)."""

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


def value_model_config(config: PPOConfig) -> Any:
    """The value model: ``config.value``, else the reward model when the reward is one, else the policy."""
    from rlhf.config import reward_models
    from rlhf.models.config import ModelConfig

    if config.value is not None:
        return config.value
    models = reward_models(config)
    return ModelConfig(name_or_path=str(models[0][1])) if models else config.policy


def engine_for(engine: Any, batch: int, workers: int, mini_batches: int) -> Any:
    """The engine config with gradient accumulation set so that one mini-batch is one optimizer step."""
    rows = batch // (workers * mini_batches)
    return replace(engine, gradient_accumulation_steps=max(1, math.ceil(rows / engine.micro_batch_size)))


def build_roles(config: PPOConfig) -> Roles:
    """Place and start the role groups, then load their models (all groups at once)."""
    from cluster.groups import ActorGroup, Placement
    from rlhf.rl.workers import PolicyWorker, ReferenceWorker, RewardWorker, ValueWorker

    r, algorithm = config.roles, config.algorithm
    counts = {"policy": r.policy_workers, "reward": r.reward_workers}
    if config.needs_reference:
        counts["reference"] = r.reference_workers
    if config.needs_critic:
        counts["value"] = r.value_workers
    classes = {"policy": PolicyWorker, "reference": ReferenceWorker, "value": ValueWorker, "reward": RewardWorker}
    roles = Roles(policy=None, reward=None)
    try:
        for members in colocation_sets(r.colocate, list(counts)):
            placement = Placement.create(
                max(counts[m] for m in members),
                r.cpus_per_worker,
                r.gpus_per_worker,
                strategy=getattr(r, f"{members[0]}_strategy"),  # a shared placement follows its first role
                timeout_s=r.call_timeout_s,
            )
            roles.placements.append(placement)
            for role in members:
                group = ActorGroup(
                    role,
                    classes[role],
                    placement,
                    num_actors=counts[role],
                    num_cpus_per_actor=r.cpus_per_worker / len(members),
                    num_gpus_per_actor=r.gpus_per_worker / len(members),
                    setup_timeout_s=r.call_timeout_s,
                    collective_timeout_s=r.call_timeout_s,
                    call_timeout_s=r.call_timeout_s,
                )
                setattr(roles, role, group)
        batch = config.rows_per_step
        optimizer_steps = config.train.max_steps * algorithm.ppo_epochs * algorithm.mini_batches
        policy_engine = engine_for(config.engine, batch, r.policy_workers, algorithm.mini_batches)
        calls = [
            roles.policy.submit(
                "build",
                config.policy,
                policy_engine,
                optimizer_steps,
                config.train.seed,
                algorithm.disable_dropout,
            ),
            roles.reward.submit("build", reward_spec(config)),
        ]
        if roles.reference is not None:
            calls.append(roles.reference.submit("build", config.policy))
        if roles.value is not None:
            value_engine = engine_for(config.value_engine, batch, r.value_workers, algorithm.mini_batches)
            calls.append(
                roles.value.submit(
                    "build",
                    value_model_config(config),
                    value_engine,
                    optimizer_steps,
                    config.train.seed,
                    algorithm.disable_dropout,
                )
            )
        for call in calls:
            call.result()
    except BaseException:
        roles.kill()
        raise
    return roles


# ---- checkpoints -----------------------------------------------------------------------


def _checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every ``checkpoints/step-N``, newest first."""
    found = []
    for directory in (output_dir / "checkpoints").glob("step-*"):
        step = directory.name.removeprefix("step-")
        if step.isdigit() and directory.is_dir():
            found.append((int(step), directory))
    return sorted(found, reverse=True)


def latest_checkpoint(output_dir: Path, warn: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint and its driver state.

    ``state.json`` is written last, whole (renamed into place): a newer checkpoint without a
    readable one was cut short and is passed over (``warn``: with a warning naming it).
    """
    for _, directory in _checkpoint_dirs(output_dir):
        try:
            state = json.loads((directory / "state.json").read_text())
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                raise ValueError(f"no step in {state!r:.80}")
        except (OSError, ValueError) as exc:
            if warn:
                reason = "no state.json" if isinstance(exc, FileNotFoundError) else f"unreadable state.json: {exc}"
                log.warning("checkpoint %s is incomplete (%s); resuming from an earlier one", directory, reason)
            continue
        return directory, state
    return None


def checkpoint(roles: Roles, output_dir: Path, state: dict[str, Any], keep: int, timeout_s: float) -> Path:
    """Save every trainable group and the driver's state under ``checkpoints/step-N``; keep the newest ``keep``.

    ``state.json`` goes last and whole, so only a complete checkpoint has one. A directory left at
    this step, or at a later one, by an earlier attempt (a run resumed from before it) is removed
    first: its ``state.json`` must not vouch for shards this run writes, or count among the kept.
    """
    directory = output_dir / "checkpoints" / f"step-{state['step']}"
    for step, old in _checkpoint_dirs(output_dir):
        if step >= state["step"]:
            (old / "state.json").unlink(missing_ok=True)  # first: what is left of it is then never loaded
            shutil.rmtree(old, ignore_errors=True)
    calls = [roles.policy.submit("save_checkpoint", str(directory / "policy"), timeout_s=timeout_s)]
    if roles.value is not None:
        calls.append(roles.value.submit("save_checkpoint", str(directory / "value"), timeout_s=timeout_s))
    for call in calls:
        call.result()
    write_json(directory / "state.json", state)
    for _, old in _checkpoint_dirs(output_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def restore(roles: Roles, directory: Path, timeout_s: float) -> None:
    """Load a checkpoint written by :func:`checkpoint` into the groups."""
    calls = [roles.policy.submit("load_checkpoint", str(directory / "policy"), timeout_s=timeout_s)]
    if roles.value is not None:
        calls.append(roles.value.submit("load_checkpoint", str(directory / "value"), timeout_s=timeout_s))
    for call in calls:
        call.result()


# ---- the stages of a step ----------------------------------------------------------------


class StageTimer:
    """Wall time per named stage of a step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Time the ``with`` block as (part of) ``stage``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


def generate(rollout: Any, prompts: list[dict], config: PPOConfig, seed: int, n: int | None = None) -> list[Any]:
    """``group_size`` (or ``n``) samples per prompt from the replicas, prompt-major."""
    r = config.rollout
    return rollout.generate(
        [p["prompt_ids"] for p in prompts],
        n=n or r.group_size,
        max_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        seed=seed,
        timeout_s=r.timeout_s,
    )


def _sharded_pass(group: Any, method: str, batch: Experience, micro_batch_size: int, *args: Any) -> Any:
    """Submit ``method`` over the group's ranks, each on its rows in micro-batches (returns the pending call)."""
    from rlhf.rl.experience import split_rows

    slices = split_rows(len(batch), group.world_size)
    shards = [batch.rows(rows).split(micro_batch_size) for rows in slices]
    return group.submit_sharded(method, shards, *args), slices


def _gather(pending: Any, slices: list[slice], width: int) -> torch.Tensor:
    """Per-rank lists of ``[b, t]`` tensors back into one ``[B, width]`` tensor."""
    parts = [tensor for rank_result in pending.result() for tensor in rank_result]
    out = torch.zeros((sum(len(p) for p in parts), width))
    row = 0
    for part in parts:
        out[row : row + len(part), : part.shape[1]] = part
        row += len(part)
    return out


def old_logprobs_in_update(roles: Roles, config: PPOConfig) -> bool:
    """Whether the policy update itself can supply the rollout policy's log-probs (no separate pass).

    With one pass over one mini-batch the update's forward runs on the weights that are being
    updated, which are the rollout weights: its detached log-probs are the "old" ones (ratio 1,
    the plain policy gradient). They are needed earlier only for a KL penalty in the reward and for
    truncated importance sampling.
    """
    algorithm = config.algorithm
    return (
        algorithm.ppo_epochs * algorithm.mini_batches == 1
        and roles.reference is None
        and config.rollout.truncated_is is None
    )


def reward_inputs(samples: list[Any], prompts: list[dict]) -> tuple[list[Any], list[str], dict[str, list]]:
    """What the reward scores: each sample's prompt as the data holds it (a string or a message list, not the
    policy's chat-template rendering), its response text, and its prompt row's other columns (name -> one value
    per sample)."""
    rows = [prompts[s.prompt_index] for s in samples]
    names = list(dict.fromkeys(name for row in rows for name in row.get("columns", {})))
    columns = {name: [row.get("columns", {}).get(name) for row in rows] for name in names}
    return [row["prompt"] for row in rows], [s.text for s in samples], columns


def score(roles: Roles, samples: list[Any], prompts: list[dict], config: PPOConfig) -> Any:
    """Start scoring ``samples`` on the reward ranks, a slice each; ``.result()`` gives the list of
    ``(scores, components)`` per rank (:func:`collect_scores`)."""
    from rlhf.rl.experience import split_rows

    texts, responses, columns = reward_inputs(samples, prompts)
    slices = split_rows(len(samples), roles.reward.world_size)
    return roles.reward.submit_sharded(
        "score_parts",
        [(texts[rows], responses[rows], {k: v[rows] for k, v in columns.items()}) for rows in slices],
        config.reward_timeout_s,
        timeout_s=config.reward_timeout_s + 30,
    )


def collect_scores(call: Any, config: PPOConfig, count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scores of the ``count`` samples :func:`score` started on, and each component's (:func:`gather_scores`);
    a reward that did not answer in time is a :class:`~rlhf.rl.rewards.RewardTimeoutError` naming it (its ranks
    are killed with the run's groups)."""
    from cluster.groups import GroupError
    from rlhf.config import reward_terms
    from rlhf.jobs.rundir import scrub
    from rlhf.rl.rewards import RewardTimeoutError

    try:
        return gather_scores(call.result())
    except GroupError as error:
        if error.kind != "timeout":
            raise
        named = " + ".join(scrub(t["source"]) for t in reward_terms(config))
        raise RewardTimeoutError(
            f"the reward {named} did not score {count} responses within reward_timeout_s={config.reward_timeout_s:g} s "
            f"(+30 s of grace); the run stops and the reward's actors are killed"
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


def make_experience(
    roles: Roles, samples: list[Any], prompts: list[dict], config: PPOConfig, pad_id: int
) -> tuple[Experience, dict[str, torch.Tensor]]:
    """The samples' :class:`~rlhf.rl.experience.Experience` with what the groups compute in parallel (log-probs,
    reference log-probs, values, scores), and the reward's components by name.

    The policy's log-probs are left to the update when :func:`old_logprobs_in_update`.
    """
    from rlhf.rl.experience import place_response_values, sequence_batch

    batch = sequence_batch([s.prompt_token_ids for s in samples], [s.token_ids for s in samples], pad_id)
    width = batch.response_mask.shape[1]
    temperature = config.rollout.temperature
    mbs = config.engine.micro_batch_size
    policy_call = reference_call = value_call = None
    if not old_logprobs_in_update(roles, config):
        policy_call, policy_slices = _sharded_pass(roles.policy, "logprobs", batch, mbs, temperature)
    if roles.reference is not None:
        reference_call, reference_slices = _sharded_pass(roles.reference, "logprobs", batch, mbs, temperature)
    if roles.value is not None:
        value_call, value_slices = _sharded_pass(roles.value, "values", batch, config.value_engine.micro_batch_size)
    reward_call = score(roles, samples, prompts, config)
    rollout_logprobs = place_response_values([s.logprobs for s in samples], batch.response_mask)
    old_logprobs = None if policy_call is None else _gather(policy_call, policy_slices, width)
    reference_logprobs = None if reference_call is None else _gather(reference_call, reference_slices, width)
    values = None if value_call is None else _gather(value_call, value_slices, width)
    scores, components = collect_scores(reward_call, config, len(samples))
    experience = replace(
        batch,
        rollout_logprobs=rollout_logprobs,
        old_logprobs=old_logprobs,
        reference_logprobs=reference_logprobs,
        values=values,
        scores=scores,
    )
    return experience, components


def advantages(experience: Experience, config: PPOConfig, kl_coef: float) -> tuple[Experience, dict[str, float]]:
    """The experience with its advantages, returns and IS weights; the step's KL, gap and IS metrics."""
    from rlhf.algos import explained_variance
    from rlhf.rl.experience import (
        KLShaping,
        advantages_and_returns,
        importance_weight_stats,
        logprob_gap,
        truncated_importance_weights,
    )

    mask, rollout_logprobs = experience.response_mask, experience.rollout_logprobs
    trainer_logprobs = experience.old_logprobs
    adv, returns, metrics = advantages_and_returns(
        config.algorithm.estimator,
        experience.scores,
        mask,
        # without a reference model the log-probs only set the dtype here (no KL)
        rollout_logprobs if trainer_logprobs is None else trainer_logprobs,
        experience.reference_logprobs,
        experience.values,
        KLShaping(kl_coef, config.kl.estimator, in_reward=config.kl.placement == "reward"),
        config.estimator_settings(),
    )
    if trainer_logprobs is not None:  # else the policy update measures the gap
        metrics |= logprob_gap(trainer_logprobs, rollout_logprobs, mask)
    weights = None
    if config.rollout.truncated_is is not None:
        weights = truncated_importance_weights(trainer_logprobs, rollout_logprobs, mask, config.rollout.truncated_is)
        metrics |= importance_weight_stats(weights, mask, config.rollout.truncated_is)
    if returns is not None:
        metrics["explained_variance"] = explained_variance(experience.values, returns, mask)
    experience = replace(experience, advantages=adv, returns=returns, importance_weights=weights)
    return experience, {name: float(value) for name, value in metrics.items()}


def _mini_batches(
    experience: Experience, workers: int, micro_batch_size: int, config: PPOConfig, step: int
) -> tuple[list[list[list[Experience]]], list[dict[str, float]]]:
    """Per rank: its micro-batches of every mini-batch of every epoch; and each mini-batch's global denominators."""
    from rlhf.rl.experience import split_rows

    algorithm = config.algorithm
    total = len(experience)
    per_rank: list[list[list[Experience]]] = [[] for _ in range(workers)]
    denominators = []
    for epoch in range(algorithm.ppo_epochs):
        generator = torch.Generator().manual_seed(config.train.seed * 1_000_003 + step * 101 + epoch)
        shuffled = experience
        if algorithm.ppo_epochs * algorithm.mini_batches > 1:
            shuffled = experience.rows(torch.randperm(total, generator=generator))
        for mini in split_rows(total, algorithm.mini_batches):
            part = shuffled.rows(mini)
            denominators.append({"num_tokens": float(part.response_mask.sum()), "num_sequences": float(len(part))})
            for rank, rows in enumerate(split_rows(len(part), workers)):
                per_rank[rank].append(part.rows(rows).split(micro_batch_size))
    return per_rank, denominators


def _combine(per_rank: list[dict[str, float]], extensive: tuple[str, ...]) -> dict[str, float]:
    """Token-weighted means of the ranks' metric sums; ``extensive`` metrics are added up; rank 0's engine stats."""
    tokens = sum(r["tokens"] for r in per_rank) or 1.0
    combined: dict[str, float] = {}
    for name in per_rank[0]:
        if name == "tokens":
            continue
        if name in ("grad_norm", "lr", "value_grad_norm"):
            combined[name] = per_rank[0][name]
        elif name in extensive:
            combined[name] = sum(r.get(name, 0.0) for r in per_rank)
        else:
            combined[name] = sum(r.get(name, 0.0) for r in per_rank) / tokens
    return combined


def train_value(roles: Roles, experience: Experience, config: PPOConfig, step: int) -> dict[str, float]:
    """The critic's update on the clipped value loss (ppo only)."""
    if roles.value is None:
        return {}
    shards, denominators = _mini_batches(
        experience.keep("values", "returns"), roles.value.world_size, config.value_engine.micro_batch_size, config, step
    )
    results = roles.value.call_sharded("train", shards, denominators, config.algorithm.value_clip)
    metrics = _combine(results, extensive=("value_loss",))
    metrics["value_loss"] /= len(denominators)
    return metrics


def train_policy(
    roles: Roles, experience: Experience, config: PPOConfig, step: int, kl_coef: float
) -> dict[str, float]:
    """The policy's update on the clipped surrogate (+ entropy, + KL when it is a loss term)."""
    from rlhf.algos.objective import PolicyObjective

    kl_in_loss = config.kl.placement == "loss" and roles.reference is not None
    needed = ("old_logprobs", "advantages", "importance_weights", "rollout_logprobs")
    policy_rows = experience.keep(*needed, *(("reference_logprobs",) if kl_in_loss else ()))
    shards, denominators = _mini_batches(
        policy_rows, roles.policy.world_size, config.engine.micro_batch_size, config, step
    )
    algorithm = config.algorithm
    objective = PolicyObjective(
        clip_low=algorithm.clip_low,
        clip_high=algorithm.clip_high,
        aggregation=algorithm.aggregation,
        entropy_coef=algorithm.entropy_coef,
        kl_coef=kl_coef if kl_in_loss else 0.0,
        kl_estimator=config.kl.estimator,
    )
    results = roles.policy.call_sharded("train", shards, denominators, objective, config.rollout.temperature)
    metrics = _combine(results, extensive=("policy_loss",))
    metrics["policy_loss"] /= len(denominators)
    return metrics


def sync_weights(roles: Roles, rollout: Any, weights_dir: Path, config: PPOConfig) -> list[Any]:
    """Bring every rollout replica to the policy's weights; return the replicas synced.

    ``rollout.weight_sync=transfer`` sends them from the policy's memory through vLLM's
    weight-transfer API (the transfer is opened on first use and again when the replicas
    change); ``files`` writes them to ``weights_dir`` for every replica to reload.
    """
    from cluster.groups import GroupError
    from serving.backends import backend, on_gpu
    from serving.rollout import RolloutError
    from serving.weight_transfer import ReplicaWeightSync

    r = config.rollout
    if r.weight_sync == "files":
        roles.policy.call("export", str(weights_dir), timeout_s=config.roles.call_timeout_s)
        return rollout.sync_weights(weights_dir, timeout_s=r.sync_timeout_s)
    replicas = rollout.replica_set(r.sync_timeout_s)
    # the policy's call waits a little longer than the replicas' deadline, so the replica's failure is the one told
    wait = r.sync_timeout_s + 30
    try:
        if roles.transfer_to != replicas.replicas:
            roles.transfer_to = None
            sync = ReplicaWeightSync(replicas)
            roles.policy.call("open_weight_transfer", sync, backend(on_gpu()), r.sync_timeout_s, timeout_s=wait)
            roles.transfer_to = replicas.replicas
        roles.policy.call("send_weights", timeout_s=wait)
    except GroupError as error:
        roles.transfer_to = None  # the group may be half-used: open a new one next time
        replicas.resume_quietly()
        if isinstance(error.exception, RolloutError):  # a replica's failure, told by the policy's call
            raise error.exception from None
        raise
    return list(replicas.replicas)


def evaluate(rollout: Any, roles: Roles, prompts: list[dict], config: PPOConfig, seed: int) -> dict[str, float]:
    """Mean reward and response length of one sample per held-out prompt."""
    samples = generate(rollout, prompts, config, seed, n=1)
    scores, components = collect_scores(score(roles, samples, prompts, config), config, len(samples))
    return {
        "eval_reward": float(scores.mean()),
        **{f"eval_reward/{name}": float(values.mean()) for name, values in components.items()},
        "eval_response_length": sum(len(s.token_ids) for s in samples) / len(samples),
    }


def start_roles(
    config: PPOConfig, client: Any, output_dir: Path, weights_dir: Path, step: int, kl_coef: float
) -> tuple[Roles, int, float]:
    """Build the role groups, load the last checkpoint if there is one, and sync its policy to the replicas.

    Returns the groups and the step and KL coefficient to go on from (the checkpoint's, else the given ones).
    """
    roles = build_roles(config)
    try:
        resumed = latest_checkpoint(output_dir)
        if resumed is not None:
            restore(roles, resumed[0], config.roles.call_timeout_s)
            step, kl_coef = resumed[1]["step"], resumed[1]["kl_coef"]
        sync_weights(roles, client, weights_dir, config)
    except BaseException:
        roles.kill()
        raise
    return roles, step, kl_coef


# ---- the run -------------------------------------------------------------------------------


def rl_step(
    step: int,
    roles: Roles,
    rollout: Any,
    prompts: list[dict],
    config: PPOConfig,
    kl_coef: float,
    pad_id: int,
    weights_dir: Path,
) -> tuple[dict[str, float], StageTimer]:
    """One RL step (0-based ``step``): generate, experience, advantages, value, policy, sync."""
    r = config.rollout
    timer = StageTimer()
    chosen = [prompts[i] for i in prompts_for_step(len(prompts), step, r.prompts_per_step, config.data.shuffle_seed)]
    with timer("generate"):
        samples = generate(rollout, chosen, config, seed=config.train.seed * 1_000_000 + step * 10_007)
    with timer("experience"):
        experience, components = make_experience(roles, samples, chosen, config, pad_id)
        experience, metrics = advantages(experience, config, kl_coef)
    with timer("train_value"):
        metrics |= train_value(roles, experience, config, step)
    with timer("train_policy"):
        metrics |= train_policy(roles, experience, config, step, kl_coef)
    with timer("sync"):
        sync_weights(roles, rollout, weights_dir, config)
    scores = experience.scores
    lengths = torch.tensor([len(s.token_ids) for s in samples], dtype=torch.float32)
    generated = float(lengths.sum())
    metrics |= {
        "reward_mean": float(scores.mean()),
        "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        **{f"reward/{name}": float(values.mean()) for name, values in components.items()},
        "response_length": float(lengths.mean()),
        "truncated_fraction": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "generated_tokens": generated,
        "tokens_per_second": generated / max(timer.seconds["generate"], 1e-9),
        "kl_coef": kl_coef,
    }
    return metrics, timer


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` checked and loaded before the cluster is used."""

    output_dir: Path
    state: dict[str, Any]
    """The state to start from: a checkpoint's when resuming (``step``, ``kl_coef``, ``prompt_position``)."""
    prompts: list[dict]
    eval_prompts: list[dict]
    pad_token_id: int
    reward: str
    """A description of the reward, for the run's first line."""


def prepare(config: PPOConfig) -> Prepared:
    """Check everything that can be checked before the cluster is used: the config, the output directory (its run
    lock is this run's from here), the prompts, the reward on one of them, and what to resume from."""
    from rlhf.jobs.runner import prepare_output_dir, release_output_dir, write_config
    from rlhf.models.loading import load_tokenizer

    check_config(config)
    output_dir = Path(config.train.output_dir).expanduser().resolve()
    storage = prepare_output_dir(str(output_dir))
    try:
        # final/ is renamed into place once whole and summary.json is written after it: both mean a finished run
        if (output_dir / "final").is_dir() and (output_dir / "summary.json").is_file():
            raise JobError(f"{output_dir} holds a finished run (final/, summary.json); choose another train.output_dir")
        tokenizer = load_tokenizer(config.policy)
        prompts, eval_prompts = load_prompts(config, tokenizer)
        reward = check_reward(config, prompts[0])
        write_config(config, output_dir)
        state = {"step": 0, "kl_coef": config.kl.coefficient, "prompt_position": 0}
        resumed = latest_checkpoint(output_dir, warn=True)
        if resumed is not None:
            if config.train.resume == "never":
                raise JobError(f"{output_dir} has checkpoints (resume=never): choose another train.output_dir")
            state = resumed[1]
            print(f"resuming from {resumed[0]} (step {state['step']})", flush=True)
    except BaseException:
        release_output_dir(storage)
        raise
    return Prepared(output_dir, state, prompts, eval_prompts, tokenizer.pad_token_id, reward)


def deploy_rollouts(config: PPOConfig, app_name: str) -> str:
    """Deploy (or, with a name the user gave, find) the policy's rollout replicas as the Serve application
    ``app_name``; how, for :func:`serving.rollout.release`."""
    from rlhf.models.loading import resolve
    from serving.config import ServeConfig
    from serving.rollout import deploy

    r = config.rollout
    serve_config = ServeConfig(
        model=resolve(config.policy.name_or_path),  # the tiny model is built, a GGUF file converted, once
        model_name=POLICY_MODEL_NAME,
        min_replicas=r.num_replicas,
        max_replicas=r.num_replicas,
        max_model_len=r.max_model_len,
        max_tokens_limit=r.max_model_len,
        compilation=r.compilation,
        dtype=r.dtype,
    )
    weight_transfer = r.weight_sync == "transfer"
    return deploy(serve_config, app_name, timeout_s=config.roles.call_timeout_s, weight_transfer=weight_transfer)


def close_step(
    step: int, metrics: dict[str, float], timer: StageTimer, roles: Roles, config: PPOConfig, kl_coef: float,
    output_dir: Path, started: float,
) -> tuple[dict[str, Any], float]:  # fmt: skip
    """After :func:`rl_step` ``step`` (0-based): the KL coefficient for the next step, a checkpoint when one is due,
    and the step's metrics record."""
    from rlhf.algos import adaptive_kl_coefficient

    r = config.rollout
    done = step + 1
    if config.kl.target is not None:
        kl_coef = adaptive_kl_coefficient(
            kl_coef, metrics["kl_sequence"], config.kl.target, config.kl.horizon, config.rows_per_step
        )
    save_every = config.train.save_every
    if done == config.train.max_steps or (save_every and done % save_every == 0):
        with timer("checkpoint"):
            state = {"step": done, "kl_coef": kl_coef, "prompt_position": done * r.prompts_per_step}
            checkpoint(roles, output_dir, state, config.train.keep_checkpoints, config.roles.call_timeout_s)
    record = {"kind": "train", "step": done, "total_steps": config.train.max_steps, **metrics}
    record |= {f"time/{name}": timer.seconds.get(name, 0.0) for name in STAGES}
    record["time/step"] = time.perf_counter() - started
    return record, kl_coef


def check_recoverable(error: Any, failures: int, config: PPOConfig, step: int) -> None:
    """Raise a :class:`JobError` unless ``error`` (a ``GroupError``) can be recovered from by rebuilding the groups."""
    if error.kind not in ("died", "timeout", "broken") or failures >= config.train.max_failures:
        raise JobError(f"rlhf ppo failed at step {step + 1}: {error}") from None
    print(
        f"\n{error}\nrecovering ({failures + 1} of {config.train.max_failures}): rebuilding the role groups "
        "from the last checkpoint",
        flush=True,
    )


def run(config: PPOConfig) -> dict[str, Any]:
    """Run RLHF as configured; return a summary (rewards before and after, final model, steps, failures).

    The run holds its output directory's lock throughout. Its rollout application is
    ``rollout.app_name``, or when that is empty one named for this run (``rlhf-rollout-<id>``);
    what the run deployed is deleted when it ends, fails or is stopped (SIGTERM, which Ray's
    driver turns into ``SystemExit``, or Ctrl-C): the deletion is requested first, without
    waiting, since ``rlhf jobs stop`` kills a driver 3 s after its SIGTERM.
    """
    from cluster.connect import connect
    from cluster.groups import GroupError
    from rlhf.jobs.progress import RunLog
    from rlhf.jobs.rundir import atomic_dir, run_app_name, unlock_run_directory
    from serving.rollout import RolloutClient, release

    prepared = prepare(config)
    output_dir, state, prompts, eval_prompts = (
        prepared.output_dir,
        prepared.state,
        prepared.prompts,
        prepared.eval_prompts,
    )
    r, total = config.rollout, config.train.max_steps
    app_name = run_app_name(r.app_name, "rlhf-rollout")
    weights_dir = output_dir / "rollout-weights"
    deployment: str | None = None
    roles: Roles | None = None
    run_log: RunLog | None = None
    records: list[dict[str, Any]] = []
    failures = 0
    finished = False

    def log(record: dict[str, Any]) -> None:
        records.append(record)
        run_log.write([record])

    try:
        connect(config.cluster)
        deployment = deploy_rollouts(config, app_name)
        run_log = RunLog(
            output_dir,
            total,
            "ppo",
            postfix=("reward_mean", "kl", "logprob_gap_mean"),
            panels=PANELS,
            initial_step=state["step"],
        )
        client = RolloutClient(POLICY_MODEL_NAME, app_name=app_name)
        step, kl_coef = state["step"], state["kl_coef"]
        print(
            f"ppo: estimator {config.algorithm.estimator}, reward {prepared.reward}, "
            f"{r.num_replicas} rollout replica(s) (Serve application {app_name!r}), "
            f"{r.prompts_per_step} prompts x {r.group_size} samples per step",
            flush=True,
        )
        while step < total:
            try:
                if roles is None:
                    roles, step, kl_coef = start_roles(config, client, output_dir, weights_dir, step, kl_coef)
                    if step == 0 and eval_prompts and not any(x["kind"] == "eval" for x in records):
                        log(
                            {
                                "kind": "eval",
                                "step": 0,
                                **evaluate(client, roles, eval_prompts, config, config.train.seed),
                            }
                        )
                started = time.perf_counter()
                metrics, timer = rl_step(
                    step, roles, client, prompts, config, kl_coef, prepared.pad_token_id, weights_dir
                )
                record, kl_coef = close_step(step, metrics, timer, roles, config, kl_coef, output_dir, started)
                step += 1
                log(record)
            except GroupError as error:
                check_recoverable(error, failures, config, step)
                failures += 1
                log({"kind": "failure", "step": step, "error": str(error)})
                if roles is not None:
                    roles.kill()
                roles = None
        if roles is None:  # resumed from a checkpoint of the last step: only the export was left to do
            roles, step, kl_coef = start_roles(config, client, output_dir, weights_dir, step, kl_coef)
        if eval_prompts:
            log({"kind": "eval", "step": step, **evaluate(client, roles, eval_prompts, config, config.train.seed)})
        with atomic_dir(output_dir / "final") as export_dir:  # final/ appears whole, or not at all
            roles.policy.call("export", str(export_dir), timeout_s=config.roles.call_timeout_s)
        summary = summarize(records, output_dir, str(output_dir / "final"), failures)
        finished = True
    except GroupError as error:
        raise JobError(f"rlhf ppo failed: {error}") from None
    finally:
        try:
            if deployment is not None:
                release(app_name, deployment, wait=finished)
            if roles is not None:
                roles.kill()
            if run_log is not None:
                run_log.close()
        finally:
            unlock_run_directory(output_dir)
    return summary


def summarize(records: list[dict[str, Any]], output_dir: Path, final: str, failures: int) -> dict[str, Any]:
    """Rewards before/after (held-out, and the mean of the first and last 3 steps), stage shares, outputs."""
    train = [x for x in records if x["kind"] == "train"]
    evals = [x for x in records if x["kind"] == "eval"]
    summary: dict[str, Any] = {"output_dir": str(output_dir), "final_model": final, "failures": failures}
    if train:
        head, tail = train[:3], train[-3:]
        summary |= {
            "steps": train[-1]["step"],
            "reward_first_steps": sum(x["reward_mean"] for x in head) / len(head),
            "reward_last_steps": sum(x["reward_mean"] for x in tail) / len(tail),
            "seconds_per_step": sum(x["time/step"] for x in train) / len(train),
            "stage_share": {
                name: sum(x[f"time/{name}"] for x in train) / max(sum(x["time/step"] for x in train), 1e-9)
                for name in STAGES
            },
        }
    if len(evals) >= 2:
        summary |= {"eval_reward_before": evals[0]["eval_reward"], "eval_reward_after": evals[-1]["eval_reward"]}
    write_json(output_dir / "summary.json", summary, indent=2)  # last: with final/, it marks a finished run
    return summary
