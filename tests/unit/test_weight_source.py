"""What the policy sends to the rollout replicas: every weight under the name the replicas' model knows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlhf.models.init_model import TinyModelSpec, init_model

    return init_model(tmp_path_factory.mktemp("tied") / "model", TinyModelSpec(tie_word_embeddings=True))


def test_a_lora_policy_is_sent_as_its_merged_model_under_the_base_names(tied_dir: Path) -> None:
    """Before: a LoRA policy was refused by rlhf ppo; the plain module source would have sent peft's own names
    (``base_model.model....q_proj.base_layer.weight``, ``lora_A``), which no replica loads."""
    import copy

    from transformers import AutoModelForCausalLM

    from rlhf.models.config import LoraConfig
    from rlhf.models.loading import apply_lora
    from rlhf.rl.weight_source import MergedLoraSource, weight_source

    base = AutoModelForCausalLM.from_pretrained(tied_dir)
    expected_names = [name for name, _ in base.named_parameters()]  # the tied output layer is not one of them
    assert not any(name.startswith("lm_head") for name in expected_names)
    peft_model = apply_lora(copy.deepcopy(base), LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.1)  # trained adapters: B is no longer zero
    source = weight_source(peft_model, zero_stage=0)
    assert isinstance(source, MergedLoraSource)
    sent = dict(source)
    assert list(sent) == expected_names == [meta.name for meta in source.metadata()]
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert all(torch.allclose(sent[name], merged[name], atol=1e-6) for name in expected_names)
    changed = [name for name in expected_names if not torch.equal(sent[name], base.state_dict()[name])]
    assert changed and all(name.endswith("proj.weight") for name in changed)
    with pytest.raises(ValueError, match="engine.zero_stage 0-2"):
        weight_source(peft_model, zero_stage=3)


def test_ppo_refuses_a_quantized_policy_and_a_lora_policy_under_zero3() -> None:
    from cluster import configtree
    from rlhf.rl.config import PPOConfig

    with pytest.raises(configtree.ConfigError, match="policy.quantization"):
        configtree.load(PPOConfig, None, ["policy.quantization=4bit", "policy.lora.enabled=true"])
    with pytest.raises(configtree.ConfigError, match="engine.zero_stage 0-2"):
        configtree.load(PPOConfig, None, ["policy.lora.enabled=true", "engine.zero_stage=3"])
