"""Output locations: local paths and storage URIs (pure parts; the bucket round trip is in tests/ray)."""

from __future__ import annotations

from pathlib import Path

from rlhf.jobs.storage import RunStorage, is_uri, redact


def test_uris_keep_their_query_on_every_child() -> None:
    storage = RunStorage("s3://k:s@bucket/runs/sft?endpoint_override=127.0.0.1:9000&scheme=http")
    assert storage.remote
    assert storage.child("ray") == "s3://k:s@bucket/runs/sft/ray?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.child("ray", "sft", "x.json").startswith("s3://k:s@bucket/runs/sft/ray/sft/x.json?")
    assert str(storage) == "s3://bucket/runs/sft"


def test_paths_resolve_and_file_uris_are_paths(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert RunStorage("runs/sft").location == str(tmp_path / "runs" / "sft")
    assert not RunStorage(f"file://{tmp_path}/a").remote
    assert RunStorage(f"file://{tmp_path}/a").child("final") == str(tmp_path / "a" / "final")
    assert RunStorage("runs/sft").staging == tmp_path / "runs" / "sft"


def test_remote_runs_stage_locally_per_location(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    a, b = RunStorage("gs://bucket/a"), RunStorage("gs://bucket/b")
    assert a.staging.parent == tmp_path / "runs"
    assert a.staging != b.staging


def test_redact_and_is_uri() -> None:
    assert redact("s3://key:secret@bucket/p?region=x") == "s3://bucket/p"
    assert redact("/plain/path") == "/plain/path"
    assert is_uri("gs://b/p") and not is_uri("runs/sft") and not is_uri("C:/x")


def test_latest_checkpoint_step_reads_progress_files(tmp_path: Path) -> None:
    storage = RunStorage(str(tmp_path))
    assert storage.latest_checkpoint_step("sft") is None
    for step in (2, 4):
        directory = tmp_path / "ray" / "sft" / f"checkpoint_{step:08d}"
        directory.mkdir(parents=True)
        (directory / "progress.json").write_text(f'{{"step": {step}}}')
    (tmp_path / "ray" / "sft" / "checkpoint_00000006").mkdir()  # being written: no progress.json yet
    assert storage.latest_checkpoint_step("sft") == 4
