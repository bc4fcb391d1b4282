"""GRPO steps/s and generated tokens/s: ``rlhf ppo`` (``algorithm.estimator=grpo``) against TRL's GRPOTrainer.

Same model (the tiny one, then a larger one), same bundled prompts, same rule-based reward (``positive_word_reward`` of the
response), same group size, prompts per step and generation length, temperature 1, no KL term
(TRL: ``beta=0``; rlhf: ``kl.coefficient=0``, so neither runs a reference model), one pass
over each batch with the clipped ratio (epsilon 0.2) and token-level aggregation, one
optimizer step per generation round over one micro-batch of every completion, fp32, constant
learning rate. Each side runs in a fresh process on this CPU, one after the other.

rlhf generates with a vLLM replica on Ray Serve, whose engine computes on both cores (``engine_threads=0``,
the default), and trains on a policy actor (DeepSpeed ZeRO-0) given both cores (Ray sets an actor's torch
threads to its CPUs), then brings the
replica the new weights: through vLLM's weight-transfer API (gloo, the default), and in a
second run through files. TRL generates with transformers' ``generate`` in the trainer's
process and needs no sync, and in a second run with vLLM in its process (``vllm_mode="colocate"``,
which then loads the new weights into that engine every step); when that run fails, its row says how.
TRL's other vLLM mode (``vllm_mode="server"``) cannot run on a CPU: ``trl vllm-serve`` starts
``vllm serve`` with ``--weight-transfer-config '{"backend": "nccl"}'``, and its client's
``VLLMClient.init_communicator`` raises ``NotImplementedError`` on any device but a CUDA one ("Weight
synchronization runs on vLLM's NCCL weight-transfer engine, which needs a CUDA device"). A timed step is the whole RL step on
both sides (rlhf: ``time/step`` of its metrics, every stage included; TRL: from one
``on_step_end`` to the next). The first step of each side is a warm-up and not timed; start-up
(Ray, the replica, model loading) is not part of any step. rlhf by transfer and TRL with transformers, the
headline pair, run ``ROUNDS`` times, taking turns; their figures are the median of the rounds with the range, and
their stage tables add up every round's timed steps.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

STEPS = 13  # the first is a warm-up
ROUNDS = 2  # of the headline pair (rlhf by transfer, TRL with transformers), taking turns
GROUP_SIZE = 8
PROMPTS_PER_STEP = 8
MAX_NEW_TOKENS = 64
LEARNING_RATE = 1e-5
SEED = 0
REWARD = "rlhf.data.bundled:positive_word_reward"

OUR_STAGES = [
    ("generate", "generate (vLLM replica)"),
    ("experience", "experience: policy log-probs + rewards + advantages"),
    ("train_policy", "policy update (forward, backward, AdamW)"),
    ("sync", "weight sync: transfer into the replica (pause, broadcast, load, resume)"),
    ("checkpoint", "checkpoint (last step only)"),
]


def run_rlhf(model_dir: str, steps: int, output_dir: str, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """``rlhf ppo`` with GRPO on an embedded Ray cluster; the per-step figures of its metrics."""
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from cluster import configtree
    from rlhf.jobs.ppo import run
    from rlhf.rl.config import PPOConfig

    batch = GROUP_SIZE * PROMPTS_PER_STEP
    config = configtree.load(
        PPOConfig,
        None,
        [
            f"policy.name_or_path={model_dir}",
            f"reward={REWARD}",
            "data.path=bundled:prompts",
            "data.format=prompt",
            f"train.output_dir={output_dir}",
            f"train.max_steps={steps}",
            f"train.seed={SEED}",
            "algorithm.estimator=grpo",
            "algorithm.clip_low=0.2",
            "algorithm.clip_high=0.2",
            "algorithm.aggregation=token",
            "kl.coefficient=0",
            "roles.cpus_per_worker=2",  # the policy actor trains on both cores, as TRL's process does
            f"rollout.group_size={GROUP_SIZE}",
            f"rollout.prompts_per_step={PROMPTS_PER_STEP}",
            f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
            "rollout.max_model_len=256",
            "engine.zero_stage=0",
            "engine.precision=fp32",
            f"engine.micro_batch_size={batch}",
            f"engine.learning_rate={LEARNING_RATE}",
            "engine.lr_scheduler=constant",
            "engine.warmup_steps=0",
            *overrides,
        ],
    )
    run(config)
    records = [json.loads(line) for line in Path(output_dir, "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    timed = train[1:]
    seconds = sum(r["time/step"] for r in timed)
    return {
        "step_seconds": [r["time/step"] for r in train],
        "median_step_seconds": median(r["time/step"] for r in timed),
        "tokens_per_second": sum(r["generated_tokens"] for r in timed) / seconds,
        "generate_tokens_per_second": median(r["tokens_per_second"] for r in timed),
        "rewards": [r["reward_mean"] for r in train],
        "response_length": sum(r["response_length"] for r in timed) / len(timed),
        "stage_seconds": {key: sum(r[f"time/{key}"] for r in timed) for key, _ in OUR_STAGES},
        "timed_seconds": seconds,
    }


def run_trl(model_dir: str, steps: int, output_dir: str, vllm: bool = False) -> dict[str, Any]:
    """TRL's GRPOTrainer with the same settings (see :mod:`benchmarks.trl_grpo`); ``vllm``: generating with vLLM
    in its process (``vllm_mode="colocate"``)."""
    from benchmarks.trl_grpo import run_trl_grpo
    from rlhf.data.bundled import bundled_path, positive_word_reward

    rows = [json.loads(line) for line in bundled_path("prompts").read_text().splitlines()]
    result = run_trl_grpo(
        model_dir,
        [row["prompt"] for row in rows],
        positive_word_reward,
        group_size=GROUP_SIZE,
        prompts_per_step=PROMPTS_PER_STEP,
        max_new_tokens=MAX_NEW_TOKENS,
        steps=steps,
        learning_rate=LEARNING_RATE,
        seed=SEED,
        output_dir=output_dir,
        vllm=vllm,
    )
    timed = result["step_seconds"][1:]
    result["timed_seconds"] = sum(timed)
    result["response_length"] = sum(result["generated_tokens"][1:]) / (len(timed) * GROUP_SIZE * PROMPTS_PER_STEP)
    return result


def _share_rows(seconds: dict[str, float], labels: list[tuple[str, str]], total: float, steps: int) -> list[str]:
    return [
        f"| {label} | {seconds[key] / steps * 1000:,.0f} | {seconds[key] / total:.0%} |"
        for key, label in labels
        if key in seconds
    ]


def pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one side as one: the median of the rounds' median step and tokens/s with their range
    (``*_range``), the stage seconds and timed seconds of every round added, the first round's rewards and the
    mean response length."""
    steps, tokens = ([r[key] for r in rounds] for key in ("median_step_seconds", "tokens_per_second"))
    return {
        "rounds": len(rounds),
        "median_step_seconds": median(steps),
        "median_step_seconds_range": (min(steps), max(steps)),
        "tokens_per_second": median(tokens),
        "tokens_per_second_range": (min(tokens), max(tokens)),
        "response_length": sum(r["response_length"] for r in rounds) / len(rounds),
        "rewards": rounds[0]["rewards"],
        "stage_seconds": {key: sum(r["stage_seconds"][key] for r in rounds) for key in rounds[0]["stage_seconds"]},
        "timed_seconds": sum(r["timed_seconds"] for r in rounds),
    }


