"""Hand-computed checks of `rlhf.gen.metrics` and `rlhf.gen.report`."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.gen.metrics import (
    check_schema,
    compile_answer_pattern,
    exact_match,
    extract_answer,
    format_problem,
    majority_vote,
    mean_interval,
    normalize_answer,
    pairwise_outcome,
    token_f1,
    win_rate,
)
from rlhf.gen.report import markdown, plot


def test_normalize_answer() -> None:
    assert normalize_answer("  The Cat, an apple & A dog!  ") == "cat apple dog"
    # articles only as whole words: "then" and "anthem" keep their letters
    assert normalize_answer("Then the anthem") == "then anthem"


def test_exact_match() -> None:
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel", ["Paris", "an  eiffel."]) == 1.0
    assert exact_match("Eiffel Tower", ["Paris", "Eiffel"]) == 0.0
    with pytest.raises(ValueError, match="references"):
        exact_match("x", [])


def test_token_f1_hand_computed() -> None:
    # "cat sat on mat" vs "cat sat": 2 common tokens, precision 2/4, recall 2/2 -> F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    # bag of tokens: "cat cat dog" vs "cat dog dog" shares one cat and one dog -> P = R = 2/3
    assert token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    # max over references
    assert token_f1("the cat sat on the mat", ["dog", "cat sat on mat"]) == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("the", "") == 1.0  # both normalise to nothing
    assert token_f1("cat", "the") == 0.0
    assert token_f1("cat", "dog") == 0.0
    with pytest.raises(ValueError, match="references"):
        token_f1("x", [])


def test_extract_answer() -> None:
    text = "The answer is 3. Wait, no: the answer is 42."
    assert extract_answer(text, r"answer is (\d+)") == "42"
    assert extract_answer("1 then 22", r"\d+") == "22"  # no group: the whole last match
    assert extract_answer("no digits", r"(\d+)") == ""
    assert extract_answer("x", r"x(\d)?") == ""  # the group did not take part in the match
    assert extract_answer("  plain answer \n") == "plain answer"


def test_answer_pattern_errors() -> None:
    with pytest.raises(ValueError, match=r"^answer_pattern: '\(x' is not a valid regular expression: missing \)"):
        extract_answer("1", "(x")
    with pytest.raises(ValueError, match="eval.answer_pattern: .* has 2 groups; use one group around the answer"):
        compile_answer_pattern(r"(\d)(\d)", "eval.answer_pattern")
    assert compile_answer_pattern(r"(?:answer|result): (\d+)", "k").groups == 1


SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
    "required": ["answer"],
}


def test_format_problem_regex() -> None:
    assert format_problem("  Answer: a\nb  ", regex=r"Answer: .+") is None  # stripped, DOTALL
    assert format_problem("Reasoning. Answer: b", regex=r"Answer: .+") == "does not match the pattern"
    with pytest.raises(ValueError, match="regex"):
        format_problem("x", regex="(")
    with pytest.raises(ValueError, match="regex, a schema"):
        format_problem("x")


def test_format_problem_schema() -> None:
    assert format_problem(' {"answer": "4", "confidence": 0.9} ', schema=SCHEMA) is None
    assert format_problem('{"confidence": 0.9}', schema=SCHEMA) == (
        "violates the schema at $: 'answer' is a required property"
    )
    assert (
        format_problem('{"answer": 4}', schema=SCHEMA) == "violates the schema at $.answer: 4 is not of type 'string'"
    )
    assert format_problem('{"answer": "4",}', schema=SCHEMA).startswith("not JSON: ")
    # both: the regex is checked first
    assert format_problem('{"answer": 4}', regex=r"\[.*\]", schema=SCHEMA) == "does not match the pattern"
    assert format_problem('{"answer": 4}', regex=r"\{.*\}", schema=SCHEMA).startswith("violates the schema at $.answer")


def test_check_schema() -> None:
    check_schema(SCHEMA, "eval.schema")
    with pytest.raises(ValueError, match="eval.schema: invalid JSON schema: ") as raised:
        check_schema({"type": "strnig"}, "eval.schema")
    assert "\n" not in str(raised.value)


def test_majority_vote() -> None:
    assert majority_vote(["4", "5", "5", "4"]) == ("4", 0.5)  # tie: first occurrence wins
    assert majority_vote(["5", "4", "4", "5"]) == ("5", 0.5)
    assert majority_vote(["The Paris.", "paris", "London"]) == ("paris", pytest.approx(2 / 3))
    # "" and "the" normalise to nothing: not votes, but still counted in the share
    assert majority_vote(["", "the", "x"]) == ("x", pytest.approx(1 / 3))
    assert majority_vote(["", "An"]) == ("", 1.0)
    with pytest.raises(ValueError):
        majority_vote([])


def test_win_rate_wilson_interval_hand_computed() -> None:
    # p = 0.7, n = 10, z = 1.959964: z²/n = 0.384146, center = (0.7 + 0.192073) / 1.384146 = 0.644488,
    # half = 1.959964 * sqrt(0.021 + 0.009604) / 1.384146 = 0.247715 -> [0.396773, 0.892203]
    mean, low, high = win_rate([1.0] * 7 + [0.0] * 3)
    assert mean == pytest.approx(0.7)
    assert low == pytest.approx(0.3968, abs=1e-4)
    assert high == pytest.approx(0.8922, abs=1e-4)
    # ties count half: mean 2.5 / 4 = 0.625, z²/n = 0.960365, center = 1.105182 / 1.960365 = 0.563764,
    # half = 1.959964 * sqrt(0.058594 + 0.060023) / 1.960365 = 0.344338 -> [0.219426, 0.908102]
    mean, low, high = win_rate([1, 1, 0.5, 0])
    assert mean == pytest.approx(0.625)
    assert (low, high) == (pytest.approx(0.2194, abs=1e-4), pytest.approx(0.9081, abs=1e-4))
    # all wins: the interval stays inside [0, 1] and below 1 at the low end
    mean, low, high = win_rate([1, 1, 1])
    assert mean == 1.0 and 0.0 < low < 1.0 and high == pytest.approx(1.0)


def test_win_rate_validation() -> None:
    with pytest.raises(ValueError, match="outcome 2"):
        win_rate([1, 0, 0.7])
    with pytest.raises(ValueError):
        win_rate([])
    with pytest.raises(ValueError, match="confidence"):
        win_rate([1], confidence=1.0)


def test_pairwise_outcome() -> None:
    assert pairwise_outcome(1.0, 0.5) == 1.0
    assert pairwise_outcome(0.5, 1.0) == 0.0
    assert pairwise_outcome(0.5, 0.5) == 0.5
    assert pairwise_outcome(0.6, 0.5, tie_margin=0.2) == 0.5
    assert pairwise_outcome(0.4, 0.5, tie_margin=0.2) == 0.5
    assert pairwise_outcome(0.8, 0.5, tie_margin=0.2) == 1.0


def test_mean_interval() -> None:
    # mean 2.5, sample stdev sqrt(5/3) = 1.290994, / sqrt(4) = 0.645497; * 1.959964 = 1.265151
    mean, low, high = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert (low, high) == (pytest.approx(1.2348, abs=1e-4), pytest.approx(3.7652, abs=1e-4))
    # 90%: z = 1.644854 -> half-width 1.061750
    assert mean_interval([1.0, 2.0, 3.0, 4.0], confidence=0.9)[1] == pytest.approx(1.4382, abs=1e-4)
    assert mean_interval([-0.3]) == (-0.3, -0.3, -0.3)
    with pytest.raises(ValueError):
        mean_interval([])


REPORT = {
    "model": "policy-step-400",
    "baseline": "sft",
    "dataset": "gsm8k-test",
    "rows": 100,
    "samples_per_prompt": 4,
    "metrics": {
        "exact_match": {"value": 0.5, "low": 0.4118, "high": 0.5882, "n": 100},
        "reward": {"value": -1.25, "low": None, "high": None, "n": 400},
        "win_rate": {"value": 0.7, "low": 0.39678, "high": 0.89221, "n": 10},
    },
}


def test_markdown() -> None:
    text = markdown(REPORT)
    assert text.splitlines()[0] == "**policy-step-400 vs sft** on gsm8k-test: 100 rows, 4 samples per prompt"
    assert "| metric | value | 95% interval | n |" in text
    assert "| exact_match | 0.500 | [0.412, 0.588] | 100 |" in text
    assert "| reward | -1.250 | - | 400 |" in text
    assert "| win_rate | 0.700 | [0.397, 0.892] | 10 |" in text
    assert markdown({**REPORT, "baseline": None}).startswith("**policy-step-400** on gsm8k-test")


def test_plot_writes_png(tmp_path: Path) -> None:
    path = plot(REPORT, tmp_path / "eval.png")
    assert path == tmp_path / "eval.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000
