"""The ``rlhf`` command line, run as a real subprocess (the installed console script)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.jobs.registry import JOBS

RLHF = shutil.which("rlhf") or str(Path(sys.executable).parent / "rlhf")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RLHF, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_help_lists_every_key(job: str) -> None:
    from cluster import configtree

    result = _run(job, "--help")
    assert result.returncode == 0, result.stderr
    for key, *_ in configtree.describe(JOBS[job].config):
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


def _a_bug(config: object) -> dict:
    raise ValueError("an index our own code got wrong")


def _bad_input(config: object) -> dict:
    from rlhf.data.errors import DataError

    raise DataError("empty response", source="data.jsonl", row=3)


def test_only_the_projects_user_errors_become_one_line_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Before: the CLI turned every ValueError (and TimeoutError) into ``error: ...`` and exit 2, so a bug of the
    project's own lost its traceback. Now only errors marked :class:`cluster.errors.UserError` do."""
    from dataclasses import replace

    from rlhf.cli import main

    monkeypatch.setitem(JOBS, "sft", replace(JOBS["sft"], runner=f"{__name__}:_bad_input"))
    assert main(["sft"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data.jsonl" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setitem(JOBS, "sft", replace(JOBS["sft"], runner=f"{__name__}:_a_bug"))
    with pytest.raises(ValueError, match="an index our own code got wrong"):
        main(["sft"])


def test_plan_names_its_job_instead_of_guessing_it_from_the_configs_keys() -> None:
    """Before: ``rlhf plan --config FILE`` guessed the job from the file's top-level keys (an sft config that set
    ``loss`` was planned as rm)."""
    from rlhf.cli import build_parser

    args = build_parser().parse_args(["plan", "rm", "--config", "x.yaml", "--nodes", "1", "--gpus-per-node", "1",
                                      "--gpu-memory", "80GB"])  # fmt: skip
    assert args.job == "rm"
    with pytest.raises(SystemExit):  # the job is required, and serve or generate cannot be planned
        build_parser().parse_args(["plan", "serve", "--config", "x.yaml", "--nodes", "1", "--gpus-per-node", "1",
                                   "--gpu-memory", "80GB"])  # fmt: skip
