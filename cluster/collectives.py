"""The one way into ``torch.distributed`` collectives: each gets its tensors on its backend's device.

The rule: NCCL takes CUDA tensors only (a CPU tensor handed to an NCCL collective fails, e.g. "No backend
type associated with device type cpu"); gloo, the CPU backend, takes CPU tensors. The device a collective
needs is a fact of the group's backend, not of the caller, so it is derived here once
(:func:`backend_device`) and every collective of ``rlhf``, ``serving`` and ``cluster`` goes through this
module: :func:`all_reduce_sum`, :func:`barrier`, :func:`broadcast`. A tensor on another device is refused
with :class:`WrongDeviceError`, naming the collective, the backend and both devices, before it reaches the
backend. ``tests/unit/test_collectives.py`` scans the source and fails on a collective called anywhere else.

DeepSpeed's and vLLM's own collectives (gradient reduction, ZeRO gathers, vLLM's NCCL weight transfer) are
theirs; what we hand them (parameters, the weight source's tensors) lives on the engine's device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class WrongDeviceError(RuntimeError):
    """A tensor on a device its collective's backend does not take (a bug in the caller)."""


def backend(group: Any = None) -> str | None:
    """The backend of ``group`` (a ``ProcessGroup``, also one not registered with ``torch.distributed``, such
    as vLLM's stateless groups), or of the default group; ``None`` when no default group exists."""
    if group is not None:
        name: str = group.name()
        return name
    return dist.get_backend() if dist.is_initialized() else None


def backend_device(backend_name: str) -> torch.device:
    """The device whose tensors ``backend_name``'s collectives take: nccl -> this process's current CUDA
    device; gloo (and any other CPU backend) -> cpu."""
    if backend_name == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_device(tensor: torch.Tensor, backend_name: str, collective: str) -> None:
    """Raise :class:`WrongDeviceError` unless ``tensor`` is on ``backend_name``'s device."""
    expected = backend_device(backend_name)
    if tensor.device != expected:
        raise WrongDeviceError(
            f"{collective}: a tensor on {tensor.device} handed to a {backend_name} collective, which takes "
            f"tensors on {expected} (NCCL takes CUDA tensors only, gloo CPU tensors)"
        )


def all_reduce_sum(*values: Any) -> list[float]:
    """Sum each value (number or 0-dim tensor, on any device) over all ranks; floats in the same order.

    Without a process group, the values themselves. With one (also of a single rank, so that one-GPU runs
    take the path many-GPU runs take), one float64 all-reduce on the backend's device.
    """
    name = backend()
    if name is None:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=backend_device(name))
    check_device(tensor, name, "all_reduce_sum")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()  # read back on the host


def barrier() -> None:
    """Wait until every rank of the default group arrives (no-op without one).

    NCCL runs a barrier as an all-reduce on a device; it is named here (this process's current CUDA device)
    instead of left to torch's guess.
    """
    name = backend()
    if name is None:
        return
    if name == "nccl":
        dist.barrier(device_ids=[backend_device(name).index])
    else:
        dist.barrier()


def broadcast(tensor: torch.Tensor, group: Any = None) -> None:
    """Broadcast ``tensor`` in place from rank 0 of ``group`` (a ``ProcessGroup``, also an unregistered one;
    default: the default group); a wrong device raises before the backend sees it, a stuck peer after the
    group's timeout."""
    group = group if group is not None else dist.group.WORLD
    name = backend(group)
    if name is None:
        raise RuntimeError("broadcast: no process group was given and no default group exists")
    check_device(tensor, name, "broadcast")
    options = dist.BroadcastOptions()
    options.rootRank = 0
    options.rootTensor = 0
    group.broadcast([tensor], options).wait()
