"""GRPO on TRL's side: ``GRPOTrainer`` steps on this CPU, timed like rlhf's GRPO driver.

One optimizer step = one generation round: ``prompts_per_step`` prompts, ``group_size``
completions each, sampled by TRL's own transformers ``generate`` (no vLLM) at temperature 1.0
and top-p 1.0 (no top-k) up to exactly ``max_new_tokens`` tokens; the rule-based reward scores
each decoded completion on its own (the prompt is not passed to it); group-relative advantages
(reward minus group mean, over the Bessel-corrected group std); then one PPO-style pass over
those completions (``num_iterations=1``): clipped ratio with epsilon 0.2, token-level "dapo"
aggregation (summed over all completion tokens of the step, divided by their number), no KL
(``beta=0.0``: no reference model is loaded or run). Since generation and the optimizer step
are aligned, TRL computes no "old" log-probs: the ratio is that of the policy to its own
detached self, so one step is generate + reward + one forward/backward + AdamW. fp32, no
gradient checkpointing, constant learning rate, seed fixed; one process on this CPU.

A timed step runs from the end of the previous optimizer step (``on_step_end``) to the end of
this one, so it includes fetching its prompts and the logging of the previous step. Stages are
timed by thin wrappers around the trainer's methods (see ``run_trl_grpo``); TRL's own profiling
timers only report to wandb / MLflow / Trackio, and its ``step_time`` metric is the same span
as the ``training_step`` stage here.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from statistics import median
from typing import Any

from benchmarks.common import StageTimer, trainer_step_timing, trl_training_args

# Stages of one step, in report order: (key, label). Nested ones are included in the one above them.
STAGES = [
    ("data", "data: fetch the prompts (+ logging of the previous step)"),
    ("rollout", "rollout: tokenize, generate, decode, reward, advantages"),
    ("generate", "  of which the model's generate"),
    ("reward", "  of which the reward function"),
    ("forward+loss", "policy forward + log-probs + GRPO loss + metrics"),
    ("backward", "backward (+ shuffling and splitting the generated batch)"),
    ("optimizer", "optimizer step (clip, AdamW, schedule, zero_grad)"),
    ("adamw", "  of which AdamW's step()"),
    ("other", "other"),
]


def _trl_reward(reward_fn: Callable[[str], float]) -> Callable[..., list[float]]:
    """``reward_fn(response) -> float`` in TRL's convention: a list of completions in, a list of floats out."""

    def reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        return [float(reward_fn(completion)) for completion in completions]

    reward.__name__ = getattr(reward_fn, "__name__", "reward")  # TRL names its per-function metrics after it
    return reward


def grpo_config_arguments(
    *,
    group_size: int,
    prompts_per_step: int,
    max_new_tokens: int,
    steps: int,
    learning_rate: float,
    seed: int,
    vllm: bool = False,
) -> dict[str, Any]:
    """The ``GRPOConfig`` arguments of the benchmark (``output_dir`` aside).

    The whole step is one micro-batch: ``per_device_train_batch_size = prompts_per_step x group_size``
    with ``gradient_accumulation_steps = 1``, so ``steps_per_generation`` defaults to 1 and
    ``generation_batch_size`` to the same number of completions: each optimizer step generates
    its own batch and trains on it once. ``vllm``: generate with vLLM in the trainer's process (TRL's
    ``vllm_mode="colocate"``) instead of transformers' ``generate``.
    """
    completions = prompts_per_step * group_size
    return {
        **trl_training_args(),
        "logging_steps": 1,  # TRL's metrics (reward, completion lengths) are averaged and emitted at each log
        "per_device_train_batch_size": completions,
        "gradient_accumulation_steps": 1,
        "generation_batch_size": completions,
        "num_generations": group_size,
        "max_completion_length": max_new_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "use_vllm": vllm,
        **({"vllm_mode": "colocate", "vllm_max_model_length": 256} if vllm else {}),
        "beta": 0.0,
        "num_iterations": 1,
        "epsilon": 0.2,
        "loss_type": "dapo",
        "scale_rewards": "group",
        "max_steps": steps,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "seed": seed,
        "eval_strategy": "no",
    }


