"""The policy worker outside Ray (one process, a single-rank gloo group): on a model with dropout, the first
update of a step sees ratios of exactly 1.

The old log-probs of an update come from an eval-mode pass (no dropout), as the replicas' do. Before
``algorithm.disable_dropout`` the update's own forward ran in training mode with the model's dropout on, so on a
model with dropout (GPT-2/OPT-style, LoRA dropout, a Llama with ``attention_dropout``) the first mini-batch's
ratios were noise around 1 and clipping acted on that noise.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed


def _first_update(model_dir: str, disable_dropout: bool) -> dict[str, float]:
    from dataclasses import replace

    import torch

    from rlhf.algos.objective import PolicyObjective
    from rlhf.engine import EngineConfig
    from rlhf.models.config import ModelConfig
    from rlhf.rl.experience import sequence_batch
    from rlhf.rl.workers import PolicyWorker

    worker = PolicyWorker()
    engine = EngineConfig(micro_batch_size=8, learning_rate=1e-3, precision="fp32")
    worker.build(ModelConfig(name_or_path=model_dir), engine, total_steps=1, seed=0, disable_dropout=disable_dropout)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (6,), generator=generator).tolist() for _ in range(8)]
    responses = [torch.randint(5, 200, (10,), generator=generator).tolist() for _ in range(8)]
    batch = sequence_batch(prompts, responses, pad_token_id=0)
    (old,) = worker.logprobs([batch], temperature=1.0)
    batch = replace(
        batch, old_logprobs=old, rollout_logprobs=old, advantages=torch.randn(old.shape, generator=generator)
    )
    tokens = float(batch.response_mask.sum())
    sums = worker.train([[batch]], [{"num_tokens": tokens, "num_sequences": 8.0}], PolicyObjective(), 1.0)
    return {name: sums[name] / sums["tokens"] for name in ("ratio_mean", "clip_fraction", "approx_kl")}


def _main(_index: int, model_dir: str, out: str) -> None:
    results = {str(flag): _first_update(model_dir, flag) for flag in (True, False)}
    Path(out).write_text(json.dumps(results))
    sys.stdout.flush()
    os._exit(0)  # see tests/distributed/test_engine.py: no interpreter shutdown under a live gloo group


@pytest.fixture(scope="module")
def dropout_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with attention dropout 0.5 (Llama applies it through a float attribute, not nn.Dropout)."""
    model = tmp_path_factory.mktemp("dropout") / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"attention_dropout": 0.5}))
    return model


def test_with_dropout_disabled_the_first_update_has_ratio_one_and_no_clipping(
    dropout_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "metrics.json"
    mp.start_processes(_main, args=(str(dropout_model), str(out)), nprocs=1, start_method="spawn", join=True)
    results = json.loads(out.read_text())
    print(f"\nfirst update with dropout off: {results['True']}; kept on: {results['False']}")
    assert results["True"]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert results["True"]["clip_fraction"] == 0.0
    assert results["True"]["approx_kl"] == pytest.approx(0.0, abs=1e-9)
    # the same update with the model's dropout kept (algorithm.disable_dropout=false): the noise is real
    assert results["False"]["clip_fraction"] > 0.0
