"""SFT, DPO and KTO compute the logits of the positions that predict a scored label only, and lose nothing by it.

Before, every position's logits were computed: the prompt's and the padding's too, whose output layer and softmax
over the vocabulary (49k entries for SmolLM2, 150k for others) no loss reads. Now the model's ``logits_to_keep``
is given the scored positions (:func:`rlhf.models.logits.label_logits`); the losses, their gradients and the
reference log-probs are what they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf.algos import packed_sequence_logprobs, scored_positions, sequence_logprobs, sft_loss
from rlhf.algos.logprobs import IGNORE_INDEX
from rlhf.config import PreferenceLossConfig
from rlhf.models.config import ModelConfig

PAD = 0


def _labels(generator: torch.Generator, rows: list[tuple[int, int, int]]) -> torch.Tensor:
    """Labels of rows of (prompt, response, padding) lengths: -100 on the prompt and the padding."""
    out = []
    for prompt, response, pad in rows:
        scored = torch.randint(1, 50, (response,), generator=generator).tolist()
        out.append([IGNORE_INDEX] * prompt + scored + [IGNORE_INDEX] * pad)
    return torch.tensor(out)


def test_the_losses_at_the_scored_positions_equal_those_over_every_position() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = _labels(generator, [(4, 3, 3), (6, 2, 2), (5, 5, 0)])  # width 10
    logits = torch.randn(3, 10, 50, generator=generator)
    positions = scored_positions(labels)
    assert positions.tolist() == [3, 4, 5, 6, 7, 8]  # the first row's prompt ends at 4, the last label is at 9
    kept, targets = logits[:, positions], labels[:, positions + 1]
    for average in (False, True):
        expected = sequence_logprobs(logits, labels, average=average)
        assert torch.allclose(sequence_logprobs(kept, targets, average=average, shifted=True), expected)
    expected_loss, expected_metrics = sft_loss(logits, labels, num_tokens=7.0)
    loss, metrics = sft_loss(kept, targets, num_tokens=7.0, shifted=True)
    assert torch.allclose(loss, expected_loss) and metrics["num_tokens"] == expected_metrics["num_tokens"] == 10


def test_packed_log_probs_at_the_scored_positions_equal_those_over_every_position() -> None:
    generator = torch.Generator().manual_seed(1)
    parts = [(3, 2), (2, 4), (4, 1)]  # (prompt, response) of each packed sequence
    labels = torch.cat([_labels(generator, [(p, r, 0)])[0] for p, r in parts]).unsqueeze(0)
    sequence_ids = torch.cat([torch.full((p + r,), i) for i, (p, r) in enumerate(parts)])
    logits = torch.randn(1, labels.shape[1], 50, generator=generator)
    positions = scored_positions(labels)
    assert len(positions) == 7 < labels.shape[1] - 1
    for average in (False, True):
        expected = packed_sequence_logprobs(logits, labels, sequence_ids, 3, average=average)
        kept = packed_sequence_logprobs(
            logits[:, positions], labels[:, positions + 1], sequence_ids[positions + 1], 3, average, shifted=True
        )
        assert torch.allclose(kept, expected)


def test_nothing_scored_keeps_no_position() -> None:
    assert scored_positions(torch.full((2, 5), IGNORE_INDEX)).tolist() == []


# ---- the objectives on the tiny model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _sequence(generator: torch.Generator, prompt: int, response: int) -> dict[str, list[int]]:
    ids = torch.randint(5, 200, (prompt + response,), generator=generator).tolist()
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def _pairs() -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(2)
    pairs = []
    for prompt, chosen, rejected in [(6, 3, 5), (9, 2, 2), (7, 4, 1)]:
        a, b = _sequence(generator, prompt, chosen), _sequence(generator, prompt, rejected)
        b["input_ids"][:prompt] = a["input_ids"][:prompt]
        pairs.append(
            {"chosen_input_ids": a["input_ids"], "chosen_labels": a["labels"],
             "rejected_input_ids": b["input_ids"], "rejected_labels": b["labels"]}
        )  # fmt: skip
    return pairs


def _full_sequence_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the DPO objective computed before: every position's logits."""
    if "sequence_ids" in batch:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        count = int(batch["sequence_ids"][-1]) + 1
        return packed_sequence_logprobs(logits.float(), batch["labels"], batch["sequence_ids"], count)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_logprobs(logits.float(), batch["labels"])


