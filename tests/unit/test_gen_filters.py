"""Hand-computed checks of `rlhf.gen.filters`: shingles, Jaccard, near-duplicate detection, the quality filter."""

from __future__ import annotations

import pytest

from rlhf.gen.filters import jaccard, near_duplicates, quality_problem, shingles

# 12 words, 10 distinct word 3-grams ("the" repeats but never in the same 3-gram context)
SENTENCE = "The quick brown fox jumps over the lazy dog near the river."
# last word changed: only the last 3-gram differs -> 9 shared, 11 in the union, Jaccard 9/11 = 0.818
LAST_WORD_CHANGED = "The quick brown fox jumps over the lazy dog near the bank."
# word 5 ("over") changed: 3-grams 3, 4 and 5 differ -> 7 shared, 13 in the union, Jaccard 7/13 = 0.538
MIDDLE_WORD_CHANGED = "The quick brown fox jumps under the lazy dog near the river."
UNRELATED = "Gradient clipping keeps the update norm bounded during early training steps."


def test_shingles() -> None:
    assert shingles("Hello, World! hello world", ngram=3) == {
        ("hello", "world", "hello"),
        ("world", "hello", "world"),
    }
    assert shingles("Two words", ngram=3) == {("two", "words")}
    assert shingles("", ngram=3) == set()
    assert shingles("?!", ngram=3) == set()
    assert len(shingles(SENTENCE)) == 10


def test_jaccard() -> None:
    assert jaccard({1, 2, 3}, {2, 3, 4, 5}) == pytest.approx(2 / 5)
    assert jaccard(set(), set()) == 1.0
    assert jaccard({1}, set()) == 0.0
    assert jaccard(shingles(SENTENCE), shingles(LAST_WORD_CHANGED)) == pytest.approx(9 / 11)
    assert jaccard(shingles(SENTENCE), shingles(MIDDLE_WORD_CHANGED)) == pytest.approx(7 / 13)


def test_near_duplicates_one_word_changed() -> None:
    texts = [SENTENCE, UNRELATED, LAST_WORD_CHANGED, MIDDLE_WORD_CHANGED]
    # 9/11 = 0.818 >= 0.8 but 7/13 = 0.538 < 0.8
    assert near_duplicates(texts, threshold=0.8) == [None, None, 0, None]
    # thresholds either side of 7/13 = 0.538 decide item 3; item 3 vs item 2 (6/14 = 0.429) stays below both
    assert jaccard(shingles(LAST_WORD_CHANGED), shingles(MIDDLE_WORD_CHANGED)) == pytest.approx(6 / 14)
    assert near_duplicates(texts, threshold=0.55) == [None, None, 0, None]
    assert near_duplicates(texts, threshold=0.53) == [None, None, 0, 0]
    # above 9/11 neither edit is a duplicate
    assert near_duplicates(texts, threshold=0.85) == [None, None, None, None]


def test_near_duplicates_points_to_the_earliest_match() -> None:
    texts = ["a b c d e", "x y z", "A, b c d e!", "a b c d e", ""]
    assert near_duplicates(texts, threshold=1.0) == [None, None, 0, 0, None]


def test_near_duplicates_empty_texts_match_each_other_only() -> None:
    assert near_duplicates(["", "some words here", "  ", "?!"]) == [None, None, 0, 0]
    assert near_duplicates([]) == []


def test_near_duplicates_finds_pairs_just_above_the_threshold() -> None:
    """40 unrelated pairs at Jaccard 9/11 = 0.818 with threshold 0.8: LSH must not miss them.

    datasketch's default banding for 0.8 (9 bands x 13 rows) finds such a pair with probability ~0.5 only.
    """
    texts = []
    for pair in range(40):
        words = [f"p{pair}w{i}" for i in range(12)]
        texts += [" ".join(words), " ".join([*words[:-1], "changed"])]
    expected = [None if i % 2 == 0 else i - 1 for i in range(len(texts))]
    assert near_duplicates(texts, threshold=0.8) == expected


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_near_duplicates_rejects_bad_threshold(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates(["a"], threshold=threshold)


def test_quality_empty_and_length() -> None:
    assert quality_problem("Q?", "") == "empty response"
    assert quality_problem("Q?", " \n\t") == "empty response"
    assert quality_problem("Q?", "one two three", min_words=3) is None
    assert quality_problem("Q?", "one two", min_words=3) == "too short: 2 words < min_words 3"
    assert quality_problem("Q?", "one two three", max_words=3) is None
    assert quality_problem("Q?", "one two three four", max_words=3) == "too long: 4 words > max_words 3"


def test_quality_repetition_boundary() -> None:
    # "a b a b a": 3-grams aba, bab, aba -> 1 - 2/3 = 0.333 repeated
    assert quality_problem("Q?", "a b a b a", max_repeated_ngram_share=0.34) is None
    reason = quality_problem("Q?", "a b a b a", max_repeated_ngram_share=0.33)
    assert reason is not None
    assert reason.startswith("repeats itself: 0.33")
    assert "0.33" in reason.split(">")[1]
    # case-insensitive: "Yes yes YES yes" has 3-grams (yes yes yes) x 2 -> 0.5 repeated
    assert quality_problem("Q?", "Yes yes YES yes", max_repeated_ngram_share=0.5) is None
    assert quality_problem("Q?", "Yes yes YES yes", max_repeated_ngram_share=0.49).startswith("repeats itself")
    # a single 3-gram is never repetition
    assert quality_problem("Q?", "go go go", max_repeated_ngram_share=0.0) is None


def test_quality_copies_the_prompt() -> None:
    assert quality_problem("What is two plus two?", "  what is TWO plus two?  ") == "copies the prompt"
    long_prompt = "Explain why the sky is blue"
    assert quality_problem(long_prompt, "Sure. explain  why the\nsky is BLUE, you ask?") == "copies the prompt"
    # a 4-word prompt inside a longer response is allowed
    assert quality_problem("Why is it blue", "You ask why is it blue: Rayleigh scattering.") is None


def test_quality_letter_share_boundary() -> None:
    # "ab12": 2 letters of 4 non-space characters
    assert quality_problem("Q?", "ab 12", min_letter_share=0.5) is None
    assert quality_problem("Q?", "ab 12", min_letter_share=0.51) == (
        "mostly not letters: letter share 0.50 < min_letter_share 0.51"
    )
    assert quality_problem("Q?", "= 3 + 4 * 5") == "mostly not letters: letter share 0.00 < min_letter_share 0.5"
