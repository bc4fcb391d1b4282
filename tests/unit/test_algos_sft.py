"""`rlhf.algos.sft.sft_loss`: a hand-computed case, PyTorch's cross-entropy, and Hugging Face's causal-LM loss
(`transformers/loss/loss_utils.py::ForCausalLMLoss`, including its `num_items_in_batch` global denominator)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhf.algos import sft_loss

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


def _batch(generator: torch.Generator, dtype: torch.dtype = torch.float64):
    logits = torch.randn(4, 9, 13, generator=generator, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 13, (4, 9), generator=generator)
    labels[0, :3] = -100
    labels[1, 6:] = -100
    labels[2, :1] = -100
    labels[3, :7] = -100
    return logits, labels


def test_hand_computed_two_tokens() -> None:
    # Every position predicts with probabilities [1/6, 1/3, 1/2]; shifted labels [2, 0] -> NLL log 2 + log 6.
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).expand(1, 3, 3)
    labels = torch.tensor([[-100, 2, 0]])
    loss, metrics = sft_loss(logits, labels)
    assert abs(loss.item() - (math.log(2) + math.log(6)) / 2) < 1e-12
    assert abs(metrics["nll_sum"].item() - (math.log(2) + math.log(6))) < 1e-12
    assert metrics["num_tokens"].item() == 2
    loss, _ = sft_loss(logits, labels, num_tokens=4)
    assert abs(loss.item() - (math.log(2) + math.log(6)) / 4) < 1e-12


def test_matches_torch_cross_entropy_loss_and_gradient() -> None:
    logits, labels = _batch(torch.Generator().manual_seed(0))
    loss, _ = sft_loss(logits, labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, **TIGHT)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0], **TIGHT)


def test_matches_hugging_face_causal_lm_loss_with_num_items_in_batch() -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    # ForCausalLMLoss upcasts to float32, so compare in float32.
    logits, labels = _batch(torch.Generator().manual_seed(1), dtype=torch.float32)
    for num_items in (None, 37):
        loss, _ = sft_loss(logits, labels, num_tokens=num_items)
        expected = ForCausalLMLoss(
            logits, labels, vocab_size=13, num_items_in_batch=None if num_items is None else torch.tensor(num_items)
        )
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
