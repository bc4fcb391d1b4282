"""`rlhf.algos` against TRL 1.16's own loss code on the same random inputs.

TRL computes these losses inside trainer methods, not in free functions, so each test builds a trainer with
`object.__new__(Trainer)` (no `__init__`: no model loading, no accelerate state), sets only the attributes the method
reads, and calls the real method with a stand-in model that returns the tensors the method consumes:

* DPO (sigmoid, IPO): `trl/trainer/dpo_trainer.py::DPOTrainer._compute_loss`; the stand-in model returns per-token
  log-probs as TRL's fused LM head does (`outputs.log_probs`, 0 on unscored tokens).
* cDPO (label smoothing): TRL 1.16's DPOTrainer "sigmoid" no longer applies `label_smoothing`, so the formula is
  checked against the label-smoothed sigmoid of `trl/experimental/cpo/cpo_trainer.py::CPOTrainer.cpo_loss`
  (loss_type="sigmoid"), fed the policy-minus-reference log-ratios.
* Reward model (Bradley-Terry, with margin and centring): `trl/trainer/reward_trainer.py::RewardTrainer.compute_loss`;
  the stand-in model returns the scalar rewards as `outputs.logits`.
* KTO: `trl/trainer/kto_trainer.py::KTOTrainer._compute_loss`, including its KL reference point computed from the
  mismatched-completion log-probs.
* SimPO: `trl/experimental/cpo/cpo_trainer.py::CPOTrainer.get_batch_loss_metrics` (loss_type="simpo",
  cpo_alpha=0), from real logits through TRL's `get_batch_logps(average_log_prob=True)`.
* ORPO: `trl/experimental/orpo/orpo_trainer.py::ORPOTrainer.get_batch_loss_metrics`, from real logits: TRL's NLL
  (`cross_entropy_loss` in `concatenated_forward`), `get_batch_logps(average_log_prob=True)` and `odds_ratio_loss`.
* Log-probs and entropy: `trl/trainer/utils.py::selective_log_softmax` and `entropy_from_logits`.

Losses and gradients are compared. Everything runs in float64 except ORPO, where TRL casts the log-probs to float32
inside `odds_ratio_loss`, so that comparison is at float32 precision.
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlhf.algos import (
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    ipo_loss,
    kto_loss,
    orpo_loss,
    sequence_logprobs,
    sft_loss,
    simpo_loss,
    token_logprobs,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_utils = pytest.importorskip("trl.trainer.utils")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.reward_trainer import RewardTrainer  # noqa: E402

DTYPE = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}
FLOAT32 = {"rtol": 1e-6, "atol": 1e-6}


class SingleProcessAccelerator:
    """Stands in for `accelerate.Accelerator` on one process: gathers are the identity."""

    device = torch.device("cpu")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_for_metrics(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _bare_trainer(trainer_cls: type, **attributes: object) -> object:
    trainer = object.__new__(trainer_cls)
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = SingleProcessAccelerator()
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    for name, value in attributes.items():
        setattr(trainer, name, value)
    return trainer


def _completion_batch(generator: torch.Generator, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded completion mask [batch, length] (first token always prompt) and per-token log-probs
    [batch, length - 1] that are 0 where the shifted mask is 0, as TRL's fused LM head returns them."""
    lengths = torch.randint(1, length, (batch,), generator=generator)
    positions = torch.arange(length)
    completion_mask = ((positions >= 1) & (positions <= lengths.unsqueeze(1))).long()
    per_token_logps = -torch.rand(batch, length - 1, generator=generator, dtype=DTYPE) * 3
    per_token_logps = per_token_logps * completion_mask[:, 1:]
    return completion_mask, per_token_logps.requires_grad_(True)


def _fused_head_model(per_token_logps_by_width: dict[int, torch.Tensor]):
    """Model stand-in for TRL's fused-LM-head forward: picks the per-token log-probs by input width."""

    def forward(input_ids: torch.Tensor, labels: torch.Tensor, **_: object) -> SimpleNamespace:
        log_probs = per_token_logps_by_width[input_ids.shape[1]]
        zeros = torch.zeros_like(log_probs.detach())
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    return forward


