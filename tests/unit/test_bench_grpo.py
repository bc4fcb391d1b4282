"""The GRPO benchmark's pooling of repeated rounds into one row."""

from __future__ import annotations

from benchmarks.grpo import _figure, pooled


def run(step: float, tokens: float, generate: float, timed: float) -> dict[str, object]:
    return {
        "median_step_seconds": step,
        "tokens_per_second": tokens,
        "response_length": 60.0 if step < 2 else 62.0,
        "rewards": [step, -step],
        "stage_seconds": {"generate": generate, "sync": 1.0},
        "timed_seconds": timed,
    }


def test_rounds_pool_into_their_median_with_the_range_and_their_stages_added() -> None:
    rounds = [run(1.0, 300.0, 5.0, 12.0), run(3.0, 100.0, 7.0, 36.0), run(2.0, 200.0, 6.0, 24.0)]
    result = pooled(rounds)
    assert (result["median_step_seconds"], result["median_step_seconds_range"]) == (2.0, (1.0, 3.0))
    assert (result["tokens_per_second"], result["tokens_per_second_range"]) == (200.0, (100.0, 300.0))
    assert result["stage_seconds"] == {"generate": 18.0, "sync": 3.0}
    assert (result["timed_seconds"], result["rounds"], result["rewards"]) == (72.0, 3, [1.0, -1.0])
    assert abs(result["response_length"] - 184 / 3) < 1e-9
    assert _figure(result, "median_step_seconds", 1000) == "2,000 (1,000-3,000)"
    assert _figure(rounds[0], "median_step_seconds", 1000) == "1,000"  # one run: no range
