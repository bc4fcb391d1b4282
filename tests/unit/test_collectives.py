"""Every collective gets its tensors on its backend's device, through ``cluster.collectives``.

Before: ``rlhf.jobs.worker.all_reduce_sum`` all-reduced a CPU tensor, and the Ray Train process group on GPUs
is NCCL, which takes CUDA tensors only: every multi-GPU SFT/RM/DPO/KTO run failed at its first step. Two
checks hold the rule: a scan of the source (no collective is called outside the helper) and the real callers
driven against a stood-in NCCL backend that, as NCCL does, refuses tensors that are not on CUDA.

NCCL and CUDA cannot run here. The stand-in: ``torch.distributed`` reports an initialized "nccl" group of 2
ranks, its collectives are recorders, and a tensor the code asks for on ``cuda:0`` is made on the CPU but
reports ``cuda:0`` (:class:`CudaStandIn`), so the values still flow. The real NCCL path is checked by
``make gpu-check`` (``tests/gpu/check.py``) on a machine with a GPU.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from cluster import collectives

ROOT = Path(__file__).resolve().parents[2]
HELPER = ROOT / "cluster" / "collectives.py"

# torch.distributed's collectives, by their function names (called as dist.NAME, torch.distributed.NAME, or
# imported from torch.distributed)
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor", "reduce", "gather", "gather_object",
    "scatter", "scatter_object_list", "broadcast", "broadcast_object_list", "send", "recv", "isend", "irecv",
    "send_object_list", "recv_object_list", "batch_isend_irecv", "barrier", "monitored_barrier", "all_to_all",
    "all_to_all_single",
}  # fmt: skip
# a ProcessGroup's own collectives (vLLM's stateless groups are used this way); only names that no tensor,
# socket or Ray method shares (gather, scatter, reduce, send, recv are left to the import check above)
GROUP_METHODS = {
    "allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced", "allgather_into_tensor_coalesced",
    "broadcast", "barrier", "alltoall", "alltoall_base", "reduce_scatter", "reduce_scatter_tensor_coalesced",
    "all_reduce", "all_gather", "all_to_all", "monitored_barrier",
}  # fmt: skip


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` of an attribute chain of names, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)) is not None:
        return f"{base}.{node.attr}"
    return None


def collective_calls(source: str) -> list[tuple[int, str]]:
    """(line, callee) of every call in ``source`` that is a torch.distributed or ProcessGroup collective."""
    tree = ast.parse(source)
    modules = {"torch.distributed"}  # names bound to torch.distributed
    functions: set[str] = set()  # names bound to one of its collectives
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch.distributed" and alias.asname:
                    modules.add(alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.distributed"):
            for alias in node.names:
                if node.module == "torch" and alias.name == "distributed":
                    modules.add(alias.asname or alias.name)
                elif node.module == "torch.distributed" and alias.name in COLLECTIVES:
                    functions.add(alias.asname or alias.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        callee = _dotted(node.func) or ""
        module, _, name = callee.rpartition(".")
        if (module in modules and name in COLLECTIVES) or callee in functions:
            found.append((node.lineno, callee))
        elif isinstance(node.func, ast.Attribute) and node.func.attr in GROUP_METHODS and module not in modules:
            found.append((node.lineno, ast.unparse(node.func)))
    return found


def test_the_scan_finds_collectives_however_they_are_named() -> None:
    source = (
        "import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
        "from torch.distributed import all_gather as gather_all\n"
        "dist.all_reduce(t)\ntorch.distributed.barrier()\nd2.broadcast(t, 0)\ngather_all(out, t)\n"
        "group.broadcast([t], options).wait()\ntorch.gather(t, 0, i)\nfunctools.reduce(f, xs)\nsock.send(b'')\n"
    )
    assert collective_calls(source) == [
        (5, "dist.all_reduce"),
        (6, "torch.distributed.barrier"),
        (7, "d2.broadcast"),
        (8, "gather_all"),
        (9, "group.broadcast"),
    ]


def test_every_collective_of_the_project_goes_through_the_helper() -> None:
    """Before: rlhf/jobs/worker.py (dist.all_reduce), rlhf/engine.py (dist.barrier) and serving/gloo_transfer.py
    (group.broadcast) called collectives of their own."""
    outside = [
        f"{path.relative_to(ROOT)}:{line}: {callee}"
        for package in ("rlhf", "cluster", "serving")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != HELPER
        for line, callee in collective_calls(path.read_text())
    ]
    assert outside == [], "collectives called outside cluster/collectives.py:\n" + "\n".join(outside)


def test_the_backend_device_is_the_current_cuda_device_for_nccl_and_the_cpu_otherwise(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.backend_device("nccl") == torch.device("cuda", 3)
    assert collectives.backend_device("gloo") == torch.device("cpu")


def test_a_tensor_on_the_wrong_device_is_refused_naming_backend_and_devices(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(collectives.WrongDeviceError, match=r"broadcast: a tensor on cpu handed to a nccl .* cuda:0"):
        collectives.check_device(torch.zeros(2), "nccl", "broadcast")
    with pytest.raises(collectives.WrongDeviceError, match=r"on meta handed to a gloo .* on cpu"):
        collectives.check_device(torch.zeros(2, device="meta"), "gloo", "broadcast")
    collectives.check_device(torch.zeros(2), "gloo", "broadcast")


def test_without_a_process_group_the_values_are_returned_and_nothing_is_called(monkeypatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no collective without a process group")

    monkeypatch.setattr(dist, "all_reduce", refuse)
    monkeypatch.setattr(dist, "barrier", refuse)
    assert not dist.is_initialized()
    assert collectives.all_reduce_sum(1, torch.tensor(2.5), 3.0) == [1.0, 2.5, 3.0]
    collectives.barrier()


class CudaStandIn(torch.Tensor):
    """A CPU tensor that reports ``cuda:0``: what a CUDA tensor is to NCCL, on a machine without CUDA.

    Every operation runs on the CPU data inside and returns plain CPU tensors.
    """

    @staticmethod
    def __new__(cls, data: torch.Tensor, device: torch.device) -> CudaStandIn:
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, device=device)

    def __init__(self, data: torch.Tensor, device: torch.device) -> None:
        self.data_on_cpu = data

    def __repr__(self) -> str:
        return f"CudaStandIn({self.data_on_cpu.tolist()}, device={self.device})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        def unwrap(value: Any) -> Any:
            return value.data_on_cpu if isinstance(value, CudaStandIn) else value

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


class MakeCudaStandIns(TorchFunctionMode):
    """``torch.tensor(..., device=<cuda>)`` gives a :class:`CudaStandIn`; everything else runs as it is."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func is torch.tensor and isinstance(device, torch.device | str) and torch.device(device).type == "cuda":
            return CudaStandIn(func(*args, **{**kwargs, "device": "cpu"}), torch.device(device))
        return func(*args, **kwargs)


