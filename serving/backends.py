"""What kind of device the replicas run on, and what follows from it: the weight-transfer backend."""

from __future__ import annotations


def on_gpu() -> bool:
    """Whether the Ray cluster this process is connected to has GPUs."""
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def backend(gpu: bool) -> str:
    """The weight-transfer backend of replicas on GPUs (NCCL) or CPUs (gloo)."""
    return "nccl" if gpu else "gloo"
