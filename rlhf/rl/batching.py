"""How a step's :class:`~rlhf.rl.experience.Experience` is cut for the ranks of a role group, and put back together.

Pure functions of tensors and numbers (no Ray): :mod:`rlhf.rl.roles` uses them to shard a pass
over a group's ranks, gather its ``[b, t]`` answers into one ``[B, T-1]`` tensor, deal the PPO
epochs' shuffled mini-batches to the ranks, and add the ranks' metric sums up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf import seeds
from rlhf.rl.experience import Experience, split_rows


@dataclass(frozen=True)
class UpdateSchedule:
    """How a step's experience is replayed: ``epochs`` passes, each shuffled (seeded by ``seed`` and the step)
    into ``mini_batches`` optimizer steps."""

    epochs: int
    mini_batches: int
    seed: int

    @property
    def shuffles(self) -> bool:
        """Whether the rows are shuffled: only when there is more than one optimizer step to order."""
        return self.epochs * self.mini_batches > 1


def shard(batch: Experience, ranks: int, micro_batch_size: int) -> tuple[list[list[Experience]], list[slice]]:
    """Per rank, its contiguous rows in micro-batches; and the rows each rank got."""
    slices = split_rows(len(batch), ranks)
    return [batch.rows(rows).split(micro_batch_size) for rows in slices], slices


def gather(per_rank: list[list[torch.Tensor]], width: int) -> torch.Tensor:
    """Per-rank lists of ``[b, t]`` tensors (``t <= width``, in row order) back into one zero-padded ``[B, width]``."""
    parts = [tensor for rank_result in per_rank for tensor in rank_result]
    out = torch.zeros((sum(len(p) for p in parts), width))
    row = 0
    for part in parts:
        out[row : row + len(part), : part.shape[1]] = part
        row += len(part)
    return out


def mini_batches(
    experience: Experience, ranks: int, micro_batch_size: int, schedule: UpdateSchedule, step: int
) -> tuple[list[list[list[Experience]]], list[dict[str, float]]]:
    """Per rank: its micro-batches of every mini-batch of every epoch; and each mini-batch's global denominators
    (``num_tokens``, ``num_sequences``), so that the ranks' losses add up to the whole mini-batch's."""
    total = len(experience)
    per_rank: list[list[list[Experience]]] = [[] for _ in range(ranks)]
    denominators = []
    for epoch in range(schedule.epochs):
        shuffled = experience
        if schedule.shuffles:
            generator = torch.Generator().manual_seed(seeds.mini_batch_order(schedule.seed, step, epoch))
            shuffled = experience.rows(torch.randperm(total, generator=generator))
        for mini in split_rows(total, schedule.mini_batches):
            part = shuffled.rows(mini)
            denominators.append({"num_tokens": float(part.response_mask.sum()), "num_sequences": float(len(part))})
            for rank, rows in enumerate(split_rows(len(part), ranks)):
                per_rank[rank].append(part.rows(rows).split(micro_batch_size))
    return per_rank, denominators


ENGINE_STATS = ("grad_norm", "lr", "value_grad_norm")
"""Metrics every rank reports alike (the engine's, after its all-reduce): rank 0's is the group's."""


def combine(per_rank: list[dict[str, float]], extensive: tuple[str, ...]) -> dict[str, float]:
    """Token-weighted means of the ranks' metric sums (``tokens`` weighs them); ``extensive`` metrics are added up;
    :data:`ENGINE_STATS` are rank 0's; times (``time/...``) are the slowest rank's, since the ranks run together."""
    tokens = sum(r["tokens"] for r in per_rank) or 1.0
    combined: dict[str, float] = {}
    for name in per_rank[0]:
        if name == "tokens":
            continue
        if name in ENGINE_STATS:
            combined[name] = per_rank[0][name]
        elif name.startswith("time/"):
            combined[name] = max(r.get(name, 0.0) for r in per_rank)
        elif name in extensive:
            combined[name] = sum(r.get(name, 0.0) for r in per_rank)
        else:
            combined[name] = sum(r.get(name, 0.0) for r in per_rank) / tokens
    return combined
