"""``rlhf dpo preference.loss=kto``: KTO on unpaired desirable / undesirable completions, a Ray Train job.

KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306) trains on ``(prompt, completion, label)`` rows.
Each completion's implicit reward ``r = beta (log pi - log ref)`` (summed over its tokens) is compared with a
reference point ``z0``, an estimate of ``KL(pi || ref)``: desirable completions are pushed above it, undesirable
ones below it (the loss is :func:`rlhf.algos.kto_loss`). Preference pairs are read as two unpaired rows, the
chosen response desirable and the rejected one undesirable (``rlhf.data.formats.as_kind``), as TRL users expect.

The reference point, as in the paper and TRL: ``log pi - log ref`` of *mismatched* (prompt, completion) pairs,
averaged, not differentiated and clamped at 0. Here:

* The mismatched pairs are built once, deterministically, in :meth:`UnpairedObjective.prepare` on each rank's
  shard: example ``i``'s prompt followed by the completion of the next example (cyclically, in shard order) whose
  prompt differs (:func:`kl_partners`). TRL rotates completions by one within blocks of the dataset without
  looking at the prompts; preference pairs split into two rows put equal prompts side by side, and such a
  "mismatched" pair would be a matched one.
* Reference log-probs of the matched and of the mismatched sequences are computed once before training by the
  initial policy, like DPO's; ``preference.reference=live`` holds a frozen reference model instead.
* ``z0`` of a micro-batch is the mean over the mismatched pairs of that micro-batch on every rank (an all-reduce,
  as TRL gathers over processes). Deviation from the loop's invariances: with gradient accumulation each
  micro-batch has its own ``z0``, so 1 x 8 accumulation is close to, not exactly, 8 x 1.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from rlhf.config import PreferenceLossConfig
from rlhf.data.collate import IGNORE_INDEX
from rlhf.models.config import ModelConfig

if TYPE_CHECKING:
    from rlhf.data.formats import Kind


def prompt_length(labels: Sequence[int]) -> int:
    """Tokens before the first scored one: the prompt (with a chat template's generation prompt)."""
    return next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def kl_partners(prompts: Sequence[Hashable]) -> list[int]:
    """For each example, the index of the example whose completion forms its mismatched pair.

    The partner of ``i`` is the next example after ``i`` (cyclically) whose prompt differs from ``prompts[i]``;
    where every prompt is the same, ``i + 1`` (no mismatched pair exists). Deterministic, O(n).

    Args:
        prompts: [n] comparable prompts (e.g. tuples of prompt token ids), in shard order.

    Returns:
        [n] partner indices.
    """
    n = len(prompts)
    doubled = [*prompts, *prompts]
    next_different: list[int | None] = [None] * (2 * n)
    for i in range(2 * n - 2, -1, -1):
        next_different[i] = i + 1 if doubled[i + 1] != doubled[i] else next_different[i + 1]
    return [(i + 1) % n if (j := next_different[i]) is None else j % n for i in range(n)]


def mismatched_example(
    prompt_of: dict[str, Any], completion_of: dict[str, Any], max_length: int | None = None
) -> dict[str, list[int]]:
    """The prompt of ``prompt_of`` followed by the completion of ``completion_of``, with its labels.

    Both are encoded examples (``input_ids``, ``labels``; the prompt is labelled -100). The completion keeps its
    own labels (e.g. -100 on a chat template's tokens after EOS); the result is cut to ``max_length`` tokens. The
    encoder guarantees that every prompt leaves room for at least one completion token.

    Returns:
        ``{"input_ids", "labels"}`` as lists.
    """
    prompt_end = prompt_length(prompt_of["labels"])
    completion_start = prompt_length(completion_of["labels"])
    input_ids = [*prompt_of["input_ids"][:prompt_end], *completion_of["input_ids"][completion_start:]]
    labels = [IGNORE_INDEX] * prompt_end + [*completion_of["labels"][completion_start:]]
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def with_mismatched_pairs(examples: Sequence[dict[str, Any]], max_length: int | None = None) -> list[dict[str, Any]]:
    """``examples`` each with ``kl_input_ids`` and ``kl_labels``: its prompt and its partner's completion."""
    prompts = [tuple(e["input_ids"][: prompt_length(e["labels"])]) for e in examples]
    partners = kl_partners(prompts)
    prepared = []
    for example, partner in zip(examples, partners, strict=True):
        mismatched = mismatched_example(example, examples[partner], max_length)
        prepared.append({**example, "kl_input_ids": mismatched["input_ids"], "kl_labels": mismatched["labels"]})
    return prepared


class UnpairedObjective:
    """KTO over the completions of the global batch, with the reference point from mismatched pairs."""

    data_kind: Kind = "unpaired"

    def __init__(
        self, model: ModelConfig, preference: PreferenceLossConfig, pad_token_id: int, max_length: int | None = None
    ) -> None:
        if preference.loss != "kto":
            raise ValueError(f"UnpairedObjective trains kto, not {preference.loss}; use PreferenceObjective")
        self.model_config = model
        self.config = preference
        self.pad_token_id = pad_token_id
        self.max_length = max_length  # of the mismatched sequences, as of the data
        self.reference: torch.nn.Module | None = None

    def build_model(self) -> torch.nn.Module:
        """The policy; with a live reference, also a frozen copy of it."""
        from rlhf.models.loading import load_causal_lm

        if self.config.reference == "live":
            self.reference = load_causal_lm(self.model_config, trainable=False)
        return load_causal_lm(self.model_config)

    def prepare(self, model: torch.nn.Module, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Mismatched pairs of this rank's examples; and, unless live, reference log-probs of both (once)."""
        examples = with_mismatched_pairs(examples, self.max_length)
        from rlhf.jobs.loop import reference_pass

        if self.config.reference == "live" or not examples:
            return examples
        return reference_pass(
            model, examples, self.collate, lambda batch: (self._logps(model, batch), self._logps(model, batch, "kl_"))
        )

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Matched rows (``input_ids``...), mismatched rows (``kl_input_ids``...), ``label`` [B] bool; reference log-probs if any."""
        from rlhf.data.collate import pad_batch

        batch = pad_batch(examples, self.pad_token_id, ("input_ids", "labels", "kl_input_ids", "kl_labels", "label"))
        if "reference_logps" in examples[0]:
            batch["reference_logps"] = torch.tensor([e["reference_logps"][0] for e in examples], dtype=torch.float32)
            batch["kl_reference_logps"] = torch.tensor([e["reference_logps"][1] for e in examples], dtype=torch.float32)
        return batch

    def _logps(self, model: Any, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        """Summed completion log-probs [B] of the matched (``prefix=""``) or mismatched (``"kl_"``) rows."""
        from rlhf.algos import sequence_logprobs
        from rlhf.models.logits import label_logits

        inputs = {"input_ids": batch[f"{prefix}input_ids"], "attention_mask": batch[f"{prefix}attention_mask"]}
        logits, targets, _ = label_logits(model, inputs, batch[f"{prefix}labels"])
        return sequence_logprobs(logits.float(), targets, shifted=True)

    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs [B] of the matched and the mismatched rows: precomputed, or from the live model."""
        if self.reference is None:
            return batch["reference_logps"], batch["kl_reference_logps"]
        from rlhf.jobs.loop import on_device

        reference = on_device(self.reference, batch["input_ids"].device)
        with torch.no_grad():
            return self._logps(reference, batch), self._logps(reference, batch, "kl_")

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Completions."""
        return batch["input_ids"].shape[0]

    def kl_reference_point(
        self, model: Any, batch: dict[str, torch.Tensor], reference_kl: torch.Tensor
    ) -> torch.Tensor:
        """z0: mean of log pi - log ref over the mismatched pairs of this micro-batch on every rank (0-dim, detached)."""
        from cluster.collectives import all_reduce_sum

        with torch.no_grad():
            logratios = self._logps(model, batch, "kl_") - reference_kl
        total, count = all_reduce_sum(logratios.sum(), logratios.shape[0])
        return torch.tensor(total / max(count, 1.0), dtype=logratios.dtype, device=logratios.device)

    def derived_eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Exact held-out reward means per class and their margin (the per-batch means are only approximations).

        ``rewards/chosen_total`` is, per batch, the sum of desirable rewards over *all* its completions, so its
        item-weighted aggregate over batches and ranks divided by ``desirable_fraction`` is the mean over every
        desirable completion (likewise for undesirable ones).
        """
        fraction = metrics["eval_desirable_fraction"]
        chosen = metrics["eval_rewards/chosen_total"] / fraction if fraction > 1e-12 else 0.0
        rejected = metrics["eval_rewards/rejected_total"] / (1.0 - fraction) if fraction < 1.0 - 1e-12 else 0.0
        return {
            "eval_rewards/chosen": chosen,
            "eval_rewards/rejected": rejected,
            "eval_rewards/margin": chosen - rejected,
        }

    def loss(self, model: Any, batch: dict[str, torch.Tensor], denominator: float) -> tuple[torch.Tensor, dict]:
        """This micro-batch's share of the KTO loss over the global completion count."""
        from rlhf.algos import kto_loss

        config = self.config
        policy = self._logps(model, batch)
        reference, reference_kl = self._reference_logps(batch)
        z0 = self.kl_reference_point(model, batch, reference_kl)
        labels = batch["label"].bool()
        loss, kto_metrics = kto_loss(
            policy, reference, labels, z0, config.beta, config.desirable_weight, config.undesirable_weight, denominator
        )
        rewards = config.beta * (policy.detach() - reference)
        desirable = labels.to(rewards.dtype)
        chosen, rejected = kto_metrics["rewards/chosen"], kto_metrics["rewards/rejected"]
        metrics = {
            "kl": kto_metrics["kl"],
            "rewards/chosen": chosen,  # means over this micro-batch's desirable / undesirable completions
            "rewards/rejected": rejected,
            "rewards/margin": chosen - rejected,
            "rewards/chosen_total": (rewards * desirable).mean(),  # aggregate exactly: see derived_eval_metrics
            "rewards/rejected_total": (rewards * (1.0 - desirable)).mean(),
            "desirable_fraction": desirable.mean(),
        }
        return loss, metrics
