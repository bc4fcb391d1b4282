"""Invariances and contracts shared by every loss in `rlhf.algos`.

* Data-parallel sharding: splitting the batch into two uneven shards, computing each shard's loss with the global
  denominator and summing gives the whole-batch loss, and the same gradients.
* Gradient accumulation: for `sft_loss`, 8 micro-batches of 1 sequence (global token count, gradients accumulated by
  `backward()` into a small model's parameters) equal one batch of 8.
* Contracts: finite loss and gradients, metrics that are detached 0-dim tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from rlhf.algos import (
    bradley_terry_loss,
    dpo_loss,
    entropy_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    ppo_policy_loss,
    sequence_logprobs,
    sft_loss,
    simpo_loss,
    value_loss,
)

DTYPE = torch.float64
TIGHT = {"rtol": 1e-12, "atol": 1e-12}
LossResult = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class Case:
    """A loss over a batch: `loss(rows, use_global)` computes it on `rows` of the batch, with the global denominator
    when `use_global` (else the local count); `leaves` are the tensors gradients are taken with respect to."""

    leaves: list[torch.Tensor]
    loss: Callable[[slice, bool], LossResult]
    split: int  # shard 0 = rows [:split], shard 1 = rows [split:]


def _leaf(*shape: int, generator: torch.Generator, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator, dtype=DTYPE) * scale + offset).requires_grad_(True)


def _response_mask(batch: int, length: int) -> torch.Tensor:
    lengths = torch.tensor([length, 1, 3, length - 2, 2, 5][:batch])
    return (torch.arange(length) < lengths.unsqueeze(1)).long()


def _labels(generator: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    prompt = torch.tensor([1, 4, 2, 6, 3][:batch]).unsqueeze(1)
    end = torch.tensor([length, length - 1, 5, length, 4][:batch]).unsqueeze(1)
    positions = torch.arange(length)
    return labels.masked_fill((positions < prompt) | (positions >= end), -100)


def ppo_case(aggregation: str) -> Case:
    generator = torch.Generator().manual_seed(0)
    batch, length = 6, 7
    logprobs = _leaf(batch, length, generator=generator, scale=0.5, offset=-1.0)
    old_logprobs = logprobs.detach() + 0.3 * torch.randn(batch, length, generator=generator, dtype=DTYPE)
    advantages = torch.randn(batch, length, generator=generator, dtype=DTYPE)
    weights = torch.rand(batch, length, generator=generator, dtype=DTYPE) + 0.5
    mask = _response_mask(batch, length)

    def loss(rows: slice, use_global: bool) -> LossResult:
        global_count = {"num_tokens": mask.sum()} if aggregation == "token" else {"num_sequences": float(batch)}
        return ppo_policy_loss(
            logprobs[rows],
            old_logprobs[rows],
            advantages[rows],
            mask[rows],
            clip_low=0.2,
            clip_high=0.28,
            aggregation=aggregation,
            importance_weights=weights[rows],
            **(global_count if use_global else {}),
        )

    return Case([logprobs], loss, split=2)


def value_case() -> Case:
    generator = torch.Generator().manual_seed(1)
    values = _leaf(6, 7, generator=generator)
    old_values = values.detach() + 0.3 * torch.randn(6, 7, generator=generator, dtype=DTYPE)
    returns = torch.randn(6, 7, generator=generator, dtype=DTYPE)
    mask = _response_mask(6, 7)

    def loss(rows: slice, use_global: bool) -> LossResult:
        num_tokens = mask.sum() if use_global else None
        return value_loss(values[rows], old_values[rows], returns[rows], mask[rows], 0.2, num_tokens=num_tokens)

    return Case([values], loss, split=3)


def entropy_case() -> Case:
    generator = torch.Generator().manual_seed(2)
    logits = _leaf(6, 7, 11, generator=generator, scale=2.0)
    mask = _response_mask(6, 7)

    def loss(rows: slice, use_global: bool) -> LossResult:
        return entropy_loss(logits[rows], mask[rows], num_tokens=mask.sum() if use_global else None)

    return Case([logits], loss, split=1)


def sft_case() -> Case:
    generator = torch.Generator().manual_seed(3)
    logits = _leaf(5, 9, 13, generator=generator)
    labels = _labels(generator, 5, 9, 13)
    num_tokens = (labels[:, 1:] != -100).sum()

    def loss(rows: slice, use_global: bool) -> LossResult:
        return sft_loss(logits[rows], labels[rows], num_tokens=num_tokens if use_global else None)

    return Case([logits], loss, split=2)


def _pair_leaves(generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _leaf(batch, generator=generator, scale=3, offset=-10), _leaf(
        batch, generator=generator, scale=3, offset=-10
    )


def dpo_case(label_smoothing: float = 0.0) -> Case:
    generator = torch.Generator().manual_seed(4)
    chosen, rejected = _pair_leaves(generator, 7)
    ref_chosen, ref_rejected = (-10 + 3 * torch.randn(2, 7, generator=generator, dtype=DTYPE)).unbind(0)

    def loss(rows: slice, use_global: bool) -> LossResult:
        args = (chosen[rows], rejected[rows], ref_chosen[rows], ref_rejected[rows], 0.1, label_smoothing)
        return dpo_loss(*args, num_items=7 if use_global else None)

    return Case([chosen, rejected], loss, split=3)


def ipo_case() -> Case:
    generator = torch.Generator().manual_seed(5)
    chosen, rejected = _pair_leaves(generator, 7)
    ref_chosen, ref_rejected = (-10 + 3 * torch.randn(2, 7, generator=generator, dtype=DTYPE)).unbind(0)

    def loss(rows: slice, use_global: bool) -> LossResult:
        args = (chosen[rows], rejected[rows], ref_chosen[rows], ref_rejected[rows], 0.5)
        return ipo_loss(*args, num_items=torch.tensor(7) if use_global else None)

    return Case([chosen, rejected], loss, split=5)


def bradley_terry_case() -> Case:
    generator = torch.Generator().manual_seed(6)
    chosen, rejected = _leaf(7, generator=generator), _leaf(7, generator=generator)
    margin = torch.rand(7, generator=generator, dtype=DTYPE)

    def loss(rows: slice, use_global: bool) -> LossResult:
        return bradley_terry_loss(
            chosen[rows], rejected[rows], margin[rows], num_items=7.0 if use_global else None,
            center_rewards_coefficient=0.01,
        )  # fmt: skip

    return Case([chosen, rejected], loss, split=2)


def simpo_case() -> Case:
    generator = torch.Generator().manual_seed(7)
    chosen, rejected = _leaf(7, generator=generator, offset=-2), _leaf(7, generator=generator, offset=-2)

    def loss(rows: slice, use_global: bool) -> LossResult:
        return simpo_loss(chosen[rows], rejected[rows], 2.0, 0.3, 0.1, num_items=7 if use_global else None)

    return Case([chosen, rejected], loss, split=4)


def kto_case() -> Case:
    generator = torch.Generator().manual_seed(8)
    policy = _leaf(8, generator=generator, scale=3, offset=-10)
    reference = -10 + 3 * torch.randn(8, generator=generator, dtype=DTYPE)
    labels = torch.tensor([True, True, False, True, False, False, True, False])
    kl_reference_point = torch.tensor(0.7, dtype=DTYPE)  # a global statistic, the same on every shard

    def loss(rows: slice, use_global: bool) -> LossResult:
        return kto_loss(
            policy[rows], reference[rows], labels[rows], kl_reference_point, 0.1, 1.2, 0.8,
            num_items=8 if use_global else None,
        )  # fmt: skip

    return Case([policy], loss, split=3)


def orpo_per_pair_nll_case() -> Case:
    generator = torch.Generator().manual_seed(9)
    chosen = (-torch.rand(6, generator=generator, dtype=DTYPE) * 3).requires_grad_(True)
    rejected = (-torch.rand(6, generator=generator, dtype=DTYPE) * 3).requires_grad_(True)
    nll = (torch.rand(6, generator=generator, dtype=DTYPE) * 2).requires_grad_(True)

    def loss(rows: slice, use_global: bool) -> LossResult:
        return orpo_loss(chosen[rows], rejected[rows], nll[rows], 0.25, num_items=6 if use_global else None)

    return Case([chosen, rejected, nll], loss, split=2)


def orpo_token_mean_nll_case() -> Case:
    """TRL's convention: the NLL is the chosen token mean over the batch, i.e. `sft_loss` with the global count."""
    generator = torch.Generator().manual_seed(10)
    chosen_logits, rejected_logits = _leaf(5, 9, 7, generator=generator), _leaf(5, 9, 7, generator=generator)
    chosen_labels, rejected_labels = _labels(generator, 5, 9, 7), _labels(generator, 5, 9, 7)
    chosen_tokens = (chosen_labels[:, 1:] != -100).sum()

    def loss(rows: slice, use_global: bool) -> LossResult:
        nll, _ = sft_loss(chosen_logits[rows], chosen_labels[rows], num_tokens=chosen_tokens if use_global else None)
        chosen = sequence_logprobs(chosen_logits[rows], chosen_labels[rows], average=True)
        rejected = sequence_logprobs(rejected_logits[rows], rejected_labels[rows], average=True)
        return orpo_loss(chosen, rejected, nll, 0.25, num_items=5 if use_global else None)

    return Case([chosen_logits, rejected_logits], loss, split=2)


