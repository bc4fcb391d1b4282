"""``rlhf init-model``: a tiny Llama-style causal LM and a locally trained tokenizer.

Nothing here touches the model hub. The tokenizer is a byte-level BPE trained with
``tokenizers`` on the bundled toy-world corpus (byte-level, so any text still encodes),
wrapped in ``PreTrainedTokenizerFast`` with pad/eos tokens and a ChatML-style chat
template whose assistant turns carry ``{% generation %}`` markers. The model has a head
size of 64, which vLLM's CPU and GPU attention backends support.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|im_end|>"
IM_START = "<|im_start|>"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model. ``hidden_size / num_heads`` must be a head size vLLM supports (64)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2
    vocab_size: int = 1024
    max_position_embeddings: int = 1024
    seed: int = 0
    tie_word_embeddings: bool = False
    """Whether the output layer is the input embeddings (as in SmolLM2, Qwen2.5, Llama-3.2, Gemma)."""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``; return a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN, IM_START],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=1024,
    )


def init_model(output_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Build the tiny model and tokenizer and save both to ``output_dir`` (Hugging Face format)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from cluster.configtree import ConfigError
    from rlhf.data.bundled import corpus

    if spec.hidden_size % spec.num_heads:
        raise ConfigError(f"hidden_size {spec.hidden_size} is not divisible by num_heads {spec.num_heads}")
    head_dim = spec.hidden_size // spec.num_heads
    if head_dim not in (32, 64, 80, 96, 112, 128, 256):
        raise ConfigError(f"head size {head_dim} is not one vLLM supports; use e.g. hidden 128 with 2 heads")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus(), spec.vocab_size)
    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=spec.tie_word_embeddings,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
