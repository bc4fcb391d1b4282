"""Batches: padding, padding-free packing, the chosen+rejected layout, and data-parallel sharding.

Labels are *unshifted* (Hugging Face convention): ``labels[t]`` is the target at position ``t``, predicted
from positions ``< t``; ``-100`` (:data:`IGNORE_INDEX`) is never a target.

Packing (padding-free): several SFT examples share one row; ``position_ids`` restart at 0 at each example
and no ``attention_mask`` is passed. transformers (``masking_utils.find_packed_sequence_indices``) then
reads each restart of ``position_ids`` as a new sequence and builds a block-diagonal causal mask, so every
example attends only to itself. The first label of every example is -100 so that no token is predicted
across an example boundary.

**Call the model with ``use_cache=False`` on packed batches.** transformers 5.19 detects packed sequences
only when ``attention_mask`` *and* ``past_key_values`` are None, and Llama-style models create a cache
whenever ``use_cache`` is on, which is the config default even in train mode. With the default, the examples
of a row silently attend to each other. Both facts are checked in ``tests/unit/test_data_collate.py`` (with
``use_cache=False`` the logits of a packed row equal those of each example run alone, sdpa attention,
atol 1e-5; with the default they do not).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)


def _pad_value(key: str, pad_token_id: int) -> int:
    if key.endswith("labels"):
        return IGNORE_INDEX
    if key.endswith("ids") and "position" not in key:
        return pad_token_id
    return 0


def pad_batch(
    examples: Sequence[dict[str, Any]], pad_token_id: int, keys: Sequence[str] = ("input_ids", "labels")
) -> dict[str, torch.Tensor]:
    """Right-pad the list-valued ``keys`` of ``examples`` to the longest one.

    ``*input_ids`` / ``*_ids`` are padded with ``pad_token_id``, ``*labels`` with -100, anything else
    with 0. Each ``<prefix>input_ids`` key also gives ``<prefix>attention_mask`` (1 on real tokens).
    Scalar keys (e.g. ``label``) are stacked.

    Returns:
        ``{key: LongTensor [B, T]}`` (scalar keys: ``[B]``; ``label``: bool ``[B]``).
    """
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [example[key] for example in examples]
        if not isinstance(values[0], (list, tuple)):
            batch[key] = torch.tensor(values)
            continue
        length = max(len(v) for v in values)
        fill = _pad_value(key, pad_token_id)
        batch[key] = torch.tensor([list(v) + [fill] * (length - len(v)) for v in values], dtype=torch.long)
        if key.endswith("input_ids"):
            mask_key = key[: -len("input_ids")] + "attention_mask"
            batch[mask_key] = torch.tensor([[1] * len(v) + [0] * (length - len(v)) for v in values], dtype=torch.long)
    return batch


def preference_batch(examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected sequences in one padded batch, for a single "concatenated" forward pass.

    Rows ``0..B-1`` are the chosen responses, rows ``B..2B-1`` the rejected ones, in the same order.

    Returns:
        ``input_ids``, ``labels``, ``attention_mask``: ``[2B, T]`` with ``T`` the longest of both.
    """
    stacked = [{"input_ids": e["chosen_input_ids"], "labels": e["chosen_labels"]} for e in examples]
    stacked += [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples]
    return pad_batch(stacked, pad_token_id, ("input_ids", "labels"))