def _figure(result: dict[str, Any], key: str, scale: float) -> str:
    """``key`` of a run (x ``scale``), with the range of the rounds where there are several."""
    value = f"{result[key] * scale:,.0f}"
    if result.get("rounds", 1) < 2:
        return value
    low, high = result[f"{key}_range"]
    return f"{value} ({low * scale:,.0f}-{high * scale:,.0f})"


def _model_section(title: str, model_dir: str, steps: int, rounds: int) -> list[str]:
    """rlhf (weights by transfer, then by files) and TRL on one model, each in a fresh process; the table rows.
    rlhf by transfer and TRL run ``rounds`` times, taking turns."""
    from benchmarks.common import isolated
    from benchmarks.trl_grpo import STAGES as TRL_STAGES

    ours_rounds, theirs_rounds = [], []
    with tempfile.TemporaryDirectory() as root:
        for turn in range(rounds):
            transfer = ("rollout.weight_sync=transfer",)
            ours_rounds.append(isolated(run_rlhf, model_dir, steps, f"{root}/transfer-{turn}", transfer))
            theirs_rounds.append(isolated(run_trl, model_dir, steps, f"{root}/trl-{turn}"))
        files = isolated(run_rlhf, model_dir, steps, root + "/files", ("rollout.weight_sync=files",))
        try:
            theirs_vllm: dict[str, Any] | str = isolated(run_trl, model_dir, steps, root + "/trl-vllm", vllm=True)
        except Exception as error:  # the row says what happened (TRL with this vLLM build)
            theirs_vllm = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    ours, theirs = pooled(ours_rounds), pooled(theirs_rounds)
    timed = steps - 1
    ratio = theirs["median_step_seconds"] / ours["median_step_seconds"]
    token_ratio = ours["tokens_per_second"] / theirs["tokens_per_second"]
    turn_ratios = ", ".join(
        f"{t['median_step_seconds'] / o['median_step_seconds']:.2f}x"
        for o, t in zip(ours_rounds, theirs_rounds, strict=True)
    )
    runs = (
        ("rlhf ppo (grpo), weights by transfer (default)", ours),
        ("rlhf ppo (grpo), weights by files", files),
        ("TRL GRPOTrainer", theirs),
    )
    rows = [
        f"| {name} | {_figure(m, 'median_step_seconds', 1000)} | {_figure(m, 'tokens_per_second', 1)} | "
        f"{m['response_length']:.1f} | {m['rewards'][0]:+.2f} -> {m['rewards'][-1]:+.2f} |"
        for name, m in runs
    ]
    vllm_name = "TRL GRPOTrainer, generating with vLLM (`vllm_mode=colocate`)"
    if isinstance(theirs_vllm, str):
        rows.append(f"| {vllm_name} | did not run: `{theirs_vllm}` | | | |")
        vllm_ratio = ""
    else:
        m = theirs_vllm
        rows.append(
            f"| {vllm_name} | {m['median_step_seconds'] * 1000:,.0f} | {m['tokens_per_second']:,.0f} | "
            f"{m['response_length']:.1f} | {m['rewards'][0]:+.2f} -> {m['rewards'][-1]:+.2f} |"
        )
        vllm_ratio = (
            f"| **rlhf (transfer) / TRL with vLLM** | **{m['median_step_seconds'] / ours['median_step_seconds']:.2f}x** "
            f"| **{ours['tokens_per_second'] / m['tokens_per_second']:.2f}x** | | |"
        )
    sync_ms = {
        name: m["stage_seconds"]["sync"] / (timed * m.get("rounds", 1)) * 1000
        for name, m in (("transfer", ours), ("files", files))
    }
    return [
        f"### {title}",
        "",
        "| run | median step (ms) | generated tokens/s | mean response tokens | step reward first -> last |",
        "|---|---:|---:|---:|---|",
        *rows,
        f"| **rlhf (transfer) / TRL** (steps/s, tokens/s; above 1: rlhf faster) | **{ratio:.2f}x** | "
        f"**{token_ratio:.2f}x** | | |",
        *([vllm_ratio] if vllm_ratio else []),
        "",
        f"Step ratio of each round (rlhf by transfer / TRL, in the order they ran): {turn_ratios}.",
        "",
        f"Weight sync per step: {sync_ms['transfer']:,.0f} ms by transfer (gloo, from the policy's memory), "
        f"{sync_ms['files']:,.0f} ms by files (save, then each replica reloads).",
        "",
        "Where rlhf's step goes (transfer; ms per timed step of every round, share of the timed steps):",
        "",
        "| stage | ms | share |",
        "|---|---:|---:|",
        *_share_rows(ours["stage_seconds"], OUR_STAGES, ours["timed_seconds"], timed * rounds),
        "",
        "Where TRL's step goes:",
        "",
        "| stage | ms | share |",
        "|---|---:|---:|",
        *_share_rows(theirs["stage_seconds"], TRL_STAGES, theirs["timed_seconds"], timed * rounds),
        "",
    ]


