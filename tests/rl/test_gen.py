"""The data-generation and evaluation commands end to end: the package's vLLM replica (reused, its weights
replaced by each command's model), a reward model trained by `rlhf rm`, DPO and SFT on Ray Train.

The toy world's signal: positive adjectives are good (:func:`rlhf.data.bundled.positive_word_reward`).
The SFT policy writes the response template with adjectives of random sentiment, so judging and
selecting by that signal has room to move it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster import configtree
from rlhf.data.bundled import positive_word_reward
from rlhf.gen.metrics import extract_answer, pairwise_outcome, token_f1
from rlhf.jobs.registry import EXAMPLES_DIR, JOBS

from .conftest import APP_NAME, MAX_MODEL_LEN

SAMPLING = [f"sampling.app_name={APP_NAME}", f"sampling.max_model_len={MAX_MODEL_LEN}", "sampling.max_new_tokens=16"]


def load(job: str, *overrides: str):
    return configtree.load(JOBS[job].config, JOBS[job].example, [*SAMPLING, *overrides])


def rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run(job: str, *overrides: str) -> dict:
    return JOBS[job].run(load(job, *overrides))


@pytest.fixture(scope="module")
def reward_model(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model trained by `rlhf rm` on the bundled preference pairs (100 steps, one worker)."""
    from rlhf.config import RMConfig
    from rlhf.jobs.rm import run as rm

    out = tmp_path_factory.mktemp("rm")
    config = configtree.load(
        RMConfig,
        EXAMPLES_DIR / "rm.yaml",
        [f"train.output_dir={out}", "train.max_steps=100", "cluster.num_workers=1", "data.eval_split=null"],
    )
    return Path(rm(config)["final_model"])


def test_generate_writes_a_dataset_that_sft_reads(sft_policy: Path, rollout_app: str, tmp_path: Path) -> None:
    from rlhf.config import SFTConfig
    from rlhf.data.encode import build_examples
    from rlhf.models.config import ModelConfig
    from rlhf.models.loading import load_tokenizer

    common = [f"model={sft_policy}", "data.max_rows=12", "sampling.n=3"]
    summary = run("generate", *common, f"output_dir={tmp_path / 'a'}")
    written = rows(summary["output"])
    assert summary["rows"] == len(written) == 36 and summary["generated_tokens"] > 0
    first = written[0]
    assert first["prompt"] == "Tell me about the mountain."  # bundled:prompts row 0, as it is (plain layout)
    assert [r["provenance"]["sample"] for r in written[:3]] == [0, 1, 2]
    assert first["provenance"]["source"] == {"path": "bundled:prompts", "split": "train", "row": 0}
    assert first["provenance"]["model"] == str(sft_policy) and first["provenance"]["finish_reason"] in (
        "stop",
        "length",
    )
    # the SFT policy writes the toy world's template, and `rlhf sft` reads the output as it is
    assert sum(r["completion"].strip().startswith("The ") for r in written) >= 30
    data = configtree.load(SFTConfig, None, [f"data.path={summary['output']}"]).data
    assert len(build_examples(data, load_tokenizer(ModelConfig(name_or_path=str(sft_policy))), "sft")) == 36
    # the same seed gives the same samples; an instruction template changes the prompt
    again = run("generate", *common, f"output_dir={tmp_path / 'b'}")
    assert [r["completion"] for r in rows(again["output"])] == [r["completion"] for r in written]
    chat = run("generate", *common, "template.layout=instruction", "sampling.n=1", f"output_dir={tmp_path / 'c'}")
    assert rows(chat["output"])[0]["prompt"].startswith("### Instruction:\nTell me about the mountain.")


def test_a_reward_model_judge_ranks_the_bundled_case_as_the_oracle_does(reward_model: Path) -> None:
    from rlhf.data.bundled import judge_case
    from rlhf.gen.config import JudgeConfig
    from rlhf.gen.judges import RewardJudge
    from rlhf.gen.metrics import pairwise_agreement

    case = judge_case()
    with RewardJudge(JudgeConfig(reward=str(reward_model), workers=2)) as judge:
        scores = judge.score(
            [r["prompt"] for r in case for _ in r["responses"]], [x for r in case for x in r["responses"]]
        )
    agreement = [pairwise_agreement(scores[4 * i : 4 * i + 4], r["oracle"]) for i, r in enumerate(case)]
    overall = sum(a * n for a, n in agreement) / sum(n for _, n in agreement)
    assert sum(n for _, n in agreement) == 24 * 5
    assert overall >= 0.9, f"the reward model agrees with the oracle on {overall:.2f} of the ordered pairs"


