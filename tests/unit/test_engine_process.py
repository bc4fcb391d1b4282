"""What the training engine sets up in its process: the model's training mode, and on a CPU the memory it keeps.

Each case builds an engine in a fresh process (``benchmarks.common.isolated``): the engine joins a process group,
and the memory settings are the process's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.common import isolated


def tensors_saved_for_backward(model_dir: str) -> tuple[bool, int, int]:
    """Through an engine over a model loaded with gradient checkpointing: whether the model is in training mode,
    and how many tensors its forward saves for the backward with checkpointing on and then turned off."""
    import torch

    from rlhf.engine import EngineConfig, TrainingEngine
    from rlhf.models.config import ModelConfig
    from rlhf.models.loading import load_causal_lm

    engine = TrainingEngine(
        load_causal_lm(ModelConfig(name_or_path=model_dir, gradient_checkpointing=True)), EngineConfig(), 1
    )
    ids = torch.randint(3, 100, (2, 12))

    def saved() -> int:
        count = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal count
            count += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return count

    checkpointed = saved()
    engine.module.gradient_checkpointing_disable()
    return engine.module.training, checkpointed, saved()


def test_the_engine_trains_with_gradient_checkpointing_in_effect(tiny_model_dir: Path) -> None:
    """Before, a trainable model came out of ``from_pretrained`` in eval mode and the engine left it there: every
    job that did not run an evaluation first trained in eval mode, where transformers skips gradient checkpointing
    (the forward kept all 89 activations of the tiny model, as many as without checkpointing, where ``rlhf plan``
    counts them as recomputed; with it in effect it keeps 15) and dropout (``algorithm.disable_dropout=false``
    trained without it)."""
    training, checkpointed, kept = isolated(tensors_saved_for_backward, str(tiny_model_dir))
    assert training and checkpointed < kept / 2, (training, checkpointed, kept)


def dropout_draws(model_dir: str, directory: str) -> tuple[bool, bool]:
    """A copy of the model with attention dropout 0.5, trained by the policy worker with dropout left on and off:
    whether two forwards of the same batch differ in each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.engine import EngineConfig
    from rlhf.models.config import ModelConfig
    from rlhf.rl.workers import PolicyWorker

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.attention_dropout = 0.5
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(directory)
    ids = torch.randint(3, 100, (2, 12))
    differ = []
    for disable in (False, True):
        worker = PolicyWorker()
        worker.build(ModelConfig(name_or_path=directory), EngineConfig(), 1, seed=0, disable_dropout=disable)
        with torch.no_grad():
            first, second = (worker.engine(input_ids=ids).logits for _ in range(2))
        differ.append(not torch.equal(first, second))
    return differ[0], differ[1]


def test_the_policy_trains_with_dropout_unless_it_is_disabled(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Before, the policy trained in eval mode, so ``algorithm.disable_dropout=false`` had no effect: the model's
    attention dropout never ran (``(False, False)``)."""
    assert isolated(dropout_draws, str(tiny_model_dir), str(tmp_path / "dropout")) == (True, False)


def memory_returned_by_a_freed_block() -> tuple[int, int]:
    """The bytes of a step-sized block (256 MiB), and how far this process's resident memory fell when the block,
    allocated and filled, was freed."""
    import psutil
    import torch

    process, size = psutil.Process(), 256 * 2**20
    block = torch.ones(size // 4)
    held = process.memory_info().rss
    del block
    return size, held - process.memory_info().rss


def memory_returned_after_an_engine(model_dir: str) -> tuple[int, int]:
    """:func:`memory_returned_by_a_freed_block` after a CPU engine is built."""
    from transformers import AutoModelForCausalLM

    from rlhf.engine import EngineConfig, TrainingEngine

    TrainingEngine(AutoModelForCausalLM.from_pretrained(model_dir), EngineConfig(), 1)
    return memory_returned_by_a_freed_block()


def memory_returned_after_a_reward_model(model_dir: str, directory: str) -> tuple[int, int]:
    """:func:`memory_returned_by_a_freed_block` after a reward worker on the CPU has built its reward model (the
    tiny model with a scalar head, saved in ``directory``)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.rl.workers import RewardWorker

    scored = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(model_dir, num_labels=1))
    scored.save_pretrained(directory)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(directory)
    RewardWorker().build(directory)
    return memory_returned_by_a_freed_block()


