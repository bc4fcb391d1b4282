"""What the generation commands share: reading prompts, filtering, judged pairs, and writing a dataset.

Every command writes ``<output_dir>/data.jsonl`` in a format the training jobs read
(``prompt``/``completion`` for SFT, ``prompt``/``chosen``/``rejected`` for DPO and reward
models) with a ``provenance`` column per row (how the row was made: command, model,
template, sample, seed, judge and scores, source row, time, rlhf version), and
``manifest.json`` (the config, counts, what the filters dropped and why, timings).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import UserError
from rlhf.data.errors import DataError, Source
from rlhf.data.formats import Text
from rlhf.gen.config import DataSource, FilterConfig, JudgeConfig, SamplingConfig, TemplateConfig


class OutputExistsError(UserError, ValueError):
    """The output directory already holds a dataset: nothing is overwritten."""


def read_rows(data: DataSource) -> tuple[list[dict[str, Any]], Source]:
    """The rows of ``data`` (at most ``max_rows``), and where they came from."""
    from rlhf.data.loading import load_rows

    rows, source = load_rows(data.path, data.split)
    rows = [dict(row) for row in (rows if data.max_rows is None else list(rows)[: data.max_rows])]
    if not rows:
        raise DataError("no rows", detail=f"split {data.split!r}", source=source.name)
    return rows, source


def build_prompts(rows: Sequence[dict[str, Any]], source: Source, template: TemplateConfig) -> list[Text]:
    """The prompt of every row under ``template``."""
    from rlhf.data.loading import column_names
    from rlhf.gen.templates import prompt_builder

    builder = prompt_builder(template, column_names(rows), source)
    return [builder.build(row, index) for index, row in enumerate(rows)]


def answer(prompt: Text, text: str) -> Text:
    """A response in the form of its prompt: text for a text prompt, an assistant turn for a conversation."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def prompt_text(prompt: Text) -> str:
    """A prompt as one string (a conversation's turns joined), for filters and dedup."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def provenance(command: str, **fields: Any) -> dict[str, Any]:
    """The provenance column of a row: the command, what made the row, when, and by which rlhf."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("rlhf")
    except PackageNotFoundError:
        release = "unknown"
    from rlhf.jobs.rundir import scrub

    return {
        "command": command,
        **scrub(fields),  # a model, dataset or reward URL keeps no credentials
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rlhf": release,
    }


@dataclass
class Dropped:
    """Why rows were dropped, counted by reason."""

    reasons: Counter = field(default_factory=Counter)

    def add(self, reason: str) -> None:
        """Count one dropped row under ``reason`` (its category: the text before a colon)."""
        self.reasons[reason.split(":")[0]] += 1

    @property
    def total(self) -> int:
        """Rows dropped in all."""
        return sum(self.reasons.values())


def quality_problem(prompt: Text, response: str, config: FilterConfig, score: float | None = None) -> str | None:
    """Why a response fails the quality rules of ``config`` (and ``min_score``), or None when it passes."""
    from rlhf.gen.filters import quality_problem as rules

    if config.enabled:
        problem = rules(
            prompt_text(prompt),
            response,
            min_words=config.min_words,
            max_words=config.max_words,
            max_repeated_ngram_share=config.max_repeated_ngram_share,
            min_letter_share=config.min_letter_share,
        )
        if problem:
            return problem
    if config.min_score is not None and score is not None and score < config.min_score:
        return f"score below min_score: {score:.3g} < {config.min_score:g}"
    if score is None and config.min_score is not None:
        return "not scored: the judge's answer held no score"
    return None


def deduplicate(texts: Sequence[str], config: FilterConfig, dropped: Dropped) -> list[int]:
    """Indices of the texts kept: each one that is not a near duplicate of an earlier one."""
    from rlhf.gen.filters import near_duplicates

    if config.dedup_threshold is None:
        return list(range(len(texts)))
    kept = []
    for index, duplicate_of in enumerate(near_duplicates(texts, threshold=config.dedup_threshold)):
        if duplicate_of is None:
            kept.append(index)
        else:
            dropped.add("near duplicate")
    return kept


def score_samples(judge: Any, prompts: Sequence[Text], samples: Sequence[Sequence[str]]) -> list[list[float | None]]:
    """The judge's score of every sample of every prompt, in one batch, per prompt."""
    flat = judge.score(
        [p for p, texts in zip(prompts, samples, strict=True) for _ in texts], [t for s in samples for t in s]
    )
    scores, start = [], 0
    for texts in samples:
        scores.append(flat[start : start + len(texts)])
        start += len(texts)
    return scores


