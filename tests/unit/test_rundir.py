"""A run directory's integrity: whole files, one run at a time, no credentials written (no Ray here).

The lock tests hold a directory from a real second process (killed at the end) and run the
real entry points against it; a job that got past the lock would reach ``connect``, which is
replaced by a function that fails loudly, so nothing heavy starts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from cluster import configtree
from rlhf.jobs.registry import JOBS
from rlhf.jobs.runner import JobError, prepare_output_dir, write_config

ROOT = Path(__file__).resolve().parents[2]
SECRETS = ("AKIAKEY", "S3CRET", "PASSW0RD", "T0KEN", "SIGNATURE9")
# a storage URI and a reward URL carrying every kind of credential the issue names
STORAGE_URI = (
    "s3://AKIAKEY:S3CRET@bucket/runs/sft?endpoint_override=127.0.0.1:9000&scheme=http"
    "&X-Amz-Signature=SIGNATURE9&X-Amz-Security-Token=T0KEN"
)
REWARD_URL = "https://scorer:PASSW0RD@rewards.example.com/score?key=T0KEN&model=rm-7b"
LOCK_FILE = ".run.lock"


def _unlock(directory: Path) -> None:
    """Release the run lock a job's set-up took in this process (the job itself would at its end)."""
    from rlhf.jobs.rundir import unlock_run_directory

    unlock_run_directory(directory)


# ---- atomic writes ----------------------------------------------------------------------


def test_an_atomic_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    from rlhf.jobs.rundir import atomic_open, write_atomic

    target = tmp_path / "state.json"
    write_atomic(target, '{"step": 2}')
    with pytest.raises(RuntimeError, match="disk full"), atomic_open(target) as handle:
        handle.write('{"st')
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind


def test_a_process_killed_while_writing_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    """SIGKILL in the middle of a write: the file still holds the old content, not a torn prefix."""
    from rlhf.jobs.rundir import write_atomic

    target = tmp_path / "summary.json"
    write_atomic(target, '{"old": true}')
    writer = (
        "import sys, time\n"
        "from rlhf.jobs.rundir import atomic_open\n"
        "with atomic_open(sys.argv[1]) as handle:\n"
        "    handle.write('{\"new\": '); handle.flush(); print('writing', flush=True); time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", writer, str(target)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=_env()
    )
    assert process.stdout.readline().strip() == "writing"
    process.kill()
    process.wait(timeout=30)
    assert json.loads(target.read_text()) == {"old": True}


def test_an_atomic_dir_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    from rlhf.jobs.rundir import atomic_dir

    final = tmp_path / "final"
    with pytest.raises(OSError), atomic_dir(final) as staging:
        staging.mkdir()
        (staging / "config.json").write_text("{}")
        raise OSError("export failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as staging:
        staging.mkdir()
        (staging / "model.safetensors").write_text("weights")
        assert not final.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    with atomic_dir(final) as staging:  # a second export replaces the first as a whole
        staging.mkdir()
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in final.iterdir()) == ["config.json"]


def test_a_metrics_file_cut_mid_line_is_repaired_before_a_resumed_run_appends(tmp_path: Path) -> None:
    """A driver killed in the middle of appending a record left half a line; the resumed run appended its
    records to it (one corrupt line) and drawing the curves at the end failed on it."""
    from rlhf.jobs.progress import RunLog

    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "train", "st')
    run_log = RunLog(tmp_path, 3, "sft", initial_step=1)
    run_log.write([{"kind": "train", "step": 2, "loss": 1.5}, {"kind": "train", "step": 3, "loss": 1.0}])
    run_log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert (tmp_path / "curves.png").stat().st_size > 0


# ---- PPO checkpoints and final/ ------------------------------------------------------------


def _checkpoints(output_dir: Path, states: dict[int, str]) -> None:
    for step, text in states.items():
        directory = output_dir / "checkpoints" / f"step-{step}"
        (directory / "policy").mkdir(parents=True)
        (directory / "state.json").write_text(text)


def _state(step: int) -> str:
    return json.dumps({"step": step, "kl_coef": 0.02, "prompt_position": 8 * step})


def _ppo_config(tiny_model_dir: Path, output_dir: Path, *overrides: str):
    from rlhf.jobs.registry import EXAMPLES_DIR
    from rlhf.rl.config import PPOConfig

    base = [f"policy.name_or_path={tiny_model_dir}", f"train.output_dir={output_dir}", "train.max_steps=6"]
    return configtree.load(PPOConfig, EXAMPLES_DIR / "ppo.yaml", [*base, *overrides])


