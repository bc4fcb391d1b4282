"""``rlhf iterative-dpo``: generate -> judge -> DPO, ``rounds`` times, from one config.

Online iterative DPO (Xu et al. 2023, "Some things are more CRINGE than others"; Dong et al.
2024, "RLHF workflow"): each round draws ``prompts_per_round`` prompts, samples
``sampling.n`` responses from the *current* policy, lets the judge pick the best and worst
of each prompt (:func:`rlhf.gen.common.preference_pairs`), and trains ``rlhf dpo`` on those
pairs starting from, and referenced to, the current policy. The new policy's weights are
loaded into the same vLLM replicas for the next round, so the replicas start once.

After each round the policy answers the ``eval_data`` prompts (one sample each, the same
seeds every round) and the judge compares each answer with the starting policy's answer
to the same prompt: the judged win rate against the start (ties count half), with a 95%
Wilson interval. ``summary.json`` and ``win_rate.png`` record it per round; each
``round-N/`` holds the pairs (``data.jsonl``, with provenance) and the DPO run.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from cluster.configtree import ConfigError
from rlhf import seeds
from rlhf.gen.config import IterativeDPOConfig


def check_config(config: IterativeDPOConfig) -> None:
    """Refuse settings whose rounds could not chain (each DPO output must be a full model to sample from)."""
    lora = config.dpo.model.lora
    if lora.enabled and not lora.merge_on_save:
        raise ConfigError(
            "config key 'dpo.model.lora.merge_on_save': iterative DPO samples each round's policy with vLLM, which "
            "needs the merged model: set dpo.model.lora.merge_on_save=true"
        )
    if config.dpo.preference.loss == "kto":
        raise ConfigError("config key 'dpo.preference.loss': iterative DPO trains on pairs; kto is unpaired")


def draw(num_prompts: int, per_round: int, round_index: int, seed: int) -> list[int]:
    """The prompt indices of a round: a fresh seeded draw without replacement (all prompts when fewer)."""
    rng = random.Random(seeds.position(seed, round_index))
    return rng.sample(range(num_prompts), min(per_round, num_prompts))


def run(config: IterativeDPOConfig) -> dict[str, Any]:
    """Run the rounds; return a summary with the judged win rate against the start after each."""
    from cluster.connect import connect
    from rlhf.gen.common import build_prompts, prepare_output, read_rows, release_output
    from rlhf.gen.judges import check_judge, open_judge
    from rlhf.gen.metrics import pairwise_outcome, win_rate
    from rlhf.gen.sampler import Sampler
    from rlhf.jobs.dpo import run as dpo
    from rlhf.jobs.rundir import write_json

    check_config(config)
    check_judge(config.judge)
    rows, source = read_rows(config.data)
    prompts = build_prompts(rows, source, config.template)
    eval_rows, eval_source = read_rows(config.eval_data)
    eval_prompts = build_prompts(eval_rows, eval_source, config.template)
    output_dir = prepare_output(config.output_dir)
    try:
        connect(config.cluster)
        history: list[dict[str, Any]] = []
        policy = config.model
        with (
            Sampler(config.model, config.sampling) as sampler,
            open_judge(config.judge, config.model, config.sampling) as judge,
        ):
            prompt_ids = sampler.encode(prompts, source)
            eval_ids = sampler.encode(eval_prompts, eval_source)
            start_answers = _answers(sampler, eval_ids, "start policy answers")
            for round_index in range(1, config.rounds + 1):
                round_dir = output_dir / f"round-{round_index}"
                data, dropped = _round_pairs(
                    config, sampler, judge, policy, prompts, prompt_ids, round_index, round_dir
                )
                result = dpo(_dpo_config(config, policy, data, round_dir / "dpo"))
                policy = result["final_model"]
                sampler.load_weights(policy)
                answers = _answers(sampler, eval_ids, f"round {round_index} answers")
                margins = judge.compare(eval_prompts, answers, start_answers)
                outcomes = [pairwise_outcome(m, 0.0) for m in margins if m is not None]
                interval = win_rate(outcomes) if outcomes else (float("nan"),) * 3
                history.append(_round_record(round_index, data, dropped, policy, margins, outcomes, interval, result))
                print(_round_line(history[-1]), flush=True)
        summary = {"output_dir": str(output_dir), "final_model": policy, "rounds": history, "judge": judge.describe}
        write_json(output_dir / "summary.json", summary, indent=2)
        _plot(history, output_dir / "win_rate.png")
    finally:
        release_output(output_dir)
    return summary


def _round_pairs(
    config: IterativeDPOConfig,
    sampler: Any,
    judge: Any,
    policy: str,
    prompts: list[Any],
    prompt_ids: list[list[int]],
    round_index: int,
    round_dir: Path,
) -> tuple[Path, Any]:
    """Draw a round's prompts and write their judged pairs; the dataset's path and the drops."""
    from rlhf.gen.common import Dropped

    picks = draw(len(prompts), config.prompts_per_round, round_index, config.sampling.seed)
    dropped = Dropped()
    data = _judged_pairs(
        config,
        sampler,
        judge,
        policy,
        [prompts[i] for i in picks],
        [prompt_ids[i] for i in picks],
        picks,
        round_dir,
        dropped,
    )
    return data, dropped


def _round_record(
    round_index: int,
    data: Path,
    dropped: Any,
    policy: str,
    margins: list[float | None],
    outcomes: list[float],
    interval: tuple[float, float, float],
    result: dict[str, Any],
) -> dict[str, Any]:
    """A round's entry of the summary: its pairs and drops, the new policy, its win rate vs start, the DPO losses."""
    rate, low, high = interval
    return {
        "round": round_index,
        "pairs": len(data.read_text().splitlines()),
        "dropped": dict(dropped.reasons),
        "policy": policy,
        "win_rate": rate,
        "win_rate_low": low,
        "win_rate_high": high,
        "judged": len(outcomes),
        "unjudged": len(margins) - len(outcomes),
        "dpo_loss_first": result.get("first_loss"),
        "dpo_loss_last": result.get("last_loss"),
    }