@pytest.fixture
def nccl(monkeypatch) -> SimpleNamespace:
    """A stood-in NCCL default group of 2 ranks on ``cuda:0``; the other rank holds the same values as this one.

    Its all-reduce refuses a tensor that is not on CUDA, as NCCL does; its barrier refuses to be left without a
    device (our rule: torch would guess the device of NCCL's barrier). Each call is recorded as (collective,
    device, dtype).
    """
    calls: list[tuple[str, torch.device, torch.dtype | None]] = []

    def all_reduce(tensor: torch.Tensor, op: Any = None, group: Any = None, async_op: bool = False) -> None:
        if tensor.device.type != "cuda":
            raise RuntimeError(f"stood-in NCCL all_reduce: tensors must be CUDA tensors, got one on {tensor.device}")
        calls.append(("all_reduce", tensor.device, tensor.dtype))
        tensor.mul_(2)  # this rank's values plus the other rank's equal ones

    def barrier(group: Any = None, async_op: bool = False, device_ids: list[int] | None = None) -> None:
        if device_ids is None:
            raise RuntimeError("stood-in NCCL barrier: no device named for the barrier's all-reduce")
        calls.append(("barrier", torch.device("cuda", device_ids[0]), None))

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "barrier", barrier)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with MakeCudaStandIns():
        yield SimpleNamespace(calls=calls, device=torch.device("cuda", 0))


def test_the_stand_in_refuses_a_cpu_tensor_as_nccl_does(nccl: SimpleNamespace) -> None:
    """The stand-in can fail: a CPU tensor handed to its all-reduce raises."""
    with pytest.raises(RuntimeError, match="must be CUDA tensors, got one on cpu"):
        dist.all_reduce(torch.zeros(2))
    assert nccl.calls == []


def test_all_reduce_sum_reduces_on_the_cuda_device(nccl: SimpleNamespace) -> None:
    assert collectives.all_reduce_sum(1, torch.tensor(2.5), 3) == [2.0, 5.0, 6.0]
    assert nccl.calls == [("all_reduce", nccl.device, torch.float64)]


