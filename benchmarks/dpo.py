"""DPO pairs/s per worker: rlhf's DPO path against TRL's DPOTrainer, and where the time goes.

Same model (the tiny one, then SmolLM2-135M-Instruct), same bundled preference pairs, same maximum sequence length, micro-batch,
learning rate, beta and number of steps; sigmoid DPO with reference log-probs precomputed
once before training on both sides (rlhf: ``preference.reference=precomputed``, TRL:
``precompute_ref_log_probs=True``, both in batches of 16 pairs); fp32, no gradient
checkpointing; one worker each, on this machine's CPU, each in a fresh process, one after
the other.

A timed step is the whole optimizer step, data included: for rlhf, sampling and collating
the micro-batch plus ``rlhf.jobs.loop.train_step`` (the job's own step function, with
``PreferenceObjective`` and ``TrainingEngine``); for TRL, the time between two
``on_step_end`` callbacks (its data loader, ``training_step``, clipping, optimizer and
scheduler). The first WARMUP steps of each are not timed. The reference precompute is
timed on its own (it runs once per run, not per step).

Stages are timed by thin wrappers around the calls the step makes (rlhf: the engine's
forward, ``backward`` and ``step``, the objective's ``loss``; TRL: ``compute_loss`` and
``training_step`` of a ``DPOTrainer`` subclass, and callbacks at step begin and end).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import (
    StageTimer,
    TimedEngine,
    TimedObjective,
    other_seconds,
    stage_difference,
    stage_rows,
    step_stages,
    trainer_stages,
)

STEPS = 120
WARMUP = 10
REPEATS = 3
BATCH = 8
MAX_LENGTH = 128
LEARNING_RATE = 5e-4
BETA = 0.1
REFERENCE_BATCH = 16  # pairs per reference forward; rlhf's PreferenceObjective.prepare uses 16

STAGES = step_stages("forward + log-probs + DPO loss + metrics")


@dataclass
class Measurement:
    """Throughput of one side: timed training steps, and the one-off reference precompute."""

    name: str
    pairs: int = 0
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    reference_pairs: int = 0
    reference_tokens: int = 0
    reference_seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # seconds over the timed steps

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def run_rlhf(
    model_dir: str, steps: int = STEPS, warmup: int = WARMUP, zero_stage: int = 0, packing: bool = False
) -> Measurement:
    """rlhf: the DPO job's objective, reference precompute, step function and DeepSpeed engine, one rank."""
    from rlhf.config import PreferenceLossConfig
    from rlhf.data.config import DataConfig
    from rlhf.data.encode import build_examples
    from rlhf.engine import EngineConfig, TrainingEngine
    from rlhf.jobs.batching import step_indices
    from rlhf.jobs.dpo import PreferenceObjective
    from rlhf.jobs.loop import train_step
    from rlhf.jobs.worker import seed_everything
    from rlhf.models.config import ModelConfig
    from rlhf.models.loading import load_tokenizer

    model_config = ModelConfig(name_or_path=model_dir)
    tokenizer = load_tokenizer(model_config)
    examples = build_examples(DataConfig(path="bundled:preference", max_length=MAX_LENGTH), tokenizer, "preference")
    seed_everything(0)
    objective = PreferenceObjective(
        model_config, PreferenceLossConfig(loss="dpo", beta=BETA), tokenizer.pad_token_id, packing=packing
    )
    model = objective.build_model()
    name = ("rlhf" if zero_stage == 0 else f"rlhf ZeRO-{zero_stage}") + (" packed" if packing else "")
    result = Measurement(name)

    started = time.perf_counter()
    examples = objective.prepare(model, examples)  # what run_worker does before building the engine
    result.reference_seconds = time.perf_counter() - started
    result.reference_pairs = len(examples)
    result.reference_tokens = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples)

    config = EngineConfig(
        zero_stage=zero_stage,
        precision="fp32",
        micro_batch_size=BATCH,
        learning_rate=LEARNING_RATE,
        lr_scheduler="constant",
    )
    timer = StageTimer()
    engine = TimedEngine(TrainingEngine(model, config, total_steps=steps), timer)
    timed_objective = TimedObjective(objective, timer)
    for step in range(steps):
        timer.enabled = step >= warmup
        started = time.perf_counter()
        with timer("data"):
            indices = step_indices(len(examples), step, BATCH, 1, seed=0)
            chosen = [[examples[i] for i in idx] for idx in indices]
            micro_batches = [objective.collate(c) for c in chosen]
        train_step(engine, timed_objective, micro_batches)
        if timer.enabled:
            result.seconds += time.perf_counter() - started
            result.steps += 1
            for pairs in chosen:
                result.pairs += len(pairs)
                result.tokens += sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in pairs)
    result.stages = dict(timer.seconds)
    result.stages["other"] = other_seconds(result.seconds, result.stages)
    return result


