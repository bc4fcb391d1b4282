"""Which examples each optimizer step reads: a pure function of the step number.

Because the order depends only on ``(seed, epoch)``, a resumed run reads exactly the
batches the interrupted one would have read, with no data-loader state to save.
"""

from __future__ import annotations


def steps_per_epoch(num_examples: int, micro_batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one pass over ``num_examples`` examples (a partial last step is dropped)."""
    return num_examples // (micro_batch_size * accumulation)


def step_indices(num_examples: int, step: int, micro_batch_size: int, accumulation: int, seed: int) -> list[list[int]]:
    """The example indices of each micro-batch of optimizer step ``step`` (0-based).

    Every epoch is a fresh permutation seeded by ``seed + epoch``; returns
    ``accumulation`` lists of ``micro_batch_size`` indices.
    """
    import torch

    per_epoch = steps_per_epoch(num_examples, micro_batch_size, accumulation)
    if per_epoch == 0:
        raise ValueError(
            f"{num_examples} examples per rank cannot fill one step of "
            f"{micro_batch_size} x {accumulation}; lower the batch size or add data"
        )
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
    per_step = micro_batch_size * accumulation
    chosen = order[offset * per_step : (offset + 1) * per_step].tolist()
    return [chosen[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(accumulation)]
