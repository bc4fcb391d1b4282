"""Models: tiny init, causal LM and scalar heads, LoRA and QLoRA, Hugging Face export and merge."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf.models.config import LoraConfig, ModelConfig
from rlhf.models.init_model import TinyModelSpec, init_model
from rlhf.models.loading import ModelLoadError, load_causal_lm, load_scalar_model, load_tokenizer, save_pretrained


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> ModelConfig:
    return ModelConfig(name_or_path=str(tiny_model_dir))


def _batch(config: ModelConfig) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(config)
    return tokenizer(["The cat is warm and kind.", "Describe the dog."], return_tensors="pt", padding=True)


def test_tiny_model_has_a_head_size_vllm_supports_and_a_chat_template(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert (tiny_model_dir / "model.safetensors").is_file()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_init_model_refuses_unsupported_head_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="head size 40"):
        init_model(tmp_path, TinyModelSpec(hidden_size=120, num_heads=3))


def test_lora_trains_only_adapters_and_merges_into_a_plain_model(base: ModelConfig, tmp_path: Path) -> None:
    config = replace(base, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    model = load_causal_lm(config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in model.named_parameters():  # move the adapters away from their zero init
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    batch = _batch(config)
    expected = model(**batch).logits
    out = save_pretrained(model, load_tokenizer(config), tmp_path / "final", base_config=config, merge_lora=True)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "model.safetensors").is_file()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.name_or_path), out / "adapter")
    torch.testing.assert_close(adapter(**batch).logits, expected, atol=1e-4, rtol=1e-4)


def test_qlora_loads_4bit_nf4_trains_adapters_and_exports_merged(base: ModelConfig, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    config = replace(base, quantization="4bit", lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    model = load_causal_lm(config)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and four_bit[0].weight.quant_type == "nf4"
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = _batch(config)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))
    out = save_pretrained(model, load_tokenizer(config), tmp_path / "final", base_config=config, merge_lora=True)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())  # a plain model for vLLM


def test_gradient_checkpointing_is_enabled(base: ModelConfig) -> None:
    model = load_causal_lm(replace(base, gradient_checkpointing=True))
    assert model.is_gradient_checkpointing
    batch = _batch(base)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_scalar_model_scores_each_sequence_and_lora_keeps_the_head_trainable(base: ModelConfig) -> None:
    model = load_scalar_model(base)
    batch = _batch(base)
    assert model(**batch).logits.shape == (2, 1)
    lora = load_scalar_model(replace(base, lora=LoraConfig(enabled=True, r=4)))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable)
    assert any("lora_" in n for n in trainable)


def test_frozen_model_has_no_grads(base: ModelConfig) -> None:
    model = load_causal_lm(base, trainable=False)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_remote_code_runs_only_when_the_config_allows_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    custom = tmp_path / "custom"
    custom.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.is_file():
            (custom / f.name).write_bytes(f.read_bytes())
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (custom / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "remote-code-ran"
    (custom / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")

    model = load_causal_lm(ModelConfig(name_or_path=str(custom)))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists(), "remote code ran although trust_remote_code is off"
    with pytest.raises(ModelLoadError):  # the shipped module runs, then lacks the class it names
        load_causal_lm(ModelConfig(name_or_path=str(custom), trust_remote_code=True))
    assert marker.exists()


def test_missing_model_gets_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model directory .*no-such-model does not exist"):
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "no-such-model")))
