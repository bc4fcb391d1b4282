"""The typed config tree: YAML + overrides, refusal of unknown keys and wrong types, help, examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import configtree
from cluster.configtree import ConfigError
from rlhf.config import DPOConfig, SFTConfig
from rlhf.jobs.registry import EXAMPLES_DIR, JOBS


def test_defaults_and_overrides_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  zero_stage: 2\n  learning_rate: 1e-4\ndata:\n  path: my.jsonl\n")
    config = configtree.load(
        SFTConfig, path, ["engine.micro_batch_size=2", "model.lora.enabled=true", "train.max_steps=7"]
    )
    assert config.engine.zero_stage == 2
    assert config.engine.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string
    assert config.engine.micro_batch_size == 2
    assert config.model.lora.enabled is True
    assert config.train.max_steps == 7
    assert config.data.path == "my.jsonl"
    assert config.data.max_length == 512  # untouched default


def test_job_specific_section_defaults_survive_partial_sections() -> None:
    config = configtree.load(DPOConfig, None, ["data.max_length=64"])
    assert config.data.path == "bundled:preference"  # DPO's default data, not SFT's
    assert config.data.max_length == 64


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["engine.zero_stag=2"], "unknown config key 'engine.zero_stag'.*did you mean 'engine.zero_stage'"),
        (["engine.zero_stage=two"], "'engine.zero_stage': expected int, got 'two'"),
        (["engine.zero_stage=5"], "zero_stage must be 0, 1, 2 or 3"),
        (["preference.loss=dpoo"], "'preference.loss': 'dpoo' is not one of .*did you mean 'dpo'"),
        (["model.lora.enabled=yes please"], "'model.lora.enabled': expected bool"),
        (["engine"], "not of the form key=value"),
        (["lr=1"], "unknown config key 'lr'.*valid keys here: model, data"),
        (["model.quantization=4bit"], "set model.lora.enabled=true"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        configtree.load(DPOConfig, None, overrides)


def test_unknown_key_in_file_names_file_key_and_nearest(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("engine:\n  learning_rat: 0.1\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown config key 'engine.learning_rat'.*'engine.learning_rate'"
    ):
        configtree.load(SFTConfig, path)


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  zero_stage: 2\n")
    with pytest.raises(ConfigError, match="did you mean 'engine.zero_stage'"):
        configtree.load(SFTConfig, path)


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("engine: [\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        configtree.load(SFTConfig, path)
    with pytest.raises(ConfigError, match="does not exist"):
        configtree.load(SFTConfig, tmp_path / "nope.yaml")


def test_round_trip_through_plain_data() -> None:
    config = configtree.load(SFTConfig, None, ["model.lora.target_modules=[q_proj, v_proj]"])
    assert config.model.lora.target_modules == ("q_proj", "v_proj")
    assert configtree.from_dict(SFTConfig, configtree.to_dict(config)) == config


@pytest.mark.parametrize("job", sorted(JOBS))
def test_help_lists_every_key_with_type_default_and_description(job: str) -> None:
    text = configtree.help_text(JOBS[job].config)
    keys = list(configtree.describe(JOBS[job].config))
    assert keys
    for key, type_name, _default, doc in keys:
        assert f"{key} ({type_name}, default: " in text
        assert doc, f"{job}: config key {key} has no description"


@pytest.mark.parametrize("job", sorted(JOBS))
def test_example_config_per_job_loads(job: str) -> None:
    path = EXAMPLES_DIR / f"{job.replace('-', '_')}.yaml"
    assert path.is_file(), f"no example config for {job}"
    config = configtree.load(JOBS[job].config, path)
    assert isinstance(config, JOBS[job].config)
