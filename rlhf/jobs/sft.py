"""``rlhf sft``: supervised fine-tuning, a Ray Train job over the training engine.

The objective: the token-mean next-token NLL of the responses (prompt tokens masked)
over the whole global batch; packed rows train padding-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlhf.config import SFTConfig
from rlhf.models.config import ModelConfig

if TYPE_CHECKING:
    from rlhf.data.formats import Kind


class SFTObjective:
    """Masked next-token cross-entropy on causal-LM batches."""

    data_kind: Kind = "sft"

    def __init__(self, model: ModelConfig, pad_token_id: int) -> None:
        self.model_config = model
        self.pad_token_id = pad_token_id

    def build_model(self) -> torch.nn.Module:
        """The causal LM to fine-tune."""
        from rlhf.models.loading import load_causal_lm

        return load_causal_lm(self.model_config)

    def prepare(self, model: torch.nn.Module, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Nothing to add."""
        return examples

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Packed rows padding-free with ``position_ids``; others right-padded with a mask."""
        from rlhf.data.collate import collate_sft

        return collate_sft(examples, self.pad_token_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Scored label tokens (after the next-token shift)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def derived_eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Held-out perplexity, exp(token-mean NLL)."""
        from rlhf.jobs.loop import perplexity

        return {"eval_perplexity": perplexity(metrics["eval_loss"])}

    def loss(self, model: Any, batch: dict[str, torch.Tensor], denominator: float) -> tuple[torch.Tensor, dict]:
        """This micro-batch's NLL sum over the global token count."""
        from rlhf.algos import sft_loss
        from rlhf.models.logits import label_logits

        inputs: dict[str, torch.Tensor] = {
            k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch
        }
        # no KV cache (label_logits passes use_cache=False): transformers detects packed rows (restarting
        # position_ids) only without one
        logits, targets, _ = label_logits(model, inputs, batch["labels"])
        loss, _ = sft_loss(logits, targets, num_tokens=denominator, shifted=True)
        return loss, {}


def make_objective(config: SFTConfig, tokenizer: Any) -> SFTObjective:
    """The SFT objective for ``config``."""
    return SFTObjective(config.model, tokenizer.pad_token_id)


def worker(args: dict[str, Any]) -> None:
    """Per-worker entry point (Ray Train)."""
    from rlhf.jobs.loop import run_worker

    run_worker(args, SFTConfig, make_objective)


def run(config: SFTConfig) -> dict[str, Any]:
    """Run SFT; return a summary with the train and held-out loss and perplexity before and after."""
    from rlhf.jobs.loop import run_job

    return run_job(config, "sft", SFTObjective.data_kind, worker)
