"""``rlhf rm``: a reward model trained on preference pairs (Bradley-Terry), a Ray Train job.

The model is the base causal LM with a scalar head read at the last token. Chosen and
rejected sequences go through one forward pass as a [2B, T] batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlhf.config import RewardLossConfig, RMConfig
from rlhf.models.config import ModelConfig

if TYPE_CHECKING:
    from rlhf.data.formats import Kind


class RewardObjective:
    """-log sigma(r_chosen - r_rejected - margin) over the pairs of the global batch."""

    data_kind: Kind = "preference"

    def __init__(self, model: ModelConfig, loss: RewardLossConfig, pad_token_id: int) -> None:
        self.model_config = model
        self.loss_config = loss
        self.pad_token_id = pad_token_id

    def build_model(self) -> torch.nn.Module:
        """The scalar-head model."""
        from rlhf.models.loading import load_scalar_model

        return load_scalar_model(self.model_config)

    def prepare(self, model: torch.nn.Module, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Nothing to add."""
        return examples

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Chosen rows first, then rejected rows, padded together."""
        from rlhf.data.collate import preference_batch

        return preference_batch(examples, self.pad_token_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs."""
        return batch["input_ids"].shape[0] // 2

    def derived_eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Nothing beyond accuracy and margins."""
        return {}

    def loss(self, model: Any, batch: dict[str, torch.Tensor], denominator: float) -> tuple[torch.Tensor, dict]:
        """Bradley-Terry loss of this micro-batch's pairs over the global pair count."""
        from rlhf.algos import bradley_terry_loss

        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        chosen, rejected = rewards.float().chunk(2)
        margin = torch.full_like(chosen, self.loss_config.margin) if self.loss_config.margin else None
        center = self.loss_config.center_rewards_coefficient or None
        return bradley_terry_loss(
            chosen, rejected, margin=margin, num_items=denominator, center_rewards_coefficient=center
        )


def make_objective(config: RMConfig, tokenizer: Any) -> RewardObjective:
    """The reward objective for ``config``."""
    return RewardObjective(config.model, config.loss, tokenizer.pad_token_id)


def worker(args: dict[str, Any]) -> None:
    """Per-worker entry point (Ray Train)."""
    from rlhf.jobs.loop import run_worker

    run_worker(args, RMConfig, make_objective)


def run(config: RMConfig) -> dict[str, Any]:
    """Train a reward model; the summary has the held-out pairwise accuracy before and after."""
    from rlhf.jobs.loop import run_job

    return run_job(config, "rm", RewardObjective.data_kind, worker)
