"""The whole policy objective as one pure function: it is the sum of its terms, on-policy ratios are 1, and the KL
term is guarded like the surrogate."""

from __future__ import annotations

import pytest
import torch

from rlhf.algos import entropy_loss, ppo_policy_loss, token_logprobs
from rlhf.algos.kl import kl_penalty_loss
from rlhf.algos.objective import PolicyObjective, policy_objective


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 11, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 11, (3, 5), generator=generator)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.float64)
    return {
        "logits": logits,
        "targets": targets,
        "mask": mask,
        "advantages": torch.randn(3, 5, generator=generator, dtype=torch.float64),
        "old": token_logprobs(logits, targets).detach() + 0.1 * torch.randn(3, 5, generator=generator),
        "reference": token_logprobs(logits, targets).detach() - 0.2,
    }


def test_the_objective_is_the_sum_of_its_terms() -> None:
    b = _batch()
    objective = PolicyObjective(clip_low=0.2, clip_high=0.28, entropy_coef=0.01, kl_coef=0.05, kl_estimator="k3")
    logits = b["logits"].clone().requires_grad_()
    logprobs = token_logprobs(logits, b["targets"])
    loss, metrics = policy_objective(
        logits, logprobs, b["advantages"], b["mask"], objective, b["old"], b["reference"], num_tokens=9.0
    )
    surrogate, _ = ppo_policy_loss(logprobs, b["old"], b["advantages"], b["mask"], 0.2, 0.28, num_tokens=9.0)
    entropy, _ = entropy_loss(logits, b["mask"], 9.0)
    kl, _ = kl_penalty_loss(logprobs, b["reference"], b["mask"], "k3", 9.0)
    torch.testing.assert_close(loss, surrogate + 0.01 * entropy + 0.05 * kl)
    assert set(metrics) == {"clip_fraction", "approx_kl", "ratio_mean", "entropy", "kl_penalty"}


def test_without_old_logprobs_the_ratio_is_one_and_nothing_is_clipped() -> None:
    b = _batch(1)
    logits = b["logits"].clone().requires_grad_()
    logprobs = token_logprobs(logits, b["targets"])
    loss, metrics = policy_objective(logits, logprobs, b["advantages"], b["mask"], PolicyObjective(clip_low=1e-6))
    assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["clip_fraction"] == 0
    loss.backward()
    # the plain policy gradient: -sum(mask * A * grad log pi) / N
    expected_logits = b["logits"].clone().requires_grad_()
    expected_logprobs = token_logprobs(expected_logits, b["targets"])
    (-(b["mask"] * b["advantages"] * expected_logprobs).sum() / b["mask"].sum()).backward()
    torch.testing.assert_close(logits.grad, expected_logits.grad)


def test_a_kl_coefficient_without_reference_log_probs_is_refused() -> None:
    b = _batch(2)
    logprobs = token_logprobs(b["logits"], b["targets"])
    with pytest.raises(ValueError, match="reference_logprobs"):
        policy_objective(b["logits"], logprobs, b["advantages"], b["mask"], PolicyObjective(kl_coef=0.1))
