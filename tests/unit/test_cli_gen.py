"""The generation commands refuse bad templates, datasets and judges with one clear line, before any replica
starts (these runs never reach Ray: each fails while reading its input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.cli import main


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_a_template_column_the_dataset_lacks_is_named_with_the_columns(capsys, tmp_path: Path):
    err = fails(capsys, "generate", "template.template=Q: {question}", f"output_dir={tmp_path}")
    assert "'template.template'" in err and "{question}" in err and "its columns: prompt" in err


def test_a_malformed_template_is_named(capsys, tmp_path: Path):
    err = fails(capsys, "best-of-n", "template.template=Q: {prompt", f"output_dir={tmp_path}")
    assert "'template.template'" in err and "not a valid template" in err


def test_a_malformed_dataset_line_is_named(capsys, tmp_path: Path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "a"}) + "\n" + '{"prompt": "b",\n')
    err = fails(capsys, "generate", f"data.path={data}", f"output_dir={tmp_path / 'out'}")
    assert "prompts.jsonl" in err and "line 2" in err


def test_a_row_without_a_value_is_named_by_line_and_column(capsys, tmp_path: Path):
    data = tmp_path / "questions.jsonl"
    data.write_text(json.dumps({"question": "a"}) + "\n\n" + json.dumps({"question": ""}) + "\n")
    err = fails(
        capsys,
        "eval",
        f"data.path={data}",
        "template.template={question}",
        "metrics=[reward]",
        f"output_dir={tmp_path / 'o'}",
    )
    assert "questions.jsonl line 3, field 'question': no value" in err


def test_few_shot_without_an_examples_file_is_refused(capsys, tmp_path: Path):
    err = fails(capsys, "generate", "template.style=few_shot", f"output_dir={tmp_path}")
    assert "'template.examples_path'" in err


def test_a_judge_that_cannot_work_is_named_before_sampling(capsys, tmp_path: Path):
    err = fails(capsys, "synth", "judge.reward=rlhf.data.bundled:no_such_reward", f"output_dir={tmp_path}")
    assert "'judge.reward'" in err and "no attribute 'no_such_reward'" in err
    err = fails(capsys, "synth", f"judge.reward={tmp_path}", f"output_dir={tmp_path / 'o'}")
    assert "'judge.reward'" in err and "not a model directory" in err
    err = fails(capsys, "synth", "judge.kind=llm", "judge.template=Rate {response}", f"output_dir={tmp_path / 'p'}")
    assert "'judge.template'" in err and "prompt" in err


def test_an_invalid_format_schema_is_named(capsys, tmp_path: Path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "no-such-type"}))
    err = fails(capsys, "eval", "metrics=[format]", f"format_schema={schema}", f"output_dir={tmp_path / 'o'}")
    assert "format_schema" in err
    err = fails(capsys, "eval", "metrics=[exact_match]", "answer_pattern=(a)(b)", f"output_dir={tmp_path / 'p'}")
    assert "answer_pattern" in err and "2 groups" in err


def test_an_unknown_metric_is_refused_with_the_choices(capsys):
    err = fails(capsys, "eval", "metrics=[bleu]")
    assert "unknown ['bleu']" in err and "exact_match" in err
