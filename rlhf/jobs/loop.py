"""The one training loop of the data-parallel jobs (``sft``, ``rm``, ``dpo``).

A job is an :class:`Objective` (what to train: model, batches, loss) plus this loop
(how: shards, steps, evaluation, export). The loop is the same for every job, so a new
loss is a new objective, never a copied loop.

Per worker: ``shard -> build model -> objective.prepare (e.g. DPO's reference log-probs)
-> engine -> evaluate -> steps -> evaluate -> export``. Each optimizer step shares one
denominator (tokens or pairs of the whole global batch), so results do not depend on
how the batch is split over ranks and micro-batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from cluster.configtree import ConfigError
from rlhf.jobs.storage import RunStorage, export_to, redact

if TYPE_CHECKING:
    from rlhf.data.formats import Kind


class Objective(Protocol):
    """What a data-parallel job trains; the loop calls these in order."""

    data_kind: Kind  # which examples rlhf.data.encode.build_examples makes: sft, preference, unpaired

    def build_model(self) -> torch.nn.Module:
        """The trainable model, freshly loaded."""
        ...

    def prepare(self, model: torch.nn.Module, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add what the loss needs before training (e.g. reference log-probs) to this rank's examples."""
        ...

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One micro-batch of tensors."""
        ...

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Items this micro-batch adds to the global denominator (scored tokens, pairs)."""
        ...

    def loss(
        self, model: Callable[..., Any], batch: dict[str, torch.Tensor], denominator: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's share of the global loss, and metrics as means over its items."""
        ...

    def derived_eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics computed from the aggregated held-out ones (e.g. perplexity); may be empty."""
        ...


def train_step(engine: Any, objective: Objective, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; global loss and metrics, and engine stats."""
    from cluster.collectives import all_reduce_sum
    from rlhf.jobs.worker import to_device

    counts = [objective.count(b) for b in micro_batches]
    (denominator,) = all_reduce_sum(sum(counts))
    step_loss = 0.0
    weighted: dict[str, float] = {}
    stats: dict[str, float] | None = None
    for batch, count in zip(micro_batches, counts, strict=True):
        loss, metrics = objective.loss(engine, to_device(batch, engine.device), denominator)
        engine.backward(loss)
        stats = engine.step() or stats
        step_loss += float(loss.detach())
        for name, value in metrics.items():
            weighted[name] = weighted.get(name, 0.0) + float(value) * count
    names = sorted(weighted)
    global_loss, *sums = all_reduce_sum(step_loss, *(weighted[n] for n in names))
    means = {name: total / max(denominator, 1) for name, total in zip(names, sums, strict=True)}
    return {"loss": global_loss, "items": denominator, **means, **(stats or {})}


def evaluate(engine: Any, objective: Objective, batches: list[dict[str, Any]]) -> dict[str, float]:
    """Held-out loss and metrics over all ranks' shards, prefixed ``eval_``."""
    from cluster.collectives import all_reduce_sum
    from rlhf.jobs.worker import to_device

    engine.eval()
    total_loss, items = 0.0, 0
    weighted: dict[str, float] = {}
    with torch.no_grad():
        for batch in batches:  # a denominator of 1 gives plain sums
            count = objective.count(batch)
            loss, metrics = objective.loss(engine, to_device(batch, engine.device), 1.0)
            total_loss += float(loss)
            items += count
            for name, value in metrics.items():
                weighted[name] = weighted.get(name, 0.0) + float(value) * count
    engine.train()
    names = sorted(weighted)
    total_loss, all_items, *sums = all_reduce_sum(total_loss, items, *(weighted[n] for n in names))
    result = {"eval_loss": total_loss / max(all_items, 1)}
    result |= {f"eval_{name}": value / max(all_items, 1) for name, value in zip(names, sums, strict=True)}
    return result | objective.derived_eval_metrics(result)


@dataclass(frozen=True)
class RankIO:
    """Where one rank's records and checkpoints go. Under Ray Train (:func:`run_worker`): the driver's metrics sink
    and Ray Train's checkpoints; without Ray (tests of the loop itself), any callables."""

    log: Callable[[dict[str, Any]], None]
    """Send a metric record (rank 0's count; other ranks may send too, the receiver decides)."""
    flush: Callable[[], object]
    """Wait until every record sent so far is written (before a checkpoint)."""
    restore: Callable[[Any], int]
    """Load the latest checkpoint into the engine, if any; the step it holds (0 for none)."""
    save: Callable[[Any, int, bool], None]
    """Write a resumable checkpoint of the engine at a step (``is_main``: this is rank 0)."""


def run_worker(args: dict[str, Any], config_cls: type, make_objective: Callable[[Any, Any], Objective]) -> None:
    """The body of every Ray Train worker: ``make_objective(config, tokenizer)`` says what to train."""
    import ray

    from cluster import configtree
    from rlhf.jobs.worker import Reporter, worker_info

    config: Any = configtree.from_dict(config_cls, args["config"])  # the job's own config class
    reporter = Reporter(args["sink"], worker_info())
    reporter.announce()
    io = RankIO(log=reporter.log, flush=reporter.flush, restore=restore, save=save)
    evaluation = ray.get(args["eval"]) if args["eval"] is not None else None
    train_rank(config, make_objective, ray.get(args["train"]), evaluation, args["total_steps"], io)


def train_rank(
    config: Any,
    make_objective: Callable[[Any, Any], Objective],
    train_examples: list[dict[str, Any]],
    eval_examples: list[dict[str, Any]] | None,
    total_steps: int,
    io: RankIO,
) -> None:
    """One rank of a data-parallel job, from the whole tokenized data to the exported model: this rank's shard,
    the objective's preparation, the engine (which joins the process group), evaluation before and after, the
    steps, checkpoints, export to ``config.train.output_dir``/final."""
    from rlhf.data.collate import shard
    from rlhf.engine import TrainingEngine
    from rlhf.jobs.batching import step_indices
    from rlhf.jobs.worker import seed_everything, worker_info
    from rlhf.models.loading import load_tokenizer

    info = worker_info()
    seed_everything(config.train.seed)
    tokenizer = load_tokenizer(config.model)
    objective = make_objective(config, tokenizer)
    model = objective.build_model()
    train_examples = objective.prepare(model, shard(train_examples, info.rank, info.world_size))
    if eval_examples is not None:
        eval_examples = objective.prepare(model, shard(eval_examples, info.rank, info.world_size))
    engine = TrainingEngine(model, config.engine, total_steps)
    start_step = io.restore(engine)
    train = config.train
    mbs, gas = config.engine.micro_batch_size, config.engine.gradient_accumulation_steps
    eval_examples = eval_examples or []
    eval_batches = [objective.collate(eval_examples[i : i + mbs]) for i in range(0, len(eval_examples), mbs)]

    def log_eval(step: int) -> None:
        if eval_batches:
            io.log({"kind": "eval", "step": step, **evaluate(engine, objective, eval_batches)})

    if start_step == 0:
        log_eval(0)
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        indices = step_indices(len(train_examples), step, mbs, gas, train.seed)
        micro_batches = [objective.collate([train_examples[i] for i in idx]) for idx in indices]
        metrics = train_step(engine, objective, micro_batches)
        seconds = time.perf_counter() - started
        done = step + 1
        if done % train.log_every == 0 or done == total_steps:
            io.log(
                {"kind": "train", "step": done, "total_steps": total_steps, **metrics,
                 "step_seconds": seconds, "items_per_second": metrics["items"] / seconds}
            )  # fmt: skip
        if train.eval_every and done % train.eval_every == 0 and done < total_steps:
            log_eval(done)
        if (train.save_every and done % train.save_every == 0) or done == total_steps:
            # the metrics of every step up to this one reach the disk first; a driver that does not
            # acknowledge within the flush's timeout does not hold the checkpoint up
            io.flush()
            io.save(engine, done, info.is_main)
    log_eval(total_steps)
    storage = RunStorage(config.train.output_dir)
    export_to(storage, lambda directory: engine.export(directory, tokenizer, config.model), "final")


def restore(engine: Any) -> int:
    """Load the latest Ray Train checkpoint (after a worker failure or a re-run), if any; return its step."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        return int(engine.load_checkpoint(directory)["step"])


def save(engine: Any, step: int, is_main: bool) -> None:
    """Write a resumable checkpoint (every rank's shard, optimizer, schedule, RNG) through Ray Train."""
    import json
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, {"step": step})
        if is_main:
            (Path(directory) / "progress.json").write_text(json.dumps({"step": step}))
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}")
    # The controller registers reported checkpoints asynchronously; a failure in that window would
    # otherwise fall back to the previous checkpoint. Training resumes only once this one is committed.
    if is_main:
        from ray.train import CheckpointConsistencyMode

        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)


