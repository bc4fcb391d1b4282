"""``rlhf plan``: per-GPU memory of every role of a job, the placement it implies, and a refusal when it cannot fit.

Model states per GPU follow the ZeRO paper (Rajbhandari et al. 2020, Sec. 3 and 5) for a
model of P parameters trained with Adam on Nd data-parallel ranks:

* mixed precision (bf16 weights and gradients, fp32 master weights and two moments,
  K = 12 bytes of optimizer state per parameter): stage 0: 2P + 2P + 12P = 16P bytes;
  stage 1: 2P + 2P + 12P/Nd; stage 2: 2P + 14P/Nd; stage 3: 16P/Nd;
* fp32 (4-byte weights and gradients, 8 bytes of moments): stage 0: 16P; stage 1:
  4P + 4P + 8P/Nd; stage 2: 4P + 12P/Nd; stage 3: 16P/Nd;
* ``offload_optimizer`` moves the optimizer states (and the fp32 master weights) to CPU
  memory; ``offload_params`` (stage 3) moves the weights too;
* LoRA: the frozen base in bf16 (QLoRA: 4-bit, about 0.5 byte per parameter), plus the
  adapters' own full model states;
* frozen roles (reference, reward model): the weights in bf16, one full copy per rank.

Activations per micro-batch of b sequences of s tokens, hidden size h, MLP width i, a heads,
L layers, counted as Korthikanti et al. (2022) count them for GPT, redone for a Llama layer
(RMSNorm, SwiGLU MLP, no dropout), in bytes at 2 bytes per value: attention ``11*s*b*h +
5*a*s^2*b``, MLP ``2*s*b*h + 8*s*b*i``, norms ``4*s*b*h`` per layer (twice that in fp32);
with gradient checkpointing only each layer's input is kept (``2*s*b*h`` per layer) plus one
layer recomputed in full. The logits add ``4*s*b*V`` bytes (fp32). A frozen forward pass
keeps one layer's activations at a time.

vLLM rollout replicas (``rlhf ppo``) get GPUs of their own: ``rollout.num_replicas`` x
``tensor_parallel_size``, each filled to vLLM's ``gpu_memory_utilization`` (weights, then
KV cache).

These are estimates: allocator fragmentation, communication buffers and CUDA context
(about 1 GB) come on top, which is why a GPU is only planned to ``headroom`` (default 90%)
of its memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import UserError

GB = 1e9
CUDA_CONTEXT_BYTES = 1.0 * GB
VLLM_GPU_MEMORY_UTILIZATION = 0.9


class PlanError(UserError, ValueError):
    """A job that will not fit the given GPUs; the message names the role and the numbers."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a model."""

    parameters: int
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    lora_parameters: int = 0  # of the adapters, when LoRA is on
    intermediate_size: int = 0  # MLP width (0: 4 x hidden_size)


