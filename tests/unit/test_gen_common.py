"""The pure parts of the generation commands: judged pairs, best-of-n selection, judge answers, eval scores."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster import configtree
from cluster.configtree import ConfigError
from rlhf.data.bundled import judge_case, positive_word_reward
from rlhf.gen.best_of_n import select
from rlhf.gen.common import Dropped, OutputExistsError, answer, deduplicate, preference_pairs, prepare_output
from rlhf.gen.config import BestOfNConfig, EvalConfig, FilterConfig, IterativeDPOConfig
from rlhf.gen.evaluate import _aggregate, row_scores
from rlhf.gen.iterative_dpo import check_config, draw
from rlhf.gen.judges import parse_choice, parse_score, request_text, two_order_outcome
from rlhf.gen.metrics import pairwise_agreement

LOOSE = FilterConfig(dedup_threshold=None, min_words=2)


def test_preference_pairs_take_the_best_and_worst_acceptable_samples():
    dropped = Dropped()
    samples = [["good one here", "bad one here", "ok", "fine one here"], ["a b c", "a b d"]]
    scores = [[0.5, -1.0, 9.0, None], [0.2, 0.2]]
    pairs = preference_pairs(["p1", "p2"], samples, scores, LOOSE, 0.0, dropped)
    # "ok" is too short (its 9.0 takes no part), the unscored sample is dropped, prompt 2 has no margin
    assert [(p.prompt_index, p.chosen, p.rejected, p.chosen_score, p.rejected_score) for p in pairs] == [
        (0, "good one here", "bad one here", 0.5, -1.0)
    ]
    assert dropped.reasons == {"sample too short": 1, "sample not scored": 1, "prompt with no score margin": 1}


def test_preference_pairs_respect_min_margin_and_need_two_samples():
    dropped = Dropped()
    pairs = preference_pairs(["p"], [["x y z", "u v w"]], [[1.0, 0.4]], LOOSE, 0.6, dropped)
    assert pairs == [] and dropped.reasons == {"prompt with no score margin": 1}
    pairs = preference_pairs(["p"], [["x y z", "u"]], [[1.0, 0.4]], LOOSE, 0.0, Dropped())
    assert pairs == []


def test_best_of_n_keeps_the_top_k_acceptable_samples_per_prompt():
    config = configtree.load(
        BestOfNConfig, None, ["sampling.n=4", "top_k=2", "filter.min_words=2", "filter.min_score=0"]
    )
    dropped = Dropped()
    kept = select(
        ["p1", "p2"],
        [["w x", "y z", "short", "u v"], ["a b", "c d", "e f", "g h"]],
        [[0.1, 0.9, 5.0, 0.5], [-1.0, -0.5, None, -2.0]],
        config,
        dropped,
    )
    assert kept == [(0, 1, 0.9), (0, 3, 0.5)]
    assert dropped.reasons == {"sample too short": 1, "sample score below min_score": 3, "sample not scored": 1}
    with pytest.raises(ConfigError, match="top_k must be between 1 and sampling.n=4"):
        configtree.load(BestOfNConfig, None, ["sampling.n=4", "top_k=5"])


def test_deduplicate_drops_later_near_copies_and_counts_them():
    dropped = Dropped()
    texts = ["the cat is kind and warm today", "a dog runs fast", "the cat is kind and warm today!"]
    assert deduplicate(texts, FilterConfig(dedup_threshold=0.8), dropped) == [0, 1]
    assert dropped.reasons == {"near duplicate": 1}
    assert deduplicate(texts, FilterConfig(dedup_threshold=None), Dropped()) == [0, 1, 2]


def test_a_judge_answer_is_parsed_or_counted_as_none():
    pattern = re.compile(r"(-?\d+(?:\.\d+)?)")
    assert parse_score(" 8/10, fine", pattern) == 8.0
    assert parse_score("I cannot rate this", pattern) is None
    assert parse_choice(" B.") == 0.0 and parse_choice("A") == 1.0 and parse_choice("neither") is None


def test_a_comparison_in_both_orders_cancels_position_bias():
    assert two_order_outcome(1.0, 0.0) == 1.0  # first wins as A and as B
    assert two_order_outcome(0.0, 1.0) == -1.0
    assert two_order_outcome(1.0, 1.0) == 0.0  # the judge always says A: a tie
    assert two_order_outcome(None, 1.0) is None


def test_request_text_of_a_conversation_is_its_last_user_turn():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "user", "content": "u2"},
    ]
    assert request_text(messages) == "u2" and request_text("plain") == "plain"
    assert answer(messages, "r") == [{"role": "assistant", "content": "r"}] and answer("p", "r") == "r"


def test_the_bundled_judge_case_is_ordered_by_its_oracle():
    rows = judge_case()
    assert len(rows) == 24
    for row in rows:
        assert sorted(row["oracle"]) == [-1.0, -1.0, 0.0, 1.0]
        assert row["oracle"] == [positive_word_reward(r) for r in row["responses"]]
    # agreement: 5 strictly ordered pairs per prompt; the oracle against itself agrees fully, reversed not at all
    assert pairwise_agreement(rows[0]["oracle"], rows[0]["oracle"]) == (1.0, 5)
    assert pairwise_agreement([-x for x in rows[0]["oracle"]], rows[0]["oracle"]) == (0.0, 5)
    assert pairwise_agreement([0, 0, 0, 0], rows[0]["oracle"]) == (0.5, 5)


def test_rounds_draw_fresh_prompts_and_refuse_unmergeable_lora():
    assert draw(100, 10, 1, 0) == draw(100, 10, 1, 0) != draw(100, 10, 2, 0)
    assert len(set(draw(100, 10, 1, 0))) == 10 and sorted(draw(5, 10, 1, 0)) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="dpo.model.lora.merge_on_save"):
        check_config(
            configtree.load(
                IterativeDPOConfig, None, ["dpo.model.lora.enabled=true", "dpo.model.lora.merge_on_save=false"]
            )
        )
    with pytest.raises(ConfigError, match="sampling.n must be at least 2"):
        configtree.load(IterativeDPOConfig, None, ["sampling.n=1"])


def test_eval_row_scores_and_their_aggregates():
    config = configtree.load(
        EvalConfig,
        None,
        [
            "metrics=[exact_match,token_f1,format,self_consistency]",
            r"answer_pattern=is (\w+)",
            r"format_regex=.*\.",
            "sampling.n=3",
        ],
    )
    scores = row_scores(["It is Paris.", "It is Rome", "It is paris!"], "paris", config, None)
    assert scores == {
        "exact_match": 1.0,
        "token_f1": 1.0,
        "format": 1.0,
        "self_consistency": 1.0,
        "self_consistency_agreement": pytest.approx(2 / 3),
    }
    wrong = row_scores(["It is Rome", "It is Paris", "It is Rome"], "paris", config, None)
    assert wrong["exact_match"] == 0.0 and wrong["format"] == 0.0 and wrong["self_consistency"] == 0.0
    report = _aggregate([scores, wrong], config.metrics)
    assert report["exact_match"]["value"] == 0.5 and report["exact_match"]["n"] == 2
    assert report["exact_match"]["low"] < 0.5 < report["exact_match"]["high"]  # Wilson interval of 1 of 2


def test_eval_config_refuses_metrics_it_cannot_compute():
    for overrides, message in [
        (["metrics=[bleu]"], "unknown"),
        (["metrics=[win_rate]"], "baseline"),
        (["metrics=[self_consistency]"], "sampling.n"),
        (["metrics=[format]"], "format_regex or format_schema"),
    ]:
        with pytest.raises(ConfigError, match=message):
            configtree.load(EvalConfig, None, overrides)


def test_an_output_that_holds_a_dataset_is_never_overwritten(tmp_path: Path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    with pytest.raises(OutputExistsError, match="nothing was overwritten"):
        prepare_output(tmp_path)
