"""The serving layer without a live endpoint: request guard, config mapping, export, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving.config import ServeConfig
from serving.guard import Guard, check_body, check_key
from tests.unit.guard_limits import limits

LIMITS = limits(max_stop=4, models=("tiny", "positive"))


def test_check_key() -> None:
    assert check_key(None, ()) is None  # auth off
    assert "missing" in check_key(None, ("k",))
    assert "missing" in check_key("Basic abc", ("k",))
    assert check_key("Bearer wrong", ("k",)) == "invalid API key"
    assert check_key("Bearer k2", ("k1", "k2")) is None
    assert check_key("bearer k1", ("k1",)) is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{oops", None),
        (b"[1, 2]", None),
        (json.dumps({"model": "other", "prompt": "x"}).encode(), "model"),
        (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 65}).encode(), "max_tokens"),
        (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "5"}).encode(), "max_tokens"),
        (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": True}).encode(), "max_tokens"),
        (json.dumps({"model": "tiny", "prompt": ""}).encode(), "prompt"),
        (json.dumps({"model": "tiny"}).encode(), "prompt"),
    ],
)
def test_check_body_refuses_completions(body: bytes, param: str | None) -> None:
    refused = check_body("/v1/completions", body, LIMITS)
    assert refused is not None and refused[1] == param, refused


def test_check_body_chat_and_acceptance() -> None:
    chat = "/v1/chat/completions"
    assert check_body(chat, json.dumps({"model": "tiny", "messages": []}).encode(), LIMITS)[1] == "messages"
    assert check_body(chat, json.dumps({"model": "tiny", "max_completion_tokens": 99}).encode(), LIMITS)[1] == (
        "max_completion_tokens"
    )
    ok = {"model": "positive", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}
    assert check_body(chat, json.dumps(ok).encode(), LIMITS) is None
    assert check_body("/v1/completions", json.dumps({"prompt": ["a", "b"]}).encode(), LIMITS) is None


def test_guard_refuses_before_the_app_is_reached() -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    reached: list[str] = []

    async def handler(request):
        reached.append(request.url.path)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/completions", handler, methods=["POST"]), Route("/v1/models", handler)])
    app.add_middleware(Guard, keys=("k",), limits=LIMITS)
    client = TestClient(app)
    good = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
    assert client.get("/v1/models").status_code == 401
    assert client.post("/v1/completions", json=good, headers={"Authorization": "Bearer no"}).status_code == 401
    auth = {"Authorization": "Bearer k"}
    assert client.post("/v1/completions", json={**good, "max_tokens": 999}, headers=auth).status_code == 400
    assert client.post("/v1/completions", json={**good, "model": "x"}, headers=auth).status_code == 404
    big = client.post("/v1/completions", json={**good, "prompt": "x" * 5000}, headers=auth)
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
    assert reached == [], "a refused request reached the app"
    assert client.post("/v1/completions", json=good, headers=auth).status_code == 200
    assert client.get("/v1/models", headers=auth).status_code == 200
    assert reached == ["/v1/completions", "/v1/models"]


def test_model_name_and_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.app import api_keys, model_name

    assert model_name(ServeConfig(model="runs/sft/final")) == "sft"
    assert model_name(ServeConfig(model="/models/my-model")) == "my-model"
    assert model_name(ServeConfig(model="org/hub-model")) == "hub-model"
    assert model_name(ServeConfig(model="/models/SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct.Q4_1"
    assert model_name(ServeConfig(model="smollm2-135m-instruct")) == "smollm2-135m-instruct"
    assert model_name(ServeConfig(model="x", model_name="named")) == "named"
    monkeypatch.setenv("RLHF_API_KEYS", "a, b,,a")
    assert api_keys(ServeConfig(api_keys=("c", "a"))) == ("c", "a", "b")


def test_llm_config_maps_replicas_adapters_and_context(tiny_model_dir: Path, tmp_path: Path) -> None:
    from serving.app import llm_config

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12}))
    config = ServeConfig(
        model=str(tiny_model_dir), adapters={"pos": str(adapter)}, min_replicas=1, max_replicas=3, max_model_len=300
    )
    llm = llm_config(config, gpu=False)
    engine = llm.engine_kwargs
    assert engine["max_model_len"] == 300 and engine["enable_lora"] and engine["max_lora_rank"] == 16
    assert engine["lora_modules"] == [{"name": "pos", "path": str(adapter.resolve())}]
    assert llm.deployment_config["autoscaling_config"]["min_replicas"] == 1
    assert llm.deployment_config["autoscaling_config"]["max_replicas"] == 3
    fixed = llm_config(ServeConfig(model=str(tiny_model_dir), min_replicas=2, max_replicas=2), gpu=True)
    assert fixed.deployment_config["num_replicas"] == 2 and fixed.engine_kwargs["tensor_parallel_size"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"max_tokens_limit": 5000}, "max_tokens_limit"),
        ({"adapters": {"a": "/no/such/dir"}}, "adapters.a"),
        ({"default_max_tokens": 0}, "default_max_tokens"),
        ({"max_n": 0}, "max_n"),
        ({"max_logprobs": -1}, "max_logprobs"),
        ({"max_prompts": 0}, "max_prompts"),
    ],
)
def test_undeployable_configs_are_refused_naming_the_key(tiny_model_dir: Path, overrides: dict, message: str) -> None:
    from serving.app import ServeError, build_app

    with pytest.raises(ServeError, match=message):
        build_app(ServeConfig(model=str(tiny_model_dir), **overrides), gpu=False)


def test_export_writes_a_serve_deploy_config_whose_builder_builds(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cluster_context: None
) -> None:
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "serve", "--model", str(tiny_model_dir), "--api-key", "secret",
         "--export", str(out), "max_replicas=2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(document)
    app = schema.applications[0]
    assert app.import_path == "serving.app:app_builder"
    assert "secret" not in out.read_text(), "API keys must not be written to the exported file"
    from serving.app import app_builder

    monkeypatch.setenv("RLHF_API_KEYS", "secret")  # the cluster's keys, from its environment
    assert isinstance(app_builder(app.args), Application)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--adapter", "no-equals-sign"], "--adapter 'no-equals-sign' is not of the form NAME=DIR"),
        (["proxy=nginx"], "config key 'proxy': 'nginx' is not one of ['serve', 'haproxy']"),
    ],
)
def test_serve_cli_errors_are_one_line(tmp_path: Path, arguments: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "serve", *arguments, "--export", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_embedded_cluster_for_haproxy_gets_serves_flag_free_ports_and_keeps_the_users_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from serving.server import haproxy_env

    monkeypatch.delenv("RAY_SERVE_HAPROXY_STATS_PORT", raising=False)
    monkeypatch.delenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", raising=False)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "9999")
    env = haproxy_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_HAPROXY_METRICS_PORT"] == "9999"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "5"
    stats = int(env["RAY_SERVE_HAPROXY_STATS_PORT"])
    assert stats not in (8404, 9999) and 0 < stats < 65536


def test_the_engine_mode_is_eager_float32_without_chunked_prefill_on_cpus_and_vllms_own_on_gpus() -> None:
    """The CPU defaults that answer right on a real model (tests/real/test_engine.py says what went wrong before)."""
    from serving.app import engine_mode, llm_config

    cpu = {"enforce_eager": True, "dtype": "float32", "enable_chunked_prefill": False}
    assert engine_mode("auto", "auto", gpu=False) == cpu
    assert engine_mode("auto", "auto", gpu=True) == {"enforce_eager": False}
    assert engine_mode("compiled", "bfloat16", gpu=False) == {**cpu, "enforce_eager": False, "dtype": "bfloat16"}
    assert engine_mode("eager", "float16", gpu=True) == {"enforce_eager": True, "dtype": "float16"}
    engine = llm_config(ServeConfig(model="/models/m"), gpu=False).engine_kwargs
    assert {k: engine[k] for k in cpu} == cpu
    engine = llm_config(
        ServeConfig(model="/models/m", compilation="compiled", dtype="bfloat16"), gpu=False
    ).engine_kwargs
    assert (engine["enforce_eager"], engine["dtype"], engine["enable_chunked_prefill"]) == (False, "bfloat16", False)


def test_a_cpu_replica_engine_takes_the_threads_of_its_config_and_every_core_by_default(monkeypatch) -> None:
    """``engine_threads`` reaches a CPU replica's environment and, in the replica, ``OMP_NUM_THREADS``, which the
    engine process inherits (Ray's value for a replica, 1, is replaced); GPUs are left alone; a negative value is
    refused naming the key."""
    import os

    from serving.app import ServeError, llm_config, validate
    from serving.backends import ENGINE_THREADS_ENV, KEEP_FREED_MEMORY_ENV, cpu_engine_threads, use_cpu_engine_threads

    assert llm_config(ServeConfig(model="/models/m"), gpu=False).runtime_env["env_vars"][ENGINE_THREADS_ENV] == "0"
    assert llm_config(ServeConfig(model="/m", engine_threads=3), gpu=False).runtime_env["env_vars"] == {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        ENGINE_THREADS_ENV: "3",
        **KEEP_FREED_MEMORY_ENV,
    }
    assert not llm_config(ServeConfig(model="/m", engine_threads=3), gpu=True).runtime_env
    assert (cpu_engine_threads(0, 16), cpu_engine_threads(3, 16)) == (16, 3)

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray gives the replica's actor
    monkeypatch.setenv(ENGINE_THREADS_ENV, "0")
    assert use_cpu_engine_threads() == len(os.sched_getaffinity(0))
    assert os.environ["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))
    monkeypatch.setenv(ENGINE_THREADS_ENV, "5")
    assert use_cpu_engine_threads() == 5 and os.environ["OMP_NUM_THREADS"] == "5"

    with pytest.raises(ServeError, match="engine_threads=-1 is below 0"):
        validate(ServeConfig(engine_threads=-1))