def total_steps(config: Any, num_examples: int) -> int:
    """Optimizer steps of the run: ``train.max_steps``, or ``num_epochs`` over each rank's shard."""
    from rlhf.jobs.batching import steps_per_epoch

    if config.train.max_steps is not None:
        return config.train.max_steps
    workers, mbs, gas = (
        config.cluster.num_workers,
        config.engine.micro_batch_size,
        config.engine.gradient_accumulation_steps,
    )
    per_epoch = steps_per_epoch(num_examples // workers, mbs, gas)
    if per_epoch == 0:
        raise ConfigError(
            f"{num_examples} training examples over {workers} workers cannot fill one step of "
            f"engine.micro_batch_size {mbs} x engine.gradient_accumulation_steps {gas}"
        )
    return max(1, int(per_epoch * config.train.num_epochs))


def prepare_data(config: Any, tokenizer: Any, kind: Kind) -> tuple[list[dict], list[dict] | None]:
    """Tokenize train and eval examples on the driver (bad data fails here, before any worker starts)."""
    from rlhf.data.encode import build_examples

    data = config.data
    train = build_examples(data, tokenizer, kind)
    evaluation = None
    if data.eval_split or data.eval_path:
        unpacked = replace(data, packing=False)  # evaluation scores each example on its own
        split, path = data.eval_split or data.split, data.eval_path or data.path
        evaluation = build_examples(unpacked, tokenizer, kind, split=split, path=path)
    return train, evaluation


def run_job(config: Any, name: str, kind: Kind, worker: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Driver of a data-parallel job: validate, tokenize once, run the workers, summarize."""
    import ray

    from cluster.connect import connect
    from rlhf.jobs.runner import check_resume, prepare_output_dir, release_output_dir, run_training
    from rlhf.models.loading import load_tokenizer

    storage = prepare_output_dir(config.train.output_dir)  # the directory's run lock is this run's from here
    try:
        # workers resolve nothing themselves: a relative path means the driver's directory on every node
        config = replace(config, train=replace(config.train, output_dir=storage.location))
        if config.train.resume == "never":
            check_resume(config, name, total_steps=10**12)  # refuse before any work
        tokenizer = load_tokenizer(config.model)
        train, evaluation = prepare_data(config, tokenizer, kind)
        steps = total_steps(config, len(train))
        check_resume(config, name, steps)
        connect(config.cluster)
        payload = {"train": ray.put(train), "eval": ray.put(evaluation) if evaluation else None, "total_steps": steps}
    except BaseException:  # run_training releases it from here on
        release_output_dir(storage)
        raise
    records = run_training(worker, config, storage, payload, name, steps)
    return summarize(records, storage)


def summarize(records: list[dict[str, Any]], storage: RunStorage) -> dict[str, Any]:
    """Before/after figures of a run from its metric records: first/last train loss, every eval metric."""
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    summary: dict[str, Any] = {
        "output_dir": str(storage),
        "final_model": redact(storage.child("final")),
        "steps": len(train),
    }
    if train:
        summary |= {"first_loss": train[0]["loss"], "last_loss": train[-1]["loss"]}
    if len(evals) >= 2:
        for key in evals[0]:
            if key.startswith("eval_"):
                summary[f"{key}_before"] = evals[0][key]
                summary[f"{key}_after"] = evals[-1][key]
    return summary


def reference_pass(
    model: torch.nn.Module,
    examples: list[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    logps: Callable[[dict[str, torch.Tensor]], Sequence[torch.Tensor]],
    size: int = 16,
) -> list[dict[str, Any]]:
    """``examples`` with ``reference_logps`` added: the pair ``logps(collate(chunk))`` of each, from ``model``
    in eval mode without gradients, chunk by chunk (the once-before-training reference of DPO and KTO)."""
    model.eval()
    prepared = []
    with torch.no_grad():
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            first, second = logps(collate(chunk))
            for example, a, b in zip(chunk, first.tolist(), second.tolist(), strict=True):
                prepared.append({**example, "reference_logps": (a, b)})
    model.train()
    return prepared


def on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` moved to ``device`` if it is elsewhere: a live reference model joins the engine's device on
    first use (objectives build it before the engine exists)."""
    if next(model.parameters()).device != device:
        model.to(device)
    return model


def perplexity(loss: float) -> float:
    """exp(loss), capped to stay finite."""
    return math.exp(min(loss, 50.0))
