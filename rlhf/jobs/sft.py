"""``rlhf sft``: supervised fine-tuning as a Ray Train job over the training engine.

Driver: tokenize the data once (bad rows refused before any worker starts), put it in
the object store, run N workers. Worker: take a shard, build the model and the engine,
then ``evaluate -> train steps -> evaluate -> export``. The loss of each optimizer step
is the token-mean NLL over the whole global batch (all ranks and micro-batches share
one denominator), so results do not depend on how the batch is split.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from rlhf.config import SFTConfig


def collate(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Micro-batch tensors: packed rows padding-free with ``position_ids``, others right-padded with a mask."""
    from rlhf.data.collate import collate_sft

    return collate_sft(examples, pad_token_id)


def scored_tokens(batch: dict[str, Any]) -> int:
    """Label tokens of ``batch`` that the loss scores (after the next-token shift)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def forward_loss(engine: Any, batch: dict[str, Any], num_tokens: float) -> Any:
    """This micro-batch's share of the global loss."""
    from rlhf.algos import sft_loss

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    # no KV cache: transformers detects packed rows (restarting position_ids) only without one
    logits = engine(**inputs, use_cache=False).logits
    loss, _ = sft_loss(logits, batch["labels"], num_tokens=num_tokens)
    return loss


def train_step(engine: Any, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; returns global loss, tokens and engine stats."""
    from rlhf.jobs.worker import all_reduce_sum, to_device

    (num_tokens,) = all_reduce_sum(sum(scored_tokens(b) for b in micro_batches))
    step_loss = 0.0
    stats: dict[str, float] | None = None
    for batch in micro_batches:
        loss = forward_loss(engine, to_device(batch, engine.device), num_tokens)
        engine.backward(loss)
        stats = engine.step() or stats
        step_loss += float(loss.detach())
    (global_loss,) = all_reduce_sum(step_loss)
    return {"loss": global_loss, "tokens": num_tokens, **(stats or {})}


def evaluate(engine: Any, examples: list[dict[str, Any]], micro_batch_size: int, pad_token_id: int) -> dict[str, float]:
    """Held-out token-mean NLL and perplexity over all ranks' shards."""
    import torch

    from rlhf.jobs.worker import all_reduce_sum, to_device

    batches = [
        collate(examples[i : i + micro_batch_size], pad_token_id) for i in range(0, len(examples), micro_batch_size)
    ]
    engine.eval()
    nll = 0.0
    with torch.no_grad():
        for batch in batches:  # a local denominator of 1 gives the plain NLL sum
            nll += float(forward_loss(engine, to_device(batch, engine.device), 1.0))
    engine.train()
    total_nll, total_tokens = all_reduce_sum(nll, sum(scored_tokens(b) for b in batches))
    loss = total_nll / max(total_tokens, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def worker(args: dict[str, Any]) -> None:
    """The per-worker training function (runs on every Ray Train worker)."""
    import ray

    from rlhf import configtree
    from rlhf.data.collate import shard
    from rlhf.engine import TrainingEngine
    from rlhf.jobs.batching import step_indices
    from rlhf.jobs.worker import Reporter, seed_everything, worker_info
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    config = configtree.from_dict(SFTConfig, args["config"])
    info = worker_info()
    reporter = Reporter(args["sink"], info)
    seed_everything(config.train.seed)
    tokenizer = load_tokenizer(config.model)
    train_examples = shard(ray.get(args["train"]), info.rank, info.world_size)
    eval_examples = shard(ray.get(args["eval"]), info.rank, info.world_size) if args["eval"] is not None else []
    engine_config = config.engine
    total_steps = args["total_steps"]
    engine = TrainingEngine(load_causal_lm(config.model), engine_config, total_steps)
    pad = tokenizer.pad_token_id
    mbs, gas = engine_config.micro_batch_size, engine_config.gradient_accumulation_steps

    if eval_examples:
        reporter.log({"kind": "eval", "step": 0, **evaluate(engine, eval_examples, mbs, pad)})
    for step in range(total_steps):
        started = time.perf_counter()
        indices = step_indices(len(train_examples), step, mbs, gas, config.train.seed)
        micro_batches = [collate([train_examples[i] for i in idx], pad) for idx in indices]
        metrics = train_step(engine, micro_batches)
        seconds = time.perf_counter() - started
        if (step + 1) % config.train.log_every == 0 or step + 1 == total_steps:
            reporter.log(
                {"kind": "train", "step": step + 1, "total_steps": total_steps, **metrics,
                 "step_seconds": seconds, "tokens_per_second": metrics["tokens"] / seconds}
            )  # fmt: skip
    if eval_examples:
        reporter.log({"kind": "eval", "step": total_steps, **evaluate(engine, eval_examples, mbs, pad)})
    engine.export(Path(config.train.output_dir).resolve() / "final", tokenizer, config.model)


def prepare_data(config: SFTConfig, tokenizer: Any) -> tuple[list[dict], list[dict] | None]:
    """Tokenize (and, if configured, pack) train and eval examples on the driver; bad data fails here."""
    from dataclasses import replace

    from rlhf.data.encode import build_examples

    data = config.data
    train = build_examples(data, tokenizer, "sft")
    evaluation = None
    if data.eval_split or data.eval_path:
        unpacked = replace(data, packing=False)  # evaluation scores each example on its own
        split, path = data.eval_split or data.split, data.eval_path or data.path
        evaluation = build_examples(unpacked, tokenizer, "sft", split=split, path=path)
    return train, evaluation


def total_steps(config: SFTConfig, num_examples: int) -> int:
    """Optimizer steps of the run: ``train.max_steps``, or ``num_epochs`` over each rank's shard."""
    from rlhf.jobs.batching import steps_per_epoch

    if config.train.max_steps is not None:
        return config.train.max_steps
    per_rank = num_examples // config.cluster.num_workers
    per_epoch = steps_per_epoch(per_rank, config.engine.micro_batch_size, config.engine.gradient_accumulation_steps)
    if per_epoch == 0:
        raise ValueError(
            f"{num_examples} training examples over {config.cluster.num_workers} workers cannot fill one step of "
            f"micro_batch_size {config.engine.micro_batch_size} x gradient_accumulation_steps "
            f"{config.engine.gradient_accumulation_steps}"
        )
    return max(1, int(per_epoch * config.train.num_epochs))


def run(config: SFTConfig) -> dict[str, Any]:
    """Run SFT; return a summary (first/last loss, eval before/after, output paths)."""
    import ray

    from cluster.connect import connect
    from rlhf.jobs.runner import prepare_output_dir, run_training
    from rlhf.models.loading import load_tokenizer

    prepare_output_dir(config.train.output_dir)
    tokenizer = load_tokenizer(config.model)
    train, evaluation = prepare_data(config, tokenizer)
    steps = total_steps(config, len(train))
    connect(config.cluster)
    payload = {"train": ray.put(train), "eval": ray.put(evaluation) if evaluation else None, "total_steps": steps}
    records = run_training(worker, config, payload, "sft", steps)
    return summarize(records, Path(config.train.output_dir).resolve())


def summarize(records: list[dict[str, Any]], output_dir: Path) -> dict[str, Any]:
    """Before/after figures of a run from its metric records."""
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    summary: dict[str, Any] = {
        "output_dir": str(output_dir),
        "final_model": str(output_dir / "final"),
        "steps": len(train),
    }
    if train:
        summary |= {"first_loss": train[0]["loss"], "last_loss": train[-1]["loss"]}
    if len(evals) >= 2:
        summary |= {"eval_loss_before": evals[0]["eval_loss"], "eval_loss_after": evals[-1]["eval_loss"]}
    return summary