def model_state_bytes(
    parameters: float,
    zero_stage: int,
    data_parallel: int,
    mixed_precision: bool = True,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients and optimizer states of a trained model (see the module docstring)."""
    weight, grad, optim = (2.0, 2.0, 12.0) if mixed_precision else (4.0, 4.0, 8.0)
    n = max(1, data_parallel)
    weights = parameters * weight / (n if zero_stage >= 3 else 1)
    grads = parameters * grad / (n if zero_stage >= 2 else 1)
    optimizer = parameters * optim / (n if zero_stage >= 1 else 1)
    if offload_optimizer:
        optimizer = 0.0
    if offload_params and zero_stage == 3:
        weights = 0.0
    return {"weights": weights, "gradients": grads, "optimizer": optimizer}


def activation_bytes(
    shape: ModelShape,
    micro_batch: int,
    sequence: int,
    checkpointing: bool,
    training: bool = True,
    bytes_per_value: int = 2,
) -> float:
    """Bytes of activations (and logits) one forward(+backward) pass of a micro-batch holds at its peak."""
    s, b, h, a, layers = sequence, micro_batch, shape.hidden_size, shape.num_heads, shape.num_layers
    i = shape.intermediate_size or 4 * h
    per_layer = (s * b * (17 * h + 8 * i) + 5 * a * s * s * b) * bytes_per_value / 2
    logits = 4.0 * s * b * shape.vocab_size
    if not training:
        return per_layer + logits
    if checkpointing:
        return bytes_per_value * s * b * h * layers + per_layer + logits
    return per_layer * layers + logits


def shape_of(
    name_or_path: str, lora_r: int = 0, lora_targets: tuple[str, ...] = (), trust_remote_code: bool = False
) -> ModelShape:
    """The shape of a model from its config alone (a local directory, or a hub id when the hub is reachable).

    The parameters are counted on an empty (meta-device) model, so nothing is allocated or downloaded
    beyond the config file.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf.models.loading import resolve

    config = AutoConfig.from_pretrained(resolve(name_or_path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    parameters = sum(p.numel() for p in model.parameters())
    lora = 0
    if lora_r:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in lora_targets):
                lora += lora_r * (module.in_features + module.out_features)
    text = getattr(config, "text_config", config)
    return ModelShape(
        parameters=parameters,
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        vocab_size=text.vocab_size,
        lora_parameters=lora,
        intermediate_size=getattr(text, "intermediate_size", 0) or 0,
    )


@dataclass
class RoleMemory:
    """One role's per-GPU estimate."""

    role: str
    ranks: int
    gpus_per_rank: float
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Bytes per GPU (of its share of the GPU when colocated)."""
        return sum(self.parts.values())


def trained_role(
    role: str, shape: ModelShape, model: Any, engine: Any, ranks: int, gpus_per_rank: float, sequence: int
) -> RoleMemory:
    """Estimate of a trained role (``model``: a ModelConfig, ``engine``: an EngineConfig)."""
    mixed = engine.precision != "fp32"
    if model.lora.enabled:
        base_bytes = 0.5 if model.quantization == "4bit" else 1.0 if model.quantization == "8bit" else 2.0
        states = model_state_bytes(shape.lora_parameters, engine.zero_stage, ranks, mixed, engine.offload_optimizer)
        parts = {"frozen base weights": shape.parameters * base_bytes, **states}
    else:
        parts = model_state_bytes(
            shape.parameters, engine.zero_stage, ranks, mixed, engine.offload_optimizer, engine.offload_params
        )
    parts["activations"] = activation_bytes(
        shape, engine.micro_batch_size, sequence, model.gradient_checkpointing, bytes_per_value=2 if mixed else 4
    )
    parts["CUDA context"] = CUDA_CONTEXT_BYTES
    return RoleMemory(role, ranks, gpus_per_rank, parts)


def frozen_role(
    role: str, shape: ModelShape, ranks: int, gpus_per_rank: float, micro_batch: int, sequence: int
) -> RoleMemory:
    """Estimate of a frozen role: bf16 weights and one inference pass."""
    parts = {
        "weights": 2.0 * shape.parameters,
        "activations": activation_bytes(shape, micro_batch, sequence, checkpointing=False, training=False),
        "CUDA context": CUDA_CONTEXT_BYTES,
    }
    return RoleMemory(role, ranks, gpus_per_rank, parts)


@dataclass
class Plan:
    """The estimate of a job on a set of GPUs."""

    roles: list[RoleMemory]
    gpu_sets: list[list[str]]  # roles sharing the same GPUs
    gpus_needed: int
    gpus_available: int
    gpu_memory: float
    headroom: float
    problems: list[str]

    @property
    def fits(self) -> bool:
        """Whether every GPU stays under its planned memory and there are GPUs enough."""
        return not self.problems


def _check(
    plan_roles: list[RoleMemory],
    sets: list[list[str]],
    gpus_needed: int,
    nodes: int,
    gpus_per_node: int,
    gpu_memory: float,
    headroom: float,
) -> Plan:
    by_role = {r.role: r for r in plan_roles}
    problems = []
    available = nodes * gpus_per_node
    if gpus_needed > available:
        problems.append(f"the job needs {gpus_needed} GPUs, the cluster has {nodes} x {gpus_per_node} = {available}")
    budget = gpu_memory * headroom
    for members in sets:
        total = sum(by_role[m].total for m in members if m in by_role)
        if total > budget:
            names = "+".join(members)
            worst = max((by_role[m] for m in members if m in by_role), key=lambda r: r.total)
            biggest = max(worst.parts.items(), key=lambda part: part[1])[0]
            problems.append(
                f"{names}: {total / GB:.1f} GB per GPU exceeds {budget / GB:.1f} GB ({headroom:.0%} of "
                f"{gpu_memory / GB:.0f} GB); the largest part is {worst.role}'s {biggest} "
                f"({worst.parts[biggest] / GB:.1f} GB): raise the ZeRO stage, offload, use gradient checkpointing, "
                "LoRA, or more GPUs"
            )
    for role in plan_roles:
        if role.gpus_per_rank and role.gpus_per_rank > gpus_per_node:
            problems.append(f"{role.role}: {role.gpus_per_rank:g} GPUs per rank, but a node has {gpus_per_node}")
    return Plan(plan_roles, sets, gpus_needed, available, gpu_memory, headroom, problems)


def plan_job(
    config: Any,
    job: str,
    nodes: int,
    gpus_per_node: int,
    gpu_memory: float,
    headroom: float = 0.9,
    shapes: dict[str, ModelShape] | None = None,
) -> Plan:
    """The plan of a job config (``sft``, ``rm``, ``dpo`` or ``ppo``) on ``nodes`` x ``gpus_per_node`` GPUs.

    ``shapes`` maps a model's ``name_or_path`` to its :class:`ModelShape` (else read with :func:`shape_of`).
    """
    shapes = dict(shapes or {})

    def shape(model: Any) -> ModelShape:
        if model.name_or_path not in shapes:
            lora = model.lora
            shapes[model.name_or_path] = shape_of(
                model.name_or_path, lora.r if lora.enabled else 0, tuple(lora.target_modules), model.trust_remote_code
            )
        return shapes[model.name_or_path]

    if job != "ppo":
        return _training_plan(config, job, shape, nodes, gpus_per_node, gpu_memory, headroom)
    return _ppo_plan(config, shape, nodes, gpus_per_node, gpu_memory, headroom)


def _training_plan(
    config: Any,
    job: str,
    shape: Callable[[Any], ModelShape],
    nodes: int,
    gpus_per_node: int,
    gpu_memory: float,
    headroom: float,
) -> Plan:
    """The plan of a training job (``sft``, ``rm``, ``dpo``): its one trained role on the job's workers."""
    sequence = config.data.max_length
    cluster = config.cluster
    gpus = cluster.gpus_per_worker or 1
    model = config.model
    role = trained_role(job, shape(model), model, config.engine, cluster.num_workers, gpus, sequence)
    if job == "dpo" and config.preference.reference == "live":
        reference = frozen_role(
            "reference", shape(model), cluster.num_workers, gpus, config.engine.micro_batch_size, sequence
        )
        role.parts["live reference weights"] = reference.parts["weights"]
    return _check([role], [[job]], math.ceil(cluster.num_workers * gpus), nodes, gpus_per_node, gpu_memory, headroom)


def _ppo_plan(
    config: Any,
    shape: Callable[[Any], ModelShape],
    nodes: int,
    gpus_per_node: int,
    gpu_memory: float,
    headroom: float,
) -> Plan:
    """The plan of a PPO job: its roles on their colocated GPU sets, and the rollout replicas on GPUs of their own."""
    from rlhf.rl.config import reward_models
    from rlhf.rl.roles import colocation_sets, value_model_config

    sequence = config.data.max_length
    r = config.roles
    gpus = r.gpus_per_worker or 1
    policy_shape = shape(config.policy)
    roles = [trained_role("policy", policy_shape, config.policy, config.engine, r.policy_workers, gpus, sequence)]
    if config.needs_reference:
        roles.append(
            frozen_role("reference", policy_shape, r.reference_workers, gpus, config.engine.micro_batch_size, sequence)
        )
    if config.needs_critic:
        value = value_model_config(config)
        roles.append(trained_role("value", shape(value), value, config.value_engine, r.value_workers, gpus, sequence))
    models = reward_models(config)  # every reward rank holds every reward model of the terms
    if models:
        roles.append(_reward_role(models, shape, r.reward_workers, gpus, sequence))
    names = [role.role for role in roles]
    sets = colocation_sets(r.colocate, names)
    counts = {role.role: role.ranks for role in roles}
    gpus_needed = math.ceil(sum(max(counts[m] for m in members) for members in sets) * gpus)
    # the rollout replicas: their own GPUs, vLLM fills them to its memory utilisation
    replica_gpus = config.rollout.num_replicas
    roles.append(_rollout_replica(config.rollout.num_replicas, policy_shape, gpu_memory))
    sets.append(["rollout replica"])
    return _check(roles, sets, gpus_needed + replica_gpus, nodes, gpus_per_node, gpu_memory, headroom)


def _reward_role(
    models: list[tuple[str, Path]], shape: Callable[[Any], ModelShape], ranks: int, gpus: float, sequence: int
) -> RoleMemory:
    """Estimate of the reward role: every reward model on every rank, with one CUDA context per rank."""
    from rlhf.models.config import ModelConfig

    parts: dict[str, float] = {}
    for name, directory in models:
        memory = frozen_role("reward", shape(ModelConfig(name_or_path=str(directory))), 1, gpus, 16, sequence)
        for part, size in memory.parts.items():
            # one CUDA context per rank, whatever the number of models; the rest per model
            parts[part if len(models) == 1 or part == "CUDA context" else f"{part} ({name})"] = size
    return RoleMemory("reward", ranks, gpus, parts)


def _rollout_replica(replicas: int, policy_shape: ModelShape, gpu_memory: float) -> RoleMemory:
    """Estimate of a vLLM rollout replica: the policy's bf16 weights, then the KV cache vLLM fills its GPU with."""
    replica = RoleMemory("rollout replica", replicas, 1.0, {})
    replica.parts["weights"] = 2.0 * policy_shape.parameters
    replica.parts["KV cache (the rest vLLM takes)"] = max(
        0.0, VLLM_GPU_MEMORY_UTILIZATION * gpu_memory - replica.parts["weights"]
    )
    return replica


def report(plan: Plan) -> str:
    """The plan as a table: per role and part, GB per GPU; the placement; the verdict."""
    lines = [f"{'role':<18} {'ranks':>5} {'part':<34} {'GB/GPU':>8}"]
    for role in plan.roles:
        for i, (part, value) in enumerate(role.parts.items()):
            lines.append(
                f"{role.role if i == 0 else '':<18} {role.ranks if i == 0 else '':>5} {part:<34} {value / GB:>8.2f}"
            )
        lines.append(f"{'':<18} {'':>5} {'total':<34} {role.total / GB:>8.2f}")
    lines.append("")
    lines.append("GPU sets (roles sharing GPUs): " + "; ".join("+".join(s) for s in plan.gpu_sets))
    lines.append(
        f"GPUs: {plan.gpus_needed} needed of {plan.gpus_available}; planned to {plan.headroom:.0%} of {plan.gpu_memory / GB:.0f} GB each"
    )
    lines.append("fits" if plan.fits else "does not fit:\n  - " + "\n  - ".join(plan.problems))
    return "\n".join(lines)


def parse_memory(text: str) -> float:
    """``80GB``, ``80G``, ``80``, ``141GiB`` as bytes (GB decimal, GiB binary)."""
    value = text.strip().upper()
    for suffix, scale in (("GIB", 2**30), ("GB", GB), ("G", GB)):
        if value.endswith(suffix):
            value, unit = value[: -len(suffix)], scale
            break
    else:
        unit = GB
    try:
        return float(value) * unit
    except ValueError:
        raise PlanError(f"--gpu-memory {text!r}: expected a size like 80GB") from None
