"""PPO-style policy, value and entropy losses over token sequences.

Clipped surrogate (Schulman et al. 2017, https://arxiv.org/abs/1707.06347, Eq. 7), with asymmetric clip range
(Clip-Higher of DAPO, Yu et al. 2025, https://arxiv.org/abs/2503.14476) and an optional constant per-token
importance weight w (e.g. the truncated trainer/rollout ratio of TIS, Yao et al. 2025, "Your Efficient RL Framework
Secretly Brings You Off-Policy RL Training"):

    rho_t = exp(log pi(a_t) - log pi_old(a_t))
    l_t   = w_t * max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_low, 1 + clip_high))

Aggregation over valid tokens (mask = 1):
    "token":    L = sum_{b,t} l_{b,t} / N_tokens                       (DAPO token-level mean)
    "sequence": L = sum_b [ sum_t l_{b,t} / T_b ] / N_sequences       (GRPO's per-sequence token mean)
with N the global counts when given, so the losses of data-parallel shards add up to the whole-batch loss.

Clipped value loss (as in OpenAI baselines' PPO2 and the PPO-for-RLHF implementations):
    l_t = 1/2 max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -eps, eps) - R_t)^2)

Entropy loss: l_t = -H(pi(. | s_t)), so that adding `coef * entropy_loss` to the total loss is an entropy bonus.

`old_logprobs`, `advantages`, `old_values`, `returns` and importance weights are constants (detached).
"""

from __future__ import annotations

from typing import Literal

import torch

from rlhf.algos.kl import kl_estimate
from rlhf.algos.logprobs import entropy_from_logits
from rlhf.algos.masking import Denominator, divide_by_denominator, masked_count, masked_mean, masked_sum, masked_var

Aggregation = Literal["token", "sequence"]


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Aggregation = "token",
    importance_weights: torch.Tensor | None = None,
    num_tokens: Denominator = None,
    num_sequences: Denominator = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate policy-gradient loss.

    Args:
        logprobs: [B, T] log-probs of the sampled tokens under the current policy (requires grad).
        old_logprobs: [B, T] log-probs under the policy that generated the samples.
        advantages: [B, T] per-token advantages (broadcast a [B, 1] sequence advantage for GRPO / RLOO).
        mask: [B, T] 1 for response tokens that are trained on.
        clip_low: ratio lower clip is 1 - clip_low.
        clip_high: ratio upper clip is 1 + clip_high.
        aggregation: "token" (sum over tokens / num_tokens) or "sequence" (per-sequence token mean, summed over
            sequences / num_sequences).
        importance_weights: [B, T] constant per-token weights multiplying the loss, or None.
        num_tokens: global number of valid tokens for "token"; None uses the local count.
        num_sequences: global number of sequences for "sequence"; None uses B.

    Returns:
        loss: 0-dim tensor.
        metrics: "clip_fraction" (tokens whose clipped term is active), "approx_kl" (k3 estimate of
            KL(pi_old || pi)), "ratio_mean", all masked means over the shard's valid tokens.
    """
    valid = mask.bool()
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    # Padding positions may hold arbitrary log-probs; zero their log-ratio so exp() cannot overflow into NaN grads.
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if importance_weights is not None:
        per_token = per_token * importance_weights.detach()

    if aggregation == "token":
        loss = divide_by_denominator(masked_sum(per_token, valid), num_tokens, masked_count(valid, dtype=ratio.dtype))
    elif aggregation == "sequence":
        per_sequence = masked_mean(per_token, valid, dim=-1)
        local_sequences = torch.tensor(valid.shape[0], dtype=ratio.dtype, device=ratio.device)
        loss = divide_by_denominator(per_sequence.sum(), num_sequences, local_sequences)
    else:
        raise ValueError(f"Unknown aggregation {aggregation!r}; expected 'token' or 'sequence'.")

    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).to(ratio.dtype), valid),
            "approx_kl": masked_mean(kl_estimate(old_logprobs, logprobs.detach(), "k3"), valid),
            "ratio_mean": masked_mean(ratio, valid),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
    num_tokens: Denominator = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped squared-error value loss.

    Args:
        values: [B, T] current value predictions (requires grad).
        old_values: [B, T] value predictions at rollout time.
        returns: [B, T] regression targets (e.g. GAE returns).
        mask: [B, T] 1 for valid tokens.
        clip_range: eps of the value clip around `old_values`; None disables clipping.
        num_tokens: global number of valid tokens; None uses the local count.

    Returns:
        loss: 0-dim tensor.
        metrics: "value_clip_fraction" (tokens where the clipped error is the larger one), "value_mean",
            "value_error" (masked mean of (V - R)^2), masked means over the shard.
    """
    valid = mask.bool()
    old_values = old_values.detach()
    returns = returns.detach()
    unclipped_error = (values - returns) ** 2
    if clip_range is None:
        per_token = 0.5 * unclipped_error
        clipped_error = unclipped_error
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped_error = (clipped_values - returns) ** 2
        per_token = 0.5 * torch.maximum(unclipped_error, clipped_error)
    loss = divide_by_denominator(masked_sum(per_token, valid), num_tokens, masked_count(valid, dtype=values.dtype))
    with torch.no_grad():
        metrics = {
            "value_clip_fraction": masked_mean((clipped_error > unclipped_error).to(values.dtype), valid),
            "value_mean": masked_mean(values, valid),
            "value_error": masked_mean(unclipped_error, valid),
        }
    return loss, metrics


def entropy_loss(
    logits: torch.Tensor, mask: torch.Tensor, num_tokens: Denominator = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative token entropy, `-sum(H * mask) / num_tokens`; add `coef * loss` for an entropy bonus.

    Args:
        logits: [B, T, V] logits aligned with `mask` (already shifted to the predicted tokens).
        mask: [B, T] 1 for valid tokens.
        num_tokens: global number of valid tokens; None uses the local count.

    Returns:
        loss: 0-dim tensor.
        metrics: "entropy", the masked mean entropy of the shard.
    """
    valid = mask.bool()
    entropy = entropy_from_logits(logits)
    loss = divide_by_denominator(-masked_sum(entropy, valid), num_tokens, masked_count(valid, dtype=entropy.dtype))
    return loss, {"entropy": masked_mean(entropy.detach(), valid)}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the variance of the returns explained by the values, 1 - Var[R - V] / Var[R].

    1 is a perfect critic, 0 one no better than a constant, negative one worse. NaN when the returns are constant.

    Args:
        values: [B, T] value predictions.
        returns: [B, T] returns.
        mask: [B, T] 1 for valid tokens.

    Returns:
        Detached 0-dim tensor.
    """
    with torch.no_grad():
        returns_variance = masked_var(returns, mask)
        residual_variance = masked_var(returns - values, mask)
        explained = 1.0 - residual_variance / returns_variance
        return torch.where(returns_variance > 0, explained, torch.full_like(explained, float("nan")))
