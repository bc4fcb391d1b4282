"""The preference losses of ``rlhf dpo`` beyond DPO's own, and its two kinds of reference, on the jobs' loop (2 ranks,
gloo; tests/distributed/ranks.py) over the bundled preference pairs. DPO itself, as a Ray Train job, is in
tests/ray/test_preference_jobs.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from .ranks import run_ranks

pytestmark = pytest.mark.distributed

LOSSES = ["ipo", "cdpo", "simpo", "orpo"]
REFERENCES = ["precomputed", "live"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Each loss (10 steps) and each kind of reference (6 steps of DPO), trained once on the same 2 ranks."""
    tmp = tmp_path_factory.mktemp("preference")

    def overrides(name: str, *more: str) -> list[str]:
        return [f"model.name_or_path={tiny_model_dir}", f"train.output_dir={tmp / name}", *more]

    cases = {loss: overrides(loss, "train.max_steps=10", f"preference.loss={loss}") for loss in LOSSES}
    cases |= {ref: overrides(ref, "train.max_steps=6", f"preference.reference={ref}") for ref in REFERENCES}
    results = run_ranks(2, [("dpo", o) for o in cases.values()], tmp / "records.json")
    return dict(zip(cases, results, strict=True))


@pytest.mark.parametrize("loss", LOSSES)
def test_every_preference_loss_trains(runs: dict[str, list[dict]], loss: str) -> None:
    before, after = (r for r in runs[loss] if r["kind"] == "eval")
    assert after["eval_loss"] < before["eval_loss"], (before, after)
    assert after["eval_rewards/margin"] > before["eval_rewards/margin"], (before, after)


def test_precomputed_reference_equals_live_reference(runs: dict[str, list[dict]]) -> None:
    """Reference log-probs computed once before training give the same run as a frozen reference model."""
    losses = {ref: [r["loss"] for r in runs[ref] if r["kind"] == "train"] for ref in REFERENCES}
    assert len(losses["live"]) == 6
    assert losses["precomputed"] == pytest.approx(losses["live"], abs=1e-5)
