"""The scaling benchmark's arithmetic: parameter counts of published shapes and the ring algorithms' bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.scaling import PUBLISHED, Architecture, CollectiveCounter, wire_bytes


def transformers_count(config: object) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: a 70B model costs no memory
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_published_shape_counts_the_parameters_transformers_builds(name: str) -> None:
    from transformers import LlamaConfig, Qwen2Config

    shape = PUBLISHED[name]
    kind = Qwen2Config if shape.qkv_bias else LlamaConfig  # Qwen2 is Llama with q/k/v biases
    config = kind(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied,
    )
    assert shape.parameters() == transformers_count(config)


def test_the_tiny_models_config_counts_its_own_parameters(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert Architecture.from_config(config).parameters() == transformers_count(
        AutoConfig.from_pretrained(tiny_model_dir)
    )


def test_ring_bytes_per_rank() -> None:
    # an all-reduce sends twice (N-1)/N of its payload, a reduce-scatter and an all-gather once, a broadcast all of it
    assert wire_bytes({"all_reduce": 100.0}, 2) == 100.0
    assert wire_bytes({"all_reduce": 100.0}, 8) == 175.0
    assert wire_bytes({"reduce_scatter_tensor": 80.0, "all_gather_into_tensor": 80.0}, 8) == 140.0
    assert wire_bytes({"broadcast": 10.0}, 64) == 10.0


def test_the_payload_of_a_gather_or_scatter_is_the_whole_tensor() -> None:
    import torch

    whole, shard = torch.zeros(8), torch.zeros(4)
    assert CollectiveCounter.size("all_gather_into_tensor", (whole, shard), {}) == 32
    assert CollectiveCounter.size("reduce_scatter_tensor", (shard, whole), {}) == 32
    assert CollectiveCounter.size("all_reduce", (), {"tensor": whole.to(torch.bfloat16)}) == 16
