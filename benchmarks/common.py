"""Shared pieces of the benchmarks: the machine's matmul peak, model FLOPs, stage timers, TRL's settings."""

from __future__ import annotations

import json
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

RESULTS = Path(__file__).parent / "RESULTS.md"


def matmul_peak_flops(size: int = 1024, repeats: int = 20) -> float:
    """Measured fp32 matmul FLOP/s of this machine with all torch threads (best of ``repeats``)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def training_flops_per_token(model_dir: str, sequence_length: int) -> float:
    """Model FLOPs of one trained token: 6 x (non-embedding weights incl. the LM head) + attention scores."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config)
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    attention = 12 * config.num_hidden_layers * config.hidden_size * sequence_length
    return 6 * weights + attention


def machine() -> str:
    """A one-line description of this machine."""
    import os

    import torch

    return (
        f"{platform.processor() or platform.machine()} ({cpu_model()}), {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (``/proc/cpuinfo``), or ``unknown CPU``: machines of one kind
    differ from day to day, and the absolute figures with them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else "unknown CPU"


class StageTimer:
    """Wall-clock seconds per named stage, summed over the timed steps.

    Stages may nest; each total is inclusive of the stages inside it. While ``enabled`` is
    false (warm-up steps) nothing is recorded. Accelerator work is synchronised at both ends
    of a stage, so the time lands in the stage that queued it.
    """

    def __init__(self) -> None:
        import torch

        self.seconds: dict[str, float] = defaultdict(float)
        self.enabled = False
        self.accelerator = torch.cuda.is_available()

    def synchronize(self) -> None:
        """Wait for queued accelerator work, so that the clock sees it (nothing to wait for on CPU)."""
        import torch

        if self.accelerator and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.seconds[stage] += time.perf_counter() - started

    def time_optimizer_steps(self, optimizer: Any, stage: str) -> None:
        """Time every ``step()`` of ``optimizer`` (the innermost torch optimizer of any wrappers) as ``stage``."""
        while hasattr(optimizer, "optimizer"):  # DeepSpeed's and accelerate's wrappers keep the torch one there
            optimizer = optimizer.optimizer
        started: list[float] = []

        def before(*_: Any) -> None:
            if self.enabled:
                self.synchronize()
                started.append(time.perf_counter())

        def after(*_: Any) -> None:
            if started:
                self.synchronize()
                self.seconds[stage] += time.perf_counter() - started.pop()

        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)


def step_stages(loss: str) -> list[tuple[str, str]]:
    """The stages of one training step, in report order: (key, label); ``loss`` labels the objective's loss call.

    Not every side has every stage (TRL's has no separate forward or all-reduce)."""
    return [
        ("data", "data: sample + collate"),
        ("forward+loss", loss),
        ("forward", "  of which the model's forward"),
        ("backward", "backward"),
        ("all-reduce", "  of which DeepSpeed's `allreduce_gradients` (runs on 1 rank too)"),
        ("optimizer", "optimizer step (clip, AdamW, schedule)"),
        ("adamw", "  of which AdamW's step()"),
        ("other", "other (metric reductions, bookkeeping)"),
    ]


class TimedEngine:
    """A ``TrainingEngine`` whose forward, backward and optimizer step are timed; otherwise the same.

    Inside them, AdamW's ``step()`` (through torch's optimizer hooks) and DeepSpeed's gradient
    all-reduce, which runs in ``backward`` even on a single rank, are timed too.
    """

    def __init__(self, engine: Any, timer: StageTimer) -> None:
        self.engine = engine
        self.timer = timer
        self.device = engine.device
        timer.time_optimizer_steps(engine.optimizer, "adamw")
        deepspeed_engine = engine.engine
        all_reduce = deepspeed_engine.allreduce_gradients

        def timed_all_reduce(*args: Any, **kwargs: Any) -> Any:
            with timer("all-reduce"):
                return all_reduce(*args, **kwargs)

        # an instance attribute: DeepSpeed's backward looks the method up on the engine object
        deepspeed_engine.allreduce_gradients = timed_all_reduce

    @property
    def module(self) -> Any:
        """The model, as the engine's: what the objectives inspect (``rlhf.models.logits.takes_logits_to_keep``)."""
        return self.engine.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.timer("forward"):
            return self.engine(*args, **kwargs)

    def backward(self, loss: Any) -> None:
        with self.timer("backward"):
            self.engine.backward(loss)

    def step(self) -> dict[str, float] | None:
        with self.timer("optimizer"):
            return self.engine.step()


class TimedObjective:
    """A job's objective whose ``loss`` (forward, loss, metrics) is timed as ``forward+loss``; otherwise the same."""

    def __init__(self, objective: Any, timer: StageTimer) -> None:
        self.objective = objective
        self.timer = timer

    def count(self, batch: dict) -> int:
        return int(self.objective.count(batch))

    def loss(self, model: Any, batch: dict, denominator: float) -> tuple[Any, dict]:
        with self.timer("forward+loss"):
            return self.objective.loss(model, batch, denominator)  # type: ignore[no-any-return]


def other_seconds(seconds: float, stages: dict[str, float]) -> float:
    """The step's time outside its top-level stages."""
    return seconds - sum(stages.get(key, 0.0) for key in ("data", "forward+loss", "backward", "optimizer"))


