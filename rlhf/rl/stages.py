"""The stages of an RL step, each a function of the role groups, the replicas and the config.

:mod:`rlhf.jobs.ppo` runs them in order: :func:`generate`, :func:`make_experience`,
:func:`advantages`, :func:`train_value`, :func:`train_policy` (then the weight sync of
:mod:`rlhf.rl.replicas`); :func:`evaluate` scores one sample per held-out prompt.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlhf.rl.batching import UpdateSchedule
from rlhf.rl.experience import Experience

if TYPE_CHECKING:
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.roles import PendingScores, Roles
    from serving.rollout import RolloutClient, Sample


STAGES = ("generate", "experience", "train_value", "train_policy", "sync", "checkpoint")
"""The timed stages of a step, in order (``time/<stage>`` in the step's record)."""


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


def generate(
    rollout: RolloutClient, prompts: list[dict[str, Any]], config: PPOConfig, seed: int, n: int | None = None
) -> list[Sample]:
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


def reward_inputs(
    samples: list[Any], prompts: list[dict[str, Any]]
) -> tuple[list[Any], list[str], dict[str, list[Any]]]:
    """What the reward scores: each sample's prompt as the data holds it (a string or a message list, not the
    policy's chat-template rendering), its response text, and its prompt row's other columns (name -> one value
    per sample)."""
    rows = [prompts[s.prompt_index] for s in samples]
    names = list(dict.fromkeys(name for row in rows for name in row.get("columns", {})))
    columns = {name: [row.get("columns", {}).get(name) for row in rows] for name in names}
    return [row["prompt"] for row in rows], [s.text for s in samples], columns


def score(roles: Roles, samples: list[Any], prompts: list[dict[str, Any]], config: PPOConfig) -> PendingScores:
    """Start scoring ``samples`` on the reward ranks; ``.result()`` is ``(scores, components)``."""
    return roles.reward.score(*reward_inputs(samples, prompts), config.reward_timeout_s)


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


def make_experience(
    roles: Roles, samples: list[Any], prompts: list[dict[str, Any]], config: PPOConfig, pad_id: int
) -> tuple[Experience, dict[str, torch.Tensor]]:
    """The samples' :class:`~rlhf.rl.experience.Experience` with what the groups compute in parallel (log-probs,
    reference log-probs, values, scores), and the reward's components by name.

    The policy's log-probs are left to the update when :func:`old_logprobs_in_update`.
    """
    from rlhf.rl.experience import place_response_values, sequence_batch

    batch = sequence_batch([s.prompt_token_ids for s in samples], [s.token_ids for s in samples], pad_id)
    temperature = config.rollout.temperature
    policy = None if old_logprobs_in_update(roles, config) else roles.policy.logprobs(batch, temperature)
    reference = None if roles.reference is None else roles.reference.logprobs(batch, temperature)
    values = None if roles.value is None else roles.value.values(batch)
    scoring = score(roles, samples, prompts, config)
    rollout_logprobs = place_response_values([s.logprobs for s in samples], batch.response_mask)
    experience = replace(
        batch,
        rollout_logprobs=rollout_logprobs,
        old_logprobs=None if policy is None else policy.result(),
        reference_logprobs=None if reference is None else reference.result(),
        values=None if values is None else values.result(),
    )
    scores, components = scoring.result()
    return replace(experience, scores=scores), components


def advantages(experience: Experience, config: PPOConfig, kl_coef: float) -> tuple[Experience, dict[str, float]]:
    """The experience with its advantages, returns and IS weights; the step's KL, gap and IS metrics."""
    from rlhf.algos import explained_variance
    from rlhf.rl.experience import (
        KLShaping,
        advantages_and_returns,
        importance_weight_stats,
        logprob_gap,
        need,
        truncated_importance_weights,
    )

    mask, rollout_logprobs = experience.response_mask, need(experience.rollout_logprobs, "rollout_logprobs")
    trainer_logprobs = experience.old_logprobs
    adv, returns, metrics = advantages_and_returns(
        config.algorithm.estimator,
        need(experience.scores, "scores"),
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
        trainer = need(trainer_logprobs, "old_logprobs")  # truncated IS computes them before the update
        weights = truncated_importance_weights(trainer, rollout_logprobs, mask, config.rollout.truncated_is)
        metrics |= importance_weight_stats(weights, mask, config.rollout.truncated_is)
    if returns is not None:
        metrics["explained_variance"] = explained_variance(need(experience.values, "values"), returns, mask)
    experience = replace(experience, advantages=adv, returns=returns, importance_weights=weights)
    return experience, {name: float(value) for name, value in metrics.items()}


def update_schedule(config: PPOConfig) -> UpdateSchedule:
    """How each step's experience is replayed by the trainable groups."""
    algorithm = config.algorithm
    return UpdateSchedule(algorithm.ppo_epochs, algorithm.mini_batches, config.train.seed)


def train_value(roles: Roles, experience: Experience, config: PPOConfig, step: int) -> dict[str, float]:
    """The critic's update on the clipped value loss (ppo only)."""
    if roles.value is None:
        return {}
    return roles.value.update(experience, update_schedule(config), step, config.algorithm.value_clip)


def train_policy(
    roles: Roles, experience: Experience, config: PPOConfig, step: int, kl_coef: float
) -> dict[str, float]:
    """The policy's update on the clipped surrogate (+ entropy, + KL when it is a loss term)."""
    from rlhf.algos.objective import PolicyObjective

    kl_in_loss = config.kl.placement == "loss" and roles.reference is not None
    needed = ("old_logprobs", "advantages", "importance_weights", "rollout_logprobs")
    policy_rows = experience.keep(*needed, *(("reference_logprobs",) if kl_in_loss else ()))
    algorithm = config.algorithm
    objective = PolicyObjective(
        clip_low=algorithm.clip_low,
        clip_high=algorithm.clip_high,
        aggregation=algorithm.aggregation,
        entropy_coef=algorithm.entropy_coef,
        kl_coef=kl_coef if kl_in_loss else 0.0,
        kl_estimator=config.kl.estimator,
    )
    return roles.policy.update(policy_rows, update_schedule(config), step, objective, config.rollout.temperature)


def evaluate(
    rollout: RolloutClient, roles: Roles, prompts: list[dict[str, Any]], config: PPOConfig, seed: int
) -> dict[str, float]:
    """Mean reward and response length of one sample per held-out prompt."""
    samples = generate(rollout, prompts, config, seed, n=1)
    scores, components = score(roles, samples, prompts, config).result()
    return {
        "eval_reward": float(scores.mean()),
        **{f"eval_reward/{name}": float(values.mean()) for name, values in components.items()},
        "eval_response_length": sum(len(s.token_ids) for s in samples) / len(samples),
    }


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
    from rlhf.jobs.rundir import write_json

    write_json(output_dir / "summary.json", summary, indent=2)  # last: with final/, it marks a finished run
    return summary