def _trl_dpo(loss_type: str, beta: float, label_smoothing: float, completion_mask, per_token_logps, ref_logps):
    trainer = _bare_trainer(
        DPOTrainer,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_types=[loss_type],
        loss_weights=[1.0],
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        use_weighting=False,
        precompute_ref_logps=True,
    )
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    model = _fused_head_model({completion_mask.shape[1]: per_token_logps})
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


def test_dpo_sigmoid_matches_trl() -> None:
    generator = torch.Generator().manual_seed(0)
    batch, beta = 6, 0.3
    completion_mask, per_token_logps = _completion_batch(generator, 2 * batch, 9)
    ref_logps = -torch.rand(2 * batch, generator=generator, dtype=DTYPE) * 10

    trl_loss, trl_metrics = _trl_dpo("sigmoid", beta, 0.0, completion_mask, per_token_logps, ref_logps)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token_logps)

    policy_chosen, policy_rejected = per_token_logps.sum(dim=1).chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    (grad,) = torch.autograd.grad(loss, per_token_logps)

    torch.testing.assert_close(loss, trl_loss, **TIGHT)
    torch.testing.assert_close(grad, trl_grad, **TIGHT)
    for ours, theirs in [
        ("rewards/chosen", "rewards/chosen"),
        ("rewards/rejected", "rewards/rejected"),
        ("rewards/margin", "rewards/margins"),
    ]:
        assert metrics[ours].item() == pytest.approx(trl_metrics[theirs], rel=1e-12, abs=1e-12)
    # TRL averages the accuracy in float32.
    assert metrics["rewards/accuracy"].item() == pytest.approx(trl_metrics["rewards/accuracies"], abs=1e-7)


def test_cdpo_matches_trl_label_smoothed_sigmoid() -> None:
    """TRL 1.16's DPOTrainer "sigmoid" ignores `label_smoothing` (it only feeds "robust", "exo_pair", "aot*"), so the
    cDPO formula is checked against TRL's label-smoothed sigmoid in `CPOTrainer.cpo_loss(loss_type="sigmoid")`, applied
    to the policy-minus-reference log-ratios: it computes -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)."""
    generator = torch.Generator().manual_seed(10)
    batch, beta, label_smoothing = 9, 0.5, 0.2
    policy_logps = -torch.rand(2 * batch, generator=generator, dtype=DTYPE).mul(20).requires_grad_(True)
    ref_logps = -torch.rand(2 * batch, generator=generator, dtype=DTYPE) * 20
    policy_chosen, policy_rejected = policy_logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)

    trainer = _bare_trainer(CPOTrainer, beta=beta, label_smoothing=label_smoothing, loss_type="sigmoid", alpha=0.0)
    trl_losses, _, _ = trainer.cpo_loss(policy_chosen - ref_chosen, policy_rejected - ref_rejected)
    trl_loss = trl_losses.mean()
    (trl_grad,) = torch.autograd.grad(trl_loss, policy_logps)

    loss, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing)
    (grad,) = torch.autograd.grad(loss, policy_logps)

    torch.testing.assert_close(loss, trl_loss, **TIGHT)
    torch.testing.assert_close(grad, trl_grad, **TIGHT)


