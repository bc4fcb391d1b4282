"""Hand-computed and naive-reference checks of `rlhf.algos.logprobs` (TRL agreement is in test_algos_trl_parity)."""

from __future__ import annotations

import math

import torch

from rlhf.algos import entropy_from_logits, sequence_logprobs, token_logprobs

TIGHT = {"rtol": 1e-12, "atol": 1e-12}
# softmax(log [1, 2, 3]) = [1/6, 1/3, 1/2]
LOGITS_123 = torch.log(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_token_logprobs_on_known_distribution() -> None:
    logits = LOGITS_123.expand(1, 3, 3)
    targets = torch.tensor([[2, 0, 1]])
    expected = torch.tensor([[math.log(1 / 2), math.log(1 / 6), math.log(1 / 3)]], dtype=torch.float64)
    torch.testing.assert_close(token_logprobs(logits, targets), expected, **TIGHT)


def test_token_logprobs_reads_ignore_index_as_token_zero() -> None:
    logits = LOGITS_123.expand(1, 2, 3)
    torch.testing.assert_close(
        token_logprobs(logits, torch.tensor([[-100, 2]])), token_logprobs(logits, torch.tensor([[0, 2]])), **TIGHT
    )


def test_token_logprobs_matches_log_softmax_and_is_shift_invariant() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 17, generator=generator, dtype=torch.float64) * 5
    targets = torch.randint(0, 17, (2, 4), generator=generator)
    naive = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, targets), naive, **TIGHT)
    # A huge common offset would overflow a naive exp(); logsumexp must not care.
    torch.testing.assert_close(token_logprobs(logits + 1e4, targets), naive, rtol=0, atol=1e-9)


def test_entropy_on_known_distributions() -> None:
    uniform = torch.zeros(2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(8), dtype=torch.float64))
    expected = -(1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3) + 1 / 2 * math.log(1 / 2))
    assert abs(entropy_from_logits(LOGITS_123.view(1, 1, 3)).item() - expected) < 1e-12


def test_entropy_gradient_matches_naive_formula() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(entropy_from_logits(logits).sum(), logits)
    logp = torch.log_softmax(logits, dim=-1)
    (naive_grad,) = torch.autograd.grad(-(logp.exp() * logp).sum(), logits)
    torch.testing.assert_close(grad, naive_grad, **TIGHT)


def test_sequence_logprobs_matches_explicit_loop() -> None:
    generator = torch.Generator().manual_seed(2)
    batch, length, vocab = 3, 6, 5
    logits = torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    labels[2, :] = -100  # nothing scored
    log_softmax = torch.log_softmax(logits, dim=-1)
    sums, means = [], []
    for b in range(batch):
        scored = [log_softmax[b, t - 1, labels[b, t]].item() for t in range(1, length) if labels[b, t] != -100]
        sums.append(sum(scored))
        means.append(sum(scored) / len(scored) if scored else 0.0)
    torch.testing.assert_close(sequence_logprobs(logits, labels), torch.tensor(sums, dtype=torch.float64), **TIGHT)
    torch.testing.assert_close(
        sequence_logprobs(logits, labels, average=True), torch.tensor(means, dtype=torch.float64), **TIGHT
    )
