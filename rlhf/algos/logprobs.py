"""Token log-probabilities and entropies from language-model logits.

For logits z over a vocabulary V and a target token y:

    log p(y) = z_y - logsumexp_v z_v                      (log_softmax gathered at y)
    H(p)     = logsumexp_v z_v - sum_v softmax(z)_v z_v   (Shannon entropy in nats)

Both are computed without materialising a [B, T, V] `log_softmax` tensor next to the logits: the gather reads
one logit per position and `logsumexp` reduces over V.

Sequence log-probabilities follow the Hugging Face causal-LM convention: `labels` are aligned with `input_ids`,
the logits at position t predict the label at t + 1, and label -100 marks tokens that are not scored (prompt,
padding). This is the quantity that DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) and its
variants compare between policy and reference.
"""

from __future__ import annotations

import torch

from rlhf.algos.masking import masked_count, masked_sum

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token, `logits[..., target] - logsumexp(logits)`.

    Negative targets (e.g. -100) are read as index 0; the caller masks those positions.

    Args:
        logits: [B, T, V] (any leading shape).
        targets: [B, T] integer token ids (same leading shape as `logits`).

    Returns:
        [B, T] log-probabilities in the dtype of `logits`.
    """
    index = targets.clamp(min=0).unsqueeze(-1)
    target_logits = torch.gather(logits, dim=-1, index=index).squeeze(-1)
    return target_logits - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the softmax distribution at each position.

    Args:
        logits: [B, T, V] (any leading shape).

    Returns:
        [B, T] entropies in the dtype of `logits`.
    """
    probs = torch.softmax(logits, dim=-1)
    expected_logit = torch.einsum("...v,...v->...", probs, logits)
    return torch.logsumexp(logits, dim=-1) - expected_logit


def packed_sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    sequence_ids: torch.Tensor,
    num_sequences: int,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
    shifted: bool = False,
) -> torch.Tensor:
    """:func:`sequence_logprobs` of sequences packed into one row (no padding).

    Args:
        logits: [1, N, V] over the packed row.
        labels: [1, N]; each sequence's first label must be `ignore_index` (nothing is scored across a boundary).
        sequence_ids: [N], the sequence each token belongs to, in 0..num_sequences-1.
        num_sequences: number of sequences in the row.
        average: per-token mean instead of the sum (see :func:`sequence_logprobs`).
        ignore_index: label value of unscored tokens.
        shifted: `logits[0, k]` already predicts `labels[0, k]`, and `sequence_ids[k]` is that label's sequence (the
            caller took the logits at the predicting positions only: :func:`scored_positions`).

    Returns:
        [num_sequences] log-probabilities, at least float32.
    """
    if shifted:
        logits, targets, owners = logits[0], labels[0], sequence_ids
    else:  # the logits at t predict the label at t + 1, which belongs to sequence_ids[t + 1]
        logits, targets, owners = logits[0, :-1], labels[0, 1:], sequence_ids[1:]
    label_mask = targets != ignore_index
    per_token = token_logprobs(logits, targets)
    per_token = torch.where(label_mask, per_token, torch.zeros_like(per_token))
    summed = per_token.new_zeros(num_sequences).index_add(0, owners, per_token)
    if not average:
        return summed
    counts = per_token.new_zeros(num_sequences).index_add(0, owners, label_mask.to(per_token.dtype))
    return summed / counts.clamp(min=1)


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
    shifted: bool = False,
) -> torch.Tensor:
    """Summed (or per-token averaged) log-probability of each sequence's labelled tokens.

    Shifts inside: `logits[:, :-1]` predict `labels[:, 1:]`; labels equal to `ignore_index` are not scored.

    Args:
        logits: [B, T, V].
        labels: [B, T], aligned with the input ids, `ignore_index` where not scored.
        average: divide each sum by the number of scored tokens of that sequence (at least 1), as the
            length-normalised log-probabilities of IPO, SimPO and ORPO.
        ignore_index: label value of unscored tokens.
        shifted: `logits[:, k]` already predicts `labels[:, k]` (the caller took the logits at the predicting
            positions only: :func:`scored_positions`).

    Returns:
        [B] log-probabilities in the dtype of `logits`, but at least float32.
    """
    logits, targets = (logits, labels) if shifted else (logits[:, :-1], labels[:, 1:])
    label_mask = targets != ignore_index
    per_token = token_logprobs(logits, targets)
    summed = masked_sum(per_token, label_mask, dim=-1)
    if not average:
        return summed
    return summed / masked_count(label_mask, dim=-1, dtype=summed.dtype).clamp(min=1)


def scored_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The positions whose logits any row needs: the t in 0..T-2 at which some row's next label is scored.

    A causal LM's output layer and softmax need to run only there (not on the prompt, nor on padding past every
    row's end): the logits at these positions, with ``labels[:, positions + 1]`` and ``shifted=True``, give the
    functions above what the logits of every position give them.

    Args:
        labels: [B, T], aligned with the input ids, `ignore_index` where not scored.

    Returns:
        [K] increasing int64 positions, on the device of `labels`.
    """
    return (labels[:, 1:] != ignore_index).any(dim=0).nonzero().squeeze(-1)
