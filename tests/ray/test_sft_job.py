"""``rlhf sft`` as a Ray Train job on an embedded local cluster: 2 workers, ZeRO-2, gloo.

One run is shared by the module; each test reads a different part of its outputs.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from cluster import configtree
from rlhf.config import SFTConfig
from rlhf.jobs.registry import EXAMPLES_DIR

STEPS = 20


@pytest.fixture(scope="module")
def sft_run(ray_cluster, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    from rlhf.jobs import sft

    out = tmp_path_factory.mktemp("sft") / "run"
    config = configtree.load(
        SFTConfig,
        EXAMPLES_DIR / "sft.yaml",
        [f"model.name_or_path={tiny_model_dir}", f"train.output_dir={out}", f"train.max_steps={STEPS}"],
    )
    return sft.run(config), out


def test_loss_falls_on_held_out_data(sft_run: tuple[dict, Path]) -> None:
    summary, _ = sft_run
    assert summary["steps"] == STEPS
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 2.0, summary
    assert summary["last_loss"] < summary["first_loss"] - 2.0, summary
    assert summary["eval_perplexity_after"] < summary["eval_perplexity_before"] / 5, summary


def test_metrics_jsonl_has_every_step_once(sft_run: tuple[dict, Path]) -> None:
    _, out = sft_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))
    first = next(r for r in records if r["kind"] == "train")
    assert {"loss", "items", "grad_norm", "lr", "items_per_second"} <= first.keys()
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, STEPS]
    assert (out / "config.yaml").is_file()


def test_final_model_loads_in_transformers_and_answers_in_the_template(sft_run: tuple[dict, Path]) -> None:
    from rlhf.demo import sample

    summary, _ = sft_run
    answer = sample(summary["final_model"], "Describe the cat.")
    # the response template "The <thing> is <adjective> and <adjective>." after 20 steps
    assert re.match(r"^The\b.*\bis\b.*\band\b", answer), answer


def test_bad_data_is_refused_before_any_worker_starts(tiny_model_dir: Path, tmp_path: Path) -> None:
    import ray

    from rlhf.data.errors import DataError
    from rlhf.jobs import sft

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    config = configtree.load(
        SFTConfig,
        None,
        [f"model.name_or_path={tiny_model_dir}", f"data.path={bad}", f"train.output_dir={tmp_path / 'o'}"],
    )
    started = ray.is_initialized()
    with pytest.raises(DataError, match=r"bad.jsonl line 2"):
        sft.run(config)
    assert ray.is_initialized() == started  # no cluster was started for it


def test_unwritable_output_dir_is_refused_before_any_worker_starts(tiny_model_dir: Path, tmp_path: Path) -> None:
    from rlhf.jobs import sft
    from rlhf.jobs.runner import JobError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = configtree.load(
        SFTConfig, None, [f"model.name_or_path={tiny_model_dir}", f"train.output_dir={blocker / 'run'}"]
    )
    with pytest.raises(JobError, match="train.output_dir .* is not writable"):
        sft.run(config)


def test_tensorboard_and_png_curves_are_written(sft_run: tuple[dict, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = sft_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == STEPS
    assert [e.step for e in events.Scalars("eval/eval_perplexity")] == [0, STEPS]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- a run directory in a bucket keeps no credential (the bucket is moto's S3 server on 127.0.0.1) ----------

KEY_ID, SECRET = "AKIDc0ffee5", "S3CRET-d1e2f3"


def test_a_run_in_a_bucket_keeps_its_credentials_out_of_every_file_and_log(
    ray_cluster, tiny_model_dir: Path, s3_bucket, capfd: pytest.CaptureFixture
) -> None:
    """Before: config.yaml (staged, then uploaded to the bucket) held the output URI with its key and secret."""
    import pyarrow.fs
    import ray

    from rlhf.jobs import sft
    from rlhf.jobs.storage import RunStorage

    query, fs = s3_bucket
    uri = f"s3://{KEY_ID}:{SECRET}@runs/secret-scan?{query}"
    overrides = [f"model.name_or_path={tiny_model_dir}", "train.max_steps=2", "data.eval_split=null"]
    config = configtree.load(SFTConfig, EXAMPLES_DIR / "sft.yaml", [*overrides, "cluster.num_workers=1"])
    config = replace(config, train=replace(config.train, output_dir=uri))  # no override parsing of the URI
    summary = sft.run(config)

    files = fs.get_file_info(pyarrow.fs.FileSelector("runs/secret-scan", recursive=True))
    texts = {}
    for info in files:
        if info.type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(info.path) as stream:
                texts[f"bucket {info.path}"] = stream.read()
    assert "runs/secret-scan/config.yaml" in {info.path for info in files}
    staging = RunStorage(uri).staging
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # the workers' logs
    texts |= {str(path): path.read_bytes() for path in [*staging.rglob("*"), *logs.rglob("*")] if path.is_file()}
    texts["the driver's output and summary"] = ("".join(capfd.readouterr()) + json.dumps(summary)).encode()
    leaks = [name for name, data in texts.items() if KEY_ID.encode() in data or SECRET.encode() in data]
    assert not leaks, leaks
