"""Evaluation metrics for generated answers: SQuAD-style exact match and token F1, answer extraction, format
compliance (regex or JSON schema), self-consistency (majority vote), and win rates with confidence intervals.

Deviations from the standard definitions:
- exact_match / token_f1 follow the SQuAD v1.1 evaluation script (lowercase, strip punctuation and the articles
  a/an/the, collapse whitespace; F1 over the bag of tokens, max over references) but return floats in [0, 1].
- win_rate's Wilson score interval is computed on the mean outcome with ties counted as half a win, which treats
  the outcomes as if they were n Bernoulli trials; with many ties the interval is slightly conservative.
- mean_interval is a normal approximation (mean ± z * s / sqrt(n)), not a Student-t interval, so it is a little
  narrow for small n.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from statistics import NormalDist, fmean, stdev

from jsonschema.exceptions import SchemaError, best_match
from jsonschema.validators import validator_for

from cluster.configtree import ConfigError

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _reference_list(references: str | Sequence[str]) -> list[str]:
    reference_list = [references] if isinstance(references, str) else list(references)
    if not reference_list:
        raise ValueError("references must not be empty")
    return reference_list


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(reference) for reference in _reference_list(references)))


def _f1(prediction_tokens: list[str], reference_tokens: list[str]) -> float:
    if not prediction_tokens or not reference_tokens:
        return float(prediction_tokens == reference_tokens)
    common = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(prediction_tokens)
    recall = common / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD token F1 between the normalised prediction and each reference, maximised over references.

    Tokens are the whitespace-separated words after normalize_answer, counted as a bag (Counter intersection).
    Both empty gives 1.0; exactly one empty gives 0.0.
    """
    predicted = normalize_answer(prediction).split()
    return max(_f1(predicted, normalize_answer(reference).split()) for reference in _reference_list(references))


def compile_answer_pattern(pattern: str, key: str) -> re.Pattern:
    """Compile an answer-extraction regex with at most one capturing group; ConfigError naming `key` otherwise."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression: {err}") from err
    if compiled.groups > 1:
        raise ConfigError(f"{key}: {pattern!r} has {compiled.groups} groups; use one group around the answer")
    return compiled


def extract_answer(text: str, pattern: str | None = None) -> str:
    """The answer inside a generated text.

    With `pattern`, the capturing group of its LAST match in `text` (the whole match when the pattern has no group);
    the last match because models tend to state the final answer at the end. No match (or an unmatched optional
    group) gives "". Without a pattern, the whole text stripped.
    """
    if pattern is None:
        return text.strip()
    compiled = compile_answer_pattern(pattern, "answer_pattern")
    matches = list(compiled.finditer(text))
    if not matches:
        return ""
    return matches[-1].group(compiled.groups) or ""


def check_schema(schema: dict, key: str) -> None:
    """Raise ConfigError naming `key` if `schema` is not a valid JSON schema (of the draft it declares)."""
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as err:
        raise ConfigError(f"{key}: invalid JSON schema: {err.message}") from err


def format_problem(text: str, *, regex: str | None = None, schema: dict | None = None) -> str | None:
    """None when `text` (stripped) complies with the required format, else why not.

    With `regex`, the whole text must match it (re.fullmatch, DOTALL). With `schema`, the text must parse as JSON
    and validate against the schema; the reported error is jsonschema's best match, with its JSON path
    (e.g. "$.answer"). With both, both must pass and the first failure (regex, then schema) is reported.
    """
    if regex is None and schema is None:
        raise ValueError("format_problem needs a regex, a schema, or both")
    stripped = text.strip()
    if regex is not None:
        try:
            matched = re.fullmatch(regex, stripped, re.DOTALL)
        except re.error as err:
            raise ConfigError(f"regex: {regex!r} is not a valid regular expression: {err}") from err
        if matched is None:
            return "does not match the pattern"
    if schema is not None:
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as err:
            return f"not JSON: {err}"
        error = best_match(validator_for(schema)(schema).iter_errors(value))
        if error is not None:
            return f"violates the schema at {error.json_path}: {error.message}"
    return None


def majority_vote(answers: Sequence[str]) -> tuple[str, float]:
    """The most common normalised answer and its share of all answers (count / len(answers)).

    Empty normalised answers (nothing extracted) are not votes unless every answer is empty. Ties go to the answer
    whose first occurrence comes first.
    """
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    normalised = [normalize_answer(answer) for answer in answers]
    votes = [answer for answer in normalised if answer] or normalised
    # Counter keeps first-insertion order and max returns the first maximum, so ties go to the earliest answer
    counts = Counter(votes)
    winner = max(counts, key=counts.__getitem__)
    return winner, counts[winner] / len(answers)


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def win_rate(outcomes: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean outcome and its Wilson score interval, as (mean, low, high).

    Outcomes are 1 (win), 0.5 (tie) or 0 (loss). With p the mean, n = len(outcomes) and z the normal quantile,
    center = (p + z²/2n) / (1 + z²/n) and half-width = z * sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n).
    """
    if not outcomes:
        raise ValueError("win_rate needs at least one outcome")
    for index, outcome in enumerate(outcomes):
        if outcome not in (0, 0.5, 1):
            raise ValueError(f"outcome {index} is {outcome!r}; expected 1 (win), 0.5 (tie) or 0 (loss)")
    z = _z(confidence)
    n = len(outcomes)
    p = fmean(outcomes)
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return p, center - half_width, center + half_width


def pairwise_outcome(score: float, baseline_score: float, tie_margin: float = 0.0) -> float:
    """1.0 if `score` beats `baseline_score` by more than `tie_margin`, 0.0 if it loses by more, else 0.5."""
    if score - baseline_score > tie_margin:
        return 1.0
    if baseline_score - score > tie_margin:
        return 0.0
    return 0.5


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and its normal-approximation interval (mean ± z * sample stdev / sqrt(n)), as (mean, low, high).

    A single value gives the degenerate interval (v, v, v).
    """
    if not values:
        raise ValueError("mean_interval needs at least one value")
    z = _z(confidence)
    mean = fmean(values)
    if len(values) == 1:
        return mean, mean, mean
    half_width = z * stdev(values) / math.sqrt(len(values))
    return mean, mean - half_width, mean + half_width


def pairwise_agreement(scores: Sequence[float], oracle: Sequence[float]) -> tuple[float, int]:
    """How often ``scores`` order two items as ``oracle`` does, over the pairs the oracle orders strictly.

    Returns ``(agreement, pairs)``: a pair ordered the same way counts 1, a tie in ``scores``
    counts 1/2, the opposite order 0 (Kendall's tau is ``2 * agreement - 1`` when the
    oracle has no ties). ValueError when the lengths differ or the oracle orders no pair.
    """
    if len(scores) != len(oracle):
        raise ValueError(f"{len(scores)} scores but {len(oracle)} oracle values")
    agree, pairs = 0.0, 0
    for i in range(len(oracle)):
        for j in range(i + 1, len(oracle)):
            if oracle[i] == oracle[j]:
                continue
            pairs += 1
            same = (scores[i] - scores[j]) * (oracle[i] - oracle[j])
            agree += 1.0 if same > 0 else 0.5 if same == 0 else 0.0
    if pairs == 0:
        raise ValueError("the oracle orders no pair: nothing to agree on")
    return agree / pairs, pairs
