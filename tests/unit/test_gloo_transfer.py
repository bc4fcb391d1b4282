"""The gloo weight-transfer backend's wire format, and its trainer engine against a real gloo peer process."""

from __future__ import annotations

import multiprocessing
import socket
import time
from typing import Any

import pytest
import torch

from serving.gloo_transfer import (
    ALIGN,
    GlooTrainerInitInfo,
    GlooTrainerWeightTransferEngine,
    GlooUpdateInfo,
    ParamMeta,
    broadcast,
    open_group,
    pack,
    packed_size,
    plan_buckets,
    unpack,
)


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(7, 3, generator=generator),
        "model.layers.0.input_layernorm.weight": torch.randn(3, generator=generator).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(5, 3, generator=generator),
        "model.layers.0.step": torch.tensor([11], dtype=torch.int64),
        "lm_head.weight": torch.randn(1, generator=generator).to(torch.float16),
    }


def _metas(tensors: dict[str, torch.Tensor]) -> list[ParamMeta]:
    return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def test_pack_and_unpack_round_trip_mixed_dtypes_at_aligned_offsets() -> None:
    tensors = _tensors()
    flat = pack(list(tensors.values()))
    assert flat.dtype == torch.uint8 and flat.numel() % ALIGN == 0
    out = unpack(flat, _metas(tensors))
    assert [name for name, _ in out] == list(tensors)
    for (_, received), sent in zip(out, tensors.values(), strict=True):
        assert received.dtype == sent.dtype and received.shape == sent.shape
        assert torch.equal(received, sent)
        assert (received.data_ptr() - flat.data_ptr()) % ALIGN == 0


def test_buckets_hold_at_most_their_size_and_a_larger_parameter_gets_its_own() -> None:
    metas = [ParamMeta(f"p{i}", torch.float32, (n,)) for i, n in enumerate([4, 4, 4, 100, 4, 1])]  # bytes: 16 ... 400
    counts = plan_buckets(metas, bucket_bytes=48)
    assert counts == [3, 1, 2]  # 3 x 16 bytes fill the first; the 400-byte one alone; the rest together
    assert sum(counts) == len(metas)
    assert plan_buckets(metas, bucket_bytes=10**9) == [6]


def test_update_info_that_does_not_add_up_is_refused() -> None:
    with pytest.raises(ValueError, match="must agree"):
        GlooUpdateInfo(names=["a", "b"], dtype_names=["float32"], shapes=[[1], [1]], buckets=[2])
    with pytest.raises(ValueError, match="must agree"):
        GlooUpdateInfo(names=["a"], dtype_names=["float32"], shapes=[[1]], buckets=[2])


def _peer(port: int, commands: Any, answers: Any) -> None:
    """An inference worker's side of the wire, in its own process: join as rank 1, then receive each update."""
    group = open_group("127.0.0.1", port, 1, 2, timeout_s=20)
    answers.put("joined")
    while (info := commands.get(timeout=60)) is not None:
        metas = [
            ParamMeta(n, getattr(torch, d), tuple(s))
            for n, d, s in zip(info.names, info.dtype_names, info.shapes, strict=True)
        ]
        received = {}
        start = 0
        for count in info.buckets:
            bucket = metas[start : start + count]
            start += count
            flat = torch.empty(packed_size(bucket), dtype=torch.uint8)
            broadcast(group, flat)
            received |= {name: tensor.clone() for name, tensor in unpack(flat, bucket)}
        answers.put(received)


class _PeerClient:
    """The control plane with a gloo peer process standing in for the replica's worker."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.commands, self.answers = context.Queue(), context.Queue()
        self.context = context
        self.process: Any = None
        self.calls: list[str] = []
        self.received: dict[str, torch.Tensor] = {}

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.calls.append("init")
        assert init_info["rank_offset"] == 1 and init_info["world_size"] == 2
        self.process = self.context.Process(
            target=_peer, args=(init_info["master_port"], self.commands, self.answers), daemon=True
        )
        self.process.start()
        assert self.answers.get(timeout=60) == "joined"

    def start_weight_update(self) -> None:
        self.calls.append("start")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.calls.append("update")
        self.commands.put(GlooUpdateInfo(**update_info))
        self.received = self.answers.get(timeout=60)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.calls.append("finish")

    def close(self) -> None:
        self.commands.put(None)
        self.process.join(timeout=30)


class _Source:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def metadata(self) -> list[ParamMeta]:
        return _metas(self.tensors)

    def __iter__(self):
        return iter(self.tensors.items())


def _listening() -> tuple[socket.socket, int]:
    listen = socket.socket()
    listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listen.bind(("127.0.0.1", 0))
    listen.listen()
    return listen, listen.getsockname()[1]


def test_the_trainer_engine_sends_every_tensor_over_gloo_in_buckets_twice() -> None:
    """trainer_init's handshake and two rounds of send_weights against a real gloo peer in another process."""
    tensors = _tensors()
    listen, port = _listening()
    client = _PeerClient()
    info = GlooTrainerInitInfo("127.0.0.1", port, 2, timeout_s=30, bucket_bytes=64, rank=0, listen_socket=listen)
    engine = GlooTrainerWeightTransferEngine.trainer_init(info, client=client, source=_Source(tensors))
    try:
        for round_ in range(2):
            for tensor in tensors.values():
                tensor += 1  # new weights each round
            engine.send_weights()
            assert client.calls[-3:] == ["start", "update", "finish"], round_
            assert list(client.received) == list(tensors)
            assert all(torch.equal(client.received[name], tensor) for name, tensor in tensors.items())
        assert len(plan_buckets(_metas(tensors), 64)) > 1  # the tensors travelled in several buckets
    finally:
        client.close()


def test_a_source_that_disagrees_with_its_metadata_is_named_before_anything_is_sent() -> None:
    class Liar(_Source):
        def __iter__(self):
            for name, tensor in self.tensors.items():
                yield name, tensor.double()

    engine = GlooTrainerWeightTransferEngine(
        client=_Recorder(), source=Liar(_tensors()), is_sender=True, bucket_bytes=64
    )
    with pytest.raises(ValueError, match="model.embed_tokens.weight torch.float64"):
        engine.send_weights()


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.calls.append("init")

    def start_weight_update(self) -> None:
        self.calls.append("start")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        time.sleep(5)  # a worker waiting in its broadcast

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.calls.append("finish")


def test_workers_that_never_join_fail_the_handshake_within_its_timeout() -> None:
    listen, port = _listening()
    client = _Recorder()
    info = GlooTrainerInitInfo("127.0.0.1", port, 2, timeout_s=2, rank=0, listen_socket=listen)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"127.0.0.1:{port} \(rank 0 of 2\): not every rank joined within 2.0 s"):
        GlooTrainerWeightTransferEngine.trainer_init(info, client=client, source=_Source(_tensors()))
    assert time.monotonic() - started < 20
    assert client.calls == ["init"]
