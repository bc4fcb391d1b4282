"""SmolLM2-135M-Instruct's own chat template (default system prompt, ``<|im_end|>``, pad = eos) through the data
pipeline: what SFT, RM/DPO and PPO train on and sample from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.data.config import DataConfig
from rlhf.data.encode import build_examples

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CHAT = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "4 + 4 = 8."},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    from rlhf.models.config import ModelConfig
    from rlhf.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(smollm2_dir)))


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_the_tokenizer_has_smollm2s_template_and_pads_with_eos(tokenizer) -> None:
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.apply_chat_template(CHAT[:1], tokenize=False).startswith(SYSTEM)


def test_chat_sft_trains_the_assistant_turns_only(tokenizer, tmp_path: Path) -> None:
    (example,) = build_examples(DataConfig(path=write(tmp_path / "sft.jsonl", [{"messages": CHAT}])), tokenizer, "sft")
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == rendered and rendered.startswith(SYSTEM)
    trained = [t for t in example["labels"] if t != -100]
    assert tokenizer.decode(trained) == "2 + 3 = 5.<|im_end|>4 + 4 = 8.<|im_end|>"
    # the system prompt and the user turns, their <|im_end|> (the pad id too) included, are not trained
    first = next(i for i, t in enumerate(example["labels"]) if t != -100)
    assert tokenizer.decode(example["input_ids"][:first]) == SYSTEM + (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_preferences_mask_the_shared_prompt(tokenizer, tmp_path: Path) -> None:
    row = {
        "prompt": CHAT[:1],
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "6"}],
    }
    (example,) = build_examples(DataConfig(path=write(tmp_path / "pref.jsonl", [row])), tokenizer, "preference")
    for side, answer in (("chosen", "5"), ("rejected", "6")):
        assert tokenizer.decode([t for t in example[f"{side}_labels"] if t != -100]) == f"{answer}<|im_end|>"
        assert tokenizer.decode(example[f"{side}_input_ids"]).startswith(SYSTEM)


def test_the_prompt_ppo_samples_from_is_the_templates_generation_prompt(tokenizer, tmp_path: Path) -> None:
    rows = [{"prompt": CHAT[:1], "answer": "5"}]
    (example,) = build_examples(DataConfig(path=write(tmp_path / "p.jsonl", rows)), tokenizer, "prompt")
    expected = tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert example["prompt_ids"] == expected
    assert example["prompt_text"] == SYSTEM + "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert example["columns"] == {"answer": "5"}
