"""Several reward sources summed with weights (``PPOConfig.rewards``), each kept for the logs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rlhf.data.formats import Text
from rlhf.rl.rewards.base import DEFAULT_TIMEOUT_S, RewardError, RewardSource


class WeightedReward:
    """The weighted sum of several reward sources, each kept for logging (``PPOConfig.rewards``).

    Args:
        terms: ``(name, source, weight)`` per component, names unique.
    """

    def __init__(self, terms: Sequence[tuple[str, RewardSource, float]]) -> None:
        if not terms:
            raise RewardError("config key 'rewards': give at least one reward source")
        names = [name for name, _, _ in terms]
        if len(set(names)) != len(names):
            raise RewardError(f"config key 'rewards': names must be unique, got {names}")
        self.terms = list(terms)

    def __repr__(self) -> str:
        return " + ".join(f"{weight:g} * {source!r}" for _, source, weight in self.terms)

    def score_parts(
        self,
        prompts: Sequence[Text],
        responses: Sequence[str],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> tuple[list[float], dict[str, list[float]]]:
        """The weighted sums and each component's own (unweighted) rewards, by name."""
        parts = {name: source.score(prompts, responses, timeout_s, columns) for name, source, _ in self.terms}
        totals = [sum(weight * parts[name][row] for name, _, weight in self.terms) for row in range(len(responses))]
        return totals, parts

    def score(
        self,
        prompts: Sequence[Text],
        responses: Sequence[str],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[float]:
        """The weighted sums."""
        return self.score_parts(prompts, responses, timeout_s, columns)[0]
