"""The configuration of an endpoint and of its vLLM engines: a frozen dataclass tree, as every config of the
project (read from YAML and ``key=value`` overrides by :mod:`cluster.configtree`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Compilation = Literal["auto", "eager", "compiled"]
Proxy = Literal["serve", "haproxy"]
EngineDtype = Literal["auto", "float32", "bfloat16", "float16"]


def compilation_field() -> Any:
    """The vLLM engine mode key (``serving.app.engine_mode``), in the serve and rollout sections alike."""
    return field(
        default="auto",
        metadata={
            "help": "vLLM engine mode: eager, compiled (torch.compile; CUDA graphs on GPUs), or auto: compiled on GPUs, "
            "eager on CPUs (compiling there costs 1-2 minutes a start and gains nothing measured)"
        },
    )


def dtype_field() -> Any:
    """The vLLM compute dtype key (``serving.app.engine_mode``), in the serve and rollout sections alike."""
    return field(
        default="auto",
        metadata={
            "help": "vLLM compute dtype; auto: the model's on GPUs, float32 on CPUs (vLLM's CPU default, bfloat16, "
            "changed SmolLM2-135M's greedy answers: its steps of 1/8 in the logits break near-ties)"
        },
    )


def engine_threads_field() -> Any:
    """The CPU threads of a replica's vLLM engine (``serving.backends.cpu_engine_threads``), in the serve and rollout
    sections alike."""
    return field(
        default=0,
        metadata={
            "help": "threads of each replica's vLLM engine on CPUs (0: every core the replica may run on, as "
            "torch and `vllm serve` take; with several replicas on one machine, give each its share). No effect on GPUs"
        },
    )


@dataclass(frozen=True)
class ServeConfig:
    """An OpenAI-compatible Ray Serve endpoint hosting vLLM replicas."""

    model: str = field(default="tiny", metadata={"help": "model directory or hub id (a run's final/ directory)"})
    model_name: str | None = field(default=None, metadata={"help": "name clients use (empty: from the directory)"})
    adapters: dict[str, str] = field(
        default_factory=dict, metadata={"help": "LoRA adapters: name -> adapter directory"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    proxy: Proxy = field(
        default="serve",
        metadata={
            "help": "what listens on host:port: serve (Ray Serve's HTTP proxy, which relays each request to a replica "
            "through Ray) or haproxy (HAProxy, sending each request straight to a replica's own HTTP server: Serve's "
            "HAProxy mode, experimental in Ray 2.60; its stats and metrics pages listen on every interface)"
        },
    )
    api_keys: tuple[str, ...] = field(
        default=(), metadata={"help": "accepted bearer API keys, also from $RLHF_API_KEYS (empty: no auth)"}
    )
    allow_unauthenticated: bool = field(
        default=False,
        metadata={"help": "serve with no API key on an address other machines reach (refused unless set)"},
    )
    min_replicas: int = field(default=1, metadata={"help": "fewest vLLM replicas (autoscaling lower bound)"})
    max_replicas: int = field(default=1, metadata={"help": "most vLLM replicas (autoscaling upper bound)"})
    target_ongoing_requests: float = field(
        default=16.0, metadata={"help": "autoscaling: requests in flight per replica that Serve aims for"}
    )
    upscale_delay_s: float = field(
        default=30.0, metadata={"help": "autoscaling: how long the load must stay high before a replica is added"}
    )
    downscale_delay_s: float = field(
        default=600.0, metadata={"help": "autoscaling: how long the load must stay low before a replica is removed"}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per replica (GPU only)"})
    max_model_len: int = field(default=1024, metadata={"help": "context length of the replicas"})
    compilation: Compilation = compilation_field()  # noqa: RUF009 (a dataclasses.field)
    dtype: EngineDtype = dtype_field()  # noqa: RUF009 (a dataclasses.field)
    engine_threads: int = engine_threads_field()
    max_tokens_limit: int = field(default=1024, metadata={"help": "largest max_tokens a request may ask for"})
    default_max_tokens: int = field(
        default=256, metadata={"help": "max_tokens of a request that sets none (at most max_tokens_limit)"}
    )
    max_n: int = field(default=8, metadata={"help": "largest n (and best_of) a request may ask for"})
    max_logprobs: int = field(
        default=20, metadata={"help": "largest logprobs, top_logprobs or prompt_logprobs a request may ask for"}
    )
    max_stop: int = field(default=4, metadata={"help": "most stop strings in one request"})
    max_prompts: int = field(default=16, metadata={"help": "most prompts in one completion request"})
    max_request_bytes: int = field(default=1_000_000, metadata={"help": "largest request body accepted"})
