"""Every job of the ``rlhf`` command in one table: its config tree, what runs it, its one-line summary and example.

The CLI's subcommands and help, ``rlhf plan``, the demo and the tests all read :data:`JOBS`;
the example configurations live in ``rlhf/configs/<job>.yaml`` (:data:`EXAMPLES_DIR`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import DPOConfig, RMConfig, SFTConfig
from rlhf.gen.config import BestOfNConfig, EvalConfig, GenerateConfig, IterativeDPOConfig, SynthConfig
from rlhf.rl.config import PPOConfig
from serving.config import ServeConfig

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class Job:
    """One ``rlhf <name>`` command."""

    name: str
    config: type
    """Its config tree (a dataclass)."""
    runner: str
    """``module:function`` that runs it on a config and returns its summary (imported when the job runs); empty for
    ``serve``, which the CLI runs itself."""
    summary: str
    example_override: str
    """A typical override, shown with the example config in the command's help."""
    plannable: bool = False
    """Whether ``rlhf plan`` estimates its memory (the training jobs)."""

    @property
    def example(self) -> Path:
        """The example configuration, ``rlhf/configs/<job>.yaml``."""
        return EXAMPLES_DIR / f"{self.name.replace('-', '_')}.yaml"

    def run(self, config: Any) -> dict[str, Any]:
        """Run the job on ``config``; its summary."""
        if not self.runner:
            raise TypeError(f"rlhf {self.name} is run by the CLI (it serves until stopped)")
        module, _, function = self.runner.partition(":")
        run: Callable[[Any], dict[str, Any]] = getattr(importlib.import_module(module), function)
        return run(config)


JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        Job("sft", SFTConfig, "rlhf.jobs.sft:run", "supervised fine-tuning (Ray Train + DeepSpeed)",
            "train.max_steps=10", plannable=True),
        Job("rm", RMConfig, "rlhf.jobs.rm:run", "reward-model training on preference pairs", "train.max_steps=10",
            plannable=True),
        Job("dpo", DPOConfig, "rlhf.jobs.dpo:run", "DPO-family preference training (dpo, ipo, cdpo, simpo, orpo, kto)",
            "preference.loss=ipo", plannable=True),
        Job("ppo", PPOConfig, "rlhf.jobs.ppo:run", "RLHF with PPO, GRPO, RLOO or REINFORCE++ on Ray actors",
            "algorithm.estimator=grpo", plannable=True),
        Job("serve", ServeConfig, "", "an OpenAI-compatible Ray Serve endpoint hosting vLLM replicas",
            "--model runs/demo/grpo/final"),
        Job("generate", GenerateConfig, "rlhf.gen.generate:run",
            "batch generation over a prompts dataset with vLLM replicas, with prompt templates", "sampling.n=4"),
        Job("synth", SynthConfig, "rlhf.gen.synth:run",
            "synthetic data: self-instruct, evol-instruct, or judged preference pairs", "mode=self_instruct"),
        Job("best-of-n", BestOfNConfig, "rlhf.gen.best_of_n:run",
            "rejection sampling with a reward model -> an SFT dataset (then SFT: expert iteration)", "finetune=true"),
        Job("iterative-dpo", IterativeDPOConfig, "rlhf.gen.iterative_dpo:run",
            "generate -> judge -> DPO for N rounds, with the judged win rate against the start", "rounds=3"),
        Job("eval", EvalConfig, "rlhf.gen.evaluate:run",
            "exact match, token F1, format, reward, self-consistency and win rate; JSON, markdown and a plot",
            "baseline=tiny"),
    )
}  # fmt: skip
