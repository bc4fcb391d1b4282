"""Supervised fine-tuning loss: masked next-token cross-entropy.

    L = - sum_{b, t : y_{b,t+1} != -100} log p_theta(y_{b,t+1} | y_{b,<=t}) / N

with the Hugging Face shift convention (labels aligned with input ids; the logits at t predict the label at t + 1;
-100 marks unscored tokens). N is the global number of scored tokens when the caller passes `num_tokens`, so that
data-parallel shards and gradient-accumulation micro-batches each contribute `their NLL sum / N` and the sum of
their losses is the token-mean loss of the whole batch (the `num_items_in_batch` fix of Hugging Face Transformers
for gradient accumulation). Without `num_tokens`, N is the local number of scored tokens.
"""

from __future__ import annotations

import torch

from rlhf.algos.logprobs import IGNORE_INDEX, token_logprobs
from rlhf.algos.masking import Denominator, divide_by_denominator, masked_count, masked_sum


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_tokens: Denominator = None,
    ignore_index: int = IGNORE_INDEX,
    shifted: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked next-token negative log-likelihood, summed and divided by a (global) token count.

    Args:
        logits: [B, T, V].
        labels: [B, T], aligned with the input ids, `ignore_index` where not scored.
        num_tokens: global number of scored (shifted) label tokens; None uses the local count.
        ignore_index: label value of unscored tokens.
        shifted: `logits[:, k]` already predicts `labels[:, k]` (the logits at the predicting positions only,
            :func:`rlhf.algos.logprobs.scored_positions`).

    Returns:
        loss: 0-dim tensor (float32 for 16-bit logits).
        metrics: "nll_sum" (summed NLL of this shard) and "num_tokens" (scored tokens of this shard), detached 0-dim.
    """
    logits, targets = (logits, labels) if shifted else (logits[:, :-1], labels[:, 1:])
    label_mask = targets != ignore_index
    per_token = token_logprobs(logits, targets)
    nll_sum = -masked_sum(per_token, label_mask)
    local_tokens = masked_count(label_mask, dtype=per_token.dtype)
    loss = divide_by_denominator(nll_sum, num_tokens, local_tokens)
    metrics = {"nll_sum": nll_sum.detach(), "num_tokens": local_tokens.detach()}
    return loss, metrics
