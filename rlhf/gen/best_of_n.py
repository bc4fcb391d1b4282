"""``rlhf best-of-n``: rejection sampling with a reward model, and one round of expert iteration.

For each prompt, ``sampling.n`` responses are scored by the judge; the ``top_k`` best that
pass the quality rules (and ``filter.min_score``) become prompt/completion rows of an SFT
dataset (near-duplicate rows dropped). With ``finetune=true`` the same command then runs
``rlhf sft`` on them from the generating model (the ``sft`` section configures that job;
its model and data are set here), which is one round of expert iteration (ReST / RAFT):
sample, keep the best, fine-tune on them.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rlhf.gen.config import BestOfNConfig


def select(
    prompts: list[Any], samples: list[list[str]], scores: list[list[float | None]], config: BestOfNConfig, dropped: Any
) -> list[tuple[int, int, float]]:
    """``(prompt index, sample index, score)`` of the kept responses: per prompt the ``top_k`` best acceptable ones."""
    from rlhf.gen.common import acceptable_samples

    kept = []
    for p, (prompt, texts, marks) in enumerate(zip(prompts, samples, scores, strict=True)):
        acceptable = acceptable_samples(prompt, texts, marks, config.filter, dropped)
        acceptable.sort(key=lambda item: -item[0])
        kept += [(p, j, score) for score, j in acceptable[: config.top_k]]
    return kept


def run(config: BestOfNConfig) -> dict[str, Any]:
    """Sample, score, keep the best (then fine-tune); return a summary."""
    from cluster import configtree
    from cluster.connect import connect
    from rlhf.gen.common import (
        Dropped,
        build_prompts,
        deduplicate,
        prepare_output,
        prompt_text,
        read_rows,
        release_output,
        sample_and_judge,
        write_dataset,
    )
    from rlhf.gen.judges import check_judge

    check_judge(config.judge)
    rows, source = read_rows(config.data)
    prompts = build_prompts(rows, source, config.template)
    output_dir = prepare_output(config.output_dir)
    try:
        connect(config.cluster)
        started = time.perf_counter()
        samples, scores, describe = sample_and_judge(config.model, config.sampling, config.judge, prompts, source)
        dropped = Dropped()
        chosen = select(prompts, samples, scores, config, dropped)
        texts = [prompt_text(prompts[p]) + "\n" + samples[p][j] for p, j, _ in chosen]
        chosen = [chosen[i] for i in deduplicate(texts, config.filter, dropped)]
        out = _dataset_rows(config, prompts, samples, scores, chosen, describe)
        summary = _summary(output_dir, prompts, scores, chosen, out, dropped, started)
        data = write_dataset(output_dir, out, {**summary, "config": configtree.to_dict(config)})
        if config.finetune:
            summary["sft"] = finetune(config, str(data), output_dir / "sft")
    finally:
        release_output(output_dir)
    return summary


def _dataset_rows(
    config: BestOfNConfig,
    prompts: list[Any],
    samples: list[list[str]],
    scores: list[list[float | None]],
    chosen: list[tuple[int, int, float]],
    describe: str,
) -> list[dict[str, Any]]:
    """The SFT rows of the kept responses: prompt, completion and provenance (judge, score, rank, seed)."""
    from rlhf.gen.common import answer, provenance

    return [
        {
            "prompt": prompts[p],
            "completion": answer(prompts[p], samples[p][j]),
            "provenance": provenance(
                "best-of-n",
                model=config.model,
                source={"path": config.data.path, "split": config.data.split, "row": p},
                judge=describe,
                score=score,
                rank=sorted((x for x in scores[p] if x is not None), reverse=True).index(score) + 1,
                scores=scores[p],
                n=config.sampling.n,
                sample=j,
                seed=config.sampling.seed,
            ),
        }
        for p, j, score in chosen
    ]


def _summary(
    output_dir: Path,
    prompts: list[Any],
    scores: list[list[float | None]],
    chosen: list[tuple[int, int, float]],
    out: list[dict[str, Any]],
    dropped: Any,
    started: float,
) -> dict[str, Any]:
    """The run's summary: prompts, rows kept, mean score of all and of the kept, drops, seconds since ``started``."""
    scored = [x for per_prompt in scores for x in per_prompt if x is not None]
    return {
        "output": str(output_dir / "data.jsonl"),
        "prompts": len(prompts),
        "rows": len(out),
        "mean_score_all": sum(scored) / max(len(scored), 1),
        "mean_score_kept": sum(score for _, _, score in chosen) / max(len(chosen), 1),
        "dropped": dict(dropped.reasons),
        "seconds": round(time.perf_counter() - started, 2),
    }


def finetune(config: BestOfNConfig, data: str, output_dir: Any) -> dict[str, Any]:
    """``rlhf sft`` from the generating model on the kept responses (``config.sft`` otherwise; its workers join the
    cluster this command is connected to)."""
    from rlhf.jobs.sft import run as sft

    sft_config = config.sft
    sft_config = replace(
        sft_config,
        model=replace(sft_config.model, name_or_path=config.model),
        data=replace(sft_config.data, path=data, split="train", eval_path=None, eval_split=None),
        train=replace(sft_config.train, output_dir=str(output_dir)),
    )
    return sft(sft_config)
