"""A model exported by rlhf (here a LoRA model merged on save) loads in vLLM unchanged,
and vLLM's greedy generation equals transformers' on the same prompts."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = ["Describe the cat.", "Tell me about the river."]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlhf.models.config import LoraConfig, ModelConfig
    from rlhf.models.loading import load_causal_lm, load_tokenizer, save_pretrained

    config = ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(enabled=True, r=4, dropout=0.0))
    model = load_causal_lm(config)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    return save_pretrained(
        model, load_tokenizer(config), tmp_path_factory.mktemp("export") / "final", base_config=replace(config)
    )


def _transformers_greedy(model_dir: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        outputs.append(out[0, ids.shape[1] :].tolist())
    return outputs


def test_vllm_generates_what_transformers_generates(exported: Path) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(exported), dtype="float32", max_model_len=256, seed=0, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    vllm_ids = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
    del llm
    assert vllm_ids == _transformers_greedy(exported)
