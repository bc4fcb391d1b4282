"""The replicas' engine on a real pretrained model: right answers, log-probs that match the trainer's, and seeded
sampling that survives a step of many long prompts.

Before: the replicas ran vLLM's CPU defaults, a compiled engine in bfloat16. On SmolLM2 its greedy answer to
"What is the capital of France?" was "L'Étoile, la Marseillaise, ..." (the first token is a near-tie that
bfloat16 logits cannot rank; the trainer in float32 answers "The capital of France is Paris."), and a GRPO step
whose prompts passed the engine's token budget killed the engine ("CPU Generator does not use offset": vLLM rewinds
the generator of a seeded request whose prompt was split over steps, which only CUDA generators allow).
"""

from __future__ import annotations

from pathlib import Path

import pytest

QUESTIONS = [
    "What is the capital of France?",
    "What is 4 + 16?",
    "Name a colour of the sky.",
]
GAP_TOL = 1e-3  # float32 replica vs float32 transformers, per token (measured: about 1e-5)


@pytest.fixture(scope="module")
def hf(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    return tokenizer, model


def chat_ids(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_greedy_answers_are_transformers_own(smollm2_app: str, hf) -> None:
    import torch

    from serving.rollout import RolloutClient

    tokenizer, model = hf
    client = RolloutClient("policy", app_name=smollm2_app)
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    served = client.generate(prompts, max_tokens=12, temperature=0.0, timeout_s=300)
    for ids, sample in zip(prompts, served, strict=True):
        with torch.no_grad():
            reference = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :]
        expected = [t for t in reference.tolist() if t != tokenizer.eos_token_id]
        assert sample.token_ids[: len(expected)] == expected, (
            tokenizer.decode(sample.token_ids),
            tokenizer.decode(expected),
        )
    assert "Paris" in served[0].text


def test_replica_log_probs_equal_the_trainers_on_the_real_model(smollm2_app: str, hf) -> None:
    import torch

    from serving.rollout import RolloutClient

    tokenizer, model = hf
    client = RolloutClient("policy", app_name=smollm2_app)
    sequence = chat_ids(tokenizer, QUESTIONS[0]) + tokenizer("The capital of France is Paris.")["input_ids"]
    served = client.sequence_logprobs([sequence])[0]
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0, :-1].float()
    trainer = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sequence[1:]).unsqueeze(-1)).squeeze(-1)
    gaps = (torch.tensor(served) - trainer).abs()
    print(f"\nSmolLM2 replica vs transformers, {len(gaps)} tokens: max |gap| {gaps.max():.2e}, mean {gaps.mean():.2e}")
    assert float(gaps.max()) < GAP_TOL


def test_seeded_sampling_of_more_prompt_tokens_than_a_step_holds_keeps_the_engine_alive(smollm2_app: str, hf) -> None:
    """48 chat prompts of about 60 tokens (about 2,900 prompt tokens, over the 2,048 a step held), 2 seeded samples
    each: every sample comes back, and the same seed gives the same samples."""
    from serving.rollout import RolloutClient

    tokenizer, _ = hf
    client = RolloutClient("policy", app_name=smollm2_app)
    prompts = [chat_ids(tokenizer, f"What is {a} + {a + 7}? Answer with the number only.") for a in range(48)]
    assert sum(len(p) for p in prompts) > 2048
    first = client.generate(prompts, n=2, max_tokens=4, temperature=0.7, seed=11, timeout_s=600)
    again = client.generate(prompts, n=2, max_tokens=4, temperature=0.7, seed=11, timeout_s=600)
    assert len(first) == 96 and all(s.token_ids for s in first)
    assert [s.token_ids for s in first] == [s.token_ids for s in again]