def trainer_stages(timer: StageTimer, step_seconds: list[float], warmup: int) -> tuple[float, int, dict[str, float]]:
    """A timed transformers ``Trainer`` run (``trainer_step_timing``, ``forward+loss`` timed around
    ``compute_loss``): the seconds and number of its timed steps, and their stages, the backward being
    ``training_step`` less ``compute_loss``."""
    timed = step_seconds[warmup:]
    seconds = sum(timed)
    stages = dict(timer.seconds)
    stages["backward"] = stages.pop("training_step") - stages["forward+loss"]  # training_step = loss + backward
    stages["other"] = other_seconds(seconds, stages)
    return seconds, len(timed), stages


def stage_rows(stages: list[tuple[str, str]], sides: list[Any]) -> list[str]:
    """Table rows: ms per timed step of each stage, and its share of the step, for each side (``name``, ``seconds``,
    ``steps``, ``stages``); a dash where a side has no such stage, no row for a stage no side has."""
    rows = []
    for key, label in [*stages, ("total", "**whole step**")]:
        if key != "total" and all(key not in m.stages for m in sides):
            continue
        cells = []
        for m in sides:
            seconds = m.seconds if key == "total" else m.stages.get(key)
            if seconds is None:
                cells += ["–", ""]
            else:
                cells += [f"{1000 * seconds / m.steps:.2f}", f"{seconds / m.seconds:.0%}"]
        rows.append(f"| {label} | {' | '.join(cells)} |")
    return rows


def stage_difference(stages: list[tuple[str, str]], ours: Any, theirs: Any) -> str:
    """Per-step difference of each stage both sides have, in ms (positive: ours spends longer)."""
    parts = []
    for key, label in stages:
        if key in ours.stages and key in theirs.stages:
            delta = 1000 * (ours.stages[key] / ours.steps - theirs.stages[key] / theirs.steps)
            parts.append(f"{label.strip()} {delta:+.2f} ms")
    total = 1000 * (ours.seconds / ours.steps - theirs.seconds / theirs.steps)
    return f"Per step, {ours.name} minus {theirs.name}: " + ", ".join(parts) + f"; whole step {total:+.2f} ms."


def trl_training_args() -> dict[str, Any]:
    """TRL trainer settings shared by the benchmarks: like for like with rlhf on this CPU.

    TRL's configs default to ``gradient_checkpointing=True`` and ``bf16=True`` (autocast), unlike
    ``transformers.TrainingArguments``; rlhf trains in fp32 without checkpointing here, so both are off.
    """
    return {
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "logging_steps": 10**6,
        "save_strategy": "no",
        "report_to": [],
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def isolated(function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` run in a fresh Python process (spawned), its result sent back.

    Each measured side runs alone: rlhf's engine creates a process group and sets ``RANK`` /
    ``WORLD_SIZE``, and a TRL trainer started later in the same process would take itself for
    a distributed run and wrap its model in DDP; thread pools, caches and imports do not leak
    from one side into the other either. ``function`` must be importable (module level).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args, **kwargs).result()


def trainer_step_timing(timer: StageTimer, first_timed_step: int) -> tuple[type, Any]:
    """Timing of a transformers ``Trainer``'s optimizer steps: a mixin for the trainer and a callback.

    Step k is timed from the end of step k-1 to the end of step k, so it includes fetching its
    batch; ``callback.step_seconds`` holds every step. From step ``first_timed_step`` on, the
    timer records the stages ``training_step`` (the mixin's wrapper), ``data`` (step begin minus
    the previous end) and ``optimizer`` (the end of ``training_step`` to the end of the step:
    clipping, the optimizer, the schedule). Use::

        mixin, callback = trainer_step_timing(timer, warmup)
        class Timed(mixin, DPOTrainer): ...
        trainer = Timed(..., callbacks=[callback])
    """
    from transformers import TrainerCallback

    marks: dict[str, float] = {}

    class TimedTrainingStep:
        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            with timer("training_step"):
                loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
            marks["training_step_end"] = time.perf_counter()
            return loss

    class StepTiming(TrainerCallback):
        def __init__(self) -> None:
            self.step_seconds: list[float] = []

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            timer.time_optimizer_steps(optimizer, "adamw")
            marks["end"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            timer.enabled = state.global_step >= first_timed_step  # global_step counts the steps already done
            marks["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.step_seconds.append(now - marks["end"])
            if timer.enabled:
                timer.seconds["data"] += marks["begin"] - marks["end"]
                timer.seconds["optimizer"] += now - marks["training_step_end"]
            marks["end"] = now

    return TimedTrainingStep, StepTiming()


SMALL = {"hidden_size": 768, "intermediate_size": 2048, "num_layers": 8, "num_heads": 12}
"""A second, larger model (about 60M parameters, Llama-shaped) where the work per token, not the per-step overhead
of the tiny model, dominates: the regime of real models, where batching pays."""


def small_model() -> tuple[str, str]:
    """The larger benchmark model, built once into the cache; its directory and a description."""
    from rlhf.models.init_model import TinyModelSpec, init_model
    from rlhf.models.loading import cache_dir

    path = cache_dir() / "bench-small-model"
    if not (path / "config.json").is_file():
        init_model(path, TinyModelSpec(**SMALL))
    return str(path), describe_model(str(path))


def describe_model(model_dir: str) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    size = Path(model_dir, "model.safetensors").stat().st_size / 4  # fp32 parameters
    return (
        f"{size / 1e6:.1f}M parameters (hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"MLP {config['intermediate_size']})"
    )
