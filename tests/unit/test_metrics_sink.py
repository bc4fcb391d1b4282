"""The metrics sink between the Ray Train workers and the driver: records numbered, writes acknowledged."""

from __future__ import annotations

from rlhf.jobs.progress import MetricsSink


def test_records_are_numbered_and_the_driver_says_how_many_it_wrote() -> None:
    sink = MetricsSink()
    assert [sink.put({"kind": "train", "step": step}) for step in (1, 2, 3)] == [1, 2, 3]
    assert sink.written() == 0  # nothing on disk yet: a checkpoint after step 3 would wait
    assert [r["step"] for r in sink.drain()] == [1, 2, 3]
    assert sink.drain() == []
    assert sink.written(3) == 3
    assert sink.put({"kind": "train", "step": 4}) == 4
    assert sink.written() == 3
