"""Reasoning-gym tasks as prompt data (``data.path=reasoning_gym:TASK``) and their scorer as a reward."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.data.config import DataConfig
from rlhf.data.encode import build_examples
from rlhf.data.errors import DataError
from rlhf.data.loading import load_rows
from rlhf.data.tasks import task_score
from rlhf.rl.rewards import make_reward

TASK = "reasoning_gym:basic_arithmetic?size=40&seed=3&eval_size=12&max_terms=2&max_digits=1"


def test_a_task_gives_chat_prompts_with_their_answers_and_metadata() -> None:
    rows, source = load_rows(TASK, "train")
    assert len(rows) == 40 and str(source) == f"{TASK} (train)"
    for row in rows:
        assert set(row) == {"prompt", "answer", "metadata"}
        (message,) = row["prompt"]
        assert message["role"] == "user" and message["content"].startswith("Calculate")
        assert row["metadata"]["source_dataset"] == "basic_arithmetic" and row["metadata"]["num_terms"] == 2
        assert task_score(row["answer"], row["answer"], row["metadata"]) == 1.0
    assert load_rows(TASK, "train")[0] == rows  # the seed fixes the rows
    assert load_rows(TASK.replace("seed=3", "seed=4"), "train")[0] != rows


def test_the_held_out_split_comes_from_another_seed_without_training_questions() -> None:
    train, _ = load_rows(TASK, "train")
    held_out, source = load_rows(TASK, "test")
    assert len(held_out) == 12 and str(source).endswith("(test)")
    questions = {r["prompt"][0]["content"] for r in train}
    assert not questions & {r["prompt"][0]["content"] for r in held_out}


def test_an_instruction_is_appended_to_every_question() -> None:
    rows, _ = load_rows(f"{TASK}&instruction=Answer with the number only.", "train")
    assert all(r["prompt"][0]["content"].endswith(". Answer with the number only.") for r in rows)


def test_sft_rows_answer_each_question_and_preference_rows_pair_it_with_another_questions_answer(
    tiny_model_dir: Path,
) -> None:
    from transformers import AutoTokenizer

    prompts, _ = load_rows(TASK, "train")
    sft, _ = load_rows(f"{TASK}&rows=sft", "train")
    assert [r["completion"] for r in sft] == [[{"role": "assistant", "content": r["answer"]}] for r in prompts]
    pairs, _ = load_rows(f"{TASK}&rows=preference", "test")
    held_out, _ = load_rows(TASK, "test")
    assert len(pairs) == len(held_out) and pairs[0]["prompt"] == held_out[0]["prompt"]
    answers = {r["answer"] for r in held_out}
    for pair in pairs:
        (chosen,), (rejected,) = pair["chosen"], pair["rejected"]
        assert chosen["content"] == pair["answer"] and rejected["content"] in answers - {pair["answer"]}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(build_examples(DataConfig(path=f"{TASK}&rows=sft", format="prompt_completion"), tokenizer, "sft")) == 40
    examples = build_examples(DataConfig(path=f"{TASK}&rows=preference", format="preference"), tokenizer, "preference")
    assert len(examples) == 40


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("reasoning_gym:basic_arithmetic?rows=pairs", "bad option rows: 'pairs': one of prompt, sft, preference"),
        (
            "reasoning_gym:basic_arithmetc",
            "unknown reasoning-gym task: 'basic_arithmetc'; did you mean basic_arithmetic",
        ),
        ("reasoning_gym:basic_arithmetic?size=0", "bad option size: 0: a positive integer"),
        (
            "reasoning_gym:basic_arithmetic?bogus=1",
            "bad task options: TypeError: .*unexpected keyword argument 'bogus'",
        ),
        ("reasoning_gym:", "no task named"),
    ],
)
def test_bad_task_paths_are_refused_naming_what_is_wrong(path: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_rows(path, "train")


def test_the_tasks_scorer_is_a_reward_that_reads_the_answer_and_metadata_columns() -> None:
    rows, _ = load_rows(TASK, "train")
    rows = rows[:3]
    responses = [f"<answer>{rows[0]['answer']}</answer>", "I am not sure.", f"#### {rows[2]['answer']}"]
    columns = {"answer": [r["answer"] for r in rows], "metadata": [r["metadata"] for r in rows]}
    source = make_reward("rlhf.data.tasks:task_score")
    assert source.score([r["prompt"] for r in rows], responses, 5.0, columns) == [1.0, 0.0, 1.0]


def test_task_prompts_encode_for_rl_with_their_columns(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = build_examples(DataConfig(path=TASK, format="prompt"), tokenizer, "prompt")
    assert len(examples) == 40
    assert set(examples[0]["columns"]) == {"answer", "metadata"}
    assert examples[0]["prompt_text"].endswith("<|im_start|>assistant\n")


def test_eval_reports_accuracy_on_task_data_only() -> None:
    from cluster import configtree
    from rlhf.gen.config import EvalConfig
    from rlhf.gen.evaluate import _aggregate, row_scores

    config = configtree.load(EvalConfig, None, [f"data.path={TASK}", "metrics=[accuracy]"])
    rows, _ = load_rows(TASK, "test")
    samples = [[rows[0]["answer"]], ["no idea"], [f"The answer: <answer>{rows[2]['answer']}</answer>"]]
    per_row = [row_scores(s, None, config, None, row) for s, row in zip(samples, rows, strict=False)]
    assert [r["accuracy"] for r in per_row] == [1.0, 0.0, 1.0]
    assert _aggregate(per_row, config.metrics)["accuracy"]["value"] == pytest.approx(2 / 3)
    with pytest.raises(configtree.ConfigError, match="accuracy needs data of a reasoning-gym task"):
        configtree.load(EvalConfig, None, ["metrics=[accuracy]"])
