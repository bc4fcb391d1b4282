"""Tokenization, loss masks, length limits and the whole pipeline (build_examples) on the tiny tokenizer."""

from __future__ import annotations

import copy
import json
import pickle
import warnings
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from rlhf.data.bundled import bundled_path
from rlhf.data.config import DataConfig
from rlhf.data.encode import LengthLimits, build_examples, encode_prompt, encode_sft
from rlhf.data.errors import ChatTemplateError, DataError, SkippedRowsWarning
from rlhf.data.formats import LMExample, PromptExample
from rlhf.models.init_model import init_model

KINDS = {
    "sft_prompt_completion": "sft",
    "sft_messages": "sft",
    "sft_alpaca": "sft",
    "preference": "preference",
    "preference_chat": "preference",
    "unpaired": "unpaired",
    "prompts": "prompt",
}
KEYS = {
    "sft": {"input_ids", "labels"},
    "preference": {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"},
    "unpaired": {"input_ids", "labels", "label"},
    "prompt": {"prompt", "prompt_ids", "prompt_text", "columns"},
}
USER = {"role": "user", "content": "Describe the cat."}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    init_model(path)
    return AutoTokenizer.from_pretrained(path)


def trained_text(tokenizer, labels: list[int]) -> str:
    return tokenizer.decode([t for t in labels if t != -100])


def write_jsonl(path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_bundled_dataset_encodes(tokenizer, name):
    kind = KINDS[name]
    examples = build_examples(DataConfig(path=f"bundled:{name}", split="test"), tokenizer, kind)
    assert len(examples) == 64
    for example in examples:
        assert set(example) == KEYS[kind]
        for key, value in example.items():
            if key.endswith("input_ids"):
                labels = example[key.replace("input_ids", "labels")]
                assert len(labels) == len(value) <= 512
                assert any(t != -100 for t in labels) and labels[0] == -100


def test_chat_sft_trains_exactly_the_assistant_turns(tokenizer):
    path = "bundled:sft_messages"
    example = build_examples(DataConfig(path=path, max_rows=1), tokenizer, "sft")[0]
    messages = _first_row("sft_messages")["messages"]
    expected = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert trained_text(tokenizer, example["labels"]) == expected
    # unmasked tokens are a copy of the input tokens
    assert all(label in (-100, token) for label, token in zip(example["labels"], example["input_ids"], strict=True))


def test_chat_mask_agrees_with_generation_markers(tokenizer):
    """The generic prefix-rendering mask equals the one from the template's {% generation %} markers."""
    for example, messages in zip(
        build_examples(DataConfig(path="bundled:sft_messages", max_rows=5), tokenizer, "sft"),
        [json.loads(line)["messages"] for line in _bundled_file("sft_messages").read_text().splitlines()],
        strict=False,
    ):
        rendered = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        assert rendered["input_ids"] == example["input_ids"]
        marked = [t if m else -100 for t, m in zip(rendered["input_ids"], rendered["assistant_masks"], strict=True)]
        assert marked == example["labels"]


def test_plain_sft_is_prompt_then_completion_then_eos(tokenizer):
    example = encode_sft(LMExample("Describe the cat.", "The cat is warm."), tokenizer, LengthLimits(512))
    prompt = tokenizer("Describe the cat.", add_special_tokens=False)["input_ids"]
    completion = tokenizer("The cat is warm.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["input_ids"] == prompt + completion
    assert example["labels"] == [-100] * len(prompt) + completion


def test_text_rows_train_on_everything(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The cat is warm."}])
    (example,) = build_examples(DataConfig(path=path), tokenizer, "sft")
    assert trained_text(tokenizer, example["labels"]) == "The cat is warm.<|im_end|>"


def test_chat_preference_masks_the_prompt(tokenizer):
    example = build_examples(DataConfig(path="bundled:preference_chat", max_rows=1), tokenizer, "preference")[0]
    row = _first_row("preference_chat")
    for name in ("chosen", "rejected"):
        assert trained_text(tokenizer, example[f"{name}_labels"]) == row[name][0]["content"] + "<|im_end|>"
    prompt_length = example["chosen_labels"].index(next(t for t in example["chosen_labels"] if t != -100))
    assert example["chosen_input_ids"][:prompt_length] == example["rejected_input_ids"][:prompt_length]


def test_implicit_prompt_preference_encodes(tokenizer, tmp_path):
    system = {"role": "system", "content": "Be brief."}
    rows = [
        {
            "chosen": [system, USER, {"role": "assistant", "content": "The cat is warm."}],
            "rejected": [system, USER, {"role": "assistant", "content": "The cat is cold."}],
        }
    ]
    (example,) = build_examples(DataConfig(path=write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer, "preference")
    assert trained_text(tokenizer, example["chosen_labels"]) == "The cat is warm.<|im_end|>"
    assert trained_text(tokenizer, example["rejected_labels"]) == "The cat is cold.<|im_end|>"


def test_chat_prompt_ends_with_the_generation_prompt(tokenizer):
    encoded = encode_prompt(PromptExample([USER]), tokenizer, LengthLimits(512))
    assert encoded["prompt_text"] == "<|im_start|>user\nDescribe the cat.<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(encoded["prompt_ids"]) == encoded["prompt_text"]


def test_prompts_from_a_preference_dataset(tokenizer):
    examples = build_examples(DataConfig(path="bundled:preference", max_rows=3), tokenizer, "prompt")
    first = _first_row("preference")
    assert examples[0]["prompt_text"] == first["prompt"] and len(examples) == 3


def test_unpaired_from_preference_pairs(tokenizer):
    examples = build_examples(DataConfig(path="bundled:preference", max_rows=4), tokenizer, "unpaired")
    assert [e["label"] for e in examples] == [True, False, True, False]


def test_truncation_keeps_the_prompt_and_cuts_the_response(tokenizer):
    full = build_examples(DataConfig(path="bundled:sft_messages", max_rows=1), tokenizer, "sft")[0]
    prompt_length = next(i for i, t in enumerate(full["labels"]) if t != -100)
    limit = prompt_length + 3
    cut = build_examples(DataConfig(path="bundled:sft_messages", max_rows=1, max_length=limit), tokenizer, "sft")[0]
    assert cut["input_ids"] == full["input_ids"][:limit]
    assert cut["labels"] == full["labels"][:limit]
    assert sum(t != -100 for t in cut["labels"]) == 3


def test_truncated_preference_keeps_both_prompts(tokenizer):
    config = DataConfig(path="bundled:preference", max_rows=2, max_length=8)
    for example in build_examples(config, tokenizer, "preference"):
        assert len(example["chosen_input_ids"]) == len(example["rejected_input_ids"]) == 8


def test_prompt_that_leaves_no_room_is_a_bad_row(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Describe the cat. " * 20, "completion": "Warm."}])
    with pytest.raises(DataError, match=r"d.jsonl line 1, field 'prompt': prompt leaves no room for a response"):
        build_examples(DataConfig(path=path, max_length=16), tokenizer, "sft")


def test_prompt_longer_than_max_prompt_length(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Describe the cat. " * 20, "completion": "Warm."}])
    with pytest.raises(DataError, match=r"line 1, field 'prompt': prompt too long: \d+ tokens > max_prompt_length 8"):
        build_examples(DataConfig(path=path, max_prompt_length=8), tokenizer, "sft")
    with pytest.raises(DataError, match=r"field 'prompt': prompt too long"):
        build_examples(DataConfig(path=path, max_prompt_length=8), tokenizer, "prompt")


GOOD = {"prompt": "Describe the cat.", "completion": "The cat is warm."}
LONG = {"prompt": "Describe the cat.", "completion": "The cat is warm and kind. " * 20}
BAD_ROWS = {
    # name: (file lines, line of the bad row, field, reason)
    "malformed": ([GOOD, '{"prompt": "x", ', GOOD], 2, None, "malformed JSON"),
    "missing field": ([GOOD, GOOD, {"prompt": "Describe the dog."}], 3, "completion", "missing field"),
    "empty response": ([GOOD, {"prompt": "Describe the dog.", "completion": " "}], 2, "completion", "empty response"),
    "too long": ([GOOD, GOOD, GOOD, LONG], 4, "completion", "too long"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_in_error_mode_names_file_line_and_field(tokenizer, tmp_path, case):
    lines, line, field, reason = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    config = DataConfig(path=path, max_length=32, truncation="error")
    with pytest.raises(DataError) as info:
        build_examples(config, tokenizer, "sft")
    where = f"{path} line {line}" + (f", field '{field}'" if field else "")
    assert str(info.value).startswith(f"{where}: {reason}")
    assert (info.value.source, info.value.row, info.value.field) == (path, line, field)


def test_bad_rows_in_skip_mode_are_counted_and_good_rows_kept(tokenizer, tmp_path):
    lines = [GOOD] + [row for case in BAD_ROWS.values() for row in case[0] if row is not GOOD]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    config = DataConfig(path=path, max_length=32, truncation="error", on_bad_row="skip")
    with pytest.warns(SkippedRowsWarning) as record:
        examples = build_examples(config, tokenizer, "sft")
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 4 bad row(s), kept 1" in message
    for reason in ("malformed JSON", "missing field", "empty response", "too long"):
        assert f"1 x {reason}" in message
    assert f"{path} line 2: malformed JSON" in message and "line 3, field 'completion': missing field" in message
    assert len(examples) == 1 and trained_text(tokenizer, examples[0]["labels"]) == "The cat is warm.<|im_end|>"


def test_over_long_row_is_cut_in_response_mode(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, LONG])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        examples = build_examples(DataConfig(path=path, max_length=32, on_bad_row="skip"), tokenizer, "sft")
    assert [len(e["input_ids"]) for e in examples][1] == 32


def test_all_rows_bad_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": ""}])
    with pytest.warns(SkippedRowsWarning), pytest.raises(DataError, match="no usable rows"):
        build_examples(DataConfig(path=path, on_bad_row="skip"), tokenizer, "sft")


def test_explicit_format_and_kind_mismatch(tokenizer):
    examples = build_examples(DataConfig(path="bundled:unpaired", format="prompt", max_rows=2), tokenizer, "prompt")
    assert len(examples) == 2
    with pytest.raises(DataError, match="missing columns: format 'messages'"):
        build_examples(DataConfig(path="bundled:unpaired", format="messages"), tokenizer, "sft")
    with pytest.raises(DataError, match="preference reads"):
        build_examples(DataConfig(path="bundled:sft_alpaca"), tokenizer, "preference")


def test_alpaca_errors_name_the_source_column(tokenizer, tmp_path):
    rows = [{"instruction": "Describe the cat.", "input": "", "output": "The cat is warm. " * 30}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError, match="line 1, field 'output': too long"):
        build_examples(DataConfig(path=path, max_length=16, truncation="error"), tokenizer, "sft")


def test_max_rows(tokenizer):
    assert len(build_examples(DataConfig(path="bundled:sft_alpaca", max_rows=7), tokenizer, "sft")) == 7


def test_template_that_is_not_prefix_consistent(tokenizer):
    """Like templates that drop earlier reasoning: an earlier assistant turn renders differently later on."""
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = (
        "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{%- if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
        "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
    )
    with pytest.raises(ChatTemplateError, match=r"tiny.*not prefix-consistent at message 2"):
        build_examples(DataConfig(path="bundled:sft_messages", max_rows=1, on_bad_row="skip"), broken, "sft")


def test_conversational_rows_need_a_chat_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        build_examples(DataConfig(path="bundled:preference_chat", max_rows=1), plain, "preference")


def _bundled_file(name: str) -> Path:
    return bundled_path(name, "train")


def _first_row(name: str) -> dict:
    return json.loads(_bundled_file(name).read_text().splitlines()[0])


def test_bad_row_of_a_parquet_file_is_located_by_0_based_row(tokenizer, tmp_path):
    path = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list([GOOD, {"prompt": "Describe the dog.", "completion": ""}]).to_parquet(path)
    with pytest.raises(DataError, match=r"d.parquet row 1 \(0-based\), field 'completion': empty response$"):
        build_examples(DataConfig(path=path), tokenizer, "sft")


def test_file_with_only_malformed_lines_warns_then_fails(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["{", "}"])
    with pytest.warns(SkippedRowsWarning, match="skipped 2 bad row"), pytest.raises(DataError, match="no rows"):
        build_examples(DataConfig(path=path, on_bad_row="skip"), tokenizer, "sft")


def test_data_error_survives_pickling():
    """Errors cross process boundaries (Ray workers): message and location must survive."""
    error = DataError("empty response", source="d.jsonl", row=3, row_kind="line", field="chosen")
    copy_ = pickle.loads(pickle.dumps(error))
    assert str(copy_) == str(error) == "d.jsonl line 3, field 'chosen': empty response"
    assert (copy_.reason, copy_.source, copy_.row, copy_.row_kind, copy_.field) == (
        "empty response",
        "d.jsonl",
        3,
        "line",
        "chosen",
    )
