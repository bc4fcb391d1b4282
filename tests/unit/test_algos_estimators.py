"""The estimator table: one signature per estimator, and the facts a run derives from its row."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

from rlhf.algos.estimators import ESTIMATORS, EstimatorName, EstimatorSettings, StepRewards, estimator
from rlhf.rl.config import PPOAlgorithmConfig, PPOConfig


def test_the_table_holds_exactly_the_estimators_the_config_accepts() -> None:
    accepted = typing.get_args(typing.get_type_hints(PPOAlgorithmConfig)["estimator"])
    assert set(accepted) == set(ESTIMATORS) == set(typing.get_args(EstimatorName))


def test_every_estimator_has_the_one_signature() -> None:
    signatures = {name: inspect.signature(row.estimate) for name, row in ESTIMATORS.items()}
    assert {tuple(s.parameters) for s in signatures.values()} == {("rewards", "settings")}


def test_every_estimator_gives_masked_advantages_of_the_batch_shape() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    rewards = StepRewards(
        scores=torch.randn(4, generator=generator),
        kl=torch.rand(4, 4, generator=generator) * mask,
        mask=mask,
        kl_penalty=0.1,
        values=torch.randn(4, 4, generator=generator) * mask,
    )
    for name, row in ESTIMATORS.items():
        advantages, returns = row.estimate(rewards, EstimatorSettings(group_size=2))
        assert advantages.shape == mask.shape, name
        assert torch.all(advantages[mask == 0] == 0), name
        assert (returns is not None) == row.critic, name


def test_a_run_derives_its_roles_and_group_check_from_the_row() -> None:
    def config(name: str, kl: float) -> PPOConfig:
        from rlhf.rl.config import KLConfig

        return PPOConfig(algorithm=PPOAlgorithmConfig(estimator=name), kl=KLConfig(coefficient=kl))

    assert [name for name in ESTIMATORS if config(name, 0.0).needs_critic] == ["ppo"]
    assert [name for name in ESTIMATORS if estimator(name).grouped] == ["grpo", "rloo"]
    assert config("grpo", 0.05).needs_reference and not config("grpo", 0.0).needs_reference
    settings = config("grpo", 0.0).estimator_settings()
    assert settings.group_size == PPOConfig().rollout.group_size


def test_an_unknown_estimator_is_named_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown estimator 'a2c'; expected one of ppo, reinforce_pp, grpo, rloo"):
        estimator("a2c")
