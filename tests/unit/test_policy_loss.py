"""The policy's log-probs and loss are computed from the first response position on, and equal those over every
position.

The prompt's positions need no logits: only the positions that predict a response token enter the loss. Before,
the output layer, the log-softmax and the entropy ran over the whole sequence; on a real vocabulary (49k-150k
entries) that is a large share of the update (see ``benchmarks/policy_update.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf.algos import token_logprobs
from rlhf.algos.objective import PolicyObjective, policy_objective
from rlhf.rl.experience import Experience, sequence_batch
from rlhf.rl.policy_loss import causal_logprobs, first_response_position, policy_loss

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _batch() -> Experience:
    """Rows whose prompts (3 to 9 tokens) and responses (2 to 7) differ in length: the first response position is 2."""
    generator = torch.Generator().manual_seed(0)
    lengths = [(3, 7), (9, 2), (5, 5), (4, 6)]
    rows = [torch.randint(5, 200, (p + r,), generator=generator).tolist() for p, r in lengths]
    return sequence_batch(
        [row[:p] for row, (p, _) in zip(rows, lengths, strict=True)],
        [row[p:] for row, (p, _) in zip(rows, lengths, strict=True)],
        0,
    )


def _full_logits(model: torch.nn.Module, batch: Experience) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.logits[:, :-1].float() / TEMPERATURE


def _full_logprobs(model: torch.nn.Module, batch: Experience) -> torch.Tensor:
    logprobs = token_logprobs(_full_logits(model, batch), batch.input_ids[:, 1:])
    return torch.where(batch.response_mask.bool(), logprobs, 0.0)


class _WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward cannot skip positions (as some remote-code models)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool) -> object:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_log_probs_from_the_first_response_position_equal_those_over_every_position(model: torch.nn.Module) -> None:
    batch = _batch()
    assert first_response_position(batch) == 2
    with torch.no_grad():
        expected = _full_logprobs(model, batch)
        assert torch.allclose(causal_logprobs(model, batch, TEMPERATURE), expected, atol=1e-6)
        assert torch.allclose(causal_logprobs(_WithoutLogitsToKeep(model), batch, TEMPERATURE), expected, atol=1e-6)


def test_the_output_layer_runs_on_the_positions_from_the_first_response_on(model: torch.nn.Module) -> None:
    """Plain and LoRA-wrapped: the output layer sees ``T - 2`` positions, not ``T``."""
    import copy

    from peft import LoraConfig, get_peft_model

    batch = _batch()
    seen: list[int] = []
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for candidate in (model, lora):
        output_layer = candidate.get_output_embeddings()
        handle = output_layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
        with torch.no_grad():
            causal_logprobs(candidate, batch, TEMPERATURE)
        handle.remove()
    assert seen == [batch.input_ids.shape[1] - 2] * 2


def test_the_policy_loss_metrics_and_gradients_equal_those_over_every_position(model: torch.nn.Module) -> None:
    """Every per-token input (old, reference and rollout log-probs, advantages, importance weights) is cut at the
    same position as the log-probs; the entropy bonus and the KL term are on."""
    batch = _batch()
    generator = torch.Generator().manual_seed(1)
    mask = batch.response_mask.float()
    with torch.no_grad():
        current = _full_logprobs(model, batch)

    def near(scale: float) -> torch.Tensor:
        return (current + scale * torch.randn(current.shape, generator=generator)) * mask

    from dataclasses import replace

    batch = replace(
        batch,
        old_logprobs=near(0.3),
        reference_logprobs=near(0.5),
        rollout_logprobs=near(0.1),
        advantages=torch.randn(current.shape, generator=generator) * mask,
        importance_weights=torch.rand(current.shape, generator=generator) * mask,
    )
    objective = PolicyObjective(entropy_coef=0.01, kl_coef=0.1)
    denominator = {"num_tokens": float(mask.sum()), "num_sequences": 4.0}

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    loss, metrics = policy_loss(model, batch, denominator, objective, TEMPERATURE)
    ours = gradients(loss)
    logits = _full_logits(model, batch)
    logprobs = torch.where(batch.response_mask.bool(), token_logprobs(logits, batch.input_ids[:, 1:]), 0.0)
    expected_loss, expected = policy_objective(
        logits,
        logprobs,
        batch.advantages,
        batch.response_mask,
        objective,
        old_logprobs=batch.old_logprobs,
        reference_logprobs=batch.reference_logprobs,
        importance_weights=batch.importance_weights,
        num_tokens=denominator["num_tokens"],
        num_sequences=4,
    )
    theirs = gradients(expected_loss)
    assert float(loss.detach()) == pytest.approx(float(expected_loss.detach()), abs=1e-6)
    assert set(expected) <= set(metrics)
    for name, value in expected.items():
        assert float(metrics[name]) == pytest.approx(float(value), abs=1e-6), name
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, theirs, strict=True))
    assert max(float(g.abs().max()) for g in ours) > 0
