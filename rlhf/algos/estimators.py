"""The advantage estimators of an RL step, one signature each, in one table keyed by ``algorithm.estimator``.

Every estimator reads the same :class:`StepRewards` (sequence scores, the per-token KL to the reference and the
response mask of the whole batch) and the same :class:`EstimatorSettings`, and returns ``(advantages, returns)``,
both ``[B, T-1]``; ``returns`` is None for the estimators without a critic. The math is
:mod:`rlhf.algos.advantages`:

* ``ppo``: KL-shaped token rewards and GAE with the critic's values; advantages whitened over the batch.
* ``reinforce_pp``: the same token rewards, discounted return-to-go, whitened over the batch (REINFORCE++).
* ``grpo`` / ``rloo``: one score per sample (minus ``kl_penalty * sum KL``), normalised within each prompt's group
  of ``group_size`` samples, the same advantage on every response token.

A new estimator is a function of this signature and one row of :data:`ESTIMATORS`; what the rest of the project
asks of an estimator (does it need a critic, does it compare the samples of a prompt) is that row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from rlhf.algos.advantages import (
    gae,
    grpo_advantages,
    reinforce_plus_plus_returns,
    rloo_advantages,
    token_rewards_with_kl,
)
from rlhf.algos.masking import masked_sum, whiten

EstimatorName = Literal["ppo", "grpo", "rloo", "reinforce_pp"]


@dataclass(frozen=True)
class StepRewards:
    """What every estimator reads: the rewards of one RL batch (rows prompt-major) and their KL shaping.

    Attributes:
        scores: ``[B]`` sequence rewards; the ``group_size`` samples of a prompt are consecutive rows.
        kl: ``[B, T-1]`` per-token KL of the policy to the reference, 0 off the response (all 0 without one).
        mask: ``[B, T-1]`` 1.0 on response positions, in the dtype of ``kl``.
        kl_penalty: beta subtracted from the reward per unit of KL (0 when the KL is a term of the policy loss).
        values: ``[B, T-1]`` the critic's values, or None without a critic.
    """

    scores: torch.Tensor
    kl: torch.Tensor
    mask: torch.Tensor
    kl_penalty: float = 0.0
    values: torch.Tensor | None = None


@dataclass(frozen=True)
class EstimatorSettings:
    """The numbers that shape the estimators (each reads the ones it needs)."""

    group_size: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    """ppo and reinforce_pp: whiten the advantages over the batch."""
    grpo_std_normalize: bool = True


Estimate = tuple[torch.Tensor, torch.Tensor | None]
"""``(advantages, returns)``: ``[B, T-1]`` each, returns None without a critic."""


def ppo_estimate(rewards: StepRewards, settings: EstimatorSettings) -> Estimate:
    """Whitened GAE advantages and the returns the critic learns, from the KL-shaped token rewards."""
    if rewards.values is None:
        raise ValueError("estimator ppo needs values from the value model")
    token_rewards = token_rewards_with_kl(rewards.scores, rewards.kl, rewards.mask, rewards.kl_penalty)
    advantages, returns = gae(token_rewards, rewards.values, rewards.mask, settings.gamma, settings.lam)
    return (whiten(advantages, rewards.mask) if settings.whiten else advantages), returns


def reinforce_pp_estimate(rewards: StepRewards, settings: EstimatorSettings) -> Estimate:
    """Whitened discounted return-to-go of the KL-shaped token rewards (REINFORCE++)."""
    token_rewards = token_rewards_with_kl(rewards.scores, rewards.kl, rewards.mask, rewards.kl_penalty)
    advantages = reinforce_plus_plus_returns(token_rewards, rewards.mask, settings.gamma)
    return (whiten(advantages, rewards.mask) if settings.whiten else advantages), None


def _shaped_scores(rewards: StepRewards) -> torch.Tensor:
    return rewards.scores - rewards.kl_penalty * masked_sum(rewards.kl, rewards.mask, dim=-1)


def grpo_estimate(rewards: StepRewards, settings: EstimatorSettings) -> Estimate:
    """The group-normalised shaped score of each sample, on each of its response tokens."""
    per_sequence = grpo_advantages(
        _shaped_scores(rewards), settings.group_size, normalize_std=settings.grpo_std_normalize
    )
    return per_sequence.unsqueeze(1) * rewards.mask, None


def rloo_estimate(rewards: StepRewards, settings: EstimatorSettings) -> Estimate:
    """The shaped score of each sample minus the mean of the others of its group, on each response token."""
    return rloo_advantages(_shaped_scores(rewards), settings.group_size).unsqueeze(1) * rewards.mask, None


@dataclass(frozen=True)
class Estimator:
    """One row of the table: the function and what it asks of a run."""

    estimate: Callable[[StepRewards, EstimatorSettings], Estimate]
    critic: bool = False
    """It needs the critic's values (a value role)."""
    grouped: bool = False
    """It compares the samples of a prompt (``rollout.group_size`` of 2 or more)."""


ESTIMATORS: dict[str, Estimator] = {
    "ppo": Estimator(ppo_estimate, critic=True),
    "reinforce_pp": Estimator(reinforce_pp_estimate),
    "grpo": Estimator(grpo_estimate, grouped=True),
    "rloo": Estimator(rloo_estimate, grouped=True),
}


def estimator(name: str) -> Estimator:
    """The row of ``name``; ValueError naming the choices for any other name."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; expected one of {', '.join(ESTIMATORS)}") from None