CASES = {
    "ppo_token": lambda: ppo_case("token"),
    "ppo_sequence": lambda: ppo_case("sequence"),
    "value": value_case,
    "entropy": entropy_case,
    "sft": sft_case,
    "dpo": dpo_case,
    "cdpo": lambda: dpo_case(label_smoothing=0.2),
    "ipo": ipo_case,
    "bradley_terry": bradley_terry_case,
    "simpo": simpo_case,
    "kto": kto_case,
    "orpo_per_pair_nll": orpo_per_pair_nll_case,
    "orpo_token_mean_nll": orpo_token_mean_nll_case,
}


def _grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("name", CASES)
def test_shard_losses_with_global_denominator_sum_to_whole_batch(name: str) -> None:
    case = CASES[name]()
    whole, _ = case.loss(slice(None), False)
    whole_explicit, _ = case.loss(slice(None), True)
    shards = [case.loss(slice(None, case.split), True)[0], case.loss(slice(case.split, None), True)[0]]
    sharded = shards[0] + shards[1]

    torch.testing.assert_close(whole_explicit, whole, **TIGHT)
    torch.testing.assert_close(sharded, whole, **TIGHT)
    for sharded_grad, whole_grad in zip(_grads(sharded, case.leaves), _grads(whole, case.leaves), strict=True):
        torch.testing.assert_close(sharded_grad, whole_grad, **TIGHT)


