"""Scaling: the same SFT on 1 and 2 data-parallel ranks here, the bytes each ZeRO stage hands to collectives per
optimizer step (counted on 2 gloo ranks), and what those counts predict for real models on many GPUs.

Each rank is a process of its own (spawned, gloo on 127.0.0.1, the jobs' own ``TrainingEngine`` and
``train_step`` with the SFT objective), as a Ray Train worker runs it. Every collective the engine and
DeepSpeed call is counted by wrapping ``torch.distributed``'s functions before DeepSpeed binds them: the
payload of a call is the logical tensor it reduces or gathers (an all-reduce: its tensor; a reduce-scatter:
its whole input; an all-gather: its whole output; a broadcast: its tensor), so the payload per step divided
by the model's parameters is a per-parameter cost that carries over to any model of the same training setup.

From payload to the bytes each rank sends over the network, with the bandwidth-optimal ring algorithms NCCL
uses for large messages: an all-reduce sends 2(N-1)/N of its payload, a reduce-scatter or an all-gather
(N-1)/N, a broadcast its payload once from the source.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MICRO_BATCH = 4
STEPS = 6  # optimizer steps of each measured run
WARMUP = 2  # not counted
COLLECTIVES = (
    "all_reduce",
    "reduce_scatter_tensor",
    "all_gather_into_tensor",
    "broadcast",
    "all_gather",
    "reduce",
    "all_reduce_coalesced",
)
RING_FACTOR = {  # bytes one rank sends per byte of payload, on N ranks (ring algorithms)
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_reduce_coalesced": lambda n: 2 * (n - 1) / n,
    "reduce_scatter_tensor": lambda n: (n - 1) / n,
    "all_gather_into_tensor": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
}


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only transformer (Llama family: gated MLP, RMSNorm, grouped-query attention)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Architecture:
        """From a transformers ``config.json`` of a Llama-shaped model."""
        return cls(
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            intermediate=config["intermediate_size"],
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", False)),
        )

    def parameters(self) -> int:
        """Every parameter, counting tied embeddings once."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        attention = self.hidden * self.hidden * 2 + self.hidden * kv * 2  # q and o; k and v
        if self.qkv_bias:
            attention += self.hidden + 2 * kv
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden  # gated MLP, two norms
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * layer + embeddings + self.hidden  # and the final norm


# Published shapes (the models' config.json on the Hugging Face hub)
PUBLISHED = {
    "Llama-3.1-8B": Architecture(4096, 32, 32, 8, 14336, 128256, tied=False),
    "Qwen2.5-7B": Architecture(3584, 28, 28, 4, 18944, 152064, tied=False, qkv_bias=True),
    "Llama-3.1-70B": Architecture(8192, 80, 64, 8, 28672, 128256, tied=False),
}


def wire_bytes(payload: dict[str, float], world_size: int) -> float:
    """Bytes one rank sends for ``payload`` (bytes per collective kind) on ``world_size`` ranks."""
    return sum(RING_FACTOR[op](world_size) * size for op, size in payload.items())


class CollectiveCounter:
    """Payload bytes, calls and seconds of every ``torch.distributed`` collective, while ``counting``."""

    def __init__(self) -> None:
        self.payload: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.seconds = 0.0
        self.counting = False

    @staticmethod
    def size(op: str, args: tuple, kwargs: dict) -> int:
        def nbytes(tensor: Any) -> int:
            if isinstance(tensor, list | tuple):
                return sum(nbytes(t) for t in tensor)
            return tensor.numel() * tensor.element_size()

        if op in ("all_gather_into_tensor", "all_gather"):  # the whole gathered output
            return nbytes(kwargs.get("output_tensor", kwargs.get("tensor_list", args[0] if args else None)))
        if op == "reduce_scatter_tensor":  # the whole input
            return nbytes(kwargs["input"] if "input" in kwargs else args[1])
        if op == "all_reduce_coalesced":
            return nbytes(kwargs.get("tensors", args[0] if args else None))
        return nbytes(kwargs.get("tensor", args[0] if args else None))

    def install(self) -> None:
        """Wrap the collectives of ``torch.distributed`` (call before DeepSpeed starts: it binds some of them)."""
        import torch.distributed as dist

        for op in COLLECTIVES:
            original = getattr(dist, op, None)
            if original is None:
                continue

            def counted(*args: Any, _op: str = op, _original: Any = original, **kwargs: Any) -> Any:
                if not self.counting:
                    return _original(*args, **kwargs)
                started = time.perf_counter()
                result = _original(*args, **kwargs)
                if kwargs.get("async_op") and result is not None:
                    result.wait()
                self.seconds += time.perf_counter() - started
                self.payload[_op] += self.size(_op, args, kwargs)
                self.calls[_op] += 1
                return result

            setattr(dist, op, counted)