def _round_line(record: dict[str, Any]) -> str:
    """The progress line of a round's entry: its pairs and its win rate vs start with the interval."""
    return (
        f"round {record['round']}: {record['pairs']} pairs, win rate vs start {record['win_rate']:.3f} "
        f"[{record['win_rate_low']:.3f}, {record['win_rate_high']:.3f}]"
    )


def _answers(sampler: Any, prompt_ids: list[list[int]], description: str) -> list[str]:
    return [c[0].text for c in sampler.generate(prompt_ids, n=1, description=description)]


def _judged_pairs(
    config: IterativeDPOConfig,
    sampler: Any,
    judge: Any,
    policy: str,
    prompts: list[Any],
    prompt_ids: list[list[int]],
    picks: list[int],
    round_dir: Path,
    dropped: Any,
) -> Path:
    """Sample the current policy, judge, and write the round's pairs; the dataset's path."""
    from cluster import configtree
    from rlhf.gen.common import answer, preference_pairs, provenance, score_samples, write_dataset
    from rlhf.jobs.runner import JobError

    completions = sampler.generate(prompt_ids, description=f"{round_dir.name} samples")
    samples = [[c.text for c in per_prompt] for per_prompt in completions]
    scores = score_samples(judge, prompts, samples)
    pairs = preference_pairs(prompts, samples, scores, config.filter, config.min_margin, dropped)
    if not pairs:
        raise JobError(
            f"{round_dir.name}: no preference pairs from {len(prompts)} prompts (dropped: {dict(dropped.reasons)}); "
            "sample more (sampling.n, temperature) or loosen the filter and min_margin"
        )
    rows = [
        {
            "prompt": prompts[p.prompt_index],
            "chosen": answer(prompts[p.prompt_index], p.chosen),
            "rejected": answer(prompts[p.prompt_index], p.rejected),
            "provenance": provenance(
                "iterative-dpo",
                round=int(round_dir.name.split("-")[1]),
                model=policy,
                source={"path": config.data.path, "split": config.data.split, "row": picks[p.prompt_index]},
                judge=judge.describe,
                chosen_score=p.chosen_score,
                rejected_score=p.rejected_score,
                scores=p.scores,
            ),
        }
        for p in pairs
    ]
    round_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"dropped": dict(dropped.reasons), "prompts": len(prompts), "config": configtree.to_dict(config)}
    return write_dataset(round_dir, rows, manifest)


def _dpo_config(config: IterativeDPOConfig, policy: str, data: Path, output_dir: Path) -> Any:
    d = config.dpo
    return replace(
        d,
        model=replace(d.model, name_or_path=policy),
        data=replace(d.data, path=str(data), split="train", eval_path=None, eval_split=None, format="preference"),
        train=replace(d.train, output_dir=str(output_dir), seed=d.train.seed),
    )


def _plot(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [h["round"] for h in history]
    rates = [h["win_rate"] for h in history]
    errors = [
        [h["win_rate"] - h["win_rate_low"] for h in history],
        [h["win_rate_high"] - h["win_rate"] for h in history],
    ]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(rounds, rates, yerr=errors, marker="o", capsize=4)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="the starting policy")
    ax.set(xlabel="round", ylabel="judged win rate vs start", ylim=(0, 1), xticks=rounds, title="iterative DPO")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