def _output_widths(model: torch.nn.Module, run: Any) -> list[int]:
    """The number of positions the output layer saw in each of its calls during ``run()``."""
    seen: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[1]))
    try:
        run()
    finally:
        handle.remove()
    return seen


def _gradients(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_dpo_runs_the_output_layer_on_the_scored_positions_and_keeps_its_log_probs_and_gradients(
    model: torch.nn.Module, packing: bool
) -> None:
    """Before, the output layer saw every position of the batch: 11 (padded, scored from 5 of them) or 61 (packed,
    from 17)."""
    from rlhf.jobs.dpo import PreferenceObjective

    objective = PreferenceObjective(ModelConfig(), PreferenceLossConfig(), PAD, packing=packing)
    batch = objective.collate(_pairs())
    width = batch["input_ids"].shape[1]
    logps: list[torch.Tensor] = []
    widths = _output_widths(model, lambda: logps.append(objective._logps(model, batch)))
    expected = _full_sequence_logprobs(model, batch)
    assert torch.allclose(logps[0], expected, atol=1e-5)
    assert widths == [len(scored_positions(batch["labels"]))] and widths[0] < width - 1, (widths, width)
    for new, old in zip(_gradients(model, logps[0].sum()), _gradients(model, expected.sum()), strict=True):
        assert torch.allclose(new, old, atol=1e-5)


def test_sft_runs_the_output_layer_on_the_scored_positions_and_keeps_its_loss_and_gradients(
    model: torch.nn.Module,
) -> None:
    """Before, the output layer saw all 12 positions of the batch; the responses are predicted from 4 of them."""
    from rlhf.jobs.sft import SFTObjective

    generator = torch.Generator().manual_seed(3)
    objective = SFTObjective(ModelConfig(), PAD)
    batch = objective.collate([_sequence(generator, p, r) for p, r in [(8, 4), (9, 2), (10, 1)]])
    losses: list[torch.Tensor] = []
    widths = _output_widths(model, lambda: losses.append(objective.loss(model, batch, 7.0)[0]))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    expected, _ = sft_loss(logits, batch["labels"], num_tokens=7.0)
    assert torch.allclose(losses[0], expected, atol=1e-6)
    assert widths == [4], widths  # positions 7..10 predict every response token
    for new, old in zip(_gradients(model, losses[0]), _gradients(model, expected), strict=True):
        assert torch.allclose(new, old, atol=1e-5)


def test_kto_log_probs_come_from_the_scored_positions(model: torch.nn.Module) -> None:
    from rlhf.jobs.kto import UnpairedObjective

    generator = torch.Generator().manual_seed(4)
    objective = UnpairedObjective(ModelConfig(), PreferenceLossConfig(loss="kto"), PAD)
    rows = [_sequence(generator, p, r) for p, r in [(6, 3), (7, 2)]]
    batch = {
        "input_ids": torch.tensor([r["input_ids"] + [PAD] * (9 - len(r["input_ids"])) for r in rows]),
        "labels": torch.tensor([r["labels"] + [IGNORE_INDEX] * (9 - len(r["labels"])) for r in rows]),
    }
    batch["attention_mask"] = (torch.arange(9) < torch.tensor([[9], [9]])).long()
    logps: list[torch.Tensor] = []
    widths = _output_widths(model, lambda: logps.append(objective._logps(model, batch)))
    assert torch.allclose(logps[0], _full_sequence_logprobs(model, batch), atol=1e-5)
    assert widths == [3]
