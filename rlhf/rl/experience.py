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
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from rlhf.algos import kl_estimate, masked_mean, masked_sum
from rlhf.algos.estimators import EstimatorSettings, StepRewards, estimator
from rlhf.algos.kl import KLEstimator


def need(value: torch.Tensor | None, name: str) -> torch.Tensor:
    """``value``, an :class:`Experience` field; a ValueError naming it when it is None (its stage has not run)."""
    if value is None:
        raise ValueError(f"the experience has no {name}: the stage that computes it has not run")
    return value


SEQUENCE_FIELDS = ("input_ids", "attention_mask")
"""The ``[B, T]`` fields of an :class:`Experience`; every other tensor field is ``[B, T-1]`` but ``scores``."""


@dataclass(frozen=True)
class Experience:
    """One RL step's rows (or a micro-batch of them): named tensors, B rows prompt-major, T tokens.

    The sequences and the response mask are always there; every other field is None until the stage that makes
    it (the groups' passes, the reward, the advantages) has run, or when the run has no such stage (no reference
    model, no critic, no truncated importance sampling). ``old_logprobs`` is None when the policy update takes
    the rollout policy's log-probs from its own forward (one on-policy pass, see ``old_logprobs_in_update`` in
    :mod:`rlhf.jobs.ppo`). Nothing is changed in place: a stage returns a new Experience (``replace``).

    Attributes:
        input_ids: ``[B, T]`` prompt + response tokens, right-padded.
        attention_mask: ``[B, T]`` 1 on real tokens.
        response_mask: ``[B, T-1]`` 1 on the positions that predict a response token.
        rollout_logprobs: ``[B, T-1]`` the replicas' log-probs of the sampled tokens.
        old_logprobs: ``[B, T-1]`` the trainer's log-probs under the rollout policy's weights.
        reference_logprobs: ``[B, T-1]`` the reference model's.
        values: ``[B, T-1]`` the critic's values at rollout time (the "old" values of the value loss).
        scores: ``[B]`` the reward of each row.
        advantages: ``[B, T-1]``.
        returns: ``[B, T-1]`` the critic's targets (estimators with a critic).
        importance_weights: ``[B, T-1]`` truncated trainer/rollout ratios (``rollout.truncated_is``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rollout_logprobs: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    reference_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    importance_weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def keep(self, *names: str) -> Experience:
        """The sequences, the response mask and the fields ``names``; the others None (what a role needs)."""
        kept = {*SEQUENCE_FIELDS, "response_mask", *names}
        dropped: dict[str, Any] = {f.name: None for f in fields(self) if f.name not in kept}
        return replace(self, **dropped)

    def rows(self, rows: slice | torch.Tensor) -> Experience:
        """The rows ``rows`` (a slice or an index tensor), trimmed to their longest row's width."""
        part = {name: value[rows] for name, value in self.tensors().items()}
        width = max(int(part["attention_mask"].sum(dim=1).max()), 2) if len(part["attention_mask"]) else 2
        for name, value in part.items():
            if value.dim() == 2:
                part[name] = value[:, : width if name in SEQUENCE_FIELDS else width - 1]
        return Experience(**part)

    def split(self, size: int) -> list[Experience]:
        """Consecutive micro-batches of at most ``size`` rows, each trimmed."""
        return [self.rows(slice(start, min(start + size, len(self)))) for start in range(0, len(self), size)]

    @staticmethod
    def concat(parts: Sequence[Experience]) -> Experience:
        """The rows of ``parts`` in order, right-padded to the widest (the inverse of :meth:`split`)."""
        width = max(part.input_ids.shape[1] for part in parts)
        out: dict[str, torch.Tensor] = {}
        for name in parts[0].tensors():
            pieces = []
            for part in parts:
                value = getattr(part, name)
                if value is None:
                    raise ValueError(f"concat: field {name} is set in the first part but not in every part")
                if value.dim() == 2:
                    target = width if name in SEQUENCE_FIELDS else width - 1
                    value = torch.nn.functional.pad(value, (0, target - value.shape[1]))
                pieces.append(value)
            out[name] = torch.cat(pieces)
        return Experience(**out)

    def to(self, device: torch.device | str) -> Experience:
        """Every set field on ``device``."""
        return replace(self, **{name: value.to(device) for name, value in self.tensors().items()})


def sequence_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int
) -> Experience:
    """The :class:`Experience` of prompt+response rows: ``input_ids``, ``attention_mask``, ``response_mask``.

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
    return Experience(input_ids, attention_mask, response_mask)


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
