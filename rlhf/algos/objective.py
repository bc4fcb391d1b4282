"""The whole policy objective of one RL update: clipped surrogate, entropy bonus and KL term, in one pure function.

    L = L_clip(logpi, logpi_old, A; w)  +  c_H * L_entropy(logits)  +  beta * KL_k(pi || ref)

``L_clip`` is :func:`~rlhf.algos.policy.ppo_policy_loss` (with per-token importance weights ``w`` when given),
``L_entropy`` is :func:`~rlhf.algos.policy.entropy_loss` (the negative entropy, so a positive ``c_H`` is a bonus)
and the KL term is :func:`~rlhf.algos.kl.kl_penalty_loss` (``kl.placement=loss``; ``beta = 0`` leaves it out).
Each term divides by the same global denominators, so the losses of data-parallel shards and micro-batches add
up to the whole batch's.

Without ``old_logprobs`` (one on-policy pass over one mini-batch) the current log-probs, detached, stand in for
them: the ratio is exactly 1 and the update is the plain policy gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.algos.kl import KLEstimator, kl_penalty_loss
from rlhf.algos.masking import Denominator
from rlhf.algos.policy import Aggregation, entropy_loss, ppo_policy_loss


@dataclass(frozen=True)
class PolicyObjective:
    """The numbers that shape the policy objective (everything but the data)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: Aggregation = "token"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    """beta of the KL term in the loss (0: no term)."""
    kl_estimator: KLEstimator = "k3"


def policy_objective(
    logits: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    objective: PolicyObjective,
    old_logprobs: torch.Tensor | None = None,
    reference_logprobs: torch.Tensor | None = None,
    importance_weights: torch.Tensor | None = None,
    num_tokens: Denominator = None,
    num_sequences: Denominator = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy's loss on one micro-batch and its metrics.

    Args:
        logits: [B, T, V] logits at the sampling temperature, aligned with ``logprobs`` (requires grad).
        logprobs: [B, T] log pi of the sampled tokens from ``logits`` (requires grad).
        advantages: [B, T] advantages (constant).
        mask: [B, T] 1 for the response tokens trained on.
        objective: clip range, aggregation, entropy and KL coefficients.
        old_logprobs: [B, T] log-probs of the policy that sampled; None uses ``logprobs`` detached (ratio 1).
        reference_logprobs: [B, T] log-probs of the reference policy, needed when ``objective.kl_coef`` > 0.
        importance_weights: [B, T] constant per-token weights of the surrogate, or None.
        num_tokens: global number of valid tokens; None uses the local count.
        num_sequences: global number of sequences (sequence aggregation); None uses B.

    Returns:
        loss: 0-dim tensor.
        metrics: the surrogate's ("clip_fraction", "approx_kl", "ratio_mean"), "entropy", and "kl_penalty" when
            the KL term is on; masked means over the shard, detached.
    """
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    loss, metrics = ppo_policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=objective.clip_low,
        clip_high=objective.clip_high,
        aggregation=objective.aggregation,
        importance_weights=importance_weights,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
    )
    if objective.entropy_coef:
        entropy_term, entropy_metrics = entropy_loss(logits, mask, num_tokens)
        loss = loss + objective.entropy_coef * entropy_term
    else:
        with torch.no_grad():
            _, entropy_metrics = entropy_loss(logits.detach(), mask, num_tokens)
    metrics |= entropy_metrics
    if objective.kl_coef:
        if reference_logprobs is None:
            raise ValueError("kl_coef > 0 needs reference_logprobs")
        kl_term, kl_metrics = kl_penalty_loss(logprobs, reference_logprobs, mask, objective.kl_estimator, num_tokens)
        loss = loss + objective.kl_coef * kl_term
        metrics |= kl_metrics
    return loss, metrics
