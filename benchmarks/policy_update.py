"""The policy update on the same micro-batch: rlhf's policy worker against TRL's GRPOTrainer, alternated in one process.

The GRPO benchmark times whole RL steps, each side in its own process one after the other, so a difference of
10-20% in its policy-update stage is within what this shared machine drifts between two runs. Here both sides
train on one identical micro-batch in the same process, taking turns (rlhf, TRL, TRL, rlhf, ...), so drift hits
both alike, and the spread of the rounds is reported:

- rlhf: :meth:`rlhf.rl.workers.PolicyWorker.train`, the code a policy actor runs (DeepSpeed ZeRO-0, fp32, its
  loss function, its metrics), called directly in this process; its phases are the worker's own
  ``time/policy_forward`` / ``_backward`` / ``_optimizer``.
- TRL: ``GRPOTrainer.compute_loss`` (its forward, log-probs, entropies, the "dapo" loss and its metrics), then
  ``accelerator.backward``, then what ``Trainer`` does at an optimizer step (clip the gradient norm, AdamW's step,
  the schedule, zero the gradients).

Same GRPO settings as :mod:`benchmarks.grpo` (one clipped pass, token-level aggregation, no KL, constant learning
rate), same starting weights on both sides; the micro-batch is the bundled prompts, ``GROUP_SIZE`` completions
each, of random tokens and random lengths up to ``MAX_NEW_TOKENS`` (the update does not care what was sampled),
laid out as each framework lays out a rollout: rlhf right-pads prompt + response, TRL left-pads the prompts and
right-pads the completions.
"""

from __future__ import annotations

import json
import random
import tempfile
from statistics import median
from typing import Any

ROUNDS = 7  # per side, the first a warm-up
GROUP_SIZE = 8
MAX_NEW_TOKENS = 64
LEARNING_RATE = 1e-5
SEED = 0
PHASES = [
    ("forward", "forward + log-probs + loss + metrics"),
    ("backward", "backward"),
    ("optimizer", "optimizer step (clip, AdamW, schedule)"),
    ("total", "the update"),
]