def run_trl(model_dir: str, steps: int = STEPS, warmup: int = WARMUP) -> Measurement:
    """TRL's DPOTrainer on the same pairs: sigmoid loss, precomputed reference log-probs, CPU."""
    import json

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from benchmarks.common import trainer_step_timing, trl_training_args
    from rlhf.data.bundled import bundled_path

    rows = [json.loads(line) for line in bundled_path("preference").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    result = Measurement("TRL DPOTrainer")
    timer = StageTimer()
    step_timing, timing = trainer_step_timing(timer, warmup)

    class TimedDPOTrainer(step_timing, DPOTrainer):
        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            started = time.perf_counter()
            dataset = super()._precompute_ref_logps(dataset, name, batch_size)
            result.reference_seconds += time.perf_counter() - started
            result.reference_pairs += len(dataset)
            result.reference_tokens += sum(
                2 * len(p) + len(c) + len(r)
                for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
            )
            return dataset

        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None):
            if timer.enabled:
                result.pairs += inputs["input_ids"].shape[0] // 2
                result.tokens += int(inputs["attention_mask"].sum())
            with timer("forward+loss"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            max_length=MAX_LENGTH,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            beta=BETA,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=REFERENCE_BATCH,
            **trl_training_args(),
        )
        trainer = TimedDPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[timing],
        )
        trainer.train()
    result.seconds, result.steps, result.stages = trainer_stages(timer, timing.step_seconds, warmup)
    return result


