"""Prompt templates: each style and layout, and the errors a malformed template or dataset gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.configtree import ConfigError
from rlhf.data.errors import DataError, Source
from rlhf.gen.config import TemplateConfig
from rlhf.gen.templates import placeholders, prompt_builder

SOURCE = Source("questions.jsonl", line_numbers=(1, 2, 4))
ROWS = [{"question": "What is 2+2?", "answer": "4"}, {"question": "Capital of France?", "answer": "Paris"}]


def build(config: TemplateConfig, rows: list[dict] = ROWS, index: int = 0):
    return prompt_builder(config, list(rows[0]), SOURCE).build(rows[index], index)


def examples_file(tmp_path: Path) -> Path:
    path = tmp_path / "shots.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(5)))
    return path


def test_zero_shot_plain_fills_the_template_with_the_row():
    assert build(TemplateConfig(layout="plain", template="Q: {question}\nA:")) == "Q: What is 2+2?\nA:"


def test_instruction_layout_writes_alpaca_blocks():
    prompt = build(TemplateConfig(layout="instruction", template="{question}"))
    assert prompt == "### Instruction:\nWhat is 2+2?\n\n### Response:\n"


def test_chat_layout_gives_messages_with_the_system_turn():
    prompt = build(TemplateConfig(layout="chat", template="{question}", system="Be brief."))
    assert prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def test_cot_appends_the_trigger_to_the_request():
    prompt = build(TemplateConfig(style="cot", layout="plain", template="{question}", cot_trigger="Think."))
    assert prompt == "What is 2+2?\nThink."


def test_few_shot_draws_solved_examples_per_row_reproducibly(tmp_path: Path):
    config = TemplateConfig(
        style="few_shot",
        layout="plain",
        template="Q: {question}",
        example_answer="A: {answer}",
        examples_path=str(examples_file(tmp_path)),
        num_examples=2,
    )
    first = build(config)
    blocks = first.split("\n\n")
    assert len(blocks) == 3 and blocks[-1] == "Q: What is 2+2?"
    for block in blocks[:2]:
        question, answer = block.split("\n")
        assert question.startswith("Q: q") and answer == "A: a" + question[len("Q: q") :]
    assert build(config) == first  # seeded per row
    assert {build(config, index=1).split("\n\n")[0] for _ in range(2)} == {build(config, index=1).split("\n\n")[0]}


def test_few_shot_in_chat_layout_gives_user_and_assistant_turns(tmp_path: Path):
    config = TemplateConfig(
        style="few_shot",
        template="{question}",
        example_answer="{answer}",
        examples_path=str(examples_file(tmp_path)),
        num_examples=3,
    )
    prompt = build(config)
    assert [m["role"] for m in prompt] == ["user", "assistant"] * 3 + ["user"]
    assert all(m["content"] == "a" + u["content"][1:] for u, m in zip(prompt[0:6:2], prompt[1:6:2], strict=True))


def test_a_conversation_prompt_is_used_as_it_is_by_the_chat_layout():
    rows = [{"prompt": [{"role": "user", "content": "Hi"}]}]
    assert prompt_builder(TemplateConfig(), ["prompt"], SOURCE).build(rows[0], 0) == rows[0]["prompt"]
    with pytest.raises(DataError, match=r"questions.jsonl line 1, field 'prompt': is a conversation"):
        prompt_builder(TemplateConfig(layout="plain"), ["prompt"], SOURCE).build(rows[0], 0)


def test_a_malformed_template_names_its_config_key():
    with pytest.raises(ConfigError, match=r"'template.template': 'Q: \{question' is not a valid template"):
        placeholders("Q: {question", "template.template")
    with pytest.raises(ConfigError, match="positional placeholder"):
        placeholders("Q: {}", "template.template")


def test_a_placeholder_that_is_not_a_column_lists_the_columns():
    with pytest.raises(ConfigError, match=r"uses \{query\}, which questions.jsonl does not have \(its columns: "):
        build(TemplateConfig(template="{query}"))


def test_a_row_without_a_value_names_its_line_and_field():
    rows = [*ROWS, {"question": "  ", "answer": "x"}]
    builder = prompt_builder(TemplateConfig(template="{question}"), ["question", "answer"], SOURCE)
    with pytest.raises(DataError, match=r"questions.jsonl line 4, field 'question': no value"):
        builder.build(rows[2], 2)


def test_few_shot_needs_examples_whose_columns_fit(tmp_path: Path):
    with pytest.raises(ConfigError, match="template.examples_path"):
        build(TemplateConfig(style="few_shot", template="{question}"))
    config = TemplateConfig(
        style="few_shot", template="{question}", example_answer="{solution}", examples_path=str(examples_file(tmp_path))
    )
    with pytest.raises(ConfigError, match=r"'template.example_answer'.*shots.jsonl does not have"):
        build(config)
