"""What PPO hands its reward: the prompt as the data holds it, so a reward model scores the tokens it was trained on.

Before: ``rlhf ppo`` passed each sample's ``prompt_text`` (the policy's chat-template rendering of a conversation)
to the reward, in training and in its held-out evaluation. A reward model trained by ``rlhf rm`` on chat pairs then
scored the plain-text encoding of that string plus the response and EOS, a different token sequence from the
rendered conversation it was trained on (training ends ``<|im_end|>`` then a newline; scoring ended at
``<|im_end|>``), and function or HTTP rewards got a string where the reward module promises a message list.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.data.config import DataConfig
from rlhf.data.encode import build_examples
from rlhf.rl.stages import reward_inputs
from serving.rollout import Sample


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model in the layout `rlhf rm` writes: the tiny model with a one-output scalar head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    directory = tmp_path_factory.mktemp("rm") / "final"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


def test_the_reward_model_scores_in_ppo_the_ids_rm_trained_on(reward_model_dir: Path) -> None:
    from rlhf.data.loading import load_rows
    from rlhf.rl.rewards import ModelReward

    reward = ModelReward(reward_model_dir)
    data = DataConfig(path="bundled:preference_chat", max_rows=8)
    prompts = build_examples(data, reward.tokenizer, "prompt")  # what rlhf ppo encodes (its policy is this model)
    pairs = build_examples(data, reward.tokenizer, "preference")  # what rlhf rm trains on
    rows, _ = load_rows("bundled:preference_chat", "train")
    samples = [
        Sample(i, 0, prompts[i]["prompt_ids"], [], [], "stop", rows[i]["chosen"][0]["content"]) for i in range(8)
    ]

    texts, responses, _columns = reward_inputs(samples, prompts)
    assert all(isinstance(text, list) for text in texts)  # the conversation itself, for every kind of reward
    for i, (prompt, response) in enumerate(zip(texts, responses, strict=True)):
        assert reward.encode(prompt, response) == pairs[i]["chosen_input_ids"], f"row {i}"
    # the rendering the old code passed encodes to other ids (the newline after <|im_end|> is missing)
    old = reward.encode(prompts[0]["prompt_text"], responses[0])
    assert old != pairs[0]["chosen_input_ids"]
    assert reward.tokenizer.decode(pairs[0]["chosen_input_ids"]).endswith("<|im_end|>\n")


def reward_of_a_conversation(prompt: object, response: str) -> float:
    """A reward function written for a chat dataset: it reads the user's last turn."""
    if not isinstance(prompt, list):
        raise TypeError(f"expected the conversation's messages, got {type(prompt).__name__}")
    return float(len(prompt[-1]["content"]) > 0)


def test_the_reward_check_before_a_run_scores_a_prompt_of_the_data(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Before: the check that builds the reward before a run scored the string "Describe the cat." whatever the
    data held, so a reward function written for a chat dataset's messages failed it and the run could not start."""
    from cluster import configtree
    from rlhf.jobs.registry import EXAMPLES_DIR
    from rlhf.jobs.rundir import unlock_run_directory
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.preflight import prepare

    overrides = [
        f"policy.name_or_path={tiny_model_dir}",
        f"train.output_dir={tmp_path}",
        "data.path=bundled:preference_chat",
        "data.eval_split=null",
        f"reward={__name__}:reward_of_a_conversation",
    ]
    prepared = prepare(configtree.load(PPOConfig, EXAMPLES_DIR / "ppo.yaml", overrides))
    unlock_run_directory(tmp_path)
    assert isinstance(prepared.prompts[0]["prompt"], list)
    assert "reward_of_a_conversation" in prepared.reward
