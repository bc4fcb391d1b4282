"""The role workers of ``rlhf ppo``: thin Ray actors around a model, each a rank of its role's group.

* :class:`PolicyWorker`: the trainable policy on a :class:`~rlhf.engine.TrainingEngine`
  (its own ZeRO stage); log-probs of sequences, a PPO update, the weights for the rollout
  replicas, checkpoints.
* :class:`ReferenceWorker`: the frozen initial policy; log-probs only.
* :class:`ValueWorker`: the trainable critic (a scalar head read at every token) on its own engine.
* :class:`RewardWorker`: a reward model, a Python function or an HTTP endpoint (:mod:`rlhf.rl.rewards`).

:class:`~cluster.groups.ActorGroup` creates them and joins their process group; the
driver (:mod:`rlhf.jobs.ppo`) sends each rank its shard. Every method takes and returns
plain tensors and numbers, and configs as the dataclasses they are (Ray pickles them); the
losses come from :mod:`rlhf.algos`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from cluster.rank_worker import RankWorker
from rlhf import seeds
from rlhf.algos.objective import PolicyObjective
from rlhf.rl.policy_loss import causal_logprobs, policy_loss

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm.distributed.weight_transfer.base import TrainerWeightTransferEngine

    from rlhf.engine import EngineConfig, TrainingEngine
    from rlhf.models.config import ModelConfig
    from rlhf.rl.experience import Experience
    from rlhf.rl.rewards import RewardSource
    from serving.weight_transfer import ReplicaWeightSync

LossFn = Callable[["Experience", dict[str, float]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""A micro-batch and its mini-batch's global denominators -> (loss, metrics per token)."""


def _without_dropout(model: torch.nn.Module, disable: bool) -> torch.nn.Module:
    """``model`` with its dropout turned off when ``disable`` (``algorithm.disable_dropout``).

    The rollout policy's log-probs (vLLM's, and the "old" ones of the update) are taken without dropout; a
    training-mode forward with dropout on would put noise into every ratio, so the first update's ratios would
    not be 1 and clipping would act on noise.
    """
    from rlhf.models.loading import disable_dropout

    if disable:
        disable_dropout(model)
    return model


def _device() -> str:
    """The device of a frozen model in this actor: its GPU when Ray gave it one."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


class _PhaseClock:
    """The seconds of an update's phases on the device that runs them, read once when the update is done.

    A GPU runs its kernels behind the Python that queued them, so a phase ends when its last kernel does. On a GPU
    each boundary is a CUDA event, read at the end: waiting for the device at every boundary would drain its queue
    there and leave it idle while Python queues the next phase. The events mark the current stream: work DeepSpeed
    runs on streams of its own (ZeRO's overlapped gradient reductions) counts to the phase that waits for it. On the
    CPU the work is done when the call returns, and each boundary is a reading of the clock.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, Any, Any]] = []

    def now(self) -> Any:
        """A boundary: a recorded CUDA event, or the clock's seconds."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        event.record()
        return event

    def add(self, phase: str, start: Any, end: Any) -> None:
        """Count the time between two boundaries to ``phase``."""
        self.spans.append((phase, start, end))

    def seconds(self) -> dict[str, float]:
        """Each phase's seconds, added over its spans (on a GPU, once its last kernel is done)."""
        if self.cuda and self.spans:
            self.spans[-1][2].synchronize()
        totals: dict[str, float] = {}
        for phase, start, end in self.spans:
            totals[phase] = totals.get(phase, 0.0) + (start.elapsed_time(end) / 1000 if self.cuda else end - start)
        return totals


