"""Recognising row formats and normalising rows into the canonical examples, with located errors."""

from __future__ import annotations

import pytest

from rlhf.data.errors import DataError, Source
from rlhf.data.formats import (
    LMExample,
    PreferenceExample,
    PromptExample,
    UnpairedExample,
    as_kind,
    check_columns,
    detect_format,
    normalise_row,
    resolve_format,
)

SOURCE = Source("data/train.jsonl", line_numbers=(1, 2, 5, 17))
USER = {"role": "user", "content": "Describe the cat."}
SYSTEM = {"role": "system", "content": "Be brief."}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    ("columns", "fmt"),
    [
        (["prompt", "completion"], "prompt_completion"),
        (["messages"], "messages"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
        (["text"], "text"),
        (["prompt", "chosen", "rejected"], "preference"),
        (["chosen", "rejected"], "preference"),
        (["prompt", "completion", "label"], "unpaired"),
        (["prompt"], "prompt"),
        (["prompt", "answer"], "prompt"),
    ],
)
def test_detect_format(columns, fmt):
    assert detect_format([*columns, "id"]) == fmt


def test_unrecognised_columns():
    with pytest.raises(DataError, match=r"d.csv: unrecognised format: columns \['question'\]"):
        detect_format(["question"], source="d.csv")


def test_explicit_format_checks_columns():
    check_columns(["prompt", "completion"], "prompt_completion")
    with pytest.raises(DataError, match=r"missing columns: format 'preference' needs \['rejected'\]"):
        check_columns(["prompt", "chosen"], "preference")
    assert resolve_format(["prompt", "completion"], "prompt", "prompt") == "prompt"


def test_format_must_suit_kind():
    with pytest.raises(DataError, match=r"sft reads .*but the data is 'preference'"):
        resolve_format(["prompt", "chosen", "rejected"], "auto", "sft", "d.jsonl")
    assert resolve_format(["prompt", "chosen", "rejected"], "auto", "unpaired") == "preference"


def test_plain_and_conversational_prompt_completion():
    assert normalise_row({"prompt": "p", "completion": "c"}, "prompt_completion", SOURCE, 0) == LMExample("p", "c")
    row = {"prompt": [USER], "completion": [assistant("Warm.")]}
    assert normalise_row(row, "prompt_completion", SOURCE, 0) == LMExample([USER], [assistant("Warm.")])


def test_messages_split_at_first_assistant_turn():
    messages = [SYSTEM, USER, assistant("A."), USER, assistant("B.")]
    example = normalise_row({"messages": messages}, "messages", SOURCE, 0)
    assert example == LMExample([SYSTEM, USER], messages[2:])


def test_alpaca_prompt():
    row = {"instruction": "Describe it.", "input": "cat", "output": "Warm."}
    assert normalise_row(row, "alpaca", SOURCE, 0) == LMExample("Describe it.\n\ncat", "Warm.")
    for empty in ("", None, "  "):
        row = {"instruction": "Describe it.", "input": empty, "output": "Warm."}
        assert normalise_row(row, "alpaca", SOURCE, 0).prompt == "Describe it."


def test_text():
    assert normalise_row({"text": "Once."}, "text", SOURCE, 0) == LMExample("", "Once.")


def test_explicit_preference():
    row = {"prompt": [USER], "chosen": [assistant("Warm.")], "rejected": [assistant("Cold.")]}
    assert normalise_row(row, "preference", SOURCE, 0) == PreferenceExample(
        [USER], [assistant("Warm.")], [assistant("Cold.")]
    )


def test_implicit_prompt_preference_conversations():
    row = {
        "chosen": [SYSTEM, USER, assistant("Warm.")],
        "rejected": [SYSTEM, USER, assistant("Cold.")],
    }
    example = normalise_row(row, "preference", SOURCE, 0)
    assert example == PreferenceExample([SYSTEM, USER], [assistant("Warm.")], [assistant("Cold.")])


def test_implicit_prompt_preference_multi_turn_shares_earlier_turns():
    shared = [USER, assistant("A."), USER]
    row = {"chosen": [*shared, assistant("Good.")], "rejected": [*shared, assistant("Bad.")]}
    assert normalise_row(row, "preference", SOURCE, 0).prompt == shared


def test_implicit_prompt_preference_text_splits_at_a_word():
    row = {"chosen": "Human: hi\n\nAssistant: The cat is warm.", "rejected": "Human: hi\n\nAssistant: The cat is wet."}
    example = normalise_row(row, "preference", SOURCE, 0)
    assert example == PreferenceExample("Human: hi\n\nAssistant: The cat is", " warm.", " wet.")