def _rank(rank: int, world_size: int, port: int, model_dir: str, runs: list[dict[str, Any]], out: str) -> None:
    """One rank: every run in ``runs`` (``zero_stage``, ``accumulation``), its counts written by rank 0."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.data.config import DataConfig
    from rlhf.data.encode import build_examples
    from rlhf.engine import EngineConfig, TrainingEngine
    from rlhf.jobs.loop import train_step
    from rlhf.jobs.sft import SFTObjective
    from rlhf.models.config import ModelConfig

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # the machine's cores shared, as Ray shares them
    counter = CollectiveCounter()
    counter.install()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = build_examples(DataConfig(path="bundled:sft_prompt_completion"), tokenizer, "sft")
    objective = SFTObjective(ModelConfig(name_or_path=model_dir), tokenizer.pad_token_id)
    results = []
    for run in runs:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        parameters = sum(p.numel() for p in model.parameters())
        accumulation, micro_batch = run["accumulation"], run.get("micro_batch", MICRO_BATCH)
        config = EngineConfig(
            zero_stage=run["zero_stage"],
            micro_batch_size=micro_batch,
            gradient_accumulation_steps=accumulation,
            learning_rate=1e-4,
            lr_scheduler="constant",
            precision=run.get("precision", "fp32"),
        )
        engine = TrainingEngine(model, config, total_steps=STEPS)
        global_batch = micro_batch * accumulation * world_size
        counter.payload.clear()
        counter.calls.clear()
        counter.seconds, tokens, seconds = 0.0, 0, 0.0
        steps, warmup = run.get("steps", STEPS), run.get("warmup", WARMUP)
        for step in range(steps):
            start = (step * global_batch) % (len(examples) - global_batch)
            mine = examples[start : start + global_batch][rank::world_size]
            micro = [objective.collate(mine[i * micro_batch : (i + 1) * micro_batch]) for i in range(accumulation)]
            counter.counting = step >= warmup
            started = time.perf_counter()
            train_step(engine, objective, micro)
            if step >= warmup:
                seconds += time.perf_counter() - started
                tokens += sum(len(e["input_ids"]) for e in examples[start : start + global_batch])
        counter.counting = False
        steps -= warmup
        results.append(
            {
                **run,
                "parameters": parameters,
                "payload_per_step": {op: size / steps for op, size in counter.payload.items()},
                "calls_per_step": {op: calls / steps for op, calls in counter.calls.items()},
                "collective_seconds_per_step": counter.seconds / steps,
                "step_seconds": seconds / steps,
                "tokens_per_second": tokens / seconds,
            }
        )
        del engine, model
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/distributed: a gloo thread still releasing tensors can abort interpreter shutdown


def measure(model_dir: str, world_size: int, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every run of ``runs`` on ``world_size`` spawned gloo ranks; rank 0's counts and timings."""
    import torch.multiprocessing as mp

    from cluster.connect import free_port

    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "counts.json"
        mp.start_processes(
            _rank, args=(world_size, free_port(), model_dir, runs, str(out)), nprocs=world_size, start_method="spawn"
        )
        return json.loads(out.read_text())


PPO_STEPS = 7  # the first is a warm-up


