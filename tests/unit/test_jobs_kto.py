"""KTO's mismatched pairs (the KL reference point's data) and its objective on the tiny model, without Ray."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rlhf.config import PreferenceLossConfig
from rlhf.data.config import DataConfig
from rlhf.data.encode import build_examples
from rlhf.jobs.kto import UnpairedObjective, kl_partners, mismatched_example, prompt_length, with_mismatched_pairs
from rlhf.models.config import ModelConfig
from rlhf.models.loading import load_tokenizer

X = -100


@pytest.mark.parametrize(
    ("prompts", "partners"),
    [
        ("abc", [1, 2, 0]),  # a rotation by one when every prompt differs
        ("aabbc", [2, 2, 4, 4, 0]),  # a run of equal prompts skips to the next prompt
        ("aba", [1, 2, 1]),  # cyclic: the last a skips the first a
        ("abb", [1, 0, 0]),
        ("aaa", [1, 2, 0]),  # nothing to mismatch with: the next example
        ("a", [0]),
        ("", []),
    ],
)
def test_kl_partners_hand_computed(prompts: str, partners: list[int]) -> None:
    assert kl_partners(list(prompts)) == partners


def test_kl_partners_never_pair_an_example_with_its_own_prompt() -> None:
    rng = random.Random(0)
    for _ in range(200):
        prompts = [rng.choice("abc") for _ in range(rng.randint(1, 12))]
        partners = kl_partners(prompts)
        for i, j in enumerate(partners):
            if len(set(prompts)) > 1:
                assert prompts[j] != prompts[i], (prompts, partners)
                # the nearest such example after i
                assert all(prompts[(i + k) % len(prompts)] == prompts[i] for k in range(1, (j - i) % len(prompts)))


def test_mismatched_example_splices_prompt_and_completion_with_their_labels() -> None:
    prompt_of = {"input_ids": [1, 2, 3, 4, 5], "labels": [X, X, X, 4, 5]}
    completion_of = {"input_ids": [6, 7, 8, 9, 10], "labels": [X, 7, 8, 9, X]}  # -100 after EOS stays -100
    assert prompt_length(prompt_of["labels"]) == 3
    assert mismatched_example(prompt_of, completion_of) == {
        "input_ids": [1, 2, 3, 7, 8, 9, 10],
        "labels": [X, X, X, 7, 8, 9, X],
    }
    assert mismatched_example(prompt_of, completion_of, max_length=4) == {
        "input_ids": [1, 2, 3, 7],
        "labels": [X, X, X, 7],
    }


@pytest.fixture(scope="module")
def model_config(tiny_model_dir: Path) -> ModelConfig:
    return ModelConfig(name_or_path=str(tiny_model_dir))


@pytest.fixture(scope="module")
def tokenizer(model_config: ModelConfig):
    return load_tokenizer(model_config)


@pytest.mark.parametrize("path", ["bundled:preference", "bundled:preference_chat"])
def test_mismatched_pairs_of_real_rows_are_another_rows_answer_to_this_prompt(tokenizer, path: str) -> None:
    """Pairs split into two rows share a prompt; their mismatched completions come from the next pair."""
    examples = build_examples(DataConfig(path=path, max_rows=6), tokenizer, "unpaired")
    prepared = with_mismatched_pairs(examples)
    for i, example in enumerate(prepared):
        partner = examples[2 * (i // 2 + 1) % len(examples)]  # the chosen row of the next pair
        split, partner_split = prompt_length(example["labels"]), prompt_length(partner["labels"])
        assert example["kl_input_ids"] == example["input_ids"][:split] + partner["input_ids"][partner_split:]
        assert [t for t in example["kl_labels"] if t != X] == [t for t in partner["labels"] if t != X]
        assert tokenizer.decode(example["kl_input_ids"]) == tokenizer.decode(
            example["input_ids"][:split]
        ) + tokenizer.decode(partner["input_ids"][partner_split:])


def _objective(model_config: ModelConfig, tokenizer, reference: str) -> UnpairedObjective:
    preference = PreferenceLossConfig(
        loss="kto", beta=0.5, desirable_weight=1.5, undesirable_weight=0.5, reference=reference
    )
    return UnpairedObjective(model_config, preference, tokenizer.pad_token_id, max_length=64)


def test_at_the_start_the_policy_is_its_reference(model_config: ModelConfig, tokenizer) -> None:
    """Rewards and z0 are 0, so each completion's loss is w * (1 - sigma(0)) = w / 2."""
    examples = build_examples(DataConfig(path="bundled:unpaired", max_rows=8), tokenizer, "unpaired")
    objective = _objective(model_config, tokenizer, "precomputed")
    model = objective.build_model()
    batch = objective.collate(objective.prepare(model, examples))
    loss, metrics = objective.loss(model, batch, denominator=8.0)
    desirable = sum(e["label"] for e in examples)
    expected = (1.5 * desirable + 0.5 * (8 - desirable)) / 2 / 8
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["kl"].item() == 0.0
    assert metrics["rewards/margin"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["desirable_fraction"].item() == desirable / 8


def test_precomputed_reference_equals_live_reference(model_config: ModelConfig, tokenizer) -> None:
    """After a step away from the reference, precomputed and live reference log-probs give the same loss and z0."""
    examples = build_examples(DataConfig(path="bundled:unpaired", max_rows=8), tokenizer, "unpaired")
    precomputed = _objective(model_config, tokenizer, "precomputed")
    live = _objective(model_config, tokenizer, "live")
    model = precomputed.build_model()
    live.build_model()
    batches = {"precomputed": precomputed.collate(precomputed.prepare(model, examples))}
    batches["live"] = live.collate(live.prepare(model, examples))
    assert "reference_logps" not in batches["live"]
    loss, _ = precomputed.loss(model, batches["precomputed"], 8.0)
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            param -= 0.05 * param.grad.sign()
    p_loss, p_metrics = precomputed.loss(model, batches["precomputed"], 8.0)
    l_loss, l_metrics = live.loss(model, batches["live"], 8.0)
    assert p_metrics["kl"].item() > 0  # the step moved the policy: z0 is a real estimate
    torch.testing.assert_close(p_loss, l_loss, atol=1e-5, rtol=1e-5)
    for name in ("kl", "rewards/chosen", "rewards/rejected"):
        torch.testing.assert_close(p_metrics[name], l_metrics[name], atol=1e-5, rtol=1e-5)


def test_reference_point_is_the_mean_log_ratio_of_the_mismatched_pairs(model_config: ModelConfig, tokenizer) -> None:
    examples = build_examples(DataConfig(path="bundled:unpaired", max_rows=4), tokenizer, "unpaired")
    objective = _objective(model_config, tokenizer, "precomputed")
    model = objective.build_model()
    batch = objective.collate(objective.prepare(model, examples))
    shift = torch.tensor([1.0, -0.5, 2.0, 0.3])
    z0 = objective.kl_reference_point(model, batch, batch["kl_reference_logps"] - shift)
    assert z0.item() == pytest.approx(shift.mean().item(), abs=1e-5)
    assert not z0.requires_grad


def test_derived_eval_metrics_are_exact_class_means() -> None:
    """Two batches: [desirable 1.0, undesirable -1.0] and [desirable 3.0, desirable 2.0, undesirable 0.0]."""
    objective = UnpairedObjective(ModelConfig(), PreferenceLossConfig(loss="kto"), pad_token_id=0)
    # the loop's aggregate: sum over batches of (per-batch mean x count) / total count
    chosen_total = ((1.0 + 0.0) / 2 * 2 + (3.0 + 2.0 + 0.0) / 3 * 3) / 5
    rejected_total = ((-1.0) / 2 * 2 + 0.0 / 3 * 3) / 5
    fraction = (1 / 2 * 2 + 2 / 3 * 3) / 5
    derived = objective.derived_eval_metrics(
        {
            "eval_rewards/chosen_total": chosen_total,
            "eval_rewards/rejected_total": rejected_total,
            "eval_desirable_fraction": fraction,
        }
    )
    assert derived["eval_rewards/chosen"] == pytest.approx(2.0)
    assert derived["eval_rewards/rejected"] == pytest.approx(-0.5)
    assert derived["eval_rewards/margin"] == pytest.approx(2.5)


def test_kto_objective_refuses_another_loss(model_config: ModelConfig) -> None:
    with pytest.raises(ValueError, match="PreferenceObjective"):
        UnpairedObjective(model_config, PreferenceLossConfig(loss="dpo"), pad_token_id=0)
