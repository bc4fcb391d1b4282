"""The benchmarks' timing wrappers measure the code path the jobs run, not a different one."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import isolated


def logits_to_keep_through_the_timed_engine(model_dir: str) -> tuple[bool, bool]:
    """Whether the objectives see a model that computes some positions' logits only: through the job's engine, and
    through the benchmarks' timed wrapper of it (a fresh process: the engine starts a process group)."""
    from transformers import AutoModelForCausalLM

    from benchmarks.common import StageTimer, TimedEngine
    from rlhf.engine import EngineConfig, TrainingEngine
    from rlhf.models.logits import takes_logits_to_keep

    engine = TrainingEngine(AutoModelForCausalLM.from_pretrained(model_dir), EngineConfig(), total_steps=1)
    return takes_logits_to_keep(engine), takes_logits_to_keep(TimedEngine(engine, StageTimer()))


def test_the_timed_engine_leaves_the_logits_at_the_scored_positions(tiny_model_dir: Path) -> None:
    """Before, the wrapper hid the model from ``takes_logits_to_keep``: the DPO benchmark's rlhf side computed every
    position's logits, which the DPO job does not (it asks for the scored positions only), so it measured a slower
    path than the job's: ``(True, False)``."""
    assert isolated(logits_to_keep_through_the_timed_engine, str(tiny_model_dir)) == (True, True)
