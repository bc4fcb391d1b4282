"""The deployment files under cluster/deploy/ stay valid: the launcher YAML against Ray's own schema, the
RayJob's entrypoint against rlhf's CLI and config keys, the RayService's Serve config against what
``rlhf serve --export`` writes."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "cluster" / "deploy"


def test_the_cluster_launcher_yaml_satisfies_rays_schema() -> None:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]


def test_the_rayjob_entrypoint_is_an_rlhf_command_whose_config_loads() -> None:
    from rlhf import configtree
    from rlhf.cli import EXAMPLES_DIR, build_parser
    from rlhf.config import JOBS

    spec = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:3] == ["python", "-m", "rlhf.cli"]
    args = build_parser().parse_args(words[3:])
    config_file = EXAMPLES_DIR / Path(args.config).name  # the entrypoint runs from the project root
    config = configtree.load(JOBS[args.job], config_file, args.overrides)
    assert config.cluster.num_workers == 8 and config.cluster.gpus_per_worker == 1


def test_the_rayservice_serve_config_is_what_rlhf_serve_export_writes(tmp_path: Path, tiny_model_dir: Path) -> None:
    from rlhf import configtree
    from rlhf.config import ServeConfig
    from serving.server import export

    spec = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())["spec"]
    manifest = yaml.safe_load(spec["serveConfigV2"])
    exported = yaml.safe_load(export(ServeConfig(model=str(tiny_model_dir)), tmp_path / "serve.yaml").read_text())
    (app,), (exported_app,) = manifest["applications"], exported["applications"]
    assert app["import_path"] == exported_app["import_path"]
    assert set(app["args"]) == set(exported_app["args"])  # every ServeConfig key, no stale one
    config = configtree.from_dict(ServeConfig, app["args"])
    assert config.max_replicas == 4 and config.min_replicas == 1
