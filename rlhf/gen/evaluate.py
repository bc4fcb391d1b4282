"""``rlhf eval``: generate on an eval set with vLLM replicas, score, and report.

Metrics (``metrics``), each over the eval rows with a 95% interval:

* ``exact_match`` and ``token_f1``: the first sample's answer (``answer_pattern``'s group,
  else the whole response) against the reference (``reference``, a template over the
  row's columns), SQuAD-normalised (:mod:`rlhf.gen.metrics`);
* ``format``: the share of first samples that match ``format_regex`` and/or parse as JSON
  satisfying the ``format_schema`` file;
* ``reward``: the judge's mean score of the first samples;
* ``self_consistency``: exact match of the majority answer over the ``sampling.n`` samples
  (Wang et al. 2023), and the mean share of the majority (``self_consistency_agreement``);
* ``win_rate``: the judge compares the model's first sample with the ``baseline`` model's
  on each prompt (ties count half);
* ``accuracy``: on the data of a reasoning-gym task (``reasoning_gym:TASK``), the share of
  first samples that the task's own scorer gives 1.0 (:func:`rlhf.data.tasks.task_score`).

Outputs in ``output_dir``: ``report.json``, ``report.md`` (a table), ``report.png`` (a bar
chart) and ``samples.jsonl`` (every prompt, reference, sample and per-row score), so any
figure can be recomputed from the samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.configtree import ConfigError
from rlhf.gen.config import EvalConfig

PROPORTIONS = ("exact_match", "format", "self_consistency", "win_rate", "accuracy")
"""Metrics whose per-row values are 0 or 1 (ties of win_rate: 0.5): their intervals are Wilson's."""


def load_schema(config: EvalConfig) -> dict | None:
    """The JSON schema of the ``format`` metric, read and checked; None without one."""
    from rlhf.gen.metrics import check_schema

    if not config.format_schema:
        return None
    path = Path(config.format_schema).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key 'format_schema': no such file {path}")
    try:
        schema = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config key 'format_schema': {path} is not JSON: {exc}") from None
    check_schema(schema, "format_schema")
    return schema


def check_config(config: EvalConfig) -> dict | None:
    """Check the patterns and the schema before any replica starts; the schema."""
    import re

    from rlhf.gen.metrics import compile_answer_pattern

    if config.answer_pattern:
        compile_answer_pattern(config.answer_pattern, "answer_pattern")
    if config.format_regex:
        try:
            re.compile(config.format_regex)
        except re.error as exc:
            raise ConfigError(
                f"config key 'format_regex': {config.format_regex!r} is not a valid regex: {exc}"
            ) from None
    return load_schema(config)


def _given(reference: str | None) -> str:
    """The row's reference, for a metric that compares with it (the run fills one in whenever a metric does)."""
    if reference is None:
        raise ValueError("exact_match, token_f1 and self_consistency compare with a reference: the row has none")
    return reference


def row_scores(
    samples: list[str], reference: str | None, config: EvalConfig, schema: dict | None, row: dict | None = None
) -> dict[str, float]:
    """The per-row values of the text metrics (not those needing a judge); ``row`` is the data row (accuracy)."""
    from rlhf.gen import metrics as m

    first = m.extract_answer(samples[0], config.answer_pattern)
    scores: dict[str, float] = {}
    if "exact_match" in config.metrics:
        scores["exact_match"] = m.exact_match(first, _given(reference))
    if "token_f1" in config.metrics:
        scores["token_f1"] = m.token_f1(first, _given(reference))
    if "format" in config.metrics:
        scores["format"] = float(m.format_problem(samples[0], regex=config.format_regex, schema=schema) is None)
    if "self_consistency" in config.metrics:
        majority, share = m.majority_vote([m.extract_answer(s, config.answer_pattern) for s in samples])
        scores["self_consistency"] = m.exact_match(majority, _given(reference))
        scores["self_consistency_agreement"] = share
    if "accuracy" in config.metrics and row is not None:
        from rlhf.data.tasks import task_score

        scores["accuracy"] = float(task_score(samples[0], row["answer"], row["metadata"]) == 1.0)
    return scores