def _median_runs(model_dir: str, steps: int, warmup: int, repeats: int) -> list[Measurement]:
    """Each configuration ``repeats`` times, interleaved so slow phases of a shared machine hit every side;
    for each, the run of median throughput."""
    from benchmarks.common import isolated

    configurations = [
        (run_rlhf, {}),
        (run_rlhf, {"packing": True}),
        (run_rlhf, {"zero_stage": 2}),
        (run_trl, {}),
    ]
    runs: list[list[Measurement]] = [[] for _ in configurations]
    for _ in range(repeats):
        for index, (fn, kwargs) in enumerate(configurations):
            runs[index].append(isolated(fn, model_dir, steps, warmup, **kwargs))
    return [sorted(r, key=lambda m: m.pairs_per_second)[len(r) // 2] for r in runs]


REAL_STEPS, REAL_WARMUP, REAL_REPEATS = 16, 4, 2  # SmolLM2-135M-Instruct: about a second per step here


def _model_section(title: str, model_dir: str, peak_flops: float, steps: int, warmup: int, repeats: int) -> list[str]:
    """Every configuration on one model: its tables and where the step's time goes."""
    from benchmarks.common import training_flops_per_token

    ours, ours_packed, ours_zero2, theirs = _median_runs(model_dir, steps, warmup, repeats)
    mean_length = round(ours.tokens / (2 * ours.pairs))
    train_flops = training_flops_per_token(model_dir, mean_length)  # forward + backward: 6 x weights + attention
    forward_flops = train_flops / 3  # the reference pass is a forward only
    rows, reference_rows = [], []
    for m in (ours, ours_packed, ours_zero2, theirs):
        mfu = m.tokens_per_second * train_flops / peak_flops
        rows.append(
            f"| {m.name} | {m.pairs} | {m.seconds:.2f} | {m.pairs_per_second:,.0f} | {m.tokens_per_second:,.0f} | {mfu:.2%} |"
        )
    for m in (ours, ours_packed, theirs):  # the ZeRO stage does not touch the reference pass
        reference_per_second = m.reference_pairs / m.reference_seconds
        reference_mfu = m.reference_tokens / m.reference_seconds * forward_flops / peak_flops
        reference_rows.append(
            f"| {m.name} | {m.reference_pairs} | {m.reference_seconds:.2f} | {reference_per_second:,.0f} | "
            f"{reference_mfu:.2%} | {m.reference_seconds / (m.seconds / m.steps):.0f} |"
        )
    for name, side in (("rlhf", ours), ("rlhf packed", ours_packed), ("rlhf ZeRO-2", ours_zero2)):
        rows.append(f"| **ratio {name} / TRL** | | | **{side.pairs_per_second / theirs.pairs_per_second:.2f}x** | | |")
    reference_ratio = (ours.reference_pairs / ours.reference_seconds) / (
        theirs.reference_pairs / theirs.reference_seconds
    )
    reference_rows.append(f"| **ratio rlhf / TRL** | | | **{reference_ratio:.2f}x** | | |")
    return [
        f"### {title}: mean {mean_length} tokens per sequence, {steps} steps ({warmup} warm-up steps not timed), "
        f"each configuration run {repeats} times, interleaved, and its median run reported",
        "",
        "| run | pairs timed | seconds | pairs/s | tokens/s | MFU |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Reference log-probs, computed once before training over all training pairs (forward only, no grad; "
        "TRL's time includes writing them to its datasets cache file). The last column is that time in "
        "training steps of the same run:",
        "",
        "| run | pairs | seconds | pairs/s | MFU | in training steps |",
        "|---|---:|---:|---:|---:|---:|",
        *reference_rows,
        "",
        "Where the time of a training step goes (ms per timed step, and share of the step):",
        "",
        f"| stage | {ours.name} ms | share | {ours_packed.name} ms | share | {ours_zero2.name} ms | share "
        f"| {theirs.name} ms | share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *stage_rows(STAGES, [ours, ours_packed, ours_zero2, theirs]),
        "",
        stage_difference(STAGES, ours, theirs),
        "",
        stage_difference(STAGES, ours_packed, theirs),
        "",
    ]


def report(model_dir: str, peak_flops: float, steps: int = STEPS, warmup: int = WARMUP, repeats: int = REPEATS) -> str:
    """Every side on the tiny model and on the real one; the markdown section.

    ``steps``, ``warmup`` and ``repeats`` are the tiny model's; the real model runs ``REAL_STEPS`` (``REAL_WARMUP``
    not timed) ``REAL_REPEATS`` times, or fewer when the arguments ask for fewer (``--quick``).
    """
    from benchmarks.common import describe_model
    from rlhf.models.loading import resolve

    real = (min(steps, REAL_STEPS), min(warmup, REAL_WARMUP), min(repeats, REAL_REPEATS))
    return "\n".join(
        [
            "## DPO throughput per worker: rlhf vs TRL DPOTrainer",
            "",
            f"Bundled preference pairs, max length {MAX_LENGTH}, micro-batch {BATCH} pairs, sigmoid DPO with beta "
            f"{BETA}, fp32, no gradient checkpointing, one worker on this CPU, each run in a fresh process. "
            "Reference log-probs are precomputed "
            f"once before training on both sides (batches of {REFERENCE_BATCH} pairs), so a step is one policy "
            "forward and backward over the chosen and rejected rows of its pairs. rlhf runs its DPO job's own "
            "`PreferenceObjective`, `train_step` and `TrainingEngine` (ZeRO-0 padded; ZeRO-0 with `data.packing`, "
            "each micro-batch's chosen and rejected sequences in one padding-free row; `engine.zero_stage=2` padded, "
            "which on one worker the engine runs as ZeRO-0, since one rank has nothing to partition); TRL runs "
            "`DPOTrainer` with `precompute_ref_log_probs=True`. A timed step "
            "includes fetching and collating its batch. MFU = model FLOPs/s (6 x weights + attention per real "
            "token; a third of that for the forward-only reference pass) / measured fp32 matmul peak. "
            "rlhf's stages are "
            "timed around the engine's forward, `backward` and `step` and the objective's `loss`; TRL's around "
            "`compute_loss` and `training_step` (backward = `training_step` - `compute_loss`), its data loader "
            "being the time from the previous step's end to `on_step_begin`, and its optimizer stage the rest of "
            "the step (clipping, optimizer, scheduler, `zero_grad`, token and FLOP counters).",
            "",
            *_model_section(f"Tiny model, {describe_model(model_dir)}", model_dir, peak_flops, steps, warmup, repeats),
            *_model_section("SmolLM2-135M-Instruct", str(resolve("smollm2-135m-instruct")), peak_flops, *real),
        ]
    ).rstrip()
