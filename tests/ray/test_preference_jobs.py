"""``rlhf rm`` and ``rlhf dpo`` as Ray Train jobs (2 workers, ZeRO-2) on the bundled preference data,
whose signal (positive vs negative adjectives) a tiny model can learn. (The other preference losses and the
two kinds of reference run on the jobs' loop without Ray: tests/distributed/test_preference_objectives.py.)"""

from __future__ import annotations

from pathlib import Path

from cluster import configtree
from rlhf.config import DPOConfig, RMConfig
from rlhf.jobs.registry import EXAMPLES_DIR


def _config(cls: type, example: str, model_dir: Path, out: Path, *overrides: str):
    base = [f"model.name_or_path={model_dir}", f"train.output_dir={out}"]
    return configtree.load(cls, EXAMPLES_DIR / example, [*base, *overrides])


def test_reward_model_accuracy_is_well_above_chance(ray_cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    from rlhf.jobs import rm

    summary = rm.run(_config(RMConfig, "rm.yaml", tiny_model_dir, tmp_path / "rm", "train.max_steps=25"))
    assert 0.3 < summary["eval_accuracy_before"] < 0.7, summary  # an untrained head is at chance
    assert summary["eval_accuracy_after"] >= 0.9, summary
    assert summary["last_loss"] < summary["first_loss"] / 2, summary
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(summary["final_model"])
    assert model.config.num_labels == 1


def test_dpo_reward_accuracy_rises(ray_cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    from rlhf.jobs import dpo

    summary = dpo.run(_config(DPOConfig, "dpo.yaml", tiny_model_dir, tmp_path / "dpo", "train.max_steps=20"))
    # the policy starts as its own reference: implicit rewards are exactly 0, accuracy 0
    assert summary["eval_rewards/accuracy_before"] == 0.0
    assert summary["eval_rewards/accuracy_after"] >= 0.9, summary
    assert summary["eval_rewards/margin_after"] > 0.5, summary
    assert summary["eval_logps/rejected_after"] < summary["eval_logps/rejected_before"], summary
