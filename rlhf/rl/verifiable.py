"""Verifiable rewards: a response's final answer checked against the ground truth of its prompt row.

Use them as ``reward`` (or as terms of ``rewards``) by their paths; each takes the response and the
``answer`` column of the prompt data (:mod:`rlhf.rl.rewards`: columns reach a function by parameter name):

========================================  ===================================================================
``rlhf.rl.verifiable:math_answer``        ``(response, answer) -> 1.0 | 0.0``: math-verify's equivalence of
                                          the final answer with ``answer`` (``1/2`` = ``0.5`` = ``\\frac12``,
                                          LaTeX, sets, intervals)
``rlhf.rl.verifiable:exact_answer``       ``(response, answer) -> 1.0 | 0.0``: the final answer equals
                                          ``answer`` after normalisation (case, spaces, surrounding
                                          punctuation, ``$``), or both are the same number (``1,000`` = ``1000.0``)
``rlhf.rl.verifiable:answer_tag_format``  ``(response) -> 1.0 | 0.0``: the response ends with one
                                          ``<answer>...</answer>`` block
``rlhf.rl.verifiable:think_answer_format`` ``(response) -> 1.0 | 0.0``: ``<think>...</think>`` then
                                          ``<answer>...</answer>``, nothing else
========================================  ===================================================================

The *final answer* of a response (:func:`final_answer`) is the content of its last
``<answer>...</answer>`` tag, else what follows its last ``####`` (GSM8K's marker), else the content
of its last ``\\boxed{...}``, else the response itself. :func:`format_reward` builds a format reward
of any regular expression, for a module of your own.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` of ``text`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def final_answer(response: str) -> str:
    """The answer a response gives (module docstring): tagged, after ``####``, boxed, or the whole text."""
    tagged = _ANSWER_TAG.findall(response)
    if tagged:
        last: str = tagged[-1]  # typeshed types findall's items as Any
        return last.strip()
    if "####" in response:
        return response.rsplit("####", 1)[1].strip()
    boxed = _boxed(response)
    if boxed is not None:
        return boxed.strip()
    return response.strip()


def normalise(text: str) -> str:
    """Lower case, single spaces, without surrounding ``$``, quotes, spaces and final punctuation."""
    text = " ".join(str(text).lower().split())
    return text.strip().strip("$").strip().strip("\"'`").rstrip(".!;:,").strip()


def as_number(text: str) -> float | None:
    """``text`` as a number when it is one (``1,000``, ``-3.5``, ``$12``, ``40%``), else None."""
    cleaned = normalise(text).replace(" ", "").lstrip("$").rstrip("%")
    if not _NUMBER.fullmatch(cleaned):
        return None
    try:
        return float(cleaned.replace(",", ""))
    except ValueError:
        return None


def exact_answer(response: str, answer: object) -> float:
    """1.0 when the final answer of ``response`` equals ``answer`` as text (normalised) or as a number."""
    given, expected = final_answer(response), str(answer)
    if normalise(given) == normalise(expected):
        return 1.0
    a, b = as_number(given), as_number(expected)
    if a is None and b is not None:  # "The answer is 42." -> its last number
        numbers = _NUMBER.findall(given)
        a = as_number(numbers[-1]) if numbers else None
    return float(a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9))


def math_answer(response: str, answer: object) -> float:
    """1.0 when math-verify finds the final answer of ``response`` equivalent to ``answer``.

    math-verify bounds its own parsing with ``signal.alarm``, which only the main thread may use;
    elsewhere it runs without that bound (the RLHF reward call has its own deadline).
    """
    from math_verify import parse, verify

    bound = 5 if threading.current_thread() is threading.main_thread() else None
    expected = str(answer)
    gold = parse(expected if "$" in expected or "\\" in expected else f"${expected}$", parsing_timeout=bound)
    if not gold:
        return 0.0
    given = final_answer(response)
    target = parse(given if "$" in given or "\\" in given else f"${given}$", parsing_timeout=bound)
    if not target:
        target = parse(response, parsing_timeout=bound)
    return float(bool(target) and verify(gold, target, timeout_seconds=bound))


def format_reward(pattern: str, flags: int = re.DOTALL) -> Callable[[str], float]:
    """A reward of 1.0 for responses that ``re.fullmatch`` ``pattern`` (surrounding spaces ignored), else 0.0."""
    compiled = re.compile(pattern, flags)

    def reward(response: str) -> float:
        return float(compiled.fullmatch(response.strip()) is not None)

    reward.__name__ = "format_reward"
    return reward


answer_tag_format = format_reward(r"(?:(?!<answer>).)*<answer>(?:(?!</?answer>).)+</answer>")
answer_tag_format.__name__ = "answer_tag_format"
think_answer_format = format_reward(r"<think>(?:(?!</?think>).)+</think>\s*<answer>(?:(?!</?answer>).)+</answer>")
think_answer_format.__name__ = "think_answer_format"
