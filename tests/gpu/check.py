"""The GPU check: what the CPU suite cannot run (NCCL, CUDA, bf16 on a GPU), as one command for a machine lent a GPU.

Run ``make gpu-check`` (or ``sh tests/gpu/run.sh``) there; see the Makefile for carrying DeepSpeed's wheels. It needs
torch with CUDA, transformers, peft, tokenizers, safetensors, numpy, pyyaml, filelock and DeepSpeed; no Ray, no vLLM,
no network. One process, one GPU, an NCCL default group of world size 1 (made by the engine's own
``init_process_group``, which picks NCCL when CUDA is there). Each check prints PASS or FAIL with what it measured;
the exit status is 1 when any failed.

1. collectives: ``cluster.collectives`` all-reduce, barrier and broadcast on NCCL with CUDA tensors; a CPU tensor is
   refused by the helper; and by NCCL itself (the failure every multi-GPU job had before the helper).
2. engine ZeRO-0/2/3 in bf16: steps of the jobs' ``train_step`` with the SFT objective on the tiny model (losses
   finite and falling, the same first loss at every stage), ``evaluate``, and ``export`` (its barrier through the helper); every
   all-reduce of our code and of DeepSpeed on CUDA.
3. DPO and KTO with ``preference.reference=live``: the reference model on the engine's device after the first step,
   whose loss is that of a policy equal to its reference.
4. checkpoint: the RNG file (CUDA generator included) loads with ``weights_only=True`` and restores the generators.

``--device cpu`` runs the same checks on the CPU over gloo (a dry run where there is no GPU; the NCCL-only parts are
skipped). Without CUDA and without ``--device cpu`` it says so and exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STEPS = 4
LN2 = math.log(2.0)
results: list[tuple[str, bool]] = []


def report(name: str, ok: bool, detail: str) -> None:
    """Print one PASS/FAIL line and remember it."""
    results.append((name, ok))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def run(name: str, check: Callable[[], str]) -> None:
    """Run ``check`` (it returns what it measured, or raises AssertionError/anything on failure)."""
    started = time.perf_counter()
    try:
        detail = check()
    except Exception as exc:
        traceback.print_exc()
        report(name, False, f"{type(exc).__name__}: {exc}")
        return
    report(name, True, f"{detail} ({time.perf_counter() - started:.1f} s)")


class AllReduceSpy:
    """Records the device of every tensor handed to ``torch.distributed.all_reduce`` (ours and DeepSpeed's)."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []
        self._real = dist.all_reduce

    def __enter__(self) -> AllReduceSpy:
        def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.devices.append(tensor.device)
            return self._real(tensor, *args, **kwargs)

        dist.all_reduce = all_reduce
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self._real


def check_collectives(device: torch.device) -> str:
    """The helper on the default group: sums, barrier, broadcast on the backend's device; wrong devices refused."""
    from cluster import collectives

    backend = collectives.backend()
    assert collectives.backend_device(backend) == device, (backend, collectives.backend_device(backend), device)
    with AllReduceSpy() as spy:
        sums = collectives.all_reduce_sum(1, torch.tensor(2.5, device=device), 3)
    assert sums == [1.0, 2.5, 3.0], sums
    assert spy.devices == [device], spy.devices
    collectives.barrier()
    tensor = torch.arange(4.0, device=device)
    collectives.broadcast(tensor)
    assert tensor.tolist() == [0.0, 1.0, 2.0, 3.0]
    wrong = torch.zeros(2, device="cpu" if device.type == "cuda" else "meta")
    try:
        collectives.broadcast(wrong)
    except collectives.WrongDeviceError:
        pass
    else:
        raise AssertionError(f"the helper let a tensor on {wrong.device} reach {backend}")
    return f"{backend} on {device}: all_reduce_sum, barrier, broadcast; a {wrong.device} tensor refused"


def check_nccl_refuses_cpu_tensors() -> str:
    """The premise of the helper: a CPU tensor handed to NCCL fails (what every multi-GPU job met before it)."""
    try:
        dist.all_reduce(torch.zeros(2))
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    raise AssertionError("NCCL accepted a CPU tensor: the premise of cluster.collectives does not hold here")


def micro_batches(objective: Any, model: torch.nn.Module, tokenizer: Any, path: str) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of 4 bundled examples of ``objective``'s kind, prepared by it (e.g. KTO's pairs)."""
    from rlhf.data.config import DataConfig
    from rlhf.data.encode import build_examples

    examples = build_examples(DataConfig(path=path, max_rows=8), tokenizer, objective.data_kind)
    examples = objective.prepare(model, examples)
    return [objective.collate(examples[:4]), objective.collate(examples[4:8])]


def engine_config(zero_stage: int) -> Any:
    """bf16, 4 x 2 micro-batches, a constant learning rate that moves the tiny model in a few steps."""
    from rlhf.engine import EngineConfig

    return EngineConfig(
        zero_stage=zero_stage,
        precision="bf16",
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        lr_scheduler="constant",
    )


def check_engine(model_dir: str, zero_stage: int, device: torch.device, losses_by_stage: dict[int, list[float]]) -> str:
    """STEPS train steps of the SFT objective at ``zero_stage`` in bf16, evaluate, export."""
    from rlhf.engine import TrainingEngine
    from rlhf.jobs.loop import evaluate, train_step
    from rlhf.jobs.sft import SFTObjective
    from rlhf.models.config import ModelConfig
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    config = ModelConfig(name_or_path=model_dir)
    tokenizer = load_tokenizer(config)
    objective = SFTObjective(config, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = load_causal_lm(config)
    batches = micro_batches(objective, model, tokenizer, "bundled:sft_prompt_completion")
    engine = TrainingEngine(model, engine_config(zero_stage), total_steps=STEPS)
    assert engine.device == device, (engine.device, device)
    dtypes = {p.dtype for p in engine.module.parameters()}
    assert dtypes == {torch.bfloat16}, f"parameters in {dtypes}, not bf16"
    with AllReduceSpy() as spy:
        losses = [train_step(engine, objective, batches)["loss"] for _ in range(STEPS)]
        held_out = evaluate(engine, objective, batches)["eval_loss"]
        with tempfile.TemporaryDirectory() as directory:
            engine.export(directory, tokenizer)
            assert (Path(directory) / "config.json").is_file(), "export wrote no model"
    assert all(math.isfinite(x) for x in [*losses, held_out]), losses
    assert losses[-1] < losses[0] - 0.1, f"loss did not fall: {losses}"
    off_device = {str(d) for d in spy.devices if d != device}
    assert not off_device, f"all-reduces on {off_device}, not {device}"
    losses_by_stage[zero_stage] = losses
    detail = ""
    if 0 in losses_by_stage and zero_stage != 0:
        zero = losses_by_stage[0]
        # the same weights and batches: the first loss is the same forward pass
        assert abs(losses[0] - zero[0]) < 1e-3, f"first loss {losses[0]} at ZeRO-{zero_stage}, {zero[0]} at ZeRO-0"
        # then bf16 rounds the gradients of ZeRO-0 (fp32 accumulation) and of ZeRO-2/3 differently; the fp32 stages
        # agree within 1e-4 (tests/distributed/test_engine.py): this bound only catches a stage that trains wrongly
        gap = max(abs(a - b) for a, b in zip(losses, zero, strict=True))
        assert gap < 0.25, f"ZeRO-{zero_stage} losses {losses} stray from ZeRO-0's {zero} by {gap:.3f}"
        detail = f", {gap:.3f} from ZeRO-0's at most"
    return (
        f"losses {[round(x, 4) for x in losses]}{detail}, eval {held_out:.4f}, {len(spy.devices)} all-reduces on "
        f"{device}, parameters bf16, exported"
    )


def check_live_reference(model_dir: str, loss: str, device: torch.device) -> str:
    """One train step of ``loss`` (dpo or kto) with a live reference: the reference joins the engine's device."""
    from rlhf.config import DPOConfig, PreferenceLossConfig
    from rlhf.engine import TrainingEngine
    from rlhf.jobs.dpo import make_objective
    from rlhf.jobs.loop import train_step
    from rlhf.models.config import ModelConfig
    from rlhf.models.loading import load_tokenizer

    config = DPOConfig(
        model=ModelConfig(name_or_path=model_dir), preference=PreferenceLossConfig(loss, reference="live")
    )
    tokenizer = load_tokenizer(config.model)
    objective = make_objective(config, tokenizer)
    policy = objective.build_model()  # and the live reference, on the CPU
    path = "bundled:preference" if objective.data_kind == "preference" else "bundled:unpaired"
    batches = micro_batches(objective, policy, tokenizer, path)
    engine = TrainingEngine(policy, engine_config(0), total_steps=1)
    with AllReduceSpy() as spy:
        metrics = train_step(engine, objective, batches)
    reference_device = next(objective.reference.parameters()).device
    assert reference_device == engine.device == device, (reference_device, engine.device, device)
    assert not {d for d in spy.devices if d != device}, spy.devices
    assert math.isfinite(metrics["loss"]), metrics
    if loss == "dpo":  # the policy equals its reference: -log sigmoid(0), up to bf16 rounding of the policy
        assert abs(metrics["loss"] - LN2) < 0.05, f"first DPO loss {metrics['loss']:.4f}, expected about ln 2"
    return f"reference on {reference_device}, first loss {metrics['loss']:.4f}, {len(spy.devices)} all-reduces"