def test_implicit_prompt_errors():
    with pytest.raises(DataError, match="line 1, field 'chosen': chosen and rejected are identical"):
        normalise_row({"chosen": [USER, assistant("A.")], "rejected": [USER, assistant("A.")]}, "preference", SOURCE, 0)
    diverge_at_user = {"chosen": [USER, assistant("A.")], "rejected": [SYSTEM, USER, assistant("A.")]}
    with pytest.raises(DataError, match="must differ from an assistant turn on"):
        normalise_row(diverge_at_user, "preference", SOURCE, 0)
    with pytest.raises(DataError, match="field 'chosen': empty response"):
        normalise_row({"chosen": "Q: a", "rejected": "Q: a b"}, "preference", SOURCE, 0)


@pytest.mark.parametrize(("raw", "label"), [(True, True), (False, False), (1, True), (0, False)])
def test_unpaired_labels(raw, label):
    row = {"prompt": "p", "completion": "c", "label": raw}
    assert normalise_row(row, "unpaired", SOURCE, 0) == UnpairedExample("p", "c", label)


@pytest.mark.parametrize("raw", [2, -1, "true", 1.0, "1"])
def test_unpaired_bad_labels(raw):
    with pytest.raises(DataError, match="line 5, field 'label': bad label"):
        normalise_row({"prompt": "p", "completion": "c", "label": raw}, "unpaired", SOURCE, 2)


def test_prompt_only():
    assert normalise_row({"prompt": [USER]}, "prompt", SOURCE, 0) == PromptExample([USER])
    with pytest.raises(DataError, match="field 'prompt': empty prompt"):
        normalise_row({"prompt": " "}, "prompt", SOURCE, 0)


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"prompt": "p"}, "prompt_completion", "field 'completion': missing field"),
        ({"prompt": "p", "completion": None}, "prompt_completion", "field 'completion': missing field"),
        ({"prompt": "p", "completion": ""}, "prompt_completion", "field 'completion': empty response"),
        ({"prompt": 3, "completion": "c"}, "prompt_completion", "field 'prompt': wrong type"),
        ({"prompt": "p", "completion": [assistant("c")]}, "prompt_completion", "field 'completion': wrong type"),
        ({"prompt": [USER], "completion": "c"}, "prompt_completion", "field 'completion': wrong type"),
        ({"prompt": [USER], "completion": [USER]}, "prompt_completion", "field 'completion': no assistant turn"),
        ({"messages": [SYSTEM, USER]}, "messages", "field 'messages': no assistant turn"),
        ({"messages": [USER, assistant(" ")]}, "messages", "field 'messages': empty response"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages", "field 'messages': unknown role"),
        ({"messages": [{"content": "x"}]}, "messages", "field 'messages': malformed message"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages", "field 'messages': wrong type"),
        ({"messages": "hi"}, "messages", "field 'messages': wrong type"),
        ({"instruction": "", "output": "o"}, "alpaca", "field 'instruction': empty instruction"),
        ({"instruction": "i", "input": 5, "output": "o"}, "alpaca", "field 'input': wrong type"),
        ({"instruction": "i", "output": ""}, "alpaca", "field 'output': empty response"),
        ({"text": ""}, "text", "field 'text': empty text"),
        ({"prompt": "p", "chosen": "c", "rejected": ""}, "preference", "field 'rejected': empty response"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "preference", "field 'chosen': empty response"),
        ({"prompt": "p", "completion": "c"}, "unpaired", "field 'label': missing field"),
    ],
)
def test_bad_rows_name_source_row_and_field(row, fmt, message):
    with pytest.raises(DataError) as info:
        normalise_row(row, fmt, SOURCE, 3)
    assert str(info.value).startswith(f"data/train.jsonl line 17, {message}")
    assert info.value.source == "data/train.jsonl" and info.value.row == 17


def test_rows_of_a_dataset_are_0_based():
    with pytest.raises(DataError, match=r"^hub/x\[train\] row 7 \(0-based\), field 'completion': missing field$"):
        normalise_row({"prompt": "p"}, "prompt_completion", Source("hub/x[train]"), 7)


def test_as_kind():
    pair = PreferenceExample("p", "good", "bad")
    assert as_kind(pair, "unpaired") == [UnpairedExample("p", "good", True), UnpairedExample("p", "bad", False)]
    assert as_kind(pair, "prompt") == [PromptExample("p")]
    assert as_kind(pair, "preference") == [pair]
    with pytest.raises(DataError, match="empty prompt"):
        as_kind(LMExample("", "text"), "prompt")
