"""The one training engine: a thin wrapper over ``deepspeed.initialize``.

Every trainer uses it: the Ray Train workers of ``rlhf sft|rm|dpo`` and the trainable
role actors of ``rlhf ppo`` alike. Each process is one rank of a data-parallel group.

Loss contract (what makes sharding and accumulation exact): the loss passed to
:meth:`TrainingEngine.backward` is this micro-batch's share of the *global* step loss,
i.e. a sum over its items divided by the item count of the whole optimizer step across
all ranks and micro-batches (see ``rlhf.algos``' ``num_tokens``/``num_items``
arguments). DeepSpeed averages gradients over ranks; the engine multiplies by the
world size and does not divide by the accumulation steps, so the applied gradient is
exactly the gradient of the global loss: micro-batch 1 x accumulation 8 equals
micro-batch 8 x accumulation 1, and 2 ranks equal 1 rank with the whole batch.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from rlhf.models.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """DeepSpeed ZeRO, precision, optimizer and schedule of one trainable model."""

    zero_stage: int = field(default=0, metadata={"help": "DeepSpeed ZeRO stage: 0 (plain DDP), 1, 2 or 3"})
    offload_optimizer: bool = field(default=False, metadata={"help": "keep optimizer states in CPU memory"})
    offload_params: bool = field(default=False, metadata={"help": "keep parameters in CPU memory (ZeRO-3 only)"})
    precision: Literal["auto", "bf16", "fp32"] = field(
        default="auto", metadata={"help": "auto: bf16 on GPUs that support it, fp32 otherwise"}
    )
    micro_batch_size: int = field(default=4, metadata={"help": "sequences (or pairs) per rank per forward pass"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    adam_betas: tuple[float, ...] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm (0: no clipping)"})
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(
        default="cosine", metadata={"help": "learning-rate decay after warm-up"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "optimizer steps of linear warm-up"})
    collective_timeout_s: float = field(
        default=600.0, metadata={"help": "seconds before a stuck collective fails with an error instead of hanging"}
    )

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.micro_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("micro_batch_size and gradient_accumulation_steps must be at least 1")
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas needs two values, got {list(self.adam_betas)}")


def use_bf16(precision: str) -> bool:
    """Whether ``precision`` resolves to bf16 on this device."""
    import torch

    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def deepspeed_config(config: EngineConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``config`` on ``world_size`` data-parallel ranks."""
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if config.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if config.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.micro_batch_size * config.gradient_accumulation_steps * world_size,
        # the plain fp32 ZeRO-0 path is clipped by TrainingEngine.step, which needs the norm anyway
        "gradient_clipping": 0.0 if clips_itself(config) else config.max_grad_norm,
        "bf16": {"enabled": use_bf16(config.precision)},
        "zero_optimization": zero,
        # the client optimizer is torch's AdamW; DeepSpeed's CPU Adam would need a JIT build
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def effective_zero_stage(config: EngineConfig, world_size: int) -> int:
    """The ZeRO stage the engine runs ``config`` with on ``world_size`` ranks.

    On one rank, stages 1 and 2 partition nothing (that rank holds every gradient and optimizer state), yet
    DeepSpeed still reduces the gradients into flat buckets and steps a flat fp32 copy of the parameters, then
    copies it back: the same update as stage 0, and slower (DPO on SmolLM2, ``benchmarks/dpo.py``: +454 ms in the
    backward and +387 ms in the optimizer step on a 1,614 ms step of stage 0). There they run as stage 0, whose
    checkpoints a later run resumes on one rank. With ``offload_optimizer`` they stay: moving the optimizer to the
    CPU is then the point.
    """
    if world_size == 1 and config.zero_stage in (1, 2) and not config.offload_optimizer:
        return 0
    return config.zero_stage


def clips_itself(config: EngineConfig) -> bool:
    """Whether :class:`TrainingEngine` clips gradients itself (fp32 ZeRO-0) rather than DeepSpeed."""
    return config.zero_stage == 0 and not use_bf16(config.precision)


