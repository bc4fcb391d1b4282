"""Advantage and return estimators for RLHF: GAE (PPO), GRPO, RLOO and REINFORCE++.

GAE (Schulman et al. 2016, https://arxiv.org/abs/1506.02438), per response token t with V after the last token = 0:
    delta_t = r_t + gamma V_{t+1} - V_t,    A_t = delta_t + gamma lambda A_{t+1},    R_t = A_t + V_t

GRPO (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300, Sec. 4.1.2), per group of k samples of a prompt:
    A_i = (s_i - mean(s)) / (std(s) + eps)      std with Bessel's correction, as in TRL and verl
("Dr. GRPO", Liu et al. 2025, https://arxiv.org/abs/2503.20783, drops the division: normalize_std=False.)

RLOO (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740; Kool et al. 2019), leave-one-out baseline:
    A_i = s_i - (sum_{j != i} s_j) / (k - 1)

REINFORCE++ (Hu 2025, https://arxiv.org/abs/2501.03262): discounted return-to-go of the KL-shaped token rewards,
    G_t = r_t + gamma G_{t+1},
then whitened over the global batch with `rlhf.algos.masking.whiten`.

KL-shaped token rewards (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; InstructGPT):
    r_t = -kl_coef * KL_t  (+ score on the last response token)

Masks: 1 marks response tokens. Positions where the mask is 0 (right padding, or tokens inserted by an environment
in the middle of a response) are skipped: they are not a time step (no discount is applied across them), they do
not contribute a reward or a value, and their outputs are 0. With right padding this is the usual "the episode ends
at the last valid token". All outputs are constants (computed from detached inputs).
"""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens, vectorised over the batch.

    Args:
        rewards: [B, T] per-token rewards.
        values: [B, T] value predictions V(s_t).
        mask: [B, T] 1 for response tokens.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        advantages: [B, T], 0 where `mask` is 0.
        returns: [B, T] advantages + values, 0 where `mask` is 0.
    """
    rewards, values = rewards.detach(), values.detach()
    valid = mask.bool()
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
        advantages[:, t] = torch.where(valid[:, t], advantage, 0.0)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2, got {group_size}.")
    if scores.dim() != 1 or scores.shape[0] % group_size != 0:
        raise ValueError(f"scores must be 1-D with a length divisible by group_size={group_size}, got {scores.shape}.")
    return scores.detach().view(-1, group_size)


def grpo_advantages(
    scores: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages: each score minus its group mean, optionally over the group std.

    Args:
        scores: [B] sequence scores, grouped contiguously: [g0 s0 .. s(k-1), g1 s0 .. s(k-1), ...].
        group_size: k, samples per prompt (at least 2).
        normalize_std: divide by the (Bessel-corrected) group standard deviation plus `eps`.
        eps: added to the standard deviation.

    Returns:
        [B] advantages.
    """
    grouped = _grouped(scores, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages: each score minus the mean of the other scores of its group.

    Args:
        scores: [B] sequence scores, grouped contiguously as in `grpo_advantages`.
        group_size: k, samples per prompt (at least 2).

    Returns:
        [B] advantages.
    """
    grouped = _grouped(scores, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def reinforce_plus_plus_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted return-to-go of per-token rewards over response tokens.

    Args:
        token_rewards: [B, T] per-token rewards (e.g. from `token_rewards_with_kl`).
        mask: [B, T] 1 for response tokens.
        gamma: discount factor.

    Returns:
        [B, T] returns, 0 where `mask` is 0. Whiten them over the global batch with `whiten(returns, mask)`.
    """
    token_rewards = token_rewards.detach()
    valid = mask.bool()
    next_return = torch.zeros_like(token_rewards[:, 0])
    returns = torch.zeros_like(token_rewards)
    for t in reversed(range(token_rewards.shape[1])):
        current = token_rewards[:, t] + gamma * next_return
        next_return = torch.where(valid[:, t], current, next_return)
        returns[:, t] = torch.where(valid[:, t], current, 0.0)
    return returns


def token_rewards_with_kl(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl on every response token, plus the sequence score on its last one.

    Args:
        scores: [B] sequence-level scores (reward model or verifier).
        kl: [B, T] per-token KL estimates (e.g. `kl_estimate(logprobs, reference_logprobs, "k1")`).
        mask: [B, T] 1 for response tokens; a row without any gets no score.
        kl_coef: KL penalty coefficient.

    Returns:
        [B, T] rewards, 0 where `mask` is 0.
    """
    valid = mask.bool()
    positions = torch.arange(valid.shape[1], device=valid.device)
    last_position = torch.where(valid, positions, -1).amax(dim=1, keepdim=True)
    is_last = positions == last_position
    rewards = torch.where(valid, -kl_coef * kl, 0.0)
    return rewards + is_last.to(rewards.dtype) * scores.unsqueeze(1).to(rewards.dtype)
