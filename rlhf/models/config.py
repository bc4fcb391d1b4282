"""Typed configuration of a model: where it comes from, LoRA, quantization."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters through peft."""

    enabled: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    r: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA path"})
    target_modules: tuple[str, ...] = field(
        default=("all-linear",), metadata={"help": "module names to adapt; all-linear adapts every linear layer"}
    )
    merge_on_save: bool = field(
        default=True,
        metadata={
            "help": "also write the base model with the adapters merged in (the adapter directory is always written)"
        },
    )


@dataclass(frozen=True)
class ModelConfig:
    """A causal LM or scalar-head model from a hub id or a local directory."""

    name_or_path: str = field(
        default="tiny",
        metadata={"help": "hub id or local directory; `tiny` is the project's tiny local model, built on first use"},
    )
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer hub id or directory (empty: the model's)"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "run modelling code shipped with the model (off: only transformers' own)"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward to save memory"}
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "attention kernel: sdpa, eager, flash_attention_2 (GPU)"}
    )
    quantization: Literal["none", "4bit", "8bit"] = field(
        default="none",
        metadata={
            "help": "load the base weights quantized with bitsandbytes (4bit = QLoRA nf4 with double quant; needs lora.enabled)"
        },
    )
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapters"})

    def __post_init__(self) -> None:
        if self.quantization != "none" and not self.lora.enabled:
            raise ValueError(
                f"model.quantization={self.quantization} trains nothing without adapters: set model.lora.enabled=true"
            )
