"""Scoring a benchmark run: accuracy with intervals, the unbiased pass@k, and paired tests of steered against base.

All functions take per-problem counts or scores, so they serve one sample per problem (pass@1) and several
(avg@n, pass@k) alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased estimator of pass@k from `samples` draws of which `correct` were right:
    `1 - C(samples - correct, k) / C(samples, k)` (Chen et al., 2021).

    Example:

    ```python
    >>> pass_at_k(samples=4, correct=1, k=2)  # 3 of the 6 pairs contain the correct draw
    0.5
    ```
    """
    if not 0 <= correct <= samples or not 1 <= k <= samples:
        raise ValueError(f"need 0 <= correct <= samples and 1 <= k <= samples; got {correct=}, {samples=}, {k=}")
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def bootstrap_interval(
    scores: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem `scores` (resampling problems), seeded."""
    values = np.asarray(scores, dtype=float)
    if len(values) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2
    return (float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)))


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (good at small counts and near 0 or 1)."""
    if trials == 0:
        return (math.nan, math.nan)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class McNemar:
    """An exact McNemar test: of the discordant pairs, `gained` (the other arm right, base wrong) and `lost` (the
    reverse), and the two-sided `p_value` of the binomial test that both are equally likely."""

    gained: int
    lost: int
    p_value: float


@dataclass(frozen=True)
class Permutation:
    """A paired sign-flip permutation test: the mean per-problem `difference` (other arm - base) and its two-sided
    `p_value`."""

    difference: float
    p_value: float


@dataclass(frozen=True)
class Estimate:
    """A mean over problems (a held-out gain, an accuracy) and the standard error of that mean (0 with fewer than two
    problems, where no spread can be measured)."""

    mean: float
    standard_error: float


def select_within_one_se(estimates: Sequence[Estimate], null_margin: float | None = None) -> int:
    """The one-standard-error rule: the index of the first of `estimates` (ordered from the simplest choice: the
    earliest checkpoint, the smallest strength) whose mean is at least the best mean less the best's standard
    error; with `null_margin`, first a test of the best against the choice that changes nothing.

    Taking the largest raw held-out estimate chases noise when held-out problems are few: on SmolLM2's word problems
    the largest held-out gain kept strength x8 on 4 held-out problems, and the head then changed 70% of the steps it
    gated. A simpler choice that the data cannot tell from the best is kept instead. The best of many noisy
    checkpoints is also biased upwards, and one standard error let a head whose held-out gain did not carry to new
    problems steer (GSM8K on Qwen2.5-Coder-0.5B: best +0.021 +- 0.0165 on 10 held-out problems, +0.006 +- 0.0035 over
    five folds of 50): `null_margin` asks the best to clear the null choice by more.

    Args:
        estimates (`Sequence[Estimate]`): held-out estimates (higher is better), simplest choice first.
        null_margin (`float`, *optional*): `estimates[0]` is the choice that changes nothing (the untrained head),
            kept unless the best mean exceeds its mean by `null_margin` of the best's standard errors. The margin
            tests the best only: once it is cleared, the one-standard-error rule may keep a simpler choice whose own
            gain is smaller.

    Returns:
        `int`: the index of the choice kept.

    Raises:
        `ValueError`: when `estimates` is empty or holds a mean or standard error that is not finite.

    Example:

    ```python
    >>> select_within_one_se([Estimate(0.0, 0.0), Estimate(0.02, 0.01), Estimate(0.025, 0.01)])
    1
    >>> select_within_one_se([Estimate(0.0, 0.0), Estimate(0.02, 0.01), Estimate(0.025, 0.01)], null_margin=2.0)
    1
    >>> select_within_one_se([Estimate(0.0, 0.0), Estimate(0.01, 0.01), Estimate(0.015, 0.01)], null_margin=2.0)
    0
    ```
    """
    if not estimates:
        raise ValueError("no held-out estimates to choose from")
    for index, estimate in enumerate(estimates):
        if not (math.isfinite(estimate.mean) and math.isfinite(estimate.standard_error)):
            raise ValueError(f"held-out estimate {index} is not finite: {estimate}")
    best = max(estimates, key=lambda estimate: estimate.mean)
    if null_margin is not None and best.mean - null_margin * best.standard_error <= estimates[0].mean:
        return 0
    return next(i for i, estimate in enumerate(estimates) if estimate.mean >= best.mean - best.standard_error)


def mcnemar(base: Sequence[bool], steered: Sequence[bool]) -> McNemar:
    """Exact McNemar test on paired outcomes (see [`McNemar`])."""
    if len(base) != len(steered):
        raise ValueError(f"paired outcomes differ in length: {len(base)} and {len(steered)}")
    gained = sum(1 for b, s in zip(base, steered) if s and not b)
    lost = sum(1 for b, s in zip(base, steered) if b and not s)
    n = gained + lost
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n if n else 1.0
    return McNemar(gained, lost, min(1.0, 2 * tail))


def paired_permutation(
    base: Sequence[float], steered: Sequence[float], resamples: int = 10_000, seed: int = 0
) -> Permutation:
    """Sign-flip permutation test of the mean per-problem difference `steered - base` (for scores in [0, 1] such
    as avg@n): two-sided p-value, exact for up to 16 differing problems, else Monte Carlo with `resamples`, counting
    the observed signs as one of them (so the p-value is at least 1 / (resamples + 1), never 0)."""
    differences = np.asarray(steered, dtype=float) - np.asarray(base, dtype=float)
    observed = abs(differences.mean()) if len(differences) else 0.0
    nonzero = differences[differences != 0]
    if len(nonzero) == 0:
        return Permutation(0.0, 1.0)
    if len(nonzero) <= 16:  # every sign pattern, the observed one among them
        signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * len(nonzero))).reshape(len(nonzero), -1).T
    else:
        drawn = np.random.default_rng(seed).choice([-1.0, 1.0], size=(resamples, len(nonzero)))
        signs = np.concatenate([np.ones((1, len(nonzero))), drawn])
    means = np.abs((signs * nonzero).sum(axis=1) / len(differences))
    return Permutation(float(differences.mean()), float((means >= observed - 1e-12).mean()))