def micro_batch(tokenizer: Any, prompts_per_batch: int) -> tuple[list[list[int]], list[list[int]], list[float]]:
    """Prompt ids, completion ids and one advantage per completion, the same on every call."""
    from rlhf.data.bundled import bundled_path

    rows = [json.loads(line) for line in bundled_path("prompts").read_text().splitlines()][:prompts_per_batch]
    draw = random.Random(SEED)
    special = set(tokenizer.all_special_ids)
    vocabulary = [i for i in range(len(tokenizer)) if i not in special]
    prompts, completions, advantages = [], [], []
    for row in rows:
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        for _ in range(GROUP_SIZE):
            prompts.append(ids)
            completions.append(draw.choices(vocabulary, k=draw.randint(MAX_NEW_TOKENS // 2, MAX_NEW_TOKENS)))
            advantages.append(draw.gauss(0.0, 1.0))
    return prompts, completions, advantages


def _ours(prompts: list[list[int]], completions: list[list[int]], advantages: list[float], pad_id: int) -> Any:
    """rlhf's micro-batch: the :class:`~rlhf.rl.experience.Experience` a policy rank trains on."""
    from dataclasses import replace

    import torch

    from rlhf.rl.experience import sequence_batch

    batch = sequence_batch(prompts, completions, pad_id)
    mask = batch.response_mask.float()
    return replace(
        batch,
        advantages=torch.tensor(advantages).unsqueeze(1) * mask,
        rollout_logprobs=torch.zeros_like(mask),  # only read for the trainer-vs-rollout gap metric
    )


def _theirs(
    prompts: list[list[int]], completions: list[list[int]], advantages: list[float], pad_id: int
) -> dict[str, Any]:
    """TRL's micro-batch, as ``_generate_and_score_completions`` hands it to ``compute_loss``."""
    import torch

    width = max(len(p) for p in prompts)
    prompt_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    width = max(len(c) for c in completions)
    completion_ids = torch.tensor([c + [pad_id] * (width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor(advantages),
        "num_items_in_batch": completion_mask.sum(),
        "old_per_token_logps": None,
    }


def measure(model_dir: str, prompts_per_batch: int, rounds: int) -> dict[str, Any]:
    """Both updates on the same micro-batch, alternated; seconds per phase and round, and the batch's widths."""
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.trl_grpo import _trl_reward, grpo_config_arguments
    from rlhf.algos.objective import PolicyObjective
    from rlhf.engine import EngineConfig
    from rlhf.models.config import ModelConfig
    from rlhf.rl.workers import PolicyWorker

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts, completions, advantages = micro_batch(tokenizer, prompts_per_batch)
    size = len(completions)
    # TRL first: accelerate settles on a single process before rlhf's engine creates its process group
    with tempfile.TemporaryDirectory() as output_dir:
        torch.manual_seed(SEED)
        config = GRPOConfig(
            output_dir=output_dir,
            **grpo_config_arguments(
                group_size=GROUP_SIZE,
                prompts_per_step=prompts_per_batch,
                max_new_tokens=MAX_NEW_TOKENS,
                steps=rounds,
                learning_rate=LEARNING_RATE,
                seed=SEED,
            ),
        )
        trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            reward_funcs=_trl_reward(len),
            args=config,
            train_dataset=Dataset.from_list([{"prompt": "unused"}]),
            processing_class=tokenizer,
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=rounds)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read by the loss's normalizer
    worker = PolicyWorker()
    engine = EngineConfig(
        zero_stage=0,
        precision="fp32",
        micro_batch_size=size,
        learning_rate=LEARNING_RATE,
        lr_scheduler="constant",
    )
    worker.build(ModelConfig(name_or_path=model_dir), engine, rounds, SEED)
    ours = _ours(prompts, completions, advantages, pad_id)
    theirs = _theirs(prompts, completions, advantages, pad_id)
    denominator = {"num_tokens": float(ours.response_mask.sum()), "num_sequences": float(size)}
    objective = PolicyObjective(clip_low=0.2, clip_high=0.2, aggregation="token")
    model = trainer.model
    model.train()

    def rlhf_round() -> dict[str, float]:
        started = time.perf_counter()
        sums = worker.train([[ours]], [denominator], objective, 1.0)
        total = time.perf_counter() - started
        phases = {phase: sums[f"time/policy_{phase}"] for phase in ("forward", "backward", "optimizer")}
        return phases | {"total": total, "loss": sums["policy_loss"], "grad_norm": sums["grad_norm"]}

    def trl_round() -> dict[str, float]:
        started = time.perf_counter()
        loss = trainer.compute_loss(model, theirs)
        forward_done = time.perf_counter()
        trainer.accelerator.backward(loss)
        backward_done = time.perf_counter()
        norm = trainer.accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        done = time.perf_counter()
        return {
            "forward": forward_done - started,
            "backward": backward_done - forward_done,
            "optimizer": done - backward_done,
            "total": done - started,
            "loss": float(loss.detach()),
            "grad_norm": float(norm),
        }

    runs: dict[str, list[dict[str, float]]] = {"rlhf": [], "TRL": []}
    for index in range(rounds):
        order = (("rlhf", rlhf_round), ("TRL", trl_round))
        for name, round_ in order if index % 2 == 0 else order[::-1]:
            runs[name].append(round_())
    return {
        "runs": runs,
        "sequences": size,
        "widths": {
            "rlhf": ours.input_ids.shape[1],
            "TRL": theirs["prompt_ids"].shape[1] + theirs["completion_ids"].shape[1],
        },
        "response_tokens": int(ours.response_mask.sum()),
    }


def _table(result: dict[str, Any]) -> list[str]:
    timed = {name: runs[1:] for name, runs in result["runs"].items()}

    def cell(name: str, phase: str) -> str:
        values = [r[phase] * 1000 for r in timed[name]]
        return f"{median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"

    rows = []
    for phase, label in PHASES:
        ratio = median(r[phase] for r in timed["TRL"]) / median(r[phase] for r in timed["rlhf"])
        bold = "**" if phase == "total" else ""
        rows.append(
            f"| {bold}{label}{bold} | {cell('rlhf', phase)} | {cell('TRL', phase)} | {bold}{ratio:.2f}x{bold} |"
        )
    return [
        "| phase | rlhf ms, median (min-max) | TRL ms, median (min-max) | TRL / rlhf time (above 1: rlhf faster) |",
        "|---|---:|---:|---:|",
        *rows,
    ]


def report(model_dir: str, peak_flops: float, rounds: int = ROUNDS, warmup: int = 1) -> str:
    """The 57.4M model of the GRPO benchmark (its 64 completions) and SmolLM2 (32: its vocabulary of 49,152 makes
    the logits the larger part); ``peak_flops`` and ``warmup`` are not used (the first round of each side is the
    warm-up)."""
    from benchmarks.common import isolated, small_model
    from rlhf.models.loading import resolve

    small_dir, small = small_model()
    sections = []
    for title, directory, prompts_per_batch in (
        (f"Small model, {small}", small_dir, 8),
        ("SmolLM2-135M-Instruct", str(resolve("smollm2-135m-instruct")), 4),
    ):
        result = isolated(measure, directory, prompts_per_batch, rounds)
        widths = result["widths"]
        first = {name: runs[0] for name, runs in result["runs"].items()}
        sections += [
            f"### {title}: {result['sequences']} sequences, {result['response_tokens']:,} response tokens; "
            f"padded width rlhf {widths['rlhf']}, TRL {widths['TRL']}",
            "",
            *_table(result),
            "",
            "Both sides computed the same update from the same weights (the first round): loss "
            f"{first['rlhf']['loss']:.6f} (rlhf) and {first['TRL']['loss']:.6f} (TRL), gradient norm "
            f"{first['rlhf']['grad_norm']:.6f} and {first['TRL']['grad_norm']:.6f}.",
            "",
        ]
    return "\n".join(
        [
            "## The policy update on the same micro-batch: rlhf's policy worker vs TRL's GRPOTrainer",
            "",
            f"One micro-batch, both sides in one process taking turns, {rounds} rounds each (the first a warm-up, "
            f"the median and range of the other {rounds - 1} shown); rlhf runs `PolicyWorker.train` (the actor's "
            "code: DeepSpeed ZeRO-0, fp32), TRL `GRPOTrainer.compute_loss`, `accelerator.backward` and the "
            "trainer's optimizer step. Same GRPO loss settings as the GRPO benchmark; see "
            "`benchmarks/policy_update.py`.",
            "",
            *sections,
        ]
    ).rstrip()
