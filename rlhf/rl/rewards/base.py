"""The shared part of the reward sources: their protocol, errors, limits and the checks on a batch and a reward."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from cluster.errors import UserError
from rlhf.data.formats import Text

DEFAULT_TIMEOUT_S = 60.0
MAX_RESPONSE_BYTES = 8 << 20
"""The largest answer an HTTP reward endpoint may give (8 MiB: a reward list is a few bytes per response)."""
FORMS = (
    "an http(s) URL of a reward endpoint",
    "a reward-model directory written by `rlhf rm` (its final/ folder)",
    "a Python function package.module:function",
)


class RewardError(UserError, ValueError):
    """A reward source that cannot be built or that failed to score; the message says which and why."""


class RewardTimeoutError(RewardError, TimeoutError):
    """A reward source that gave no answer within its timeout."""


@runtime_checkable
class RewardSource(Protocol):
    """Scores a batch of (prompt, response) pairs; frozen (never trained by RLHF)."""

    def score(
        self,
        prompts: Sequence[Text],
        responses: Sequence[str],
        timeout_s: float = DEFAULT_TIMEOUT_S,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[float]:
        """One finite reward per pair, in order; :class:`RewardError` when that cannot be done.

        ``columns`` holds the prompt rows' other data columns (name -> one value per pair).
        """
        ...


# --- shared checks ---


def _excerpt(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else repr(value)
    if not text:
        return "(empty)"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _check_batch(
    prompts: Sequence[Text], responses: Sequence[str], columns: Mapping[str, Sequence[Any]] | None = None
) -> None:
    if len(prompts) != len(responses):
        raise RewardError(f"{len(prompts)} prompts but {len(responses)} responses: each response needs its prompt")
    for name, values in (columns or {}).items():
        if len(values) != len(responses):
            raise RewardError(f"column {name!r} has {len(values)} values for {len(responses)} responses")
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if not isinstance(response, str):
            raise RewardError(f"response of row {row} is a {type(response).__name__}, not a string")
        if not isinstance(prompt, str | list):
            raise RewardError(f"prompt of row {row} is a {type(prompt).__name__}, not a string or a list of messages")


def _as_reward(value: Any, source: str, row: int) -> float:
    """``value`` as a finite float, or a RewardError naming the source and the row."""
    if isinstance(value, numbers.Real):  # bool, int, float, numpy scalars
        reward = float(value)
        if math.isfinite(reward):
            return reward
        raise RewardError(f"{source} gave {reward} for row {row}: a reward must be finite")
    raise RewardError(
        f"{source} gave {_excerpt(repr(value), 100)} ({type(value).__name__}) for row {row}: not a number"
    )
