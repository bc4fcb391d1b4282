"""Padding-free DPO batches: the packed row gives the same log-probs, losses and gradients as padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf.algos import packed_sequence_logprobs, sequence_logprobs
from rlhf.config import PreferenceLossConfig
from rlhf.data.collate import packed_preference_batch, preference_batch
from rlhf.data.config import DataConfig
from rlhf.data.encode import build_examples
from rlhf.jobs.dpo import PreferenceObjective
from rlhf.models.config import ModelConfig


@pytest.fixture(scope="module")
def pairs(tiny_model_dir: Path) -> list[dict]:
    from rlhf.models.loading import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    examples = build_examples(DataConfig(path="bundled:preference_chat", max_rows=6), tokenizer, "preference")
    lengths = {len(e["chosen_input_ids"]) for e in examples} | {len(e["rejected_input_ids"]) for e in examples}
    assert len(lengths) > 1, "the check needs sequences of different lengths"
    return examples


def test_packed_row_holds_every_sequence_once(pairs: list[dict]) -> None:
    batch = packed_preference_batch(pairs)
    sequences = [e["chosen_input_ids"] for e in pairs] + [e["rejected_input_ids"] for e in pairs]
    assert batch["input_ids"].shape == (1, sum(map(len, sequences)))
    assert batch["sequence_ids"].tolist() == [i for i, s in enumerate(sequences) for _ in s]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten()
    assert len(starts) == len(sequences)
    assert (batch["labels"][0, starts] == -100).all()


def test_packed_sequence_logprobs_on_hand_made_logits() -> None:
    torch.manual_seed(0)
    lengths = [3, 5, 2]
    logits = torch.randn(1, sum(lengths), 7)
    labels = torch.randint(0, 7, (1, sum(lengths)))
    ids = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)])
    start = 0
    for n in lengths:
        labels[0, start] = -100
        start += n
    for average in (False, True):
        packed = packed_sequence_logprobs(logits, labels, ids, len(lengths), average=average)
        start = 0
        for i, n in enumerate(lengths):
            alone = sequence_logprobs(logits[:, start : start + n], labels[:, start : start + n], average=average)
            torch.testing.assert_close(packed[i], alone[0])
            start += n


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_packed_objective_matches_the_padded_one(tiny_model_dir: Path, pairs: list[dict], loss: str) -> None:
    from rlhf.models.loading import load_causal_lm

    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir)))
    results = []
    for packing in (False, True):
        objective = PreferenceObjective(ModelConfig(), PreferenceLossConfig(loss=loss), 0, packing=packing)
        prepared = objective.prepare(model, pairs)
        batch = objective.collate(prepared)
        assert objective.count(batch) == len(pairs)
        model.zero_grad()
        value, metrics = objective.loss(model, batch, denominator=len(pairs))
        value.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        logps = objective._logps(model, batch).detach()
        results.append((value.detach(), grads, logps, metrics))
    (padded, padded_grads, padded_logps, _), (packed, packed_grads, packed_logps, _) = results
    torch.testing.assert_close(packed_logps, padded_logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_grads, padded_grads, atol=1e-5, rtol=1e-4)
    # the padded batch really is padded: packing removes work
    padded_batch = preference_batch(pairs, 0)
    assert padded_batch["input_ids"].numel() > packed_preference_batch(pairs)["input_ids"].numel()


def test_the_live_reference_joins_the_engine_device_before_the_first_loss(tiny_model_dir: Path, pairs: list[dict]):
    """Before: ``preference.reference=live`` left the frozen reference model on the CPU while the batches were on
    the engine's device (a GPU), and the first loss failed on the device mismatch, as KTO's did not.

    No GPU here: the engine's device is stood in by ``meta`` (shapes without data), where the policy and the
    batch go as a training engine on a GPU puts them.
    """
    config = PreferenceLossConfig(loss="dpo", reference="live")
    objective = PreferenceObjective(ModelConfig(name_or_path=str(tiny_model_dir)), config, pad_token_id=0)
    policy = objective.build_model()
    assert objective.prepare(policy, pairs) == pairs  # live: nothing is precomputed
    for model in (policy, objective.reference):  # sdpa's path reads the mask's values, which meta tensors lack
        model.set_attn_implementation("eager")
    engine_device = torch.device("meta")
    policy.to(engine_device)
    batch = {name: tensor.to(engine_device) for name, tensor in objective.collate(pairs[:2]).items()}
    # the positions the logits are needed at depend on the labels' values, which meta tensors lack: all of them
    with torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True):
        loss, metrics = objective.loss(policy, batch, denominator=2.0)
    assert next(objective.reference.parameters()).device == engine_device
    assert loss.device == engine_device
    assert metrics["rewards/margin"].device == engine_device
