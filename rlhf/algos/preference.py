"""Pairwise and unpaired preference losses: reward modelling, DPO, cDPO, IPO, SimPO, ORPO and KTO.

Every loss is `sum_i l_i / N` over the B items (pairs, or completions for KTO) of the shard, where N is the
global item count `num_items` when given (so shard losses add up to the whole-batch loss) or B otherwise.
sigma is the logistic function; logps are sequence log-probabilities from `rlhf.algos.logprobs.sequence_logprobs`.

Bradley-Terry reward model (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155; margin as in Llama 2,
Touvron et al. 2023, https://arxiv.org/abs/2307.09288; centring term of Eisenstein et al. 2023,
https://arxiv.org/abs/2312.09244):
    l = -log sigma(r_c - r_r - m)  [+ c * (r_c + r_r)^2]

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290), with h = (log pi_c - log ref_c) - (log pi_r - log ref_r):
    l = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
eps > 0 is conservative DPO (cDPO, Mitchell 2023, https://ericmitchell.ai/cdpo.pdf): labels flipped with
probability eps.

IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, Eq. 17; beta is the paper's tau):
    l = (h - 1 / (2 beta))^2
h is built from whatever log-probabilities the caller passes. TRL's DPOTrainer (loss_type="ipo") divides each
summed completion log-ratio by the completion length, i.e. uses length-averaged log-probabilities, which the IPO
authors confirmed is the form behind the paper's results; pass `sequence_logprobs(..., average=True)` for that.

SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734), reference-free, with length-averaged logps:
    l = -(1 - eps) log sigma(beta (log pi_c - log pi_r) - gamma) - eps log sigma(-(...)),
written with gamma_beta_ratio = gamma / beta as in the SimPO code: beta (log pi_c - log pi_r - gamma_beta_ratio).

ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691, Eqs. 4-7), with length-averaged logps:
    log odds(y) = log p - log(1 - p) = logp - log1mexp(logp)
    L = L_SFT + beta * mean_i[-log sigma(log odds(y_c) - log odds(y_r))]
beta is the paper's lambda. This is TRL's `ORPOTrainer` convention (trl/experimental/orpo/orpo_trainer.py:
`odds_ratio_loss` returns beta * log sigma(.) and `get_batch_loss_metrics` takes `nll - mean(that)`), where L_SFT is
the token-mean NLL of the chosen sequences (prompt and completion) over the whole batch.

KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, Eq. 7), with r = log pi - log ref and the reference
point z0 = max(0, KL estimate), not differentiated:
    desirable:   l = w_D (1 - sigma(beta (r - z0)))
    undesirable: l = w_U (1 - sigma(beta (z0 - r)))

Reference log-probabilities and z0 are treated as constants (detached). Metrics are detached 0-dim means over the
shard, for logging.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhf.algos.masking import Denominator, divide_by_denominator, masked_count, masked_mean


def _batch_count(values: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values.shape[0], dtype=values.dtype, device=values.device)


def _smoothed_logistic_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigma(x) - eps log sigma(-x), elementwise; shape of `logits`."""
    loss = -F.logsigmoid(logits) * (1.0 - label_smoothing)
    if label_smoothing != 0.0:
        loss = loss - F.logsigmoid(-logits) * label_smoothing
    return loss


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
    }


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    num_items: Denominator = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward-model loss -log sigma(r_c - r_r - margin), optionally with reward centring.

    Args:
        chosen_rewards: [B] scalar rewards of the preferred responses.
        rejected_rewards: [B] scalar rewards of the dispreferred responses.
        margin: [B] required reward gap per pair (Llama 2), or None for 0.
        num_items: global number of pairs; None uses B.
        center_rewards_coefficient: c of the auxiliary c * (r_c + r_r)^2 per pair, or None.

    Returns:
        loss: 0-dim tensor.
        metrics: "accuracy" (r_c > r_r), "margin" (mean r_c - r_r), "rewards/chosen", "rewards/rejected".
    """
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    per_pair = -F.logsigmoid(logits)
    if center_rewards_coefficient is not None:
        per_pair = per_pair + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    loss = divide_by_denominator(per_pair.sum(), num_items, _batch_count(per_pair))
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "accuracy": (chosen > rejected).to(chosen.dtype).mean(),
        "margin": (chosen - rejected).mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
    }
    return loss, metrics


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    num_items: Denominator = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss; `label_smoothing > 0` gives conservative DPO (cDPO).

    Args:
        policy_chosen_logps: [B] summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: [B] same for the rejected completions.
        reference_chosen_logps: [B] summed log-probs of the chosen completions under the reference (constant).
        reference_rejected_logps: [B] same for the rejected completions.
        beta: inverse temperature of the implicit reward beta * (log pi - log ref).
        label_smoothing: probability eps that a preference label is flipped, in [0, 0.5).
        num_items: global number of pairs; None uses B.

    Returns:
        loss: 0-dim tensor.
        metrics: "rewards/chosen", "rewards/rejected" (beta * (log pi - log ref)), "rewards/accuracy",
            "rewards/margin".
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - reference_rejected_logps.detach()
    per_pair = _smoothed_logistic_loss(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    loss = divide_by_denominator(per_pair.sum(), num_items, _batch_count(per_pair))
    return loss, _reward_metrics(beta * chosen_logratios, beta * rejected_logratios)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    num_items: Denominator = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO loss (h - 1 / (2 beta))^2 with h the difference of policy-vs-reference log-ratios.

    The log-probabilities are used as given. To match TRL's DPOTrainer(loss_type="ipo") and the IPO paper's
    results, pass length-averaged log-probabilities (`sequence_logprobs(..., average=True)`).

    Args:
        policy_chosen_logps: [B] log-probs of the chosen completions under the policy.
        policy_rejected_logps: [B] same for the rejected completions.
        reference_chosen_logps: [B] log-probs of the chosen completions under the reference (constant).
        reference_rejected_logps: [B] same for the rejected completions.
        beta: regularisation strength (the paper's tau); the target log-ratio gap is 1 / (2 beta).
        num_items: global number of pairs; None uses B.

    Returns:
        loss: 0-dim tensor.
        metrics: "rewards/chosen", "rewards/rejected" (beta * (log pi - log ref)), "rewards/accuracy",
            "rewards/margin".
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - reference_rejected_logps.detach()
    per_pair = (chosen_logratios - rejected_logratios - 1.0 / (2.0 * beta)) ** 2
    loss = divide_by_denominator(per_pair.sum(), num_items, _batch_count(per_pair))
    return loss, _reward_metrics(beta * chosen_logratios, beta * rejected_logratios)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float,
    gamma_beta_ratio: float,
    label_smoothing: float = 0.0,
    num_items: Denominator = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO loss -log sigma(beta * (log pi_c - log pi_r - gamma / beta)), with optional label smoothing.

    Args:
        policy_chosen_logps: [B] length-averaged log-probs of the chosen completions.
        policy_rejected_logps: [B] length-averaged log-probs of the rejected completions.
        beta: reward scale.
        gamma_beta_ratio: target reward margin gamma divided by beta (TRL's `simpo_gamma / beta`).
        label_smoothing: probability eps that a preference label is flipped.
        num_items: global number of pairs; None uses B.

    Returns:
        loss: 0-dim tensor.
        metrics: "rewards/chosen", "rewards/rejected" (beta * log pi), "rewards/accuracy", "rewards/margin".
    """
    logits = beta * (policy_chosen_logps - policy_rejected_logps - gamma_beta_ratio)
    per_pair = _smoothed_logistic_loss(logits, label_smoothing)
    loss = divide_by_denominator(per_pair.sum(), num_items, _batch_count(per_pair))
    return loss, _reward_metrics(beta * policy_chosen_logps, beta * policy_rejected_logps)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate over the whole range (Maechler 2012, "Accurately computing log(1 - exp(-|a|))").

    Uses log(-expm1(x)) near 0 and log1p(-exp(x)) below -log 2, where each is free of cancellation.

    Args:
        x: any shape, values < 0 (log-probabilities).

    Returns:
        Tensor of the shape of `x`.
    """
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float,
    num_items: Denominator = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO loss: chosen NLL plus beta times the odds-ratio loss -log sigma(log odds_c - log odds_r).

    `chosen_nll` may be:
      * 0-dim: an already reduced NLL, added as is. TRL's convention is the token-mean NLL of the chosen sequences
        over the batch; for data-parallel shards pass `sft_loss(chosen_logits, chosen_labels, num_tokens=global)`,
        whose shard values add up to the whole-batch NLL.
      * [B]: a per-pair NLL (e.g. each sequence's mean token NLL, the paper's per-example L_SFT), summed and divided
        by the same denominator as the odds-ratio term.

    Args:
        policy_chosen_logps: [B] length-averaged log-probs (< 0) of the chosen completions.
        policy_rejected_logps: [B] length-averaged log-probs (< 0) of the rejected completions.
        chosen_nll: 0-dim or [B], see above.
        beta: weight of the odds-ratio term (the paper's lambda).
        num_items: global number of pairs; None uses B.

    Returns:
        loss: 0-dim tensor.
        metrics: "nll" (the NLL term), "log_odds_ratio" (mean log sigma(log odds_c - log odds_r)),
            "log_odds_chosen" (mean log odds_c - log odds_r), and "rewards/chosen", "rewards/rejected" (beta * log pi),
            "rewards/accuracy", "rewards/margin".
    """
    count = _batch_count(policy_chosen_logps)
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        log1mexp(policy_chosen_logps) - log1mexp(policy_rejected_logps)
    )
    log_sigmoid_odds = F.logsigmoid(log_odds)
    odds_ratio_term = divide_by_denominator(-beta * log_sigmoid_odds.sum(), num_items, count)
    nll_term = chosen_nll if chosen_nll.dim() == 0 else divide_by_denominator(chosen_nll.sum(), num_items, count)
    loss = nll_term + odds_ratio_term
    metrics = _reward_metrics(beta * policy_chosen_logps, beta * policy_rejected_logps)
    metrics["nll"] = nll_term.detach()
    metrics["log_odds_ratio"] = log_sigmoid_odds.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return loss, metrics


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_reference_point: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    num_items: Denominator = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO loss on unpaired desirable / undesirable completions.

    Args:
        policy_logps: [B] summed log-probs of the completions under the policy.
        reference_logps: [B] same under the reference (constant).
        labels: [B] bool, True for desirable completions.
        kl_reference_point: 0-dim estimate of KL(pi || ref), e.g. the batch mean of log pi - log ref over mismatched
            (prompt, completion) pairs (all-reduced across ranks by the caller). Clamped at 0 and detached here.
        beta: inverse temperature of the implicit reward beta * (log pi - log ref).
        desirable_weight: lambda_D.
        undesirable_weight: lambda_U.
        num_items: global number of completions; None uses B.

    Returns:
        loss: 0-dim tensor.
        metrics: "kl" (z0), "rewards/chosen", "rewards/rejected" (means of beta * (log pi - log ref) over the
            desirable / undesirable completions, 0 if none), "num_desirable", "num_undesirable".
    """
    labels = labels.bool()
    reference_point = kl_reference_point.detach().clamp(min=0)
    logratios = policy_logps - reference_logps.detach()
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - reference_point)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (reference_point - logratios)))
    per_item = torch.where(labels, desirable_losses, undesirable_losses)
    loss = divide_by_denominator(per_item.sum(), num_items, _batch_count(per_item))
    rewards = beta * logratios.detach()
    metrics = {
        "kl": reference_point.to(rewards.dtype),
        "rewards/chosen": masked_mean(rewards, labels),
        "rewards/rejected": masked_mean(rewards, ~labels),
        "num_desirable": masked_count(labels, dtype=rewards.dtype),
        "num_undesirable": masked_count(~labels, dtype=rewards.dtype),
    }
    return loss, metrics