def test_a_ppo_re_run_resumes_from_the_last_complete_checkpoint_past_a_torn_one(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A state.json cut short (the driver killed while writing it) made every re-run fail with a JSONDecodeError."""
    from rlhf.rl.checkpoint import latest_checkpoint
    from rlhf.rl.preflight import prepare

    _checkpoints(tmp_path, {2: _state(2), 4: _state(4), 6: _state(6)[:17]})
    with caplog.at_level(logging.WARNING):
        state = prepare(_ppo_config(tiny_model_dir, tmp_path)).state
    assert state["step"] == 4
    assert f"checkpoint {tmp_path / 'checkpoints' / 'step-6'} is incomplete" in caplog.text
    assert latest_checkpoint(tmp_path)[0].name == "step-4"  # what the role groups restore
    _unlock(tmp_path)


def test_a_partial_final_dir_does_not_make_a_ppo_re_run_refuse(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A final/ cut short by a crash during the export made every re-run refuse ("holds a finished run")."""
    from rlhf.rl.preflight import prepare

    _checkpoints(tmp_path, {4: _state(4), 6: _state(6)})
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")  # the export stopped before the weights
    state = prepare(_ppo_config(tiny_model_dir, tmp_path)).state
    assert state["step"] == 6  # the last checkpoint: only the export is left to do
    _unlock(tmp_path)

    (tmp_path / "summary.json").write_text("{}")  # written after final/: now a finished run
    with pytest.raises(JobError, match="holds a finished run"):
        prepare(_ppo_config(tiny_model_dir, tmp_path))


# ---- one run per directory -------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@contextmanager
def held_by_another_run(directory: Path) -> Iterator[subprocess.Popen]:
    """A second process that takes ``directory`` the way a job does (``prepare_output_dir``) and keeps running."""
    holder = (
        "import sys, time\n"
        "from rlhf.jobs.runner import prepare_output_dir\n"
        "prepare_output_dir(sys.argv[1]); print('ready', flush=True); time.sleep(300)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holder, str(directory), "rlhf sft train.output_dir=x"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that gets past its checks would connect to Ray next: fail there instead of starting a cluster."""
    import cluster.connect

    def refuse(*_: object) -> None:
        raise AssertionError("the job went on to connect to a cluster")

    monkeypatch.setattr(cluster.connect, "connect", refuse)


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_first(tmp_path: Path) -> None:
    """Two runs on one output_dir used to interleave their checkpoints, metrics and final model."""
    with held_by_another_run(tmp_path) as first, pytest.raises(JobError) as caught:
        prepare_output_dir(str(tmp_path))
    message = str(caught.value)
    assert f"pid {first.pid} on host {socket.gethostname()}" in message, message
    assert "in use by another run" in message and str(tmp_path / LOCK_FILE) in message


JOB_OUTPUT_KEYS = {
    "sft": "train.output_dir",
    "rm": "train.output_dir",
    "dpo": "train.output_dir",
    "ppo": "train.output_dir",
    "generate": "output_dir",
    "synth": "output_dir",
    "best-of-n": "output_dir",
    "iterative-dpo": "output_dir",
    "eval": "output_dir",
}


@pytest.mark.parametrize("job", sorted(JOB_OUTPUT_KEYS))
def test_every_job_refuses_a_directory_another_run_holds_before_it_uses_the_cluster(
    job: str, tmp_path: Path, tiny_model_dir: Path, no_cluster: None
) -> None:
    overrides = [f"{JOB_OUTPUT_KEYS[job]}={tmp_path}"]
    if job == "ppo":
        overrides += [f"policy.name_or_path={tiny_model_dir}", "train.max_steps=2"]
    elif job in ("sft", "rm", "dpo"):
        overrides.append(f"model.name_or_path={tiny_model_dir}")
    else:
        overrides.append(f"model={tiny_model_dir}")
    config = configtree.load(JOBS[job].config, None, overrides)
    with held_by_another_run(tmp_path) as first, pytest.raises(JobError, match=f"pid {first.pid} on host"):
        JOBS[job].run(config)


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with held_by_another_run(tmp_path) as first:
        first.send_signal(signal.SIGKILL)  # no chance to release: its lock file still names it
        first.wait(timeout=30)
        with caplog.at_level(logging.WARNING):
            prepare_output_dir(str(tmp_path))
    assert f"taking over the lock of a run that is gone (pid {first.pid}" in caplog.text
    owner = json.loads((tmp_path / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    _unlock(tmp_path)
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: the next run has no one to warn about


def test_a_lock_of_another_host_is_refused_with_what_to_do(tmp_path: Path) -> None:
    owner = {"host": "node-7", "pid": 4242, "started": "2026-12-01T10:00:00+0000", "command": "rlhf ppo"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(owner))
    with pytest.raises(JobError, match=rf"pid 4242 on host node-7.*if that run is gone, delete {tmp_path}"):
        prepare_output_dir(str(tmp_path))


# ---- secrets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (STORAGE_URI, "s3://REDACTED@bucket/runs/sft?endpoint_override=127.0.0.1:9000&scheme=http"
         "&X-Amz-Signature=REDACTED&X-Amz-Security-Token=REDACTED"),
        (REWARD_URL, "https://REDACTED@rewards.example.com/score?key=REDACTED&model=rm-7b"),
        ("https://host/x?sig=abc&sp=r&api_key=1&access_token=2&password=3", "https://host/x?sig=REDACTED&sp=r"
         "&api_key=REDACTED&access_token=REDACTED&password=REDACTED"),
        ("gs://bucket/runs/a", "gs://bucket/runs/a"),
        ("http://127.0.0.1:8000/score", "http://127.0.0.1:8000/score"),
    ],
)  # fmt: skip
def test_scrub_masks_credentials_and_keeps_the_rest(url: str, expected: str) -> None:
    from rlhf.jobs.rundir import scrub

    assert scrub(url) == expected
    assert scrub({"a": [f"reward={url} rest"]}) == {"a": [f"reward={expected} rest"]}
    assert scrub("runs/sft") == "runs/sft"


def test_config_yaml_keeps_no_credential_of_a_storage_uri_or_reward_url(tmp_path: Path) -> None:
    """config.yaml was the config tree as given: the bucket's key and secret and the reward URL's password."""
    from rlhf.jobs.registry import EXAMPLES_DIR
    from rlhf.rl.config import PPOConfig

    config = configtree.load(PPOConfig, EXAMPLES_DIR / "ppo.yaml", [])
    config = replace(config, reward=REWARD_URL, train=replace(config.train, output_dir=STORAGE_URI))
    write_config(config, tmp_path)
    text = (tmp_path / "config.yaml").read_text()
    assert not [secret for secret in SECRETS if secret in text], text
    written = yaml.safe_load(text)
    assert written["reward"] == "https://REDACTED@rewards.example.com/score?key=REDACTED&model=rm-7b"
    assert "endpoint_override=127.0.0.1:9000" in written["train"]["output_dir"]


def test_a_generated_dataset_keeps_no_credential_in_its_manifest_or_provenance(tmp_path: Path) -> None:
    from rlhf.gen.common import provenance, write_dataset
    from rlhf.gen.config import BestOfNConfig

    config = configtree.load(BestOfNConfig, None, [])
    config = replace(config, judge=replace(config.judge, reward=REWARD_URL))
    row = {"prompt": "p", "completion": "c", "provenance": provenance("best-of-n", judge=REWARD_URL, model="tiny")}
    write_dataset(tmp_path, [row], {"config": configtree.to_dict(config), "judge": f"reward endpoint {REWARD_URL}"})
    for name in ("data.jsonl", "manifest.json"):
        text = (tmp_path / name).read_text()
        assert not [secret for secret in SECRETS if secret in text], (name, text)
        assert "rewards.example.com/score" in text


def test_the_lock_file_names_the_command_without_its_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["rlhf", "ppo", f"reward={REWARD_URL}"])
    prepare_output_dir(str(tmp_path))
    text = (tmp_path / LOCK_FILE).read_text()
    _unlock(tmp_path)
    assert "rlhf ppo reward=https://REDACTED@rewards.example.com" in text
    assert not [secret for secret in SECRETS if secret in text]


