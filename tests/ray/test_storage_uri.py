"""A job whose ``train.output_dir`` is an object-store URI: checkpoints, metrics and the final
model land in the bucket, and a re-run finds its checkpoints there.

The bucket is a real S3 endpoint on 127.0.0.1 (moto's server); Ray Train and the project
reach it through pyarrow exactly as they would reach AWS S3 or GCS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster import configtree
from rlhf.config import SFTConfig
from rlhf.jobs.registry import EXAMPLES_DIR
from rlhf.jobs.runner import JobError

STEPS = 4


@pytest.fixture(scope="module")
def bucket_uri(s3_bucket):
    query, fs = s3_bucket
    return lambda path: f"s3://key:secret@runs/{path}?{query}", fs


def _config(model_dir: Path, output_dir: str, *overrides: str) -> SFTConfig:
    return configtree.load(
        SFTConfig,
        EXAMPLES_DIR / "sft.yaml",
        [
            f"model.name_or_path={model_dir}",
            f"train.output_dir={output_dir}",
            f"train.max_steps={STEPS}",
            "train.save_every=2",
            "train.eval_every=100",
            *overrides,
        ],
    )


def test_sft_writes_checkpoints_metrics_and_model_to_the_bucket(
    ray_cluster, tiny_model_dir: Path, tmp_path: Path, bucket_uri
) -> None:
    import pyarrow.fs
    from transformers import AutoModelForCausalLM

    from rlhf.jobs import sft

    uri, fs = bucket_uri
    summary = sft.run(_config(tiny_model_dir, uri("sft")))
    assert summary["steps"] == STEPS
    assert "secret" not in json.dumps(summary), "credentials leaked into the summary"

    names = {i.path for i in fs.get_file_info(pyarrow.fs.FileSelector("runs/sft", recursive=True))}
    assert "runs/sft/final/model.safetensors" in names
    assert "runs/sft/ray/sft/checkpoint_00000004/progress.json" in names
    with fs.open_input_stream("runs/sft/metrics.jsonl") as stream:
        records = [json.loads(line) for line in stream.read().decode().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))

    local = tmp_path / "final"
    local.mkdir()
    pyarrow.fs.copy_files("runs/sft/final", str(local), source_filesystem=fs)
    model = AutoModelForCausalLM.from_pretrained(local)
    assert model.config.num_hidden_layers == 2

    # the checkpoints in the bucket are found again: the finished run is not silently redone
    with pytest.raises(JobError, match="already holds a run trained for 4 steps of 4"):
        sft.run(_config(tiny_model_dir, uri("sft")))


def test_a_missing_bucket_is_refused_before_any_worker_starts(ray_cluster, tiny_model_dir: Path, bucket_uri) -> None:
    from rlhf.jobs import sft

    uri, _ = bucket_uri
    missing = uri("x").replace("@runs/", "@no-such-bucket/")
    with pytest.raises(JobError, match=r"train.output_dir 's3://no-such-bucket/x' is not writable"):
        sft.run(_config(tiny_model_dir, missing))
