"""The policy's forward and loss on one micro-batch, from the first response position on.

The prompt's positions need no logits: only the positions that predict a response token enter the log-probs and
the loss. Where the model's forward can skip positions (transformers' ``logits_to_keep``), its output layer runs on
the response positions only; every per-token input is cut at the same position. The policy and reference workers
(:mod:`rlhf.rl.workers`) call these; the math of the objective is :mod:`rlhf.algos.objective`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from rlhf.algos.objective import PolicyObjective
from rlhf.models.logits import takes_logits_to_keep

if TYPE_CHECKING:
    from rlhf.rl.experience import Experience


def first_response_position(batch: Experience) -> int:
    """The first of the ``T-1`` predicting positions at which any row's response starts (0 for no response)."""
    columns = batch.response_mask.any(dim=0).nonzero()
    return int(columns[0]) if len(columns) else 0


def causal_logits(model: Callable[..., Any], batch: Experience, temperature: float, start: int = 0) -> torch.Tensor:
    """Logits ``[B, T-1-start, V]`` predicting tokens ``start+1..T-1``, divided by the sampling temperature.

    With ``start`` > 0 the model's output layer runs on those positions only (``logits_to_keep``) where the model
    can do that; the prompt's positions before it need no logits, and on a real vocabulary (49k-150k) their
    logits and the softmaxes over them are a large part of the update's work.
    """
    width = batch.input_ids.shape[1]
    keep = {"logits_to_keep": width - start} if start and takes_logits_to_keep(model) else {}
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **keep)
    logits: torch.Tensor = out.logits[:, -(width - start) : -1].float() / temperature
    return logits


def response_logprobs(
    model: Callable[..., Any], batch: Experience, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """From the first response position ``start`` on: the logits ``[B, T-1-start, V]``, the log-probs
    ``[B, T-1-start]`` of the batch's next tokens (0 off the response positions), and ``start``."""
    from rlhf.algos import token_logprobs

    start = first_response_position(batch)
    logits = causal_logits(model, batch, temperature, start)
    logprobs = token_logprobs(logits, batch.input_ids[:, start + 1 :])
    return logits, torch.where(batch.response_mask[:, start:].bool(), logprobs, 0.0), start


def causal_logprobs(model: Callable[..., Any], batch: Experience, temperature: float) -> torch.Tensor:
    """Log-prob ``[B, T-1]`` of every next token (0 off the response positions)."""
    _, logprobs, start = response_logprobs(model, batch, temperature)
    return torch.nn.functional.pad(logprobs, (start, 0))


def policy_loss(
    model: Callable[..., Any],
    batch: Experience,
    denominator: dict[str, float],
    objective: PolicyObjective,
    temperature: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy's loss on one micro-batch and its metrics (:func:`~rlhf.algos.objective.policy_objective`),
    from the first response position on; without ``old_logprobs`` also the trainer-vs-rollout log-prob gap."""
    from rlhf.algos.objective import policy_objective
    from rlhf.rl.experience import logprob_gap, need

    logits, logprobs, start = response_logprobs(model, batch, temperature)

    def tail(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else values[:, start:]

    mask = batch.response_mask[:, start:]
    gap: dict[str, torch.Tensor] = {}
    if batch.old_logprobs is None:
        gap = logprob_gap(logprobs.detach(), need(tail(batch.rollout_logprobs), "rollout_logprobs"), mask)
        gap.pop("logprob_gap_max")  # a token-weighted mean over ranks is not a max
    loss, metrics = policy_objective(
        logits,
        logprobs,
        need(tail(batch.advantages), "advantages"),
        mask,
        objective,
        old_logprobs=tail(batch.old_logprobs),
        reference_logprobs=tail(batch.reference_logprobs),
        importance_weights=tail(batch.importance_weights),
        num_tokens=denominator["num_tokens"],
        num_sequences=denominator["num_sequences"],
    )
    return loss, metrics | gap
