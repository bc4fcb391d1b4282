"""The pure parts of rlhf ppo: batch layout, estimators on the whole batch, prompt order, colocation, batching."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rlhf.algos import gae, grpo_advantages, kl_estimate, reinforce_plus_plus_returns, rloo_advantages, whiten
from rlhf.algos.estimators import EstimatorSettings
from rlhf.engine import EngineConfig
from rlhf.rl.experience import (
    Experience,
    KLShaping,
    advantages_and_returns,
    importance_weight_stats,
    logprob_gap,
    place_response_values,
    sequence_batch,
    split_rows,
    truncated_importance_weights,
)
from rlhf.rl.prompts import prompts_for_step
from rlhf.rl.roles import colocation_sets, engine_for

PAD = 0


def batch_of_two() -> dict[str, torch.Tensor]:
    # prompt [5, 6] + response [7, 8, 9]; prompt [5] + response [7]
    return sequence_batch([[5, 6], [5]], [[7, 8, 9], [7]], PAD)


def test_sequence_batch_marks_the_positions_that_predict_response_tokens() -> None:
    batch = batch_of_two()
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 7, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # position t predicts token t+1: row 0's response tokens 2..4 are predicted at 1..3
    assert batch.response_mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]


def test_sequence_batch_refuses_an_empty_prompt() -> None:
    with pytest.raises(ValueError, match="row 1 has an empty prompt"):
        sequence_batch([[5], []], [[7], [7]], PAD)


def test_rollout_logprobs_land_on_the_response_positions() -> None:
    batch = batch_of_two()
    placed = place_response_values([[-1.0, -2.0, -3.0], [-4.0]], batch.response_mask)
    assert placed.tolist() == [[0.0, -1.0, -2.0, -3.0], [-4.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="row 1: 2 values for 1 response tokens"):
        place_response_values([[-1.0, -2.0, -3.0], [-4.0, -5.0]], batch.response_mask)


def random_experience(rows: int = 8, width: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i in range(rows):
        start = int(torch.randint(0, 2, (1,), generator=generator))
        stop = int(torch.randint(start + 1, width + 1, (1,), generator=generator))
        mask[i, start:stop] = 1
    return {
        "mask": mask,
        "scores": torch.randn(rows, generator=generator),
        "logprobs": -torch.rand(rows, width, generator=generator) * mask,
        "reference": -torch.rand(rows, width, generator=generator) * mask,
        "values": torch.randn(rows, width, generator=generator) * mask,
    }


def test_grpo_advantages_are_the_group_normalised_kl_shaped_scores_on_every_response_token() -> None:
    x = random_experience()
    adv, returns, metrics = advantages_and_returns(
        "grpo", x["scores"], x["mask"], x["logprobs"], x["reference"], None, KLShaping(0.1), EstimatorSettings(4)
    )
    kl = kl_estimate(x["logprobs"], x["reference"], "k1") * x["mask"]
    expected = grpo_advantages(x["scores"] - 0.1 * kl.sum(dim=1), 4)
    assert returns is None
    torch.testing.assert_close(adv, expected.unsqueeze(1) * x["mask"])
    torch.testing.assert_close(metrics["kl"], kl.sum() / x["mask"].sum())


def test_rloo_with_the_kl_in_the_loss_uses_the_raw_scores() -> None:
    x = random_experience()
    adv, _, metrics = advantages_and_returns(
        "rloo",
        x["scores"],
        x["mask"],
        x["logprobs"],
        x["reference"],
        None,
        KLShaping(0.1, in_reward=False),
        EstimatorSettings(group_size=2),
    )
    torch.testing.assert_close(adv, rloo_advantages(x["scores"], 2).unsqueeze(1) * x["mask"])
    assert float(metrics["kl"]) != 0  # still measured


def test_ppo_is_whitened_gae_of_the_kl_shaped_token_rewards() -> None:
    x = random_experience()
    adv, returns, _ = advantages_and_returns(
        "ppo",
        x["scores"],
        x["mask"],
        x["logprobs"],
        x["reference"],
        x["values"],
        KLShaping(0.05),
        EstimatorSettings(gamma=0.9, lam=0.8),
    )
    kl = kl_estimate(x["logprobs"], x["reference"], "k1") * x["mask"]
    rewards = -0.05 * kl
    last = x["mask"].cumsum(1).argmax(1)
    rewards[torch.arange(len(last)), last] += x["scores"]
    expected_adv, expected_returns = gae(rewards, x["values"], x["mask"], 0.9, 0.8)
    torch.testing.assert_close(returns, expected_returns)
    torch.testing.assert_close(adv, whiten(expected_adv, x["mask"]))


def test_reinforce_pp_is_the_whitened_return_to_go_and_needs_no_values() -> None:
    x = random_experience()
    adv, returns, _ = advantages_and_returns(
        "reinforce_pp", x["scores"], x["mask"], x["logprobs"], None, None, KLShaping(0.05), EstimatorSettings()
    )
    rewards = torch.zeros_like(x["logprobs"])
    last = x["mask"].cumsum(1).argmax(1)
    rewards[torch.arange(len(last)), last] = x["scores"]
    assert returns is None
    torch.testing.assert_close(adv, whiten(reinforce_plus_plus_returns(rewards, x["mask"]), x["mask"]))


def test_ppo_without_values_is_refused() -> None:
    x = random_experience()
    with pytest.raises(ValueError, match="needs values"):
        advantages_and_returns(
            "ppo", x["scores"], x["mask"], x["logprobs"], None, None, KLShaping(), EstimatorSettings()
        )


def test_truncated_importance_weights_are_capped_ratios_on_response_tokens() -> None:
    mask = torch.tensor([[0, 1, 1]])
    trainer = torch.tensor([[-5.0, -1.0, -1.0]])
    rollout = torch.tensor([[-1.0, -2.0, -0.5]])
    weights = truncated_importance_weights(trainer, rollout, mask, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 2.0, float(torch.exp(torch.tensor(-0.5)))]]))
    gap = logprob_gap(trainer, rollout, mask)
    assert float(gap["logprob_gap_mean"]) == pytest.approx(0.75)
    assert float(gap["logprob_gap_max"]) == pytest.approx(1.0)


def test_rows_split_evenly_and_rows_trims_padding() -> None:
    assert split_rows(10, 3) == [slice(0, 4), slice(4, 7), slice(7, 10)]
    part = batch_of_two().rows(slice(1, 2))
    assert part.input_ids.tolist() == [[5, 7]]
    assert part.response_mask.tolist() == [[1]]


def test_an_experience_splits_into_trimmed_micro_batches_and_concatenates_back() -> None:
    batch = sequence_batch([[5, 6], [5], [5, 6, 7], [5]], [[7, 8, 9], [7], [8], [9, 9]], PAD)
    batch = replace(batch, advantages=torch.arange(16.0).reshape(4, 4) * batch.response_mask, scores=torch.arange(4.0))
    parts = batch.split(2)
    assert [len(p) for p in parts] == [2, 2]
    assert [p.input_ids.shape[1] for p in parts] == [5, 4]  # each micro-batch as wide as its longest row
    assert parts[1].advantages.shape == (2, 3) and parts[1].scores.tolist() == [2.0, 3.0]
    whole = Experience.concat(parts)
    for name, value in batch.tensors().items():
        assert torch.equal(getattr(whole, name), value), name
    assert whole.values is None and whole.returns is None


def test_keep_leaves_a_role_only_the_fields_it_reads() -> None:
    batch = replace(batch_of_two(), values=torch.zeros(2, 4), returns=torch.ones(2, 4), scores=torch.ones(2))
    kept = batch.keep("returns")
    assert set(kept.tensors()) == {"input_ids", "attention_mask", "response_mask", "returns"}


def test_each_epoch_visits_every_prompt_once_in_a_seeded_order() -> None:
    per_step, num = 4, 10
    positions = [i for step in range(5) for i in prompts_for_step(num, step, per_step, seed=3)]
    assert sorted(positions[:10]) == list(range(10))  # epoch 0
    assert sorted(positions[10:20]) == list(range(10))  # epoch 1
    assert positions[:10] != positions[10:20]
    assert prompts_for_step(num, 2, per_step, seed=3) == positions[8:12]  # a resumed step sees the same prompts


def test_colocation_sets() -> None:
    roles = ["policy", "reward", "reference", "value"]
    assert colocation_sets("none", roles) == [["policy"], ["reward"], ["reference"], ["value"]]
    assert colocation_sets("policy+reference", roles) == [["policy", "reference"], ["reward"], ["value"]]
    assert colocation_sets("policy+reference,value+reward", roles) == [["policy", "reference"], ["value", "reward"]]
    assert colocation_sets("value+reward", ["policy", "reward"]) == [["reward"], ["policy"]]
    assert colocation_sets("all", roles) == [roles]


def test_one_mini_batch_is_one_optimizer_step() -> None:
    engine = EngineConfig(micro_batch_size=4)
    assert engine_for(engine, batch=32, workers=2, mini_batches=2).gradient_accumulation_steps == 2
    assert engine_for(engine, batch=32, workers=1, mini_batches=1).gradient_accumulation_steps == 8
    assert engine_for(engine, batch=6, workers=2, mini_batches=1).gradient_accumulation_steps == 1


def test_importance_weight_stats_count_response_tokens_only() -> None:
    weights = torch.tensor([[1.0, 2.0, 0.5, 2.0], [9.0, 1.0, 2.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])
    stats = importance_weight_stats(weights, mask, cap=2.0)
    assert float(stats["is_weight_mean"]) == pytest.approx((1 + 2 + 0.5 + 1 + 2) / 5)
    assert float(stats["is_capped_fraction"]) == pytest.approx(2 / 5)


def test_a_step_whose_rows_the_ranks_cannot_share_is_refused_naming_the_keys() -> None:
    from cluster import configtree
    from rlhf.jobs.registry import EXAMPLES_DIR
    from rlhf.jobs.runner import JobError
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.preflight import check_config

    overrides = ["rollout.prompts_per_step=3", "rollout.group_size=2", "roles.policy_workers=4"]
    config = configtree.load(PPOConfig, EXAMPLES_DIR / "ppo.yaml", overrides)
    assert config.rows_per_step == 6
    with pytest.raises(JobError, match=r"roles.policy_workers=4 x algorithm.mini_batches=1 must divide .* = 6 seq"):
        check_config(config)