def _on_host(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Device scalars as floats, copied in one transfer (each ``float()`` of a GPU tensor waits for the device)."""
    if not sums:
        return {}
    values = torch.stack([value.detach().double().reshape(()) for value in sums.values()]).tolist()
    return dict(zip(sums, values, strict=True))


class _TrainableWorker(RankWorker):
    """Shared by the policy and value workers: an engine, checkpoints, and the no-grad pass over shards."""

    _engine: TrainingEngine | None = None
    _tokenizer: PreTrainedTokenizerBase | None = None
    _model_config: ModelConfig | None = None

    def _built(self, model: ModelConfig, tokenizer: PreTrainedTokenizerBase, engine: TrainingEngine) -> None:
        self._model_config, self._tokenizer, self._engine = model, tokenizer, engine

    @property
    def engine(self) -> TrainingEngine:
        """This rank's training engine (after :meth:`build`)."""
        if self._engine is None:
            raise RuntimeError(f"{type(self).__name__} rank {self.rank}: call build first")
        return self._engine

    def _no_grad(
        self, batches: list[Experience], fn: Callable[[TrainingEngine, Experience], torch.Tensor]
    ) -> list[torch.Tensor]:
        self.engine.eval()
        try:
            with torch.no_grad():
                return [fn(self.engine, batch).cpu() for batch in batches]
        finally:
            self.engine.train()

    def _update(
        self,
        mini_batches: list[list[Experience]],
        denominators: list[dict[str, float]],
        loss_fn: LossFn,
        loss_name: str,
        stat_names: dict[str, str],
    ) -> dict[str, float]:
        """One optimizer step per mini-batch over its micro-batches, ``loss_fn(batch, denominator)`` each.

        ``denominators[i]`` are mini-batch ``i``'s global ``num_tokens`` and ``num_sequences``, so the
        ranks' losses add up to the whole batch's. Returns this rank's sums: each metric x the
        micro-batch's response tokens, ``tokens``, the summed loss as ``loss_name``, the last
        optimizer step's engine stats renamed by ``stat_names``, and the seconds of each phase of the
        update (``time/<role>_forward``: forward and loss, ``_backward``, ``_optimizer``: clipping, the
        optimizer and the schedule); the driver adds the ranks.
        """
        from rlhf.algos import masked_count

        role = loss_name.removesuffix("_loss")
        phases = {phase: f"time/{role}_{phase}" for phase in ("forward", "backward", "optimizer")}
        clock = _PhaseClock(torch.device(self.engine.device))
        sums: dict[str, float] = {"tokens": 0.0}
        on_device: dict[str, torch.Tensor] = {}  # the metrics stay on the device until the update is done
        for micro_batches, denominator in zip(mini_batches, denominators, strict=True):
            for batch in micro_batches:
                tokens = float(masked_count(batch.response_mask))  # counted on the host, before the copy
                batch = batch.to(self.engine.device)
                started = clock.now()
                loss, metrics = loss_fn(batch, denominator)
                forward_done = clock.now()
                self.engine.backward(loss)
                backward_done = clock.now()
                stats = self.engine.step() or {}
                clock.add(phases["forward"], started, forward_done)
                clock.add(phases["backward"], forward_done, backward_done)
                clock.add(phases["optimizer"], backward_done, clock.now())
                sums["tokens"] += tokens
                for name, value in metrics.items():
                    on_device[name] = on_device.get(name, 0.0) + value.detach().double() * tokens
                on_device[loss_name] = on_device.get(loss_name, 0.0) + loss.detach().double()
                sums |= {name: stats[key] for key, name in stat_names.items() if key in stats}
        return sums | _on_host(on_device) | dict.fromkeys(phases.values(), 0.0) | clock.seconds()

    def save_checkpoint(self, directory: str, client_state: dict[str, Any] | None = None) -> None:
        """Write this rank's part of a resumable checkpoint (weights, optimizer, schedule, RNG)."""
        self.engine.save_checkpoint(directory, client_state)

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save_checkpoint`; return its client state."""
        state: dict[str, Any] = self.engine.load_checkpoint(directory)
        return state

    def export(self, directory: str) -> str | None:
        """The full model in Hugging Face format (ZeRO-3 shards gathered); every rank calls it, rank 0 writes."""
        path = self.engine.export(directory, self._tokenizer, self._model_config)
        return None if path is None else str(path)


class PolicyWorker(_TrainableWorker):
    """One rank of the trainable policy."""

    transfer: TrainerWeightTransferEngine[Any] | None = None

    def build(
        self, model: ModelConfig, engine: EngineConfig, total_steps: int, seed: int, disable_dropout: bool = True
    ) -> None:
        """Load the policy (dropout off unless ``disable_dropout`` is False) and wrap it in the training engine.

        Call on every rank together.
        """
        from rlhf.engine import TrainingEngine
        from rlhf.jobs.worker import seed_everything
        from rlhf.models.loading import load_causal_lm, load_tokenizer

        seed_everything(seeds.worker(seed, "policy", self.rank))
        model_engine = TrainingEngine(_without_dropout(load_causal_lm(model), disable_dropout), engine, total_steps)
        self._built(model, load_tokenizer(model), model_engine)

    def logprobs(self, batches: list[Experience], temperature: float) -> list[torch.Tensor]:
        """Log-probs ``[b, T-1]`` of each batch under the current weights (no gradients)."""
        return self._no_grad(batches, lambda model, batch: causal_logprobs(model, batch, temperature))

    def train(
        self,
        mini_batches: list[list[Experience]],
        denominators: list[dict[str, float]],
        objective: PolicyObjective,
        temperature: float,
    ) -> dict[str, float]:
        """One optimizer step per mini-batch on :func:`~rlhf.algos.objective.policy_objective`.

        Each micro-batch holds the sequences, ``advantages``, ``rollout_logprobs`` and maybe
        ``old_logprobs`` (None: this pass's own detached log-probs, one on-policy pass),
        ``reference_logprobs`` (KL in the loss) and ``importance_weights``. Without ``old_logprobs``
        the trainer-vs-rollout gap is measured here. See :meth:`_update` for the denominators and the sums returned.
        """

        def loss_fn(batch: Experience, denominator: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return policy_loss(self.engine, batch, denominator, objective, temperature)

        return self._update(mini_batches, denominators, loss_fn, "policy_loss", {"grad_norm": "grad_norm", "lr": "lr"})

    def open_weight_transfer(self, sync: ReplicaWeightSync, backend: str, timeout_s: float) -> None:
        """Open the weight transfer to the rollout replicas (every rank together; rank 0 sends)."""
        from rlhf.rl.weight_source import weight_source
        from serving.weight_transfer import open_trainer

        self.close_weight_transfer()
        source = weight_source(self.engine.module, self.engine.config.zero_stage)
        self.transfer = open_trainer(sync, source, self.rank, backend, timeout_s)

    def send_weights(self) -> None:
        """Push the current weights into every replica (every rank together)."""
        if self.transfer is None:
            raise RuntimeError("no weight transfer is open: call open_weight_transfer first")
        self.transfer.send_weights()

    def close_weight_transfer(self) -> None:
        """Close this rank's side of the weight transfer, if one is open."""
        if self.transfer is not None:
            self.transfer.shutdown()
            self.transfer = None


class ValueWorker(_TrainableWorker):
    """One rank of the trainable critic: a scalar-head model read at every position."""

    def build(
        self, model: ModelConfig, engine: EngineConfig, total_steps: int, seed: int, disable_dropout: bool = True
    ) -> None:
        """Load the value model (a scalar head on the given checkpoint) and wrap it in the training engine."""
        from rlhf.engine import TrainingEngine
        from rlhf.jobs.worker import seed_everything
        from rlhf.models.loading import load_scalar_model, load_tokenizer

        seed_everything(seeds.worker(seed, "value", self.rank))
        model_engine = TrainingEngine(_without_dropout(load_scalar_model(model), disable_dropout), engine, total_steps)
        self._built(model, load_tokenizer(model), model_engine)

    @staticmethod
    def _values(engine: TrainingEngine, batch: Experience) -> torch.Tensor:
        """``[B, T-1]``: the scalar head at position ``t`` is V of the state before token ``t + 1``."""
        from rlhf.models.loading import is_peft

        module: Any = engine.module  # a transformers model (or its peft wrapper): its heads are not typed
        base = module.get_base_model() if is_peft(module) else module
        hidden = base.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        values = base.score(hidden).squeeze(-1)[:, :-1].float()
        return torch.where(batch.response_mask.bool(), values, 0.0)

    def values(self, batches: list[Experience]) -> list[torch.Tensor]:
        """Values ``[b, T-1]`` of each batch (no gradients)."""
        return self._no_grad(batches, self._values)

    def train(
        self,
        mini_batches: list[list[Experience]],
        denominators: list[dict[str, float]],
        clip_range: float | None,
    ) -> dict[str, float]:
        """One optimizer step per mini-batch on the clipped value loss (``values`` at rollout time, ``returns``)."""
        from rlhf.algos import value_loss
        from rlhf.rl.experience import need

        def loss_fn(batch: Experience, denominator: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return value_loss(
                self._values(self.engine, batch),
                need(batch.values, "values"),
                need(batch.returns, "returns"),
                batch.response_mask,
                clip_range,
                num_tokens=denominator["num_tokens"],
            )

        return self._update(mini_batches, denominators, loss_fn, "value_loss", {"grad_norm": "value_grad_norm"})


class ReferenceWorker(RankWorker):
    """One rank of the frozen reference policy (a full copy per rank: it only runs forward passes)."""

    model: Callable[..., Any] | None = None
    device: str = "cpu"

    def build(self, model: ModelConfig) -> None:
        """Load the frozen reference model (bf16 on a GPU, fp32 on the CPU)."""
        from rlhf.engine import keep_freed_memory
        from rlhf.models.loading import load_causal_lm

        self.device = _device()
        if self.device == "cpu":
            keep_freed_memory()  # its forwards run between the other roles' work, as the policy's do
        frozen = load_causal_lm(model, trainable=False)
        # transformers types to() as functools.wraps(Module.to), whose signature takes the module first
        self.model = (frozen if self.device != "cpu" else frozen.float()).to(self.device)  # type: ignore[arg-type]

    def logprobs(self, batches: list[Experience], temperature: float) -> list[torch.Tensor]:
        """Log-probs ``[b, T-1]`` of each batch under the reference model."""
        if self.model is None:
            raise RuntimeError(f"ReferenceWorker rank {self.rank}: call build first")
        model = self.model
        with torch.no_grad():
            return [causal_logprobs(model, b.to(self.device), temperature).cpu() for b in batches]


class RewardWorker(RankWorker):
    """One rank of the frozen reward: a reward model, a ``module:function``, an HTTP endpoint, or a weighted sum."""

    source: RewardSource | None = None

    def build(self, spec: str | list[dict[str, Any]]) -> str:
        """Create the reward source named by ``spec`` (or the weighted sum of its terms); return its description."""
        from rlhf.engine import keep_freed_memory
        from rlhf.rl.rewards import make_reward, make_weighted

        device = _device()
        if device == "cpu":
            keep_freed_memory()  # a reward model's forwards run between the other roles' work, as the policy's do
        self.source = make_reward(spec, device=device) if isinstance(spec, str) else make_weighted(spec, device=device)
        return repr(self.source)

    def _built_source(self) -> RewardSource:
        if self.source is None:
            raise RuntimeError(f"RewardWorker rank {self.rank}: call build first")
        return self.source

    def score(self, items: tuple[Any, ...], timeout_s: float) -> list[float]:
        """Scores of ``(prompts, responses[, columns])``, one float per response, within ``timeout_s``."""
        prompts, responses, columns = _score_items(items)
        return self._built_source().score(prompts, responses, timeout_s, columns)

    def score_parts(self, items: tuple[Any, ...], timeout_s: float) -> tuple[list[float], dict[str, list[float]]]:
        """The scores of :meth:`score` and, for a weighted sum, each component's (else none)."""
        from rlhf.rl.rewards import WeightedReward

        source = self._built_source()
        if isinstance(source, WeightedReward):
            prompts, responses, columns = _score_items(items)
            return source.score_parts(prompts, responses, timeout_s, columns)
        return self.score(items, timeout_s), {}


def _score_items(items: tuple[Any, ...]) -> tuple[Any, Any, Any]:
    """``(prompts, responses[, columns])`` as three (no columns: None)."""
    return items[0], items[1], items[2] if len(items) > 2 else None
