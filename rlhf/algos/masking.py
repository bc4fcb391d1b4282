"""Masked reductions and the explicit-denominator convention shared by every loss in `rlhf.algos`.

Masks are 0/1 tensors (bool, integer or floating) broadcastable to `values`. Masked-out values are ignored even
when they are not finite. A masked reduction over zero valid elements returns 0 rather than NaN (the count is
clamped to at least 1), so an empty micro-batch contributes nothing instead of poisoning the step. Sums and counts
accumulate in at least float32 (`reduction_dtype`): a bfloat16 count is exact only up to 256, so reductions of
16-bit values, and the losses built on them, come back in float32.

Denominators. Every loss returns `sum(per-item losses) / denominator`. When the caller passes the global
count of items (tokens, sequences, pairs) over all data-parallel ranks and gradient-accumulation micro-batches,
summing the per-shard losses gives exactly the loss of the whole batch, and so do the gradients. When the caller
passes None the local count is used, which is the plain mean over the shard.

`whiten` follows the per-batch advantage normalisation of PPO implementations (Schulman et al. 2017,
https://arxiv.org/abs/1707.06347; TRL/trlx `masked_whiten`):
    whiten(x) = (x - mean_m(x)) / sqrt(var_m(x) + eps)     (+ mean_m(x) again when shift_mean=False)
with the masked mean and the Bessel-corrected masked variance.
"""

from __future__ import annotations

import torch

Denominator = float | torch.Tensor | None
"""A global count: a Python number, a 0-dim tensor, or None for the local count."""


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions of `dtype` values accumulate and return in: `dtype`, but at least float32."""
    return torch.promote_types(dtype, torch.float32)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1.

    Args:
        values: any shape, e.g. [B, T].
        mask: 0/1, broadcastable to `values`.
        dim: dimension to reduce; None reduces over all elements.

    Returns:
        0-dim tensor when `dim` is None, else `values` with `dim` removed (e.g. [B] for dim=-1 on [B, T]), in
        `reduction_dtype(values.dtype)`.
    """
    # where() rather than a product: non-finite values on masked positions (e.g. -inf log-probs on padding) are ignored.
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    dtype = reduction_dtype(values.dtype)
    return masked.sum(dtype=dtype) if dim is None else masked.sum(dim=dim, dtype=dtype)


def masked_count(mask: torch.Tensor, dim: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Number of valid elements of `mask` as a floating tensor.

    Args:
        mask: 0/1 tensor, any shape, e.g. [B, T].
        dim: dimension to count along; None counts all elements.
        dtype: floating dtype of the values being counted; the result is in `reduction_dtype(dtype)`.

    Returns:
        0-dim tensor when `dim` is None, else `mask` with `dim` removed.
    """
    mask = mask.bool().to(reduction_dtype(dtype))
    return mask.sum() if dim is None else mask.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1; 0 where nothing is valid.

    Args:
        values: any shape, e.g. [B, T].
        mask: 0/1, broadcastable to `values`.
        dim: dimension to reduce; None reduces over all elements.

    Returns:
        0-dim tensor when `dim` is None, else `values` with `dim` removed, in `reduction_dtype(values.dtype)`.
    """
    mask = torch.broadcast_to(mask, values.shape)
    count = masked_count(mask, dim=dim, dtype=values.dtype).clamp(min=1)
    return masked_sum(values, mask, dim=dim) / count


def masked_var(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is 1.

    With `unbiased=True` the Bessel correction n / (n - 1) is applied (as `torch.var` does); a reduction over a
    single valid element then gives NaN, like `torch.var`. Nothing valid gives 0.

    Args:
        values: any shape, e.g. [B, T].
        mask: 0/1, broadcastable to `values`.
        dim: dimension to reduce; None reduces over all elements.
        unbiased: apply Bessel's correction.

    Returns:
        0-dim tensor when `dim` is None, else `values` with `dim` removed, in `reduction_dtype(values.dtype)`.
    """
    mask = torch.broadcast_to(mask, values.shape)
    mean = masked_mean(values, mask, dim=dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    variance = masked_mean((values - mean) ** 2, mask, dim=dim)
    if unbiased:
        count = masked_count(mask, dim=dim, dtype=values.dtype)
        variance = variance * count / (count - 1)
    return variance


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `values` to zero mean and unit variance over the valid elements of `mask`.

    Statistics are taken over every valid element of the tensor (the whole local batch); to whiten over a global
    batch, call this on the gathered batch. Positions where `mask` is 0 are set to 0 in the output.

    Args:
        values: any shape, e.g. advantages [B, T].
        mask: 0/1, broadcastable to `values`.
        shift_mean: if False, the mean is added back (only the scale is normalised), as for PPO rewards.
        eps: added to the variance before the square root.

    Returns:
        Tensor of the shape and dtype of `values`.
    """
    mask = torch.broadcast_to(mask, values.shape)
    mean = masked_mean(values, mask)
    variance = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened)).to(values.dtype)


def divide_by_denominator(total: torch.Tensor, denominator: Denominator, local_count: torch.Tensor) -> torch.Tensor:
    """`total / denominator`, falling back to the local count (at least 1) when `denominator` is None.

    Args:
        total: 0-dim tensor, the sum of per-item losses of this shard.
        denominator: global number of items (Python number or 0-dim tensor), or None.
        local_count: 0-dim tensor, number of items in this shard.

    Returns:
        0-dim tensor in `reduction_dtype(total.dtype)`.
    """
    total = total.to(reduction_dtype(total.dtype))
    if denominator is None:
        return total / local_count.to(total.dtype).clamp(min=1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(device=total.device, dtype=total.dtype)
    return total / denominator