def packed_preference_batch(examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Chosen then rejected sequences of ``examples`` concatenated into one padding-free row.

    The same sequences as :func:`preference_batch` (chosen ``0..B-1``, rejected ``B..2B-1``), with no
    padding: ``position_ids`` restart at 0 for each sequence, which transformers uses to keep attention
    within it (run the model without ``attention_mask`` and with ``use_cache=False``).

    Returns:
        ``input_ids``, ``labels``, ``position_ids``: ``[1, N]`` with ``N`` the total length; each
        sequence's first label is ignored, so no token is scored across a boundary.
        ``sequence_ids``: ``[N]``, the sequence (row of :func:`preference_batch`) of every token.
    """
    pairs = [(e["chosen_input_ids"], e["chosen_labels"]) for e in examples]
    pairs += [(e["rejected_input_ids"], e["rejected_labels"]) for e in examples]
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    sequence_ids: list[int] = []
    for index, (ids, labs) in enumerate(pairs):
        input_ids += ids
        labels += [IGNORE_INDEX, *labs[1:]]
        position_ids += range(len(ids))
        sequence_ids += [index] * len(ids)
    row = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    batch = {key: torch.tensor([values], dtype=torch.long) for key, values in row.items()}
    batch["sequence_ids"] = torch.tensor(sequence_ids, dtype=torch.long)
    return batch


def pack_examples(examples: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack SFT examples (``input_ids``, ``labels``) into sequences of at most ``max_length`` tokens.

    Greedy best-fit decreasing: longest examples first, each into the fullest pack it still fits (a new
    pack when none fits). Deterministic; packs are returned in creation order (longest first), and every
    example lands in exactly one pack.

    Each pack has ``input_ids`` and ``labels`` (concatenated, the first label of every example set to
    -100) and ``position_ids`` restarting at 0 at every example.

    Raises:
        ValueError: an example longer than ``max_length`` (truncate before packing).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    packs: list[list[int]] = []  # example indices per pack
    free: list[tuple[int, int]] = []  # (room left, pack index), sorted
    for i in order:
        length = len(examples[i]["input_ids"])
        if length > max_length:
            raise ValueError(f"example {i} has {length} tokens > max_length {max_length}; truncate before packing")
        slot = bisect.bisect_left(free, (length, -1))  # the pack with the least room that still fits
        if slot == len(free):
            packs.append([i])
            room, pack = max_length - length, len(packs) - 1
        else:
            room, pack = free.pop(slot)
            packs[pack].append(i)
            room -= length
        bisect.insort(free, (room, pack))
    return [_concatenate([examples[i] for i in pack]) for pack in packs]


def _concatenate(examples: Sequence[dict[str, list[int]]]) -> dict[str, list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        input_ids += example["input_ids"]
        labels += [IGNORE_INDEX, *example["labels"][1:]]
        position_ids += range(len(example["input_ids"]))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate_packed(packs: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Packed sequences as a padding-free batch: ``input_ids``, ``labels``, ``position_ids`` ``[B, L]``, no mask.

    When ``B > 1`` shorter rows are right-padded (pad id, label -100) and their padding gets its own
    ``position_ids`` run from 0, so transformers treats it as one more (ignored) sequence.
    There is deliberately no ``attention_mask``: passing one disables packed-sequence detection; so does a
    KV cache, so run the model with ``use_cache=False`` (see the module docstring).
    """
    length = max(len(p["input_ids"]) for p in packs)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for pack in packs:
        pad = length - len(pack["input_ids"])
        batch["input_ids"].append(list(pack["input_ids"]) + [pad_token_id] * pad)
        batch["labels"].append(list(pack["labels"]) + [IGNORE_INDEX] * pad)
        batch["position_ids"].append(list(pack["position_ids"]) + list(range(pad)))
    return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}


def collate_sft(items: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Collate SFT items: packed ones (with ``position_ids``) padding-free, others padded with a mask."""
    if "position_ids" in items[0]:
        return collate_packed(items, pad_token_id)
    return pad_batch(items, pad_token_id, ("input_ids", "labels"))


def shard(examples: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """The examples of data-parallel ``rank``: a *strided* shard, ``examples[rank::world_size]``.

    Strided, so that global step ``s`` with per-rank batch ``b`` covers consecutive examples
    ``s*b*world_size ...`` across ranks, as a single process would. Every rank gets the same count,
    ``len(examples) // world_size``: the last ``len(examples) % world_size`` examples are dropped
    (and the count logged), so no rank waits on a missing batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    usable = len(examples) - len(examples) % world_size
    dropped = len(examples) - usable
    if dropped:
        logger.warning(
            "shard: dropped the last %d of %d examples so each of %d ranks gets %d",
            dropped,
            len(examples),
            world_size,
            usable // world_size,
        )
    return list(examples[rank:usable:world_size])
