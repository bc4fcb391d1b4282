"""Padding, the chosen+rejected batch, sharding, and padding-free packing checked against the tiny model."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.data.collate import collate_packed, collate_sft, pack_examples, pad_batch, preference_batch, shard
from rlhf.data.config import DataConfig
from rlhf.data.encode import build_examples
from rlhf.models.init_model import init_model

PAD = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    init_model(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def sft(length: int, start: int = 1, prompt: int = 1) -> dict[str, list[int]]:
    ids = list(range(start, start + length))
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}


def test_pad_batch_right_pads_with_mask():
    batch = pad_batch([sft(3), sft(1)], pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_batch_scalar_keys():
    examples = [{**sft(2), "label": True}, {**sft(3), "label": False}]
    batch = pad_batch(examples, PAD, ("input_ids", "labels", "label"))
    assert batch["label"].tolist() == [True, False] and batch["input_ids"].shape == (2, 3)


def test_preference_batch_puts_chosen_first():
    examples = [
        {
            "chosen_input_ids": [1, 2],
            "chosen_labels": [-100, 2],
            "rejected_input_ids": [1, 3, 4],
            "rejected_labels": [-100, 3, 4],
        },
        {"chosen_input_ids": [5], "chosen_labels": [5], "rejected_input_ids": [6, 7], "rejected_labels": [-100, 7]},
    ]
    batch = preference_batch(examples, PAD)
    assert batch["input_ids"].tolist() == [[1, 2, PAD], [5, PAD, PAD], [1, 3, 4], [6, 7, PAD]]
    assert batch["labels"].tolist() == [[-100, 2, -100], [5, -100, -100], [-100, 3, 4], [-100, 7, -100]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 1, 3, 2]


def test_pack_examples_structure():
    examples = [sft(n, start=10 * i, prompt=0) for i, n in enumerate([5, 3, 7, 2, 4, 6])]
    packs = pack_examples(examples, max_length=10)
    assert all(len(p["input_ids"]) <= 10 for p in packs)
    assert len(packs) == 3  # 27 tokens; best-fit decreasing reaches the minimum
    assert sorted(t for p in packs for t in p["input_ids"]) == sorted(t for e in examples for t in e["input_ids"])
    for pack in packs:
        assert len(pack["input_ids"]) == len(pack["labels"]) == len(pack["position_ids"])
        starts = [i for i, position in enumerate(pack["position_ids"]) if position == 0]
        for start, end in zip(starts, [*starts[1:], len(pack["input_ids"])], strict=True):
            assert pack["position_ids"][start:end] == list(range(end - start))
            assert pack["labels"][start] == -100  # nothing predicted across the boundary
            assert pack["labels"][start + 1 : end] == pack["input_ids"][start + 1 : end]
    assert pack_examples(examples, 10) == packs  # deterministic


def test_pack_rejects_over_long_examples():
    with pytest.raises(ValueError, match="truncate before packing"):
        pack_examples([sft(11)], max_length=10)


def test_collate_packed_has_no_attention_mask():
    packs = pack_examples([sft(4), sft(3), sft(2)], max_length=7)
    batch = collate_packed(packs, PAD)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (2, 7)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]  # padding: own run
    assert batch["labels"][1, 2:].tolist() == [-100] * 5
    assert set(collate_sft(packs, PAD)) == set(batch)
    assert "attention_mask" in collate_sft([sft(2)], PAD)


def _segments(pack: dict[str, list[int]]) -> list[tuple[int, int]]:
    starts = [i for i, position in enumerate(pack["position_ids"]) if position == 0]
    return list(zip(starts, [*starts[1:], len(pack["input_ids"])], strict=True))


def test_packed_logits_equal_separate_logits(tiny):
    """transformers reads restarting position_ids (no attention_mask, no cache) as separate sequences."""
    model, tokenizer = tiny
    assert model.config._attn_implementation == "sdpa"
    examples = build_examples(DataConfig(path="bundled:sft_messages", max_rows=5), tokenizer, "sft")
    examples += build_examples(DataConfig(path="bundled:sft_prompt_completion", max_rows=4), tokenizer, "sft")
    packs = pack_examples(examples, max_length=160)
    assert len(packs) < len(examples) and len({len(p["input_ids"]) for p in packs}) > 1  # packed, and padded
    batch = collate_packed(packs, tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = {tuple(e["input_ids"]): model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples}
    compared = 0
    for row, pack in enumerate(packs):
        for start, end in _segments(pack):  # the pack itself has no padding; the batch row may
            expected = alone[tuple(pack["input_ids"][start:end])]
            torch.testing.assert_close(packed[row, start:end], expected, atol=1e-5, rtol=0)
            compared += 1
    assert compared == len(examples)


def test_packed_rows_leak_when_a_cache_is_created(tiny):
    """Pitfall: with use_cache on (the config default), transformers skips packed-sequence detection."""
    model, tokenizer = tiny
    examples = build_examples(DataConfig(path="bundled:sft_prompt_completion", max_rows=2), tokenizer, "sft")
    (pack,) = pack_examples(examples, max_length=64)
    batch = collate_packed([pack], tokenizer.pad_token_id)
    _, second = _segments(pack)
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone = model(input_ids=torch.tensor([pack["input_ids"][second[0] :]])).logits[0]
    assert (leaky[second[0] :] - alone).abs().max() > 1e-3


def test_build_examples_with_packing(tiny):
    _, tokenizer = tiny
    config = DataConfig(path="bundled:sft_alpaca", max_rows=20, packing=True, max_length=64)
    packs = build_examples(config, tokenizer, "sft")
    assert len(packs) < 20 and all("position_ids" in p and len(p["input_ids"]) <= 64 for p in packs)
    assert sum(p["position_ids"].count(0) for p in packs) == 20
    with pytest.raises(ValueError, match="packing is supported for sft and preference data only, not prompt"):
        build_examples(replace(config, path="bundled:prompts"), tokenizer, "prompt")
    # preference pairs stay whole; the DPO objective packs them per micro-batch
    pairs = build_examples(replace(config, path="bundled:preference"), tokenizer, "preference")
    assert len(pairs) == 20 and "chosen_input_ids" in pairs[0]


def test_shard_is_strided_with_equal_counts(caplog):
    examples = list(range(10))
    with caplog.at_level(logging.WARNING, logger="rlhf.data.collate"):
        shards = [shard(examples, rank, 4) for rank in range(4)]
    assert shards == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert "dropped the last 2 of 10 examples" in caplog.text
    assert shard(examples, 1, 2) == [1, 3, 5, 7, 9]
    with pytest.raises(ValueError):
        shard(examples, 4, 4)
