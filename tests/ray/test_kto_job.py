"""``rlhf dpo preference.loss=kto`` as a Ray Train job (2 workers, ZeRO-2) on the bundled unpaired data,
whose signal (positive vs negative adjectives) a tiny model can learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster import configtree
from rlhf.config import DPOConfig
from rlhf.jobs.registry import EXAMPLES_DIR


def _config(model_dir: Path, out: Path, *overrides: str) -> DPOConfig:
    base = [f"model.name_or_path={model_dir}", f"train.output_dir={out}", "preference.loss=kto"]
    return configtree.load(DPOConfig, EXAMPLES_DIR / "dpo.yaml", [*base, *overrides])


def test_kto_separates_desirable_from_undesirable(ray_cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    from rlhf.jobs import dpo

    out = tmp_path / "kto"
    # a per-completion gradient of beta * sigma' <= beta / 4, half DPO's per pair: a larger step than dpo.yaml's
    overrides = ("data.path=bundled:unpaired", "train.max_steps=15", "engine.learning_rate=2e-3")
    summary = dpo.run(_config(tiny_model_dir, out, *overrides))
    # the policy starts as its own reference: rewards and z0 are 0, each completion's loss is 1 - sigma(0)
    assert summary["eval_loss_before"] == pytest.approx(0.5, abs=1e-4)
    assert summary["eval_rewards/margin_before"] == pytest.approx(0.0, abs=1e-4)
    assert summary["eval_kl_before"] == pytest.approx(0.0, abs=1e-4)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.1, summary
    assert summary["eval_rewards/margin_after"] > 1.0, summary
    assert summary["eval_rewards/chosen_after"] > 0 > summary["eval_rewards/rejected_after"], summary
    assert summary["eval_kl_after"] > 0, summary  # the mismatched pairs measure how far the policy moved
    assert "eval_rewards/accuracy_after" not in summary  # a pairwise figure; unpaired data has no pairs
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 15 and all(r["kl"] >= 0 for r in train)  # z0 is clamped at 0
    assert (out / "final" / "model.safetensors").is_file()
