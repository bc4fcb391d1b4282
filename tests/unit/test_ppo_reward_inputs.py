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
from rlhf.jobs.ppo import reward_inputs
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

    texts, responses = reward_inputs(samples, prompts)
    assert all(isinstance(text, list) for text in texts)  # the conversation itself, for every kind of reward
    for i, (prompt, response) in enumerate(zip(texts, responses, strict=True)):
        assert reward.encode(prompt, response) == pairs[i]["chosen_input_ids"], f"row {i}"
    # the rendering the old code passed encodes to other ids (the newline after <|im_end|> is missing)
    old = reward.encode(prompts[0]["prompt_text"], responses[0])
    assert old != pairs[0]["chosen_input_ids"]
    assert reward.tokenizer.decode(pairs[0]["chosen_input_ids"]).endswith("<|im_end|>\n")
