"""SFT tokens/s per worker: rlhf's training engine against TRL's SFTTrainer.

Same model (the tiny one, then SmolLM2-135M-Instruct), same bundled prompt/completion data, same maximum sequence length,
micro-batch, learning rate and number of steps; fp32 and no gradient checkpointing on both
sides; one worker each, on this machine's CPU, each in a fresh process, one after the other.
Tokens are the real (non-padding) input tokens. The first WARMUP steps of each are not timed. Each side runs padded and packed
(TRL: ``packing=True``, its padding-free best-fit packing; rlhf: ``data.packing``).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

STEPS = 120
WARMUP = 10
BATCH = 8
MAX_LENGTH = 128
LEARNING_RATE = 3e-3


@dataclass
class Measurement:
    """Throughput of one configuration."""

    name: str
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


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
    tokens, seconds = 0, 0.0
    for step in range(steps):
        chosen = [examples[i] for i in step_indices(len(examples), step, BATCH, 1, seed=0)[0]]
        started = time.perf_counter()
        train_step(engine, objective, [objective.collate(chosen)])
        if step >= warmup:
            seconds += time.perf_counter() - started
            tokens += sum(len(e["input_ids"]) for e in chosen)
    return Measurement(f"rlhf{' packed' if packing else ''}", tokens, seconds)


def run_trl(model_dir: str, packing: bool, steps: int = STEPS, warmup: int = WARMUP) -> Measurement:
    """TRL's SFTTrainer on the same rows, completion-only loss, CPU."""
    import json

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from benchmarks.common import trl_training_args
    from rlhf.data.bundled import bundled_path

    rows = [json.loads(line) for line in bundled_path("sft_prompt_completion").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.trainer = None
            self.started = 0.0
            self.tokens = 0
            self.seconds = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.before = self.trainer._total_train_tokens

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > warmup:
                self.seconds += time.perf_counter() - self.started
                self.tokens += self.trainer._total_train_tokens - self.before

    timer = Timer()
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
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer]
        )
        timer.trainer = trainer
        trainer.train()
    return Measurement(f"TRL SFTTrainer{' packed' if packing else ''}", timer.tokens, timer.seconds)


REAL_STEPS, REAL_WARMUP = 16, 4  # SmolLM2-135M-Instruct: a packed step of 1,024 tokens takes seconds here


def _table(model_dir: str, peak_flops: float, steps: int, warmup: int) -> list[str]:
    """The four configurations of one model, each in a fresh process: the rows and the ratios."""
    from benchmarks.common import isolated, training_flops_per_token

    flops_per_token = training_flops_per_token(model_dir, MAX_LENGTH)
    rows = ["| run | tokens timed | seconds | tokens/s | MFU |", "|---|---:|---:|---:|---:|"]
    for packing in (False, True):
        ours = isolated(run_rlhf, model_dir, packing, steps, warmup)
        theirs = isolated(run_trl, model_dir, packing, steps, warmup)
        for m in (ours, theirs):
            mfu = m.tokens_per_second * flops_per_token / peak_flops
            rows.append(f"| {m.name} | {m.tokens} | {m.seconds:.2f} | {m.tokens_per_second:,.0f} | {mfu:.2%} |")
        rows.append(
            f"| **ratio rlhf / TRL{' (packed)' if packing else ''}** | | | **{ours.tokens_per_second / theirs.tokens_per_second:.2f}x** | |"
        )
    return rows


def report(model_dir: str, peak_flops: float, steps: int = STEPS, warmup: int = WARMUP) -> str:
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
            "checkpointing on both sides, one worker on this CPU, each configuration in a fresh process. "
            "MFU = model FLOPs/s (6 x weights + attention per token) / measured fp32 matmul peak.",
            "",
            f"### Tiny model, {describe_model(model_dir)}: {steps} steps ({warmup} warm-up steps not timed)",
            "",
            *_table(model_dir, peak_flops, steps, warmup),
            "",
            f"### SmolLM2-135M-Instruct: {real_steps} steps ({real_warmup} warm-up steps not timed)",
            "",
            *_table(str(resolve("smollm2-135m-instruct")), peak_flops, real_steps, real_warmup),
        ]
    )