def test_ipo_matches_trl_with_length_averaged_logps() -> None:
    generator = torch.Generator().manual_seed(1)
    batch, beta = 5, 0.4
    completion_mask, per_token_logps = _completion_batch(generator, 2 * batch, 8)
    ref_logps = -torch.rand(2 * batch, generator=generator, dtype=DTYPE) * 10

    trl_loss, _ = _trl_dpo("ipo", beta, 0.0, completion_mask, per_token_logps, ref_logps)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token_logps)

    # TRL divides the summed log-ratios by the completion length: pass length-averaged policy and reference logps.
    lengths = completion_mask.sum(dim=1).to(DTYPE)
    policy_chosen, policy_rejected = (per_token_logps.sum(dim=1) / lengths).chunk(2)
    ref_chosen, ref_rejected = (ref_logps / lengths).chunk(2)
    loss, _ = ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    (grad,) = torch.autograd.grad(loss, per_token_logps)

    torch.testing.assert_close(loss, trl_loss, **TIGHT)
    torch.testing.assert_close(grad, trl_grad, **TIGHT)


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center_rewards_coefficient", [None, 0.01])
def test_bradley_terry_matches_trl_reward_trainer(with_margin: bool, center_rewards_coefficient: float | None) -> None:
    generator = torch.Generator().manual_seed(2)
    batch = 7
    rewards = torch.randn(2 * batch, 1, generator=generator, dtype=DTYPE, requires_grad=True)
    margin = torch.rand(batch, generator=generator, dtype=DTYPE) if with_margin else None

    trainer = _bare_trainer(RewardTrainer, args=SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient))
    inputs = {"attention_mask": torch.ones(2 * batch, 3, dtype=torch.long)}
    if with_margin:
        inputs["margin"] = margin
    trl_loss = trainer.compute_loss(lambda **_: SimpleNamespace(logits=rewards), inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, rewards)

    chosen, rejected = rewards.squeeze(-1).chunk(2)
    loss, metrics = bradley_terry_loss(
        chosen, rejected, margin=margin, center_rewards_coefficient=center_rewards_coefficient
    )
    (grad,) = torch.autograd.grad(loss, rewards)

    torch.testing.assert_close(loss, trl_loss, **TIGHT)
    torch.testing.assert_close(grad, trl_grad, **TIGHT)
    trl_metrics = trainer._metrics["train"]
    assert metrics["accuracy"].item() == pytest.approx(trl_metrics["accuracy"][-1], abs=1e-7)  # float32 in TRL
    assert metrics["margin"].item() == pytest.approx(trl_metrics["margin"][-1], abs=1e-12)


@pytest.mark.parametrize(("desirable_weight", "undesirable_weight", "kl_shift"), [(1.0, 1.0, 0.5), (1.3, 0.7, -2.0)])
def test_kto_matches_trl(desirable_weight: float, undesirable_weight: float, kl_shift: float) -> None:
    """kl_shift = -2 makes the mismatched-pair KL estimate negative, exercising the clamp at 0."""
    generator = torch.Generator().manual_seed(3)
    batch, beta, length, kl_length = 8, 0.2, 7, 6
    completion_mask, per_token_logps = _completion_batch(generator, batch, length)
    kl_completion_mask, kl_per_token_logps = _completion_batch(generator, batch, kl_length)
    ref_logps = -torch.rand(batch, generator=generator, dtype=DTYPE) * 8
    kl_logps = kl_per_token_logps.detach().sum(dim=1)
    ref_kl_logps = kl_logps - kl_shift + 0.3 * torch.randn(batch, generator=generator, dtype=DTYPE)
    labels = torch.tensor([True, False, True, True, False, False, True, False])

    trainer = _bare_trainer(
        KTOTrainer,
        beta=beta,
        loss_type="kto",
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        calculate_KL=True,
        precompute_ref_logps=True,
    )
    inputs = {
        "label": labels,
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "KL_input_ids": torch.zeros_like(kl_completion_mask),
        "KL_attention_mask": torch.ones_like(kl_completion_mask),
        "KL_completion_mask": kl_completion_mask,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    model = _fused_head_model({length: per_token_logps, kl_length: kl_per_token_logps.detach()})
    trl_loss = trainer._compute_loss(model, inputs, return_outputs=False)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token_logps)

    kl_reference_point = (kl_logps - ref_kl_logps).mean()
    loss, metrics = kto_loss(
        per_token_logps.sum(dim=1),
        ref_logps,
        labels,
        kl_reference_point,
        beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    (grad,) = torch.autograd.grad(loss, per_token_logps)

    torch.testing.assert_close(loss, trl_loss, **TIGHT)
    torch.testing.assert_close(grad, trl_grad, **TIGHT)
    trl_metrics = trainer._metrics["train"]
    assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"][-1], abs=1e-12)
    assert metrics["rewards/chosen"].item() == pytest.approx(trl_metrics["rewards/chosen"][-1], abs=1e-12)
    assert metrics["rewards/rejected"].item() == pytest.approx(trl_metrics["rewards/rejected"][-1], abs=1e-12)


def _paired_batch(generator: torch.Generator, batch: int, prompt: int, length: int, vocab: int, dtype: torch.dtype):
    """Chosen/rejected batches of equal width (so TRL pads nothing) with -100 on prompt and right padding."""
    keys = {}
    for side in ("chosen", "rejected"):
        input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
        ends = torch.randint(prompt + 1, length + 1, (batch,), generator=generator)
        attention_mask = (torch.arange(length) < ends.unsqueeze(1)).long()
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :prompt] = -100
        keys |= {f"{side}_input_ids": input_ids, f"{side}_attention_mask": attention_mask, f"{side}_labels": labels}
    logits = torch.randn(2 * batch, length, vocab, generator=generator, dtype=dtype, requires_grad=True)
    return keys, logits


