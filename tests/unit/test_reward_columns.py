"""Rewards that see the data: a prompt row's other columns reach function and HTTP rewards, and several rewards
sum with weights, each logged by name."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import configtree
from rlhf.data.config import DataConfig
from rlhf.data.encode import build_examples
from rlhf.rl.config import PPOConfig, reward_terms
from rlhf.rl.preflight import check_reward
from rlhf.rl.rewards import RewardError, WeightedReward, make_reward, make_weighted
from rlhf.rl.roles import gather_scores
from rlhf.rl.stages import reward_inputs
from serving.rollout import Sample

PROMPTS = ["What is 2 + 3?", "What is 7 - 4?", "What is 6 * 2?"]
RESPONSES = ["5", "The answer is 3.", "13"]
ANSWERS = ["5", "3", "12"]

TASK_REWARDS = """
def exact(response, answer):
    return float(response.strip() == answer)

def contains(prompt, response, answer, weight=1.0):
    assert prompt.startswith("What is")
    return weight * float(answer in response)

def legacy_with_metadata(prompt, response, metadata=None):
    return float(metadata["level"]) if metadata else -1.0

def batched(prompts, responses, answer):
    return [float(r.strip() == a) for r, a in zip(responses, answer)]

def everything(prompts, responses, **kwargs):
    return [float(len(kwargs)) for _ in responses]

def kwargs_per_row(response, **kwargs):
    return float(sorted(kwargs) == ["answer", "metadata"])
"""


@pytest.fixture(scope="module")
def task_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("task_code")
    (directory / "task_rewards.py").write_text(TASK_REWARDS)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(directory))
        yield "task_rewards"
    sys.modules.pop("task_rewards", None)


COLUMNS = {"answer": ANSWERS, "metadata": [{"level": 1}, {"level": 2}, {"level": 3}]}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("exact", [1.0, 0.0, 0.0]),  # by keyword: response and the column it names
        ("contains", [1.0, 1.0, 0.0]),  # prompt, response and a column; an unfilled default stays
        ("legacy_with_metadata", [1.0, 2.0, 3.0]),  # (prompt, response) with an optional column
        ("batched", [1.0, 0.0, 0.0]),  # a batch gets the column as a list aligned with the responses
        ("everything", [2.0, 2.0, 2.0]),  # **kwargs gets every column
        ("kwargs_per_row", [1.0, 1.0, 1.0]),
    ],
)
def test_function_rewards_get_the_columns_they_name(task_module: str, name: str, expected: list[float]) -> None:
    source = make_reward(f"{task_module}:{name}")
    assert source.score(PROMPTS, RESPONSES, 5.0, COLUMNS) == expected


def test_a_column_the_function_needs_and_the_data_lacks_is_named(task_module: str) -> None:
    for name in ("exact", "batched"):
        with pytest.raises(RewardError, match=r"needs the data column\(s\) answer; the prompt data has: metadata"):
            make_reward(f"{task_module}:{name}").score(PROMPTS, RESPONSES, 5.0, {"metadata": COLUMNS["metadata"]})


def test_a_column_of_the_wrong_length_is_refused(task_module: str) -> None:
    with pytest.raises(RewardError, match="column 'answer' has 2 values for 3 responses"):
        make_reward(f"{task_module}:exact").score(PROMPTS, RESPONSES, 5.0, {"answer": ANSWERS[:2]})


def test_an_http_reward_gets_the_columns_in_its_request_body() -> None:
    import threading

    from tests.unit.test_rewards import QuietServer, RewardHandler

    server = QuietServer(("127.0.0.1", 0), RewardHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        source = make_reward(f"http://127.0.0.1:{server.server_address[1]}/reward")
        import numpy as np

        columns = {"answer": ANSWERS, "level": list(np.array([1, 2, 3]))}  # numpy values, as datasets give them
        assert source.score(PROMPTS, RESPONSES, 5.0, columns) == [float(len(r)) for r in RESPONSES]
        source.close()
    finally:
        server.shutdown()
        server.server_close()
    assert server.requests[-1] == {
        "prompts": PROMPTS,
        "responses": RESPONSES,
        "columns": {"answer": ANSWERS, "level": [1, 2, 3]},
    }


def test_prompt_rows_keep_their_other_columns_for_the_reward(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = tmp_path / "task.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": p}], "answer": a, "metadata": {"id": i}}
        for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS, strict=True))
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    examples = build_examples(DataConfig(path=str(path)), AutoTokenizer.from_pretrained(tiny_model_dir), "prompt")
    assert [e["columns"] for e in examples] == [{"answer": r["answer"], "metadata": r["metadata"]} for r in rows]
    samples = [Sample(i % 3, 0, examples[i % 3]["prompt_ids"], [], [], "stop", f"r{i}") for i in range(6)]
    prompts, responses, columns = reward_inputs(samples, examples)
    assert prompts[3] == examples[0]["prompt"] and responses == [f"r{i}" for i in range(6)]
    assert columns == {"answer": ANSWERS * 2, "metadata": [{"id": i % 3} for i in range(6)]}


def test_the_check_before_a_run_names_a_column_the_reward_needs(task_module: str, tiny_model_dir: Path) -> None:
    config = configtree.load(PPOConfig, None, [f"reward={task_module}:exact"])
    row = {"prompt": "What is 2 + 3?", "columns": {"solution": "5"}}
    with pytest.raises(RewardError, match=r"config key 'reward': .*needs the data column\(s\) answer; .* solution"):
        check_reward(config, row)
    assert "exact" in check_reward(config, {"prompt": "What is 2 + 3?", "columns": {"answer": "5"}})


def test_weighted_rewards_sum_their_components_and_keep_each(task_module: str) -> None:
    config = configtree.load(
        PPOConfig,
        None,
        [
            f"rewards=[{{source: '{task_module}:exact', weight: 2.0}}, "
            f"{{source: '{task_module}:legacy_with_metadata', weight: 0.5, name: level}}]"
        ],
    )
    terms = reward_terms(config)
    assert [(t["name"], t["weight"]) for t in terms] == [("exact", 2.0), ("level", 0.5)]
    source = make_weighted(terms)
    assert isinstance(source, WeightedReward)
    totals, parts = source.score_parts(PROMPTS, RESPONSES, 5.0, COLUMNS)
    assert parts == {"exact": [1.0, 0.0, 0.0], "level": [1.0, 2.0, 3.0]}
    assert totals == [2.5, 1.0, 1.5]
    # two ranks' parts gather in order, per component
    scores, components = gather_scores(
        [(totals[:2], {k: v[:2] for k, v in parts.items()}), (totals[2:], {k: v[2:] for k, v in parts.items()})]
    )
    assert scores.tolist() == totals and {k: v.tolist() for k, v in components.items()} == parts
    assert "2 * FunctionReward" in check_reward(
        config, {"prompt": PROMPTS[0], "columns": {"answer": "5", "metadata": None}}
    )


def test_reward_and_rewards_together_are_refused() -> None:
    with pytest.raises(configtree.ConfigError, match="'reward' and 'rewards' are both set"):
        configtree.load(PPOConfig, None, ["reward=a.b:c", "rewards=[{source: 'a.b:d'}]"])


def test_the_same_source_twice_gets_two_names() -> None:
    config = configtree.load(PPOConfig, None, ["rewards=[{source: 'm.x:f'}, {source: 'n.y:f', weight: 3}]"])
    assert [t["name"] for t in reward_terms(config)] == ["f_0", "f_1"]
