"""Hand-computed and exact-expectation checks of `rlhf.algos.kl`."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algos import adaptive_kl_coefficient, kl_estimate


def test_estimators_on_known_values() -> None:
    # p = 1/2, ref = 1/4 -> log r = log(ref / p) = -log 2, r = 1/2
    logprobs = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    reference = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    assert kl_estimate(logprobs, reference, "k1").item() == pytest.approx(math.log(2), abs=1e-15)
    assert kl_estimate(logprobs, reference, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2, abs=1e-15)
    assert kl_estimate(logprobs, reference, "k3").item() == pytest.approx(0.5 - 1 + math.log(2), abs=1e-15)
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(logprobs, reference, "k4")


def test_k1_and_k3_are_unbiased_under_exact_expectation() -> None:
    """E_{x~p}[k(x)] computed exactly over a small support equals KL(p || q) for k1 and k3; k2 and k3 are >= 0."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    exact_kl = (p * (p / q).log()).sum()
    logp, logq = p.log().view(1, 4), q.log().view(1, 4)
    for estimator in ("k1", "k3"):
        expectation = (p * kl_estimate(logp, logq, estimator).view(4)).sum()
        torch.testing.assert_close(expectation, exact_kl, rtol=0, atol=1e-14)
    assert (kl_estimate(logp, logq, "k2") >= 0).all()
    assert (kl_estimate(logp, logq, "k3") >= 0).all()


def test_adaptive_kl_controller() -> None:
    # error = 8/6 - 1 = 1/3, clipped to 0.2
    assert adaptive_kl_coefficient(0.1, 8.0, 6.0, 10_000, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    # error = 5.7/6 - 1 = -0.05
    assert adaptive_kl_coefficient(0.1, 5.7, 6.0, 10_000, 256) == pytest.approx(0.1 * (1 - 0.05 * 256 / 10_000))
    assert adaptive_kl_coefficient(0.1, 0.0, 6.0, 100, 50) == pytest.approx(0.1 * (1 - 0.2 * 0.5))
    assert adaptive_kl_coefficient(0.1, 6.0, 6.0, 100, 50) == 0.1


def test_a_kl_loss_term_gives_finite_gradients_where_a_masked_log_prob_is_very_negative() -> None:
    """Before: the PPO worker added ``masked_sum(kl_estimate(logprobs, reference, "k3"), mask)`` to the loss. Off
    the response the policy's log-probs are unmasked (here -95) while the reference's are 0, so k3's
    ``expm1(0 - (-95))`` is inf there; the forward sum masks it away, but the backward pass multiplies that inf by
    the mask's 0 and the whole gradient becomes NaN."""
    from rlhf.algos import masked_sum
    from rlhf.algos.kl import kl_penalty_loss

    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    reference = torch.tensor([[0.0, -1.2, -0.7, 0.0]])

    def logprobs() -> torch.Tensor:
        return torch.tensor([[-95.0, -1.0, -0.9, -3.0]], requires_grad=True)

    naive = logprobs()  # the old composition: the hazard is real for these inputs
    masked_sum(kl_estimate(naive, reference, "k3"), mask).backward()
    assert torch.isnan(naive.grad).any()

    for estimator in ("k2", "k3"):
        policy = logprobs()
        loss, metrics = kl_penalty_loss(policy, reference, mask, estimator, num_tokens=2.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(policy.grad).all()
        assert policy.grad[0, 0] == 0 and policy.grad[0, 3] == 0  # nothing flows to masked positions
        # on the response the gradient is the estimator's own: d/dlogpi of k(ref - logpi), over 2 tokens
        log_ratio = reference[0, 1:3] - policy.detach()[0, 1:3]
        expected = (-log_ratio if estimator == "k2" else 1 - torch.exp(log_ratio)) / 2
        torch.testing.assert_close(policy.grad[0, 1:3], expected)
        assert metrics["kl_penalty"] == pytest.approx(
            float(kl_estimate(policy.detach(), reference, estimator)[0, 1:3].mean())
        )


def test_k1_is_refused_as_a_loss_term() -> None:
    """Before: ``kl.placement=loss`` with ``k1`` trained with a term whose expected gradient is zero: it regularised
    nothing, silently. The pure loss and the config both refuse it, naming the keys."""
    from cluster import configtree
    from rlhf.algos.kl import kl_penalty_loss
    from rlhf.rl.config import PPOConfig

    with pytest.raises(ValueError, match="k1"):
        kl_penalty_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), "k1")
    with pytest.raises(configtree.ConfigError, match=r"kl\.placement=loss with kl\.estimator=k1.*kl\.estimator=k3"):
        configtree.from_dict(PPOConfig, {"kl": {"placement": "loss"}})
    assert configtree.from_dict(PPOConfig, {"kl": {"placement": "loss", "estimator": "k3"}}).kl.estimator == "k3"