def run_trl_grpo(
    model_dir: str,
    prompts: list[str],
    reward_fn: Callable[[str], float],
    *,
    group_size: int,
    prompts_per_step: int,
    max_new_tokens: int,
    steps: int,
    learning_rate: float,
    seed: int,
    output_dir: str,
    vllm: bool = False,
) -> dict:
    """Train ``steps`` GRPO steps with TRL's ``GRPOTrainer`` on CPU and return their timings.

    ``prompts`` are plain-text (non-conversational) prompts; ``reward_fn`` scores one decoded
    completion. Returns ``step_seconds`` (wall time of every optimizer step), ``generated_tokens``
    (completion tokens generated in each step, from TRL's ``completions/mean_length`` x the number
    of completions; a completion's length counts its EOS token when it ends with one) and
    ``rewards`` (TRL's ``reward`` metric: the mean raw reward of the step's completions), one
    entry per step; ``median_step_seconds``, ``tokens_per_second`` (generated tokens / step time)
    and ``stage_seconds`` (the seconds of each stage of ``STAGES``, summed) are over all steps but
    the first, a warm-up (over all of them when there is only one).
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    completions = prompts_per_step * group_size
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    timer = StageTimer()
    step_timing, timing = trainer_step_timing(timer, 1 if steps > 1 else 0)
    generated_tokens: list[int] = []
    rewards: list[float] = []

    class TimedGRPOTrainer(step_timing, GRPOTrainer):
        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            with timer("rollout"):
                return super()._generate_and_score_completions(inputs)

        def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
            with timer("generate"):
                return super()._generate_single_turn(*args, **kwargs)

        def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
            with timer("reward"):
                return super()._calculate_rewards(*args, **kwargs)

        def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
            with timer("forward+loss"):
                return super().compute_loss(*args, **kwargs)

    class MetricsReader(TrainerCallback):
        """TRL's metrics of each step, read at each log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:  # a training log (not the run summary at the end)
                generated_tokens.append(round(logs["completions/mean_length"] * completions))
                rewards.append(logs["reward"])

    config = GRPOConfig(
        output_dir=output_dir,
        **grpo_config_arguments(
            group_size=group_size,
            prompts_per_step=prompts_per_step,
            max_new_tokens=max_new_tokens,
            steps=steps,
            learning_rate=learning_rate,
            seed=seed,
            vllm=vllm,
        ),
    )
    if config.steps_per_generation != 1 or config.generation_batch_size != completions:
        raise RuntimeError(
            f"expected one generation round of {completions} completions per optimizer step, got "
            f"steps_per_generation={config.steps_per_generation}, generation_batch_size={config.generation_batch_size}"
        )
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=_trl_reward(reward_fn),
        args=config,
        train_dataset=Dataset.from_list([{"prompt": prompt} for prompt in prompts]),
        processing_class=tokenizer,
        callbacks=[timing, MetricsReader()],
    )
    trainer.remove_callback(PrinterCallback)  # with logging_steps=1 it would print every step's logs to stdout
    trainer.train()

    step_seconds = timing.step_seconds
    timed = slice(1, None) if len(step_seconds) > 1 else slice(None)
    timed_seconds = sum(step_seconds[timed])
    stages = dict(timer.seconds)
    training_step = stages.pop("training_step")
    stages["backward"] = training_step - stages["rollout"] - stages["forward+loss"]  # the rest of training_step
    stages["other"] = timed_seconds - stages["data"] - training_step - stages["optimizer"]
    return {
        "step_seconds": step_seconds,
        "median_step_seconds": median(step_seconds[timed]),
        "generated_tokens": generated_tokens,
        "tokens_per_second": sum(generated_tokens[timed]) / timed_seconds,
        "rewards": rewards,
        "stage_seconds": {key: stages[key] for key, _ in STAGES if key in stages},
    }


if __name__ == "__main__":
    from rlhf.data.bundled import bundled_path, positive_word_reward
    from rlhf.models.loading import resolve

    rows = [json.loads(line) for line in bundled_path("prompts").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = run_trl_grpo(
            resolve("tiny"),
            [row["prompt"] for row in rows],
            positive_word_reward,
            group_size=4,
            prompts_per_step=8,
            max_new_tokens=16,
            steps=4,
            learning_rate=1e-5,
            seed=0,
            output_dir=out,
        )
        result["run_seconds"] = time.perf_counter() - started
    print(json.dumps(result, indent=2))