def test_synth_preference_pairs_from_a_reward_model_judge(
    sft_policy: Path, rollout_app: str, reward_model: Path, tmp_path: Path
) -> None:
    from rlhf.config import DPOConfig
    from rlhf.data.encode import build_examples
    from rlhf.models.config import ModelConfig
    from rlhf.models.loading import load_tokenizer

    summary = run(
        "synth",
        f"model={sft_policy}",
        f"judge.reward={reward_model}",
        "data.max_rows=32",
        f"output_dir={tmp_path}",
    )
    pairs = rows(summary["output"])
    assert len(pairs) >= 16, summary
    chosen = [positive_word_reward(p["chosen"]) for p in pairs]
    rejected = [positive_word_reward(p["rejected"]) for p in pairs]
    assert sum(chosen) / len(pairs) > sum(rejected) / len(pairs) + 0.5  # the judge picks the oracle's better one
    for pair in pairs:
        made = pair["provenance"]
        assert made["method"] == "preference" and made["judge"].startswith("ModelReward(")
        assert made["chosen_score"] > made["rejected_score"] and len(made["scores"]) == 4
        assert max(made["scores"]) == made["chosen_score"] and min(made["scores"]) == made["rejected_score"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["rows"] == len(pairs) and manifest["config"]["mode"] == "preference"
    data = configtree.load(DPOConfig, None, [f"data.path={summary['output']}", "data.eval_split=null"]).data
    assert len(build_examples(data, load_tokenizer(ModelConfig(name_or_path=str(sft_policy))), "preference")) == len(
        pairs
    )


@pytest.mark.parametrize("mode", ["self_instruct", "evol_instruct"])
def test_self_instruct_and_evol_instruct_account_for_every_instruction(
    sft_policy: Path, rollout_app: str, tmp_path: Path, mode: str
) -> None:
    summary = run(
        "synth",
        f"mode={mode}",
        f"model={sft_policy}",
        "data.max_rows=16",
        "num_instructions=16",
        "filter.min_words=3",
        f"output_dir={tmp_path}",
    )
    written = rows(summary["output"])
    log = rows(tmp_path / "instructions.jsonl")
    proposed = [entry for entry in log if "response" not in entry]
    answered = [entry for entry in log if "response" in entry]
    # every proposal has a fate; the kept ones were answered; the answers that passed are the rows
    assert len(proposed) == 16 and all(entry["method"] == mode for entry in proposed)
    assert len(answered) == sum(entry["fate"] == "kept" for entry in proposed)
    assert len(written) == sum(entry["fate"] == "response kept" for entry in answered)
    assert sum(summary["dropped"].values()) == 16 - len(written)
    for entry in proposed:
        if mode == "self_instruct":
            assert len(entry["seed_rows"]) == 3 and all(0 <= i < 16 for i in entry["seed_rows"])
        else:
            assert entry["operations"] == [["deepen", "concretise", "add_reasoning", "broaden"][entry["seed_row"] % 4]]
            assert entry["parent"] != entry["instruction"] or entry["fate"] != "kept"
    for row in written:
        assert row["provenance"]["method"] == mode and len(row["completion"].split()) >= 3


@pytest.fixture(scope="module")
def expert_iteration(
    sft_policy: Path, rollout_app: str, reward_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """One round of expert iteration: the best of 4 by the reward model, then SFT on the best."""
    out = tmp_path_factory.mktemp("best-of-n")
    return run(
        "best-of-n",
        f"model={sft_policy}",
        f"judge.reward={reward_model}",
        "sampling.n=4",
        "data.max_rows=128",
        "finetune=true",
        "sft.train.max_steps=32",
        "sft.train.num_epochs=1",
        "sft.cluster.num_workers=1",
        f"output_dir={out}",
    )


def test_best_of_n_keeps_the_reward_models_best_and_fine_tunes_on_them(expert_iteration: dict) -> None:
    summary = expert_iteration
    kept = rows(summary["output"])
    assert len(kept) >= 100 and summary["rows"] == len(kept)
    assert summary["mean_score_kept"] > summary["mean_score_all"]
    for row in kept:
        made = row["provenance"]
        assert made["n"] == 4 and len(made["scores"]) == 4
        # rank among all 4 scores: a better-scored sample may have failed the quality rules (empty, too short)
        assert made["score"] == sorted(made["scores"], reverse=True)[made["rank"] - 1]
    assert sum(r["provenance"]["rank"] == 1 for r in kept) >= 0.9 * len(kept)
    assert all(r["provenance"]["judge"].startswith("ModelReward(") for r in kept)
    # the reward model's choice is the rule's: the SFT policy's samples score about 0 on average (-0.02 measured)
    assert sum(positive_word_reward(r["completion"]) for r in kept) / len(kept) > 0.4
    assert Path(summary["sft"]["final_model"], "config.json").is_file()


def test_eval_reports_every_metric_and_the_expert_iteration_model_wins(
    expert_iteration: dict, sft_policy: Path, rollout_app: str, tmp_path: Path
) -> None:
    model = expert_iteration["sft"]["final_model"]
    report = run(
        "eval",
        f"model={model}",
        f"baseline={sft_policy}",
        "metrics=[exact_match,token_f1,format,reward,self_consistency,win_rate]",
        r"answer_pattern=is (\w+)",
        "sampling.n=3",
        "sampling.temperature=1.0",
        f"output_dir={tmp_path}",
    )
    metrics = report["metrics"]
    assert set(metrics) == {
        "exact_match",
        "token_f1",
        "format",
        "reward",
        "self_consistency",
        "self_consistency_agreement",
        "win_rate",
    }
    assert all(m["n"] == 64 for m in metrics.values())
    samples = rows(tmp_path / "samples.jsonl")
    assert all(len(s["samples"]) == 3 and s["baseline"] for s in samples)
    # the report's figures are the samples' scores: recompute them independently
    firsts = [s["samples"][0] for s in samples]
    assert metrics["reward"]["value"] == pytest.approx(sum(map(positive_word_reward, firsts)) / 64)
    f1 = [token_f1(extract_answer(s["samples"][0], r"is (\w+)"), s["reference"]) for s in samples]
    assert metrics["token_f1"]["value"] == pytest.approx(sum(f1) / 64)
    wins = [
        pairwise_outcome(positive_word_reward(f), positive_word_reward(s["baseline"]))
        for f, s in zip(firsts, samples, strict=True)
    ]
    assert metrics["win_rate"]["value"] == pytest.approx(sum(wins) / 64)
    assert metrics["format"]["value"] >= 0.6  # the toy template (measured: 0.72; the untrained model: 0)
    # one round of expert iteration (selected by the reward model) moved the model towards the rule's preference
    assert metrics["win_rate"]["value"] > 0.6, metrics["win_rate"]
    assert metrics["format"]["low"] <= metrics["format"]["value"] <= metrics["format"]["high"]
    assert (tmp_path / "report.md").read_text().count("\n| ") == 8
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_round_of_iterative_dpo_raises_the_judged_win_rate_against_the_start(
    sft_policy: Path, rollout_app: str, tmp_path: Path
) -> None:
    summary = run(
        "iterative-dpo",
        f"model={sft_policy}",
        "rounds=1",
        "prompts_per_round=96",
        "dpo.train.max_steps=32",
        "dpo.cluster.num_workers=1",
        f"output_dir={tmp_path}",
    )
    (round_one,) = summary["rounds"]
    assert round_one["pairs"] >= 48 and round_one["judged"] == 64
    assert round_one["win_rate"] > 0.6, round_one
    pairs = rows(tmp_path / "round-1" / "data.jsonl")
    assert all(p["provenance"]["round"] == 1 and p["provenance"]["model"] == str(sft_policy) for p in pairs)
    assert Path(summary["final_model"], "config.json").is_file() and (tmp_path / "win_rate.png").is_file()


def test_an_llm_judge_runs_on_its_own_replica_and_counts_answers_without_a_score(
    sft_policy: Path, rollout_app: str, tmp_path: Path
) -> None:
    summary = run(
        "synth",
        f"model={sft_policy}",
        "judge.kind=llm",
        "data.max_rows=8",
        "sampling.n=2",
        f"output_dir={tmp_path}",
    )
    # the toy policy, asked to rate, writes its template instead of a number: every sample is unscored and
    # so no pair is made -- nothing is guessed
    assert summary["rows"] == 0
    assert summary["dropped"] == {"sample not scored": 16, "prompt with fewer than 2 acceptable samples": 8}
