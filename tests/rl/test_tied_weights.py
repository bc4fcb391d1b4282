"""Weight transfer into replicas of a model whose output layer is its input embeddings (tied, as in SmolLM2,
Qwen2.5, Llama-3.2 and Gemma): the trainer sends the embeddings once, under their own name, and the replicas'
output layer must follow them.

Reported on SmolLM2: every transfer made vLLM log ``ParallelLMHead: Failed to load weights`` (its layer-wise
reload got nothing for the output layer and put its previous tensors back), and the trainer-vs-replica log-prob
gap grew step after step.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.rl.test_ppo import LOGPROB_TOL, transformers_logprobs

APP = "rlhf-tied-tests"
SEQUENCE = [1, *range(40, 70)]


@pytest.fixture(scope="module")
def tied_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny tied model, and a copy of it whose embeddings alone (the output layer too) were changed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models.init_model import TinyModelSpec, init_model

    base = init_model(tmp_path_factory.mktemp("tied") / "base", TinyModelSpec(tie_word_embeddings=True))
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        embeddings = model.model.embed_tokens.weight
        embeddings.add_(torch.randn(embeddings.shape, generator=generator) * embeddings.std() * 3)
    changed = base.parent / "changed"
    model.save_pretrained(changed)
    AutoTokenizer.from_pretrained(base).save_pretrained(changed)
    return base, changed


def test_the_output_layer_of_a_tied_model_follows_every_transfer(ray_cluster, tied_models: tuple[Path, Path]) -> None:
    from ray import serve

    from cluster.groups import ActorGroup
    from rlhf.engine import EngineConfig
    from rlhf.models.config import ModelConfig
    from rlhf.rl.workers import PolicyWorker
    from serving.config import ServeConfig
    from serving.deploy import deploy
    from serving.rollout import RolloutClient
    from serving.weight_transfer import ReplicaWeightSync

    base, changed = tied_models
    expected = {name: transformers_logprobs(path, SEQUENCE) for name, path in (("base", base), ("changed", changed))}
    assert max(abs(a - b) for a, b in zip(expected["base"], expected["changed"], strict=True)) > 10 * LOGPROB_TOL

    config = ServeConfig(model=str(base), model_name="policy", max_model_len=256, max_tokens_limit=256)
    deployment = deploy(config, APP, timeout_s=600, weight_transfer=True)
    try:
        client = RolloutClient("policy", app_name=APP)

        def worst_gap(name: str) -> float:
            served = client.sequence_logprobs([SEQUENCE])[0]
            return max(abs(a - b) for a, b in zip(served, expected[name], strict=True))

        gaps = {"deployed": worst_gap("base")}
        client.sync_weights(changed)  # from files (rollout.weight_sync=files)
        gaps["files"] = worst_gap("changed")
        gaps["stale files"] = worst_gap("base")
        with ActorGroup("policy", PolicyWorker, num_actors=1, call_timeout_s=300) as policy:
            policy.call(PolicyWorker.build, ModelConfig(name_or_path=str(changed)), EngineConfig(zero_stage=0), 1, 0)
            sync = ReplicaWeightSync(client.replica_set(timeout_s=120))
            policy.call(PolicyWorker.open_weight_transfer, sync, "gloo", 120.0)
            for round_ in range(2):  # every transfer, not only the first
                client.sync_weights(base)  # from disk: the replicas hold the base weights again
                gaps[f"base {round_}"] = worst_gap("base")
                started = time.monotonic()
                policy.call(PolicyWorker.send_weights)
                gaps[f"sent {round_}"] = worst_gap("changed")
                gaps[f"stale {round_}"] = worst_gap("base")
            seconds = time.monotonic() - started
    finally:
        deployment.release()
        if deployment.how == "started":
            serve.shutdown()
    print(f"\ntied model, replica vs trainer max |log-prob diff| per stage: {gaps}; a transfer {seconds:.2f} s")
    assert all(gaps[key] < LOGPROB_TOL for key in gaps if not key.startswith("stale"))
    assert all(gaps[key] > 10 * LOGPROB_TOL for key in gaps if key.startswith("stale"))