def save_rng_state(path: Path) -> None:
    """Write this process's Python, NumPy, torch and CUDA generator states to ``path`` (via a temporary name).

    Only tensors, lists, tuples and numbers: ``torch.load(path, weights_only=True)`` reads it back, so loading a
    checkpoint never unpickles arbitrary objects.
    """
    import numpy as np
    import torch

    legacy = np.random.get_state()  # a dict only when the global generator is not MT19937
    if not isinstance(legacy, tuple):
        raise RuntimeError(f"numpy's global generator has no legacy state to save: {legacy.get('bit_generator')}")
    name, keys, position, has_gauss, cached_gaussian = legacy
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_rng_state(path: Path) -> None:
    """Restore the generator states :func:`save_rng_state` wrote to ``path``.

    A file of the earlier format (a pickled NumPy array, which ``weights_only=True`` refuses) is refused with
    a message saying so: loading it would need ``weights_only=False``, which runs whatever the file holds.
    """
    import pickle

    import numpy as np
    import torch

    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: this RNG state cannot be read with torch.load(weights_only=True); it was written by an "
            "earlier rlhf (which pickled NumPy arrays) or is damaged. Resume from a checkpoint written by this "
            f"version, or delete {path.name} to resume without restoring this rank's random generators"
        ) from exc
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keep_freed_memory() -> bool:
    """Keep the memory this process frees for its own next allocations, as torch's caching allocator does on a GPU.

    On the CPU, glibc's malloc gives each large block (a step's activations, logits, gradients) a mapping of its own
    and unmaps it when the block is freed, so every step faults all its pages in again. Where steps follow one
    another closely, that costs little; where other work runs between them (generation between the PPO policy's
    updates), the pages are gone and the faults cost more than the arithmetic (measured: a 57.4M-parameter
    policy's forward took 5.6 s in its actor, 6.3 s of it system time over 600k page faults, against 2.2 s with
    the memory kept). Here large blocks come from the heap (``M_MMAP_MAX`` 0) and the heap is never trimmed
    (``M_TRIM_THRESHOLD`` -1): the process stays at its peak resident memory, as a GPU process does. A thread other
    than the main one (a Ray Train worker's training loop) allocates from an arena of its own, where glibc still maps
    blocks above 64 MiB on their own; smaller ones are kept there too. Called by every process that trains or scores
    on the CPU; returns whether it applied (glibc only; elsewhere nothing changes). CPU replicas keep theirs through
    the same settings in their environment (``serving.backends.KEEP_FREED_MEMORY_ENV``).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))


def _quiet_deepspeed() -> None:
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


class TrainingEngine:
    """One rank of a DeepSpeed-wrapped model with its AdamW optimizer and LR schedule.

    Use: ``loss = ...(engine(**batch))``; ``engine.backward(loss)``; ``engine.step()``
    once per micro-batch. The optimizer steps at each accumulation boundary;
    :meth:`step` then returns ``{"grad_norm", "lr"}`` (else ``None``).
    """

    def __init__(self, model: torch.nn.Module, config: EngineConfig, total_steps: int) -> None:
        import deepspeed
        import torch
        import torch.distributed as dist
        from transformers import get_scheduler

        _quiet_deepspeed()
        from cluster.process_group import init_process_group

        init_process_group(config.collective_timeout_s)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        config = replace(config, zero_stage=effective_zero_stage(config, self.world_size))
        self.config = config
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for param in model.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        trainable = decay + no_decay
        optimizer = torch.optim.AdamW(
            # DeepSpeed drops empty groups after the scheduler below has counted them (a LoRA model
            # has no trainable 1-d parameters), and the scheduler then fails on its first step
            [group for group in groups if group["params"]],
            lr=config.learning_rate,
            betas=(config.adam_betas[0], config.adam_betas[1]),  # two values (EngineConfig checks)
            eps=config.adam_eps,
            # one fused kernel instead of a per-parameter loop (CPU and CUDA, float parameters)
            fused=bool(trainable)
            and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trainable),
        )
        name = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
        scheduler = get_scheduler(
            name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=max(total_steps, 1)
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(config, self.world_size),
            dist_init_required=False,
        )
        # from_pretrained returns the model in eval mode, where transformers skips gradient checkpointing and dropout
        self.engine.train()
        self.device = self.engine.device
        if self.device.type == "cpu":
            keep_freed_memory()
        if self.world_size == 1 and config.zero_stage == 0:
            self.engine.enable_backward_allreduce = False  # averaging over one rank only copies gradients

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped model (under ZeRO-3 its parameters are partitioned)."""
        return self.engine.module

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far."""
        return self.engine.global_steps

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward pass through the wrapped model."""
        return self.engine(*args, **kwargs)

    def train(self) -> None:
        """Put the model in training mode."""
        self.engine.train()

    def eval(self) -> None:
        """Put the model in evaluation mode."""
        self.engine.eval()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss``, this micro-batch's share of the global step loss."""
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> dict[str, float] | None:
        """End a micro-batch; at an accumulation boundary clip, step optimizer and schedule, return stats."""
        import torch

        boundary = self.engine.is_gradient_accumulation_boundary()
        norm = None
        if boundary and clips_itself(self.config):
            # the gradients are already averaged over ranks here, so this norm is the global one
            params = [p for p in self.engine.module.parameters() if p.grad is not None]
            if not params:
                norm = torch.zeros(())
            elif self.config.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.engine.step()
        if not boundary:
            return None
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return {"grad_norm": float(norm) if norm is not None else float("nan"), "lr": self.scheduler.get_last_lr()[0]}

    def save_checkpoint(self, directory: str | Path, client_state: dict[str, Any] | None = None) -> None:
        """Write a resumable checkpoint (weights, optimizer, scheduler, this rank's RNG) to ``directory``."""
        directory = Path(directory)
        self.engine.save_checkpoint(str(directory), tag="state", client_state=client_state or {})
        save_rng_state(directory / f"rng_rank{self.rank}.pt")

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save_checkpoint`; return its client state."""
        directory = Path(directory)
        path, client_state = self.engine.load_checkpoint(str(directory), tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
        rng_file = directory / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            load_rng_state(rng_file)
        return client_state or {}

    def export(self, output_dir: str | Path, tokenizer: Any, base_config: ModelConfig | None = None) -> Path | None:
        """Write the full model in Hugging Face format from rank 0 (gathering ZeRO-3 shards); all ranks call it.

        Under ZeRO-3 the partitioned parameters are gathered onto every rank for the
        duration of the save; a LoRA model writes its adapter (and the merged model when
        ``base_config.lora.merge_on_save``).
        """
        import deepspeed

        from cluster.collectives import barrier
        from rlhf.models.loading import save_pretrained

        merge = base_config.lora.merge_on_save if base_config is not None else False
        module = self.engine.module
        result = None
        if self.config.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                if self.rank == 0:
                    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                    result = save_pretrained(module, tokenizer, output_dir, state, base_config, merge)
        elif self.rank == 0:
            result = save_pretrained(module, tokenizer, output_dir, None, base_config, merge)
        barrier()
        return result
