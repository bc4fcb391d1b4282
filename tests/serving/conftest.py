"""One live endpoint for the serving tier: the tiny model plus a LoRA adapter, 2 vLLM (CPU) replicas,
API keys, on 127.0.0.1. Starting it costs about a minute, so the package shares it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster.connect import free_port

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

API_KEY = "test-key"
MAX_MODEL_LEN = 256
LIMITS = {
    "max_tokens_limit": 64,
    "default_max_tokens": 16,
    "max_n": 4,
    "max_logprobs": 5,
    "max_stop": 2,
    "max_prompts": 4,
}
MAX_TOKENS_LIMIT = LIMITS["max_tokens_limit"]


@dataclass(frozen=True)
class Endpoint:
    url: str
    base_model: str
    adapter: str
    adapter_dir: Path
    model_dir: Path
    config: Any
    """The endpoint's ``ServeConfig``."""


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter with non-zero random weights, so its outputs differ from the base model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="package")
def endpoint(ray_cluster, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from ray import serve

    from serving.config import ServeConfig
    from serving.server import start

    adapter_dir = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "positive")
    config = ServeConfig(
        model=str(tiny_model_dir),
        model_name="tiny",
        adapters={"positive": str(adapter_dir)},
        port=free_port(),
        api_keys=(API_KEY,),
        min_replicas=2,
        max_replicas=2,
        max_model_len=MAX_MODEL_LEN,
        **LIMITS,
    )
    url = start(config, timeout_s=600)
    yield Endpoint(url, "tiny", "positive", adapter_dir, tiny_model_dir, config)
    serve.shutdown()
