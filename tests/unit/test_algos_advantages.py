"""Hand-computed and naive-recursion checks of `rlhf.algos.advantages`."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algos import gae, grpo_advantages, reinforce_plus_plus_returns, rloo_advantages, token_rewards_with_kl

TIGHT = {"rtol": 0, "atol": 1e-12}


def f64(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def naive_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """Plain Python GAE over one episode whose value after the last step is 0."""
    advantages, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        last = rewards[t] + gamma * next_value - values[t] + gamma * lam * last
        advantages[t] = last
    return advantages, [a + v for a, v in zip(advantages, values, strict=True)]


def test_gae_explicit_numbers_with_right_padding() -> None:
    rewards = f64([[0.0, 0.0, 1.0], [0.5, -1.0, 7.0]])
    values = f64([[0.1, 0.2, 0.3], [0.4, 0.5, float("nan")]])  # garbage on the pad must not leak
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1 by hand: delta_1 = -1 - 0.5 = -1.5 = A_1; delta_0 = 0.5 + 0.9 * 0.5 - 0.4 = 0.55; A_0 = 0.55 + 0.72 * -1.5
    torch.testing.assert_close(advantages[1], f64([-0.53, -1.5, 0.0]), **TIGHT)
    torch.testing.assert_close(returns[1], f64([-0.13, -1.0, 0.0]), **TIGHT)
    expected_advantages, expected_returns = naive_gae([0.0, 0.0, 1.0], [0.1, 0.2, 0.3], 0.9, 0.8)
    torch.testing.assert_close(advantages[0], f64(expected_advantages), **TIGHT)
    torch.testing.assert_close(returns[0], f64(expected_returns), **TIGHT)


def test_gae_random_batch_matches_naive_recursion_per_row() -> None:
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    values = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    lengths = [8, 1, 5, 3, 6]
    mask = (torch.arange(8) < torch.tensor(lengths).unsqueeze(1)).long()
    advantages, returns = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    for b, n in enumerate(lengths):
        expected_advantages, expected_returns = naive_gae(rewards[b, :n].tolist(), values[b, :n].tolist(), 0.97, 0.9)
        torch.testing.assert_close(advantages[b, :n], f64(expected_advantages), **TIGHT)
        torch.testing.assert_close(returns[b, :n], f64(expected_returns), **TIGHT)
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()


def test_gae_skips_masked_tokens_inside_a_response() -> None:
    """Environment tokens in the middle (mask 0) are not time steps: same result as the compacted sequence."""
    rewards = f64([[0.2, 9.0, 9.0, -0.1, 1.0]])
    values = f64([[0.5, 9.0, 9.0, 0.4, 0.3]])
    mask = torch.tensor([[1, 0, 0, 1, 1]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    expected_advantages, expected_returns = naive_gae([0.2, -0.1, 1.0], [0.5, 0.4, 0.3], 0.9, 0.95)
    torch.testing.assert_close(advantages[0, [0, 3, 4]], f64(expected_advantages), **TIGHT)
    torch.testing.assert_close(returns[0, [0, 3, 4]], f64(expected_returns), **TIGHT)
    assert advantages[0, 1:3].abs().sum() == 0


def test_grpo_advantages_by_hand() -> None:
    scores = f64([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(0.5)  # Bessel-corrected std of [1, 2]
    expected = f64([-0.5, 0.5, -0.5, 0.5]) / (std + 1e-6)
    torch.testing.assert_close(grpo_advantages(scores, group_size=2), expected, **TIGHT)
    torch.testing.assert_close(grpo_advantages(scores, 2, normalize_std=False), f64([-0.5, 0.5, -0.5, 0.5]), **TIGHT)
    expected_group_of_4 = (scores - 2.5) / (math.sqrt(5 / 3) + 1e-6)
    torch.testing.assert_close(grpo_advantages(scores, group_size=4), expected_group_of_4, **TIGHT)
    # a group with identical scores gets zero advantage, not NaN
    torch.testing.assert_close(grpo_advantages(f64([3.0, 3.0, 1.0, 2.0]), 2)[:2], f64([0.0, 0.0]), **TIGHT)


def test_rloo_advantages_by_hand() -> None:
    scores = f64([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(rloo_advantages(scores, group_size=2), f64([-1.0, 1.0, -1.0, 1.0]), **TIGHT)
    # group of 4: baselines (2+3+4)/3, (1+3+4)/3, (1+2+4)/3, (1+2+3)/3
    torch.testing.assert_close(rloo_advantages(scores, group_size=4), f64([-2.0, -2 / 3, 2 / 3, 2.0]), **TIGHT)


@pytest.mark.parametrize("function", [grpo_advantages, rloo_advantages])
def test_group_shapes_are_validated(function) -> None:
    with pytest.raises(ValueError, match="divisible"):
        function(f64([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="at least 2"):
        function(f64([1.0, 2.0]), 1)


def test_reinforce_plus_plus_returns_by_hand() -> None:
    rewards = f64([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # gamma 0.5: row 0: G2 = 3, G1 = 2 + 1.5, G0 = 1 + 1.75; row 1: G1 = 5, G0 = 4 + 2.5
    expected = f64([[2.75, 3.5, 3.0], [6.5, 5.0, 0.0]])
    torch.testing.assert_close(reinforce_plus_plus_returns(rewards, mask, gamma=0.5), expected, **TIGHT)
    torch.testing.assert_close(
        reinforce_plus_plus_returns(rewards, mask), f64([[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]]), **TIGHT
    )


def test_token_rewards_with_kl_by_hand() -> None:
    scores = f64([1.0, 2.0, 3.0, 4.0])
    kl = f64([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 1, 1]])  # right pad, full, empty, left pad
    expected = f64([[-0.1, 0.9, 0.0], [-0.1, -0.1, 1.9], [0.0, 0.0, 0.0], [0.0, -0.3, 3.6]])
    torch.testing.assert_close(token_rewards_with_kl(scores, kl, mask, kl_coef=0.1), expected, **TIGHT)
