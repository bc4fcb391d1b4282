"""A gloo backend for vLLM's weight-transfer API: new policy weights reach CPU replicas over TCP, not files.

vLLM's weight-transfer API (``vllm.distributed.weight_transfer``) moves a trainer's
weights into running inference workers in three calls, ``start_weight_update``,
``update_weights`` and ``finish_weight_update``, over a process group that the trainer
and the workers open together once (``init_weight_transfer_engine``). Its built-in
backends (NCCL, CUDA IPC) need GPUs; this module adds the same contract on gloo, so CPU
replicas take the weights over TCP straight from the trainer's memory and the whole
path (handshake, pause, transfer, reload, timeouts) runs where there is no GPU.

The trainer (rank 0) and every inference worker (ranks ``rank_offset ...``) join a
stateless gloo group; the trainer broadcasts the parameters packed into buckets of at
most ``bucket_bytes`` (each tensor 16-byte aligned so the worker can view it in place),
and each worker loads a bucket into the model with vLLM's layerwise reload, the same
path its NCCL backend uses. Every collective has the group's timeout.

It registers as backend ``"gloo"`` through :func:`serving.weight_transfer.register`, a
``vllm.general_plugins`` entry point, so every vLLM process knows it.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar, cast

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

T = TypeVar("T")

ALIGN = 16
"""Byte alignment of every tensor inside a bucket (the widest dtype's element size, with room)."""

DEFAULT_BUCKET_BYTES = 256 * 2**20


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _nbytes(meta: ParamMeta) -> int:
    return math.prod(meta.shape) * meta.dtype.itemsize


def plan_buckets(metas: list[ParamMeta], bucket_bytes: int) -> list[int]:
    """How many consecutive parameters go into each bucket (a parameter larger than a bucket gets its own)."""
    counts: list[int] = []
    used = 0
    for meta in metas:
        size = _aligned(_nbytes(meta))
        if counts and used + size <= bucket_bytes:
            counts[-1] += 1
            used += size
        else:
            counts.append(1)
            used = size
    return counts


def packed_size(metas: list[ParamMeta]) -> int:
    """The bytes :func:`pack` takes for tensors of these shapes and dtypes."""
    return sum(_aligned(_nbytes(meta)) for meta in metas)


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes in one flat ``uint8`` CPU tensor, each at a 16-byte aligned offset."""
    flat = torch.zeros(sum(_aligned(t.numel() * t.element_size()) for t in tensors), dtype=torch.uint8)
    offset = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        flat[offset : offset + nbytes] = tensor.detach().contiguous().cpu().view(-1).view(torch.uint8)
        offset += _aligned(nbytes)
    return flat


def unpack(flat: torch.Tensor, metas: list[ParamMeta]) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views into ``flat`` as :func:`pack` laid them out."""
    out = []
    offset = 0
    for meta in metas:
        nbytes = _nbytes(meta)
        out.append((meta.name, flat[offset : offset + nbytes].view(meta.dtype).view(meta.shape)))
        offset += _aligned(nbytes)
    return out


def open_group(
    address: str, port: int, rank: int, world_size: int, timeout_s: float, listen: socket.socket | None = None
) -> ProcessGroup:
    """A gloo process group of its own (the default one is untouched); rank 0 hosts the rendezvous.

    Raises :class:`TimeoutError` when the other ranks have not all joined within ``timeout_s``.
    """
    import time

    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    started = time.monotonic()
    try:
        group = stateless_init_torch_distributed_process_group(
            address, port, rank, world_size, "gloo", listen_socket=listen, timeout=timedelta(seconds=timeout_s)
        )
        return cast("ProcessGroup", group)  # without return_store, the group alone
    except Exception as exc:  # the store's own error can be a closed socket's, not its timeout's
        where = f"the weight-transfer group at {address}:{port} (rank {rank} of {world_size})"
        if time.monotonic() - started >= 0.9 * timeout_s:
            raise TimeoutError(f"{where}: not every rank joined within {timeout_s:.1f} s") from exc
        raise RuntimeError(f"{where} could not be opened: {exc}") from exc


def broadcast(group: Any, tensor: torch.Tensor) -> None:
    """Broadcast ``tensor`` (a CPU tensor: the group is gloo) from the group's rank 0, in place; raises after the
    group's timeout."""
    from cluster.collectives import broadcast as broadcast_on

    broadcast_on(tensor, group)


def _metas(names: list[str], dtype_names: list[str], shapes: list[list[int]]) -> list[ParamMeta]:
    return [
        ParamMeta(name, getattr(torch, dtype), tuple(shape))
        for name, dtype, shape in zip(names, dtype_names, shapes, strict=True)
    ]


def _split(items: list[T], counts: list[int]) -> Iterator[list[T]]:
    start = 0
    for count in counts:
        yield items[start : start + count]
        start += count


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """What an inference worker needs to join the trainer's group."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 300.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One round's parameters, in the order they are sent, and how many go into each bucket."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    buckets: list[int]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes) == sum(self.buckets):
            raise ValueError(
                f"gloo update info: {len(self.names)} names, {len(self.dtype_names)} dtypes, "
                f"{len(self.shapes)} shapes and buckets of {sum(self.buckets)} parameters must agree"
            )


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """The inference worker's side: receive the buckets and load them with vLLM's layerwise reload."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group: ProcessGroup | None = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        """Join the trainer's group (replacing any group of an earlier trainer)."""
        self.shutdown()  # a new trainer (after a recovery) replaces the old group
        parallel = self.parallel_config
        rank = parallel.data_parallel_index * parallel.world_size + parallel.rank + init_info.rank_offset
        self.group = open_group(
            init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s
        )

    def start_weight_update(self) -> None:
        """Begin vLLM's layerwise reload: each layer is processed once all its weights have arrived."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        """End the layerwise reload; a layer that received nothing keeps its weights, except a tied output layer,
        which follows its embeddings (:mod:`serving.vllm_worker`)."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        from serving.vllm_worker import refresh_tied_output_layers

        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_output_layers(self.model)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        """Receive every bucket and load it into the model (in the engine's dtype)."""
        if self.group is None:
            raise RuntimeError("gloo weight transfer is not initialized: call init_weight_transfer_engine first")
        metas = _metas(update_info.names, update_info.dtype_names, update_info.shapes)
        dtype = self.model_config.dtype  # the engine's own: each tensor is converted once, here
        if not isinstance(dtype, torch.dtype):
            raise RuntimeError(f"gloo weight transfer: the engine's dtype is unresolved ({dtype!r})")
        try:
            for bucket in _split(metas, update_info.buckets):
                flat = torch.empty(packed_size(bucket), dtype=torch.uint8)
                broadcast(self.group, flat)
                # torch types a Module's attributes as Tensor | Module; vLLM's models define load_weights
                self.model.load_weights(  # type: ignore[operator]
                    [
                        (name, tensor.to(self.device, dtype if tensor.is_floating_point() else tensor.dtype))
                        for name, tensor in unpack(flat, bucket)
                    ]
                )
        except BaseException:
            # the trainer failed or went away mid-transfer: put every layer not yet loaded back as it was,
            # so the model stays whole (partly updated) and the next transfer can start afresh
            self.finish_weight_update()
            raise

    def shutdown(self) -> None:
        """Drop the group."""
        self.group = None


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """The trainer's side of the handshake: where rank 0 listens and how many ranks join."""

    backend: ClassVar[str] = "gloo"

    master_address: str
    master_port: int
    world_size: int
    timeout_s: float = 300.0
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    listen_socket: socket.socket | None = None
    """Rank 0's socket, already bound to ``master_port`` (no other process can take the port meanwhile)."""


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """The trainer's side: rank 0 drives the inference side through ``client`` and broadcasts the buckets."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(
        self, *, client: VLLMWeightSyncClient, source: WeightSource, is_sender: bool, bucket_bytes: int
    ) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group: ProcessGroup | None = None

    @classmethod
    def trainer_init(
        cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient, source: WeightSource | None = None
    ) -> Self:
        """Rank 0: open the group together with the workers (their join runs alongside); other ranks: no-op."""
        if source is None:
            raise ValueError("gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine  # other trainer ranks only take part in gathering the weights
        worker_info = GlooInitInfo(
            init_info.master_address, init_info.master_port, 1, init_info.world_size, init_info.timeout_s
        )
        # the workers block in init_weight_transfer_engine until every rank has joined: join alongside them
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            try:
                engine.group = open_group(
                    init_info.master_address,
                    init_info.master_port,
                    0,
                    init_info.world_size,
                    init_info.timeout_s,
                    init_info.listen_socket,
                )
            except Exception:
                # the workers did not join: their call (which has its own deadline) says why better than the store
                if (failure := joined.exception()) is not None:
                    raise failure from None
                raise
            joined.result()
        return engine

    def send_weights(self) -> None:
        """One round: start the update, broadcast the buckets while the workers receive them, finish it."""
        assert self.source is not None
        metas = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # gathering may be a collective among the trainer's ranks
                pass
            return
        counts = plan_buckets(metas, self.bucket_bytes)
        update = GlooUpdateInfo(
            names=[m.name for m in metas],
            dtype_names=[str(m.dtype).removeprefix("torch.") for m in metas],
            shapes=[list(m.shape) for m in metas],
            buckets=counts,
        )
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            received = pool.submit(self.client.update_weights, asdict(update))
            pairs = iter(self.source)
            for bucket in _split(metas, counts):
                tensors = []
                for meta in bucket:
                    name, tensor = next(pairs)
                    if name != meta.name or tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
                        raise ValueError(
                            f"weight source yielded {name} {tensor.dtype} {tuple(tensor.shape)} where its metadata "
                            f"declared {meta.name} {meta.dtype} {meta.shape}"
                        )
                    tensors.append(tensor)
                if received.done():
                    received.result()  # the workers failed before the broadcast: say why instead of waiting
                broadcast(self.group, pack(tensors))
            received.result()
        finally:
            pool.shutdown(wait=False)  # after a failed broadcast the workers' call returns only at their timeout
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        """Drop the group."""
        self.group = None
