"""Every random stream the project draws, derived from a configured seed by purpose, in one place.

A run has one ``train.seed`` (and ``data.shuffle_seed`` for the prompt order); each purpose mixes
it with the position it is drawn for (an epoch, a step, a round, a rank) through its own function
here, so two purposes never share a stream by accident and a resumed run draws what an unbroken
run would have drawn at the same position.
"""

from __future__ import annotations

from typing import Literal

_SPREAD = 1_000_003
"""A prime larger than any count of positions a run draws for: ``seed * _SPREAD + position`` keeps the streams of
neighbouring seeds apart."""


def position(seed: int, index: int) -> int:
    """The seed of draw ``index`` (an epoch's prompt order, a round's prompts, a prompt's few-shot examples)."""
    return seed * _SPREAD + index


def held_out(seed: int) -> int:
    """The seed of a task's held-out split: far from the training seeds of neighbouring runs."""
    return seed + _SPREAD


def generation(seed: int, step: int) -> int:
    """The seed of the rollout replicas' sampling at RL step ``step``."""
    return seed * 1_000_000 + step * 10_007


def mini_batch_order(seed: int, step: int, epoch: int) -> int:
    """The seed of the shuffle of a step's experience into mini-batches, per PPO epoch."""
    return seed * _SPREAD + step * 101 + epoch


def worker(seed: int, role: Literal["policy", "value"], rank: int) -> int:
    """The seed a trainable role's rank starts from (initialised heads, dropout)."""
    return seed + (1000 if role == "value" else 0) + rank