def run(config: EvalConfig) -> dict[str, Any]:
    """Evaluate; write the report; return it."""
    from cluster.connect import connect
    from rlhf.gen import report as report_module
    from rlhf.gen.common import build_prompts, prepare_output, read_rows, release_output
    from rlhf.gen.judges import check_judge
    from rlhf.gen.templates import fill
    from rlhf.jobs.rundir import scrub

    schema = check_config(config)
    if {"reward", "win_rate"} & set(config.metrics):
        check_judge(config.judge)
    rows, source = read_rows(config.data)
    prompts = build_prompts(rows, source, config.template)
    needs_reference = {"exact_match", "token_f1", "self_consistency"} & set(config.metrics)
    references: list[str | None] = (
        [fill(config.reference, row, "reference", source, i) for i, row in enumerate(rows)]
        if needs_reference
        else [None] * len(rows)
    )
    output_dir = prepare_output(config.output_dir, product="report.json")
    try:
        connect(config.cluster)
        samples, baseline = _generate(config, prompts, source)
        per_row = [row_scores(s, r, config, schema, row) for s, r, row in zip(samples, references, rows, strict=True)]
        describe = _judge(config, prompts, samples, baseline, per_row)
        report = {
            "model": config.model,
            "baseline": config.baseline,
            "dataset": f"{config.data.path} ({config.data.split})",
            "rows": len(rows),
            "samples_per_prompt": config.sampling.n,
            "judge": describe,
            "metrics": _aggregate(per_row, config.metrics),
        }
        report = scrub(report)  # a model or judge named by a URL keeps no credentials in the files or the log
        _write(output_dir, report, prompts, samples, references, per_row, baseline)
        print(report_module.markdown(report), flush=True)
    finally:
        release_output(output_dir)
    return report


def _generate(config: EvalConfig, prompts: list[Any], source: Any) -> tuple[list[list[str]], list[str]]:
    """The model's ``sampling.n`` samples per prompt and, with a baseline, the baseline's first sample."""
    from rlhf.gen.sampler import Sampler

    baseline: list[str] = []
    with Sampler(config.model, config.sampling) as sampler:
        generated = sampler.generate(sampler.encode(prompts, source), description="eval")
        samples = [[c.text for c in per] for per in generated]
        if config.baseline and sampler.can_load(config.baseline):  # same architecture: swap the weights in
            sampler.load_weights(config.baseline)
            baseline = _first_samples(sampler, prompts, source)
    if config.baseline and not baseline:
        with Sampler(config.baseline, config.sampling) as sampler:
            baseline = _first_samples(sampler, prompts, source)
    return samples, baseline


def _judge(
    config: EvalConfig, prompts: list[Any], samples: list[list[str]], baseline: list[str], per_row: list[dict]
) -> str | None:
    """Add the judged metrics (reward, win_rate) to each row's scores; the judge's description."""
    from rlhf.gen.judges import open_judge
    from rlhf.gen.metrics import pairwise_outcome

    if not {"reward", "win_rate"} & set(config.metrics):
        return None
    firsts = [s[0] for s in samples]
    with open_judge(config.judge, config.model, config.sampling) as judge:
        rewards = judge.score(prompts, firsts) if "reward" in config.metrics else [None] * len(firsts)
        margins = judge.compare(prompts, firsts, baseline) if "win_rate" in config.metrics else [None] * len(firsts)
        describe = judge.describe
    for scores, reward, margin in zip(per_row, rewards, margins, strict=True):
        if reward is not None:
            scores["reward"] = reward
        if margin is not None:
            scores["win_rate"] = pairwise_outcome(margin, 0.0)
    return describe


def _write(
    output_dir: Path,
    report: dict[str, Any],
    prompts: list[Any],
    samples: list[list[str]],
    references: list[str | None],
    per_row: list[dict],
    baseline: list[str],
) -> None:
    """``samples.jsonl`` (every sample and per-row score), ``report.json``, ``report.md`` and ``report.png``."""
    from rlhf.gen import report as report_module
    from rlhf.jobs.rundir import atomic_open, write_atomic, write_json

    with atomic_open(output_dir / "samples.jsonl") as handle:
        for i, (prompt, texts, reference, scores) in enumerate(zip(prompts, samples, references, per_row, strict=True)):
            row = {"row": i, "prompt": prompt, "reference": reference, "samples": texts, "scores": scores}
            if baseline:
                row["baseline"] = baseline[i]
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_atomic(output_dir / "report.md", report_module.markdown(report))
    report_module.plot(report, output_dir / "report.png")
    write_json(output_dir / "report.json", report, indent=2)  # last: it marks a finished evaluation


def _first_samples(sampler: Any, prompts: list[Any], source: Any) -> list[str]:
    return [per[0].text for per in sampler.generate(sampler.encode(prompts, source), n=1, description="baseline")]


def _aggregate(per_row: list[dict[str, float]], names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each metric's mean over the rows that have it, with a 95% interval (Wilson for the shares of yes/no scores)."""
    from rlhf.gen.metrics import mean_interval, win_rate

    columns = [*names, *(["self_consistency_agreement"] if "self_consistency" in names else [])]
    out = {}
    for name in columns:
        values = [scores[name] for scores in per_row if name in scores]
        if not values:
            out[name] = {"value": float("nan"), "low": None, "high": None, "n": 0}
            continue
        value, low, high = win_rate(values) if name in PROPORTIONS else mean_interval(values)
        out[name] = {"value": value, "low": low, "high": high, "n": len(values)}
    return out
