"""SFT tokens/s per worker: rlhf's training engine against TRL's SFTTrainer, and where the time goes.

Same model (the tiny one, then SmolLM2-135M-Instruct), same bundled prompt/completion data, same maximum sequence length,
micro-batch, learning rate and number of steps; fp32 and no gradient checkpointing on both
sides; one worker each, on this machine's CPU, each in a fresh process. Tokens are the real (non-padding) input
tokens. The first WARMUP steps of each are not timed. Each side runs padded and packed (TRL: ``packing=True``, its
padding-free best-fit packing; rlhf: ``data.packing``). Each configuration runs REPEATS times, the configurations
taking turns; the tables pool the runs (their tokens over their seconds) and give each run's tokens/s as the range.

A timed step is the whole optimizer step, data included: for rlhf, sampling and collating the micro-batch plus
``rlhf.jobs.loop.train_step`` (the SFT job's own step function, with ``SFTObjective`` and ``TrainingEngine``); for
TRL, the time between two ``on_step_end`` callbacks (its data loader, ``training_step``, clipping, optimizer and
scheduler). Stages are timed as in the DPO benchmark (``benchmarks.common.TimedEngine``, ``trainer_step_timing``).
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
BATCH = 8
MAX_LENGTH = 128
LEARNING_RATE = 3e-3
REPEATS = 2
STAGES = step_stages("forward + loss + metrics")


@dataclass
class Measurement:
    """Throughput of one configuration: timed steps, their tokens and the seconds of each stage."""

    name: str
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    stages: dict[str, float] = field(default_factory=dict)  # seconds over the timed steps
    runs: list[float] = field(default_factory=list)  # tokens/s of each run pooled here

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def pooled(runs: list[Measurement]) -> Measurement:
    """The runs of one configuration as one: their tokens, seconds, steps and stages added up."""
    total = Measurement(runs[0].name, runs=[run.tokens_per_second for run in runs])
    for run in runs:
        total.tokens += run.tokens
        total.seconds += run.seconds
        total.steps += run.steps
        for key, seconds in run.stages.items():
            total.stages[key] = total.stages.get(key, 0.0) + seconds
    return total


def run_rlhf(model_dir: str, packing: bool, steps: int = STEPS, warmup: int = WARMUP) -> Measurement:
    """rlhf: the DeepSpeed training engine and the SFT job's own step function, one rank."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.data.config import DataConfig
    from rlhf.data.encode import build_examples
    from rlhf.engine import EngineConfig, TrainingEngine
    from rlhf.jobs.batching import step_indices
    from rlhf.jobs.loop import train_step
    from rlhf.jobs.sft import SFTObjective
    from rlhf.models.config import ModelConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = DataConfig(path="bundled:sft_prompt_completion", max_length=MAX_LENGTH, packing=packing)
    examples = build_examples(data, tokenizer, "sft")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = EngineConfig(micro_batch_size=BATCH, learning_rate=LEARNING_RATE, lr_scheduler="constant")
    engine = TrainingEngine(model, config, total_steps=steps)
    objective = SFTObjective(ModelConfig(name_or_path=model_dir), tokenizer.pad_token_id)
    timer = StageTimer()
    timed_engine = TimedEngine(engine, timer)
    timed_objective = TimedObjective(objective, timer)
    result = Measurement(f"rlhf{' packed' if packing else ''}")
    for step in range(steps):
        timer.enabled = step >= warmup
        started = time.perf_counter()
        with timer("data"):
            chosen = [examples[i] for i in step_indices(len(examples), step, BATCH, 1, seed=0)[0]]
            micro_batches = [objective.collate(chosen)]
        train_step(timed_engine, timed_objective, micro_batches)
        if timer.enabled:
            result.seconds += time.perf_counter() - started
            result.steps += 1
            result.tokens += sum(len(e["input_ids"]) for e in chosen)
    result.stages = dict(timer.seconds)
    result.stages["other"] = other_seconds(result.seconds, result.stages)
    return result


def run_trl(model_dir: str, packing: bool, steps: int = STEPS, warmup: int = WARMUP) -> Measurement:
    """TRL's SFTTrainer on the same rows, completion-only loss, CPU."""
    import json

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from benchmarks.common import trainer_step_timing, trl_training_args
    from rlhf.data.bundled import bundled_path

    rows = [json.loads(line) for line in bundled_path("sft_prompt_completion").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    result = Measurement(f"TRL SFTTrainer{' packed' if packing else ''}")
    timer = StageTimer()
    step_timing, timing = trainer_step_timing(timer, warmup)

    class TimedSFTTrainer(step_timing, SFTTrainer):
        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None):
            before = self._total_train_tokens  # TRL counts the batch's real tokens in compute_loss
            with timer("forward+loss"):
                output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if timer.enabled:
                result.tokens += int(self._total_train_tokens - before)
            return output

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            max_length=MAX_LENGTH,
            packing=packing,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            **trl_training_args(),
        )
        trainer = TimedSFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[timing],
        )
        trainer.train()
    result.seconds, result.steps, result.stages = trainer_stages(timer, timing.step_seconds, warmup)
    return result