def check_rng_checkpoint(model_dir: str, device: torch.device) -> str:
    """Save a ZeRO-0 checkpoint, draw, reseed, load: the same draws again; the RNG file loads weights-only."""
    from rlhf.engine import TrainingEngine
    from rlhf.models.config import ModelConfig
    from rlhf.models.loading import load_causal_lm

    engine = TrainingEngine(load_causal_lm(ModelConfig(name_or_path=model_dir)), engine_config(0), total_steps=1)

    def draws() -> list[float]:
        return [float(torch.rand(())), *(torch.rand(2, device=device).tolist() if device.type == "cuda" else [])]

    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, {"step": 1})
        state = torch.load(Path(directory) / "rng_rank0.pt", weights_only=True)
        expected = draws()
        torch.manual_seed(1234)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(1234)
        assert engine.load_checkpoint(directory)["step"] == 1
        again = draws()
    assert again == expected, (again, expected)
    cuda_states = 0 if state["cuda"] is None else len(state["cuda"])
    return f"weights_only load, {len(expected)} draws restored, {cuda_states} CUDA generator state(s)"


def main() -> int:
    """Run every check; 0 when all passed (or there is nothing to check here), 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run over gloo")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA: skipping the GPU check (use --device cpu for a dry run over gloo)")
        return 0
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RLHF_CACHE", tempfile.mkdtemp(prefix="rlhf-gpu-check-"))
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the engine then picks gloo and the CPU
    import deepspeed
    import transformers

    from cluster.process_group import init_process_group
    from rlhf.models.loading import resolve

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")
    if args.device == "cuda":
        torch.cuda.set_device(0)
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    init_process_group(timeout_s=120)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    print(f"default group: {dist.get_backend()}, world size {dist.get_world_size()}")
    model_dir = resolve("tiny")
    run("collectives", lambda: check_collectives(device))
    if dist.get_backend() == "nccl":
        run("NCCL refuses a CPU tensor", check_nccl_refuses_cpu_tensors)
    losses: dict[int, list[float]] = {}
    for stage in (0, 2, 3):
        run(f"engine ZeRO-{stage} bf16", lambda stage=stage: check_engine(model_dir, stage, device, losses))
    run("DPO live reference", lambda: check_live_reference(model_dir, "dpo", device))
    run("KTO live reference", lambda: check_live_reference(model_dir, "kto", device))
    run("RNG checkpoint", lambda: check_rng_checkpoint(model_dir, device))
    failed = [name for name, ok in results if not ok]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed in {time.perf_counter() - started:.0f} s")
    if failed:
        print("FAILED: " + ", ".join(failed))
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
