"""``rlhf rm`` and ``rlhf dpo`` as Ray Train jobs (2 workers, ZeRO-2) on the bundled preference data,
whose signal (positive vs negative adjectives) a tiny model can learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf import configtree
from rlhf.cli import EXAMPLES_DIR
from rlhf.config import DPOConfig, RMConfig


def _config(cls: type, example: str, model_dir: Path, out: Path, *overrides: str):
    base = [f"model.name_or_path={model_dir}", f"train.output_dir={out}"]
    return configtree.load(cls, EXAMPLES_DIR / example, [*base, *overrides])


def _train_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


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


@pytest.mark.parametrize("loss", ["ipo", "cdpo", "simpo", "orpo"])
def test_every_preference_loss_trains(ray_cluster, tiny_model_dir: Path, tmp_path: Path, loss: str) -> None:
    from rlhf.jobs import dpo

    summary = dpo.run(
        _config(DPOConfig, "dpo.yaml", tiny_model_dir, tmp_path / loss, "train.max_steps=10", f"preference.loss={loss}")
    )
    assert summary["eval_loss_after"] < summary["eval_loss_before"], summary
    assert summary["eval_rewards/margin_after"] > summary["eval_rewards/margin_before"], summary


def test_precomputed_reference_equals_live_reference(ray_cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Reference log-probs computed once before training give the same run as a frozen reference model."""
    from rlhf.jobs import dpo

    runs = {}
    for reference in ("precomputed", "live"):
        out = tmp_path / reference
        dpo.run(
            _config(
                DPOConfig, "dpo.yaml", tiny_model_dir, out, "train.max_steps=6", f"preference.reference={reference}"
            )
        )
        runs[reference] = _train_losses(out)
    assert runs["precomputed"] == pytest.approx(runs["live"], abs=1e-5)
