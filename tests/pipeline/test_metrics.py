"""Benchmark statistics against brute-force counts and textbook values."""

from __future__ import annotations

import itertools
import math

import pytest

from steer.pipeline.metrics import (
    Permutation,
    bootstrap_interval,
    mcnemar,
    paired_permutation,
    pass_at_k,
    wilson_interval,
)


@pytest.mark.parametrize("samples", [1, 2, 5, 8])
def test_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_draw(samples):
    for correct in range(samples + 1):
        draws = [True] * correct + [False] * (samples - correct)
        for k in range(1, samples + 1):
            subsets = list(itertools.combinations(draws, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(samples, correct, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_wilson_interval_textbook_values():
    low, high = wilson_interval(8, 10)  # the classic example: 0.4902 to 0.9433
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 20)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(20, 20)[1] == pytest.approx(1.0, abs=1e-12)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    scores = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1] * 5
    low, high = bootstrap_interval(scores)
    assert low < 0.7 < high and high - low < 0.35
    assert bootstrap_interval(scores, seed=3) == bootstrap_interval(scores, seed=3)
    assert bootstrap_interval([1.0] * 7) == (1.0, 1.0)


def test_mcnemar_counts_discordant_pairs_and_gives_the_exact_p_value():
    base = [True, False, False, False, True, False, False, False]
    steered = [True, True, True, True, False, True, True, False]
    result = mcnemar(base, steered)
    assert (result.gained, result.lost) == (5, 1)
    assert result.p_value == pytest.approx(2 * (1 + 6) / 64)  # 2 * P(X <= 1), X ~ Bin(6, 1/2)
    assert mcnemar([True, False], [True, False]).p_value == 1.0
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_paired_permutation_exact_and_monte_carlo():
    assert paired_permutation([0.5] * 4, [0.5] * 4) == Permutation(0.0, 1.0)
    exact = paired_permutation([0.0] * 5, [1.0] * 5)  # all 5 differences positive: 2 of 32 sign patterns as extreme
    assert exact.difference == 1.0 and exact.p_value == pytest.approx(2 / 32)
    many = paired_permutation([0.0] * 40, [0.25] * 30 + [0.0] * 10)
    assert many.p_value < 1e-3
    # 30 equal differences: no resampled sign pattern is as extreme as the observed one, yet p is never 0
    assert many.p_value == pytest.approx(1 / 10_001)
    assert paired_permutation([0.0] * 40, [0.25] * 30 + [0.0] * 10, resamples=99).p_value == pytest.approx(0.01)
    noise = paired_permutation([0.0, 1.0] * 20, [1.0, 0.0] * 20)
    assert noise.difference == 0.0 and noise.p_value == 1.0
