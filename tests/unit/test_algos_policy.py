"""Hand-computed checks of `rlhf.algos.policy` (shard invariance is in test_algos_invariance)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algos import entropy_loss, explained_variance, ppo_policy_loss, value_loss

TIGHT = {"rtol": 0, "atol": 1e-12}

# One sequence of 4 tokens, the last one padding. Ratios 1.5, 0.5, 1.1; advantages 1, 1, -1 (5 on the pad).
RATIOS = [1.5, 0.5, 1.1, 1.0]
OLD = torch.tensor([[-1.0, -2.0, -0.5, -1.0]], dtype=torch.float64)
ADVANTAGES = torch.tensor([[1.0, 1.0, -1.0, 5.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0]])


def _logprobs() -> torch.Tensor:
    return (OLD + torch.log(torch.tensor([RATIOS], dtype=torch.float64))).requires_grad_(True)


def test_ppo_token_loss_clip_and_gradient_by_hand() -> None:
    logprobs = _logprobs()
    loss, metrics = ppo_policy_loss(logprobs, OLD, ADVANTAGES, MASK)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(1.1, 1.1) = 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, abs=1e-12)
    assert metrics["clip_fraction"].item() == pytest.approx(1 / 3, abs=1e-12)
    assert metrics["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3, abs=1e-12)
    k3 = [(r - 1) - math.log(r) for r in RATIOS[:3]]  # KL(old || new) with samples from old: r = new / old
    assert metrics["approx_kl"].item() == pytest.approx(sum(k3) / 3, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logprobs)
    # d/dlogp of -A * ratio is -A * ratio; the clipped token and the pad get none.
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.5 / 3, 1.1 / 3, 0.0]], dtype=torch.float64), **TIGHT)


def test_ppo_asymmetric_clip_importance_weights_and_denominator() -> None:
    weights = torch.tensor([[2.0, 1.0, 0.5, 9.0]], dtype=torch.float64)
    loss, _ = ppo_policy_loss(_logprobs(), OLD, ADVANTAGES, MASK, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.1) / 3, abs=1e-12)
    loss, _ = ppo_policy_loss(_logprobs(), OLD, ADVANTAGES, MASK, importance_weights=weights, num_tokens=10)
    assert loss.item() == pytest.approx((2.0 * -1.2 - 0.5 + 0.5 * 1.1) / 10, abs=1e-12)


def test_ppo_sequence_aggregation_matches_explicit_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(3, 5, generator=generator, dtype=torch.float64)
    old = logprobs + 0.3 * torch.randn(3, 5, generator=generator, dtype=torch.float64)
    advantages = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    per_sequence = []
    for b in range(3):
        terms = []
        for t in range(5):
            if mask[b, t]:
                ratio = math.exp(logprobs[b, t] - old[b, t])
                advantage = advantages[b, t].item()
                terms.append(max(-advantage * ratio, -advantage * min(max(ratio, 0.8), 1.2)))
        per_sequence.append(sum(terms) / len(terms))
    loss, _ = ppo_policy_loss(logprobs, old, advantages, mask, aggregation="sequence")
    assert loss.item() == pytest.approx(sum(per_sequence) / 3, abs=1e-12)
    loss, _ = ppo_policy_loss(logprobs, old, advantages, mask, aggregation="sequence", num_sequences=8)
    assert loss.item() == pytest.approx(sum(per_sequence) / 8, abs=1e-12)
    with pytest.raises(ValueError, match="aggregation"):
        ppo_policy_loss(logprobs, old, advantages, mask, aggregation="batch")


def test_ppo_ignores_garbage_log_probs_on_padding() -> None:
    logprobs = _logprobs().detach()
    logprobs[0, 3] = float("inf")  # e.g. an un-masked -inf/inf from a padded position
    logprobs.requires_grad_(True)
    loss, metrics = ppo_policy_loss(logprobs, OLD, ADVANTAGES, MASK)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, abs=1e-12)
    assert torch.isfinite(grad).all() and all(torch.isfinite(v) for v in metrics.values())


def test_value_loss_by_hand() -> None:
    values = torch.tensor([[1.0, 2.0, 7.0]], dtype=torch.float64, requires_grad=True)
    old_values = torch.tensor([[0.5, 2.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped); token 1: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2, abs=1e-12)
    assert metrics["value_clip_fraction"].item() == 0.5
    assert metrics["value_error"].item() == 1.0
    (grad,) = torch.autograd.grad(loss, values)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.5, 0.0]], dtype=torch.float64), **TIGHT)
    unclipped, _ = value_loss(values, old_values, returns, mask, clip_range=None, num_tokens=4)
    assert unclipped.item() == pytest.approx(0.5 * (1.0 + 1.0) / 4, abs=1e-12)


def test_entropy_loss_is_negative_mean_entropy() -> None:
    logits = torch.zeros(2, 3, 5, dtype=torch.float64)
    logits[1, 2] = torch.tensor([100.0, 0, 0, 0, 0])  # masked, near-zero entropy: must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = entropy_loss(logits, mask)
    assert loss.item() == pytest.approx(-math.log(5), abs=1e-12)
    assert metrics["entropy"].item() == pytest.approx(math.log(5), abs=1e-12)


def test_explained_variance_by_hand() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask).item() == 1.0
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0, abs=1e-12)
    values = torch.tensor([[1.0, 2.0, 3.0, 3.0, 0.0]], dtype=torch.float64)
    # residual [0, 0, 0, 1]: variance 0.25; returns variance 5 / 3
    assert explained_variance(values, returns, mask).item() == pytest.approx(1 - 0.25 / (5 / 3), abs=1e-12)
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask).item())
