"""Experience of one RL step as tensors: sequences, masks, and the advantages of each estimator.

Everything here is pure: token lists and tensors in, tensors out; no config objects,
no Ray, no process groups. The driver (:mod:`rlhf.jobs.ppo`) gathers what the role
groups computed and calls these on the whole batch, so whitening and group statistics
are over the global batch whatever the number of ranks.

Layout. Row ``i`` is ``prompt_i + response_i``, right-padded to ``T`` tokens. Per-token
quantities (log-probs, values, KL, advantages) live on the ``T - 1`` *predicting*
positions: position ``t`` holds the quantity of token ``t + 1`` given tokens ``0..t``
(the causal-LM shift). ``response_mask[i, t]`` is 1 where token ``t + 1`` is a response
token, so a response of ``r`` tokens after a prompt of ``p`` covers positions
``p - 1 .. p + r - 2``. A value at position ``t`` is ``V`` of the state before token
``t + 1`` is emitted, which is what GAE expects.

The estimators themselves are the table of :mod:`rlhf.algos.estimators`; here the KL to the
reference is computed and shaped, and the configured one is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhf.algos import kl_estimate, masked_mean, masked_sum
from rlhf.algos.estimators import EstimatorSettings, StepRewards, estimator
from rlhf.algos.kl import KLEstimator


def sequence_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` ``[B, T]`` and ``response_mask`` ``[B, T-1]`` of prompt+response rows.

    Raises ValueError for an empty prompt (there is no position to predict the first response token from).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(max((len(row) for row in rows), default=0), 2)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width - 1), dtype=torch.long)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if not prompt:
            raise ValueError(f"row {i} has an empty prompt")
        length = len(prompt) + len(response)
        input_ids[i, :length] = torch.tensor(rows[i], dtype=torch.long)
        attention_mask[i, :length] = 1
        response_mask[i, len(prompt) - 1 : length - 1] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def place_response_values(values: Sequence[Sequence[float]], response_mask: torch.Tensor) -> torch.Tensor:
    """Per-response-token numbers (e.g. vLLM's sampled-token log-probs) laid onto ``response_mask``'s positions."""
    out = torch.zeros(response_mask.shape, dtype=torch.float32)
    for i, row in enumerate(values):
        positions = response_mask[i].nonzero().squeeze(-1)
        if len(positions) != len(row):
            raise ValueError(f"row {i}: {len(row)} values for {len(positions)} response tokens")
        out[i, positions] = torch.tensor(list(row), dtype=torch.float32)
    return out


@dataclass(frozen=True)
class KLShaping:
    """How the KL to the reference enters the advantages."""

    coefficient: float = 0.0
    estimator: KLEstimator = "k1"
    in_reward: bool = True
    """Subtract ``coefficient * KL`` from the reward (else the policy loss carries the KL and it is only measured)."""


def advantages_and_returns(
    name: str,
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor | None,
    values: torch.Tensor | None,
    kl: KLShaping,
    settings: EstimatorSettings,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Advantages ``[B, T-1]``, returns (estimators with a critic, else None) and the step's KL/reward metrics.

    Args:
        name: the estimator's row of :data:`~rlhf.algos.estimators.ESTIMATORS` (``algorithm.estimator``).
        scores: ``[B]`` sequence rewards, prompt-major (``group_size`` samples of a prompt together).
        response_mask: ``[B, T-1]`` 1 on response positions.
        logprobs: ``[B, T-1]`` the rollout policy's log-probs (as recomputed by the trainer).
        reference_logprobs: ``[B, T-1]`` the reference model's, or None when there is no KL term.
        values: ``[B, T-1]`` the critic's values, else None.
        kl: the KL coefficient, estimator and placement.
        settings: group size, discount, GAE lambda, whitening.

    Returns:
        ``(advantages, returns, metrics)``; metrics are 0-dim tensors: ``kl`` (mean per-token KL of the
        policy to the reference), ``kl_sequence`` (mean summed KL per response), ``score_mean``/``score_std``.
    """
    mask = response_mask.to(logprobs.dtype)
    if reference_logprobs is None:
        per_token = torch.zeros_like(logprobs)
    else:
        per_token = torch.where(mask.bool(), kl_estimate(logprobs, reference_logprobs, kl.estimator), 0.0)
    scores = scores.to(logprobs.dtype)
    rewards = StepRewards(scores, per_token, mask, kl_penalty=kl.coefficient if kl.in_reward else 0.0, values=values)
    advantages, returns = estimator(name).estimate(rewards, settings)
    metrics = {
        "kl": masked_mean(per_token, mask),
        "kl_sequence": masked_sum(per_token, mask, dim=-1).mean(),
        "score_mean": scores.mean(),
        "score_std": scores.std() if scores.numel() > 1 else torch.zeros(()),
    }
    return advantages, returns, metrics


def truncated_importance_weights(
    trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Per-token ``min(exp(trainer - rollout), cap)`` on response positions (1 elsewhere), a constant.

    Corrects for sampling from the rollout engine's numerics rather than the trainer's (truncated
    importance sampling).
    """
    ratio = torch.exp((trainer_logprobs - rollout_logprobs).detach()).clamp(max=cap)
    return torch.where(response_mask.bool(), ratio, torch.ones_like(ratio))


def importance_weight_stats(weights: torch.Tensor, response_mask: torch.Tensor, cap: float) -> dict[str, torch.Tensor]:
    """``is_weight_mean``: the mean truncated IS weight on response tokens; ``is_capped_fraction``: the share at the cap."""
    mask = response_mask.bool()
    return {
        "is_weight_mean": masked_mean(weights, mask),
        "is_capped_fraction": masked_mean((weights >= cap).float(), mask),
    }


def logprob_gap(
    trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the rollout engine's log-probs are from the trainer's on the sampled tokens.

    ``logprob_gap_mean``/``_max``: mean and max of ``|trainer - rollout|``; ``rollout_kl``: the k3
    estimate of KL(rollout || trainer).
    """
    mask = response_mask.bool()
    gap = (trainer_logprobs - rollout_logprobs).abs()
    return {
        "logprob_gap_mean": masked_mean(gap, mask),
        "logprob_gap_max": torch.where(mask, gap, 0.0).max() if mask.any() else torch.zeros(()),
        "rollout_kl": masked_mean(kl_estimate(rollout_logprobs, trainer_logprobs, "k3"), mask),
    }


def split_rows(num_rows: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices covering ``range(num_rows)``, sizes differing by at most one."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    base, extra = divmod(num_rows, parts)
    slices, start = [], 0
    for part in range(parts):
        stop = start + base + (1 if part < extra else 0)
        slices.append(slice(start, stop))
        start = stop
    return slices


def take_rows(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """The rows ``rows`` of every ``[B, ...]`` tensor of ``batch``, trimmed to the longest row's width."""
    part = {key: value[rows] for key, value in batch.items()}
    if "attention_mask" in part and len(part["attention_mask"]):
        width = max(int(part["attention_mask"].sum(dim=1).max()), 2)
        for key, value in part.items():
            if value.dim() == 2:
                part[key] = value[:, : width if value.shape[1] == batch["attention_mask"].shape[1] else width - 1]
    return part