def _logits_model(logits: torch.Tensor):
    def forward(input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        assert input_ids.shape == logits.shape[:2]
        return SimpleNamespace(logits=logits)

    return forward


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo_trainer(label_smoothing: float) -> None:
    generator = torch.Generator().manual_seed(4)
    batch, beta, simpo_gamma = 4, 2.0, 0.5
    keys, logits = _paired_batch(generator, batch, prompt=3, length=10, vocab=11, dtype=DTYPE)

    trainer = _bare_trainer(
        CPOTrainer,
        is_encoder_decoder=False,
        pad_token_id=0,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type="simpo",
        simpo_gamma=simpo_gamma,
        cpo_alpha=0.0,
        alpha=0.0,
    )
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(_logits_model(logits), keys)
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)

    chosen_logits, rejected_logits = logits.chunk(2)
    chosen_logps = sequence_logprobs(chosen_logits, keys["chosen_labels"], average=True)
    rejected_logps = sequence_logprobs(rejected_logits, keys["rejected_labels"], average=True)
    loss, metrics = simpo_loss(chosen_logps, rejected_logps, beta, simpo_gamma / beta, label_smoothing)
    (grad,) = torch.autograd.grad(loss, logits)

    torch.testing.assert_close(loss, trl_loss, **TIGHT)
    torch.testing.assert_close(grad, trl_grad, **TIGHT)
    assert metrics["rewards/chosen"].item() == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-12)
    assert metrics["rewards/accuracy"].item() == pytest.approx(trl_metrics["rewards/accuracies"], abs=1e-7)


def test_orpo_matches_trl_orpo_trainer() -> None:
    generator = torch.Generator().manual_seed(5)
    batch, beta = 4, 0.25
    keys, logits = _paired_batch(generator, batch, prompt=2, length=9, vocab=7, dtype=torch.float32)

    trainer = _bare_trainer(ORPOTrainer, is_encoder_decoder=False, padding_value=0, beta=beta)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(_logits_model(logits), keys)
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)

    chosen_logits, rejected_logits = logits.chunk(2)
    # TRL's ORPO NLL is the token mean over the chosen prompt + completion (every attended token).
    nll_labels = keys["chosen_input_ids"].masked_fill(keys["chosen_attention_mask"] == 0, -100)
    chosen_nll, _ = sft_loss(chosen_logits, nll_labels)
    chosen_logps = sequence_logprobs(chosen_logits, keys["chosen_labels"], average=True)
    rejected_logps = sequence_logprobs(rejected_logits, keys["rejected_labels"], average=True)
    loss, metrics = orpo_loss(chosen_logps, rejected_logps, chosen_nll, beta)
    (grad,) = torch.autograd.grad(loss, logits)

    torch.testing.assert_close(loss, trl_loss, **FLOAT32)
    torch.testing.assert_close(grad, trl_grad, **FLOAT32)
    for key in ("nll", "log_odds_ratio", "log_odds_chosen"):
        trl_key = "nll_loss" if key == "nll" else key
        assert metrics[key].item() == pytest.approx(trl_metrics[trl_key], rel=1e-6, abs=1e-6)


def test_token_logprobs_and_entropy_match_trl_utils() -> None:
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 5, 13, generator=generator, dtype=DTYPE) * 4
    targets = torch.randint(0, 13, (3, 5), generator=generator)
    torch.testing.assert_close(
        token_logprobs(logits, targets), trl_utils.selective_log_softmax(logits, targets), **TIGHT
    )
    torch.testing.assert_close(entropy_from_logits(logits), trl_utils.entropy_from_logits(logits), **TIGHT)


def test_sequence_logprobs_matches_trl_get_batch_logps() -> None:
    generator = torch.Generator().manual_seed(7)
    keys, logits = _paired_batch(generator, 3, prompt=2, length=8, vocab=9, dtype=DTYPE)
    logits = logits.detach()[:3]
    labels = keys["chosen_labels"]
    for average in (False, True):
        expected = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
        torch.testing.assert_close(sequence_logprobs(logits, labels, average=average), expected, **TIGHT)