def sample_and_judge(
    model: str,
    sampling: SamplingConfig,
    judge_config: JudgeConfig,
    prompts: Sequence[Text],
    source: Source,
    rows: Sequence[int] | None = None,
) -> tuple[list[list[str]], list[list[float | None]], str]:
    """``sampling.n`` samples of each prompt from ``model``'s replicas, then the judge's score of each.

    Returns the samples and scores per prompt and the judge's description. ``rows`` maps
    prompt ``i`` to its row of ``source`` (for errors), when the prompts are a subset.
    """
    from rlhf.gen.judges import open_judge
    from rlhf.gen.sampler import Sampler

    with Sampler(model, sampling) as sampler:
        completions = sampler.generate(sampler.encode(prompts, source, rows))
    samples = [[c.text for c in per_prompt] for per_prompt in completions]
    with open_judge(judge_config, model, sampling) as judge:
        return samples, score_samples(judge, prompts, samples), judge.describe


@dataclass(frozen=True)
class Pair:
    """A judged preference pair of one prompt."""

    prompt_index: int
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    scores: list[float | None]


def acceptable_samples(
    prompt: Text, texts: Sequence[str], scores: Sequence[float | None], config: FilterConfig, dropped: Dropped
) -> list[tuple[float, int]]:
    """``(score, sample index)`` of the samples of one prompt that pass the quality rules and were scored."""
    acceptable = []
    for index, (text, score) in enumerate(zip(texts, scores, strict=True)):
        problem = quality_problem(prompt, text, config, score)
        if problem is None and score is None:
            problem = "not scored"
        if problem:
            dropped.add(f"sample {problem}")
        elif score is not None:  # always: an unscored sample without a problem is "not scored" above
            acceptable.append((score, index))
    return acceptable


def preference_pairs(
    prompts: Sequence[Text],
    samples: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float | None]],
    config: FilterConfig,
    min_margin: float,
    dropped: Dropped,
) -> list[Pair]:
    """The best- and worst-scored acceptable samples of each prompt, when their scores differ by more than ``min_margin``.

    Samples failing the quality rules, and those the judge gave no score, take no part;
    a prompt left with fewer than two samples, or with too small a margin, gives no pair.
    """
    pairs = []
    for index, (prompt, texts, marks) in enumerate(zip(prompts, samples, scores, strict=True)):
        candidates = acceptable_samples(prompt, texts, marks, config, dropped)
        if len(candidates) < 2:
            dropped.add("prompt with fewer than 2 acceptable samples")
            continue
        best = max(candidates, key=lambda c: c[0])
        worst = min(candidates, key=lambda c: c[0])
        if best[0] - worst[0] <= min_margin:
            dropped.add("prompt with no score margin")
            continue
        pairs.append(Pair(index, texts[best[1]], texts[worst[1]], best[0], worst[0], list(marks)))
    return pairs


def prepare_output(output_dir: str | Path, product: str = "data.jsonl") -> Path:
    """The output directory, created and locked for this run (:func:`rlhf.jobs.rundir.lock_run_directory`, released
    by :func:`release_output`); OutputExistsError when it already holds ``product`` (a dataset), JobError when
    another run is using it."""
    from rlhf.jobs.rundir import RunDirectoryInUse, lock_run_directory
    from rlhf.jobs.runner import JobError

    path = Path(output_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    try:
        lock_run_directory(path)
    except RunDirectoryInUse as exc:
        raise JobError(f"config key 'output_dir': {exc}") from None
    if (path / product).exists():
        release_output(path)
        raise OutputExistsError(f"{path} already holds {product}; choose another output_dir (nothing was overwritten)")
    return path


def release_output(output_dir: Path) -> None:
    """Release the run lock :func:`prepare_output` took."""
    from rlhf.jobs.rundir import unlock_run_directory

    unlock_run_directory(output_dir)


def write_dataset(output_dir: Path, rows: Sequence[dict[str, Any]], manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` and then ``data.jsonl``, each whole (``data.jsonl`` marks a finished dataset), with
    the credentials of any URL in the manifest masked; the dataset's path."""
    from rlhf.jobs.rundir import atomic_open, scrub, write_atomic

    write_atomic(
        output_dir / "manifest.json", scrub(json.dumps({"rows": len(rows), **manifest}, indent=2, default=str))
    )
    data = output_dir / "data.jsonl"
    with atomic_open(data) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return data
