"""The deployment files under cluster/deploy/ stay valid: the launcher YAML against Ray's own schema, the
RayJob's entrypoint against rlhf's CLI and config keys, the RayService's Serve config against what
``rlhf serve --export`` writes. And they stay closed: no secret in plain text, Ray's token authentication on
every cluster they start, the API keys of the served model from a Kubernetes Secret."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
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
    from cluster import configtree
    from rlhf.cli import build_parser
    from rlhf.jobs.registry import EXAMPLES_DIR, JOBS

    spec = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:3] == ["python", "-m", "rlhf.cli"]
    args = build_parser().parse_args(words[3:])
    config_file = EXAMPLES_DIR / Path(args.config).name  # the entrypoint runs from the project root
    config = configtree.load(JOBS[args.job].config, config_file, args.overrides)
    assert config.cluster.num_workers == 8 and config.cluster.gpus_per_worker == 1


def test_the_rayservice_serve_config_is_what_rlhf_serve_export_writes(tmp_path: Path, tiny_model_dir: Path) -> None:
    from cluster import configtree
    from serving.config import ServeConfig
    from serving.server import export

    spec = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())["spec"]
    manifest = yaml.safe_load(spec["serveConfigV2"])
    config = ServeConfig(model=str(tiny_model_dir), api_keys=("k",))
    exported = yaml.safe_load(export(config, tmp_path / "serve.yaml").read_text())
    (app,), (exported_app,) = manifest["applications"], exported["applications"]
    assert app["import_path"] == exported_app["import_path"]
    assert set(app["args"]) == set(exported_app["args"])  # every ServeConfig key, no stale one
    config = configtree.from_dict(ServeConfig, app["args"])
    assert config.max_replicas == 4 and config.min_replicas == 1
    assert not config.allow_unauthenticated


SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
KUBERAY = ["rayjob.yaml", "rayservice.yaml"]


def _documents(value: Any) -> list[Any]:
    """``value`` and every YAML document nested in it as a string (serveConfigV2, runtimeEnvYAML)."""
    found = [value]
    if isinstance(value, dict):
        for key, item in value.items():
            nested = yaml.safe_load(item) if key in ("serveConfigV2", "runtimeEnvYAML") else item
            found += _documents(nested)
    elif isinstance(value, list):
        for item in value:
            found += _documents(item)
    return found


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


def plain_text_secrets(manifest: Any) -> list[str]:
    """Secret-looking variables given a literal value anywhere in ``manifest`` (container env or runtime_env)."""
    found = []
    for node in _documents(manifest):
        if isinstance(node, dict) and "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])):
            found.append(f"env {node['name']}={node['value']!r}")
        if isinstance(node, dict) and isinstance(node.get("env_vars"), dict):
            found += [f"env_vars {name}" for name in node["env_vars"] if SECRET_NAME.search(name)]
    return found


@pytest.mark.parametrize("name", [*KUBERAY, "ray-cluster.yaml"])
def test_no_secret_is_written_in_plain_text(name: str) -> None:
    """Before, rayservice.yaml carried the API key in the Serve config's runtime_env."""
    assert plain_text_secrets(yaml.safe_load((DEPLOY / name).read_text())) == []
    leaky = {"env_vars": {"RLHF_API_KEYS": "k"}, "containers": [{"env": [{"name": "HF_TOKEN", "value": "t"}]}]}
    assert len(plain_text_secrets(leaky)) == 2  # the check itself can fail


def test_the_rayservice_reads_the_api_keys_from_a_secret_in_every_container() -> None:
    spec = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())["spec"]
    for container in _containers(spec["rayClusterConfig"]):
        env = {item["name"]: item for item in container.get("env", [])}
        assert "secretKeyRef" in env["RLHF_API_KEYS"]["valueFrom"], container["name"]


@pytest.mark.parametrize(
    ("name", "cluster_key"), [("rayjob.yaml", "rayClusterSpec"), ("rayservice.yaml", "rayClusterConfig")]
)
def test_kuberay_clusters_turn_on_ray_token_auth(name: str, cluster_key: str) -> None:
    """Before, the clusters' dashboard and Jobs API (which run any code) answered anyone who reached them."""
    spec = yaml.safe_load((DEPLOY / name).read_text())["spec"]
    assert spec[cluster_key].get("authOptions", {}).get("mode") == "token", f"{name}: no authOptions.mode: token"


def test_the_cluster_launcher_starts_every_node_with_token_auth() -> None:
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in config[key] if "ray start" in command]
        assert starts and all("RAY_AUTH_MODE=token" in command for command in starts), (key, starts)
    # the token reaches every node at Ray's default path (~/.ray/auth_token)
    assert "~/.ray/auth_token" in config["file_mounts"]
