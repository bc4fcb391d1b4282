"""The ``rlhf`` command line, run as a real subprocess (the installed console script)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.cli import ALL_JOBS

RLHF = shutil.which("rlhf") or str(Path(sys.executable).parent / "rlhf")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RLHF, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("job", sorted(ALL_JOBS))
def test_job_help_lists_every_key(job: str) -> None:
    from cluster import configtree

    result = _run(job, "--help")
    assert result.returncode == 0, result.stderr
    for key, *_ in configtree.describe(ALL_JOBS[job]):
        assert key in result.stdout, f"rlhf {job} --help does not list {key}"


def test_print_config_applies_overrides() -> None:
    result = _run("dpo", "--print-config", "preference.loss=simpo", "engine.zero_stage=3")
    assert result.returncode == 0, result.stderr
    assert "loss: simpo" in result.stdout
    assert "zero_stage: 3" in result.stdout
    assert "path: bundled:preference" in result.stdout


def test_print_config_masks_credentials() -> None:
    """Before: ``--print-config`` printed a reward URL's password and token, and serve's API keys, into the job's
    output (its log)."""
    result = _run("ppo", "--print-config", "reward=https://scorer:PW0RD@rewards.example/score?key=T0KEN&batch=8")
    assert result.returncode == 0, result.stderr
    assert "PW0RD" not in result.stdout and "T0KEN" not in result.stdout
    assert "rewards.example/score?key=REDACTED&batch=8" in result.stdout
    served = _run("serve", "--print-config", "api_keys=[S3CRET]")
    assert served.returncode == 0, served.stderr
    assert "S3CRET" not in served.stdout and "REDACTED" in served.stdout


def test_bad_key_exits_2_with_one_line_naming_the_key() -> None:
    result = _run("sft", "--print-config", "engine.zero_stag=2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'engine.zero_stag' in override 'engine.zero_stag=2'; did you mean 'engine.zero_stage'?"
    ]
    assert "Traceback" not in result.stderr


def test_bad_data_exits_2_naming_file_line_and_field(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(
        '{"prompt": "Describe the cat.", "completion": "The cat is warm."}\n{"prompt": "x", "completion": ""}\n'
    )
    result = _run(
        "sft", f"data.path={data}", f"model.name_or_path={tiny_model_dir}", f"train.output_dir={tmp_path / 'o'}"
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "train.jsonl line 2" in last and "'completion'" in last, last


def test_init_model_writes_a_loadable_model(tmp_path: Path) -> None:
    result = _run("init-model", str(tmp_path / "m"), "--num-layers", "1")
    assert result.returncode == 0, result.stderr
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "m").num_hidden_layers == 1


def test_ppo_with_a_reward_function_that_does_not_exist_fails_before_anything_starts(tmp_path: Path) -> None:
    result = _run("ppo", "reward=rlhf.data.bundled:no_such_reward", f"train.output_dir={tmp_path / 'ppo'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "no_such_reward" in last and "positive_word_reward" in last, last  # names the nearest function
    assert "Started a local Ray instance" not in result.stderr