# ---- Serve applications of a run ------------------------------------------------------------------


def test_runs_that_name_no_application_each_get_their_own() -> None:
    """Every run defaulted to the same application name ("rlhf-rollout", "rlhf-generate", "<that>-judge"), so
    a second run reused, re-weighted and at its end deleted the first run's replicas."""
    from rlhf.gen.config import SamplingConfig
    from rlhf.gen.sampler import Sampler
    from rlhf.jobs.rundir import run_app_name
    from rlhf.rl.config import PPOConfig

    assert PPOConfig().rollout.app_name == "" and SamplingConfig().app_name == ""
    rollout = {run_app_name(PPOConfig().rollout.app_name, "rlhf-rollout") for _ in range(20)}
    assert len(rollout) == 20 and all(name.startswith("rlhf-rollout-") for name in rollout)
    first, second = Sampler("tiny", SamplingConfig()), Sampler("tiny", SamplingConfig())
    assert first.app_name != second.app_name and first.app_name.startswith("rlhf-generate-")
    assert Sampler("tiny", SamplingConfig(), role="judge").app_name.startswith("rlhf-judge-")
    # a name the user gives is kept: runs that name the same application share it on purpose
    assert Sampler("tiny", SamplingConfig(app_name="shared")).app_name == "shared"
    assert run_app_name("shared", "rlhf-rollout") == "shared"
