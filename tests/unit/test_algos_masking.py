"""Hand-computed checks of the masked reductions in `rlhf.algos.masking`."""

from __future__ import annotations

import math

import torch

from rlhf.algos import divide_by_denominator, masked_mean, masked_sum, masked_var, whiten

TIGHT = {"rtol": 1e-12, "atol": 1e-12}
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0], [0, 1, 1]])  # valid: 1, 2, 5, 6


def test_masked_sum_and_mean_over_all_and_rows() -> None:
    torch.testing.assert_close(masked_sum(VALUES, MASK), torch.tensor(14.0, dtype=torch.float64), **TIGHT)
    torch.testing.assert_close(masked_mean(VALUES, MASK), torch.tensor(3.5, dtype=torch.float64), **TIGHT)
    torch.testing.assert_close(masked_sum(VALUES, MASK, dim=-1), torch.tensor([3.0, 11.0], dtype=torch.float64))
    torch.testing.assert_close(masked_mean(VALUES, MASK, dim=-1), torch.tensor([1.5, 5.5], dtype=torch.float64))
    torch.testing.assert_close(
        masked_mean(VALUES, MASK.bool(), dim=0), torch.tensor([1.0, 3.5, 6.0], dtype=torch.float64)
    )


def test_masked_mean_of_nothing_is_zero_not_nan() -> None:
    empty = torch.zeros_like(MASK)
    assert masked_mean(VALUES, empty).item() == 0.0
    rows = masked_mean(VALUES, torch.tensor([[0, 0, 0], [1, 0, 0]]), dim=-1)
    torch.testing.assert_close(rows, torch.tensor([0.0, 4.0], dtype=torch.float64), **TIGHT)


def test_masked_var_unbiased_and_biased() -> None:
    # valid 1, 2, 5, 6: mean 3.5, squared deviations 6.25 + 2.25 + 2.25 + 6.25 = 17
    assert masked_var(VALUES, MASK).item() == 17.0 / 3.0
    assert masked_var(VALUES, MASK, unbiased=False).item() == 17.0 / 4.0
    torch.testing.assert_close(masked_var(VALUES, MASK, dim=-1), torch.tensor([0.5, 0.5], dtype=torch.float64), **TIGHT)


def test_whiten_matches_naive_statistics_and_zeroes_masked_positions() -> None:
    mean, std = 3.5, math.sqrt(17.0 / 3.0 + 1e-8)
    scaled = [[(1 - mean) / std, (2 - mean) / std, None], [None, (5 - mean) / std, (6 - mean) / std]]
    expected = torch.tensor([[0.0 if x is None else x for x in row] for row in scaled], dtype=torch.float64)
    torch.testing.assert_close(whiten(VALUES, MASK), expected, **TIGHT)
    unshifted = torch.tensor([[0.0 if x is None else x + mean for x in row] for row in scaled], dtype=torch.float64)
    torch.testing.assert_close(whiten(VALUES, MASK, shift_mean=False), unshifted, **TIGHT)


def test_whitened_values_have_zero_mean_and_unit_variance() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 10, generator=generator, dtype=torch.float64) * 3 + 2
    mask = torch.rand(6, 10, generator=generator) > 0.3
    whitened = whiten(values, mask, eps=0.0)
    torch.testing.assert_close(masked_mean(whitened, mask), torch.tensor(0.0, dtype=torch.float64), **TIGHT)
    torch.testing.assert_close(masked_var(whitened, mask), torch.tensor(1.0, dtype=torch.float64), **TIGHT)


def test_16_bit_reductions_accumulate_in_float32() -> None:
    ones = torch.ones(1001, dtype=torch.bfloat16)  # bfloat16 cannot represent 1001: a bfloat16 count would be 1000
    mask = torch.ones(1001, dtype=torch.bool)
    assert masked_sum(ones, mask).dtype == torch.float32
    assert masked_sum(ones, mask).item() == 1001.0
    assert masked_mean(ones, mask).item() == 1.0
    assert divide_by_denominator(torch.tensor(3.0, dtype=torch.bfloat16), 1001, mask.sum()).dtype == torch.float32
    assert whiten(torch.arange(4, dtype=torch.bfloat16), torch.ones(4)).dtype == torch.bfloat16


def test_divide_by_denominator() -> None:
    total = torch.tensor(12.0, dtype=torch.float64)
    local = torch.tensor(4.0)
    assert divide_by_denominator(total, None, local).item() == 3.0
    assert divide_by_denominator(total, 8, local).item() == 1.5
    assert divide_by_denominator(total, torch.tensor(6), local).item() == 2.0
    assert divide_by_denominator(total, None, torch.tensor(0.0)).item() == 12.0  # empty shard: clamp to 1
