"""Per-token KL estimators and the adaptive KL-coefficient controller.

For tokens sampled from the policy pi, with log r = log ref(x) - log pi(x), Schulman's estimators of
KL(pi || ref) (J. Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html) are

    k1 = -log r                      unbiased, high variance, can be negative
    k2 = (log r)^2 / 2               biased, low variance, >= 0
    k3 = (r - 1) - log r             unbiased, low variance, >= 0

As a term of the policy loss (``kl.placement=loss``) the estimator's *gradient* is what regularises. For tokens
sampled from pi the expected gradient of k1 is zero (E_pi[grad log pi] = 0), so only k2 (whose gradient is that of
KL(pi || ref) to first order) and k3 regularise there; :func:`kl_penalty_loss` refuses k1.

The adaptive controller is the proportional controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from
Human Preferences", https://arxiv.org/abs/1909.08593, Sec. 2.2):

    e = clip(KL / KL_target - 1, -0.2, 0.2),    beta <- beta * (1 + e * n_steps / horizon)
"""

from __future__ import annotations

from typing import Literal

import torch

from rlhf.algos.masking import Denominator, divide_by_denominator, masked_count, masked_mean, masked_sum

KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(
    logprobs: torch.Tensor, reference_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probabilities of tokens sampled from pi.

    To estimate KL(q || p) for tokens sampled from q, pass q's log-probs as `logprobs` and p's as
    `reference_logprobs` (e.g. PPO's approx-KL of the old policy vs the new one: `kl_estimate(old, new, "k3")`).
    The caller applies the mask.

    Args:
        logprobs: [B, T] log pi of the sampled tokens.
        reference_logprobs: [B, T] log ref of the same tokens.
        estimator: "k1", "k2" or "k3".

    Returns:
        [B, T] per-token estimates.
    """
    log_ratio = reference_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"Unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'.")


def kl_penalty_loss(
    logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: KLEstimator = "k3",
    num_tokens: Denominator = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(pi || ref) as a loss term: ``sum_t mask_t * k(t) / num_tokens``, differentiable in ``logprobs``.

    The log-ratio is zeroed off the mask before the estimator: positions outside the response hold arbitrary
    log-probs (the policy's are unmasked, the reference's are 0 there), and ``expm1`` of a log-ratio above ~88
    is inf in float32, whose gradient times the mask's 0 would be NaN even though the forward value is finite.

    Args:
        logprobs: [B, T] log pi of the sampled tokens (requires grad).
        reference_logprobs: [B, T] log ref of the same tokens (constant).
        mask: [B, T] 1 for response tokens.
        estimator: "k2" or "k3"; "k1" is refused (its expected gradient is zero, see the module docstring).
        num_tokens: global number of valid tokens; None uses the local count.

    Returns:
        loss: 0-dim tensor.
        metrics: "kl_penalty", the masked mean of the estimate over the shard (detached).
    """
    if estimator == "k1":
        raise ValueError(
            "the k1 estimator does not regularise as a loss term (its expected gradient is zero); use k2 or k3"
        )
    valid = mask.bool()
    zero = torch.zeros_like(logprobs)
    per_token = kl_estimate(
        torch.where(valid, logprobs, zero), torch.where(valid, reference_logprobs.detach(), zero), estimator
    )
    loss = divide_by_denominator(masked_sum(per_token, valid), num_tokens, masked_count(valid, dtype=logprobs.dtype))
    return loss, {"kl_penalty": masked_mean(per_token.detach(), valid)}


def adaptive_kl_coefficient(coef: float, observed_kl: float, target_kl: float, horizon: float, num_steps: int) -> float:
    """Next KL coefficient of the Ziegler et al. proportional controller.

    Args:
        coef: current KL coefficient beta.
        observed_kl: KL(pi || ref) measured over the last `num_steps` samples (a Python float).
        target_kl: desired KL.
        horizon: controller horizon K_beta^-1 in samples (10,000 in the paper).
        num_steps: number of samples (or steps) since the last update.

    Returns:
        The updated coefficient, a Python float.
    """
    proportional_error = min(max(observed_kl / target_kl - 1.0, -0.2), 0.2)
    return coef * (1.0 + proportional_error * num_steps / horizon)