def run_ppo(model_dir: str, steps: int, output_dir: str, colocate: str) -> dict[str, Any]:
    """``rlhf ppo`` (rlhf/configs/ppo.yaml: policy, reference and value groups, a rule reward) on an embedded
    cluster with ``roles.colocate``; the median step and the mean of each stage over the timed steps."""
    from statistics import median

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from cluster import configtree
    from rlhf.jobs.ppo import run
    from rlhf.jobs.registry import EXAMPLES_DIR
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.stages import STAGES

    overrides = [
        f"policy.name_or_path={model_dir}",
        f"train.output_dir={output_dir}",
        f"train.max_steps={steps}",
        "data.eval_split=null",
        f"roles.colocate={colocate}",
    ]
    run(configtree.load(PPOConfig, EXAMPLES_DIR / "ppo.yaml", overrides))
    records = [json.loads(line) for line in Path(output_dir, "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["kind"] == "train"][1:]
    return {
        "median_step_seconds": median(r["time/step"] for r in timed),
        "stage_seconds": {stage: sum(r[f"time/{stage}"] for r in timed) / len(timed) for stage in STAGES},
    }


def _gb(value: float) -> str:
    return f"{value / 1e9:,.2f}"


def report(model_dir: str, peak_flops: float, steps: int = STEPS, warmup: int = WARMUP) -> str:
    """The markdown section (``peak_flops`` is not used). ``steps``/``warmup`` are the timed SFT runs'; fewer steps
    than :data:`STEPS` (``--quick``) also shorten the PPO runs to 2 steps and count the ZeRO stages in bf16 only
    (the predictions need those)."""
    from benchmarks.common import describe_model
    from rlhf.models.loading import resolve

    quick = steps < STEPS
    ppo_steps = 2 if quick else PPO_STEPS
    real_dir = str(resolve("smollm2-135m-instruct"))
    stages = [  # counts are the same every step: 3 steps, 1 not counted
        {"zero_stage": stage, "accumulation": 4, "precision": precision, "steps": 3, "warmup": 1}
        for precision in (("bf16",) if quick else ("fp32", "bf16"))
        for stage in (0, 1, 2, 3)
    ]
    # on SmolLM2: the tiny model's tensors are all below ZeRO-3's persistence threshold (1e5 elements), so ZeRO-3
    # never gathers them and its counts there say nothing about a real model
    counted = [measure(real_dir, 2, [run])[0] for run in stages]  # a process each: freed engines keep their memory
    scaling_rows = []
    for title, directory in (
        (f"Tiny model, {describe_model(model_dir)}", model_dir),
        ("SmolLM2-135M-Instruct", real_dir),
    ):
        length = {"steps": steps, "warmup": warmup}
        one = measure(directory, 1, [{"zero_stage": 0, "accumulation": 1, "micro_batch": 2 * MICRO_BATCH} | length])
        two = measure(directory, 2, [{"zero_stage": 0, "accumulation": 1} | length])  # the same global batch
        one, two = one[0], two[0]
        share = two["collective_seconds_per_step"] / two["step_seconds"]
        scaling_rows.append(
            f"| {title} | {one['tokens_per_second']:,.0f} | {two['tokens_per_second']:,.0f} | "
            f"{two['tokens_per_second'] / one['tokens_per_second']:.2f}x | {share:.0%} | "
            f"{sum(two['payload_per_step'].values()) / 1e6:,.1f} |"
        )
    from benchmarks.common import isolated
    from rlhf.rl.stages import STAGES

    with tempfile.TemporaryDirectory() as root:
        ppo = {
            colocate: isolated(run_ppo, model_dir, ppo_steps, f"{root}/{colocate}", colocate)
            for colocate in ("none", "all")
        }
    ppo_rows = [
        f"| {colocate} | {m['median_step_seconds'] * 1000:,.0f} | "
        + " | ".join(f"{m['stage_seconds'][stage] * 1000:,.0f}" for stage in STAGES)
        + " |"
        for colocate, m in ppo.items()
    ]
    per_parameter = {
        (c["precision"], c["zero_stage"], c["accumulation"]): {
            op: size / c["parameters"] for op, size in c["payload_per_step"].items()
        }
        for c in counted
    }
    count_rows = []
    for c in counted:
        key = (c["precision"], c["zero_stage"], c["accumulation"])
        ops = ", ".join(
            f"{op} {size:.2f} ({c['calls_per_step'][op]:.0f} calls)" for op, size in sorted(per_parameter[key].items())
        )
        count_rows.append(f"| {key[0]} | {key[1]} | {ops} | {sum(per_parameter[key].values()):.2f} |")
    worlds = (8, 64)
    predicted = []
    for name, architecture in PUBLISHED.items():
        parameters = architecture.parameters()
        cells = []
        for stage in (0, 1, 2, 3):
            payload = {op: share * parameters for op, share in per_parameter[("bf16", stage, 4)].items()}
            cells.append(" / ".join(_gb(wire_bytes(payload, n)) for n in worlds))
        sync = _gb(parameters * 2)
        predicted.append(f"| {name} | {parameters / 1e9:.2f}B | {' | '.join(cells)} | {sync} |")
    return "\n".join(
        [
            "## Scaling: data-parallel ranks, ZeRO stages and weight syncs",
            "",
            f"The same SFT (bundled prompt/completion data, {2 * MICRO_BATCH} sequences per optimizer step, ZeRO-0, "
            f"fp32) on 1 rank (micro-batch {2 * MICRO_BATCH}, both cores) and on 2 gloo ranks of this machine "
            f"(micro-batch {MICRO_BATCH} each, a core each); {steps} steps, {warmup} not timed. The ranks share "
            "the machine's 2 cores, so 2 ranks cannot compute faster here; the figures say what data parallelism "
            "adds to the compute (the collectives' share of a step, and their payload).",
            "",
            "| model | tokens/s, 1 rank | tokens/s, 2 ranks | 2 ranks / 1 | collectives' share of a step (2 ranks) "
            "| payload per step (MB) |",
            "|---|---:|---:|---:|---:|---:|",
            *scaling_rows,
            "",
            f"PPO with separate and colocated roles: rlhf/configs/ppo.yaml (policy, reference and value groups of "
            f"one rank each, the toy rule reward, one vLLM replica) on the tiny model, {ppo_steps} steps, the first "
            "not timed; `roles.colocate=none` gives each role a bundle (a CPU) of its own, `all` puts the three "
            "in one bundle. Median step and mean stage times in ms:",
            "",
            "| roles.colocate | step | " + " | ".join(STAGES) + " |",
            "|---|---:|" + "---:|" * len(STAGES),
            *ppo_rows,
            "",
            "What each ZeRO stage hands to collectives per optimizer step, counted on 2 gloo ranks (SmolLM2-135M-Instruct, "
            f"`engine.precision` fp32 and bf16, micro-batch {MICRO_BATCH}, 4 micro-batches per step): payload "
            "bytes per parameter by collective, with calls per step. Payload is the logical tensor (see the "
            "module's docstring): 4.00 in fp32, or 2.00 in bf16, is one full copy of the model.",
            "",
            "| precision | ZeRO stage | payload per parameter by collective (calls) | total |",
            "|---|---:|---|---:|",
            *count_rows,
            "",
            "What that predicts on GPUs (computed from the bf16 counts above with 4 micro-batches per step, "
            "and the ring algorithms of the docstring): GB each GPU sends per optimizer "
            f"step, on {worlds[0]} / {worlds[1]} data-parallel GPUs; and the weight sync of an RL step, the bf16 "
            "policy broadcast once to every replica (each replica receives it whole; with tied embeddings the "
            "output layer is not sent). Parameter counts from the published shapes, by "
            "`benchmarks.scaling.Architecture.parameters`, which the unit tests check against the parameters "
            "transformers builds for the same shapes. These were counted on gloo, where DeepSpeed's stages 1 and 2 "
            "all-reduce whole gradients (ZeRO-2 once per micro-batch); where it reduce-scatters them instead, "
            "their gradient traffic is half the figure (an upper bound here, not measured on NCCL).",
            "",
            "| model | parameters | ZeRO-0 GB | ZeRO-1 GB | ZeRO-2 GB | ZeRO-3 GB | weight sync GB per step |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *predicted,
        ]
    )