@pytest.mark.parametrize("name", ["ppo_token", "sft", "value", "orpo_token_mean_nll"])
def test_averaging_shard_means_is_not_the_batch_mean(name: str) -> None:
    """The shards have uneven token counts, so the global denominator matters: the check above can fail."""
    case = CASES[name]()
    whole, _ = case.loss(slice(None), False)
    averaged = (case.loss(slice(None, case.split), False)[0] + case.loss(slice(case.split, None), False)[0]) / 2
    assert (averaged - whole).abs() > 1e-5  # vs the 1e-12 tolerance of the invariance check


@pytest.mark.parametrize("name", CASES)
def test_loss_gradients_are_finite_and_metrics_detached_scalars(name: str) -> None:
    case = CASES[name]()
    loss, metrics = case.loss(slice(None), False)
    assert loss.dim() == 0 and torch.isfinite(loss)
    grads = _grads(loss, case.leaves)
    assert all(torch.isfinite(grad).all() for grad in grads)
    assert any(grad.abs().sum() > 0 for grad in grads)
    assert metrics
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert not value.requires_grad and value.grad_fn is None, key
        assert torch.isfinite(value), key


def test_sft_gradient_accumulation_of_eight_micro_batches_equals_one_batch() -> None:
    generator = torch.Generator().manual_seed(11)
    vocab, hidden, batch, length = 13, 8, 8, 10
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, vocab))
    model = model.to(DTYPE)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    prompt_lengths = torch.tensor([1, 3, 2, 5, 4, 2, 6, 3]).unsqueeze(1)
    ends = torch.tensor([10, 7, 9, 10, 6, 8, 10, 5]).unsqueeze(1)
    positions = torch.arange(length)
    labels = input_ids.masked_fill((positions < prompt_lengths) | (positions >= ends), -100)
    num_tokens = (labels[:, 1:] != -100).sum()

    model.zero_grad()
    batch_loss, _ = sft_loss(model(input_ids), labels)
    batch_loss.backward()
    batch_grads = [parameter.grad.clone() for parameter in model.parameters()]

    model.zero_grad()
    accumulated_loss = torch.zeros((), dtype=DTYPE)
    for row in range(batch):
        micro_loss, _ = sft_loss(model(input_ids[row : row + 1]), labels[row : row + 1], num_tokens=num_tokens)
        micro_loss.backward()
        accumulated_loss = accumulated_loss + micro_loss.detach()

    torch.testing.assert_close(accumulated_loss, batch_loss.detach(), **TIGHT)
    for parameter, expected in zip(model.parameters(), batch_grads, strict=True):
        torch.testing.assert_close(parameter.grad, expected, **TIGHT)