REAL_STEPS, REAL_WARMUP = 16, 4  # SmolLM2-135M-Instruct: a packed step of 1,024 tokens takes seconds here


def _spread(m: Measurement) -> str:
    pooled_rate = f"{m.tokens_per_second:,.0f}"
    return pooled_rate if len(m.runs) < 2 else f"{pooled_rate} ({min(m.runs):,.0f}-{max(m.runs):,.0f})"


def _section(model_dir: str, peak_flops: float, steps: int, warmup: int, repeats: int) -> list[str]:
    """The four configurations of one model, each run ``repeats`` times in a fresh process, taking turns: the rows,
    the ratios and where a step's time goes."""
    from benchmarks.common import isolated, training_flops_per_token

    configurations = [(run_rlhf, False), (run_trl, False), (run_rlhf, True), (run_trl, True)]
    runs: list[list[Measurement]] = [[] for _ in configurations]
    for _ in range(repeats):
        for index, (fn, packing) in enumerate(configurations):
            runs[index].append(isolated(fn, model_dir, packing, steps, warmup))
    ours, theirs, ours_packed, theirs_packed = (pooled(r) for r in runs)
    flops_per_token = training_flops_per_token(model_dir, MAX_LENGTH)
    rows = ["| run | tokens timed | seconds | tokens/s | MFU |", "|---|---:|---:|---:|---:|"]
    for a, b, label in ((ours, theirs, ""), (ours_packed, theirs_packed, " (packed)")):
        for m in (a, b):
            mfu = m.tokens_per_second * flops_per_token / peak_flops
            rows.append(f"| {m.name} | {m.tokens} | {m.seconds:.2f} | {_spread(m)} | {mfu:.2%} |")
        ratios = [x / y for x, y in zip(a.runs, b.runs, strict=True)]  # run i of each side ran in the same turn
        spread = f" ({min(ratios):.2f}x-{max(ratios):.2f}x by turn)" if len(ratios) > 1 else ""
        rows.append(
            f"| **ratio rlhf / TRL{label}** | | | **{a.tokens_per_second / b.tokens_per_second:.2f}x**{spread} | |"
        )
    return [
        *rows,
        "",
        "Where the time of a training step goes (ms per timed step, and share of the step):",
        "",
        "| stage | " + " | ".join(f"{m.name} ms | share" for m in (ours, theirs, ours_packed, theirs_packed)) + " |",
        "|---|" + "---:|---:|" * 4,
        *stage_rows(STAGES, [ours, theirs, ours_packed, theirs_packed]),
        "",
        stage_difference(STAGES, ours, theirs),
        "",
        stage_difference(STAGES, ours_packed, theirs_packed),
    ]


def report(model_dir: str, peak_flops: float, steps: int = STEPS, warmup: int = WARMUP, repeats: int = REPEATS) -> str:
    """All four configurations on the tiny model and on the real one; the markdown section.

    ``steps`` and ``warmup`` are the tiny model's; the real model runs ``REAL_STEPS`` (``REAL_WARMUP`` not timed),
    or ``steps`` when that is fewer (``--quick``).
    """
    from benchmarks.common import describe_model
    from rlhf.models.loading import resolve

    real_steps, real_warmup = min(steps, REAL_STEPS), min(warmup, REAL_WARMUP)
    return "\n".join(
        [
            "## SFT throughput per worker: rlhf vs TRL SFTTrainer",
            "",
            f"Bundled prompt/completion data, max length {MAX_LENGTH}, micro-batch {BATCH}, fp32 and no gradient "
            "checkpointing on both sides, one worker on this CPU, each configuration in a fresh process, "
            f"{repeats} run{'s' if repeats != 1 else ''} of each, the configurations taking turns: tokens, seconds and stages are the runs pooled, "
            "tokens/s the pooled figure with each run's in brackets, and the ratio's brackets the ratios of the runs "
            "made in the same turn. A timed step includes sampling and collating its batch (TRL: its data loader). "
            "MFU = model FLOPs/s (6 x weights + attention per token) / measured fp32 matmul peak. rlhf's stages are "
            "timed around the engine's forward, `backward` and `step` and the objective's `loss`; TRL's around "
            "`compute_loss` and `training_step` (backward = `training_step` - `compute_loss`), its data loader "
            "being the time from the previous step's end to `on_step_begin`, and its optimizer stage the rest of "
            "the step.",
            "",
            f"### Tiny model, {describe_model(model_dir)}: {steps} steps ({warmup} warm-up steps not timed)",
            "",
            *_section(model_dir, peak_flops, steps, warmup, repeats),
            "",
            f"### SmolLM2-135M-Instruct: {real_steps} steps ({real_warmup} warm-up steps not timed)",
            "",
            *_section(str(resolve("smollm2-135m-instruct")), peak_flops, real_steps, real_warmup, repeats),
        ]
    )
