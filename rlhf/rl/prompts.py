"""An RL run's prompts: the encoded training and held-out prompts, and which of them each step samples."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from rlhf import seeds

if TYPE_CHECKING:
    from rlhf.rl.config import PPOConfig

EVAL_PROMPTS = 64
"""The most held-out prompts an evaluation samples (one response each)."""


def load_prompts(config: PPOConfig, tokenizer: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Encoded training prompts and (when ``data.eval_split`` or ``data.eval_path`` is set) held-out prompts."""
    from rlhf.data.encode import build_examples

    data = config.data
    train = build_examples(data, tokenizer, "prompt")
    evaluation: list[dict[str, Any]] = []
    if data.eval_split or data.eval_path:
        evaluation = build_examples(data, tokenizer, "prompt", split=data.eval_split or data.split, path=data.eval_path)
    return train, evaluation[:EVAL_PROMPTS]


def prompts_for_step(num_prompts: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the prompts of ``step`` (0-based): consecutive positions of a fresh shuffle per epoch.

    Position ``p = step * per_step + j`` is prompt ``order(epoch)[p % N]`` with ``epoch = p // N``,
    so the prompt position after ``k`` steps is ``k * per_step`` and resuming needs only the step.
    """
    indices = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, num_prompts)
        order = list(range(num_prompts))
        random.Random(seeds.position(seed, epoch)).shuffle(order)
        indices.append(order[offset])
    return indices
