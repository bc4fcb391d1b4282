"""The rollout replicas' log-probs are those of the distribution they sampled from, at any temperature.

Before: the replicas returned vLLM's default ``raw_logprobs`` (the model's distribution at temperature 1) while the
trainer computes its log-probs from logits divided by the sampling temperature, so at ``rollout.temperature=0.7``
the logged trainer-vs-rollout gap measured the temperature, not a mismatch, and ``rollout.truncated_is`` had to be
refused away from temperature 1. The rollout deployment now asks vLLM for processed log-probs.
"""

from __future__ import annotations

from pathlib import Path

from tests.rl.conftest import APP_NAME

LOGPROB_TOL = 0.02
"""Mean |vLLM (bf16 internally) - transformers (fp32)| per sampled token, in nats (measured 0.002 at T=0.7; against
the trainer's temperature-1 log-probs, what the replicas returned before, 0.06)."""
TEMPERATURE = 0.7


def trainer_logprobs(model, samples, temperature: float) -> list[float]:
    """The trainer's log-probs of every sampled token: logits / temperature, as the policy workers compute them."""
    import torch

    from rlhf.algos import token_logprobs

    values = []
    with torch.no_grad():
        for sample in samples:
            sequence = torch.tensor([sample.prompt_token_ids + sample.token_ids])
            logits = model(sequence).logits[:, :-1].float() / temperature
            logprobs = token_logprobs(logits, sequence[:, 1:])[0]
            values += logprobs[len(sample.prompt_token_ids) - 1 :].tolist()
    return values


def test_at_temperature_0_7_the_replica_and_trainer_log_probs_agree(sft_policy: Path, rollout_app: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.rollout import RolloutClient

    client = RolloutClient("policy", app_name=APP_NAME)
    client.sync_weights(sft_policy)  # the same weights on both sides (other tests of the package pushed others)
    tokenizer = AutoTokenizer.from_pretrained(sft_policy)
    prompts = [tokenizer(text)["input_ids"] for text in ("Describe the cat.", "Tell me about the river.")]
    samples = client.generate(prompts, n=8, max_tokens=24, temperature=TEMPERATURE, seed=3)
    served = [lp for sample in samples for lp in sample.logprobs]
    model = AutoModelForCausalLM.from_pretrained(sft_policy, dtype=torch.float32).eval()
    at_temperature = trainer_logprobs(model, samples, TEMPERATURE)
    at_one = trainer_logprobs(model, samples, 1.0)

    def mean_gap(reference: list[float]) -> float:
        assert len(reference) == len(served) > 100
        return sum(abs(a - b) for a, b in zip(served, reference, strict=True)) / len(served)

    gap, gap_at_one = mean_gap(at_temperature), mean_gap(at_one)
    worst = max(abs(a - b) for a, b in zip(served, at_temperature, strict=True))
    print(
        f"\nT={TEMPERATURE}: |replica - trainer| mean {gap:.4f}, max {worst:.4f}; vs the trainer at T=1 {gap_at_one:.4f}"
    )
    assert gap < LOGPROB_TOL
    assert gap_at_one > 2 * LOGPROB_TOL  # what a temperature-1 replica would have been compared with
