"""Built-in verifiable rewards (:mod:`rlhf.rl.verifiable`): final answers against the data's ``answer`` column."""

from __future__ import annotations

import threading

import pytest

from rlhf.rl.rewards import make_reward
from rlhf.rl.verifiable import (
    answer_tag_format,
    exact_answer,
    final_answer,
    format_reward,
    math_answer,
    think_answer_format,
)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("I think <answer>41</answer> no wait <answer> 42 </answer>", "42"),
        ("Janet has 3 + 4 = 7 eggs.\n#### 7", "7"),
        ("So the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("  just 12  ", "just 12"),
    ],
)
def test_the_final_answer_is_tagged_after_hashes_boxed_or_the_text(response: str, expected: str) -> None:
    assert final_answer(response) == expected


@pytest.mark.parametrize(
    ("response", "answer", "reward"),
    [
        ("<answer>Paris.</answer>", "paris", 1.0),
        ("#### 1,000", "1000", 1.0),
        ("The answer is 42.", "42", 1.0),  # the last number of an untagged answer
        ("The answer is 42, not 43.", "42", 0.0),
        ("<answer>$12</answer>", "12.0", 1.0),
        ("<answer>-3.5</answer>", "-3.5", 1.0),
        ("<answer>3.6</answer>", "36", 0.0),
        ("<answer>Lyon</answer>", "Paris", 0.0),
        ("", "7", 0.0),
    ],
)
def test_exact_answer_normalises_text_and_compares_numbers(response: str, answer: str, reward: float) -> None:
    assert exact_answer(response, answer) == reward


@pytest.mark.parametrize(
    ("response", "answer", "reward"),
    [
        ("<answer>0.5</answer>", "\\frac{1}{2}", 1.0),
        ("The result is $\\frac{2}{4}$, so \\boxed{\\frac{1}{2}}", "1/2", 1.0),
        ("#### 12", "12", 1.0),
        ("<answer>x = 3</answer>", "3", 1.0),
        ("<answer>13</answer>", "12", 0.0),
        ("I do not know.", "12", 0.0),
    ],
)
def test_math_answer_checks_equivalence_with_math_verify(response: str, answer: str, reward: float) -> None:
    assert math_answer(response, answer) == reward


def test_math_answer_works_off_the_main_thread() -> None:
    """math-verify's own timeouts use signal.alarm, which only the main thread may call: a reward worker's thread
    must still get answers."""
    results: list[float] = []
    thread = threading.Thread(target=lambda: results.append(math_answer("<answer>0.25</answer>", "1/4")))
    thread.start()
    thread.join(timeout=60)
    assert results == [1.0]


@pytest.mark.parametrize(
    ("response", "tag", "think"),
    [
        ("Let me see. <answer>7</answer>", 1.0, 0.0),
        ("<think>3 + 4 = 7</think>\n<answer>7</answer>", 1.0, 1.0),
        ("<answer>7</answer> and more text", 0.0, 0.0),
        ("<answer></answer>", 0.0, 0.0),
        ("<think>a</think><think>b</think><answer>7</answer>", 1.0, 0.0),
        ("7", 0.0, 0.0),
    ],
)
def test_the_format_rewards(response: str, tag: float, think: float) -> None:
    assert answer_tag_format(response) == tag and think_answer_format(response) == think


def test_format_reward_of_any_pattern() -> None:
    reward = format_reward(r"\d+")
    assert reward(" 42 ") == 1.0 and reward("42 apples") == 0.0


def test_the_builtins_are_reward_functions_that_take_the_answer_column() -> None:
    columns = {"answer": ["7", "7"]}
    for name in ("math_answer", "exact_answer"):
        source = make_reward(f"rlhf.rl.verifiable:{name}")
        assert source.score(["q", "q"], ["<answer>7</answer>", "<answer>8</answer>"], 5.0, columns) == [1.0, 0.0]
    assert make_reward("rlhf.rl.verifiable:answer_tag_format").score(["q"], ["<answer>7</answer>"]) == [1.0]
