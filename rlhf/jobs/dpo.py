"""``rlhf dpo``: DPO and its family (IPO, cDPO, SimPO, ORPO) on preference pairs, a Ray Train job.

``preference.loss=kto`` trains on unpaired rows instead, with its own objective (:mod:`rlhf.jobs.kto`).

Reference log-probs (DPO, IPO, cDPO) are computed once, before training, by the initial
policy itself on each rank's shard, and kept with the examples: no reference model is
held during training. With ``preference.reference=live`` a frozen copy of the initial
model computes them per micro-batch instead. SimPO and ORPO use no reference.
Log-probs are sums over response tokens, or per-token means for IPO, SimPO and ORPO
(length-normalised, as in their papers and in TRL).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlhf.config import DPOConfig, PreferenceLossConfig
from rlhf.jobs.kto import UnpairedObjective
from rlhf.models.config import ModelConfig

if TYPE_CHECKING:
    from rlhf.data.formats import Kind

NEEDS_REFERENCE = {"dpo", "ipo", "cdpo"}
LENGTH_AVERAGED = {"ipo", "simpo", "orpo"}


class PreferenceObjective:
    """One of the DPO-family losses over the pairs of the global batch."""

    data_kind: Kind = "preference"

    def __init__(
        self, model: ModelConfig, preference: PreferenceLossConfig, pad_token_id: int, packing: bool = False
    ) -> None:
        if preference.loss == "kto":
            raise ValueError("kto trains on unpaired completions: use rlhf.jobs.kto.UnpairedObjective")
        self.model_config = model
        self.config = preference
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.reference: torch.nn.Module | None = None

    @property
    def average(self) -> bool:
        """Whether the loss takes per-token mean log-probs rather than sums."""
        return self.config.loss in LENGTH_AVERAGED

    def build_model(self) -> torch.nn.Module:
        """The policy; with a live reference, also a frozen copy of it."""
        from rlhf.models.loading import load_causal_lm

        if self.config.loss in NEEDS_REFERENCE and self.config.reference == "live":
            self.reference = load_causal_lm(self.model_config, trainable=False)
        return load_causal_lm(self.model_config)

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Chosen rows first, then rejected rows (padded, or packed into one row); reference log-probs if any."""
        from rlhf.data.collate import packed_preference_batch, preference_batch

        batch = packed_preference_batch(examples) if self.packing else preference_batch(examples, self.pad_token_id)
        if "reference_logps" in examples[0]:
            chosen = [e["reference_logps"][0] for e in examples]
            rejected = [e["reference_logps"][1] for e in examples]
            batch["reference_logps"] = torch.tensor(chosen + rejected, dtype=torch.float32)
        return batch

    def _logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Response log-probs [2B] (chosen rows first) under ``model``."""
        from rlhf.algos import packed_sequence_logprobs, sequence_logprobs
        from rlhf.models.logits import label_logits

        if "sequence_ids" in batch:  # packed: no mask, restarting positions keep attention per sequence
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
            logits, targets, positions = label_logits(model, inputs, batch["labels"])
            owners = batch["sequence_ids"][positions + 1]  # the sequence of each predicted label
            count = 2 * self.count(batch)
            return packed_sequence_logprobs(logits.float(), targets, owners, count, average=self.average, shifted=True)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits, targets, _ = label_logits(model, inputs, batch["labels"])
        return sequence_logprobs(logits.float(), targets, average=self.average, shifted=True)

    def prepare(self, model: torch.nn.Module, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Reference log-probs of every pair from the initial policy (once, before training)."""
        from rlhf.jobs.loop import reference_pass

        if self.config.loss not in NEEDS_REFERENCE or self.config.reference == "live" or not examples:
            return examples
        return reference_pass(model, examples, self.collate, lambda batch: self._logps(model, batch).chunk(2))

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs."""
        if "sequence_ids" in batch:
            return (int(batch["sequence_ids"][-1]) + 1) // 2
        return batch["input_ids"].shape[0] // 2

    def derived_eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Nothing beyond reward accuracy, margins and log-probs."""
        return {}

    def loss(self, model: Any, batch: dict[str, torch.Tensor], denominator: float) -> tuple[torch.Tensor, dict]:
        """This micro-batch's share of the chosen loss over the global pair count."""
        from rlhf.algos import dpo_loss, ipo_loss, orpo_loss, simpo_loss

        config = self.config
        chosen, rejected = self._logps(model, batch).chunk(2)
        if config.loss in NEEDS_REFERENCE:
            if self.reference is not None:
                from rlhf.jobs.loop import on_device

                live = on_device(self.reference, batch["input_ids"].device)  # the engine's device, as the batch
                with torch.no_grad():
                    reference = self._logps(live, batch)
            else:
                reference = batch["reference_logps"]
            ref_chosen, ref_rejected = reference.chunk(2)
            if config.loss == "ipo":
                loss, metrics = ipo_loss(chosen, rejected, ref_chosen, ref_rejected, config.beta, num_items=denominator)
            else:
                smoothing = config.label_smoothing if config.loss == "cdpo" else 0.0
                loss, metrics = dpo_loss(
                    chosen, rejected, ref_chosen, ref_rejected, config.beta, smoothing, num_items=denominator
                )
        elif config.loss == "simpo":
            loss, metrics = simpo_loss(
                chosen, rejected, config.beta, config.simpo_gamma_beta_ratio, num_items=denominator
            )
        else:  # orpo: per-pair NLL of the chosen response (mean over its tokens)
            loss, metrics = orpo_loss(chosen, rejected, -chosen, config.beta, num_items=denominator)
        metrics = {**metrics, "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()}
        return loss, metrics


def make_objective(config: DPOConfig, tokenizer: Any) -> PreferenceObjective | UnpairedObjective:
    """The objective of ``config.preference.loss``: pairs, or unpaired completions for kto."""
    if config.preference.loss == "kto":
        return UnpairedObjective(config.model, config.preference, tokenizer.pad_token_id, config.data.max_length)
    return PreferenceObjective(config.model, config.preference, tokenizer.pad_token_id, config.data.packing)


def worker(args: dict[str, Any]) -> None:
    """Per-worker entry point (Ray Train)."""
    from rlhf.jobs.loop import run_worker

    run_worker(args, DPOConfig, make_objective)


def run(config: DPOConfig) -> dict[str, Any]:
    """Train with the configured preference loss; the summary has reward margins (and, for pairs, accuracy) before/after."""
    from rlhf.jobs.loop import run_job

    kind = UnpairedObjective.data_kind if config.preference.loss == "kto" else PreferenceObjective.data_kind
    return run_job(config, "dpo", kind, worker)
