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
