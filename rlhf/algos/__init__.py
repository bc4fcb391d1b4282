"""Pure post-training math: tensors in, `(loss, metrics)` out.

Nothing here knows about configs, devices, process groups or models. Each loss divides a sum of per-item losses by
an explicit denominator (`num_tokens=`, `num_sequences=`, `num_items=`): pass the global count and the losses of
data-parallel shards and gradient-accumulation micro-batches add up to the loss of the whole batch.
"""

from rlhf.algos.advantages import (
    gae,
    grpo_advantages,
    reinforce_plus_plus_returns,
    rloo_advantages,
    token_rewards_with_kl,
)
from rlhf.algos.kl import adaptive_kl_coefficient, kl_estimate
from rlhf.algos.logprobs import (
    entropy_from_logits,
    packed_sequence_logprobs,
    scored_positions,
    sequence_logprobs,
    token_logprobs,
)
from rlhf.algos.masking import (
    divide_by_denominator,
    masked_count,
    masked_mean,
    masked_sum,
    masked_var,
    reduction_dtype,
    whiten,
)
from rlhf.algos.policy import entropy_loss, explained_variance, ppo_policy_loss, value_loss
from rlhf.algos.preference import (
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    simpo_loss,
)
from rlhf.algos.sft import sft_loss

__all__ = [
    "adaptive_kl_coefficient",
    "bradley_terry_loss",
    "divide_by_denominator",
    "dpo_loss",
    "entropy_from_logits",
    "entropy_loss",
    "explained_variance",
    "gae",
    "grpo_advantages",
    "ipo_loss",
    "kl_estimate",
    "kto_loss",
    "log1mexp",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "orpo_loss",
    "packed_sequence_logprobs",
    "ppo_policy_loss",
    "reduction_dtype",
    "reinforce_plus_plus_returns",
    "rloo_advantages",
    "scored_positions",
    "sequence_logprobs",
    "sft_loss",
    "simpo_loss",
    "token_logprobs",
    "token_rewards_with_kl",
    "value_loss",
    "whiten",
]
