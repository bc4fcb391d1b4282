"""Hand-computed checks of `rlhf.algos.preference` (TRL agreement is in test_algos_trl_parity, shard invariance in
test_algos_invariance)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algos import bradley_terry_loss, dpo_loss, ipo_loss, kto_loss, log1mexp, orpo_loss, simpo_loss


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bradley_terry_two_pairs_with_margin() -> None:
    loss, metrics = bradley_terry_loss(f64(2.0, 0.0), f64(1.0, 1.0), margin=f64(0.5, 0.0))
    # pair 0: 2 - 1 - 0.5 = 0.5; pair 1: 0 - 1 - 0 = -1
    assert loss.item() == pytest.approx((neg_log_sigmoid(0.5) + neg_log_sigmoid(-1.0)) / 2, abs=1e-12)
    assert metrics["accuracy"].item() == 0.5
    assert metrics["margin"].item() == 0.0  # (1 + -1) / 2
    assert metrics["rewards/chosen"].item() == 1.0
    assert metrics["rewards/rejected"].item() == 1.0
    centred, _ = bradley_terry_loss(f64(2.0, 0.0), f64(1.0, 1.0), num_items=4, center_rewards_coefficient=0.1)
    expected = (neg_log_sigmoid(1.0) + neg_log_sigmoid(-1.0) + 0.1 * (9.0 + 1.0)) / 4
    assert centred.item() == pytest.approx(expected, abs=1e-12)


# Pair 0: h = (-1 + 1.5) - (-2 + 1.5) = 1; pair 1: h = (-3 + 2) - (-1 + 2) = -2.
POLICY_CHOSEN, POLICY_REJECTED = f64(-1.0, -3.0), f64(-2.0, -1.0)
REFERENCE_CHOSEN, REFERENCE_REJECTED = f64(-1.5, -2.0), f64(-1.5, -2.0)


def test_dpo_two_pairs() -> None:
    beta = 0.5
    loss, metrics = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta)
    assert loss.item() == pytest.approx((neg_log_sigmoid(0.5) + neg_log_sigmoid(-1.0)) / 2, abs=1e-12)
    # chosen rewards 0.5 * [0.5, -1] = [0.25, -0.5], rejected rewards 0.5 * [-0.5, 1] = [-0.25, 0.5]
    assert metrics["rewards/chosen"].item() == pytest.approx(-0.125, abs=1e-12)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.125, abs=1e-12)
    assert metrics["rewards/accuracy"].item() == 0.5
    assert metrics["rewards/margin"].item() == pytest.approx(-0.25, abs=1e-12)


def test_conservative_dpo_two_pairs() -> None:
    beta, eps = 0.5, 0.1
    loss, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta, eps, num_items=3)
    per_pair = [(1 - eps) * neg_log_sigmoid(beta * h) + eps * neg_log_sigmoid(-beta * h) for h in (1.0, -2.0)]
    assert loss.item() == pytest.approx(sum(per_pair) / 3, abs=1e-12)


def test_dpo_does_not_differentiate_the_reference() -> None:
    reference = REFERENCE_CHOSEN.clone().requires_grad_(True)
    policy = POLICY_CHOSEN.clone().requires_grad_(True)
    loss, _ = dpo_loss(policy, POLICY_REJECTED, reference, REFERENCE_REJECTED, 0.5)
    policy_grad, reference_grad = torch.autograd.grad(loss, [policy, reference], allow_unused=True)
    assert reference_grad is None
    # d/dx of mean(-log sigma(0.5 h)) w.r.t. the chosen logp = -0.5 * sigma(-0.5 h) / 2
    torch.testing.assert_close(policy_grad, f64(-0.25 * sigmoid(-0.5), -0.25 * sigmoid(1.0)), rtol=0, atol=1e-12)


def test_ipo_two_pairs() -> None:
    beta = 0.25  # target gap 1 / (2 beta) = 2
    loss, _ = ipo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta)
    assert loss.item() == pytest.approx(((1.0 - 2.0) ** 2 + (-2.0 - 2.0) ** 2) / 2, abs=1e-12)


def test_simpo_one_pair_with_label_smoothing() -> None:
    # beta (pc - pr - gamma/beta) = 2 * (-0.5 + 1.0 - 0.25) = 0.5
    loss, metrics = simpo_loss(f64(-0.5), f64(-1.0), beta=2.0, gamma_beta_ratio=0.25)
    assert loss.item() == pytest.approx(neg_log_sigmoid(0.5), abs=1e-12)
    assert metrics["rewards/chosen"].item() == -1.0
    smoothed, _ = simpo_loss(f64(-0.5), f64(-1.0), beta=2.0, gamma_beta_ratio=0.25, label_smoothing=0.3)
    assert smoothed.item() == pytest.approx(0.7 * neg_log_sigmoid(0.5) + 0.3 * neg_log_sigmoid(-0.5), abs=1e-12)


def test_log1mexp_is_accurate_across_its_range() -> None:
    mpmath = pytest.importorskip("mpmath")
    points = [-1e-12, -1e-6, -0.5, -math.log(2), -0.7, -5.0, -50.0]  # naive log(1 - exp(x)) fails at both ends
    with mpmath.workdps(50):
        expected = f64(*[float(mpmath.log(1 - mpmath.exp(mpmath.mpf(x)))) for x in points])
    torch.testing.assert_close(log1mexp(f64(*points)), expected, rtol=1e-14, atol=0)


def test_orpo_one_pair_with_known_odds() -> None:
    # p_c = 1/2 -> odds 1; p_r = 1/4 -> odds 1/3; log odds ratio = log 3; -log sigma(log 3) = log(4/3)
    beta = 0.2
    chosen, rejected = f64(math.log(0.5)), f64(math.log(0.25))
    loss, metrics = orpo_loss(chosen, rejected, torch.tensor(1.5, dtype=torch.float64), beta)
    assert loss.item() == pytest.approx(1.5 + beta * math.log(4 / 3), abs=1e-12)
    assert metrics["log_odds_chosen"].item() == pytest.approx(math.log(3), abs=1e-12)
    assert metrics["log_odds_ratio"].item() == pytest.approx(math.log(3 / 4), abs=1e-12)
    assert metrics["nll"].item() == 1.5
    per_pair_nll, _ = orpo_loss(chosen, rejected, f64(1.5), beta, num_items=2)
    assert per_pair_nll.item() == pytest.approx((1.5 + beta * math.log(4 / 3)) / 2, abs=1e-12)


def test_orpo_gradient_is_finite_for_log_probs_near_zero() -> None:
    chosen = f64(-1e-9, -3.0).requires_grad_(True)
    loss, _ = orpo_loss(chosen, f64(-2.0, -1e-7), torch.tensor(0.0, dtype=torch.float64), 0.1)
    (grad,) = torch.autograd.grad(loss, chosen)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_kto_hand_computed_with_reference_point() -> None:
    beta, z0 = 0.5, 0.4
    policy, reference = f64(-1.0, -2.0, -3.0), f64(-2.0, -1.0, -3.5)  # log-ratios 1, -1, 0.5
    labels = torch.tensor([True, False, False])
    kl = torch.tensor(z0, dtype=torch.float64, requires_grad=True)
    loss, metrics = kto_loss(policy, reference, labels, kl, beta, desirable_weight=2.0, undesirable_weight=0.5)
    expected = [
        2.0 * (1 - sigmoid(beta * (1.0 - z0))),
        0.5 * (1 - sigmoid(beta * (z0 + 1.0))),
        0.5 * (1 - sigmoid(beta * (z0 - 0.5))),
    ]
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-12)
    assert metrics["kl"].item() == pytest.approx(z0, abs=1e-12)
    assert metrics["rewards/chosen"].item() == 0.5
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.125, abs=1e-12)
    assert (metrics["num_desirable"].item(), metrics["num_undesirable"].item()) == (1.0, 2.0)
    assert not loss.requires_grad  # z0 is a constant, and nothing else here requires grad


def test_kto_clamps_a_negative_reference_point_to_zero() -> None:
    policy, reference, labels = f64(-1.0, -2.0), f64(-2.0, -1.0), torch.tensor([True, False])
    clamped, metrics = kto_loss(policy, reference, labels, f64(-3.0).squeeze(), 0.5)
    zero, _ = kto_loss(policy, reference, labels, f64(0.0).squeeze(), 0.5)
    assert clamped.item() == zero.item()
    assert metrics["kl"].item() == 0.0
