"""Invariances of the real jobs (2 ranks of the jobs' loop, gloo, fp32): how the work is split must not change the run.

ZeRO-2 and ZeRO-3 give the ZeRO-0 run, and micro-batch 1 x accumulation 8 gives micro-batch 8
x accumulation 1, for ``rlhf sft``, ``rlhf rm`` and ``rlhf dpo``: the same per-step training
loss and gradient norm in the metric records and the same exported weights in ``final/``. The runs are
the loop every Ray Train worker of these jobs runs, on 2 ranks of their own (tests/distributed/ranks.py).

What makes the comparison meaningful: the data order is a pure function of (seed, step)
(``rlhf.jobs.batching.step_indices``), so every run reads the same examples at every step;
the tiny model has no dropout (``attention_dropout=0``) and every run seeds the fresh score
head of the reward model identically; the engine trains in fp32 on CPU. The runs then
differ only in the order of floating-point reductions (gradient all-reduce vs
reduce-scatter, one padded batch vs eight unpadded ones).

Tolerances. Losses: 1e-4 absolute (as in tests/distributed/test_engine.py); reduction order
alone moves them by <1e-6, while a micro-batch dropped, double counted or mis-weighted moves
them by ~1e-2 or more. Gradient norms: 1e-4 relative; they catch a mis-scaled gradient that
AdamW's scale invariance would hide from the loss. Weights: 1e-4 absolute; AdamW moves a
weight by up to the learning rate per step, 1e-3 (dpo, lr 5e-4) to 6e-3 (sft, lr 3e-3) over
these 3 steps (checked to exceed 5x the tolerance, so the comparison is not vacuous), and a
wrong or stale exported shard is off by that much or more. Observed maxima (printed with ``-s``):
losses 5e-7, gradient norms 1.4e-6 relative, weights 2.6e-5 (the ZeRO-3 reward model; AdamW's
first steps amplify reduction-order noise in near-zero gradients towards ``lr * noise / eps``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .ranks import run_ranks

pytestmark = pytest.mark.distributed

STEPS = 3
LOSS_ATOL = 1e-4
GRAD_NORM_RTOL = 1e-4
WEIGHT_ATOL = 1e-4

RUNS = [  # job, zero_stage, micro-batch size, accumulation steps
    ("sft", 0, 8, 1), ("sft", 2, 8, 1), ("sft", 3, 8, 1), ("sft", 2, 1, 8),
    ("rm", 0, 8, 1), ("rm", 3, 8, 1),
    ("dpo", 0, 8, 1), ("dpo", 3, 8, 1),
]  # fmt: skip


@dataclass(frozen=True)
class Run:
    """What a finished run left behind: its per-step train records and its exported weights."""

    train: list[dict]
    weights: dict[str, torch.Tensor]


def _load_run(records: list[dict], out: Path) -> Run:
    from safetensors.torch import load_file

    train = [r for r in records if r["kind"] == "train"]
    weights: dict[str, torch.Tensor] = {}
    for file in sorted((out / "final").glob("*.safetensors")):
        weights |= load_file(file)
    return Run(train, weights)


@pytest.fixture(scope="module")
def run_job(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``run_job(job, zero_stage, mbs, gas)``: a finished run; every run of RUNS trains once, on the same 2 ranks."""
    tmp = tmp_path_factory.mktemp("jobs")
    outs = {key: tmp / "{}-zero{}-{}x{}".format(*key) for key in RUNS}
    runs = [
        (
            key[0],
            [
                f"model.name_or_path={tiny_model_dir}",
                f"train.output_dir={outs[key]}",
                f"train.max_steps={STEPS}",
                f"engine.zero_stage={key[1]}",
                f"engine.micro_batch_size={key[2]}",
                f"engine.gradient_accumulation_steps={key[3]}",
                "engine.warmup_steps=0",  # every step learns (a zero-LR first step would compare nothing)
                "data.eval_split=null",  # no evaluation: only the training trajectory is compared
                "data.max_rows=64",  # 2 ranks x 8 x 3 steps fit; less to tokenize
            ],
        )
        for key in RUNS
    ]
    results = run_ranks(2, runs, tmp / "records.json")
    finished = {key: _load_run(records, outs[key]) for key, records in zip(RUNS, results, strict=True)}

    def run(job: str, zero_stage: int, mbs: int = 8, gas: int = 1) -> Run:
        return finished[(job, zero_stage, mbs, gas)]

    return run


def _max_differences(run: Run, reference: Run) -> dict[str, float]:
    assert [r["step"] for r in run.train] == [r["step"] for r in reference.train] == list(range(1, STEPS + 1))
    assert run.weights.keys() == reference.weights.keys()
    loss = max(abs(a["loss"] - b["loss"]) for a, b in zip(run.train, reference.train, strict=True))
    grad_norm = max(
        abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(run.train, reference.train, strict=True)
    )
    weight = max(float((run.weights[k] - v).abs().max()) for k, v in reference.weights.items())
    return {"loss": loss, "grad_norm_rel": grad_norm, "weight": weight}


def _assert_same_run(run: Run, reference: Run, tiny_model_dir: Path, label: str) -> None:
    from safetensors.torch import load_file

    differences = _max_differences(run, reference)
    print(f"\n{label}: max differences {differences}")
    assert differences["loss"] <= LOSS_ATOL, (differences, run.train, reference.train)
    assert differences["grad_norm_rel"] <= GRAD_NORM_RTOL, (differences, run.train, reference.train)
    assert differences["weight"] <= WEIGHT_ATOL, differences
    # The comparison means something only if training moved the weights well beyond the tolerance.
    initial = load_file(tiny_model_dir / "model.safetensors")
    moved = max(float((reference.weights[k] - v).abs().max()) for k, v in initial.items() if k in reference.weights)
    assert moved > 5 * WEIGHT_ATOL, moved


@pytest.mark.parametrize(("job", "stage"), [("sft", 2), ("sft", 3), ("rm", 3), ("dpo", 3)])
def test_zero_stage_matches_zero0(run_job, tiny_model_dir: Path, job: str, stage: int) -> None:
    _assert_same_run(run_job(job, stage), run_job(job, 0), tiny_model_dir, f"{job} zero{stage} vs zero0")


def test_accumulation_matches_one_big_micro_batch(run_job, tiny_model_dir: Path) -> None:
    """micro-batch 1 x accumulation 8 == micro-batch 8 x accumulation 1 (ZeRO-2, the examples' stage)."""
    _assert_same_run(run_job("sft", 2, mbs=1, gas=8), run_job("sft", 2), tiny_model_dir, "sft 1x8 vs 8x1")