def test_a_cpu_engine_keeps_the_memory_its_steps_free(tiny_model_dir: Path) -> None:
    """Before, glibc returned each large freed block (a step's activations, logits) to the OS at once, and the next
    step faulted every page in again: in the PPO policy actor, where generation and the weight sync run between
    updates, the forward spent more time in the kernel than in torch (57.4M model, 64 x 70 tokens: 5.6 s, 6.3 s of
    it system time over 600k page faults; 2.2 s once the memory is kept). Here the 256 MiB block went back whole:
    the resident memory fell by 268,439,552 bytes."""
    size, returned = isolated(memory_returned_after_an_engine, str(tiny_model_dir))
    assert returned < size / 10, (returned, size)


def test_a_cpu_reward_model_keeps_the_memory_its_scoring_frees(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Before, a reward rank scoring with a reward model on the CPU returned each batch's freed blocks to the OS,
    as the policy did before it kept them: its forwards run between generation and the updates, and each one
    faulted its pages in again. Here the 256 MiB block went back whole: 268,439,552 bytes."""
    size, returned = isolated(memory_returned_after_a_reward_model, str(tiny_model_dir), str(tmp_path / "rm"))
    assert returned < size / 10, (returned, size)


def update_sums(model_dir: str) -> tuple[dict[str, float], dict[str, float]]:
    """The policy worker's update over one mini-batch of two micro-batches with a loss whose metric is known: the
    sums it returns, and the sums computed here from the same micro-batches."""
    import torch

    from rlhf.engine import EngineConfig
    from rlhf.models.config import ModelConfig
    from rlhf.rl.experience import Experience
    from rlhf.rl.workers import PolicyWorker

    worker = PolicyWorker()
    worker.build(ModelConfig(name_or_path=model_dir), EngineConfig(gradient_accumulation_steps=2), 1, seed=0)
    micro_batches = []
    for rows, responses in ((2, 3), (3, 5)):
        ids = torch.randint(3, 100, (rows, 8))
        mask = torch.zeros(rows, 7)
        mask[:, -responses:] = 1
        micro_batches.append(Experience(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=mask))
    losses: list[float] = []

    def loss_fn(batch: Experience, denominator: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = worker.engine(input_ids=batch.input_ids).logits.float().pow(2).mean()
        losses.append(float(loss))
        return loss, {"rows": torch.tensor(float(len(batch)))}

    sums = worker._update([micro_batches], [{"num_tokens": 21.0, "num_sequences": 5.0}], loss_fn, "policy_loss", {})
    expected = {"tokens": 2 * 3 + 3 * 5.0, "rows": 2 * 6 + 3 * 15.0, "policy_loss": sum(losses)}
    return sums, expected


def test_the_update_adds_its_metrics_on_the_device_and_times_each_phase(tiny_model_dir: Path) -> None:
    """The update's sums (each metric x the micro-batch's response tokens, the losses, the tokens) stay on the
    device until the update is done and come to the host in one copy; on a GPU the phases are timed by events read
    once at the end. On the CPU: the same sums as counted here, and every phase timed."""
    sums, expected = isolated(update_sums, str(tiny_model_dir))
    assert {key: sums[key] for key in expected} == pytest.approx(expected, rel=1e-9), sums
    phases = [sums[f"time/policy_{phase}"] for phase in ("forward", "backward", "optimizer")]
    assert all(seconds > 0 for seconds in phases) and all(isinstance(value, float) for value in sums.values()), sums