def report(model_dir: str, peak_flops: float, steps: int = STEPS, warmup: int = 1, rounds: int = ROUNDS) -> str:
    """Run every side on the tiny model and on a larger one; the markdown section (``peak_flops`` and ``warmup``
    are not used here)."""
    from benchmarks.common import describe_model, small_model

    small_dir, small = small_model()
    timed = steps - 1
    return "\n".join(
        [
            "## GRPO step time and generated tokens/s: rlhf ppo vs TRL GRPOTrainer",
            "",
            f"Bundled prompts, rule-based reward, {PROMPTS_PER_STEP} prompts x {GROUP_SIZE} samples per step, up to "
            f"{MAX_NEW_TOKENS} new tokens at temperature 1, no KL (no reference model on either side), one clipped "
            "pass per batch, one optimizer step per generation round over one micro-batch, fp32; "
            f"{steps} steps each, the first a warm-up, the median of the other {timed} taken; rlhf by transfer and "
            f"TRL with transformers run {rounds} times, taking turns, and their rows give the median of the rounds "
            "with the range in brackets. rlhf generates on a "
            "vLLM replica (Ray Serve) and brings it the new weights every step, by default through vLLM's "
            "weight-transfer API (gloo on this CPU), and, in a second run, through files; TRL generates with "
            "transformers in-process and needs no sync, and, in a second run, with vLLM in its process "
            "(`vllm_mode=colocate`; when it fails, its row says how). TRL's server mode cannot run here: "
            "`trl vllm-serve` starts `vllm serve` with the NCCL weight-transfer backend, and TRL's "
            "`VLLMClient.init_communicator` refuses any device but a CUDA one (`NotImplementedError`: weight "
            "synchronization runs on vLLM's NCCL weight-transfer engine). Each run is its own process on this CPU, one after the "
            "other. Two models: the tiny one of the tests, whose steps are so cheap that vLLM's fixed cost per "
            "decoding step dominates, and a larger one where the work per token does, as with real models.",
            "",
            *_model_section(f"Tiny model, {describe_model(model_dir)}", model_dir, steps, rounds),
            *_model_section(f"Small model, {small}", small_dir, steps, rounds),
        ]
    ).rstrip()