class PlainEngine:
    """What ``train_step`` and ``evaluate`` use of an engine, over a plain model on the CPU (no DeepSpeed)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = torch.device("cpu")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.model.zero_grad()  # weights unchanged: the expected loss below is computed with them

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> SimpleNamespace:
    from rlhf.models.config import ModelConfig
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    config = ModelConfig(name_or_path=str(tiny_model_dir))
    return SimpleNamespace(config=config, tokenizer=load_tokenizer(config), model=load_causal_lm(config))


def test_train_step_and_evaluate_reduce_on_the_cuda_device(nccl: SimpleNamespace, tiny: SimpleNamespace) -> None:
    """Before: the first all-reduce of train_step got a CPU tensor (the run's first step failed on NCCL)."""
    from rlhf.data.config import DataConfig
    from rlhf.data.encode import build_examples
    from rlhf.jobs.loop import evaluate, train_step
    from rlhf.jobs.sft import SFTObjective

    objective = SFTObjective(tiny.config, tiny.tokenizer.pad_token_id)
    examples = build_examples(DataConfig(path="bundled:sft_prompt_completion", max_rows=4), tiny.tokenizer, "sft")
    micro_batches = [objective.collate(examples[:2]), objective.collate(examples[2:])]
    local_items = sum(objective.count(b) for b in micro_batches)
    with torch.no_grad():  # the mean token NLL over this rank's micro-batches (the other rank's are equal)
        expected = sum(float(objective.loss(tiny.model, b, local_items)[0]) for b in micro_batches)

    metrics = train_step(PlainEngine(tiny.model), objective, micro_batches)
    assert metrics["items"] == 2 * local_items
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    held_out = evaluate(PlainEngine(tiny.model), objective, micro_batches)
    assert held_out["eval_loss"] == pytest.approx(expected, rel=1e-6)
    assert len(nccl.calls) == 3
    assert all(call == ("all_reduce", nccl.device, torch.float64) for call in nccl.calls)


def test_kto_reference_point_reduces_on_the_cuda_device(nccl: SimpleNamespace, tiny: SimpleNamespace) -> None:
    """Before: KTO's z0 all-reduce got a CPU tensor."""
    from rlhf.config import PreferenceLossConfig
    from rlhf.data.config import DataConfig
    from rlhf.data.encode import build_examples
    from rlhf.jobs.kto import UnpairedObjective

    objective = UnpairedObjective(tiny.config, PreferenceLossConfig(loss="kto"), tiny.tokenizer.pad_token_id)
    examples = build_examples(DataConfig(path="bundled:unpaired", max_rows=4), tiny.tokenizer, "unpaired")
    batch = objective.collate(objective.prepare(tiny.model, examples))  # precomputed reference log-probs
    z0 = objective.kl_reference_point(tiny.model, batch, batch["kl_reference_logps"])
    # the same model computed the reference: every log-ratio is 0 up to rounding, and so is z0 on both ranks
    assert float(z0) == pytest.approx(0.0, abs=1e-5)
    assert nccl.calls == [("all_reduce", nccl.device, torch.float64)]


def test_the_engine_export_barrier_names_the_cuda_device(
    nccl: SimpleNamespace, tiny: SimpleNamespace, tmp_path: Path
) -> None:
    """Before: export called dist.barrier() with no device, leaving NCCL's device to torch's guess."""
    from rlhf.engine import EngineConfig, TrainingEngine

    engine = TrainingEngine.__new__(TrainingEngine)  # what export reads, without DeepSpeed
    engine.engine, engine.config, engine.rank = SimpleNamespace(module=tiny.model), EngineConfig(), 0
    engine.export(tmp_path / "final", tiny.tokenizer)
    assert (tmp_path / "final" / "config.json").is_file()
    assert nccl.calls == [("barrier", nccl.device, None)]


def test_broadcast_on_a_group_refuses_a_tensor_not_on_its_backend_device(monkeypatch) -> None:
    """A stateless group (vLLM's, not registered with torch.distributed) says its backend by name."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    sent: list[torch.Tensor] = []
    group = SimpleNamespace(name=lambda: "nccl", broadcast=lambda tensors, options: sent.extend(tensors))
    with pytest.raises(collectives.WrongDeviceError, match="broadcast: a tensor on cpu handed to a nccl collective"):
        collectives.broadcast(torch.zeros(3), group)
    assert sent == []
